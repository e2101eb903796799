"""How the disclosure service passes on its peers' refusals: by the mesh's one rule (mesh/errors.passed_on)."""

from __future__ import annotations

from typing import NoReturn

import grpc
import pytest
from grpc.aio import Metadata
from juki._gen.juki.common.v1 import common_pb2
from juki.disclosure.service import PASSED_THROUGH, call, check_date_filter
from juki.mesh.errors import JukiError, Reason, invalid
from juki.mesh.server import status_for


def _rpc_error(error: JukiError) -> grpc.aio.AioRpcError:
    status = status_for(error)
    trailing = Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(error.code, Metadata(), trailing, details=error.message)


async def _through_call(error: grpc.aio.AioRpcError, service: str = "card") -> JukiError:
    async def failing() -> NoReturn:
        raise error

    with pytest.raises(JukiError) as caught:
        await call(service, failing())
    return caught.value


@pytest.mark.parametrize("reason", [Reason.PIN_MISMATCH, Reason.CARD_LOCKED, Reason.CARD_NOT_FOUND,
                                    Reason.RESIDENT_NOT_FOUND, Reason.CARD_SUSPENDED])
async def test_the_residents_own_refusals_are_passed_on(reason: Reason) -> None:
    assert (await _through_call(_rpc_error(JukiError(reason)))).reason is reason


@pytest.mark.parametrize("reason", [Reason.PEER_NOT_AUTHORISED, Reason.UNAUTHENTICATED, Reason.CERTIFICATE_REVOKED])
async def test_a_peer_refusing_the_service_itself_is_a_refused_dependency(reason: Reason) -> None:
    # As the mesh server maps the same refusal (and as docs/agencies.md describes DEPENDENCY_REFUSED).
    result = await _through_call(_rpc_error(JukiError(reason)), "national intake")
    assert result.reason is Reason.DEPENDENCY_REFUSED
    assert result.code == grpc.StatusCode.FAILED_PRECONDITION
    assert result.metadata == {"dependency": "national intake", "dependency_status": reason.value.code.name,
                               "dependency_reason": reason.name}


async def test_a_peers_invalid_field_is_not_the_callers() -> None:
    result = await _through_call(_rpc_error(invalid("card_number", "a card number is 16 digits")))
    assert result.reason is Reason.DEPENDENCY_REFUSED and not result.violations


async def test_unavailable_peer() -> None:
    error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), details="down")
    result = await _through_call(error, "access log")
    assert result.reason is Reason.DEPENDENCY_UNAVAILABLE and result.retryable


async def test_the_callers_own_fields_passed_through_to_the_access_log_stay_the_callers() -> None:
    refused = _rpc_error(invalid("page_token", "not a token this service issued"))

    async def failing() -> NoReturn:
        raise refused

    with pytest.raises(JukiError) as caught:
        await call("access log", failing(), caller_fields=PASSED_THROUGH)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [violation.field for violation in caught.value.violations] == ["page_token"]


@pytest.mark.parametrize(("field", "value"), [("from_date", common_pb2.Date(year=2024, month=13, day=1)),
                                              ("to_date", common_pb2.Date(year=2023, month=2, day=29))])
def test_a_date_filter_that_is_no_calendar_date_is_refused_naming_it(field: str, value: common_pb2.Date) -> None:
    with pytest.raises(JukiError) as caught:
        check_date_filter(value, field)
    assert [violation.field for violation in caught.value.violations] == [field]
