"""Connection state (disconnect / reconnect), 住民票コード変更 with retired codes, and bulk load."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import pytest
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2
from juki.mesh.operator import sign_with_files

from tests.integration.intake.helpers import (
    NAKANO,
    YOKOHAMA,
    Mesh,
    date,
    intake_mesh,
    national_record,
    new_code,
    notification,
)

pytestmark = pytest.mark.timeout(120)

OUTCOME = intake_pb2.NotificationOutcome
SET_CONNECTION = "/juki.intake.v1.IntakeService/SetConnectionState"


@pytest.fixture
async def mesh(ca: Any, settings_factory: Any) -> Any:
    async with intake_mesh(ca, settings_factory) as running_mesh:
        yield running_mesh


def signed(ca: Any, request: intake_pb2.SetConnectionStateRequest) -> intake_pb2.SetConnectionStateRequest:
    cert, key = ca.paths("operator", "demo-operator")
    if not cert.is_file():
        ca.issue("operator", "demo-operator")
    sign_with_files(request, SET_CONNECTION, cert, key)
    return request


async def submit(stub: Any, *messages: intake_pb2.Notification) -> list[intake_pb2.NotificationResult]:
    response = await stub.SubmitNotifications(intake_pb2.SubmitNotificationsRequest(notifications=list(messages)))
    return list(response.results)


async def test_disconnected_municipality_is_refused_and_marked_stale(mesh: Mesh, ca: Any) -> None:
    municipality = mesh.as_municipality(NAKANO)
    operator = mesh.prefecture_as("13", "operator", "demo-operator")
    birth = notification(NAKANO)
    [result] = await submit(municipality, birth)
    assert result.outcome == OUTCOME.NOTIFICATION_OUTCOME_ACCEPTED

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # no operator proof
        await operator.SetConnectionState(intake_pb2.SetConnectionStateRequest(municipality_code=NAKANO))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    cut = await operator.SetConnectionState(signed(ca, intake_pb2.SetConnectionStateRequest(
        municipality_code=NAKANO, connected=False, reason="区長の判断による切断")))
    try:
        assert not cut.status.connected
        assert cut.status.connection_reason == "区長の判断による切断"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await submit(municipality, notification(NAKANO, sequence=10_000_000))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        record = await national_record(mesh, birth.resident_code)
        assert record.stale and record.HasField("as_of")
        status = await mesh.national_as("operator", "demo-operator").GetIntakeStatus(
            intake_pb2.GetIntakeStatusRequest(municipality_codes=[NAKANO]))
        assert not status.municipalities[0].connected
    finally:
        back = await operator.SetConnectionState(signed(ca, intake_pb2.SetConnectionStateRequest(
            municipality_code=NAKANO, connected=True, reason="再接続")))
    assert back.status.connected
    [result] = await submit(municipality, notification(NAKANO))
    assert result.outcome == OUTCOME.NOTIFICATION_OUTCOME_ACCEPTED


async def test_code_change_retires_the_old_code(mesh: Mesh) -> None:
    municipality = mesh.as_municipality(NAKANO)
    old, new = new_code(), new_code()
    born = dt.date(2019, 2, 3)
    await submit(municipality, notification(NAKANO, code=old, occurred=born))
    change = notification(NAKANO, kind=common_pb2.CHANGE_KIND_RESIDENT_CODE_CHANGE, code=old, born=born,
                          occurred=dt.date(2020, 1, 6), new_resident_code=new)
    [result] = await submit(municipality, change)
    assert result.outcome == OUTCOME.NOTIFICATION_OUTCOME_ACCEPTED, result
    reader = mesh.prefecture_as("13", "service", "disclosure")
    answer = await reader.GetResident(intake_pb2.GetResidentRequest(resident_code=old))
    assert answer.record.resident_code == new
    assert list(answer.followed_codes) == [old]
    history = await reader.ListResidentHistory(intake_pb2.ListResidentHistoryRequest(resident_code=new))
    kinds = [(v.record.resident_code, v.change_kind) for v in history.versions]
    assert (old, common_pb2.CHANGE_KIND_BIRTH) in kinds
    assert (new, common_pb2.CHANGE_KIND_RESIDENT_CODE_CHANGE) in kinds
    reuse = notification(NAKANO, code=old)
    [refused] = await submit(municipality, reuse)
    assert refused.outcome == OUTCOME.NOTIFICATION_OUTCOME_REJECTED
    assert [v.field for v in refused.violations] == ["resident_code"]


async def test_bulk_load_reaches_national_and_is_idempotent(mesh: Mesh) -> None:
    place = common_pb2.Address(municipality_code=YOKOHAMA, prefecture="神奈川県", municipality="横浜市",
                               street="中区本町6丁目50番地の10")
    records = [
        common_pb2.IdentityRecord(
            resident_code=new_code(), resident_kind=common_pb2.RESIDENT_KIND_JAPANESE,
            name=common_pb2.PersonName(family_name="港", given_name=f"太郎{i}"),
            birth_date=date(dt.date(1970 + i, 1, 1)), sex=common_pb2.SEX_MALE, address=place,
            status=common_pb2.RESIDENT_STATUS_CURRENT, last_changed_on=date(dt.date(2003, 8, 14)),
        )
        for i in range(3)
    ]
    broken = common_pb2.IdentityRecord(resident_code="12345678901", address=place)
    load_id = f"load-{records[0].resident_code}"

    async def batches() -> Any:
        yield intake_pb2.BulkLoadRequest(load_id=load_id, municipality_code=YOKOHAMA, records=records[:2])
        yield intake_pb2.BulkLoadRequest(load_id=load_id, municipality_code=YOKOHAMA, records=[records[2], broken])

    stub = mesh.as_municipality(YOKOHAMA)
    summary = await stub.BulkLoad(batches())
    assert (summary.records_received, summary.records_applied, summary.records_rejected) == (4, 3, 1)
    assert summary.rejections[0].resident_code == "12345678901"
    for record in records:
        found = await national_record(mesh, record.resident_code)
        assert found.name.given_name == record.name.given_name
    again = await stub.BulkLoad(batches())
    assert (again.records_applied, again.records_unchanged) == (0, 4)


async def test_a_prefecture_passes_a_load_on_while_it_is_still_arriving(mesh: Mesh) -> None:
    """The national intake holds the first batches before the load's last batch has been sent: the
    prefecture streams the load on as it applies it instead of holding the whole load in memory."""
    place = common_pb2.Address(municipality_code=YOKOHAMA, prefecture="神奈川県", municipality="横浜市",
                               street="中区本町6丁目50番地の10")

    def record(i: int) -> common_pb2.IdentityRecord:
        return common_pb2.IdentityRecord(
            resident_code=new_code(), resident_kind=common_pb2.RESIDENT_KIND_JAPANESE,
            name=common_pb2.PersonName(family_name="流", given_name=f"次郎{i}"),
            birth_date=date(dt.date(1980, 1, 1 + i)), sex=common_pb2.SEX_MALE, address=place,
            status=common_pb2.RESIDENT_STATUS_CURRENT, last_changed_on=date(dt.date(2003, 8, 14)),
        )

    first, last = [record(0), record(1)], [record(2)]
    load_id = f"stream-{first[0].resident_code}"
    reached: list[common_pb2.IdentityRecord] = []

    async def batches() -> Any:
        yield intake_pb2.BulkLoadRequest(load_id=load_id, municipality_code=YOKOHAMA, records=first)
        # The last batch is held back until the national intake has the first one.
        reached.append(await national_record(mesh, first[1].resident_code))
        yield intake_pb2.BulkLoadRequest(load_id=load_id, municipality_code=YOKOHAMA, records=last)

    summary = await mesh.as_municipality(YOKOHAMA).BulkLoad(batches())
    assert summary.records_applied == 3
    assert reached and reached[0].name.given_name == "次郎1"
    assert (await national_record(mesh, last[0].resident_code)).name.given_name == "次郎2"
