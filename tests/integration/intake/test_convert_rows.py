"""The intake's fast record builder gives exactly the IdentityRecord of the row-based one."""

from __future__ import annotations

import datetime as dt

from juki import domain
from juki.intake import convert

from tests.unit.domain.domain_builders import CODE, OTHER_CODE, notification


def _states() -> list[domain.ResidentState]:
    birth = notification(
        notification_id="b", change_kind=domain.ChangeKind.BIRTH, birth_date=domain.PartialDate(2003, 1, 1),
        occurred_on=dt.date(2003, 1, 1), notified_on=dt.date(2003, 1, 2),
    )
    death = notification(notification_id="d", change_kind=domain.ChangeKind.DEATH, sequence=2,
                         occurred_on=dt.date(2020, 1, 1), notified_on=dt.date(2020, 1, 3))
    code_change = notification(notification_id="c", change_kind=domain.ChangeKind.RESIDENT_CODE_CHANGE, sequence=3,
                               new_resident_code=OTHER_CODE, occurred_on=dt.date(2019, 1, 1),
                               notified_on=dt.date(2019, 1, 1))
    partial = notification(notification_id="p", birth_date=domain.PartialDate(1980, 5), sequence=4)
    year_only = notification(notification_id="y", birth_date=domain.PartialDate(1980), sequence=5)
    states = [
        domain.fold([birth], CODE),
        domain.fold([birth, death], CODE),
        domain.fold([birth, code_change], CODE),
        domain.fold([birth, code_change], OTHER_CODE),
        domain.fold([partial], CODE),
        domain.fold([year_only], CODE),
    ]
    return [s for s in states if s is not None]


def test_record_from_resident_row_equals_record_from_row() -> None:
    for state in _states():
        for version in (None, 7):
            row = convert.resident_row(state, version)
            slow = convert.record_from_row(dict(zip(convert.RESIDENT_COLUMNS, row, strict=True)))
            fast = convert.record_from_resident_row(row)
            assert fast == slow
            assert fast.SerializeToString(deterministic=True) == slow.SerializeToString(deterministic=True)
    empty_dates = (*convert.resident_row(_states()[0])[:19], None, None, *convert.resident_row(_states()[0])[21:])
    slow = convert.record_from_row(dict(zip(convert.RESIDENT_COLUMNS, empty_dates, strict=True)))
    assert convert.record_from_resident_row(empty_dates).SerializeToString(deterministic=True) == (
        slow.SerializeToString(deterministic=True)
    )


def test_relay_request_bytes_equal_the_serialised_request() -> None:
    from juki._gen.juki.intake.v1 import intake_pb2
    from juki.bench.intake import births
    from juki.intake.relay import encode_request

    messages = births(1, 50, 0)
    payloads = [m.SerializeToString(deterministic=True) for m in messages]
    for batch_id in (0, 1, 127, 128, 300, 2**40):
        expected = intake_pb2.StreamNotificationsRequest(batch_id=batch_id, notifications=messages)
        assert encode_request(batch_id, payloads) == expected.SerializeToString(deterministic=True)
        assert intake_pb2.StreamNotificationsRequest.FromString(encode_request(batch_id, payloads)) == expected
