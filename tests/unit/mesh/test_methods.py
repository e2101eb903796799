"""The method table: proof rules, paths taken from the binding, asyncpg errors recognised by class."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import grpc
import pytest
from juki.mesh.db import is_connection_loss
from juki.mesh.methods import CallMethod, Method, OperatorProof
from juki.mesh.server import ServiceBinding, _classify, _full_access

PACKAGE = Path(__file__).resolve().parents[3] / "services" / "juki"
OPERATOR = frozenset({"operator", "agency"})


def _call(rule: OperatorProof) -> CallMethod:
    return CallMethod("/x.v1.S/M", "x.v1.S", "M", Method(OPERATOR, rule))


@pytest.mark.parametrize(("rule", "kind", "has_proof", "required", "checked"), [
    (OperatorProof.NONE, "operator", False, False, False),
    (OperatorProof.NONE, "operator", True, False, False),
    (OperatorProof.REQUIRED, "agency", False, True, True),
    (OperatorProof.REQUIRED, "operator", True, True, True),
    (OperatorProof.FROM_OPERATORS, "operator", False, True, True),
    (OperatorProof.FROM_OPERATORS, "agency", False, False, False),
    (OperatorProof.FROM_OPERATORS, "agency", True, False, True),
    (OperatorProof.WHEN_PRESENT, "operator", False, False, False),
    (OperatorProof.WHEN_PRESENT, "agency", True, False, True),
])
def test_proof_rules(rule: OperatorProof, kind: str, has_proof: bool, required: bool, checked: bool) -> None:
    method = _call(rule)
    assert method.proof_required(kind) is required
    assert method.proof_checked(has_proof, kind) is checked


def test_the_binding_gives_paths_and_log_names() -> None:
    binding = ServiceBinding("x.v1.S", lambda s, server: None, None, {
        "Bare": frozenset({"*"}),
        "/x.v1.S/Full": Method(OPERATOR, OperatorProof.REQUIRED, log_name="full call"),
    })
    methods = _full_access([binding])
    assert methods["/x.v1.S/Bare"].spec == Method(frozenset({"*"}))
    assert methods["/x.v1.S/Bare"].log_name == "Bare"
    assert methods["/x.v1.S/Full"].name == "Full" and methods["/x.v1.S/Full"].log_name == "full call"
    assert methods["/grpc.health.v1.Health/Check"].spec.callers == frozenset({"*"})
    assert binding.path("Bare") == "/x.v1.S/Bare"
    with pytest.raises(KeyError):
        binding.path("Missing")


def test_a_row_without_callers_is_refused() -> None:
    with pytest.raises(ValueError):
        Method(frozenset())


def test_no_servicer_writes_a_method_path_by_hand() -> None:
    """Paths come from the binding (mesh.methods.current_method); clients and CLI may name the ones they call."""
    servers = [p for pkg in ("lookup", "intake", "municipal", "disclosure", "card")
               for p in (PACKAGE / pkg).glob("*.py")]
    written = {str(p.relative_to(PACKAGE)): re.findall(r'"/juki\.\w+\.v1\.\w+/\w+"|f"/\{SERVICE_NAME\}/',
                                                       p.read_text(encoding="utf-8"))
               for p in servers}
    # Calls this process makes to another service (a client's path), not methods it serves.
    allowed = {"lookup/provisions.py": ['"/juki.accesslog.v1.AccessLogService/AppendStream"'],
               "intake/relay.py": ['"/juki.intake.v1.IntakeService/StreamNotifications"'],
               "disclosure/service.py": ['"/juki.disclosure.v1.DisclosureService/GetDisclosure"']}
    assert {k: v for k, v in written.items() if v and allowed.get(k) != v} == {}


class _LooksLikeAsyncpg(Exception):
    """Not an asyncpg error, whatever its attributes say."""

    sqlstate = "08006"


def test_connection_loss_is_recognised_by_class() -> None:
    assert is_connection_loss(asyncpg.exceptions.ConnectionFailureError("gone"))
    assert is_connection_loss(asyncpg.exceptions.AdminShutdownError("shutdown"))
    assert is_connection_loss(asyncpg.exceptions.ConnectionDoesNotExistError("closed"))
    assert not is_connection_loss(asyncpg.exceptions.UniqueViolationError("dup"))
    assert not is_connection_loss(_LooksLikeAsyncpg())


def test_unstorable_text_is_the_callers_fault_by_class() -> None:
    error = _classify(asyncpg.exceptions.CharacterNotInRepertoireError("NUL"))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and error.violations[0].field == "request"
    assert _classify(asyncpg.exceptions.UntranslatableCharacterError("x")).code is grpc.StatusCode.INVALID_ARGUMENT

    class Imitation(Exception):
        sqlstate = "22021"

    assert _classify(Imitation()).code is grpc.StatusCode.INTERNAL
