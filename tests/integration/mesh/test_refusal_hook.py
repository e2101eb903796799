"""A refusal hook that fails (e.g. the access log is down) is logged, and the caller still gets its refusal."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from juki.mesh.errors import JukiError, Reason, from_grpc_error
from juki.mesh.server import ServiceBinding, start_server
from juki.mesh.tls import Peer

from tests.conftest import channel_as, make_settings

SERVICE = "juki.test.v1.GuardedService"


def _raw(message: bytes) -> bytes:
    return message


def _add(servicer: Any, server: grpc.aio.Server) -> None:
    async def secret(request: bytes, context: Any) -> bytes:
        return b"secret"

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Secret": grpc.unary_unary_rpc_method_handler(secret, request_deserializer=_raw, response_serializer=_raw),
    }),))


async def test_a_failing_refusal_hook_is_logged_and_the_refusal_stands(
        ca: Any, database: Any, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[str, str, Reason]] = []

    async def hook(peer: Peer | None, method: str, error: JukiError) -> None:
        calls.append((peer.spiffe_id if peer else "", method, error.reason))
        raise RuntimeError("the access log is down")

    settings = make_settings(ca, database, data_dir, "lookup", "lookup", ("service", "lookup"))
    server = await start_server(settings, [ServiceBinding(SERVICE, _add, None, {"Secret": frozenset({"operator"})})],
                                on_refusal=hook)
    try:
        with caplog.at_level(logging.WARNING, logger="juki.mesh.server"):
            async with channel_as(ca, "agency", "jps", server.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary(f"/{SERVICE}/Secret", request_serializer=_raw,
                                              response_deserializer=_raw)(b"", timeout=10)
    finally:
        await server.stop(0.1)
    assert from_grpc_error(refused.value).reason is Reason.PEER_NOT_AUTHORISED
    assert calls == [("spiffe://juki.local/agency/jps", f"/{SERVICE}/Secret", Reason.PEER_NOT_AUTHORISED)]
    failures = [record for record in caplog.records if "could not record the refusal" in record.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR
    assert failures[0].exc_info is not None and "the access log is down" in failures[0].getMessage()
