"""What the card service's caller sees when a municipal CS refuses the card service's own request.

The request the card service sends is its own, not its caller's: a refusal of it is DEPENDENCY_REFUSED
naming the CS, its status and its reason (the rule every service follows, mesh/errors.passed_on), and
input of the caller's that the CS would refuse is checked by the card service first, naming the field.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc
import pytest
from juki._gen.juki.card.v1 import card_pb2, card_pb2_grpc
from juki.mesh.errors import Reason, from_grpc_error
from juki.mesh.supervisor import free_port
from juki.mesh.tls import secure_channel

from tests.conftest import running, tls_for
from tests.integration.card.conftest import NAKANO, CardMesh
from tests.integration.card.test_lifecycle import CARD, issue, resident
from tests.integration.card.test_wide_area_and_moves import file_move_out, move_in
from tests.integration.municipal.helpers import sign


async def test_a_municipal_refusal_of_the_card_service_is_a_refused_dependency(mesh: CardMesh) -> None:
    """A card replica whose identity the CSs do not accept: its caller did nothing wrong."""
    from juki.card.app import create as create_card

    holder = await resident(mesh, "拒否")
    stranger = replace(mesh.card_app.settings, listen=f"127.0.0.1:{free_port()}",
                       tls=tls_for(mesh.ca, "service", "card-unlisted"))
    app = create_card(stranger)
    async with running(stranger, app) as address:
        mesh.set_today("2015-04-01")
        app.clock.set(mesh.card_app.clock.today())  # before 住基カード issuance ended
        request = sign(mesh.ca, card_pb2.IssueCardRequest(
            resident_code=holder, card_type=card_pb2.CARD_TYPE_A, pin="1234", municipality_code=NAKANO,
        ), CARD + "IssueCard")
        async with secure_channel(address, tls_for(mesh.ca, "operator", "demo-operator")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await card_pb2_grpc.CardServiceStub(channel).IssueCard(request)
    remote = from_grpc_error(refused.value)
    assert remote.code is grpc.StatusCode.FAILED_PRECONDITION
    assert remote.reason is Reason.DEPENDENCY_REFUSED, remote
    assert remote.metadata == {"dependency": f"the municipal CS of {NAKANO}", "dependency_status": "PERMISSION_DENIED",
                               "dependency_reason": "PEER_NOT_AUTHORISED"}


async def test_a_street_the_register_cannot_store_is_the_callers_field(mesh: CardMesh) -> None:
    holder = await resident(mesh, "街路")
    mesh.set_today("2015-04-01")
    card = await issue(mesh, holder)
    mesh.set_today("2024-04-01")
    await file_move_out(mesh, card, "2024-04-01")
    request: Any = move_in(mesh, card, "2024-04-01")
    request.street = "中区港町1丁目\x071番地"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.cards().SpecialMoveIn(sign(mesh.ca, request, CARD + "SpecialMoveIn"))
    remote = from_grpc_error(refused.value)
    assert remote.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [violation.field for violation in remote.violations] == ["street"], remote.violations
    # Nothing was recorded: the same move-in with a good street still goes through.
    moved = await mesh.cards().SpecialMoveIn(move_in(mesh, card, "2024-04-01"))
    assert moved.address.street == "中区港町1丁目1番地"
