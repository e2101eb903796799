"""The group-commit client of the access log, against a small in-test AccessLogService over real mTLS.

Only this client is tested against a stand-in; the lookup service itself is tested against the real
access-log service (tests/integration/lookup).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki.lookup.provisions import ProvisionLog
from juki.mesh.errors import JukiError, Reason
from juki.mesh.server import ServiceBinding, start_server
from juki.mesh.settings import DatabaseSettings, Peers, Secret, ServiceSettings

from tests.conftest import channel_as, tls_for

pytestmark = pytest.mark.timeout(60)


class StandInLog(accesslog_pb2_grpc.AccessLogServiceServicer):
    """Acknowledges each AppendStream batch after ``delay``; remembers the batches it saw."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.batches: list[list[str]] = []
        self.fail_next = False
        self.hold = asyncio.Event()
        self.hold.set()

    async def AppendStream(
        self, request_iterator: AsyncIterator[accesslog_pb2.AppendStreamRequest], context: Any
    ) -> AsyncIterator[accesslog_pb2.AppendStreamResponse]:
        async for request in request_iterator:
            await self.hold.wait()
            if self.fail_next:
                self.fail_next = False
                await context.abort(grpc.StatusCode.UNAVAILABLE, "disk gone")
            await asyncio.sleep(self.delay)
            self.batches.append([r.resident_code for r in request.records])
            yield accesslog_pb2.AppendStreamResponse(
                batch_id=request.batch_id, first_sequence=1, count=len(request.records)
            )


async def _serve(ca: Any, data_dir: Any, servicer: StandInLog) -> Any:
    settings = ServiceSettings(
        service="accesslog", instance="accesslog", listen="127.0.0.1:0",
        tls=tls_for(ca, "service", "accesslog"),
        database=DatabaseSettings(url=Secret("postgresql://unused/x"), schema="accesslog"),
        data_dir=data_dir, peers=Peers(),
    )
    binding = ServiceBinding(
        "juki.accesslog.v1.AccessLogService", accesslog_pb2_grpc.add_AccessLogServiceServicer_to_server,
        servicer, {"AppendStream": frozenset({"service"})},
    )
    return await start_server(settings, [binding])


def _record(code: str) -> bytes:
    return accesslog_pb2.ProvisionRecord(
        resident_code=code, recipient="spiffe://juki.local/agency/jps"
    ).SerializeToString()


async def test_concurrent_requests_share_batches_and_each_waits_for_its_ack(ca: Any, data_dir: Any) -> None:
    stand_in = StandInLog(delay=0.02)
    server = await _serve(ca, data_dir, stand_in)
    channel = channel_as(ca, "service", "lookup", server.address)
    log = ProvisionLog(channel, max_in_flight=1)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(log.record([_record(f"{i:011d}")]) for i in range(200))), 30
        )
        logged = [code for batch in stand_in.batches for code in batch]
        assert sorted(logged) == [f"{i:011d}" for i in range(200)]
        # Group commit: far fewer batches than requests.
        assert len(stand_in.batches) < 50
        assert log.stats.records == 200
    finally:
        await log.close()
        await channel.close()
        await server.stop(0)


async def test_a_request_does_not_return_before_its_batch_is_acknowledged(ca: Any, data_dir: Any) -> None:
    stand_in = StandInLog(delay=0)
    stand_in.hold.clear()
    server = await _serve(ca, data_dir, stand_in)
    channel = channel_as(ca, "service", "lookup", server.address)
    log = ProvisionLog(channel)
    try:
        pending = asyncio.ensure_future(log.record([_record("24727059608")]))
        await asyncio.sleep(0.3)
        assert not pending.done()
        stand_in.hold.set()
        await asyncio.wait_for(pending, 10)
        assert stand_in.batches == [["24727059608"]]
    finally:
        await log.close()
        await channel.close()
        await server.stop(0)


async def test_a_broken_stream_fails_waiters_with_access_log_unavailable_then_recovers(
    ca: Any, data_dir: Any
) -> None:
    stand_in = StandInLog(delay=0)
    stand_in.fail_next = True
    server = await _serve(ca, data_dir, stand_in)
    channel = channel_as(ca, "service", "lookup", server.address)
    log = ProvisionLog(channel)
    try:
        with pytest.raises(JukiError) as refused:
            await asyncio.wait_for(log.record([_record("24727059608")]), 10)
        assert refused.value.reason is Reason.ACCESS_LOG_UNAVAILABLE
        await asyncio.wait_for(log.record([_record("24846016224")]), 10)
        assert stand_in.batches == [["24846016224"]]
    finally:
        await log.close()
        await channel.close()
        await server.stop(0)


async def test_an_unreachable_access_log_answers_unavailable_within_the_timeout(ca: Any) -> None:
    channel = channel_as(ca, "service", "lookup", "127.0.0.1:1")
    log = ProvisionLog(channel, ack_timeout=2.0)
    try:
        with pytest.raises(JukiError) as refused:
            await asyncio.wait_for(log.record([_record("24727059608")]), 10)
        assert refused.value.reason is Reason.ACCESS_LOG_UNAVAILABLE
    finally:
        await log.close()
        await channel.close()
