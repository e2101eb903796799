"""The national fold is order-independent and handles moves, deaths and code changes as documented."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from juki.domain import Address, ChangeKind, ResidentStatus, event_order, fold, fold_each, sort_events
from juki.domain.validation import Notification

from tests.unit.domain.domain_builders import CODE, NAKANO, OSAKA, OTHER_CODE, SHIBUYA, notification

DAY = dt.date(2020, 1, 10)


def _birth() -> Notification:
    return notification(
        notification_id="birth",
        change_kind=ChangeKind.BIRTH,
        birth_date=notification().birth_date,
        occurred_on=dt.date(2003, 1, 1),
        notified_on=dt.date(2003, 1, 2),
    )


def _move_out(day: dt.date = DAY, notified: dt.date = DAY) -> Notification:
    return notification(
        notification_id="out-nakano",
        change_kind=ChangeKind.MOVE_OUT,
        next_municipality_code=OSAKA,
        occurred_on=day,
        notified_on=notified,
        sequence=10,
    )


def _move_in(day: dt.date = DAY, notified: dt.date = DAY) -> Notification:
    return notification(
        notification_id="in-osaka",
        municipality_code=OSAKA,
        change_kind=ChangeKind.MOVE_IN,
        previous_municipality_code=NAKANO,
        address=Address(OSAKA, "北区梅田一丁目1番1号"),
        occurred_on=day,
        notified_on=notified,
        sequence=3,
    )


def test_cross_prefecture_move_same_day_in_both_arrival_orders() -> None:
    events = [_birth(), _move_out(), _move_in()]
    for arrival in itertools.permutations(events):
        state = fold(arrival)
        assert state is not None
        assert state.status is ResidentStatus.CURRENT
        assert state.address.municipality_code == OSAKA
        assert state.version == 3


def test_move_in_dated_before_the_planned_move_out_still_ends_at_destination() -> None:
    events = [_birth(), _move_out(day=DAY + dt.timedelta(days=3)), _move_in(day=DAY)]
    for arrival in itertools.permutations(events):
        state = fold(arrival)
        assert state is not None and state.status is ResidentStatus.CURRENT
        assert state.address.municipality_code == OSAKA


def test_move_out_without_arrival_is_moved_out() -> None:
    state = fold([_birth(), _move_out()])
    assert state is not None
    assert state.status is ResidentStatus.MOVED_OUT
    assert state.moved_to_municipality_code == OSAKA
    assert state.address.municipality_code == NAKANO


def test_death_is_terminal_but_ex_officio_correction_still_amends() -> None:
    death = notification(
        notification_id="death", change_kind=ChangeKind.DEATH, occurred_on=DAY, notified_on=DAY
    )
    late_move = _move_in(day=DAY + dt.timedelta(days=5), notified=DAY + dt.timedelta(days=5))
    correction = notification(
        notification_id="fix",
        change_kind=ChangeKind.EX_OFFICIO_CORRECTION,
        given_name="太朗",
        occurred_on=DAY + dt.timedelta(days=9),
        notified_on=DAY + dt.timedelta(days=9),
    )
    state = fold([correction, late_move, death, _birth()])
    assert state is not None
    assert state.status is ResidentStatus.DECEASED
    assert state.death_date == DAY
    assert state.given_name == "太朗"
    assert state.address.municipality_code == NAKANO
    assert state.version == 4


def test_death_and_same_day_correction_order() -> None:
    death = notification(notification_id="d", change_kind=ChangeKind.DEATH, occurred_on=DAY, notified_on=DAY)
    rename = notification(
        notification_id="r",
        change_kind=ChangeKind.NAME_CHANGE,
        family_name="佐藤",
        occurred_on=DAY,
        notified_on=DAY,
    )
    # Same day: the rename sorts before the death, so the death (terminal) is the last change applied.
    state = fold([death, rename])
    assert state is not None and state.status is ResidentStatus.DECEASED
    assert state.last_change_kind is ChangeKind.DEATH and state.version == 2


def test_resident_code_change_retires_old_code_and_starts_new_one() -> None:
    change = notification(
        notification_id="code",
        change_kind=ChangeKind.RESIDENT_CODE_CHANGE,
        new_resident_code=OTHER_CODE,
        occurred_on=DAY,
        notified_on=DAY,
    )
    after = notification(
        notification_id="after",
        resident_code=OTHER_CODE,
        address=Address(NAKANO, "中央一丁目1番1号"),
        occurred_on=DAY + dt.timedelta(days=1),
        notified_on=DAY + dt.timedelta(days=1),
    )
    old = fold([change, _birth()], resident_code=CODE)
    assert old is not None
    assert old.status is ResidentStatus.CODE_RETIRED
    assert old.successor_code == OTHER_CODE
    assert old.resident_code == CODE
    assert fold([change, _birth()]) == old  # inferred perspective: the code every event concerns

    new = fold([after, change])
    assert new is not None
    assert new.resident_code == OTHER_CODE
    assert new.predecessor_code == CODE
    assert new.status is ResidentStatus.CURRENT
    assert new.address.street == "中央一丁目1番1号"

    only_change = fold([change], resident_code=OTHER_CODE)
    assert only_change is not None and only_change.status is ResidentStatus.CURRENT


def test_ambiguous_perspective_needs_a_code() -> None:
    change = notification(change_kind=ChangeKind.RESIDENT_CODE_CHANGE, new_resident_code=OTHER_CODE)
    try:
        fold([change])
    except ValueError:
        pass
    else:  # pragma: no cover
        raise AssertionError("expected ValueError")


def test_duplicates_are_applied_once() -> None:
    assert fold([_birth(), _birth(), _move_out(), _move_out()]) == fold([_birth(), _move_out()])


def test_empty_fold_is_none() -> None:
    assert fold([]) is None


def test_stale_correction_from_former_municipality_is_ignored() -> None:
    stale = notification(
        notification_id="stale",
        change_kind=ChangeKind.ADDRESS_CHANGE,
        address=Address(NAKANO, "弥生町一丁目1番1号"),
        occurred_on=DAY + dt.timedelta(days=30),
        notified_on=DAY + dt.timedelta(days=30),
    )
    state = fold([_birth(), _move_out(), _move_in(), stale])
    assert state is not None and state.address.municipality_code == OSAKA


def test_deletion_then_move_in_revives() -> None:
    deletion = notification(
        notification_id="del", change_kind=ChangeKind.EX_OFFICIO_DELETION, occurred_on=DAY, notified_on=DAY
    )
    later = _move_in(day=DAY + dt.timedelta(days=40), notified=DAY + dt.timedelta(days=40))
    assert fold([later, deletion, _birth()]).status is ResidentStatus.CURRENT  # type: ignore[union-attr]
    assert fold([deletion, _birth()]).status is ResidentStatus.DELETED  # type: ignore[union-attr]


# --- property: any permutation of arrivals folds to the same state --------------------------------

_MUNICIPALITIES = (NAKANO, SHIBUYA, OSAKA)
_KINDS = (
    ChangeKind.MOVE_IN,
    ChangeKind.MOVE_OUT,
    ChangeKind.ADDRESS_CHANGE,
    ChangeKind.NAME_CHANGE,
    ChangeKind.DEATH,
    ChangeKind.EX_OFFICIO_DELETION,
    ChangeKind.EX_OFFICIO_ENTRY,
    ChangeKind.EX_OFFICIO_CORRECTION,
    ChangeKind.RESIDENT_CODE_CHANGE,
)


@st.composite
def _events(draw: st.DrawFn) -> list[Notification]:
    count = draw(st.integers(min_value=1, max_value=8))
    events = [_birth()]
    for index in range(count):
        kind = draw(st.sampled_from(_KINDS))
        place = draw(st.sampled_from(_MUNICIPALITIES))
        other = draw(st.sampled_from([m for m in _MUNICIPALITIES if m != place]))
        day = DAY + dt.timedelta(days=draw(st.integers(min_value=0, max_value=5)))
        events.append(
            notification(
                notification_id=f"e{index}",
                municipality_code=place,
                sequence=draw(st.integers(min_value=1, max_value=3)),
                change_kind=kind,
                family_name=draw(st.sampled_from(["山田", "佐藤", "鈴木"])),
                address=Address(place, draw(st.sampled_from(["中央一丁目1番1号", "本町二丁目2番2号"]))),
                occurred_on=day,
                notified_on=day + dt.timedelta(days=draw(st.integers(min_value=0, max_value=3))),
                previous_municipality_code=other if kind is ChangeKind.MOVE_IN else None,
                next_municipality_code=other if kind is ChangeKind.MOVE_OUT else None,
                new_resident_code=OTHER_CODE if kind is ChangeKind.RESIDENT_CODE_CHANGE else None,
            )
        )
    # Redelivery: some events arrive twice.
    repeats = draw(st.lists(st.sampled_from(events), max_size=3))
    return events + repeats


@settings(max_examples=300, deadline=None)
@given(events=_events(), data=st.data())
def test_any_arrival_order_folds_to_the_same_state(events: list[Notification], data: st.DataObject) -> None:
    arrival = data.draw(st.permutations(events))
    assert fold(arrival, resident_code=CODE) == fold(events, resident_code=CODE)
    assert fold(arrival, resident_code=OTHER_CODE) == fold(events, resident_code=OTHER_CODE)
    assert sort_events(arrival) == sort_events(events)


@settings(max_examples=100, deadline=None)
@given(events=_events(), data=st.data())
def test_version_counts_distinct_events(events: list[Notification], data: st.DataObject) -> None:
    state = fold(data.draw(st.permutations(events)), resident_code=CODE)
    assert state is not None
    assert state.version == len({e.notification_id for e in events})


def test_dataclass_replace_keeps_equality_semantics() -> None:
    # Folds compare by value: two equal event sets built separately give equal states.
    a = fold([_birth(), _move_out(), _move_in()])
    b = fold([dataclasses.replace(_move_in()), _move_out(), _birth()])
    assert a == b


# --- property: the fast paths give exactly the full fold ------------------------------------------


def _reference_sort(events: list[Notification]) -> list[Notification]:
    """The fold order as specified: one sort by the full key (fingerprint included), first id kept."""
    seen: set[str] = set()
    unique: list[Notification] = []
    for event in sorted(events, key=event_order):
        if event.notification_id not in seen:
            seen.add(event.notification_id)
            unique.append(event)
    return unique


@settings(max_examples=300, deadline=None)
@given(events=_events(), data=st.data())
def test_sort_events_equals_the_full_key_sort(events: list[Notification], data: st.DataObject) -> None:
    arrival = data.draw(st.permutations(events))
    # Same id with other content (a malformed duplicate) must also order by the fingerprint.
    if data.draw(st.booleans()):
        arrival = [*arrival, dataclasses.replace(arrival[0], family_name="別人")]
    assert sort_events(arrival) == _reference_sort(arrival)


@settings(max_examples=300, deadline=None)
@given(events=_events(), data=st.data())
def test_fold_each_equals_folding_every_prefix(events: list[Notification], data: st.DataObject) -> None:
    arrival = data.draw(st.permutations(events))
    if data.draw(st.booleans()):
        arrival = [*arrival, dataclasses.replace(arrival[0], family_name="別人")]
    split = data.draw(st.integers(min_value=0, max_value=len(arrival)))
    known, fresh = arrival[:split], arrival[split:]
    for code in (CODE, OTHER_CODE):
        expected = [fold([*known, *fresh[: i + 1]], resident_code=code) for i in range(len(fresh))]
        assert fold_each(known, fresh, code) == expected


def test_fold_each_in_order_and_out_of_order() -> None:
    birth, out, arrive = _birth(), _move_out(), _move_in()
    in_order = fold_each([], [birth, out, arrive], CODE)
    assert [s.version for s in in_order if s is not None] == [1, 2, 3]
    late = fold_each([arrive], [out, birth], CODE)
    assert late[-1] == fold([birth, out, arrive])
