"""The notification path: municipality -> prefecture intake -> national intake, over real mTLS."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import pytest
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2

from tests.integration.intake.helpers import NAKANO, Mesh, intake_mesh, national_record, notification, with_id

pytestmark = pytest.mark.timeout(120)

OUTCOME = intake_pb2.NotificationOutcome


@pytest.fixture
async def mesh(ca: Any, settings_factory: Any) -> Any:
    async with intake_mesh(ca, settings_factory) as running_mesh:
        yield running_mesh


async def test_birth_reaches_the_national_store(mesh: Mesh) -> None:
    birth = notification(NAKANO, occurred=dt.date(2021, 6, 1))
    response = await mesh.as_municipality(NAKANO).SubmitNotifications(
        intake_pb2.SubmitNotificationsRequest(notifications=[birth]))
    [result] = response.results
    assert result.outcome == OUTCOME.NOTIFICATION_OUTCOME_ACCEPTED, result
    assert result.HasField("acknowledged_at")
    record = await national_record(mesh, birth.resident_code)
    assert record.name.family_name == "中野"
    assert record.status == common_pb2.RESIDENT_STATUS_CURRENT
    assert record.last_change_kind == common_pb2.CHANGE_KIND_BIRTH
    assert record.address.municipality == "中野区"
    assert record.version == 1


async def test_duplicate_returns_first_result_and_conflict_is_refused(mesh: Mesh) -> None:
    stub = mesh.as_municipality(NAKANO)
    birth = notification(NAKANO)
    first = (await stub.SubmitNotifications(intake_pb2.SubmitNotificationsRequest(notifications=[birth]))).results[0]
    again = (await stub.SubmitNotifications(intake_pb2.SubmitNotificationsRequest(notifications=[birth]))).results[0]
    assert again.outcome == OUTCOME.NOTIFICATION_OUTCOME_DUPLICATE
    assert again.acknowledged_at == first.acknowledged_at
    other = with_id(birth, notification_id=birth.notification_id)
    other.name.given_name = "次郎"
    conflict = (await stub.SubmitNotifications(intake_pb2.SubmitNotificationsRequest(notifications=[other]))).results[0]
    assert conflict.outcome == OUTCOME.NOTIFICATION_OUTCOME_REJECTED
    assert conflict.violations[0].reason == common_pb2.ERROR_REASON_DUPLICATE_NOTIFICATION_CONFLICT


async def test_batch_applies_valid_items_and_reports_each_invalid_one(mesh: Mesh) -> None:
    good = notification(NAKANO)
    bad_code = notification(NAKANO, code="24727059607")  # wrong check digit
    wrong_place = notification(NAKANO)
    wrong_place.address.municipality_code = "141003"
    future = notification(NAKANO, occurred=dt.date(2999, 1, 1))
    response = await mesh.as_municipality(NAKANO).SubmitNotifications(
        intake_pb2.SubmitNotificationsRequest(notifications=[good, bad_code, wrong_place, future]))
    outcomes = [r.outcome for r in response.results]
    assert outcomes == [OUTCOME.NOTIFICATION_OUTCOME_ACCEPTED] + [OUTCOME.NOTIFICATION_OUTCOME_REJECTED] * 3
    assert {v.field for v in response.results[1].violations} == {"resident_code"}
    assert response.results[1].violations[0].reason == common_pb2.ERROR_REASON_CHECK_DIGIT_MISMATCH
    assert "address.municipality_code" in {v.field for v in response.results[2].violations}
    assert "notified_on" in {v.field for v in response.results[3].violations}


async def test_sequence_gaps_are_reported(mesh: Mesh) -> None:
    code = "131016"  # 千代田区: a municipality no other test uses
    stub = mesh.prefecture_as("13", "municipality", code)
    first = notification(code, sequence=1, street="千代田1番1号")
    fourth = notification(code, sequence=4, street="千代田1番1号")
    await stub.SubmitNotifications(intake_pb2.SubmitNotificationsRequest(notifications=[first, fourth]))
    state = await stub.GetSequenceState(intake_pb2.GetSequenceStateRequest(municipality_code=code))
    assert state.last_acknowledged_sequence == 1
    assert state.highest_received_sequence == 4
    assert [(r.first, r.last) for r in state.missing_ranges] == [(2, 3)]
    filled = [notification(code, sequence=s, street="千代田1番1号") for s in (2, 3)]
    await stub.SubmitNotifications(intake_pb2.SubmitNotificationsRequest(notifications=filled))
    state = await stub.GetSequenceState(intake_pb2.GetSequenceStateRequest(municipality_code=code))
    assert (state.last_acknowledged_sequence, list(state.missing_ranges)) == (4, [])


async def test_municipality_may_not_notify_for_another(mesh: Mesh) -> None:
    other = notification("131016", sequence=99)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.as_municipality(NAKANO).SubmitNotifications(
            intake_pb2.SubmitNotificationsRequest(notifications=[other]))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.prefecture_as("14", "municipality", NAKANO).SubmitNotifications(
            intake_pb2.SubmitNotificationsRequest(notifications=[notification(NAKANO)]))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.national_as("municipality", NAKANO).SubmitNotifications(
            intake_pb2.SubmitNotificationsRequest(notifications=[notification(NAKANO)]))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_stream_acknowledges_batches_in_order(mesh: Mesh) -> None:
    batches = [[notification(NAKANO) for _ in range(50)] for _ in range(4)]

    async def requests() -> Any:
        for number, batch in enumerate(batches, start=1):
            yield intake_pb2.StreamNotificationsRequest(batch_id=number, notifications=batch)

    answers = [a async for a in mesh.as_municipality(NAKANO).StreamNotifications(requests())]
    assert [a.batch_id for a in answers] == [1, 2, 3, 4]
    assert all(r.outcome == OUTCOME.NOTIFICATION_OUTCOME_ACCEPTED for a in answers for r in a.results)
    last = batches[-1][-1]
    record = await national_record(mesh, last.resident_code)
    assert record.resident_code == last.resident_code
