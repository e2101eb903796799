"""The outbox sender: streams queued notifications to the prefecture intake, in sequence order.

At-least-once: a row is marked acknowledged only after the prefecture answered ACCEPTED or DUPLICATE
for it (the prefecture acknowledges only what is durable there). On start and after every failure it
asks the prefecture where its sequence stands (GetSequenceState) and skips what the prefecture already
holds. While the prefecture says the municipality is disconnected, or cannot be reached, rows stay
queued and the connection is recorded as down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
import grpc

from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki.mesh.db import is_connection_loss
from juki.mesh.errors import from_grpc_error
from juki.mesh.leader import LeaderLease
from juki.mesh.outage import Outage
from juki.mesh.settings import TlsFiles
from juki.mesh.tasks import cancel_and_wait
from juki.mesh.tls import secure_channel
from juki.municipal.registry import Registry

log = logging.getLogger(__name__)

BATCH = 500
RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0)


class OutboxSender:
    """Background task of the municipal CS; wake it with :meth:`wake` after a new row is queued."""

    def __init__(self, registry: Registry, prefecture_address: str | None, tls: TlsFiles,
                 lease: LeaderLease | None = None) -> None:
        self._registry = registry
        self._address = prefecture_address
        self._tls = tls
        # Replicas of one CS share its outbox: only the lease holder sends (mesh/leader.py); None: alone.
        self._lease = lease
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._synced = False
        self.connected = True
        # Held while a batch is in flight; a resync holds it too, so the prefecture never applies the same
        # change through both paths at once.
        self.lock = asyncio.Lock()
        self._prefecture = Outage(f"prefecture intake {self._address}", log)
        self._database = Outage("the municipal database", log)

    def start(self) -> None:
        if self._address and self._task is None:
            self._channel = secure_channel(self._address, self._tls)
            self._task = asyncio.create_task(self._run(), name="municipal-outbox-sender")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._lease is not None:
            await self._lease.release()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def wake(self) -> None:
        self._wake.set()

    async def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            log.warning("prefecture link %s", "restored" if connected else "down: notifications stay queued")
        self.connected = connected
        await self._registry.set_connected(connected)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                conn = await self._lease.acquire() if self._lease is not None else None
                sent = await self.send_once(conn)
                failures = 0
                if not sent:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                self._prefecture.succeeded()
                self._database.succeeded()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                remote = from_grpc_error(error)
                self._prefecture.failed(f"{remote.code.name} {remote.reason_name or remote.code.name}")
                self._synced = False
                await self._safe_set_connected(False)
                await asyncio.sleep(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
                failures += 1
            except Exception as error:
                if is_connection_loss(error):
                    if self._lease is not None:
                        await self._lease.lost()  # the lease's session may be the one that broke
                    self._database.failed(error)  # logged once per outage, not per attempt
                else:
                    log.exception("outbox sender fault")
                self._synced = False
                await asyncio.sleep(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
                failures += 1

    async def _safe_set_connected(self, connected: bool) -> None:
        with contextlib.suppress(Exception):
            await self._set_connected(connected)

    async def send_once(self, conn: asyncpg.Connection | None = None) -> int:
        """Send one batch of pending notifications; return how many were acknowledged.

        ``conn``: the lease's connection, on which the pending rows are read (see mesh/leader.py).
        """
        async with self.lock:
            return await self._send_batch(conn)

    async def _send_batch(self, conn: asyncpg.Connection | None = None) -> int:
        assert self._channel is not None
        stub = intake_pb2_grpc.IntakeServiceStub(self._channel)
        if not self._synced:
            state = await stub.GetSequenceState(
                intake_pb2.GetSequenceStateRequest(municipality_code=self._registry.municipality_code), timeout=10
            )
            skipped = await self._registry.acknowledge_through(state.last_acknowledged_sequence)
            if skipped:
                log.info("prefecture already holds %d queued notifications; skipped", skipped)
            self._synced = True
        batch = await self._registry.pending(BATCH, conn)
        if not batch:
            return 0
        response = await stub.SubmitNotifications(
            intake_pb2.SubmitNotificationsRequest(notifications=[p.notification for p in batch]), timeout=30
        )
        acknowledged: list[int] = []
        rejected: dict[int, str] = {}
        gap = disconnected = False
        for item, result in zip(batch, response.results, strict=False):
            if result.outcome in (intake_pb2.NOTIFICATION_OUTCOME_ACCEPTED, intake_pb2.NOTIFICATION_OUTCOME_DUPLICATE):
                acknowledged.append(item.sequence)
            elif result.outcome == intake_pb2.NOTIFICATION_OUTCOME_REJECTED:
                reasons = "; ".join(f"{v.field}: {v.description}" for v in result.violations)
                codes = {v.reason for v in result.violations}
                if common_pb2.ERROR_REASON_MUNICIPALITY_DISCONNECTED in codes:
                    disconnected = True
                    break
                if common_pb2.ERROR_REASON_SEQUENCE_GAP in codes:  # the prefecture lacks earlier ones
                    gap = True
                    break
                log.error("prefecture refused notification %d: %s", item.sequence, reasons)
                acknowledged.append(item.sequence)
                rejected[item.sequence] = reasons or "rejected"
        await self._registry.acknowledge(acknowledged, rejected)
        await self._set_connected(not disconnected)
        if disconnected:
            await asyncio.sleep(RETRY_SECONDS[-1])
        if gap:
            self._synced = False
        return len(acknowledged)
