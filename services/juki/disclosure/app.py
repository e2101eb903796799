"""Entry point of the disclosure service (本人開示): ``juki serve disclosure``.

Peers: the national intake (record and history), the access log (provisions, integrity, and the
record of each disclosure) and the card service (card and PIN). Settings: JUKI_NATIONAL_INTAKE_ADDRESS,
JUKI_ACCESSLOG_ADDRESS, JUKI_CARD_ADDRESS (optional: without it only counter disclosures work),
JUKI_OPERATOR_PASSWORDS_FILE (counter operators' password hashes; without it no password is checked).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import grpc

from juki._gen.juki.accesslog.v1 import accesslog_pb2_grpc
from juki._gen.juki.card.v1 import card_pb2_grpc
from juki._gen.juki.disclosure.v1 import disclosure_pb2_grpc
from juki._gen.juki.intake.v1 import intake_pb2_grpc
from juki.disclosure.service import DisclosureServicer
from juki.domain.policy import Policy
from juki.mesh import db
from juki.mesh.methods import Method, OperatorProof
from juki.mesh.operator import OperatorVerifier, load_passwords
from juki.mesh.server import ServiceBinding
from juki.mesh.settings import ServiceSettings
from juki.mesh.tls import secure_channel

SERVICE_NAME = "juki.disclosure.v1.DisclosureService"
# Residents hold no mesh certificate: they come through a counter terminal (operator), their
# municipality's or prefecture's systems, or a kiosk service; the proof in the request says who they are.
# A counter disclosure carries the counter operator's proof (the oneof ``proof``); a card disclosure none.
ACCESS = {"GetDisclosure": Method(frozenset({"operator", "municipality", "prefecture", "service"}),
                                  OperatorProof.WHEN_PRESENT, proof_field="counter_operator")}


class DisclosureApp:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.national = settings.peers.require("national_intake")
        self.accesslog = settings.peers.require("accesslog")
        self.card = settings.peers.card
        self.pool: asyncpg.Pool | None = None
        self.channels: list[grpc.aio.Channel] = []

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = secure_channel(address, self.settings.tls)
        self.channels.append(channel)
        return channel

    async def start(self) -> Sequence[ServiceBinding]:
        self.pool = await db.create_pool(self.settings.database, self.settings.instance)
        servicer = DisclosureServicer(
            intake=intake_pb2_grpc.IntakeServiceStub(self._channel(self.national)),
            accesslog=accesslog_pb2_grpc.AccessLogServiceStub(self._channel(self.accesslog)),
            card=card_pb2_grpc.CardServiceStub(self._channel(self.card)) if self.card else None,
            operators=OperatorVerifier(
                self.settings.tls, self.pool,
                passwords=load_passwords(self.settings.operator_passwords_file),
            ),
            policy=Policy.load(),
        )
        return [ServiceBinding(SERVICE_NAME, disclosure_pb2_grpc.add_DisclosureServiceServicer_to_server,
                               servicer, ACCESS)]

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        if self.pool is not None:
            await self.pool.close()


def create(settings: ServiceSettings) -> DisclosureApp:
    return DisclosureApp(settings)
