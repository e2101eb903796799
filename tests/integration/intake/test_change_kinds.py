"""Every change kind, for Japanese and foreign residents, through a prefecture to the national store."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import pytest
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2

from tests.integration.intake.helpers import (
    NAKANO,
    YOKOHAMA,
    Mesh,
    intake_mesh,
    national_record,
    notification,
)

pytestmark = pytest.mark.timeout(120)

OUTCOME = intake_pb2.NotificationOutcome
K = common_pb2


@pytest.fixture
async def mesh(ca: Any, settings_factory: Any) -> Any:
    async with intake_mesh(ca, settings_factory) as running_mesh:
        yield running_mesh


async def submit(mesh: Mesh, *messages: intake_pb2.Notification) -> list[intake_pb2.NotificationResult]:
    stub = mesh.as_municipality(messages[0].municipality_code)
    response = await stub.SubmitNotifications(intake_pb2.SubmitNotificationsRequest(notifications=list(messages)))
    for result in response.results:
        assert result.outcome == OUTCOME.NOTIFICATION_OUTCOME_ACCEPTED, result
    return list(response.results)


async def test_every_kind_of_change(mesh: Mesh) -> None:
    born = dt.date(1990, 4, 1)
    entry = notification(NAKANO, kind=K.CHANGE_KIND_EX_OFFICIO_ENTRY, occurred=dt.date(2004, 1, 5), born=born)
    code = entry.resident_code
    same = {"code": code, "born": born}
    await submit(
        mesh, entry,
        notification(NAKANO, kind=K.CHANGE_KIND_ADDRESS_CHANGE, occurred=dt.date(2005, 2, 1), street="中野一丁目1番1号",
                     **same),
        notification(NAKANO, kind=K.CHANGE_KIND_NAME_CHANGE, occurred=dt.date(2006, 3, 1), family="高円寺",
                     street="中野一丁目1番1号", **same),
        notification(NAKANO, kind=K.CHANGE_KIND_EX_OFFICIO_CORRECTION, occurred=dt.date(2007, 3, 1), family="高円寺",
                     given="花江", street="中野一丁目1番1号", **same),
        notification(NAKANO, kind=K.CHANGE_KIND_MOVE_OUT, occurred=dt.date(2008, 5, 1), family="高円寺", given="花江",
                     street="中野一丁目1番1号", next_municipality_code=YOKOHAMA, **same),
    )
    await submit(mesh, notification(YOKOHAMA, kind=K.CHANGE_KIND_SPECIAL_MOVE_IN, occurred=dt.date(2008, 5, 10),
                                    family="高円寺", given="花江", street="中区1番地",
                                    previous_municipality_code=NAKANO, **same))
    moved = await national_record(mesh, code)
    assert moved.address.municipality_code in (NAKANO, YOKOHAMA)  # the relays race; both end in 横浜市
    await submit(mesh, notification(YOKOHAMA, kind=K.CHANGE_KIND_DEATH, occurred=dt.date(2020, 1, 1),
                                    family="高円寺", given="花江", street="中区1番地", **same))
    for _ in range(200):
        record = await national_record(mesh, code)
        if record.status == K.RESIDENT_STATUS_DECEASED and record.version == 7:
            break
        await asyncio.sleep(0.05)
    assert record.status == K.RESIDENT_STATUS_DECEASED
    assert record.address.municipality_code == YOKOHAMA
    assert (record.name.family_name, record.name.given_name) == ("高円寺", "花江")
    history = await mesh.national_as("service", "disclosure").ListResidentHistory(
        intake_pb2.ListResidentHistoryRequest(resident_code=code, page_size=4))
    assert len(history.versions) == 4 and history.next_page_token
    rest = await mesh.national_as("service", "disclosure").ListResidentHistory(
        intake_pb2.ListResidentHistoryRequest(resident_code=code, page_token=history.next_page_token))
    assert len(rest.versions) == 3 and not rest.next_page_token
    # Keyset pages: one version at a time gives the same history, in the same order, as one page.
    reader = mesh.national_as("service", "disclosure")
    whole = await reader.ListResidentHistory(intake_pb2.ListResidentHistoryRequest(resident_code=code))
    walked: list[intake_pb2.ResidentVersion] = []
    token = ""
    while True:
        page = await reader.ListResidentHistory(
            intake_pb2.ListResidentHistoryRequest(resident_code=code, page_size=1, page_token=token))
        walked.extend(page.versions)
        token = page.next_page_token
        if not token:
            break
        assert not token.isdigit()  # opaque, not an offset
    assert walked == list(whole.versions) and len(walked) == 7
    # A client holding an offset token of earlier versions keeps going where it was.
    legacy = await reader.ListResidentHistory(intake_pb2.ListResidentHistoryRequest(resident_code=code, page_token="4"))
    assert list(legacy.versions) == list(rest.versions) and not legacy.next_page_token
    # A token is for the list it came from, and only tokens this service made are taken.
    other = notification(NAKANO, kind=K.CHANGE_KIND_EX_OFFICIO_ENTRY, occurred=dt.date(2004, 1, 5))
    for bad_token, why in ((history.next_page_token, "another list"), ("bm90IGEgdG9rZW4", "not a page token")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await reader.ListResidentHistory(intake_pb2.ListResidentHistoryRequest(
                resident_code=other.resident_code if why == "another list" else code, page_token=bad_token))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert why in (refused.value.details() or "")
    assert other.resident_code != code


async def test_foreign_residents_from_2013_07_08(mesh: Mesh) -> None:
    foreign = {"resident_kind": K.RESIDENT_KIND_FOREIGN}
    early = notification(NAKANO, kind=K.CHANGE_KIND_MOVE_IN, occurred=dt.date(2013, 7, 1), family="SMITH",
                         given="JOHN", **foreign)
    early.name.alphabetic_name = "SMITH JOHN"
    response = await mesh.as_municipality(NAKANO).SubmitNotifications(
        intake_pb2.SubmitNotificationsRequest(notifications=[early]))
    assert response.results[0].outcome == OUTCOME.NOTIFICATION_OUTCOME_REJECTED
    assert "resident_kind" in {v.field for v in response.results[0].violations}

    arrival = notification(NAKANO, kind=K.CHANGE_KIND_MOVE_IN, occurred=dt.date(2014, 4, 1), family="SMITH",
                           given="JOHN", **foreign)
    arrival.name.alphabetic_name = "SMITH JOHN"
    arrival.birth_date.CopyFrom(K.Date(year=1985, month=3, precision=K.DATE_PRECISION_YEAR_MONTH))
    alias = notification(NAKANO, kind=K.CHANGE_KIND_COMMON_NAME_CHANGE, occurred=dt.date(2015, 1, 1),
                         code=arrival.resident_code, family="SMITH", given="JOHN", **foreign)
    alias.name.alphabetic_name = "SMITH JOHN"
    alias.name.common_name = "山田太郎"
    alias.birth_date.CopyFrom(arrival.birth_date)
    await submit(mesh, arrival, alias)
    for _ in range(200):
        record = await national_record(mesh, arrival.resident_code)
        if record.version == 2:
            break
        await asyncio.sleep(0.05)
    assert record.name.common_name == "山田太郎"
    assert record.resident_kind == K.RESIDENT_KIND_FOREIGN
    assert (record.birth_date.month, record.birth_date.day) == (3, 0)
    assert record.birth_date.precision == K.DATE_PRECISION_YEAR_MONTH
