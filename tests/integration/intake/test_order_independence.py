"""Order independence through the real service: whatever order a resident's notifications reach the
national intake (including a 転入 at one prefecture overtaking the 転出 at another), the national row
is the same."""

from __future__ import annotations

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
