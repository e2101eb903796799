"""The IntakeService servicer: proto <-> domain, authorisation by tier, and hand-off to the store."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import grpc

from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki.intake import convert
from juki.intake.senders import check_sender
from juki.intake.store import HistoryKey, Item, Outcome, Store, history_key
from juki.mesh.errors import FieldViolation, JukiError, Reason, invalid
from juki.mesh.operator import OperatorVerifier
from juki.mesh.pagination import decode_token, encode_token, page_size
from juki.mesh.settings import ServiceSettings
from juki.mesh.tls import Peer, require_peer, secure_channel

log = logging.getLogger(__name__)

MAX_BATCH = 10_000
PIPELINE = 2
HISTORY_PAGE = 100
MAX_HISTORY_PAGE = 1000


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _history_token(code: str, key: HistoryKey) -> str:
    recorded_at, occurred_on, resident_code, version = key
    micros = (recorded_at - _EPOCH) // dt.timedelta(microseconds=1)
    return encode_token("history", code, [micros, occurred_on.isoformat() if occurred_on else "", resident_code,
                                          version])


def _history_position(token: str, code: str) -> tuple[HistoryKey | None, int]:
    """(keyset position, 0) of a page token, or (None, offset) of a decimal token of earlier versions."""
    if not token:
        return None, 0
    if token.isascii() and token.isdigit() and len(token) < 10:
        return None, int(token)  # an offset token handed out before tokens were keysets
    position = decode_token(token, "history", code)
    try:
        micros, occurred, resident_code, version = position
        if not (type(micros) is int and type(version) is int and isinstance(occurred, str)
                and isinstance(resident_code, str)):
            raise ValueError
        recorded_at = _EPOCH + dt.timedelta(microseconds=micros)
        occurred_on = dt.date.fromisoformat(occurred) if occurred else None
    except (ValueError, OverflowError):
        raise invalid("page_token", "not a page token returned by this method for this request") from None
    return (recorded_at, occurred_on, resident_code, version), 0


def _proto_violation(violation: FieldViolation) -> common_pb2.FieldViolation:
    reason = violation.reason if violation.reason in common_pb2.ErrorReason.keys() else (
        "ERROR_REASON_" + violation.reason
    )
    if reason not in common_pb2.ErrorReason.keys():
        reason = "ERROR_REASON_INVALID_FIELD"
    return common_pb2.FieldViolation(
        field=violation.field, description=violation.description, reason=common_pb2.ErrorReason.Value(reason)
    )


class IntakeServicer(intake_pb2_grpc.IntakeServiceServicer):
    """One intake node: ``tier`` is "prefecture" (with ``prefecture``) or "national"."""

    def __init__(
        self,
        settings: ServiceSettings,
        store: Store,
        verifier: OperatorVerifier,
        *,
        on_accepted: Any = None,
    ) -> None:
        self._settings = settings
        self._tier = settings.tier or "national"
        self._prefecture = settings.prefecture or ""
        self._store = store
        self._verifier = verifier
        self._clock = domain.parse_clock(settings.clock)
        self._on_accepted = on_accepted

    @property
    def national(self) -> bool:
        return self._tier == "national"

    # -- authorisation helpers ----------------------------------------------------------------------

    def _check_sender(self, peer: Peer, codes: set[str]) -> None:
        check_sender(peer, codes, national=self.national, prefecture=self._prefecture)

    def _check_scope(self, peer: Peer, municipality_code: str) -> None:
        if peer.kind == "municipality" and peer.name != municipality_code:
            raise JukiError(Reason.PEER_NOT_AUTHORISED, f"{peer.spiffe_id} may only ask about itself")
        if peer.kind == "prefecture" and municipality_code[:2] != peer.name:
            raise JukiError(Reason.PEER_NOT_AUTHORISED, f"{peer.spiffe_id} may only ask about its municipalities")

    # -- notifications ----------------------------------------------------------------------------

    def _prepare(self, message: intake_pb2.Notification, today: Any) -> Item:
        payload = message.SerializeToString(deterministic=True)
        # The digest is of the same deterministic serialisation as the stored payload (no second pass).
        item = Item(message=message, payload=payload, digest=hashlib.sha256(payload).digest(), notification=None)
        try:
            parsed = convert.to_domain(message)
        except convert.MalformedNotification as exc:
            item.reject(*exc.violations)
            return item
        normal, found = domain.check_notification(parsed, today)
        if found:
            item.reject(*(FieldViolation(convert.proto_field(v.field), v.description, str(v.reason)) for v in found))
            return item
        if not self.national and message.municipality_code[:2] != self._prefecture:
            item.reject(FieldViolation("municipality_code",
                                       f"{message.municipality_code} is not in prefecture {self._prefecture}"))
            return item
        item.notification = normal
        return item

    async def _process(self, messages: Sequence[intake_pb2.Notification]) -> list[Item]:
        if len(messages) > MAX_BATCH:
            raise invalid("notifications", f"at most {MAX_BATCH} notifications per batch")
        peer = require_peer()
        self._check_sender(peer, {m.municipality_code for m in messages})
        today = self._clock.today()  # one business date per batch
        items = [self._prepare(message, today) for message in messages]
        if not self.national and peer.kind == "municipality":
            states = await self._store.is_connected({m.municipality_code for m in messages})
            cut = sorted(code for code, connected in states.items() if not connected)
            if cut:
                raise JukiError(Reason.MUNICIPALITY_DISCONNECTED,
                                f"municipality {', '.join(cut)} is disconnected; keep notifications queued",
                                retry_after_seconds=30)
        try:
            await self._store.apply(items)
        except asyncpg.UniqueViolationError as exc:
            raise JukiError(Reason.DEPENDENCY_UNAVAILABLE, "a concurrent batch carried the same notification; retry",
                            retry_after_seconds=0.1) from exc
        if self._on_accepted is not None and any(i.outcome is Outcome.ACCEPTED for i in items):
            self._on_accepted()
        return items

    @staticmethod
    def _results(items: list[Item], results: Any) -> None:
        """Append one NotificationResult per item to the repeated field ``results`` (built in place)."""
        stamps: dict[Any, Any] = {}
        add = results.add
        rejected = Outcome.REJECTED
        for item in items:
            outcome = item.outcome
            assert outcome is not None
            message = item.message
            result = add(notification_id=message.notification_id, sequence=message.sequence, outcome=outcome.value)
            if item.violations:
                result.violations.extend([_proto_violation(v) for v in item.violations])
            moment = item.acknowledged_at
            if moment is not None and outcome is not rejected:
                stamp = stamps.get(moment)
                if stamp is None:
                    stamp = stamps[moment] = convert.timestamp(moment)
                result.acknowledged_at.CopyFrom(stamp)

    async def SubmitNotifications(
        self, request: intake_pb2.SubmitNotificationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> intake_pb2.SubmitNotificationsResponse:
        response = intake_pb2.SubmitNotificationsResponse()
        self._results(await self._process(request.notifications), response.results)
        return response

    async def StreamNotifications(
        self,
        request_iterator: AsyncIterator[intake_pb2.StreamNotificationsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[intake_pb2.StreamNotificationsResponse]:
        # Up to PIPELINE batches are worked on at once, so one batch's validation (CPU here) overlaps
        # another's transaction (CPU in PostgreSQL); answers still come back in request order. Batches
        # of one municipality serialise on its advisory lock for their tail (see store), each commits whole.
        queue: asyncio.Queue[asyncio.Task[intake_pb2.StreamNotificationsResponse] | None] = asyncio.Queue(PIPELINE)

        async def answer(request: intake_pb2.StreamNotificationsRequest) -> intake_pb2.StreamNotificationsResponse:
            items = await self._process(request.notifications)
            response = intake_pb2.StreamNotificationsResponse(batch_id=request.batch_id)
            self._results(items, response.results)
            return response

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await queue.put(asyncio.create_task(answer(request)))
            finally:
                await queue.put(None)

        reader = asyncio.create_task(read())
        started: list[asyncio.Task[Any]] = [reader]
        try:
            while (task := await queue.get()) is not None:
                started.append(task)
                response = await task
                started.remove(task)
                yield response
            await reader
        finally:
            for pending in started:
                pending.cancel()

    async def GetSequenceState(
        self, request: intake_pb2.GetSequenceStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> intake_pb2.GetSequenceStateResponse:
        code = request.municipality_code
        if not domain.is_valid_local_government_code(code):
            raise invalid("municipality_code", "must be a 6-digit local-government code with its check digit",
                          Reason.CHECK_DIGIT_MISMATCH if len(code) == 6 and code.isdigit() else Reason.INVALID_FIELD)
        self._check_scope(require_peer(), code)
        state = await self._store.sequence_state(code)
        return intake_pb2.GetSequenceStateResponse(
            municipality_code=code,
            last_acknowledged_sequence=state.last_acknowledged,
            highest_received_sequence=state.highest_received,
            missing_ranges=[intake_pb2.SequenceRange(first=a, last=b) for a, b in state.missing],
        )

    # -- connection state and status ---------------------------------------------------------------

    def _status(self, row: Any) -> intake_pb2.MunicipalityIntakeStatus:
        status = intake_pb2.MunicipalityIntakeStatus(
            municipality_code=row["municipality_code"],
            last_sequence=row["contiguous"],
            connected=row["connected"],
            connection_reason=row["connection_reason"],
            outbox_backlog=row["backlog"],
            relay_lag_ms=row["lag_ms"] if not self.national else 0,
        )
        status.connection_since.CopyFrom(convert.timestamp(row["connection_changed"]))
        if row["last_accepted_at"] is not None:
            status.last_accepted_at.CopyFrom(convert.timestamp(row["last_accepted_at"]))
        return status

    async def SetConnectionState(
        self, request: intake_pb2.SetConnectionStateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> intake_pb2.SetConnectionStateResponse:
        peer = require_peer()
        code = request.municipality_code
        if not domain.is_municipality(code):
            raise invalid("municipality_code", "must be a listed municipality (JIS X 0402 code)",
                          Reason.UNKNOWN_MUNICIPALITY)
        if len(request.reason) > 500:
            raise invalid("reason", "at most 500 characters")
        operator = await self._verifier.check(request)
        if operator is not None:
            log.info("operator %s sets %s connected=%s (%s)", operator.operator_id, code, request.connected,
                     request.reason)
        if peer.kind != "operator":
            # A prefecture passes on the change its own operator made (proof verified there).
            self._check_scope(peer, code)
        if not self.national and code[:2] != self._prefecture:
            raise invalid("municipality_code", f"not a municipality of prefecture {self._prefecture}")
        row = await self._store.set_connection(code, request.connected, request.reason)
        if not self.national and self._settings.peers.national_intake:
            await self._forward_connection(code, request.connected, request.reason)
        return intake_pb2.SetConnectionStateResponse(status=self._status(row))

    async def _forward_connection(self, code: str, connected: bool, reason: str) -> None:
        target = self._settings.peers.national_intake
        assert target is not None
        try:
            async with secure_channel(target, self._settings.tls) as channel:
                await intake_pb2_grpc.IntakeServiceStub(channel).SetConnectionState(
                    intake_pb2.SetConnectionStateRequest(municipality_code=code, connected=connected, reason=reason),
                    timeout=10,
                )
        except grpc.aio.AioRpcError as exc:
            raise JukiError(Reason.DEPENDENCY_UNAVAILABLE,
                            f"recorded here, but the national intake did not take the change: {exc.details()}",
                            retry_after_seconds=5) from exc

    async def GetIntakeStatus(
        self, request: intake_pb2.GetIntakeStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> intake_pb2.GetIntakeStatusResponse:
        peer = require_peer()
        codes = list(request.municipality_codes)
        if peer.kind == "municipality":
            codes = [peer.name]
        elif peer.kind == "prefecture":
            for code in codes:
                self._check_scope(peer, code)
        rows = await self._store.statuses(codes)
        if peer.kind == "prefecture" and not codes:
            rows = [r for r in rows if r["municipality_code"][:2] == peer.name]
        backlog, lag = await self._store.outbox_totals()
        return intake_pb2.GetIntakeStatusResponse(
            tier=common_pb2.TIER_NATIONAL if self.national else common_pb2.TIER_PREFECTURE,
            prefecture_code="" if self.national else self._prefecture,
            municipalities=[self._status(r) for r in rows],
            outbox_backlog=backlog,
            relay_lag_ms=lag,
        )

    # -- reads ------------------------------------------------------------------------------------

    @staticmethod
    def _resident_code(code: str, field: str = "resident_code") -> str:
        if not (len(code) == 11 and code.isascii() and code.isdigit()):
            raise invalid(field, "must be 11 digits")
        if not domain.is_valid_resident_code(code):
            raise invalid(field, "fails the check digit", Reason.CHECK_DIGIT_MISMATCH)
        return code

    async def GetResident(
        self, request: intake_pb2.GetResidentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> intake_pb2.GetResidentResponse:
        code = self._resident_code(request.resident_code)
        row, followed = await self._store.resident(code)
        if row is None:
            raise JukiError(Reason.RESIDENT_NOT_FOUND, f"no resident has code {code}")
        return intake_pb2.GetResidentResponse(record=convert.record_from_row(row), followed_codes=followed)

    async def ListResidentHistory(
        self, request: intake_pb2.ListResidentHistoryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> intake_pb2.ListResidentHistoryResponse:
        code = self._resident_code(request.resident_code)
        size = page_size(request.page_size, HISTORY_PAGE, MAX_HISTORY_PAGE)
        after, offset = _history_position(request.page_token, code)
        # One more than the page: whether a next page exists is known without counting the history.
        rows = await self._store.history(code, after=after, offset=offset, limit=size + 1)
        if not rows and not request.page_token:
            raise JukiError(Reason.RESIDENT_NOT_FOUND, f"no resident has code {code}")
        page = rows[:size]
        versions = []
        for row in page:
            version = intake_pb2.ResidentVersion(
                version=row["version"], change_kind=row["change_kind"],
                occurred_on=convert.date_to_proto(row["occurred_on"]),
                notified_on=convert.date_to_proto(row["notified_on"]),
                notification_id=row["notification_id"] or "", municipality_code=row["municipality_code"] or "",
                record=common_pb2.IdentityRecord.FromString(bytes(row["record"])),
            )
            version.recorded_at.CopyFrom(convert.timestamp(row["recorded_at"]))
            versions.append(version)
        following = _history_token(code, history_key(page[-1])) if len(rows) > size else ""
        return intake_pb2.ListResidentHistoryResponse(versions=versions, next_page_token=following)

    async def BulkLoad(
        self, request_iterator: AsyncIterator[intake_pb2.BulkLoadRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> intake_pb2.BulkLoadResponse:
        from juki.intake.bulk import bulk_load

        return await bulk_load(self._store, self._settings, request_iterator, national=self.national)

    async def GetBulkLoad(
        self, request: intake_pb2.GetBulkLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> intake_pb2.GetBulkLoadResponse:
        from juki.intake.bulk import get_bulk_load

        return await get_bulk_load(self._store, self._settings, request, national=self.national)

    # for the bulk module
    @property
    def store(self) -> Store:
        return self._store

    @property
    def settings(self) -> ServiceSettings:
        return self._settings

