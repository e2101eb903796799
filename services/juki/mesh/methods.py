"""What each RPC method is, stated once next to its service's binding: callers, operator proof, name.

A service lists its methods in a table of :class:`Method` (see each ``app.py``). The mesh interceptor
takes the peer kinds allowed from it (deny by default) and, for the duration of a call, publishes the
method's :class:`CallMethod` (full path, short name, proof rule) in :data:`current_method`, so that no
handler writes its own method path by hand: the operator-proof check signs and verifies against the
path the call really arrived on, and logs and records name the method as the table does.
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass

from juki.mesh.errors import JukiError, Reason

PROOF_FIELD = "operator_proof"


class OperatorProof(enum.Enum):
    """Whether a call of a method must carry an operator proof (``juki.common.v1.OperatorProof``)."""

    NONE = "none"  # the method takes no proof
    REQUIRED = "required"  # every call carries one (a human acts, whoever relays it)
    FROM_OPERATORS = "from operators"  # an operator peer must sign; a service acts on its certificate alone
    WHEN_PRESENT = "when present"  # never required, but verified whenever one is attached


@dataclass(frozen=True)
class Method:
    """One row of a service's method table."""

    callers: frozenset[str]  # peer kinds (or SPIFFE ids) allowed to call; "*" = any verified peer
    proof: OperatorProof = OperatorProof.NONE
    proof_field: str = PROOF_FIELD  # the request field that carries the proof
    log_name: str = ""  # what logs and records call the method; empty: its short name

    def __post_init__(self) -> None:
        if not self.callers:
            raise ValueError("a method needs at least one caller kind (the table is deny-by-default)")


@dataclass(frozen=True)
class CallMethod:
    """The method of the call being served: its table row and where it was reached."""

    path: str  # "/juki.lookup.v1.LookupService/LookupByCode": what operator proofs sign
    service: str  # "juki.lookup.v1.LookupService"
    name: str  # "LookupByCode"
    spec: Method

    @property
    def log_name(self) -> str:
        return self.spec.log_name or self.name

    def proof_required(self, peer_kind: str) -> bool:
        """Whether a call from a peer of ``peer_kind`` must carry an operator proof."""
        rule = self.spec.proof
        return rule is OperatorProof.REQUIRED or (rule is OperatorProof.FROM_OPERATORS and peer_kind == "operator")

    def proof_checked(self, has_proof: bool, peer_kind: str) -> bool:
        """Whether the proof (or its absence) is checked on this call."""
        return self.spec.proof is not OperatorProof.NONE and (has_proof or self.proof_required(peer_kind))


current_method: contextvars.ContextVar[CallMethod | None] = contextvars.ContextVar("juki_method", default=None)


def require_method() -> CallMethod:
    method = current_method.get()
    if method is None:
        raise JukiError(Reason.INTERNAL_FAULT, "no method in context (called outside the mesh interceptor)")
    return method

