"""Operator proofs on interactive queries: verified signature, fresh timestamp, nonce used once.

Human operators (peer kind ``operator``) must attach an OperatorProof to every request; system callers
may omit it. When a proof is present it must verify whoever the peer is. Verification (certificate
chained to the mesh CA, signature, ±120 s skew, nonce replay against this service's
``operator_nonces`` table) is the mesh's :class:`juki.mesh.operator.OperatorVerifier`.
"""

from __future__ import annotations

from typing import Any

from juki.mesh.errors import JukiError, Reason
from juki.mesh.operator import OperatorVerifier
from juki.mesh.tls import Peer


class OperatorCheck:
    """Decides whether a call needs a proof and verifies the one it carries."""

    def __init__(self, verifier: OperatorVerifier) -> None:
        self._verifier = verifier

    async def check(self, peer: Peer, method: str, request: Any, has_proof: bool) -> str:
        """The operator id of a verified proof, "" for a system call; raises OPERATOR_PROOF_* otherwise."""
        if not has_proof:
            if peer.kind == "operator":
                raise JukiError(Reason.OPERATOR_PROOF_INVALID, "an operator must sign each request (operator_proof)")
            return ""
        verified = await self._verifier.verify(method, request)
        return verified.operator_id
