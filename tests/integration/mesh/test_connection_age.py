"""Servers end connections at their maximum age: a long-lived client channel connects again (and in
Kubernetes resolves the Service again), so it reaches replicas added after it first connected; calls in
flight are not failed by it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from juki.mesh.tls import secure_channel, server_credentials, server_options

from tests.conftest import tls_for

METHOD = "/test.Peer/Who"


async def test_a_long_lived_channel_connects_again_after_the_maximum_age(ca: Any) -> None:
    async def who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return context.peer().encode()  # e.g. ipv4:127.0.0.1:54321: the client's port names its connection

    server = grpc.aio.server(options=server_options(max_connection_age_seconds=1.0))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Peer", {"Who": grpc.unary_unary_rpc_method_handler(who)}),))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls_for(ca, "service", "lookup")))
    await server.start()
    connections: list[str] = []
    try:
        async with secure_channel(f"127.0.0.1:{port}", tls_for(ca, "agency", "jps"), interceptors=[]) as channel:
            call = channel.unary_unary(METHOD)
            started = time.monotonic()
            while time.monotonic() - started < 4.0:
                peer = (await call(b"", timeout=10)).decode()  # every call succeeds across the GOAWAYs
                if not connections or connections[-1] != peer:
                    connections.append(peer)
                await asyncio.sleep(0.05)
    finally:
        await server.stop(0)
    # With an age of 1 s (±10 % jitter) the channel was on at least three connections in 4 s; without a
    # maximum age it would have kept its first one.
    assert len(set(connections)) >= 3, connections
