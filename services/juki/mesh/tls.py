"""Mutual TLS for every hop, and the peer identity taken from the verified certificate.

The identity is the SPIFFE URI SAN of the client certificate that gRPC's TLS stack has already
verified against the mesh CA. Nothing a client sends in metadata can change it.
"""

from __future__ import annotations

import contextvars
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509

from juki.mesh.errors import JukiError, Reason
from juki.mesh.settings import SPIFFE_TRUST_DOMAIN, TlsFiles

# Methods a client may send again after UNAVAILABLE without changing the outcome: reads, and writes
# that are idempotent by their own key (notification id, batch id). gRPC retries these transparently, on
# another replica when round_robin has one, so a replica that dies mid-call costs the caller nothing.
# A write with a fresh operator proof per attempt (RecordChange, card actions) is not here: a retry would
# replay the proof, which is refused; its callers retry with a new proof.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "juki.lookup.v1.LookupService": ("LookupByCode", "SearchByFourItems", "ListPurposes"),
    "juki.intake.v1.IntakeService": ("SubmitNotifications", "GetSequenceState", "GetIntakeStatus", "GetResident",
                                     "ListResidentHistory"),
    "juki.accesslog.v1.AccessLogService": ("ListProvisions", "VerifyLog"),
    "juki.card.v1.CardService": ("GetCardStatus",),
    "juki.municipal.v1.MunicipalService": ("GetResidentEntry",),
}
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": service, "method": method}
                 for service, methods in IDEMPOTENT_METHODS.items() for method in methods],
        "retryPolicy": RETRY_POLICY,
    }],
})

# Channel options shared by every client of the mesh: per-call round-robin over all resolved
# addresses (headless Services in Kubernetes; every replica of a local mesh), the retry policy above,
# keepalive for long-lived agency channels.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 1),
    # Reconnect quickly after a peer restarts (the supervisor or Kubernetes brings it back within seconds):
    # gRPC's defaults wait 1 s after the first failed connection and back off to 120 s. Still jittered
    # (±20 %) and exponential (x1.6), but from 100 ms and capped at 300 ms, so that a peer back after an
    # outage of any length is reached within 0.36 s of its readiness (a cap of 2 s left callers of a
    # restarted lookup or access log failing for 1.4 s after it was ready). A refused connection on the
    # dedicated line costs next to nothing, so three attempts a second to a peer that is down are cheap.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
)

SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.so_reuseport", 0),
)


def server_options(max_connection_age_seconds: float) -> list[tuple[str, Any]]:
    """SERVER_OPTIONS with a maximum connection age: after it the server sends GOAWAY, the client resolves
    its target again and reconnects, so long-lived channels reach replicas added since (an HPA's new pods).
    Calls in flight get a grace of a tenth of the age (at least 10 s) to finish."""
    age_ms = int(max_connection_age_seconds * 1000)
    return [*SERVER_OPTIONS, ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", max(age_ms // 10, 10_000))]


@dataclass(frozen=True)
class Peer:
    """Who is calling, as the verified certificate says.

    ``kind`` is the first path segment of the SPIFFE id (service, prefecture, municipality, agency,
    operator, private); ``name`` the second.
    """

    spiffe_id: str
    kind: str
    name: str
    serial: int

    @property
    def is_public_body(self) -> bool:
        return self.kind in ("agency", "prefecture", "municipality", "service", "operator")


current_peer: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("juki_peer", default=None)


def read_tls(tls: TlsFiles) -> tuple[bytes, bytes, bytes]:
    return tls.ca.read_bytes(), tls.cert.read_bytes(), tls.key.read_bytes()


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server side of mutual TLS: a client certificate from the mesh CA is required."""
    ca, cert, key = read_tls(tls)
    return grpc.ssl_server_credentials(((key, cert),), root_certificates=ca, require_client_auth=True)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = read_tls(tls)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def secure_channel(
    target: str,
    tls: TlsFiles,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An mTLS ``grpc.aio`` channel to another part of the mesh, traced when tracing is on."""
    from juki.mesh import telemetry  # local import: telemetry imports this module's types

    chosen = list(interceptors) if interceptors is not None else telemetry.client_interceptors()
    extra = list(options)
    if target.startswith(("ipv4:", "ipv6:")) and "," in target:
        # Several replicas' addresses: the authority (and so the name the server certificate is checked
        # against) would be the whole list; it is the loopback host every local certificate names.
        extra.append(("grpc.default_authority", "localhost"))
    return grpc.aio.secure_channel(
        target, channel_credentials(tls), options=[*CHANNEL_OPTIONS, *extra], interceptors=chosen
    )


@functools.lru_cache(maxsize=4096)
def _parse_certificate(pem: bytes) -> tuple[str | None, int]:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None, cert.serial_number
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return (uris[0] if len(uris) == 1 else None), cert.serial_number


def peer_from_auth_context(auth: dict[str, list[bytes]]) -> Peer:
    """Build the :class:`Peer` from gRPC's auth context of a verified TLS connection."""
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise JukiError(Reason.UNAUTHENTICATED, "a client certificate from the mesh CA is required")
    spiffe, serial = _parse_certificate(pems[0])
    prefix = f"spiffe://{SPIFFE_TRUST_DOMAIN}/"
    if spiffe is None or not spiffe.startswith(prefix):
        raise JukiError(Reason.UNAUTHENTICATED, "the client certificate carries no juki.local SPIFFE id")
    parts = spiffe[len(prefix):].split("/")
    if len(parts) != 2 or not all(parts):
        raise JukiError(Reason.UNAUTHENTICATED, f"malformed SPIFFE id {spiffe!r}")
    return Peer(spiffe_id=spiffe, kind=parts[0], name=parts[1], serial=serial)


def require_peer() -> Peer:
    """The verified caller of the RPC being served (set by the identity interceptor)."""
    peer = current_peer.get()
    if peer is None:
        raise JukiError(Reason.UNAUTHENTICATED, "no verified peer identity")
    return peer
