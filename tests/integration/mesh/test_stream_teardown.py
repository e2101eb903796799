"""A stream the client abandons still ends its span and records its metrics, over real mTLS.

grpc iterates a streaming handler's generator from the call's task. When the client goes away while
grpc, not the generator, is running (sending the last message), the call's task ends and leaves the
generator suspended at its ``yield``; the event loop then closes it later, in a task and Context of its
own. Whatever the mesh interceptor does when the generator finishes must work from there too.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import grpc
import pytest
from juki.mesh.metrics import RpcMetrics
from juki.mesh.server import ServiceBinding, start_server

from tests.conftest import channel_as, make_settings

SERVICE = "juki.test.v1.FollowService"
METHOD = f"/{SERVICE}/Follow"

pytestmark = [pytest.mark.timeout(60)]


class RecordedMetrics(RpcMetrics):
    """The interceptor's metrics, with every recording kept for the test to read."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded: list[tuple[str, str]] = []

    def record(self, method: str, code: str, millis: float) -> None:
        super().record(method, code, millis)
        self.recorded.append((method, code))


def _identity(message: bytes) -> bytes:
    return message


class Follow:
    """A server stream whose first message is answered, and whose second is sent after the client left."""

    def __init__(self) -> None:
        self.client_gone = asyncio.Event()

    async def follow(self, request: bytes, context: Any) -> Any:
        yield b"first"
        try:
            await asyncio.Event().wait()  # nothing more to say until the client goes away
        except asyncio.CancelledError:
            # Model grpc's side of the race deterministically: the cancellation is consumed here and the
            # generator goes back to a yield, so that grpc, not the generator, meets the end of the call.
            self.client_gone.set()
        yield b"too late"


async def test_an_abandoned_stream_still_records_its_metrics(ca: Any, database: Any, data_dir: Path) -> None:
    follow = Follow()

    def add(servicer: Any, server: grpc.aio.Server) -> None:
        handler = grpc.unary_stream_rpc_method_handler(
            follow.follow, request_deserializer=_identity, response_serializer=_identity)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Follow": handler}),))

    settings = make_settings(ca, database, data_dir, "lookup", "lookup", ("service", "lookup"))
    running = await start_server(settings, [ServiceBinding(SERVICE, add, None, {"Follow": frozenset({"*"})})])
    assert running.interceptor is not None
    metrics = running.interceptor.metrics = RecordedMetrics()
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        async with channel_as(ca, "agency", "jps", running.address) as channel:
            call = channel.unary_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)(b"")
            assert await call.read() == b"first"
            call.cancel()
            await follow.client_gone.wait()
        # The call is over; the loop closes the abandoned generator in a task of its own.
        while not metrics.recorded:
            gc.collect()
            await asyncio.sleep(0.01)
            if errors:
                break
    finally:
        loop.set_exception_handler(previous)
        await running.stop(0.1)
    assert errors == []
    assert metrics.recorded == [(METHOD, "CANCELLED")]
