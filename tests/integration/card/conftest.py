"""A small mesh in this process: the access log, the CSs of 中野区 and 横浜市, and the card service."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from juki._gen.juki.card.v1 import card_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.mesh.settings import Peers
from juki.mesh.supervisor import free_port

from tests.conftest import channel_as, running
from tests.integration.municipal.helpers import date, sign

NAKANO, YOKOHAMA = "131148", "141003"
RECORD = "/juki.municipal.v1.MunicipalService/RecordChange"


@dataclass
class CardMesh:
    ca: Any
    card: str
    accesslog: str
    municipal: dict[str, str]
    card_app: Any
    channels: list[grpc.aio.Channel]

    def set_today(self, day: str) -> None:
        self.card_app.clock.set(dt.date.fromisoformat(day))

    def _channel(self, kind: str, name: str, address: str) -> grpc.aio.Channel:
        channel = channel_as(self.ca, kind, name, address)
        self.channels.append(channel)
        return channel

    def cards(self, kind: str = "operator", name: str = "demo-operator") -> card_pb2_grpc.CardServiceStub:
        return card_pb2_grpc.CardServiceStub(self._channel(kind, name, self.card))

    def cs(self, code: str, kind: str = "operator", name: str = "demo-operator"
           ) -> municipal_pb2_grpc.MunicipalServiceStub:
        return municipal_pb2_grpc.MunicipalServiceStub(self._channel(kind, name, self.municipal[code]))

    async def register(self, code: str, entry: municipal_pb2.ResidentEntry, occurred: str = "2003-01-06",
                       notified: str | None = None, kind: int = common_pb2.CHANGE_KIND_MOVE_IN) -> str:
        """Register a resident at a CS as the counter would; return the resident code."""
        request = municipal_pb2.RecordChangeRequest(
            change_kind=kind, entry=entry, occurred_on=date(occurred),  # type: ignore[arg-type]
            notified_on=date(notified or occurred),
        )
        sign(self.ca, request, RECORD)
        response = await self.cs(code).RecordChange(request)
        return str(response.resident_code)

    async def entry(self, code: str, resident_code: str) -> municipal_pb2.ResidentEntry:
        response = await self.cs(code).GetResidentEntry(
            municipal_pb2.GetResidentEntryRequest(resident_code=resident_code))
        return response.entry


@pytest.fixture
async def mesh(ca: Any, settings_factory: Any) -> AsyncIterator[CardMesh]:
    from juki.accesslog.app import create as create_accesslog
    from juki.card.app import create as create_card
    from juki.municipal.app import create as create_municipal

    ports = {name: free_port() for name in ("accesslog", "card", NAKANO, YOKOHAMA)}
    address = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    peers = Peers(accesslog=address["accesslog"], card=address["card"],
                  municipal={NAKANO: address[NAKANO], YOKOHAMA: address[YOKOHAMA]})
    accesslog = settings_factory("accesslog", "accesslog", ("service", "accesslog"),
                                 listen=address["accesslog"], peers=peers)
    card = settings_factory("card", "card", ("service", "card"), listen=address["card"], peers=peers,
                            clock="2010-01-04")
    municipals = [
        settings_factory("municipal", f"municipal-{code}", ("municipality", code), municipality=code,
                         listen=address[code], peers=peers)
        for code in (NAKANO, YOKOHAMA)
    ]
    card_app = create_card(card)
    channels: list[grpc.aio.Channel] = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running(accesslog, create_accesslog(accesslog)))
        for settings in municipals:
            await stack.enter_async_context(running(settings, create_municipal(settings)))
        await stack.enter_async_context(running(card, card_app))
        yield CardMesh(ca, address["card"], address["accesslog"],
                       {NAKANO: address[NAKANO], YOKOHAMA: address[YOKOHAMA]}, card_app, channels)
        for channel in channels:
            await channel.close()
