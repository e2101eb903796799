"""The byte-level record writer of batch verification equals the message-built record, for every grant."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest
from juki._gen.juki.common.v1 import common_pb2
from juki.domain.policy import IdentityField
from juki.lookup.records import RecordEncoder, identity_record


def _row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        resident_code="24727059608", resident_kind=1, family_name="山田", given_name="太郎",
        family_name_kana="ヤマダ", given_name_kana="タロウ", alphabetic_name="", common_name="",
        former_family_name="", birth_year=1950, birth_month=4, birth_day=1, sex=1, municipality_code="131148",
        prefecture="東京都", municipality="中野区", street="中野四丁目8番1号", status=1, last_change_kind=3,
        last_changed_on=dt.date(2003, 9, 16), last_notified_on=dt.date(2003, 9, 17), death_date=None,
        successor_code=None, version=7,
        municipality_as_of=dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=dt.UTC), municipality_connected=True,
    )
    row.update(overrides)
    return row


ROWS = [
    _row(),
    _row(resident_kind=2, alphabetic_name="SMITH JOHN", common_name="スミス", birth_month=0, birth_day=0, sex=2),
    _row(status=5, successor_code="24846016224", last_change_kind=11, former_family_name="佐藤"),
    _row(municipality_as_of=None, municipality_connected=None, last_changed_on=None, last_notified_on=None),
    _row(municipality_connected=False, birth_year=0, birth_month=0, birth_day=0, version=300, street=""),
]
GRANTS = [frozenset(c) for n in (0, 1, 4, 6) for c in itertools.combinations(IdentityField, n)]


@pytest.mark.parametrize("row", ROWS)
def test_encoded_records_parse_to_the_filtered_record(row: dict[str, Any]) -> None:
    for fields in GRANTS:
        encoded = RecordEncoder(fields).encode(row)
        assert common_pb2.IdentityRecord.FromString(encoded) == identity_record(row, fields), sorted(
            f.value for f in fields)


def test_fields_outside_the_grant_are_not_written() -> None:
    encoded = RecordEncoder(frozenset({IdentityField.SEX})).encode(_row())
    record = common_pb2.IdentityRecord.FromString(encoded)
    assert record.sex == common_pb2.SEX_MALE
    assert not record.resident_code and not record.HasField("name") and not record.HasField("address")
    assert "山田".encode() not in encoded and b"24727059608" not in encoded
