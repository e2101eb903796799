"""Who may send what to an intake node: the sender rules shared by notifications (service.py) and
bulk loads (bulk.py). No I/O: the peer comes from the verified certificate, the tier from the settings.
"""

from __future__ import annotations

from collections.abc import Iterable

from juki.mesh.errors import JukiError, Reason
from juki.mesh.tls import Peer


def check_sender(peer: Peer, codes: Iterable[str], *, national: bool, prefecture: str) -> None:
    """A municipality sends only its own notifications; a prefecture only its municipalities'.

    ``codes`` are the municipality codes the sender speaks for; ``prefecture`` is this node's
    prefecture (ignored at the national node).
    """
    if peer.kind == "municipality":
        if not national and peer.name[:2] != prefecture:
            raise JukiError(Reason.PEER_NOT_AUTHORISED,
                            f"{peer.spiffe_id} is not a municipality of prefecture {prefecture}")
        foreign = sorted(c for c in set(codes) if c != peer.name)
        if foreign:
            raise JukiError(Reason.PEER_NOT_AUTHORISED,
                            f"{peer.spiffe_id} may only notify for itself, not for {', '.join(foreign[:3])}")
    elif peer.kind == "prefecture":
        foreign = sorted(c for c in set(codes) if c[:2] != peer.name)
        if foreign:
            raise JukiError(Reason.PEER_NOT_AUTHORISED,
                            f"{peer.spiffe_id} may only relay its own municipalities, not {', '.join(foreign[:3])}")
