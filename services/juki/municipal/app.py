"""The municipal CS (市町村CS) of one municipality: entry point and thin servicer.

``create(settings)`` for ``settings.municipality`` (e.g. 131148 中野区). The register and the outbox live
in :mod:`juki.municipal.registry`; the sender in :mod:`juki.municipal.sender`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import grpc

from juki import domain
from juki._gen.juki.card.v1 import card_pb2, card_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.mesh.db import create_pool
from juki.mesh.errors import JukiError, Reason, SettingsError, invalid
from juki.mesh.leader import LeaderLease
from juki.mesh.methods import Method, OperatorProof, require_method
from juki.mesh.operator import OperatorVerifier, load_passwords
from juki.mesh.server import ServiceBinding
from juki.mesh.settings import ServiceSettings, spiffe_id
from juki.mesh.tls import Peer, require_peer, secure_channel
from juki.municipal import convert
from juki.municipal.registry import Registry
from juki.municipal.sender import OutboxSender

log = logging.getLogger(__name__)

SERVICE_NAME = "juki.municipal.v1.MunicipalService"
CARD_SERVICE = spiffe_id("service", "card")
DISCLOSURE_SERVICE = spiffe_id("service", "disclosure")
RESYNC_DEADLINE_SECONDS = 24 * 3600  # a national-size register takes hours; a dead peer ends the call at once
# A resync's stream interrupted by these is continued within the call (the same load, after its resume point).
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})
RESYNC_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # between attempts that got no further
RESYNC_WINDOW = 8  # batches of a resync sent and not yet applied at both tiers (see window() in _send_load)
RESYNC_WINDOW_POLL_SECONDS = 0.05
# Changes after which the resident's 住基カード are revoked (the card service is told at once).
_CARD_REVOKING = {
    common_pb2.CHANGE_KIND_DEATH: "死亡",
    common_pb2.CHANGE_KIND_RESIDENT_CODE_CHANGE: "住民票コード変更",
}


class MunicipalServicer(municipal_pb2_grpc.MunicipalServiceServicer):
    """Proto <-> registry; authorisation of each caller beyond the binding's peer kinds."""

    def __init__(self, app: MunicipalApp) -> None:
        self.app = app

    async def _operator(self, request: Any, resident_code: str = "") -> None:
        """The method table's proof rule (an operator peer must prove who acts); a verified one is logged."""
        verified = await self.app.operators.check(request)
        if verified is not None:
            # Only a well-formed code is logged: the request is not validated yet (it may carry a NUL byte).
            logged_code = resident_code if domain.is_valid_resident_code(resident_code) else ""
            await self.app.registry.log_operator(verified.operator_id, require_peer().spiffe_id,
                                                 require_method().log_name, logged_code)

    async def RecordChange(
        self, request: municipal_pb2.RecordChangeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> municipal_pb2.RecordChangeResponse:
        await self._operator(request, request.entry.resident_code)
        recorded = await self.app.registry.record_change(request, self.app.clock.today())
        self.app.sender.wake()
        if request.change_kind in _CARD_REVOKING:
            # Also on a replay: the first attempt may have died between its commit and the revocation
            # (revoking revoked cards changes nothing).
            await self.app.revoke_cards(request.entry.resident_code, _CARD_REVOKING[request.change_kind])
        queued = not self.app.sender.connected or not recorded.connected
        return municipal_pb2.RecordChangeResponse(
            notification_id=recorded.notification_id, sequence=recorded.sequence, queued=queued,
            resident_code=recorded.resident_code, replayed=recorded.replayed,
        )

    async def GetResidentEntry(
        self, request: municipal_pb2.GetResidentEntryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> municipal_pb2.GetResidentEntryResponse:
        peer = require_peer()
        if peer.kind == "municipality" and request.requesting_municipality_code != peer.name:
            raise invalid("requesting_municipality_code",
                          f"must be the caller's own municipality ({peer.name})", Reason.PEER_NOT_AUTHORISED)
        if not domain.is_valid_resident_code(request.resident_code):
            raise invalid("resident_code", "must be 11 digits with a valid check digit",
                          Reason.CHECK_DIGIT_MISMATCH if len(request.resident_code) == 11 else Reason.INVALID_FIELD)
        entry = await self.app.registry.get(request.resident_code)
        if entry is None:
            raise JukiError(Reason.RESIDENT_NOT_FOUND, f"no resident {request.resident_code} in "
                            f"{self.app.municipality_code}")
        log.info("entry of %s… provided to %s for %s", request.resident_code[:3], peer.spiffe_id,
                 request.purpose or "unspecified purpose")
        return municipal_pb2.GetResidentEntryResponse(entry=entry)

    async def ListHousehold(
        self, request: municipal_pb2.ListHouseholdRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> municipal_pb2.ListHouseholdResponse:
        if not request.household_id:
            raise invalid("household_id", "household_id is required")
        if len(request.household_id) > 128 or not request.household_id.isprintable():
            raise invalid("household_id", "at most 128 printable characters")
        members = await self.app.registry.household(request.household_id)
        if not members:
            raise JukiError(Reason.RESIDENT_NOT_FOUND, f"no current household {request.household_id}")
        head = members[0].resident_code if members[0].relationship == "世帯主" else ""
        return municipal_pb2.ListHouseholdResponse(
            household_id=request.household_id, head_resident_code=head, members=members
        )

    async def GetOutboxStatus(
        self, request: municipal_pb2.GetOutboxStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> municipal_pb2.GetOutboxStatusResponse:
        status = await self.app.registry.status()
        response = municipal_pb2.GetOutboxStatusResponse(
            municipality_code=self.app.municipality_code,
            last_sequence=status.last_sequence,
            last_acknowledged_sequence=status.last_acknowledged_sequence,
            pending=status.pending,
            connected=status.connected and self.app.sender.connected,
        )
        if status.oldest_pending_at is not None:
            response.oldest_pending_at.FromDatetime(status.oldest_pending_at)
        return response

    async def ResyncToPrefecture(
        self, request: municipal_pb2.ResyncToPrefectureRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> municipal_pb2.ResyncToPrefectureResponse:
        await self._operator(request)
        return await self.app.resync()


class MunicipalApp:
    """One municipality's CS: pool, registry, outbox sender, operator proofs."""

    def __init__(self, settings: ServiceSettings) -> None:
        if not settings.municipality:
            raise SettingsError("the municipal CS needs --municipality")
        self.settings = settings
        self.municipality_code = settings.municipality
        try:
            self.clock = domain.parse_clock(settings.clock)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        self.pool: asyncpg.Pool | None = None
        self._registry: Registry | None = None
        self._sender: OutboxSender | None = None
        self._operators: OperatorVerifier | None = None

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "not started"
        return self._registry

    @property
    def sender(self) -> OutboxSender:
        assert self._sender is not None, "not started"
        return self._sender

    @property
    def operators(self) -> OperatorVerifier:
        assert self._operators is not None, "not started"
        return self._operators

    async def start(self) -> Sequence[ServiceBinding]:
        self.pool = await create_pool(self.settings.database, self.settings.instance)
        self._registry = Registry(self.pool, self.municipality_code)
        self._operators = OperatorVerifier(
            self.settings.tls, self.pool,
            passwords=load_passwords(self.settings.operator_passwords_file),
        )
        self._sender = OutboxSender(self._registry, self.settings.peers.prefecture_intake, self.settings.tls,
                                    LeaderLease(self.settings.database, f"{self.settings.instance}:outbox"))
        self._sender.start()
        everyone_in_government = frozenset({"operator", "municipality", "prefecture", "service"})
        return [
            ServiceBinding(
                name=SERVICE_NAME,
                add_to_server=municipal_pb2_grpc.add_MunicipalServiceServicer_to_server,
                servicer=MunicipalServicer(self),
                access={
                    "RecordChange": Method(frozenset({"operator", CARD_SERVICE}), OperatorProof.FROM_OPERATORS),
                    "GetResidentEntry": frozenset({"municipality", "operator", CARD_SERVICE, DISCLOSURE_SERVICE}),
                    "ListHousehold": frozenset({"municipality", "operator", CARD_SERVICE, DISCLOSURE_SERVICE}),
                    "GetOutboxStatus": everyone_in_government,
                    "ResyncToPrefecture": Method(frozenset({"operator"}), OperatorProof.FROM_OPERATORS),
                },
            )
        ]

    async def stop(self) -> None:
        if self._sender is not None:
            await self._sender.stop()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def on_refusal(self, peer: Peer | None, method: str, error: JukiError) -> None:
        log.warning("refused %s to %s: %s", method, peer.spiffe_id if peer else "unknown peer", error.reason.name)

    async def revoke_cards(self, resident_code: str, reason: str) -> None:
        """Tell the card service to revoke the resident's cards; a failure is logged, not raised (the
        change is committed, and the card service re-checks the register when a card is used)."""
        address = self.settings.peers.card
        if not address:
            return
        try:
            async with secure_channel(address, self.settings.tls) as channel:
                response = await card_pb2_grpc.CardServiceStub(channel).RevokeCard(
                    card_pb2.RevokeCardRequest(resident_code=resident_code, reason=reason), timeout=10)
            if response.revoked:
                log.info("revoked %d card(s) after %s", response.revoked, reason)
        except grpc.aio.AioRpcError as error:
            log.warning("could not revoke the cards after %s: %s", reason, error.code().name)

    async def resync(self) -> municipal_pb2.ResyncToPrefectureResponse:
        """Send the whole register to the prefecture (IntakeService.BulkLoad) as one ordered load.

        The load's id and snapshot sequence are kept in this CS's database until the prefecture has the
        whole load, so a resync interrupted by the death of any process on the way (this CS, the
        prefecture intake, the national intake) continues with the same load id after the point
        GetBulkLoad names: records already applied at both tiers are not sent again. Within one call an
        interrupted stream (a restarted intake, a connection closed at its maximum age) is continued at
        once, for as long as each attempt gets further; a repeated call continues after this CS's own
        death. Memory holds a batch or two, whatever the register's size (a server-side cursor).
        """
        address = self.settings.peers.prefecture_intake
        if not address:
            raise JukiError(Reason.DEPENDENCY_UNAVAILABLE, "no prefecture intake is configured")
        resumptions = 0
        sent = 0
        stalled = 0
        reached: str | None = None  # the resume point of the last attempt that got one
        async with self.sender.lock, secure_channel(address, self.settings.tls) as channel:
            stub = intake_pb2_grpc.IntakeServiceStub(channel)
            while True:
                load_id, through = await self.registry.resync_in_progress()
                try:
                    response = await self._send_load(stub, load_id, through)
                except _Sent as partial:
                    sent += partial.records
                    error, point = partial.error, partial.after
                    resumptions += bool(load_id) and point is not None
                else:
                    response.records_sent += sent
                    response.resumptions = resumptions + bool(load_id)
                    return response
                if error.code() not in _RESUMABLE:
                    raise error
                # Interrupted: continue while the load gets further; give up after a few attempts that do not.
                advanced = point is not None and (reached is None or point > reached)
                reached = point if advanced else reached
                stalled = 0 if advanced else stalled + 1
                if stalled > len(RESYNC_BACKOFF_SECONDS):
                    raise error
                delay = RESYNC_BACKOFF_SECONDS[stalled - 1] if stalled else 0.0
                log.warning("resync interrupted (%s: %s); continuing in %.1f s", error.code().name,
                            error.details(), delay)
                await asyncio.sleep(delay)

    async def _send_load(self, stub: intake_pb2_grpc.IntakeServiceStub, load_id: str, through: int
                         ) -> municipal_pb2.ResyncToPrefectureResponse:
        """One attempt: from the start (no load in progress) or after GetBulkLoad's point. Raises
        :class:`_Sent` (the records this attempt sent, where it started, why it ended) when it fails."""
        batch = self.settings.municipal.resync_batch
        sent = 0
        after: str | None = None
        try:
            if not load_id:
                after = ""
            else:
                state = await stub.GetBulkLoad(intake_pb2.GetBulkLoadRequest(
                    load_id=load_id, municipality_code=self.municipality_code), timeout=30)
                if state.state == intake_pb2.BULK_LOAD_STATE_FINISHED:
                    await self.registry.finish_resync(load_id, through)
                    self.sender.wake()
                    return municipal_pb2.ResyncToPrefectureResponse(
                        load_id=load_id, through_sequence=through, records_sent=0,
                        records_applied=state.records_applied + state.records_unchanged,
                        records_rejected=state.records_rejected)
                after = state.last_resident_code
                log.info("continuing resync %s after %s… (%d records at the prefecture)", load_id, after[:3],
                         state.records_received)

            unconfirmed: collections.deque[str] = collections.deque()  # last code of each batch in flight

            async def window() -> None:
                """Wait until fewer than RESYNC_WINDOW batches are sent and not yet applied at both tiers:
                what a broken stream loses (and its resumption sends again) stays a few batches, whatever
                the transport buffers between the tiers would hold."""
                while len(unconfirmed) >= RESYNC_WINDOW:
                    try:
                        state = await stub.GetBulkLoad(intake_pb2.GetBulkLoadRequest(
                            load_id=load_id, municipality_code=self.municipality_code), timeout=30)
                    except grpc.aio.AioRpcError:
                        pass  # a tier is down: the stream fails too, and that ends the attempt
                    else:
                        while unconfirmed and unconfirmed[0] <= state.last_resident_code:
                            unconfirmed.popleft()
                    if len(unconfirmed) >= RESYNC_WINDOW:
                        await asyncio.sleep(RESYNC_WINDOW_POLL_SECONDS)

            failure: BaseException | None = None

            async def batches() -> AsyncIterator[intake_pb2.BulkLoadRequest]:
                nonlocal failure
                try:
                    async for request in _batches():
                        yield request
                except Exception as exc:
                    failure = exc  # gRPC only cancels the call: the error is raised below
                    raise

            async def _batches() -> AsyncIterator[intake_pb2.BulkLoadRequest]:
                nonlocal sent, load_id, through
                ready: intake_pb2.BulkLoadRequest | None = None
                async for snapshot_sequence, entries in self.registry.snapshot(batch, after or ""):
                    if not load_id:
                        # A new load: remembered (with the sequence its snapshot reflects) before its first
                        # batch leaves. A resumed one keeps its first snapshot's sequence, so every
                        # notification after it is still sent (a newer snapshot of the rest loses nothing).
                        load_id, through = str(uuid.uuid4()), snapshot_sequence
                        await self.registry.begin_resync(load_id, through)
                    if ready is not None:
                        await window()
                        if ready.records:
                            unconfirmed.append(ready.records[-1].resident_code)
                        sent += len(ready.records)
                        yield ready  # a batch leaves once the next is read: all but the last announce more
                    ready = intake_pb2.BulkLoadRequest(
                        load_id=load_id, municipality_code=self.municipality_code, through_sequence=through,
                        records=[convert.identity_record(e) for e in entries], more_batches=True,
                    )
                if ready is not None:
                    ready.more_batches = False
                    sent += len(ready.records)
                    yield ready

            try:
                summary = await stub.BulkLoad(batches(), timeout=RESYNC_DEADLINE_SECONDS)
            except asyncio.CancelledError:
                if failure is None:
                    raise
                raise failure from None  # reading the register failed: the load stays in progress
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED) and load_id:
                await self.registry.abandon_resync(load_id)  # refused, not interrupted: start afresh
            raise _Sent(sent, after, error) from error
        await self.registry.finish_resync(load_id, through)
        self.sender.wake()
        return municipal_pb2.ResyncToPrefectureResponse(
            load_id=load_id, through_sequence=through, records_sent=sent,
            records_applied=summary.records_applied + summary.records_unchanged,
            records_rejected=summary.records_rejected,
        )


class _Sent(Exception):
    """An attempt of a resync that failed: the records it sent, where it started, the error that ended it."""

    def __init__(self, records: int, after: str | None, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.records = records
        self.after = after  # the resume point it started from (None: it got none)
        self.error = error


def create(settings: ServiceSettings) -> MunicipalApp:
    """Entry point used by ``juki serve municipal``."""
    return MunicipalApp(settings)
