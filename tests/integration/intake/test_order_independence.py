"""Order independence through the real service: whatever order a resident's notifications reach the
national intake (including a 転入 at one prefecture overtaking the 転出 at another), the national row
is the same."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2

from tests.integration.intake.helpers import NAKANO, YOKOHAMA, Mesh, intake_mesh, new_code, notification

pytestmark = pytest.mark.timeout(600)

OUTCOME = intake_pb2.NotificationOutcome


@pytest.fixture(scope="module")
async def mesh(ca: Any, database: Any, data_dir: Any) -> Any:
    from tests.conftest import make_settings

    def factory(service: str, instance: str, identity: tuple[str, str], **overrides: Any) -> Any:
        return make_settings(ca, database, data_dir, service, instance, identity, **overrides)

    factory.database = database  # type: ignore[attr-defined]
    async with intake_mesh(ca, factory) as running_mesh:
        yield running_mesh


def life(code: str) -> list[intake_pb2.Notification]:
    """Birth in 中野区, a 転出 to 横浜市 and the 転入 there (same day), then a 転居 and a 氏名変更 in 横浜市."""
    born = dt.date(2010, 1, 10)
    moved = dt.date(2015, 3, 1)
    return [
        notification(NAKANO, code=code, occurred=born),
        notification(NAKANO, kind=common_pb2.CHANGE_KIND_MOVE_OUT, code=code, occurred=moved, born=born,
                     next_municipality_code=YOKOHAMA),
        notification(YOKOHAMA, kind=common_pb2.CHANGE_KIND_MOVE_IN, code=code, occurred=moved,
                     notified=dt.date(2015, 3, 5), born=born, street="中区港町1丁目1番地",
                     previous_municipality_code=NAKANO),
        notification(YOKOHAMA, kind=common_pb2.CHANGE_KIND_ADDRESS_CHANGE, code=code, occurred=dt.date(2016, 7, 1),
                     born=born, street="中区山下町2番地"),
        notification(YOKOHAMA, kind=common_pb2.CHANGE_KIND_NAME_CHANGE, code=code, occurred=dt.date(2016, 7, 1),
                     born=born, family="横浜", street="中区山下町2番地"),
    ]


def comparable(record: common_pb2.IdentityRecord, code: str) -> bytes:
    copy = common_pb2.IdentityRecord()
    copy.CopyFrom(record)
    copy.ClearField("as_of")
    copy.ClearField("stale")
    assert copy.resident_code == code
    copy.resident_code = ""  # each example uses its own code
    return copy.SerializeToString(deterministic=True)


FINAL: list[bytes] = []


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(5)), twice=st.sets(st.integers(0, 4), max_size=2))
async def test_arrival_order_does_not_change_the_national_row(mesh: Mesh, order: list[int], twice: set[int]) -> None:
    code = new_code()
    events = life(code)
    stubs = {NAKANO: mesh.national_as("prefecture", "13"), YOKOHAMA: mesh.national_as("prefecture", "14")}
    for index in [*order, *sorted(twice)]:  # some arrive twice (at-least-once relay)
        event = events[index]
        response = await stubs[event.municipality_code].SubmitNotifications(
            intake_pb2.SubmitNotificationsRequest(notifications=[event]))
        assert response.results[0].outcome in (OUTCOME.NOTIFICATION_OUTCOME_ACCEPTED,
                                                 OUTCOME.NOTIFICATION_OUTCOME_DUPLICATE), response
    reader = mesh.national_as("service", "lookup")
    record = (await reader.GetResident(intake_pb2.GetResidentRequest(resident_code=code))).record
    assert record.status == common_pb2.RESIDENT_STATUS_CURRENT
    assert record.address.municipality_code == YOKOHAMA
    assert record.name.family_name == "横浜"
    assert record.version == 5
    history = await reader.ListResidentHistory(intake_pb2.ListResidentHistoryRequest(resident_code=code))
    assert len(history.versions) == 5
    FINAL.append(comparable(record, code))
    assert len(set(FINAL)) == 1


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "reversed"])
async def test_two_national_replicas_applying_one_residents_events_at_once(
        mesh: Mesh, ca: Any, database: Any, data_dir: Any, reverse: bool) -> None:
    """Two national replicas on one database, the events of one resident sent to both at the same moment
    (alternating, in life order and reversed): the per-resident locks serialise the folds, and the row is
    the one a single replica makes."""
    from juki._gen.juki.intake.v1 import intake_pb2_grpc
    from juki.intake.app import create
    from juki.mesh.supervisor import free_port

    from tests.conftest import channel_as, make_settings, running

    settings = make_settings(ca, database, data_dir, "intake", "intake-national", ("service", "intake-national"),
                             tier="national", listen=f"127.0.0.1:{free_port()}")
    async with running(settings, create(settings)) as second:
        code = new_code()
        events = life(code)
        if reverse:
            events.reverse()
        addresses = [mesh.national, second]

        async def send(index: int, event: intake_pb2.Notification) -> Any:
            prefecture = "13" if event.municipality_code == NAKANO else "14"
            async with channel_as(ca, "prefecture", prefecture, addresses[index % 2]) as channel:
                stub = intake_pb2_grpc.IntakeServiceStub(channel)
                return await stub.SubmitNotifications(intake_pb2.SubmitNotificationsRequest(notifications=[event]))

        answers = await asyncio.gather(*(send(i, e) for i, e in enumerate(events)))
        assert all(a.results[0].outcome == OUTCOME.NOTIFICATION_OUTCOME_ACCEPTED for a in answers), answers
        reader = mesh.national_as("service", "lookup")
        record = (await reader.GetResident(intake_pb2.GetResidentRequest(resident_code=code))).record
    assert record.version == 5 and record.address.municipality_code == YOKOHAMA
    history = await reader.ListResidentHistory(intake_pb2.ListResidentHistoryRequest(resident_code=code))
    assert sorted(v.version for v in history.versions) == [1, 2, 3, 4, 5]
    # The same life sent one by one to one replica gives the same row.
    alone = new_code()
    stubs = {NAKANO: mesh.national_as("prefecture", "13"), YOKOHAMA: mesh.national_as("prefecture", "14")}
    for event in life(alone):
        await stubs[event.municipality_code].SubmitNotifications(
            intake_pb2.SubmitNotificationsRequest(notifications=[event]))
    expected = (await reader.GetResident(intake_pb2.GetResidentRequest(resident_code=alone))).record
    assert comparable(record, code) == comparable(expected, alone)
