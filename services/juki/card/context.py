"""What the card servicer and the wide-area copy need of the running service, as protocols.

The servicer (service.py) and the wide-area copy (wide_area.py) depend on these, not on CardApp, so the
package's modules import one way only: app -> service -> wide_area -> context.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

import asyncpg

from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2
from juki.card.store import StoredCard
from juki.mesh.operator import OperatorVerifier, VerifiedOperator


class CardBackend(Protocol):
    """The card service's database, clock and peers (implemented by CardApp)."""

    @property
    def operators(self) -> OperatorVerifier: ...

    def db(self) -> asyncpg.Pool: ...

    def today(self) -> dt.date: ...

    async def entry(self, municipality_code: str, resident_code: str, purpose: str,
                    requesting: str = "") -> municipal_pb2.ResidentEntry: ...

    async def locate(self, resident_code: str, purpose: str) -> municipal_pb2.ResidentEntry: ...

    async def record_change(self, municipality_code: str, request: municipal_pb2.RecordChangeRequest
                            ) -> municipal_pb2.RecordChangeResponse: ...

    async def log_provision(self, record: accesslog_pb2.ProvisionRecord) -> None: ...


class CounterChecks(Protocol):
    """The counter's checks of the operator and the card holder (implemented by CardServicer)."""

    @property
    def app(self) -> CardBackend: ...

    async def verify_operator(self, request: Any, *, required: bool = False) -> VerifiedOperator | None: ...

    async def require_pin(self, card_number: str, pin: str, field: str = "pin",
                          card_field: str = "card_number") -> StoredCard: ...
