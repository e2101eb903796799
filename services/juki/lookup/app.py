"""Entry point of the lookup service: ``juki serve lookup`` calls :func:`create`.

Lookup reads the national identity store (schema ``intake_national``) directly, as a read replica is
read, with SELECT only; it owns the watch lists of the change feed and the operator nonces. Every
provision is logged through the access-log service before it is answered.

Settings beyond the common ones (``JUKI_*`` environment variables, parsed and checked at start into
``settings.lookup``, see ``mesh.settings.LookupSettings``):
  ``JUKI_LOOKUP_QUOTA_MULTIPLIER``  scales every 別表 quota (default 1; benchmarks raise it).
  ``JUKI_LOOKUP_ACK_TIMEOUT``       seconds to wait for the access log's acknowledgement (default 5).
  ``JUKI_LOOKUP_LOG_IN_FLIGHT``     access-log batches sent and not yet acknowledged (default 4).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc

from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2
from juki.domain.codes import is_valid_resident_code
from juki.domain.policy import Policy, default_policy
from juki.lookup import records as rec
from juki.lookup.provisions import ProvisionLog
from juki.lookup.quota import Quotas
from juki.lookup.service import LookupServicer, current_attempt
from juki.mesh import db
from juki.mesh.errors import JukiError
from juki.mesh.methods import Method, OperatorProof
from juki.mesh.operator import OperatorVerifier, load_passwords
from juki.mesh.server import ServiceBinding
from juki.mesh.settings import SPIFFE_TRUST_DOMAIN, ServiceSettings
from juki.mesh.telemetry import current_trace_id
from juki.mesh.tls import Peer, secure_channel

log = logging.getLogger(__name__)

PROVIDER = f"spiffe://{SPIFFE_TRUST_DOMAIN}/service/lookup"
SERVICE_NAME = "juki.lookup.v1.LookupService"
# Who may reach the methods at all; the 別表 policy then decides per 事務. Private bodies are let
# through on purpose so that their refusal is the policy's (NOT_A_PUBLIC_BODY) and is logged.
CALLERS = frozenset({"agency", "operator", "prefecture", "municipality", "private"})
# The method table: an operator (a person at a terminal) signs every query; a system caller acts on its
# certificate, but a proof it attaches is verified all the same. ListPurposes reads the caller's own grants.
_QUERY = Method(CALLERS, OperatorProof.FROM_OPERATORS)
METHODS: dict[str, Method] = {
    "LookupByCode": _QUERY,
    "SearchByFourItems": _QUERY,
    "VerifyBatch": _QUERY,
    "RegisterWatch": _QUERY,
    "ListChanges": _QUERY,
    "StreamChanges": _QUERY,
    "ListPurposes": Method(CALLERS),
}


class LookupApp:
    """The lookup process: pool, access-log client, policy and servicer."""

    def __init__(self, settings: ServiceSettings, policy: Policy | None = None) -> None:
        self.settings = settings
        self.policy = policy or default_policy()
        self.pool: asyncpg.Pool | None = None
        self.provisions: ProvisionLog | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> Sequence[ServiceBinding]:
        address = self.settings.peers.require("accesslog")
        self.pool = await db.create_pool(self.settings.database, "lookup")
        # No per-message tracing on the log stream: it is shared by many calls, and each record already
        # carries the trace id of the call it belongs to.
        self._channel = secure_channel(address, self.settings.tls, interceptors=[])
        self.provisions = ProvisionLog(
            self._channel, ack_timeout=self.settings.lookup.ack_timeout_seconds,
            max_in_flight=self.settings.lookup.log_in_flight,
        )
        servicer = LookupServicer(
            self.pool, self.policy, self.provisions, Quotas(self.pool, self.settings.lookup.quota_multiplier), PROVIDER,
            OperatorVerifier(
                self.settings.tls, self.pool, passwords=load_passwords(self.settings.operator_passwords_file),
            ),
        )
        return [ServiceBinding(SERVICE_NAME, add_to_server, servicer, METHODS)]

    async def on_refusal(self, peer: Peer | None, method: str, error: JukiError) -> None:
        """Log a refused attempt (a security event) with what it asked for, when known."""
        if self.provisions is None or peer is None:
            return
        attempt = current_attempt.get()
        agency = self.policy.agency(peer.spiffe_id)
        record = accesslog_pb2.ProvisionRecord(
            recipient=peer.spiffe_id,
            recipient_name=agency.name if agency is not None else "",
            purpose=attempt.purpose if attempt else "",
            query_mode=rec.MODE_TO_PROTO[attempt.mode] if attempt else common_pb2.QUERY_MODE_UNSPECIFIED,
            provider_tier=common_pb2.TIER_NATIONAL,
            provider=PROVIDER,
            # Only a well-formed code is recorded: the refused request may carry anything.
            resident_code=attempt.resident_code if attempt and is_valid_resident_code(attempt.resident_code) else "",
            outcome=accesslog_pb2.PROVISION_OUTCOME_REFUSED,
            trace_id=current_trace_id() or "",
            operator_id=attempt.operator_id if attempt else "",
            refusal_reason=common_pb2.ErrorReason.Value(f"ERROR_REASON_{error.reason.name}"),
        )
        record.provided_at.GetCurrentTime()
        await self.provisions.record([record.SerializeToString()])

    async def stop(self) -> None:
        if self.provisions is not None:
            await self.provisions.close()
        if self._channel is not None:
            await self._channel.close()
        if self.pool is not None:
            await self.pool.close()


def _serialize(message: Any) -> bytes:
    """Messages are serialised; bytes (VerifyBatch answers, written directly) pass through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(servicer: LookupServicer, server: grpc.aio.Server) -> None:
    """The generated registration, with a serializer that also takes pre-serialised answers."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in lookup_pb2.DESCRIPTOR.services_by_name["LookupService"].methods:
        request_class = getattr(lookup_pb2, method.input_type.name)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=request_class.FromString,
            response_serializer=_serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def create(settings: ServiceSettings) -> LookupApp:
    return LookupApp(settings)
