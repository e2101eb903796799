"""Prefecture -> national relay: streams the outbox upward and deletes rows once acknowledged.

At-least-once: a row leaves the outbox only after the national intake acknowledged it (accepted,
duplicate, or — logged — rejected); the national apply is idempotent by notification id, so a row
sent twice after a crash is applied once. Several batches are in flight on one stream (pipelining);
the national tier answers them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random

import asyncpg
import grpc

from juki._gen.juki.intake.v1 import intake_pb2
from juki.intake.store import Store
from juki.mesh import metrics, wire
from juki.mesh.db import is_connection_loss
from juki.mesh.leader import LeaderLease
from juki.mesh.outage import Outage
from juki.mesh.settings import TlsFiles
from juki.mesh.tls import secure_channel

log = logging.getLogger(__name__)

BATCH_SIZE = 2000
IN_FLIGHT = 4
STREAM_METHOD = "/juki.intake.v1.IntakeService/StreamNotifications"
# Relay lag boundaries (ms): the SDK's default stop at 10 s, but a relay that falls minutes behind (an
# outage of the national node, a large catch-up) is exactly what the on-call alert must see, so they run to
# 10 minutes; 1 s and 5 s are boundaries so the alert thresholds (k8s/alerts) are read off exactly.
RELAY_LAG_BUCKETS_MS: tuple[float, ...] = (
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000,
)


_REQUEST = wire.tags(intake_pb2.StreamNotificationsRequest)


def encode_request(batch_id: int, payloads: list[bytes]) -> bytes:
    """The wire form of ``StreamNotificationsRequest(batch_id, notifications)`` from serialised notifications.

    The stored payload bytes are relayed as they are, not parsed and serialised again.
    """
    return wire.number(_REQUEST["batch_id"], batch_id) + wire.repeated_messages(_REQUEST["notifications"], payloads)


class Relay:
    """Background task of a prefecture intake."""

    def __init__(self, store: Store, target: str, tls: TlsFiles, lease: LeaderLease, *, prefecture: str = "") -> None:
        self._store = store
        # Every relay instrument carries the prefecture, so lag is told apart per prefecture however the
        # scraper labels its targets.
        self._attributes = {"prefecture": prefecture}
        self._target = target
        self._tls = tls
        # Replicas of one prefecture share its outbox: only the lease holder relays (mesh/leader.py).
        self._lease = lease
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._outage = Outage(f"the relay to the national intake {target}", log)
        meter = metrics.meter("juki.intake")
        self._lag = meter.create_histogram(
            "juki.intake.relay.lag", unit="ms",
            description="time from outbox enqueue to acknowledgement by the national intake, per notification",
            explicit_bucket_boundaries_advisory=RELAY_LAG_BUCKETS_MS,
        )
        self._relayed = meter.create_counter("juki.intake.relay.notifications",
                                             description="notifications acknowledged upstream")
        self._batch = meter.create_histogram("juki.intake.relay.batch_size", description="notifications per batch")

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="intake-relay")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, timeout=5)
        await self._lease.release()

    async def _run(self) -> None:
        delay = 0.2
        while not self._stopping:
            try:
                lease = await self._lease.acquire()
                # No client interceptors: with one, grpc.aio feeds a READER_WRITER stream through a proxy
                # async generator and a consumer task, which a cancelled stream leaves pending at shutdown
                # ("Task was destroyed but it is pending", "aclose(): asynchronous generator is already
                # running"). A relay stream lives for minutes; a client span over it would say nothing.
                async with secure_channel(self._target, self._tls, interceptors=[]) as channel:
                    await self._pump(channel, lease)
                delay = 0.2
            except (grpc.aio.AioRpcError, asyncpg.PostgresError, OSError, ConnectionError) as exc:
                # An outage of the national intake or of the database: logged when it starts and ends.
                if is_connection_loss(exc) and not isinstance(exc, grpc.aio.AioRpcError):
                    await self._lease.lost()  # the lease's session may be the one that broke
                self._outage.failed(exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 2.0)
            except Exception as exc:
                # The relay must outlive any fault: the outbox keeps everything until it is acknowledged.
                if is_connection_loss(exc):
                    await self._lease.lost()
                    self._outage.failed(exc)
                else:
                    log.exception("relay to %s failed; retrying in %.1f s", self._target, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 2.0)

    async def _pump(self, channel: grpc.aio.Channel, lease: asyncpg.Connection) -> None:
        """Stream outbox batches, up to IN_FLIGHT unanswered; unanswered ones are resent on reconnect."""
        # Requests are written as bytes: the stored payloads are already serialised Notifications.
        call = channel.stream_stream(
            STREAM_METHOD, request_serializer=None,
            response_deserializer=intake_pb2.StreamNotificationsResponse.FromString,
        )()
        pending: dict[int, list[tuple[int, dt.datetime]]] = {}
        after = 0
        batch_id = 0
        try:
            while not self._stopping:
                while len(pending) < IN_FLIGHT:
                    self._wake.clear()
                    rows = await self._store.outbox_batch(BATCH_SIZE, after, conn=lease)
                    if not rows:
                        break
                    after = rows[-1]["outbox_id"]
                    batch_id += 1
                    pending[batch_id] = [(r["outbox_id"], r["enqueued_at"]) for r in rows]
                    await call.write(encode_request(batch_id, [bytes(r["payload"]) for r in rows]))
                if not pending:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=0.5)
                    continue
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise ConnectionError("the national intake closed the relay stream")
                self._outage.succeeded()
                sent = pending.pop(response.batch_id, [])
                now = dt.datetime.now(dt.UTC)
                for result in response.results:
                    if result.outcome == intake_pb2.NOTIFICATION_OUTCOME_REJECTED:
                        log.error("national intake rejected relayed notification %s: %s", result.notification_id,
                                  "; ".join(f"{v.field}: {v.description}" for v in result.violations))
                lags = [(now - enqueued).total_seconds() * 1000 for _, enqueued in sent]
                for lag in lags:
                    self._lag.record(lag, self._attributes)
                self._relayed.add(len(lags), self._attributes)
                self._batch.record(len(lags), self._attributes)
                await self._store.outbox_acknowledged([outbox_id for outbox_id, _ in sent], lags)
        finally:
            call.cancel()
