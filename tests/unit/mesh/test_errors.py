"""The error model: the catalogue read from common.proto, the status each reason becomes on the wire, the
decoder of failed calls (real gRPC over mTLS, aio and blocking) and the one rule for a dependency's failure."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import EnumValueDescriptor
from google.rpc import error_details_pb2
from grpc.aio import Metadata
from juki._gen.juki.common.v1 import common_pb2
from juki.mesh.errors import (
    CATALOG,
    ERROR_DOMAIN,
    FieldViolation,
    JukiError,
    Reason,
    RemoteError,
    disagreements,
    from_grpc_error,
    invalid,
    passed_on,
)
from juki.mesh.server import DEFAULT_RETRY_SECONDS, _classify, abort_with, status_for
from juki.mesh.tls import channel_credentials, secure_channel, server_credentials

from tests.conftest import tls_for

SERVICES = Path(__file__).resolve().parents[3] / "services" / "juki"
PROTO_VALUES = [value for value in common_pb2.ErrorReason.DESCRIPTOR.values if value.number != 0]


def _option(value: EnumValueDescriptor) -> common_pb2.ErrorReasonOptions:
    options = value.GetOptions()
    assert options.HasExtension(common_pb2.error_reason), value.name
    return options.Extensions[common_pb2.error_reason]


def _reason_of(value: EnumValueDescriptor) -> Reason:
    return Reason[value.name.removeprefix("ERROR_REASON_")]


# -- the catalogue is the contract ----------------------------------------------------------------

def test_the_python_reasons_are_the_proto_values() -> None:
    assert {value.name.removeprefix("ERROR_REASON_") for value in PROTO_VALUES} == set(Reason.__members__)
    assert disagreements(Reason.__members__, CATALOG) == []


def test_a_reason_missing_on_either_side_is_a_disagreement() -> None:
    names = set(Reason.__members__)
    assert disagreements(names - {"PIN_MISMATCH"}, CATALOG) == ["PIN_MISMATCH is in common.proto but not in Reason"]
    assert disagreements(names | {"PIN_FORGOTTEN"}, CATALOG) == ["PIN_FORGOTTEN is in Reason but not in common.proto"]


@pytest.mark.parametrize("value", PROTO_VALUES, ids=lambda value: value.name)
def test_each_reason_has_the_code_and_retryability_of_its_proto_option(value: EnumValueDescriptor) -> None:
    option = _option(value)
    reason = _reason_of(value)
    assert reason.number == value.number
    assert reason.value.code is grpc.StatusCode[option.status_code]
    assert reason.value.retryable is option.retryable
    assert reason.value.summary == option.summary
    assert reason.value.metadata_keys == frozenset(option.metadata_keys)
    error = JukiError(reason)
    assert (error.code, error.retryable, error.message) == (reason.value.code, option.retryable, option.summary)


@pytest.mark.parametrize("reason", list(Reason), ids=lambda reason: reason.name)
def test_the_status_of_a_reason_carries_its_code_error_info_and_retry_info_when_retryable(reason: Reason) -> None:
    status = status_for(JukiError(reason))
    assert status.code == reason.value.code.value[0]
    infos = [detail for detail in status.details if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    retries = [detail for detail in status.details if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert (info.reason, info.domain) == (reason.name, ERROR_DOMAIN)
    assert len(retries) == (1 if reason.value.retryable else 0)


def _metadata_keys_raised() -> list[tuple[str, str, str]]:
    """(place, reason, key) of every ``JukiError(Reason.X, ..., metadata={"key": ...})`` in the services."""
    found = []
    for path in sorted(SERVICES.rglob("*.py")):
        if "_gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "JukiError"):
                continue
            first = node.args[0] if node.args else None
            if not (isinstance(first, ast.Attribute) and isinstance(first.value, ast.Name)
                    and first.value.id == "Reason"):
                continue
            for keyword in node.keywords:
                if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
                    for key in keyword.value.keys:
                        assert isinstance(key, ast.Constant), f"{path}:{node.lineno}: metadata keys are literal"
                        found.append((f"{path.relative_to(SERVICES)}:{node.lineno}", first.attr, str(key.value)))
    return found


def test_every_metadata_key_a_service_sends_is_documented_for_its_reason() -> None:
    raised = _metadata_keys_raised()
    assert raised, "the scan found no metadata at all: it is looking in the wrong place"
    undocumented = [(place, reason, key) for place, reason, key in raised
                    if key not in Reason[reason].value.metadata_keys]
    assert undocumented == []


# -- the decoder, over real gRPC ---------------------------------------------------------------------

SERVICE = "juki.test.v1.FailService"
ERRORS: dict[str, JukiError] = {
    "bad": JukiError(Reason.CHECK_DIGIT_MISMATCH, "two fields are invalid", violations=[
        FieldViolation("notifications[3].birth_date.month", "month 13 does not exist"),
        FieldViolation("resident_code", "the check digit does not match", "CHECK_DIGIT_MISMATCH"),
    ]),
    "busy": JukiError(Reason.QUOTA_EXCEEDED, "the quota of J001 is used up", retry_after_seconds=2.5),
    "pin": JukiError(Reason.PIN_MISMATCH, metadata={"remaining_attempts": "2"}),
    "down": JukiError(Reason.DEPENDENCY_UNAVAILABLE, metadata={"municipality_code": "131148"}),
}


def _raw(message: bytes) -> bytes:
    return message


async def _fail(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    name = request.decode()
    if name == "plain":  # a status without details, as a server outside the mesh sends it
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    await abort_with(context, ERRORS[name])
    return b""


@pytest.fixture
async def failing(ca: Any) -> AsyncIterator[str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Fail": grpc.unary_unary_rpc_method_handler(_fail, request_deserializer=_raw, response_serializer=_raw),
    }),))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls_for(ca, "service", "lookup")))
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def _aio_failure(ca: Any, address: str, name: str) -> grpc.aio.AioRpcError:
    async with secure_channel(address, tls_for(ca, "agency", "jps"), interceptors=[]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(f"/{SERVICE}/Fail", request_serializer=_raw, response_deserializer=_raw)(
                name.encode(), timeout=10)
    return caught.value


def _blocking_failure(ca: Any, address: str, name: str) -> grpc.RpcError:
    with grpc.secure_channel(address, channel_credentials(tls_for(ca, "agency", "jps"))) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(f"/{SERVICE}/Fail", request_serializer=_raw, response_deserializer=_raw)(
                name.encode(), timeout=10)
    return caught.value


async def _both(ca: Any, address: str, name: str) -> list[RemoteError]:
    aio = await _aio_failure(ca, address, name)
    blocking = await asyncio.to_thread(_blocking_failure, ca, address, name)
    assert not isinstance(blocking, grpc.aio.AioRpcError)
    return [from_grpc_error(aio), from_grpc_error(blocking)]


async def test_field_violations_round_trip(ca: Any, failing: str) -> None:
    for remote in await _both(ca, failing, "bad"):
        assert remote.code is grpc.StatusCode.INVALID_ARGUMENT and remote.message == "two fields are invalid"
        assert remote.reason is Reason.CHECK_DIGIT_MISMATCH and remote.domain == ERROR_DOMAIN
        assert remote.violations == (
            FieldViolation("notifications[3].birth_date.month", "month 13 does not exist", "INVALID_FIELD"),
            FieldViolation("resident_code", "the check digit does not match", "CHECK_DIGIT_MISMATCH"),
        )
        assert remote.retry_after_seconds is None and not remote.retryable


async def test_the_retry_delay_round_trips(ca: Any, failing: str) -> None:
    for remote in await _both(ca, failing, "busy"):
        assert remote.code is grpc.StatusCode.RESOURCE_EXHAUSTED and remote.reason is Reason.QUOTA_EXCEEDED
        assert remote.retry_after_seconds == 2.5 and remote.retryable


async def test_error_info_metadata_round_trips(ca: Any, failing: str) -> None:
    for remote in await _both(ca, failing, "pin"):
        assert remote.code is grpc.StatusCode.PERMISSION_DENIED and remote.reason is Reason.PIN_MISMATCH
        assert remote.message == Reason.PIN_MISMATCH.value.summary
        assert remote.metadata == {"remaining_attempts": "2"}
    for remote in await _both(ca, failing, "down"):
        assert remote.reason is Reason.DEPENDENCY_UNAVAILABLE and remote.metadata == {"municipality_code": "131148"}
        assert remote.retry_after_seconds == DEFAULT_RETRY_SECONDS  # retryable: RetryInfo with the default


async def test_a_status_without_details_is_decoded_from_its_code(ca: Any, failing: str) -> None:
    for remote in await _both(ca, failing, "plain"):
        assert remote.code is grpc.StatusCode.NOT_FOUND and remote.message == "no such thing"
        assert remote.reason is None and remote.reason_name == "" and remote.violations == ()
        assert not remote.retryable


def test_a_reason_of_another_domain_is_not_taken_for_ours() -> None:
    info = error_details_pb2.ErrorInfo(reason="PIN_MISMATCH", domain="example.com")
    status = status_for(JukiError(Reason.PIN_MISMATCH))
    del status.details[:]
    status.details.add().Pack(info)
    error = grpc.aio.AioRpcError(grpc.StatusCode.PERMISSION_DENIED, Metadata(),
                                 Metadata(("grpc-status-details-bin", status.SerializeToString())))
    remote = from_grpc_error(error)
    assert remote.reason_name == "PIN_MISMATCH" and remote.reason is None


def test_malformed_details_leave_the_status_code() -> None:
    error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(),
                                 Metadata(("grpc-status-details-bin", b"\xff\xff not a status")), details="down")
    remote = from_grpc_error(error)
    assert (remote.code, remote.reason, remote.retryable) == (grpc.StatusCode.UNAVAILABLE, None, True)


# -- the one rule for a dependency's failure ----------------------------------------------------------

def _rpc_error(error: JukiError) -> grpc.aio.AioRpcError:
    trailing = Metadata(("grpc-status-details-bin", status_for(error).SerializeToString()))
    return grpc.aio.AioRpcError(error.code, Metadata(), trailing, details=error.message)


def _example(reason: Reason) -> JukiError:
    if reason.value.code is grpc.StatusCode.INVALID_ARGUMENT:
        return invalid("entry.address.street", "contains a control character", reason)
    return JukiError(reason, metadata={key: "x" for key in reason.value.metadata_keys})


@pytest.mark.parametrize("reason", list(Reason), ids=lambda reason: reason.name)
def test_a_dependencys_failure_reaches_the_caller_by_one_rule(reason: Reason) -> None:
    seen = passed_on(_rpc_error(_example(reason)), "the municipal CS of 131148")
    if reason.value.relayed:
        assert seen.reason is reason
        assert seen.metadata == {key: "x" for key in reason.value.metadata_keys}
    else:
        expected = Reason.DEPENDENCY_UNAVAILABLE if reason.value.retryable else Reason.DEPENDENCY_REFUSED
        assert seen.reason is expected
        assert seen.metadata == {"dependency": "the municipal CS of 131148",
                                 "dependency_status": reason.value.code.name, "dependency_reason": reason.name}
        # A field of the request this service built is not a field of its caller's request.
        assert seen.violations == ()
        assert set(seen.metadata) <= seen.reason.value.metadata_keys


@pytest.mark.parametrize("reason", list(Reason), ids=lambda reason: reason.name)
def test_the_server_maps_an_escaped_dependency_failure_by_the_same_rule(reason: Reason) -> None:
    error = _rpc_error(_example(reason))
    assert _classify(error).reason is passed_on(error, "x").reason


def test_a_dependencys_invalid_argument_is_a_refused_dependency_not_the_callers_field() -> None:
    seen = passed_on(_rpc_error(invalid("entry.address.street", "contains U+0007")), "the municipal CS of 131148")
    assert (seen.reason, seen.code) == (Reason.DEPENDENCY_REFUSED, grpc.StatusCode.FAILED_PRECONDITION)
    assert "entry.address.street" not in {violation.field for violation in seen.violations}


def test_a_dependencys_retry_delay_is_passed_on() -> None:
    seen = passed_on(_rpc_error(JukiError(Reason.QUOTA_EXCEEDED, retry_after_seconds=7.0)), "the access log")
    assert seen.reason is Reason.DEPENDENCY_UNAVAILABLE and seen.retry_after_seconds == 7.0


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN])
def test_a_transport_failure_without_details_is_an_unavailable_dependency(code: grpc.StatusCode) -> None:
    error = grpc.aio.AioRpcError(code, Metadata(), Metadata(), details="connection reset")
    assert passed_on(error, "the access log").reason is Reason.DEPENDENCY_UNAVAILABLE


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED])
def test_a_refusal_without_a_catalogued_reason_is_a_refused_dependency(code: grpc.StatusCode) -> None:
    error = grpc.aio.AioRpcError(code, Metadata(), Metadata(), details="no")
    seen = passed_on(error, "the card service")
    assert seen.reason is Reason.DEPENDENCY_REFUSED
    assert seen.metadata == {"dependency": "the card service", "dependency_status": code.name}


def test_violations_of_the_callers_own_fields_passed_through_are_renamed_to_the_callers() -> None:
    refused = _rpc_error(JukiError(Reason.INVALID_FIELD, violations=[
        FieldViolation("entry.address.street", "contains U+0007"),
        FieldViolation("entry.address.street.kana", "not katakana"),
    ]))
    seen = passed_on(refused, "the municipal CS", caller_fields={"entry.address.street": "street"})
    assert seen.reason is Reason.INVALID_FIELD and seen.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [violation.field for violation in seen.violations] == ["street", "street.kana"]
    # One violation outside the declared fields: the request this service built was bad, not the caller's.
    mixed = _rpc_error(JukiError(Reason.INVALID_FIELD, violations=[
        FieldViolation("entry.address.street", "contains U+0007"), FieldViolation("occurred_on", "in the future"),
    ]))
    assert passed_on(mixed, "the municipal CS", caller_fields={"entry.address.street": "street"}).reason is (
        Reason.DEPENDENCY_REFUSED)
    # A field that merely starts with the same letters is another field.
    other = _rpc_error(invalid("entry.address.street_number", "bad"))
    assert passed_on(other, "x", caller_fields={"entry.address.street": "street"}).reason is Reason.DEPENDENCY_REFUSED
