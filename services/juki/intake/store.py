"""The intake repository: every write to the identity store of one tier goes through :class:`Store`.

One batch is one transaction: notifications are inserted, the residents they concern re-folded
(:func:`juki.domain.fold` over every stored notification of the code), versions and the change feed
appended, sequences advanced and — at the prefecture tier — outbox rows added. Nothing is acknowledged
before COMMIT. Concurrent batches touching one resident serialise on advisory locks for the whole
transaction; batches of one municipality serialise only for the tail (outbox, change feed, sequences,
COMMIT), so their validation and folds overlap. Locks are taken in two sorted phases (residents, then
municipalities), so they cannot deadlock.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from juki import domain
from juki._gen.juki.intake.v1 import intake_pb2
from juki.intake import convert
from juki.mesh.errors import FieldViolation, invalid

_UPSERT_RESIDENT = (
    f"INSERT INTO residents ({', '.join(convert.RESIDENT_COLUMNS)}, updated_at) VALUES ("
    + ", ".join(f"${i + 1}" for i in range(len(convert.RESIDENT_COLUMNS)))
    + f", ${len(convert.RESIDENT_COLUMNS) + 1}) ON CONFLICT (resident_code) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in (*convert.RESIDENT_COLUMNS[1:], "updated_at"))
)
"""One row (bulk load)."""

BULK_COMPARED = (
    "resident_kind", "family_name", "given_name", "family_name_kana", "given_name_kana", "alphabetic_name",
    "common_name", "former_family_name", "birth_year", "birth_month", "birth_day", "sex", "municipality_code",
    "street", "status",
)
"""The columns a bulk-loaded row is compared on: equal in all of them, the stored row is left as it is."""

# The batch's resident rows go by COPY (binary, no per-value Python) into a session-local staging table
# (created once per connection, emptied at every COMMIT), then into ``residents`` in one statement.
_CREATE_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS residents_stage (LIKE residents INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_STAGE_COLUMNS = (*convert.RESIDENT_COLUMNS, "updated_at")
_UPSERT_FROM_STAGE = (
    f"INSERT INTO residents ({', '.join(_STAGE_COLUMNS)}) SELECT {', '.join(_STAGE_COLUMNS)} FROM residents_stage"
    " ON CONFLICT (resident_code) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _STAGE_COLUMNS[1:])
)

_LOCK = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k ORDER BY k"


class Outcome(enum.Enum):
    ACCEPTED = intake_pb2.NOTIFICATION_OUTCOME_ACCEPTED
    DUPLICATE = intake_pb2.NOTIFICATION_OUTCOME_DUPLICATE
    REJECTED = intake_pb2.NOTIFICATION_OUTCOME_REJECTED


@dataclass
class Item:
    """One notification of a batch on its way through the store."""

    message: intake_pb2.Notification
    payload: bytes
    digest: bytes
    notification: domain.Notification | None  # normalised; None when rejected before the store
    violations: list[FieldViolation] = field(default_factory=list)
    outcome: Outcome | None = None
    acknowledged_at: dt.datetime | None = None

    @property
    def notification_id(self) -> str:
        return self.message.notification_id

    def reject(self, *violations: FieldViolation) -> None:
        self.violations.extend(violations)
        self.outcome = Outcome.REJECTED


async def lock_residents(conn: asyncpg.Connection, codes: Iterable[str]) -> None:
    """Take the per-resident advisory locks (sorted, for the rest of the transaction) that every write of
    a resident's row takes first: notification batches and bulk loads."""
    await conn.execute(_LOCK, sorted({_lock_key("r:" + code) for code in codes}))


def _lock_key(text: str) -> int:
    return int(struct.unpack(">q", hashlib.blake2b(text.encode(), digest_size=8).digest())[0])


def _affected_codes(notification: domain.Notification) -> list[str]:
    codes = [notification.resident_code]
    if notification.new_resident_code:
        codes.append(notification.new_resident_code)
    return codes


def decode_event(payload: bytes) -> domain.Notification:
    """A stored payload as the normalised domain notification the fold consumes."""
    message = intake_pb2.Notification.FromString(payload)
    return domain.normalise_notification(convert.to_domain(message))


@dataclass
class BulkCounts:
    """Records of one bulk batch written (new version) and left as they were (equal to the stored row);
    with a :class:`BulkBatch`, also those received and refused (each record counted once per load) and
    the load's resume point before this batch (records up to it were applied by an earlier batch)."""

    applied: int = 0
    unchanged: int = 0
    received: int = 0
    rejected: int = 0
    skipped_through: str = ""


@dataclass(frozen=True)
class BulkBatch:
    """One batch of a bulk load as its progress is recorded: ``codes`` of every record of the batch (in
    the order received), those of them refused, and whether the batch continues its stream in ascending
    resident-code order (only a load sent in order can be resumed)."""

    load_id: str
    municipality_code: str
    through: int
    codes: Sequence[str]
    rejected: Sequence[str]
    in_order: bool


@dataclass(frozen=True)
class SequenceState:
    municipality_code: str
    last_acknowledged: int
    highest_received: int
    missing: list[tuple[int, int]]


# The sort key of a resident version in a history page (recorded_at, occurred_on, resident_code, version).
HistoryKey = tuple[dt.datetime, dt.date | None, str, int]


def history_key(row: Any) -> HistoryKey:
    """The keyset position of a version row returned by :meth:`Store.history`."""
    return (row["recorded_at"], row["occurred_on"], row["resident_code"], int(row["version"]))


class Store:
    """SQL of one intake tier. ``relay`` adds outbox rows (prefecture tier)."""

    def __init__(self, pool: asyncpg.Pool, *, relay: bool) -> None:
        self.pool = pool
        self.relay = relay

    # -- notifications ----------------------------------------------------------------------------

    async def apply(self, items: Sequence[Item]) -> None:
        """Store and apply the not-yet-rejected ``items`` in one transaction; set each outcome."""
        candidates = [item for item in items if item.outcome is None]
        if not candidates:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            now: dt.datetime = await conn.fetchval("SELECT now()")
            # Two lock phases, each in sorted key order, so they cannot deadlock: first the residents
            # (held for the fold), last the municipalities (held only for the tail: outbox, change feed,
            # sequences, COMMIT). Batches of one municipality fold in parallel; their outbox and change-feed
            # ids are still allocated in commit order per municipality. A concurrent batch carrying the same
            # notification id or (municipality, sequence) fails on the unique index and is retried.
            resident_keys = sorted(
                {_lock_key("r:" + code) for i in candidates if i.notification for code in _affected_codes(i.notification)}
            )
            await conn.execute(_LOCK, resident_keys)
            await self._classify(conn, candidates)
            fresh = [item for item in candidates if item.outcome is None]
            if fresh:
                await self._insert(conn, fresh, now)
                change_rows = await self._fold(conn, fresh, now)
                municipalities = {i.message.municipality_code for i in fresh}
                await conn.execute(_LOCK, sorted({_lock_key("m:" + code) for code in municipalities}))
                if self.relay:
                    await conn.copy_records_to_table(
                        "outbox",
                        columns=("notification_id", "payload", "enqueued_at", "municipality_code"),
                        records=[(i.notification_id, i.payload, now, i.message.municipality_code) for i in fresh],
                    )
                if change_rows:
                    await conn.copy_records_to_table(
                        "resident_changes", columns=("resident_code", "change_kind", "occurred_on", "recorded_at"),
                        records=change_rows,
                    )
                await self._advance_sequences(conn, municipalities, now)
            for item in fresh:
                item.outcome = Outcome.ACCEPTED
                item.acknowledged_at = now
            for item in candidates:
                if item.outcome is Outcome.DUPLICATE and item.acknowledged_at is None:
                    item.acknowledged_at = now

    async def _classify(self, conn: asyncpg.Connection, items: list[Item]) -> None:
        """Mark duplicates, id conflicts, reused sequences and retired codes."""
        # Lookups are per key (LATERAL ... LIMIT 1: one index probe each), so a batch costs the same
        # whatever the size of the table; "= ANY(array)" let the planner pick full scans and hash joins.
        rows = await conn.fetch(
            "SELECT n.notification_id, n.content_digest, n.acknowledged_at FROM unnest($1::text[]) AS q(id)"
            " CROSS JOIN LATERAL (SELECT notification_id, content_digest, acknowledged_at FROM notifications"
            " WHERE notification_id = q.id LIMIT 1) n",
            [i.notification_id for i in items],
        )
        known = {r["notification_id"]: (bytes(r["content_digest"]), r["acknowledged_at"]) for r in rows}
        sequences = await conn.fetch(
            "SELECT n.municipality_code, n.sequence, n.notification_id FROM unnest($1::text[], $2::bigint[]) AS q(m, s)"
            " CROSS JOIN LATERAL (SELECT municipality_code, sequence, notification_id FROM notifications"
            " WHERE municipality_code = q.m AND sequence = q.s LIMIT 1) n",
            [i.message.municipality_code for i in items], [i.message.sequence for i in items],
        )
        taken = {(r["municipality_code"], r["sequence"]): r["notification_id"] for r in sequences}
        entry_codes = [code for i in items if i.notification for code in _affected_codes(i.notification)]
        retired = {
            r["resident_code"]: r["successor_code"]
            for r in await conn.fetch(
                "SELECT resident_code, successor_code FROM retired_codes WHERE resident_code = ANY($1::text[])",
                entry_codes,
            )
        }
        in_batch: dict[str, Item] = {}
        for item in items:
            first = known.get(item.notification_id)
            earlier = in_batch.get(item.notification_id)
            if first is None and earlier is not None:
                first = (earlier.digest, None)
            if first is not None:
                if first[0] == item.digest:
                    # A repeat inside this batch gets its acknowledged_at once the batch commits.
                    item.outcome = Outcome.DUPLICATE
                    item.acknowledged_at = first[1]
                else:
                    item.reject(FieldViolation(
                        "notification_id",
                        f"notification {item.notification_id} was received before with other content",
                        "DUPLICATE_NOTIFICATION_CONFLICT",
                    ))
                continue
            key = (item.message.municipality_code, item.message.sequence)
            if key in taken:
                item.reject(FieldViolation(
                    "sequence",
                    f"sequence {key[1]} of {key[0]} was already used by notification {taken[key]}",
                ))
                continue
            assert item.notification is not None
            problem = self._retired_problem(item.notification, retired)
            if problem is not None:
                item.reject(problem)
                continue
            in_batch[item.notification_id] = item
            taken[key] = item.notification_id

    @staticmethod
    def _retired_problem(notification: domain.Notification, retired: dict[str, str]) -> FieldViolation | None:
        kind = notification.change_kind
        if notification.new_resident_code and notification.new_resident_code in retired:
            return FieldViolation("new_resident_code", "this 住民票コード was retired and is never reissued")
        if kind.group is domain.ChangeGroup.ENTRY and notification.resident_code in retired:
            return FieldViolation(
                "resident_code",
                f"this 住民票コード was retired (successor {retired[notification.resident_code]}) and is never reissued",
            )
        return None

    async def _insert(self, conn: asyncpg.Connection, items: list[Item], now: dt.datetime) -> None:
        await conn.copy_records_to_table(
            "notifications",
            columns=(
                "notification_id", "municipality_code", "sequence", "resident_code", "change_kind", "occurred_on",
                "notified_on", "content_digest", "payload", "received_at", "new_resident_code", "acknowledged_at",
            ),
            records=[
                (
                    i.notification_id, i.message.municipality_code, i.message.sequence, i.message.resident_code,
                    i.message.change_kind, i.notification.occurred_on, i.notification.notified_on, i.digest,
                    i.payload, now, i.message.new_resident_code or None, now,
                )
                for i in items
                if i.notification is not None
            ],
        )

    async def _fold(self, conn: asyncpg.Connection, items: list[Item], now: dt.datetime) -> list[tuple[Any, ...]]:
        """Re-fold the residents of ``items``; store residents and versions; return the change-feed rows."""
        new_by_code: dict[str, list[domain.Notification]] = defaultdict(list)
        for item in items:
            assert item.notification is not None
            for code in _affected_codes(item.notification):
                new_by_code[code].append(item.notification)
        codes = list(new_by_code)
        fresh_ids = {item.notification_id for item in items}
        history: dict[str, list[domain.Notification]] = defaultdict(list)
        rows = await conn.fetch(
            "SELECT n.notification_id, n.payload FROM unnest($1::text[]) AS q(c)"
            " CROSS JOIN LATERAL (SELECT notification_id, payload FROM notifications"
            " WHERE resident_code = q.c OR new_resident_code = q.c OFFSET 0) n",
            codes,
        )
        decoded: set[str] = set()  # a code change is found under both of its codes
        for stored in rows:
            if stored["notification_id"] in fresh_ids or stored["notification_id"] in decoded:
                continue
            decoded.add(stored["notification_id"])
            event = decode_event(bytes(stored["payload"]))
            for code in _affected_codes(event):
                if code in new_by_code:
                    history[code].append(event)
        versions = {
            r["resident_code"]: r["version"]
            for r in await conn.fetch(
                "SELECT r.resident_code, r.version FROM unnest($1::text[]) AS q(c) CROSS JOIN LATERAL"
                " (SELECT resident_code, version FROM residents WHERE resident_code = q.c LIMIT 1) r", codes
            )
        }
        upserts: list[tuple[Any, ...]] = []
        version_rows: list[tuple[Any, ...]] = []
        change_rows: list[tuple[Any, ...]] = []
        retirements: list[tuple[str, str, dt.date]] = []
        for code, fresh in new_by_code.items():
            known = history[code]
            base = versions.get(code, 0)
            state: domain.ResidentState | None = None
            row: tuple[Any, ...] = ()
            # The state after each fresh event (in arrival order), as a full fold of everything up to it
            # would give; fold_each applies in-order events incrementally and re-folds the others.
            for index, (event, folded) in enumerate(zip(fresh, domain.fold_each(known, fresh, code), strict=True)):
                if folded is None:
                    continue
                # The stored version counts the events applied at this tier (a bulk-loaded record
                # counts as one), so it only ever grows.
                state = folded
                version = base + index + 1
                row = convert.resident_row(state, version)
                record = convert.record_from_resident_row(row)
                kind = convert.change_kind_to_proto(event.change_kind)
                version_rows.append((
                    code, version, event.notification_id, kind,
                    event.occurred_on, event.notified_on, record.SerializeToString(deterministic=True), now,
                ))
                change_rows.append((code, kind, event.occurred_on, now))
                if event.change_kind is domain.ChangeKind.RESIDENT_CODE_CHANGE and event.resident_code == code:
                    assert event.new_resident_code is not None
                    retirements.append((code, event.new_resident_code, event.occurred_on))
            if state is not None:
                upserts.append((*row, now))
        if upserts:
            # Each code appears once per batch (new_by_code), as ON CONFLICT DO UPDATE requires.
            await conn.execute(_CREATE_STAGE)
            await conn.copy_records_to_table("residents_stage", columns=_STAGE_COLUMNS, records=upserts)
            await conn.execute(_UPSERT_FROM_STAGE)
        if version_rows:
            await conn.copy_records_to_table(
                "resident_versions",
                columns=("resident_code", "version", "notification_id", "change_kind", "occurred_on",
                         "notified_on", "record", "recorded_at"),
                records=version_rows,
            )
        if retirements:
            await conn.executemany(
                "INSERT INTO retired_codes (resident_code, successor_code, retired_on) VALUES ($1, $2, $3)"
                " ON CONFLICT (resident_code) DO NOTHING",
                retirements,
            )
        return change_rows

    async def _advance_sequences(self, conn: asyncpg.Connection, municipalities: Iterable[str], now: dt.datetime) -> None:
        for code in sorted(municipalities):
            row = await conn.fetchrow(
                "INSERT INTO municipalities AS m (municipality_code, last_accepted_at, as_of) VALUES ($1, $2, $2)"
                " ON CONFLICT (municipality_code) DO UPDATE SET last_accepted_at = $2,"
                " as_of = CASE WHEN m.connected THEN $2 ELSE m.as_of END"
                " RETURNING last_sequence, loaded_through",
                code, now,
            )
            assert row is not None
            floor = max(row["last_sequence"], row["loaded_through"])
            sequences = await conn.fetch(
                "SELECT sequence FROM notifications WHERE municipality_code = $1 AND sequence > $2 ORDER BY sequence",
                code, floor,
            )
            contiguous = floor
            for record in sequences:
                if record["sequence"] != contiguous + 1:
                    break
                contiguous += 1
            highest = sequences[-1]["sequence"] if sequences else floor
            await conn.execute(
                "UPDATE municipalities SET last_sequence = $2, highest_sequence = GREATEST(highest_sequence, $3)"
                " WHERE municipality_code = $1",
                code, contiguous, highest,
            )

    async def sequence_state(self, municipality_code: str) -> SequenceState:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT last_sequence, highest_sequence, loaded_through FROM municipalities WHERE municipality_code = $1",
                municipality_code,
            )
            if row is None:
                return SequenceState(municipality_code, 0, 0, [])
            last = max(row["last_sequence"], row["loaded_through"])
            highest = max(row["highest_sequence"], last)
            present = [
                r["sequence"]
                for r in await conn.fetch(
                    "SELECT sequence FROM notifications WHERE municipality_code = $1 AND sequence > $2"
                    " ORDER BY sequence",
                    municipality_code, last,
                )
            ]
        missing: list[tuple[int, int]] = []
        expected = last + 1
        for sequence in present:
            if sequence > expected:
                missing.append((expected, sequence - 1))
            expected = sequence + 1
        return SequenceState(municipality_code, last, highest, missing)

    # -- reads ------------------------------------------------------------------------------------

    async def resident(self, code: str) -> tuple[asyncpg.Record | None, list[str]]:
        """The current record reached from ``code`` and the retired codes followed to reach it."""
        followed: list[str] = []
        async with self.pool.acquire() as conn:
            while True:
                row = await conn.fetchrow(
                    "SELECT r.*, m.as_of, m.connected FROM residents r"
                    " LEFT JOIN municipalities m ON m.municipality_code = r.municipality_code"
                    " WHERE r.resident_code = $1",
                    code,
                )
                if row is None:
                    successor = await conn.fetchval(
                        "SELECT successor_code FROM retired_codes WHERE resident_code = $1", code
                    )
                    if successor is None or successor in followed or len(followed) > 32:
                        return None, followed
                    followed.append(code)
                    code = successor
                    continue
                if row["successor_code"] and row["successor_code"] not in followed and len(followed) < 32:
                    followed.append(code)
                    code = row["successor_code"]
                    continue
                return row, followed

    async def history(self, code: str, *, after: HistoryKey | None = None, offset: int = 0,
                      limit: int | None = None) -> list[asyncpg.Record]:
        """Versions of the record across code changes (predecessors and successors), oldest first.

        One page: the ``limit`` versions after the key ``after`` (keyset; see :func:`history_key`), or
        after skipping ``offset`` versions (the page tokens of earlier versions were offsets).
        """
        async with self.pool.acquire() as conn:
            chain = [code]
            seen = {code}
            frontier = [code]
            while frontier:
                rows = await conn.fetch(
                    "SELECT resident_code, successor_code, predecessor_code FROM residents"
                    " WHERE resident_code = ANY($1::text[])",
                    frontier,
                )
                frontier = []
                for row in rows:
                    for other in (row["successor_code"], row["predecessor_code"]):
                        if other and other not in seen:
                            seen.add(other)
                            chain.append(other)
                            frontier.append(other)
            # A version without a date of change sorts last among those recorded at the same moment.
            sort_key = "(v.recorded_at, coalesce(v.occurred_on, 'infinity'::date), v.resident_code, v.version)"
            keyset = (f" AND {sort_key} > ($2::timestamptz, coalesce($3::date, 'infinity'::date), $4::text,"
                      " $5::bigint)") if after is not None else ""
            arguments: list[Any] = [chain, *(after or ())]
            return list(await conn.fetch(
                "SELECT v.*, n.municipality_code FROM resident_versions v"
                " LEFT JOIN notifications n ON n.notification_id = v.notification_id"
                f" WHERE v.resident_code = ANY($1::text[]){keyset} ORDER BY {sort_key}"
                f" LIMIT {int(limit) if limit is not None else 'ALL'} OFFSET {int(offset)}",
                *arguments,
            ))

    # -- bulk loads (BulkLoad: bulk.py checks and converts, the writes are here) ------------------------

    async def bulk_load(self, load_id: str) -> asyncpg.Record | None:
        """A load's progress (or summary, once ``finished_at`` is set); None before its first batch."""
        row: asyncpg.Record | None = await self.pool.fetchrow("SELECT * FROM bulk_loads WHERE load_id = $1", load_id)
        return row

    async def apply_bulk(self, rows: Mapping[str, Mapping[str, Any]], batch: BulkBatch | None = None) -> BulkCounts:
        """Upsert one batch of loaded residents in one transaction.

        ``rows`` maps each resident code to its ``residents`` row by column name (every column of
        :data:`convert.RESIDENT_COLUMNS` but ``version``). A row equal to the stored one in
        :data:`BULK_COMPARED` is counted unchanged; any other gets the next version, a history row and a
        change-feed row.

        With ``batch``, the load's progress row is locked first and advanced in the same transaction, so
        what it says was applied is exactly what committed. While the load arrives in resident-code
        order, records up to its last applied code were applied by an earlier batch (of this stream or
        of an interrupted one) and are skipped: a resumed load writes nothing twice, counts nothing twice.
        """
        counts = BulkCounts()
        if not rows and batch is None:
            return counts
        async with self.pool.acquire() as conn, conn.transaction():
            if batch is not None:
                counts.skipped_through = skip = await self._lock_bulk_load(conn, batch)
                if skip:
                    rows = {code: row for code, row in rows.items() if code > skip}
                taken = [code for code in batch.codes if code > skip]
                counts.received = len(taken)
                counts.rejected = sum(1 for code in batch.rejected if code > skip)
            if rows:
                await self._apply_bulk_rows(conn, rows, counts)
            if batch is not None:
                await self._advance_bulk_load(conn, batch, counts)
        return counts

    async def _lock_bulk_load(self, conn: asyncpg.Connection, batch: BulkBatch) -> str:
        """Lock (creating it at the first batch) a load's progress row; its resume point ('' for none)."""
        await conn.execute(
            "INSERT INTO bulk_loads (load_id, municipality_code, through_sequence, records_applied)"
            " VALUES ($1, $2, $3, 0) ON CONFLICT (load_id) DO NOTHING",
            batch.load_id, batch.municipality_code, batch.through,
        )
        row = await conn.fetchrow(
            "SELECT municipality_code, last_resident_code, in_order FROM bulk_loads WHERE load_id = $1 FOR UPDATE",
            batch.load_id,
        )
        assert row is not None
        if row["municipality_code"] != batch.municipality_code:
            raise invalid("load_id", "names a load of another municipality")
        # Records up to the resume point were applied before only if the load and this batch are in order
        # (a batch out of order may bring codes below it that were never sent).
        return str(row["last_resident_code"]) if row["in_order"] and batch.in_order else ""

    @staticmethod
    async def _advance_bulk_load(conn: asyncpg.Connection, batch: BulkBatch, counts: BulkCounts) -> None:
        last = batch.codes[-1] if batch.in_order and batch.codes else ""
        await conn.execute(
            "UPDATE bulk_loads SET in_order = in_order AND $2,"
            " last_resident_code = CASE WHEN in_order AND $2 THEN GREATEST(last_resident_code, $3) ELSE '' END,"
            " through_sequence = GREATEST(through_sequence, $4), records_received = records_received + $5,"
            " records_applied = records_applied + $6, records_unchanged = records_unchanged + $7,"
            " records_rejected = records_rejected + $8, updated_at = now() WHERE load_id = $1",
            batch.load_id, batch.in_order, last, batch.through, counts.received, counts.applied,
            counts.unchanged, counts.rejected,
        )

    async def _apply_bulk_rows(self, conn: asyncpg.Connection, rows: Mapping[str, Mapping[str, Any]],
                               counts: BulkCounts) -> None:
        # The same per-resident locks as a notification batch (apply) takes: a load and a relayed
        # notification for one new resident must not both create its version 1.
        await lock_residents(conn, rows)
        now: dt.datetime = await conn.fetchval("SELECT now()")
        existing = {
            r["resident_code"]: r
            for r in await conn.fetch(
                f"SELECT resident_code, version, {', '.join(BULK_COMPARED)} FROM residents"
                " WHERE resident_code = ANY($1::text[]) FOR UPDATE",
                list(rows),
            )
        }
        upserts: list[tuple[Any, ...]] = []
        versions: list[tuple[Any, ...]] = []
        changes: list[tuple[Any, ...]] = []
        for code, loaded in rows.items():
            old = existing.get(code)
            if old is not None and all(loaded[c] == old[c] for c in BULK_COMPARED):
                counts.unchanged += 1
                continue
            counts.applied += 1
            row = {**loaded, "version": old["version"] + 1 if old is not None else 1}
            upserts.append((*(row[c] for c in convert.RESIDENT_COLUMNS), now))
            stored = convert.record_from_row(row)
            versions.append((code, row["version"], None, row["last_change_kind"], row["last_changed_on"],
                             row["last_notified_on"], stored.SerializeToString(deterministic=True), now))
            changes.append((code, row["last_change_kind"], row["last_changed_on"], now))
        if upserts:
            await conn.executemany(_UPSERT_RESIDENT, upserts)
            await conn.copy_records_to_table(
                "resident_versions",
                columns=("resident_code", "version", "notification_id", "change_kind", "occurred_on",
                         "notified_on", "record", "recorded_at"),
                records=versions,
            )
            await conn.copy_records_to_table(
                "resident_changes", columns=("resident_code", "change_kind", "occurred_on", "recorded_at"),
                records=changes,
            )

    async def finish_bulk_load(self, load_id: str, municipality_code: str, through: int) -> asyncpg.Record:
        """Record a completed load: its summary and the municipality's sequence floor, in one transaction.

        The load's row is taken before the municipality's (the order every bulk write takes them in).
        Returns the load's row: its counts cover every stream of the load, each record once.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            row: asyncpg.Record = await conn.fetchrow(
                "INSERT INTO bulk_loads AS b (load_id, municipality_code, through_sequence, records_applied,"
                " finished_at) VALUES ($1, $2, $3, 0, now()) ON CONFLICT (load_id) DO UPDATE SET"
                " finished_at = COALESCE(b.finished_at, now()),"
                " through_sequence = GREATEST(b.through_sequence, $3), updated_at = now() RETURNING *",
                load_id, municipality_code, through,
            )
            await conn.execute(
                "INSERT INTO municipalities AS m (municipality_code, loaded_through) VALUES ($1, $2)"
                " ON CONFLICT (municipality_code) DO UPDATE SET loaded_through = GREATEST(m.loaded_through, $2),"
                " as_of = CASE WHEN m.connected THEN now() ELSE m.as_of END",
                municipality_code, through,
            )
        return row

    # -- connection state and status ---------------------------------------------------------------

    async def set_connection(self, municipality_code: str, connected: bool, reason: str) -> asyncpg.Record:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "INSERT INTO municipalities AS m (municipality_code, connected, connection_reason)"
                " VALUES ($1, $2, $3) ON CONFLICT (municipality_code) DO UPDATE SET"
                " connected = $2, connection_reason = $3,"
                " connection_changed = CASE WHEN m.connected = $2 THEN m.connection_changed ELSE now() END"
                " RETURNING municipality_code",
                municipality_code, connected, reason,
            )
            assert row is not None
        statuses = await self.statuses([municipality_code])
        return statuses[0]

    async def is_connected(self, codes: Iterable[str]) -> dict[str, bool]:
        rows = await self.pool.fetch(
            "SELECT municipality_code, connected FROM municipalities WHERE municipality_code = ANY($1::text[])",
            list(codes),
        )
        return {r["municipality_code"]: r["connected"] for r in rows}

    async def statuses(self, codes: Sequence[str] = ()) -> list[asyncpg.Record]:
        """Per municipality: sequence, connection, outbox backlog and the age of its oldest outbox row."""
        query = (
            "SELECT m.*, GREATEST(m.last_sequence, m.loaded_through) AS contiguous,"
            " coalesce(o.backlog, 0) AS backlog,"
            " coalesce(extract(epoch FROM now() - o.oldest) * 1000, 0)::bigint AS lag_ms"
            " FROM municipalities m LEFT JOIN ("
            "   SELECT municipality_code, count(*) AS backlog, min(enqueued_at) AS oldest FROM outbox"
            "   GROUP BY municipality_code) o ON o.municipality_code = m.municipality_code"
        )
        if codes:
            return list(await self.pool.fetch(query + " WHERE m.municipality_code = ANY($1::text[])"
                                              " ORDER BY m.municipality_code", list(codes)))
        return list(await self.pool.fetch(query + " ORDER BY m.municipality_code"))

    async def outbox_totals(self) -> tuple[int, int]:
        row = await self.pool.fetchrow(
            "SELECT count(*) AS backlog,"
            " coalesce(extract(epoch FROM now() - min(enqueued_at)) * 1000, 0)::bigint AS lag_ms FROM outbox"
        )
        assert row is not None
        return int(row["backlog"]), int(row["lag_ms"])

    async def relay_lag_quantile(self, quantile: float, window_seconds: float = 300.0) -> float:
        value = await self.pool.fetchval(
            "SELECT percentile_cont($1) WITHIN GROUP (ORDER BY max_lag_ms) FROM relay_acks"
            " WHERE acked_at > now() - make_interval(secs => $2)",
            quantile, window_seconds,
        )
        return float(value or 0.0)

    # -- outbox ------------------------------------------------------------------------------------

    async def outbox_batch(self, limit: int, after: int, conn: asyncpg.Connection | None = None) -> list[asyncpg.Record]:
        """The next outbox rows after ``after``; on ``conn`` when given (the relay's lease connection)."""
        return list(await (conn or self.pool).fetch(
            "SELECT outbox_id, notification_id, payload, enqueued_at FROM outbox WHERE outbox_id > $1"
            " ORDER BY outbox_id LIMIT $2",
            after, limit,
        ))

    async def outbox_acknowledged(self, outbox_ids: list[int], lags_ms: list[float]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            # The id range lets the primary key bound the scan (the outbox churns: dead rows until vacuum).
            await conn.execute(
                "DELETE FROM outbox WHERE outbox_id BETWEEN $2 AND $3 AND outbox_id = ANY($1::bigint[])",
                outbox_ids, min(outbox_ids, default=0), max(outbox_ids, default=0),
            )
            if lags_ms:
                await conn.execute(
                    "INSERT INTO relay_acks (notifications, max_lag_ms, mean_lag_ms) VALUES ($1, $2, $3)",
                    len(lags_ms), max(lags_ms), sum(lags_ms) / len(lags_ms),
                )
                await conn.execute("DELETE FROM relay_acks WHERE acked_at < now() - interval '1 hour'")
