"""How the disclosure service passes on its peers' refusals."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import Metadata
from juki.disclosure.service import forwarded
from juki.mesh.errors import JukiError, Reason
from juki.mesh.server import status_for


def _rpc_error(error: JukiError) -> grpc.aio.AioRpcError:
    status = status_for(error)
    trailing = Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(error.code, Metadata(), trailing, details=error.message)


@pytest.mark.parametrize("reason", [Reason.PIN_MISMATCH, Reason.CARD_LOCKED, Reason.CARD_NOT_FOUND,
                                    Reason.RESIDENT_NOT_FOUND, Reason.CARD_SUSPENDED])
def test_the_residents_own_refusals_are_passed_on(reason: Reason) -> None:
    assert forwarded(_rpc_error(JukiError(reason)), "card").reason is reason


@pytest.mark.parametrize("reason", [Reason.PEER_NOT_AUTHORISED, Reason.UNAUTHENTICATED, Reason.CERTIFICATE_REVOKED])
def test_a_peer_refusing_the_service_itself_is_a_dependency_fault(reason: Reason) -> None:
    result = forwarded(_rpc_error(JukiError(reason)), "national intake")
    assert result.reason is Reason.DEPENDENCY_UNAVAILABLE
    assert result.code == grpc.StatusCode.UNAVAILABLE


def test_unavailable_peer() -> None:
    error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), details="down")
    assert forwarded(error, "access log").reason is Reason.DEPENDENCY_UNAVAILABLE
