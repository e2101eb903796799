"""A special move from 中野区 (東京都) to 横浜市 (神奈川県) over the whole real path: both registers and the
national view end consistent."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from juki._gen.juki.card.v1 import card_pb2, card_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.intake import app as intake_app
from juki.mesh.settings import Peers
from juki.mesh.supervisor import free_port

from tests.conftest import channel_as, forget_municipality, running
from tests.integration.municipal.helpers import date, person, sign

pytestmark = pytest.mark.timeout(180)
NAKANO, YOKOHAMA = "131148", "141003"
CARD = "/juki.card.v1.CardService/"


@pytest.fixture
async def whole(settings_factory: Any, database: Any) -> AsyncIterator[dict[str, Any]]:
    await forget_municipality(database, NAKANO)
    await forget_municipality(database, YOKOHAMA)
    from juki.accesslog.app import create as create_accesslog
    from juki.card.app import create as create_card
    from juki.municipal.app import create as create_municipal

    names = ("accesslog", "card", NAKANO, YOKOHAMA)
    address = {name: f"127.0.0.1:{free_port()}" for name in names}
    async with contextlib.AsyncExitStack() as stack:
        national = settings_factory("intake", "intake-national", ("service", "intake-national"), tier="national")
        address["national"] = await stack.enter_async_context(running(national, intake_app.create(national)))
        for prefecture in ("13", "14"):
            settings = settings_factory("intake", f"intake-prefecture-{prefecture}", ("prefecture", prefecture),
                                        tier="prefecture", prefecture=prefecture,
                                        peers=Peers(national_intake=address["national"]))
            address[prefecture] = await stack.enter_async_context(running(settings, intake_app.create(settings)))
        municipal_peers = {NAKANO: address[NAKANO], YOKOHAMA: address[YOKOHAMA]}
        accesslog = settings_factory("accesslog", "accesslog", ("service", "accesslog"), listen=address["accesslog"])
        await stack.enter_async_context(running(accesslog, create_accesslog(accesslog)))
        for code in (NAKANO, YOKOHAMA):
            settings = settings_factory(
                "municipal", f"municipal-{code}", ("municipality", code), municipality=code, listen=address[code],
                peers=Peers(prefecture_intake=address[code[:2]], card=address["card"]))
            await stack.enter_async_context(running(settings, create_municipal(settings)))
        card = settings_factory("card", "card", ("service", "card"), listen=address["card"], clock="2015-04-01",
                                peers=Peers(accesslog=address["accesslog"], municipal=municipal_peers))
        card_app = create_card(card)
        await stack.enter_async_context(running(card, card_app))
        yield {"address": address, "card_app": card_app}


async def test_special_move_across_prefectures_ends_consistent_everywhere(ca: Any, whole: dict[str, Any]) -> None:
    from tests.integration.municipal.test_to_national import at_national, eventually

    address, card_app = whole["address"], whole["card_app"]
    async with contextlib.AsyncExitStack() as stack:
        def open_(kind: str, name: str, where: str) -> Any:
            return stack.enter_async_context(channel_as(ca, kind, name, where))

        nakano = municipal_pb2_grpc.MunicipalServiceStub(await open_("operator", "demo-operator", address[NAKANO]))
        yokohama = municipal_pb2_grpc.MunicipalServiceStub(await open_("operator", "demo-operator", address[YOKOHAMA]))
        cards = card_pb2_grpc.CardServiceStub(await open_("operator", "demo-operator", address["card"]))
        entry_request = municipal_pb2.RecordChangeRequest(
            change_kind=common_pb2.CHANGE_KIND_MOVE_IN, entry=person(given="越境"), occurred_on=date("2010-01-04"),
            notified_on=date("2010-01-04"))
        holder = (await nakano.RecordChange(sign(ca, entry_request,
                                                 "/juki.municipal.v1.MunicipalService/RecordChange"))).resident_code
        issued = await cards.IssueCard(sign(ca, card_pb2.IssueCardRequest(
            resident_code=holder, card_type=card_pb2.CARD_TYPE_A, pin="1357", municipality_code=NAKANO),
            CARD + "IssueCard"))
        card_app.clock.set(dt.date(2024, 4, 1))
        await cards.FileSpecialMoveOut(sign(ca, card_pb2.FileSpecialMoveOutRequest(
            card_number=issued.card.card_number, pin="1357", destination_municipality_code=YOKOHAMA,
            planned_move_on=date("2024-04-01")), CARD + "FileSpecialMoveOut"))
        card_app.clock.set(dt.date(2024, 4, 15))
        await cards.SpecialMoveIn(sign(ca, card_pb2.SpecialMoveInRequest(
            card_number=issued.card.card_number, pin="1357", municipality_code=YOKOHAMA, street="中区港町1丁目1番地",
            moved_on=date("2024-04-10")), CARD + "SpecialMoveIn"))

        async def settled() -> bool:
            record = await at_national(ca, address["national"], holder)
            return record is not None and record.address.municipality_code == YOKOHAMA

        await eventually(settled, timeout=60)
        record = await at_national(ca, address["national"], holder)
        assert record is not None and record.status == common_pb2.RESIDENT_STATUS_CURRENT
        assert record.last_change_kind == common_pb2.CHANGE_KIND_SPECIAL_MOVE_IN
        old = (await nakano.GetResidentEntry(municipal_pb2.GetResidentEntryRequest(resident_code=holder))).entry
        new = (await yokohama.GetResidentEntry(municipal_pb2.GetResidentEntryRequest(resident_code=holder))).entry
        assert old.status == common_pb2.RESIDENT_STATUS_MOVED_OUT and new.status == common_pb2.RESIDENT_STATUS_CURRENT
        tokyo = intake_pb2_grpc.IntakeServiceStub(await open_("service", "lookup", address["13"]))
        kept = (await tokyo.GetResident(intake_pb2.GetResidentRequest(resident_code=holder))).record
        assert kept.status == common_pb2.RESIDENT_STATUS_MOVED_OUT
        for stub in (nakano, yokohama):
            status = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
            assert status.pending == 0
