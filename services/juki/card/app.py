"""Entry point of the card service (住基カード): ``juki serve card`` calls :func:`create`.

The process holds the pool, the business clock (``settings.clock``; tests move it), the operator-proof
verifier and the channels to the municipal CSs (``settings.peers.municipal``) and the access log, reached
with its own certificate (``service/card``). The servicer is in :mod:`juki.card.service`, the wide-area
copy in :mod:`juki.card.wide_area`, the card rules in :mod:`juki.card.rules`. A failure of a municipal
CS reaches the caller by the mesh's one rule (:func:`juki.mesh.errors.passed_on`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Sequence

import asyncpg
import grpc

from juki import domain
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.card.v1 import card_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.card.service import SERVICE_NAME, CardServicer
from juki.mesh.db import create_pool
from juki.mesh.errors import JukiError, Reason, SettingsError, passed_on
from juki.mesh.methods import Method, OperatorProof
from juki.mesh.operator import OperatorVerifier, load_passwords
from juki.mesh.server import ServiceBinding
from juki.mesh.settings import ServiceSettings
from juki.mesh.tls import Peer, secure_channel

log = logging.getLogger(__name__)


class CardApp:
    """Pool, clock, operator proofs and channels to the municipal CSs and the access log."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        try:
            self.clock = domain.parse_clock(settings.clock)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        self.pool: asyncpg.Pool | None = None
        self._operators: OperatorVerifier | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def operators(self) -> OperatorVerifier:
        assert self._operators is not None, "not started"
        return self._operators

    def db(self) -> asyncpg.Pool:
        assert self.pool is not None, "not started"
        return self.pool

    def today(self) -> dt.date:
        return self.clock.today()

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = secure_channel(address, self.settings.tls)
        return self._channels[address]

    def municipal(self, code: str) -> municipal_pb2_grpc.MunicipalServiceStub:
        address = self.settings.peers.municipal.get(code)
        if address is None:
            raise JukiError(Reason.DEPENDENCY_UNAVAILABLE, f"municipality {code} is not reachable from this mesh",
                            metadata={"municipality_code": code})
        return municipal_pb2_grpc.MunicipalServiceStub(self._channel(address))

    async def entry(self, municipality_code: str, resident_code: str, purpose: str,
                    requesting: str = "") -> municipal_pb2.ResidentEntry:
        try:
            response = await self.municipal(municipality_code).GetResidentEntry(
                municipal_pb2.GetResidentEntryRequest(
                    resident_code=resident_code, requesting_municipality_code=requesting, purpose=purpose),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            raise passed_on(error, f"the municipal CS of {municipality_code}") from None
        entry: municipal_pb2.ResidentEntry = response.entry
        return entry

    async def locate(self, resident_code: str, purpose: str) -> municipal_pb2.ResidentEntry:
        """Find a resident's current entry by asking the municipal CSs of the mesh (home municipality)."""
        codes = list(self.settings.peers.municipal)
        results = await asyncio.gather(*[self.entry(c, resident_code, purpose) for c in codes],
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, municipal_pb2.ResidentEntry) and result.status == common_pb2.RESIDENT_STATUS_CURRENT:
                return result
        raise JukiError(Reason.RESIDENT_NOT_FOUND, "no municipality of the network registers this resident now")

    async def record_change(self, municipality_code: str, request: municipal_pb2.RecordChangeRequest
                            ) -> municipal_pb2.RecordChangeResponse:
        try:
            response: municipal_pb2.RecordChangeResponse = await self.municipal(municipality_code).RecordChange(
                request, timeout=20)
        except grpc.aio.AioRpcError as error:
            raise passed_on(error, f"the municipal CS of {municipality_code}") from None
        return response

    async def log_provision(self, record: accesslog_pb2.ProvisionRecord) -> None:
        """Durably log a provision, or refuse to provide (ACCESS_LOG_UNAVAILABLE)."""
        address = self.settings.peers.accesslog
        if not address:
            raise JukiError(Reason.ACCESS_LOG_UNAVAILABLE, "no access log is configured")
        stub = accesslog_pb2_grpc.AccessLogServiceStub(self._channel(address))
        try:
            await stub.Append(accesslog_pb2.AppendRequest(batch_id=str(uuid.uuid4()), records=[record]), timeout=10)
        except grpc.aio.AioRpcError as error:
            raise JukiError(Reason.ACCESS_LOG_UNAVAILABLE, f"the access log refused: {error.code().name}") from None

    async def start(self) -> Sequence[ServiceBinding]:
        self.pool = await create_pool(self.settings.database, self.settings.instance)
        self._operators = OperatorVerifier(
            self.settings.tls, self.pool,
            passwords=load_passwords(self.settings.operator_passwords_file),
        )
        # The counter's acts need the operator's proof on every call; a municipality's own system (the CS)
        # may revoke or change a PIN on its certificate. A wide-area copy verifies a proof whenever one is
        # attached, and requires one for a photo-ID check (wide_area.py).
        counter = Method(frozenset({"operator"}), OperatorProof.REQUIRED)
        return [
            ServiceBinding(
                name=SERVICE_NAME,
                add_to_server=card_pb2_grpc.add_CardServiceServicer_to_server,
                servicer=CardServicer(self),
                access={
                    "IssueCard": counter,
                    "VerifyPin": Method(frozenset({"operator", "municipality", "service"})),
                    "ChangePin": Method(frozenset({"operator", "municipality"})),
                    "UnlockCard": counter,
                    "SuspendCard": counter,
                    "ReleaseSuspension": counter,
                    "RevokeCard": Method(frozenset({"operator", "municipality"}), OperatorProof.FROM_OPERATORS),
                    "GetCardStatus": Method(frozenset({"operator", "municipality", "service"})),
                    "RequestWideAreaCopy": Method(frozenset({"operator"}), OperatorProof.WHEN_PRESENT),
                    "FileSpecialMoveOut": counter,
                    "SpecialMoveIn": counter,
                },
            )
        ]

    async def stop(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def on_refusal(self, peer: Peer | None, method: str, error: JukiError) -> None:
        log.warning("refused %s to %s: %s", method, peer.spiffe_id if peer else "unknown peer", error.reason.name)


def create(settings: ServiceSettings) -> CardApp:
    """Entry point used by ``juki serve card``."""
    return CardApp(settings)
