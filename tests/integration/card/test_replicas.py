"""Two card replicas on one database: the PIN counter is exact (3 wrong PINs lock the card, not 6)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import grpc
from juki._gen.juki.card.v1 import card_pb2, card_pb2_grpc
from juki.mesh.supervisor import free_port

from tests.conftest import channel_as, running
from tests.integration.card.conftest import CardMesh
from tests.integration.card.test_lifecycle import issue, resident
from tests.integration.municipal.helpers import reason_of


async def test_wrong_pins_sent_to_two_replicas_at_once_lock_the_card_after_three(
        mesh: CardMesh, settings_factory: Any) -> None:
    from juki.card.app import create as create_card

    first_settings = mesh.card_app.settings
    second = replace(first_settings, listen=f"127.0.0.1:{free_port()}")
    second_app = create_card(second)
    async with running(second, second_app) as second_address:
        second_app.clock.set(mesh.card_app.clock.today())
        card = await issue(mesh, await resident(mesh, "二重"))
        stubs = [card_pb2_grpc.CardServiceStub(channel_as(mesh.ca, "operator", "demo-operator", address))
                 for address in (mesh.card, second_address)]

        async def wrong(stub: card_pb2_grpc.CardServiceStub) -> str:
            try:
                reply = await stub.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="9999"))
            except grpc.aio.AioRpcError as error:
                return reason_of(error)
            return f"remaining {reply.remaining_attempts} {card_pb2.CardState.Name(reply.state)}"

        answers = await asyncio.gather(*(wrong(stubs[i % 2]) for i in range(6)))
    counted = sorted(a for a in answers if a.startswith("remaining"))
    # Exactly three wrong PINs are counted, whichever replica took them; the rest meet a locked card.
    assert counted == ["remaining 0 CARD_STATE_LOCKED", "remaining 1 CARD_STATE_ACTIVE",
                       "remaining 2 CARD_STATE_ACTIVE"], answers
    assert sorted(a for a in answers if not a.startswith("remaining")) == ["CARD_LOCKED"] * 3, answers
    status = await mesh.cards().GetCardStatus(card_pb2.GetCardStatusRequest(card_number=card.card_number))
    assert status.card.state == card_pb2.CARD_STATE_LOCKED
