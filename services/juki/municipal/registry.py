"""The register (住民基本台帳) and its outbox: every write of the municipal CS goes through here.

:meth:`Registry.record_change` changes the register and writes the notification for the prefecture in
the same transaction, numbered from the singleton ``outbox_state`` row (locked, so sequences have no
gaps even with concurrent counters).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2
from juki.mesh.errors import JukiError, Reason, invalid, invalid_many
from juki.municipal import convert

CURRENT = common_pb2.RESIDENT_STATUS_CURRENT
HEAD = "世帯主"

_ENTRY_KINDS = {
    common_pb2.CHANGE_KIND_MOVE_IN, common_pb2.CHANGE_KIND_SPECIAL_MOVE_IN,
    common_pb2.CHANGE_KIND_BIRTH, common_pb2.CHANGE_KIND_EX_OFFICIO_ENTRY,
}
_DELETION_STATUS = {
    common_pb2.CHANGE_KIND_MOVE_OUT: common_pb2.RESIDENT_STATUS_MOVED_OUT,
    common_pb2.CHANGE_KIND_DEATH: common_pb2.RESIDENT_STATUS_DECEASED,
    common_pb2.CHANGE_KIND_EX_OFFICIO_DELETION: common_pb2.RESIDENT_STATUS_DELETED,
}


@dataclass(frozen=True)
class Recorded:
    notification_id: str
    sequence: int
    resident_code: str
    connected: bool
    replayed: bool = False  # the answer of a change recorded earlier under the same request id


@dataclass(frozen=True)
class OutboxStatus:
    last_sequence: int
    last_acknowledged_sequence: int
    pending: int
    connected: bool
    oldest_pending_at: dt.datetime | None


@dataclass(frozen=True)
class PendingNotification:
    sequence: int
    notification: intake_pb2.Notification


def _entry(blob: bytes) -> municipal_pb2.ResidentEntry:
    entry = municipal_pb2.ResidentEntry()
    entry.ParseFromString(blob)
    return entry


class Registry:
    """SQL of one municipality's register, outbox and outbox state."""

    def __init__(self, pool: asyncpg.Pool, municipality_code: str) -> None:
        self.pool = pool
        self.municipality_code = municipality_code
        self._random = random.SystemRandom()

    # -- reads -------------------------------------------------------------------------------------

    async def get(self, resident_code: str) -> municipal_pb2.ResidentEntry | None:
        async with self.pool.acquire() as conn:
            blob = await conn.fetchval("SELECT entry FROM residents WHERE resident_code = $1", resident_code)
        return None if blob is None else _entry(blob)

    async def household(self, household_id: str) -> list[municipal_pb2.ResidentEntry]:
        """Current members, head first, then by resident code."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT entry FROM residents WHERE household_id = $1 AND status = $2"
                " ORDER BY relationship <> $3, resident_code",
                household_id, CURRENT, HEAD,
            )
        return [_entry(r["entry"]) for r in rows]

    async def count(self) -> int:
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval("SELECT count(*) FROM residents"))

    async def status(self) -> OutboxStatus:
        async with self.pool.acquire() as conn:
            state = await conn.fetchrow("SELECT last_sequence, connected FROM outbox_state")
            pending = await conn.fetchrow(
                "SELECT count(*) AS n, min(sequence) AS first, min(queued_at) AS oldest FROM outbox"
                " WHERE acknowledged_at IS NULL"
            )
        assert state is not None and pending is not None
        last = int(state["last_sequence"])
        acknowledged = last if pending["first"] is None else int(pending["first"]) - 1
        return OutboxStatus(last, acknowledged, int(pending["n"]), bool(state["connected"]), pending["oldest"])

    async def pending(self, limit: int, conn: asyncpg.Connection | None = None) -> list[PendingNotification]:
        """Unacknowledged outbox rows in sequence order; read on ``conn`` when given (the sender's lease)."""
        rows = await (conn or self.pool).fetch(
            "SELECT sequence, payload FROM outbox WHERE acknowledged_at IS NULL ORDER BY sequence LIMIT $1",
            limit,
        )
        found = []
        for row in rows:
            message = intake_pb2.Notification()
            message.ParseFromString(row["payload"])
            found.append(PendingNotification(int(row["sequence"]), message))
        return found

    # -- outbox bookkeeping ------------------------------------------------------------------------

    async def acknowledge(self, sequences: list[int], rejected: dict[int, str] | None = None) -> None:
        rejected = rejected or {}
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE outbox SET acknowledged_at = now() WHERE sequence = ANY($1::bigint[])"
                " AND acknowledged_at IS NULL",
                sequences,
            )
            for sequence, reason in rejected.items():
                await conn.execute("UPDATE outbox SET rejected = $2 WHERE sequence = $1", sequence, reason)

    async def acknowledge_through(self, sequence: int) -> int:
        """Mark every notification up to ``sequence`` acknowledged (the prefecture has them)."""
        async with self.pool.acquire() as conn:
            result = await conn.execute(
                "UPDATE outbox SET acknowledged_at = now() WHERE sequence <= $1 AND acknowledged_at IS NULL",
                sequence,
            )
        return int(result.split()[-1])

    async def set_connected(self, connected: bool) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE outbox_state SET connected = $1, connection_changed = now() WHERE connected <> $1",
                connected,
            )

    async def snapshot(self, batch: int, after: str = "") -> AsyncIterator[tuple[int, list[municipal_pb2.ResidentEntry]]]:
        """The register in batches of ascending resident code (those after ``after`` when given), with the
        outbox sequence it reflects (one consistent snapshot, read through a server-side cursor: memory
        holds one batch, whatever the register's size)."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            through = int(await conn.fetchval("SELECT last_sequence FROM outbox_state"))
            cursor = conn.cursor("SELECT entry FROM residents WHERE resident_code > $1 ORDER BY resident_code",
                                 after, prefetch=batch)
            chunk: list[municipal_pb2.ResidentEntry] = []
            async for row in cursor:
                chunk.append(_entry(row["entry"]))
                if len(chunk) >= batch:
                    yield through, chunk
                    chunk = []
            yield through, chunk

    async def resync_in_progress(self) -> tuple[str, int]:
        """The load id and snapshot sequence of an unfinished resync, or ("", 0)."""
        row = await self.pool.fetchrow("SELECT resync_load_id, resync_through FROM outbox_state")
        assert row is not None
        return str(row["resync_load_id"]), int(row["resync_through"])

    async def begin_resync(self, load_id: str, through: int) -> None:
        """Remember a resync before its first batch is sent (a restart continues it)."""
        async with self.pool.acquire() as conn:
            await conn.execute("UPDATE outbox_state SET resync_load_id = $1, resync_through = $2", load_id, through)

    async def finish_resync(self, load_id: str, through: int) -> None:
        """The prefecture has the whole load: notifications up to its snapshot are acknowledged with it."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE outbox SET acknowledged_at = now() WHERE sequence <= $1 AND acknowledged_at IS NULL",
                through,
            )
            await conn.execute(
                "UPDATE outbox_state SET last_resync_load_id = $1, resync_load_id = '', resync_through = 0",
                load_id,
            )

    async def abandon_resync(self, load_id: str) -> None:
        """Forget a resync the prefecture refused (the next one starts afresh with a new load id)."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE outbox_state SET resync_load_id = '', resync_through = 0 WHERE resync_load_id = $1", load_id)

    async def log_operator(self, operator_id: str, peer: str, method: str, resident_code: str = "") -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO operator_actions (operator_id, peer, method, resident_code) VALUES ($1, $2, $3, $4)",
                operator_id, peer, method, resident_code,
            )

    # -- the one write path ------------------------------------------------------------------------

    async def record_change(self, request: municipal_pb2.RecordChangeRequest, today: dt.date) -> Recorded:
        """Apply one change to the register and queue its notification, atomically."""
        kind = request.change_kind
        try:
            occurred = convert.date_from_proto(request.occurred_on)
        except ValueError as exc:
            raise invalid("occurred_on", str(exc)) from None
        try:
            notified = convert.date_from_proto(request.notified_on) or today
        except ValueError as exc:
            raise invalid("notified_on", str(exc)) from None
        if occurred is None:
            raise invalid("occurred_on", "occurred_on (異動年月日) is required")
        if kind == common_pb2.CHANGE_KIND_UNSPECIFIED or kind not in common_pb2.ChangeKind.values():
            raise invalid("change_kind", "change_kind must be set to a known kind")
        request_id, digest = _request_key(request)
        async with self.pool.acquire() as conn, conn.transaction():
            # The state row serialises this municipality's changes, so a retry racing its first attempt
            # finds the first attempt's row (or waits for it to commit) instead of applying twice.
            state = await conn.fetchrow("SELECT last_sequence, connected FROM outbox_state FOR UPDATE")
            assert state is not None
            if request_id is not None:
                earlier = await conn.fetchrow(
                    "SELECT sequence, notification_id, payload, request_digest FROM outbox WHERE request_id = $1",
                    request_id)
                if earlier is not None:
                    if bytes(earlier["request_digest"]) != digest:
                        raise invalid("request_id", "this request id was used for a different change")
                    sent = intake_pb2.Notification.FromString(earlier["payload"])
                    return Recorded(str(earlier["notification_id"]), int(earlier["sequence"]),
                                    sent.new_resident_code or sent.resident_code, bool(state["connected"]),
                                    replayed=True)
            sequence = int(state["last_sequence"]) + 1
            notification_id = str(uuid.uuid4())
            code = request.entry.resident_code
            current = None
            if code:
                blob = await conn.fetchval(
                    "SELECT entry FROM residents WHERE resident_code = $1 FOR UPDATE", code
                )
                current = None if blob is None else _entry(blob)
            writes, message = await self._apply(conn, request, current, occurred, notified, notification_id, sequence)
            normal, found = domain.check_notification(self._domain(message), today)
            if found:
                raise invalid_many(convert.to_violations(found))
            for entry in writes:
                if entry.resident_code in (message.resident_code, message.new_resident_code):
                    convert.apply_normalised(entry, normal)
            # The notification carries the stored (normalised) spelling.
            reported = next((e for e in writes if e.resident_code == message.resident_code), None)
            if reported is not None:
                message.name.CopyFrom(reported.name)
                message.address.CopyFrom(reported.address)
            for entry in writes:
                await conn.execute(
                    "INSERT INTO residents (resident_code, household_id, relationship, status, entry, version)"
                    " VALUES ($1, $2, $3, $4, $5, $6)"
                    " ON CONFLICT (resident_code) DO UPDATE SET household_id = excluded.household_id,"
                    " relationship = excluded.relationship, status = excluded.status, entry = excluded.entry,"
                    " version = excluded.version, updated_at = now()",
                    entry.resident_code, entry.household_id, entry.relationship, entry.status,
                    entry.SerializeToString(), entry.version,
                )
            await conn.execute(
                "INSERT INTO outbox (sequence, notification_id, resident_code, payload, request_id, request_digest)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                sequence, uuid.UUID(notification_id), message.resident_code, message.SerializeToString(),
                request_id, digest if request_id is not None else None,
            )
            await conn.execute("UPDATE outbox_state SET last_sequence = $1", sequence)
        subject = message.new_resident_code or message.resident_code
        return Recorded(notification_id, sequence, subject, bool(state["connected"]))

    def _domain(self, message: intake_pb2.Notification) -> domain.Notification:
        try:
            return convert.domain_notification(message)
        except ValueError as exc:
            raise invalid("entry.birth_date", f"not a valid date: {exc}") from None

    async def _new_code(self, conn: asyncpg.Connection) -> str:
        while True:
            code = domain.generate_resident_code(self._random)
            if not await conn.fetchval("SELECT 1 FROM residents WHERE resident_code = $1", code):
                return code

    async def _apply(
        self,
        conn: asyncpg.Connection,
        request: municipal_pb2.RecordChangeRequest,
        current: municipal_pb2.ResidentEntry | None,
        occurred: dt.date,
        notified: dt.date,
        notification_id: str,
        sequence: int,
    ) -> tuple[list[municipal_pb2.ResidentEntry], intake_pb2.Notification]:
        """The entries to write and the notification, by change kind (registry rules)."""
        kind = request.change_kind
        given = request.entry
        here = self.municipality_code
        args: dict[str, Any] = {
            "notification_id": notification_id, "municipality_code": here, "sequence": sequence,
            "change_kind": kind, "occurred_on": occurred, "notified_on": notified,
        }
        if kind in _ENTRY_KINDS:
            if current is not None and current.status == CURRENT:
                raise JukiError(Reason.FAILED_PRECONDITION,
                                f"resident {current.resident_code} is already registered here",
                                metadata={"resident_code": current.resident_code})
            entry = municipal_pb2.ResidentEntry()
            entry.CopyFrom(given)
            entry.resident_code = given.resident_code or await self._new_code(conn)
            street = given.address.street
            if given.address.municipality_code and given.address.municipality_code != here:
                raise invalid("entry.address.municipality_code",
                              f"the address must lie in this municipality ({here})")
            entry.address.CopyFrom(convert.full_address(here, street))
            await self._household(conn, entry)
            entry.status = CURRENT
            entry.version = (current.version + 1) if current is not None else 1
            entry.became_resident_on.CopyFrom(convert.date_to_proto(occurred))
            entry.address_since.CopyFrom(convert.date_to_proto(occurred))
            entry.address_notified_on.CopyFrom(convert.date_to_proto(notified))
            if kind == common_pb2.CHANGE_KIND_BIRTH and not entry.HasField("birth_date"):
                entry.birth_date.CopyFrom(convert.date_to_proto(occurred))
            previous = request.previous_municipality_code
            if previous and previous != here:
                place = domain.municipality(previous)
                if place is not None and not entry.HasField("previous_address"):
                    entry.previous_address.CopyFrom(convert.full_address(previous, ""))
            message = convert.notification_for(entry, previous_municipality_code=previous, **args)
            return [entry], message
        if current is None or current.status != CURRENT:
            if not given.resident_code:
                raise invalid("entry.resident_code", "the resident code of the entry to change is required")
            raise JukiError(Reason.RESIDENT_NOT_FOUND,
                            f"no current resident {given.resident_code} in {here}",
                            metadata={"resident_code": given.resident_code})
        entry = municipal_pb2.ResidentEntry()
        entry.CopyFrom(current)
        entry.version = current.version + 1
        if kind in _DELETION_STATUS:
            entry.status = _DELETION_STATUS[kind]
            message = convert.notification_for(
                entry, next_municipality_code=request.next_municipality_code, **args
            )
            return [entry], message
        if kind == common_pb2.CHANGE_KIND_ADDRESS_CHANGE:
            if not given.address.street:
                raise invalid("entry.address.street", "the new street address is required for 転居")
            entry.previous_address.CopyFrom(current.address)
            entry.address.CopyFrom(convert.full_address(here, given.address.street))
            entry.address_since.CopyFrom(convert.date_to_proto(occurred))
            entry.address_notified_on.CopyFrom(convert.date_to_proto(notified))
            if given.household_id:
                entry.household_id = given.household_id
                entry.relationship = given.relationship or HEAD
                await self._household(conn, entry)
        elif kind == common_pb2.CHANGE_KIND_NAME_CHANGE:
            if not given.name.family_name and not given.name.given_name:
                raise invalid("entry.name", "the new name is required for 氏名変更")
            for field in ("family_name", "given_name", "family_name_kana", "given_name_kana",
                          "former_family_name"):
                value = getattr(given.name, field)
                if value:
                    setattr(entry.name, field, value)
        elif kind == common_pb2.CHANGE_KIND_COMMON_NAME_CHANGE:
            entry.name.common_name = given.name.common_name  # empty removes the 通称
        elif kind == common_pb2.CHANGE_KIND_RESIDENT_CODE_CHANGE:
            new_code = request.new_resident_code
            if not new_code:
                new_code = await self._new_code(conn)
            elif await conn.fetchval("SELECT 1 FROM residents WHERE resident_code = $1", new_code):
                raise invalid("new_resident_code", "this resident code is already in use")
            retired = municipal_pb2.ResidentEntry()
            retired.CopyFrom(entry)
            retired.status = common_pb2.RESIDENT_STATUS_CODE_RETIRED
            entry.resident_code = new_code
            entry.version = 1
            message = convert.notification_for(current, new_resident_code=new_code, **args)
            return [retired, entry], message
        else:  # 職権修正: the given entry's set fields replace the stored ones
            entry.MergeFrom(given)
            entry.resident_code = current.resident_code
            entry.address.CopyFrom(convert.full_address(here, entry.address.street))
            entry.status = CURRENT
            entry.version = current.version + 1
        message = convert.notification_for(entry, **args)
        return [entry], message

    async def _household(self, conn: asyncpg.Connection, entry: municipal_pb2.ResidentEntry) -> None:
        """Place an entry in its household: a new one (as 世帯主) or an existing one (head's name copied)."""
        if not entry.household_id:
            entry.household_id = f"{self.municipality_code}-{uuid.uuid4().hex[:12]}"
            entry.relationship = HEAD
            entry.household_head = convert.full_name(entry.name)
            return
        head = await conn.fetchval(
            "SELECT entry FROM residents WHERE household_id = $1 AND status = $2 AND relationship = $3"
            " AND resident_code <> $4 LIMIT 1",
            entry.household_id, CURRENT, HEAD, entry.resident_code,
        )
        if head is None:
            if entry.relationship and entry.relationship != HEAD:
                raise invalid("entry.household_id", f"no household {entry.household_id} with a head in this municipality")
            entry.relationship = HEAD
            entry.household_head = convert.full_name(entry.name)
            return
        if not entry.relationship or entry.relationship == HEAD:
            raise invalid("entry.relationship", "the household has a head already; give the 続柄 to them")
        entry.household_head = convert.full_name(_entry(head).name)


def _request_key(request: municipal_pb2.RecordChangeRequest) -> tuple[uuid.UUID | None, bytes]:
    """The request id (None when the caller chose none) and a digest of the change it names.

    The digest leaves out the operator proof, which a retry signs anew."""
    if not request.request_id:
        return None, b""
    try:
        request_id = uuid.UUID(request.request_id)
    except ValueError:
        raise invalid("request_id", "must be a UUID, e.g. 0f8e2b6c-4d1a-4c3e-9b7a-2d5f6e8a9c01") from None
    change = municipal_pb2.RecordChangeRequest()
    change.CopyFrom(request)
    change.ClearField("operator_proof")
    change.ClearField("request_id")
    return request_id, hashlib.sha256(change.SerializeToString(deterministic=True)).digest()
