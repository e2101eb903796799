"""住民票の写しの広域交付 and 転入転出の特例 across two prefectures (中野区 13, 横浜市 14)."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.card.v1 import card_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2

from tests.integration.card.conftest import NAKANO, YOKOHAMA, CardMesh
from tests.integration.card.test_lifecycle import issue
from tests.integration.municipal.helpers import date, person, reason_of, sign, violations_of

CARD = "/juki.card.v1.CardService/"


async def family(mesh: CardMesh) -> tuple[str, str, str]:
    """A head of household and a child in 中野区, and a neighbour in another household."""
    head = await mesh.register(NAKANO, person(given="太郎"))
    household = (await mesh.entry(NAKANO, head)).household_id
    child = await mesh.register(NAKANO, person(given="花子", born="2003-01-06", sex=common_pb2.SEX_FEMALE,
                                               household_id=household, relationship="子"),
                                kind=common_pb2.CHANGE_KIND_BIRTH)
    neighbour = await mesh.register(NAKANO, person(family="隣", given="次郎"))
    return head, child, neighbour


def copy_request(card_number: str, pin: str, subject: str = "", **flags: bool) -> card_pb2.RequestWideAreaCopyRequest:
    return card_pb2.RequestWideAreaCopyRequest(
        card_proof=common_pb2.CardProof(card_number=card_number, pin=pin), subject_resident_code=subject,
        issuing_municipality_code=YOKOHAMA, **flags,
    )


async def test_wide_area_copy_with_card_leaves_out_what_was_not_asked_for(mesh: CardMesh) -> None:
    head, child, neighbour = await family(mesh)
    mesh.set_today("2015-04-01")
    card = await issue(mesh, head, pin="4321")
    mesh.set_today("2024-04-01")
    cards = mesh.cards()
    plain = await cards.RequestWideAreaCopy(copy_request(card.card_number, "4321"))
    certificate = plain.certificate
    assert certificate.name.family_name == "中野" and certificate.address.municipality == "中野区"
    assert plain.issued_by == YOKOHAMA and plain.document_number
    assert certificate.household_head == certificate.relationship == ""
    assert certificate.resident_code == certificate.individual_number == ""
    assert not hasattr(certificate, "registered_domicile")  # 本籍 and 筆頭者 have no place on a wide-area copy
    full = await cards.RequestWideAreaCopy(copy_request(
        card.card_number, "4321", child, include_household_head_and_relationship=True, include_resident_code=True,
        include_individual_number=True))
    assert full.certificate.name.given_name == "花子"
    assert full.certificate.household_head == "中野　太郎" and full.certificate.relationship == "子"
    assert full.certificate.resident_code == child and len(full.certificate.individual_number) == 12
    with pytest.raises(grpc.aio.AioRpcError) as other_household:
        await cards.RequestWideAreaCopy(copy_request(card.card_number, "4321", neighbour))
    assert reason_of(other_household.value) == "NOT_SAME_HOUSEHOLD"
    with pytest.raises(grpc.aio.AioRpcError) as wrong_pin:
        await cards.RequestWideAreaCopy(copy_request(card.card_number, "0000"))
    assert reason_of(wrong_pin.value) == "PIN_MISMATCH"
    async with grpc.aio.secure_channel(mesh.accesslog, _disclosure_credentials(mesh)) as channel:
        log = accesslog_pb2_grpc.AccessLogServiceStub(channel)
        provisions = await log.ListProvisions(accesslog_pb2.ListProvisionsRequest(resident_code=child))
    copies = [p.record for p in provisions.provisions if p.record.query_mode == common_pb2.QUERY_MODE_WIDE_AREA_COPY]
    assert len(copies) == 1
    assert copies[0].recipient.endswith(f"/municipality/{YOKOHAMA}")
    assert copies[0].provider.endswith(f"/municipality/{NAKANO}")
    assert common_pb2.FIELD_RESIDENT_CODE in copies[0].fields
    refused = [p.record for p in await provisions_of(mesh, neighbour, include_refused=True)]
    assert [r.outcome for r in refused] == [accesslog_pb2.PROVISION_OUTCOME_REFUSED]
    assert refused[0].refusal_reason == common_pb2.ERROR_REASON_NOT_SAME_HOUSEHOLD and not refused[0].fields


async def provisions_of(mesh: CardMesh, resident_code: str, include_refused: bool = False
                        ) -> list[accesslog_pb2.LoggedProvision]:
    async with grpc.aio.secure_channel(mesh.accesslog, _disclosure_credentials(mesh)) as channel:
        response = await accesslog_pb2_grpc.AccessLogServiceStub(channel).ListProvisions(
            accesslog_pb2.ListProvisionsRequest(resident_code=resident_code, include_refused=include_refused))
    return list(response.provisions)


def _disclosure_credentials(mesh: CardMesh) -> grpc.ChannelCredentials:
    from juki.mesh.tls import channel_credentials

    from tests.conftest import tls_for

    return channel_credentials(tls_for(mesh.ca, "service", "disclosure"))


async def test_wide_area_copy_with_photo_id_needs_an_operator_proof(mesh: CardMesh) -> None:
    head, child, _ = await family(mesh)
    mesh.set_today("2024-04-01")
    request = card_pb2.RequestWideAreaCopyRequest(
        photo_id_check=card_pb2.PhotoIdCheck(applicant_resident_code=child, identity_document="passport"),
        issuing_municipality_code=YOKOHAMA, subject_resident_code=head,
    )
    with pytest.raises(grpc.aio.AioRpcError) as unsigned:
        await mesh.cards().RequestWideAreaCopy(request)
    assert reason_of(unsigned.value) == "OPERATOR_PROOF_INVALID"
    copy = await mesh.cards().RequestWideAreaCopy(sign(mesh.ca, request, CARD + "RequestWideAreaCopy"))
    assert copy.certificate.name.given_name == "太郎"
    no_id = card_pb2.RequestWideAreaCopyRequest(
        photo_id_check=card_pb2.PhotoIdCheck(applicant_resident_code=child, identity_document="library card"),
        issuing_municipality_code=YOKOHAMA)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.cards().RequestWideAreaCopy(sign(mesh.ca, no_id, CARD + "RequestWideAreaCopy"))
    assert violations_of(refused.value) == ["photo_id_check.identity_document"]


async def file_move_out(mesh: CardMesh, card: card_pb2.Card, planned: str, pin: str = "1234"
                        ) -> card_pb2.FileSpecialMoveOutResponse:
    request = card_pb2.FileSpecialMoveOutRequest(card_number=card.card_number, pin=pin,
                                                 destination_municipality_code=YOKOHAMA, planned_move_on=date(planned))
    response: card_pb2.FileSpecialMoveOutResponse = await mesh.cards().FileSpecialMoveOut(
        sign(mesh.ca, request, CARD + "FileSpecialMoveOut"))
    return response


def move_in(mesh: CardMesh, card: card_pb2.Card, moved: str, pin: str = "1234") -> card_pb2.SpecialMoveInRequest:
    return sign(mesh.ca, card_pb2.SpecialMoveInRequest(  # type: ignore[no-any-return]
        card_number=card.card_number, pin=pin, municipality_code=YOKOHAMA, street="中区港町1丁目1番地",
        moved_on=date(moved)), CARD + "SpecialMoveIn")


async def test_special_move_in_on_the_last_day_crosses_prefectures(mesh: CardMesh) -> None:
    holder = await mesh.register(NAKANO, person(given="引越"))
    mesh.set_today("2015-04-01")
    card = await issue(mesh, holder)
    mesh.set_today("2024-04-01")
    filed = await file_move_out(mesh, card, "2024-04-01")
    assert (filed.move_in_deadline.month, filed.move_in_deadline.day) == (5, 1)  # 30 days after the planned date
    assert (await mesh.entry(NAKANO, holder)).status == common_pb2.RESIDENT_STATUS_MOVED_OUT
    mesh.set_today("2024-04-24")  # the 14th day after moving in on 04-10
    moved = await mesh.cards().SpecialMoveIn(move_in(mesh, card, "2024-04-10"))
    assert moved.address.municipality_code == YOKOHAMA and moved.address.prefecture == "神奈川県"
    assert moved.card.state == card_pb2.CARD_STATE_ACTIVE  # continued use after a move (from 2012-07-09)
    new_entry = await mesh.entry(YOKOHAMA, holder)
    assert new_entry.status == common_pb2.RESIDENT_STATUS_CURRENT
    assert new_entry.previous_address.municipality_code == NAKANO
    assert new_entry.registered_domicile == "東京都中野区中野四丁目8番"
    assert (await mesh.entry(NAKANO, holder)).status == common_pb2.RESIDENT_STATUS_MOVED_OUT
    outbox = await mesh.cs(YOKOHAMA).GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
    assert outbox.pending >= 1
    copy = await mesh.cards().RequestWideAreaCopy(copy_request(card.card_number, "1234"))
    assert copy.certificate.address.municipality == "横浜市"  # the card now answers from its new home
    uses = [p.record for p in await provisions_of(mesh, holder) if p.record.purpose == "SPECIAL_MOVE_IN"]
    assert len(uses) == 1 and uses[0].query_mode == common_pb2.QUERY_MODE_CARD_USE
    assert uses[0].provider.endswith(NAKANO) and uses[0].recipient.endswith(YOKOHAMA)


@pytest.mark.parametrize(("moved", "today"), [
    ("2024-04-10", "2024-04-25"),  # the 15th day after moving in (the planned date's limit is 05-01)
    ("2024-04-25", "2024-05-02"),  # the 31st day after the planned date (moved in 7 days before)
], ids=["14-days-after-moving-in", "30-days-after-the-planned-date"])
async def test_special_move_in_a_day_late_is_refused(mesh: CardMesh, moved: str, today: str) -> None:
    holder = await mesh.register(NAKANO, person(given="遅延"))
    mesh.set_today("2015-04-01")
    card = await issue(mesh, holder)
    mesh.set_today("2024-04-01")
    await file_move_out(mesh, card, "2024-04-01")
    mesh.set_today(today)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await mesh.cards().SpecialMoveIn(move_in(mesh, card, moved))
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(late.value) == "SPECIAL_MOVE_IN_EXPIRED"
    with pytest.raises(grpc.aio.AioRpcError) as absent:
        await mesh.entry(YOKOHAMA, holder)
    assert absent.value.code() == grpc.StatusCode.NOT_FOUND


async def test_special_move_in_on_the_30th_day_after_the_planned_date(mesh: CardMesh) -> None:
    """Moved in 6 days before the planned date's limit: that limit, not the 14 days, ends the window."""
    holder = await mesh.register(NAKANO, person(given="月末"))
    mesh.set_today("2015-04-01")
    card = await issue(mesh, holder)
    mesh.set_today("2024-04-01")
    await file_move_out(mesh, card, "2024-04-01")
    mesh.set_today("2024-05-01")
    moved = await mesh.cards().SpecialMoveIn(move_in(mesh, card, "2024-04-25"))
    assert moved.address.municipality_code == YOKOHAMA


@pytest.mark.parametrize(("planned", "accepted"), [
    ("2024-04-15", True), ("2024-04-16", False),  # in advance: from 14 days before the planned date
    ("2024-03-18", True), ("2024-03-17", False),  # after the move: within 14 days of it
])
async def test_special_move_out_is_accepted_from_14_days_before_to_14_days_after_the_move(
    mesh: CardMesh, planned: str, accepted: bool
) -> None:
    holder = await mesh.register(NAKANO, person(given="届出"))
    mesh.set_today("2015-04-01")
    card = await issue(mesh, holder)
    mesh.set_today("2024-04-01")
    if accepted:
        filed = await file_move_out(mesh, card, planned)
        assert filed.move_in_deadline == date(str(dt.date.fromisoformat(planned) + dt.timedelta(days=30)))
        return
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await file_move_out(mesh, card, planned)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(refused.value) == ["planned_move_on"]
    assert (await mesh.entry(NAKANO, holder)).status == common_pb2.RESIDENT_STATUS_CURRENT


@pytest.mark.parametrize(("today", "continued"), [("2012-07-08", False), ("2012-07-09", True)])
async def test_card_use_after_a_move_starts_2012_07_09(mesh: CardMesh, today: str, continued: bool) -> None:
    holder = await mesh.register(NAKANO, person(given="継続" if continued else "失効"))
    mesh.set_today("2010-01-04")
    card = await issue(mesh, holder)
    mesh.set_today(today)
    await file_move_out(mesh, card, today)
    moved = await mesh.cards().SpecialMoveIn(move_in(mesh, card, today))
    expected = card_pb2.CARD_STATE_ACTIVE if continued else card_pb2.CARD_STATE_REVOKED
    assert moved.card.state == expected
    assert (await mesh.entry(YOKOHAMA, holder)).status == common_pb2.RESIDENT_STATUS_CURRENT


async def test_special_move_in_needs_the_filed_destination_and_the_pin(mesh: CardMesh) -> None:
    holder = await mesh.register(NAKANO, person(given="確認"))
    mesh.set_today("2015-04-01")
    card = await issue(mesh, holder)
    mesh.set_today("2024-04-01")
    with pytest.raises(grpc.aio.AioRpcError) as nothing_filed:
        await mesh.cards().SpecialMoveIn(move_in(mesh, card, "2024-04-01"))
    assert reason_of(nothing_filed.value) == "FAILED_PRECONDITION"
    await file_move_out(mesh, card, "2024-04-01")
    wrong_town = move_in(mesh, card, "2024-04-01")
    wrong_town.municipality_code = "131130"
    with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
        await mesh.cards().SpecialMoveIn(sign(mesh.ca, wrong_town, CARD + "SpecialMoveIn"))
    assert violations_of(elsewhere.value) == ["municipality_code"]
    with pytest.raises(grpc.aio.AioRpcError) as wrong_pin:
        await mesh.cards().SpecialMoveIn(move_in(mesh, card, "2024-04-01", pin="9999"))
    assert reason_of(wrong_pin.value) == "PIN_MISMATCH"


@pytest.mark.parametrize(("moved_on", "follows"), [("2012-07-08", False), ("2012-07-09", True)])
async def test_after_an_ordinary_move_the_card_follows_from_2012_07_09(mesh: CardMesh, moved_on: str,
                                                                         follows: bool) -> None:
    holder = await mesh.register(NAKANO, person(given="普通" if follows else "旧制"))
    mesh.set_today("2010-01-04")
    card = await issue(mesh, holder)
    left = await mesh.entry(NAKANO, holder)
    out = municipal_pb2.RecordChangeRequest(
        change_kind=common_pb2.CHANGE_KIND_MOVE_OUT, entry=municipal_pb2.ResidentEntry(resident_code=holder),
        occurred_on=date(moved_on), notified_on=date(moved_on), next_municipality_code=YOKOHAMA)
    await mesh.cs(NAKANO).RecordChange(sign(mesh.ca, out, "/juki.municipal.v1.MunicipalService/RecordChange"))
    arriving = municipal_pb2.ResidentEntry()
    arriving.CopyFrom(left)
    arriving.household_id = arriving.relationship = ""
    arriving.address.CopyFrom(common_pb2.Address(municipality_code=YOKOHAMA, street="中区山下町1番地"))
    into = municipal_pb2.RecordChangeRequest(
        change_kind=common_pb2.CHANGE_KIND_MOVE_IN, entry=arriving, occurred_on=date(moved_on),
        notified_on=date(moved_on), previous_municipality_code=NAKANO)
    await mesh.cs(YOKOHAMA).RecordChange(sign(mesh.ca, into, "/juki.municipal.v1.MunicipalService/RecordChange"))
    mesh.set_today("2012-08-01")
    if follows:
        copy = await mesh.cards().RequestWideAreaCopy(copy_request(card.card_number, "1234"))
        assert copy.certificate.address.municipality == "横浜市"
    else:
        with pytest.raises(grpc.aio.AioRpcError) as lapsed:
            await mesh.cards().RequestWideAreaCopy(copy_request(card.card_number, "1234"))
        assert reason_of(lapsed.value) == "CARD_REVOKED"
        status = await mesh.cards().GetCardStatus(card_pb2.GetCardStatusRequest(card_number=card.card_number))
        assert status.card.state == card_pb2.CARD_STATE_REVOKED
