"""Entry point of the notification intake (``juki serve intake --tier prefecture|national``)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from juki._gen.juki.intake.v1 import intake_pb2_grpc
from juki.intake.gauges import IntakeGauges
from juki.intake.relay import Relay
from juki.intake.service import IntakeServicer
from juki.intake.store import Store
from juki.mesh import db
from juki.mesh.errors import SettingsError
from juki.mesh.leader import LeaderLease
from juki.mesh.methods import Method, OperatorProof
from juki.mesh.operator import OperatorVerifier, load_passwords
from juki.mesh.server import ServiceBinding
from juki.mesh.settings import ServiceSettings

SERVICE_NAME = "juki.intake.v1.IntakeService"
_READERS = frozenset({"service", "operator"})


def access(tier: str) -> dict[str, Method]:
    """The method table of a tier: who may call what (deny by default, every method listed).

    Finer checks (a municipality only for itself, a prefecture only for its municipalities) are made
    in the servicer, where the request is known. An operator who changes a connection state signs the
    change; a prefecture passing on its own operator's change acts on its certificate.
    """
    senders = frozenset({"municipality", "operator"}) if tier == "prefecture" else frozenset({"prefecture", "operator"})
    methods: dict[str, Method | frozenset[str]] = {
        "SubmitNotifications": senders,
        "StreamNotifications": senders,
        "BulkLoad": senders,
        # A load's progress: only its sender (the municipality, or its prefecture at the national tier).
        "GetBulkLoad": frozenset({"municipality"}) if tier == "prefecture" else frozenset({"prefecture"}),
        "GetSequenceState": frozenset({"municipality", "prefecture", "operator"}),
        "SetConnectionState": Method(
            frozenset({"operator"}) if tier == "prefecture" else frozenset({"operator", "prefecture"}),
            OperatorProof.FROM_OPERATORS,
        ),
        "GetIntakeStatus": frozenset({"operator", "prefecture", "municipality"}),
        "GetResident": _READERS,
        "ListResidentHistory": _READERS,
    }
    return {name: row if isinstance(row, Method) else Method(row) for name, row in methods.items()}


class IntakeApp:
    """One intake node; at the prefecture tier it also runs the relay to the national intake."""

    def __init__(self, settings: ServiceSettings) -> None:
        if settings.tier not in ("prefecture", "national"):
            raise SettingsError("intake needs tier prefecture or national")
        if settings.tier == "prefecture" and not settings.prefecture:
            raise SettingsError("a prefecture intake needs its prefecture code")
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self.relay: Relay | None = None
        self.gauges: IntakeGauges | None = None
        self.servicer: IntakeServicer | None = None

    async def start(self) -> Sequence[ServiceBinding]:
        settings = self.settings
        self.pool = await db.create_pool(settings.database, settings.instance)
        prefecture = settings.tier == "prefecture"
        store = Store(self.pool, relay=prefecture)
        if prefecture:
            target = settings.peers.require("national_intake")
            self.relay = Relay(store, target, settings.tls, LeaderLease(settings.database, f"{settings.instance}:relay"),
                               prefecture=settings.prefecture or "")
            self.relay.start()
            # Connection state and relay backlog are a prefecture's (municipalities connect to it).
            self.gauges = IntakeGauges(store, settings.prefecture or "")
            self.gauges.start()
        self.servicer = IntakeServicer(
            settings, store, OperatorVerifier(
                settings.tls, self.pool, passwords=load_passwords(settings.operator_passwords_file)
            ),
            on_accepted=self.relay.wake if self.relay else None,
        )
        return [
            ServiceBinding(
                name=SERVICE_NAME,
                add_to_server=intake_pb2_grpc.add_IntakeServiceServicer_to_server,
                servicer=self.servicer,
                access=access(settings.tier or "national"),
            )
        ]

    async def stop(self) -> None:
        if self.gauges is not None:
            await self.gauges.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self.pool is not None:
            await self.pool.close()


def create(settings: ServiceSettings) -> IntakeApp:
    return IntakeApp(settings)
