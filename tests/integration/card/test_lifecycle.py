"""住基カード lifecycle at the dates that matter: issuance window, expiry, PIN lockout, suspension,
release and revocation."""

from __future__ import annotations

import grpc
import pytest
from juki._gen.juki.card.v1 import card_pb2
from juki._gen.juki.common.v1 import common_pb2

from tests.integration.card.conftest import NAKANO, YOKOHAMA, CardMesh
from tests.integration.municipal.helpers import date, person, reason_of, sign, violations_of

CARD = "/juki.card.v1.CardService/"


async def issue(mesh: CardMesh, resident_code: str, *, pin: str = "1234", card_type: int = card_pb2.CARD_TYPE_A,
                municipality: str = NAKANO, photo: bytes = b"", stay_end: str | None = None) -> card_pb2.Card:
    request = card_pb2.IssueCardRequest(
        resident_code=resident_code, card_type=card_type, pin=pin, photo=photo,  # type: ignore[arg-type]
        municipality_code=municipality,
    )
    if stay_end:
        request.period_of_stay_end.CopyFrom(date(stay_end))
    sign(mesh.ca, request, CARD + "IssueCard")
    response = await mesh.cards().IssueCard(request)
    return response.card


async def resident(mesh: CardMesh, given: str = "一郎", code: str = NAKANO) -> str:
    return await mesh.register(code, person(given=given, street="中野四丁目8番1号" if code == NAKANO else "中区港町1丁目1番地"))


async def test_issuance_window_opens_2003_08_25_and_ends_after_2015_12_22(mesh: CardMesh) -> None:
    holder = await resident(mesh, "始")
    mesh.set_today("2003-08-24")
    with pytest.raises(grpc.aio.AioRpcError) as early:
        await issue(mesh, holder)
    assert reason_of(early.value) == "FAILED_PRECONDITION"
    mesh.set_today("2003-08-25")
    first = await issue(mesh, holder)
    assert first.state == card_pb2.CARD_STATE_ACTIVE
    assert (first.expires_on.year, first.expires_on.month, first.expires_on.day) == (2013, 8, 25)

    last = await resident(mesh, "終")
    mesh.set_today("2015-12-23")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await issue(mesh, last)
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(ended.value) == "CARD_ISSUANCE_ENDED"
    mesh.set_today("2015-12-22")
    card = await issue(mesh, last, card_type=card_pb2.CARD_TYPE_B, photo=b"\xff\xd8photo")
    assert card.card_type == card_pb2.CARD_TYPE_B
    assert (card.expires_on.year, card.expires_on.month, card.expires_on.day) == (2025, 12, 22)


async def test_cards_issued_by_the_end_stay_usable_until_they_expire(mesh: CardMesh) -> None:
    holder = await resident(mesh, "最後")
    mesh.set_today("2015-12-22")
    card = await issue(mesh, holder, pin="2468")
    cards = mesh.cards()
    mesh.set_today("2025-12-22")
    ok = await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="2468"))
    assert ok.ok and ok.state == card_pb2.CARD_STATE_ACTIVE
    mesh.set_today("2025-12-23")
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="2468"))
    assert reason_of(expired.value) == "CARD_EXPIRED"
    status = await cards.GetCardStatus(card_pb2.GetCardStatusRequest(card_number=card.card_number))
    assert status.card.state == card_pb2.CARD_STATE_EXPIRED
    mesh.set_today("2016-01-04")  # renewal after the end of issuance is refused too
    with pytest.raises(grpc.aio.AioRpcError) as renewal:
        await issue(mesh, holder)
    assert reason_of(renewal.value) == "CARD_ISSUANCE_ENDED"


async def test_a_foreign_residents_card_ends_with_the_period_of_stay(mesh: CardMesh) -> None:
    entry = person(family="WANG", given="FANG", kind=common_pb2.RESIDENT_KIND_FOREIGN, street="中区港町1丁目1番地")
    entry.name.alphabetic_name = "WANG FANG"
    entry.name.family_name_kana = entry.name.given_name_kana = ""
    holder = await mesh.register(YOKOHAMA, entry, occurred="2013-07-08")
    mesh.set_today("2014-04-01")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await issue(mesh, holder, municipality=YOKOHAMA)
    assert "period_of_stay_end" in violations_of(missing.value)
    card = await issue(mesh, holder, municipality=YOKOHAMA, stay_end="2017-03-31")
    assert (card.expires_on.year, card.expires_on.month, card.expires_on.day) == (2017, 3, 31)
    mesh.set_today("2017-04-01")
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await mesh.cards().VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="1234"))
    assert reason_of(expired.value) == "CARD_EXPIRED"


async def test_three_wrong_pins_lock_and_only_an_operator_in_person_unlocks(mesh: CardMesh) -> None:
    mesh.set_today("2010-01-04")
    card = await issue(mesh, await resident(mesh, "錠"))
    cards = mesh.cards()
    first = await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="0000"))
    assert not first.ok and first.remaining_attempts == 2
    right = await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="1234"))
    assert right.ok and right.remaining_attempts == 3  # a right PIN resets the count
    for left in (2, 1):
        wrong = await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="9999"))
        assert wrong.remaining_attempts == left and wrong.state == card_pb2.CARD_STATE_ACTIVE
    third = await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="9999"))
    assert not third.ok and third.state == card_pb2.CARD_STATE_LOCKED and third.remaining_attempts == 0
    with pytest.raises(grpc.aio.AioRpcError) as locked:
        await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="1234"))
    assert reason_of(locked.value) == "CARD_LOCKED"
    with pytest.raises(grpc.aio.AioRpcError) as by_phone:
        await cards.UnlockCard(card_pb2.UnlockCardRequest(card_number=card.card_number))
    assert reason_of(by_phone.value) == "OPERATOR_PROOF_INVALID"
    with pytest.raises(grpc.aio.AioRpcError) as not_counter:
        await mesh.cards("municipality", NAKANO).UnlockCard(card_pb2.UnlockCardRequest(card_number=card.card_number))
    assert not_counter.value.code() == grpc.StatusCode.PERMISSION_DENIED
    unlock = sign(mesh.ca, card_pb2.UnlockCardRequest(card_number=card.card_number, new_pin="5678"),
                  CARD + "UnlockCard")
    unlocked = await cards.UnlockCard(unlock)
    assert unlocked.card.state == card_pb2.CARD_STATE_ACTIVE and unlocked.card.failed_pin_attempts == 0
    assert (await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="5678"))).ok
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await cards.UnlockCard(sign(mesh.ca, card_pb2.UnlockCardRequest(card_number=card.card_number),
                                    CARD + "UnlockCard"))
    assert reason_of(again.value) == "FAILED_PRECONDITION"


async def test_bad_pins_and_unknown_cards_are_refused_clearly(mesh: CardMesh) -> None:
    cards = mesh.cards()
    with pytest.raises(grpc.aio.AioRpcError) as short:
        await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number="1", pin="12a4"))
    assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations_of(short.value) == ["pin"]
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number="0000000000000000", pin="1234"))
    assert reason_of(unknown.value) == "CARD_NOT_FOUND"
    mesh.set_today("2010-01-04")
    holder = await resident(mesh, "写真")
    with pytest.raises(grpc.aio.AioRpcError) as no_photo:
        await issue(mesh, holder, card_type=card_pb2.CARD_TYPE_B)
    assert violations_of(no_photo.value) == ["photo"]
    with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
        await issue(mesh, holder, municipality=YOKOHAMA)
    assert elsewhere.value.code() == grpc.StatusCode.NOT_FOUND
    await issue(mesh, holder)
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await issue(mesh, holder)
    assert reason_of(twice.value) == "FAILED_PRECONDITION"


async def test_suspension_by_phone_and_release_only_in_person_with_photo_id(mesh: CardMesh) -> None:
    mesh.set_today("2010-01-04")
    card = await issue(mesh, await resident(mesh, "紛失"))
    cards = mesh.cards()
    suspend = card_pb2.SuspendCardRequest(card_number=card.card_number, channel=card_pb2.SUSPENSION_CHANNEL_PHONE,
                                          reason="紛失")
    suspended = await cards.SuspendCard(sign(mesh.ca, suspend, CARD + "SuspendCard"))
    assert suspended.card.state == card_pb2.CARD_STATE_SUSPENDED
    with pytest.raises(grpc.aio.AioRpcError) as blocked:
        await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="1234"))
    assert reason_of(blocked.value) == "CARD_SUSPENDED"
    with pytest.raises(grpc.aio.AioRpcError) as no_id:
        await cards.ReleaseSuspension(sign(mesh.ca, card_pb2.ReleaseSuspensionRequest(card_number=card.card_number),
                                           CARD + "ReleaseSuspension"))
    assert violations_of(no_id.value) == ["identity_document"]
    with pytest.raises(grpc.aio.AioRpcError) as no_operator:
        await cards.ReleaseSuspension(card_pb2.ReleaseSuspensionRequest(card_number=card.card_number,
                                                                         identity_document="passport"))
    assert reason_of(no_operator.value) == "OPERATOR_PROOF_INVALID"
    released = await cards.ReleaseSuspension(sign(mesh.ca, card_pb2.ReleaseSuspensionRequest(
        card_number=card.card_number, identity_document="passport"), CARD + "ReleaseSuspension"))
    assert released.card.state == card_pb2.CARD_STATE_ACTIVE
    assert (await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="1234"))).ok


async def test_a_locked_card_stays_locked_after_suspension_is_released(mesh: CardMesh) -> None:
    mesh.set_today("2010-01-04")
    card = await issue(mesh, await resident(mesh, "二重"))
    cards = mesh.cards()
    for _ in range(3):
        await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="0000"))
    await cards.SuspendCard(sign(mesh.ca, card_pb2.SuspendCardRequest(
        card_number=card.card_number, channel=card_pb2.SUSPENSION_CHANNEL_COUNTER), CARD + "SuspendCard"))
    released = await cards.ReleaseSuspension(sign(mesh.ca, card_pb2.ReleaseSuspensionRequest(
        card_number=card.card_number, identity_document="driving_licence"), CARD + "ReleaseSuspension"))
    assert released.card.state == card_pb2.CARD_STATE_LOCKED


async def test_death_and_code_change_at_the_register_revoke_the_card(mesh: CardMesh) -> None:
    mesh.set_today("2010-01-04")
    deceased = await resident(mesh, "逝去")
    changed = await resident(mesh, "改番")
    first = await issue(mesh, deceased)
    second = await issue(mesh, changed)
    from juki._gen.juki.municipal.v1 import municipal_pb2

    from tests.integration.card.conftest import RECORD

    death = municipal_pb2.RecordChangeRequest(
        change_kind=common_pb2.CHANGE_KIND_DEATH, entry=municipal_pb2.ResidentEntry(resident_code=deceased),
        occurred_on=date("2010-01-05"), notified_on=date("2010-01-06"))
    await mesh.cs(NAKANO).RecordChange(sign(mesh.ca, death, RECORD))
    new_code = municipal_pb2.RecordChangeRequest(
        change_kind=common_pb2.CHANGE_KIND_RESIDENT_CODE_CHANGE,
        entry=municipal_pb2.ResidentEntry(resident_code=changed),
        occurred_on=date("2010-01-05"), notified_on=date("2010-01-05"))
    recorded = await mesh.cs(NAKANO).RecordChange(sign(mesh.ca, new_code, RECORD))
    assert recorded.resident_code != changed
    cards = mesh.cards()
    for card in (first, second):
        status = await cards.GetCardStatus(card_pb2.GetCardStatusRequest(card_number=card.card_number))
        assert status.card.state == card_pb2.CARD_STATE_REVOKED
        with pytest.raises(grpc.aio.AioRpcError) as revoked:
            await cards.VerifyPin(card_pb2.VerifyPinRequest(card_number=card.card_number, pin="1234"))
        assert reason_of(revoked.value) == "CARD_REVOKED"


async def test_revocation_by_operator_and_by_the_home_municipality_only(mesh: CardMesh) -> None:
    mesh.set_today("2010-01-04")
    holder = await resident(mesh, "返納")
    card = await issue(mesh, holder)
    with pytest.raises(grpc.aio.AioRpcError) as foreign_town:
        await mesh.cards("municipality", YOKOHAMA).RevokeCard(
            card_pb2.RevokeCardRequest(resident_code=holder, reason="返納"))
    assert reason_of(foreign_town.value) == "PEER_NOT_AUTHORISED"
    with pytest.raises(grpc.aio.AioRpcError) as no_reason:
        await mesh.cards().RevokeCard(sign(mesh.ca, card_pb2.RevokeCardRequest(card_number=card.card_number),
                                           CARD + "RevokeCard"))
    assert violations_of(no_reason.value) == ["reason"]
    revoked = await mesh.cards().RevokeCard(sign(mesh.ca, card_pb2.RevokeCardRequest(
        card_number=card.card_number, reason="返納"), CARD + "RevokeCard"))
    assert revoked.card.state == card_pb2.CARD_STATE_REVOKED and revoked.revoked == 1
    again = await issue(mesh, holder)  # a revoked card does not block a new one
    assert again.state == card_pb2.CARD_STATE_ACTIVE
