"""住基カード rules at their cut-off days, without I/O."""

from __future__ import annotations

import datetime as dt

import pytest
from juki._gen.juki.card.v1 import card_pb2
from juki.card import rules
from juki.mesh.errors import JukiError

D = dt.date


@pytest.mark.parametrize(("today", "reason"), [
    (D(2003, 8, 24), "FAILED_PRECONDITION"), (D(2003, 8, 25), None),
    (D(2015, 12, 22), None), (D(2015, 12, 23), "CARD_ISSUANCE_ENDED"),
])
def test_issuance_window(today: dt.date, reason: str | None) -> None:
    if reason is None:
        rules.check_issuance(today)
    else:
        with pytest.raises(JukiError) as refused:
            rules.check_issuance(today)
        assert refused.value.reason.name == reason


def test_validity_is_ten_years_or_the_end_of_the_stay() -> None:
    assert rules.expiry(D(2015, 12, 22), None) == D(2025, 12, 22)
    assert rules.expiry(D(2012, 2, 29), None) == D(2022, 2, 28)
    assert rules.expiry(D(2014, 4, 1), D(2017, 3, 31)) == D(2017, 3, 31)
    assert rules.expiry(D(2014, 4, 1), D(2030, 1, 1)) == D(2024, 4, 1)


def test_state_on_a_day_revoked_then_expired_then_stored() -> None:
    card = rules.CardFacts(card_pb2.CARD_STATE_SUSPENDED, D(2025, 12, 22))
    assert rules.effective_state(card, D(2025, 12, 22)) == card_pb2.CARD_STATE_SUSPENDED
    assert rules.effective_state(card, D(2025, 12, 23)) == card_pb2.CARD_STATE_EXPIRED
    revoked = rules.CardFacts(card_pb2.CARD_STATE_REVOKED, D(2025, 12, 22))
    assert rules.effective_state(revoked, D(2020, 1, 1)) == card_pb2.CARD_STATE_REVOKED
    with pytest.raises(JukiError) as locked:
        rules.require_usable(rules.CardFacts(card_pb2.CARD_STATE_LOCKED, D(2025, 1, 1)), D(2020, 1, 1))
    assert locked.value.reason.name == "CARD_LOCKED"
    rules.require_usable(rules.CardFacts(card_pb2.CARD_STATE_LOCKED, D(2025, 1, 1)), D(2020, 1, 1), allow_locked=True)


@pytest.mark.parametrize(("planned", "accepted"), [
    (D(2024, 4, 15), True), (D(2024, 4, 16), False),  # filed in advance: from 14 days before the planned date
    (D(2024, 3, 18), True), (D(2024, 3, 17), False),  # filed after the move: within 14 days of it
    (D(2024, 4, 1), True), (D(2030, 1, 1), False),
])
def test_special_move_out_is_filed_from_14_days_before_to_14_days_after_the_move(
    planned: dt.date, accepted: bool
) -> None:
    today = D(2024, 4, 1)
    if accepted:
        rules.check_special_move_out(planned, today)
        return
    with pytest.raises(JukiError) as refused:
        rules.check_special_move_out(planned, today)
    assert [v.field for v in refused.value.violations] == ["planned_move_on"]


def test_special_move_in_deadline_given_at_filing_is_30_days_after_the_planned_date() -> None:
    assert rules.special_move_in_deadline(D(2024, 4, 1)) == D(2024, 5, 1)
    assert rules.special_move_in_deadline(D(2024, 4, 1), moved_in_on=D(2024, 4, 10)) == D(2024, 4, 24)
    assert rules.special_move_in_deadline(D(2024, 4, 1), moved_in_on=D(2024, 4, 20)) == D(2024, 5, 1)


@pytest.mark.parametrize(("moved_in_on", "today", "accepted"), [
    # 14 days after the actual move-in comes first.
    (D(2024, 4, 10), D(2024, 4, 24), True), (D(2024, 4, 10), D(2024, 4, 25), False),
    # 30 days after the planned move date comes first.
    (D(2024, 4, 25), D(2024, 5, 1), True), (D(2024, 4, 25), D(2024, 5, 2), False),
    # Both on the same day.
    (D(2024, 4, 17), D(2024, 5, 1), True), (D(2024, 4, 17), D(2024, 5, 2), False),
])
def test_special_move_in_by_the_earlier_of_14_days_after_moving_and_30_after_the_planned_date(
    moved_in_on: dt.date, today: dt.date, accepted: bool
) -> None:
    deadline = rules.special_move_in_deadline(D(2024, 4, 1))
    if accepted:
        rules.check_special_move_in(deadline, moved_in_on, today)
        return
    with pytest.raises(JukiError) as late:
        rules.check_special_move_in(deadline, moved_in_on, today)
    assert late.value.reason.name == "SPECIAL_MOVE_IN_EXPIRED"


def test_continued_use_after_a_move_from_2012_07_09() -> None:
    assert not rules.continued_use_after_move(D(2012, 7, 8))
    assert rules.continued_use_after_move(D(2012, 7, 9))


def test_pins_are_four_digits_and_stored_only_as_salted_slow_hashes() -> None:
    for bad in ("123", "12345", "12a4", "１２３４", ""):
        with pytest.raises(JukiError):
            rules.check_pin_format(bad)
    salt, digest = rules.hash_pin("1234")
    other_salt, other_digest = rules.hash_pin("1234")
    assert salt != other_salt and digest != other_digest and b"1234" not in digest
    assert rules.pin_matches("1234", salt, digest) and not rules.pin_matches("1235", salt, digest)
