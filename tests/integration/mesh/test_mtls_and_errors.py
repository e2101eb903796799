"""The shared server start-up against real mTLS: identity, refusals, error details, health, reflection."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from juki.mesh import pki
from juki.mesh.errors import FieldViolation, JukiError, Reason
from juki.mesh.server import ServiceBinding, start_server
from juki.mesh.settings import TlsFiles
from juki.mesh.tls import require_peer, secure_channel

from tests.conftest import channel_as, make_settings

SERVICE = "juki.test.v1.EchoService"


def _identity(message: bytes) -> bytes:
    return message


def _add(servicer: Any, server: grpc.aio.Server) -> None:
    async def who(request: bytes, context: Any) -> bytes:
        return require_peer().spiffe_id.encode()

    async def bad(request: bytes, context: Any) -> bytes:
        raise JukiError(
            Reason.INVALID_FIELD, "resident_code: check digit mismatch",
            violations=[FieldViolation("resident_code", "check digit mismatch", "CHECK_DIGIT_MISMATCH")],
        )

    async def busy(request: bytes, context: Any) -> bytes:
        raise JukiError(Reason.QUOTA_EXCEEDED, retry_after_seconds=1.5)

    async def crash(request: bytes, context: Any) -> bytes:
        raise RuntimeError("boom")

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=_identity, response_serializer=_identity)
        for name, fn in (("Who", who), ("Bad", bad), ("Busy", busy), ("Crash", crash), ("Hidden", who))
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


ACCESS = {
    "Who": frozenset({"agency", "operator"}),
    "Bad": frozenset({"*"}),
    "Busy": frozenset({"*"}),
    "Crash": frozenset({"*"}),
    # "Hidden" is registered but listed nowhere: deny by default.
}


@pytest.fixture
async def echo_server(ca: Any, database: Any, data_dir: Path) -> Any:
    settings = make_settings(ca, database, data_dir, "lookup", "lookup", ("service", "lookup"))
    running = await start_server(settings, [ServiceBinding(SERVICE, _add, None, ACCESS)])
    yield running
    await running.stop(0.1)


def _call(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=_identity, response_deserializer=_identity)


async def test_peer_identity_comes_from_the_certificate(ca: Any, echo_server: Any) -> None:
    async with channel_as(ca, "agency", "jps", echo_server.address) as channel:
        answer = await _call(channel, "Who")(b"", metadata=(("x-spiffe-id", "spiffe://juki.local/agency/evil"),))
    assert answer == b"spiffe://juki.local/agency/jps"


async def test_unlisted_method_and_kind_are_denied(ca: Any, echo_server: Any) -> None:
    async with channel_as(ca, "agency", "jps", echo_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await _call(channel, "Hidden")(b"")
    assert hidden.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with channel_as(ca, "private", "acme-insurance", echo_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as private:
            await _call(channel, "Who")(b"")
    assert private.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_errors_carry_google_rpc_details(ca: Any, echo_server: Any) -> None:
    async with channel_as(ca, "agency", "jps", echo_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await _call(channel, "Bad")(b"")
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await _call(channel, "Busy")(b"")
        with pytest.raises(grpc.aio.AioRpcError) as crash:
            await _call(channel, "Crash")(b"")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(bad.value)
    assert status is not None
    kinds = {d.TypeName() for d in status.details}
    assert kinds == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}
    request = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(request.DESCRIPTOR)).Unpack(request)
    assert request.field_violations[0].field == "resident_code"
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    busy_status = rpc_status.from_call(busy.value)
    assert busy_status is not None
    next(d for d in busy_status.details if d.Is(retry.DESCRIPTOR)).Unpack(retry)
    assert retry.retry_delay.seconds == 1 and retry.retry_delay.nanos == 500_000_000
    assert crash.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" not in (crash.value.details() or "")


async def test_plaintext_is_refused(echo_server: Any) -> None:
    async with grpc.aio.insecure_channel(echo_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call(channel, "Who")(b"", timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_without_certificate_is_refused(ca: Any, echo_server: Any) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.ca_cert_path.read_bytes())
    async with grpc.aio.secure_channel(echo_server.address, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call(channel, "Who")(b"", timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_from_another_ca_is_refused(ca: Any, echo_server: Any, tmp_path: Path) -> None:
    other = pki.CertificateAuthority(tmp_path / "other-pki")
    other.create()
    other.issue("agency", "jps")
    cert, key = other.paths("agency", "jps")
    tls = TlsFiles(ca=ca.ca_cert_path, cert=cert, key=key)
    async with secure_channel(echo_server.address, tls) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call(channel, "Who")(b"", timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_revoked_certificate_is_refused(ca: Any, echo_server: Any) -> None:
    ca.issue("agency", "revoked-agency")
    async with channel_as(ca, "agency", "revoked-agency", echo_server.address) as channel:
        assert await _call(channel, "Who")(b"") == b"spiffe://juki.local/agency/revoked-agency"
        ca.revoke("agency", "revoked-agency")
        await asyncio.sleep(2.2)  # the CRL is re-read at most every 2 s
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call(channel, "Who")(b"")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_both_reflection_versions(ca: Any, echo_server: Any) -> None:
    async with channel_as(ca, "agency", "jps", echo_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        listing: list[str] = []
        for method in ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                       "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"):
            call = channel.stream_stream(
                method,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            stream = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            async for response in stream:
                listing.append(",".join(s.name for s in response.list_services_response.service))
        assert all(SERVICE in entry for entry in listing) and len(listing) == 2


def test_keys_are_owner_only(ca: Any) -> None:
    issued = ca.issue("operator", "key-mode-check")
    assert stat.S_IMODE(os.stat(issued.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca.ca_key_path).st_mode) == 0o600
    assert issued.spiffe_id == "spiffe://juki.local/operator/key-mode-check"


def test_tls_files_must_exist(tmp_path: Path) -> None:
    from juki.mesh.errors import SettingsError

    with pytest.raises(SettingsError, match="certificate"):
        (tmp_path / "ca.crt").write_text("x")
        TlsFiles(ca=tmp_path / "ca.crt", cert=tmp_path / "nope.crt", key=tmp_path / "nope.key").validate()
