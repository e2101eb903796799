"""One test per rule of validate_notification, with date cut-offs tested the day before and on the day."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from juki.domain import (
    FOREIGN_RESIDENTS_JOIN,
    NETWORK_START,
    Address,
    ChangeKind,
    PartialDate,
    ResidentKind,
    ViolationReason,
    check_notification,
    local_government_check_digit,
    normalise_notification,
    validate_notification,
)

from tests.unit.domain.domain_builders import NAKANO, OSAKA, OTHER_CODE, TODAY, notification


def _violations(today: dt.date = TODAY, **changes: Any) -> dict[str, ViolationReason]:
    return {v.field: v.reason for v in validate_notification(notification(**changes), today)}


def _foreign(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "resident_kind": ResidentKind.FOREIGN,
        "family_name": "WANG",
        "given_name": "XIAOMING",
        "kana": None,
        "alphabetic_name": "WANG XIAOMING",
    }
    base.update(changes)
    return base


def test_valid_notification_has_no_violations() -> None:
    assert validate_notification(notification(), TODAY) == []


def test_resident_code_check_digit() -> None:
    assert _violations(resident_code="24727059607") == {"resident_code": ViolationReason.CHECK_DIGIT_MISMATCH}
    assert _violations(resident_code="2472705960") == {"resident_code": ViolationReason.INVALID_FIELD}


def test_municipality_check_digit_and_existence() -> None:
    address = Address("131149", "中央一丁目1番1号")
    found = _violations(municipality_code="131149", address=address)
    assert found == {"municipality_code": ViolationReason.CHECK_DIGIT_MISMATCH}
    unlisted = "13999" + str(local_government_check_digit("13999"))
    assert _violations(municipality_code=unlisted, address=Address(unlisted, "x"))["municipality_code"] is (
        ViolationReason.UNKNOWN_MUNICIPALITY
    )
    prefecture = "130001"
    assert _violations(municipality_code=prefecture, address=Address(prefecture, "x"))[
        "municipality_code"
    ] is (ViolationReason.UNKNOWN_MUNICIPALITY)
    assert _violations(municipality_code="13114", address=Address("13114", "x"))["municipality_code"] is (
        ViolationReason.INVALID_FIELD
    )


@pytest.mark.parametrize("kind", list(ChangeKind))
def test_address_must_be_in_the_notifying_municipality(kind: ChangeKind) -> None:
    assert "address.municipality_code" in _violations(
        change_kind=kind, address=Address(OSAKA, "北区一丁目1番1号")
    )


def test_occurred_on_not_after_notified_on() -> None:
    day = dt.date(2024, 3, 5)
    assert "occurred_on" not in _violations(occurred_on=day, notified_on=day)
    assert "occurred_on" in _violations(occurred_on=day + dt.timedelta(days=1), notified_on=day)


def test_notified_on_not_after_today() -> None:
    assert "notified_on" not in _violations(notified_on=TODAY)
    assert "notified_on" in _violations(notified_on=TODAY + dt.timedelta(days=1))


def test_network_start_cut_off() -> None:
    before = NETWORK_START - dt.timedelta(days=1)
    assert "notified_on" in _violations(occurred_on=before, notified_on=before, birth_date=PartialDate(1970))
    assert _violations(occurred_on=NETWORK_START, notified_on=NETWORK_START) == {}


def test_foreign_residents_join_cut_off() -> None:
    before = FOREIGN_RESIDENTS_JOIN - dt.timedelta(days=1)
    assert _violations(**_foreign(occurred_on=before, notified_on=before)) == {
        "resident_kind": ViolationReason.INVALID_FIELD
    }
    assert (
        _violations(**_foreign(occurred_on=FOREIGN_RESIDENTS_JOIN, notified_on=FOREIGN_RESIDENTS_JOIN)) == {}
    )


def test_foreign_occurrence_before_registration() -> None:
    found = _violations(**_foreign(occurred_on=dt.date(2012, 7, 8), notified_on=dt.date(2013, 7, 8)))
    assert "occurred_on" in found
    assert _violations(**_foreign(occurred_on=dt.date(2012, 7, 9), notified_on=dt.date(2013, 7, 8))) == {}


def test_birth_date_not_after_occurred_on() -> None:
    day = dt.date(2024, 3, 1)
    assert "birth_date" not in _violations(occurred_on=day, birth_date=PartialDate.from_date(day))
    assert "birth_date" in _violations(occurred_on=day, birth_date=PartialDate(2024, 3, 2))
    # A partly unknown date passes when it can be on or before the day.
    assert "birth_date" not in _violations(occurred_on=day, birth_date=PartialDate(2024))
    assert "birth_date" in _violations(occurred_on=day, birth_date=PartialDate(2024, 4))


def test_birth_must_be_on_the_birth_date() -> None:
    day = dt.date(2024, 3, 1)
    ok = _violations(change_kind=ChangeKind.BIRTH, occurred_on=day, birth_date=PartialDate.from_date(day))
    assert ok == {}
    assert "birth_date" in _violations(
        change_kind=ChangeKind.BIRTH, occurred_on=day, birth_date=PartialDate(2024, 2, 1)
    )


def test_resident_code_change_needs_a_valid_different_new_code() -> None:
    kind = ChangeKind.RESIDENT_CODE_CHANGE
    assert _violations(change_kind=kind, new_resident_code=OTHER_CODE) == {}
    assert "new_resident_code" in _violations(change_kind=kind)
    assert _violations(change_kind=kind, new_resident_code="24846016225") == {
        "new_resident_code": ViolationReason.CHECK_DIGIT_MISMATCH
    }
    assert "new_resident_code" in _violations(
        change_kind=kind, new_resident_code=notification().resident_code
    )
    assert "new_resident_code" in _violations(new_resident_code=OTHER_CODE)  # only for code changes


def test_moves_and_the_other_municipality() -> None:
    assert _violations(change_kind=ChangeKind.MOVE_IN, previous_municipality_code=OSAKA) == {}
    assert _violations(change_kind=ChangeKind.MOVE_IN) == {}  # from abroad
    assert _violations(change_kind=ChangeKind.MOVE_OUT, next_municipality_code=OSAKA) == {}
    assert "previous_municipality_code" in _violations(change_kind=ChangeKind.SPECIAL_MOVE_IN)
    assert "previous_municipality_code" in _violations(
        change_kind=ChangeKind.MOVE_IN, previous_municipality_code=NAKANO
    )
    assert _violations(change_kind=ChangeKind.MOVE_OUT, next_municipality_code="271003") == {
        "next_municipality_code": ViolationReason.CHECK_DIGIT_MISMATCH
    }
    assert "next_municipality_code" in _violations(next_municipality_code=OSAKA)
    assert "previous_municipality_code" in _violations(previous_municipality_code=OSAKA)


def test_special_move_in_from_second_phase() -> None:
    kind = ChangeKind.SPECIAL_MOVE_IN
    before = dt.date(2003, 8, 24)
    assert "change_kind" in _violations(
        change_kind=kind, previous_municipality_code=OSAKA, occurred_on=before, notified_on=before
    )
    on = dt.date(2003, 8, 25)
    assert (
        _violations(change_kind=kind, previous_municipality_code=OSAKA, occurred_on=on, notified_on=on) == {}
    )


def test_common_name_only_for_foreign_residents() -> None:
    assert "common_name" in _violations(common_name="山田　花子")
    assert _violations(**_foreign(common_name="王田　明")) == {}
    assert "change_kind" in _violations(change_kind=ChangeKind.COMMON_NAME_CHANGE)
    assert _violations(**_foreign(change_kind=ChangeKind.COMMON_NAME_CHANGE)) == {}


def test_alphabetic_name_for_foreign_residents_only() -> None:
    assert "alphabetic_name" in _violations(**_foreign(alphabetic_name=None))
    assert "alphabetic_name" in _violations(alphabetic_name="TARO YAMADA")


def test_names_are_normalised_and_bounded() -> None:
    normal, violations = check_notification(
        notification(family_name=" 山田 ", given_name="ﾀﾛｳ", kana="やまだ たろう"), TODAY
    )
    assert violations == []
    assert (normal.family_name, normal.given_name, normal.kana) == ("山田", "タロウ", "ヤマダ\u3000タロウ")
    assert "family_name" in _violations(family_name="")
    assert "given_name" in _violations(given_name="あ" * 101)
    assert "kana" in _violations(kana="山田")
    assert "address.street" in _violations(address=Address(NAKANO, "中央\x07"))


def test_foreign_latin_names_are_kept_latin() -> None:
    normal = normalise_notification(
        notification(**_foreign(family_name="wang", given_name=" ", alphabetic_name="wang"))
    )
    assert (normal.family_name, normal.given_name, normal.alphabetic_name) == ("WANG", "", "WANG")
    assert validate_notification(normal, TODAY) == []


def test_former_family_name_from_2019_11_05() -> None:
    on = dt.date(2019, 11, 5)
    assert _violations(former_family_name="佐藤", occurred_on=on, notified_on=on) == {}
    before = on - dt.timedelta(days=1)
    assert "former_family_name" in _violations(
        former_family_name="佐藤", occurred_on=before, notified_on=before
    )


def test_identifier_and_sequence() -> None:
    assert "notification_id" in _violations(notification_id="")
    assert "notification_id" in _violations(notification_id="x" * 129)
    assert "sequence" in _violations(sequence=0)


def test_all_violations_are_reported_at_once() -> None:
    found = _violations(resident_code="1", municipality_code="131149", sequence=0, family_name="")
    assert {
        "resident_code",
        "municipality_code",
        "sequence",
        "family_name",
        "address.municipality_code",
    } <= set(found)


def test_partial_date_order_and_parse() -> None:
    assert (
        PartialDate(1980)
        < PartialDate(1980, 1)
        < PartialDate(1980, 1, 1)
        < PartialDate(1980, 1, 2)
        < PartialDate(1980, 2)
    )
    assert sorted([PartialDate(1980, 2), PartialDate(1980), PartialDate(1979, 12, 31)]) == [
        PartialDate(1979, 12, 31),
        PartialDate(1980),
        PartialDate(1980, 2),
    ]
    assert PartialDate.parse("1980-05-00") == PartialDate(1980, 5)
    assert PartialDate.parse("1980-00-00") == PartialDate(1980)
    assert str(PartialDate(1980, 5)) == "1980-05"
    assert PartialDate(1980).latest() == dt.date(1980, 12, 31)
    assert PartialDate(1980, 5).age_on(dt.date(2000, 5, 30)) == 19
    assert PartialDate(1980, 5).age_on(dt.date(2000, 5, 31)) == 20
    for bad in ("1980-13", "1980-02-30", "80", "1980-5"):
        with pytest.raises(ValueError):
            PartialDate.parse(bad)
    with pytest.raises(ValueError):
        PartialDate(1980, None, 3)
