"""The national view of one resident: a deterministic fold of that resident's notifications.

Notifications reach the national centre late and out of order — the 転入 at one prefecture may overtake
the 転出 at another. The centre therefore never applies them in arrival order: it sorts them by
:func:`event_order` and folds from scratch (or from a checkpoint of a prefix that is still a prefix).
The same set of events gives the same :class:`ResidentState` whatever order they arrived in.

Order (each step a tie-break of the one before):

1. ``occurred_on`` (異動年月日) — when it happened, not when it was told;
2. kind precedence within one day: 出生 first; departures (転出, 職権消除) before arrivals (転入, 特例転入,
   職権記載), so a same-day 転出 from A and 転入 into B end in B; then corrections (転居, 氏名変更, ...);
   then 住民票コード変更 (so same-day corrections still land on the old code); 死亡 last;
3. ``notified_on``, ``municipality_code``, ``sequence``, ``notification_id``;
4. a fingerprint of the whole notification, so even a malformed duplicate id orders deterministically.

Events with one ``notification_id`` are applied once (the first in this order): relays deliver at least
once, the fold makes it exactly once.

Rules of the fold (decisions, documented here and nowhere else):

* Every notification carries the full record after the change, so applying one replaces the identity
  fields (names, birth date, sex, kind, address) with its snapshot and sets the status by its kind.
* Only the municipality holding the record (its ``address.municipality_code``) may move it out, delete it
  ex officio or correct it; such an event from another municipality is stale and changes nothing. So when
  the 転入 into B happened on an earlier date than the planned 転出 date in A, the later-sorted 転出 is
  ignored and the resident still lives in B. Entries (転入, 職権記載, ...) and 死亡 apply from anywhere.
* A 転出 applies only to a CURRENT record; corrections keep the status (a 除票 stays one).
* 死亡 is terminal: afterwards only 職権修正 (EX_OFFICIO_CORRECTION) still amends the identity fields of
  the 除票 (the status stays DECEASED); every other event is recorded (``version``) but changes nothing.
* 住民票コード変更 is modelled per code: in the old code's stream it is terminal (CODE_RETIRED with
  ``successor_code``); in the new code's stream it is the entry that starts the record
  (``predecessor_code``). Events after retirement under the old code change nothing.
* 職権消除 gives DELETED; a later entry (転入, 職権記載) revives the record as CURRENT.
* ``version`` counts distinct events folded, applied or not: any new event changes it, so it serves as
  an ETag / change-feed position.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .changes import ChangeGroup, ChangeKind
from .validation import Notification
from .values import Address, PartialDate, ResidentKind, Sex

__all__ = [
    "KIND_PRECEDENCE",
    "ResidentState",
    "ResidentStatus",
    "event_order",
    "fold",
    "fold_each",
    "sort_events",
]


class ResidentStatus(enum.Enum):
    """Where a record stands nationally."""

    CURRENT = "CURRENT"
    """Lives at ``address``."""
    DECEASED = "DECEASED"
    """死亡: terminal."""
    MOVED_OUT = "MOVED_OUT"
    """転出 seen, no 転入 yet (or moved abroad); ``address`` is the one left."""
    DELETED = "DELETED"
    """職権消除: the municipality found the resident not living there."""
    CODE_RETIRED = "CODE_RETIRED"
    """This 住民票コード was replaced by ``successor_code``; never reused."""


KIND_PRECEDENCE: dict[ChangeKind, int] = {
    ChangeKind.BIRTH: 0,
    ChangeKind.MOVE_OUT: 1,
    ChangeKind.EX_OFFICIO_DELETION: 1,
    ChangeKind.MOVE_IN: 2,
    ChangeKind.SPECIAL_MOVE_IN: 2,
    ChangeKind.EX_OFFICIO_ENTRY: 2,
    ChangeKind.ADDRESS_CHANGE: 3,
    ChangeKind.NAME_CHANGE: 3,
    ChangeKind.COMMON_NAME_CHANGE: 3,
    ChangeKind.NATIONALITY_CHANGE: 3,
    ChangeKind.EX_OFFICIO_CORRECTION: 3,
    ChangeKind.RESIDENT_CODE_CHANGE: 4,
    ChangeKind.DEATH: 5,
}
"""Order of kinds within one 異動年月日 (lower first); see the module docstring."""


@dataclass(frozen=True, slots=True)
class ResidentState:
    """The national record of one 住民票コード after folding its events."""

    resident_code: str
    resident_kind: ResidentKind
    family_name: str
    given_name: str
    kana: str | None
    alphabetic_name: str | None
    common_name: str | None
    former_family_name: str | None
    birth_date: PartialDate
    sex: Sex
    address: Address
    status: ResidentStatus
    last_change_kind: ChangeKind
    last_changed_on: _dt.date
    last_notified_on: _dt.date
    version: int
    death_date: _dt.date | None = None
    successor_code: str | None = None
    predecessor_code: str | None = None
    moved_to_municipality_code: str | None = None


def _fingerprint(event: Notification) -> str:
    return hashlib.sha256(repr(event).encode()).hexdigest()


def _order_prefix(event: Notification) -> tuple[_dt.date, int, _dt.date, str, int, str]:
    """:func:`event_order` without its last element, the fingerprint (costly, needed only on ties)."""
    return (
        event.occurred_on,
        KIND_PRECEDENCE[event.change_kind],
        event.notified_on,
        event.municipality_code,
        event.sequence,
        event.notification_id,
    )


def event_order(event: Notification) -> tuple[_dt.date, int, _dt.date, str, int, str, str]:
    """The sort key of the fold (see the module docstring); total over distinct notifications."""
    return (*_order_prefix(event), _fingerprint(event))


def _sorted_by_event_order(events: list[Notification]) -> list[Notification]:
    """``sorted(events, key=event_order)``, computing fingerprints only within runs of equal prefixes.

    The key is lexicographic and both sorts are stable, so sorting by the prefix and then each run of
    equal prefixes by the fingerprint gives exactly the same list.
    """
    if len(events) < 2:
        return list(events)
    keyed = sorted(((_order_prefix(e), e) for e in events), key=lambda pair: pair[0])
    ordered: list[Notification] = []
    start = 0
    count = len(keyed)
    while start < count:
        end = start + 1
        prefix = keyed[start][0]
        while end < count and keyed[end][0] == prefix:
            end += 1
        if end - start == 1:
            ordered.append(keyed[start][1])
        else:
            ordered.extend(sorted((pair[1] for pair in keyed[start:end]), key=_fingerprint))
        start = end
    return ordered


def sort_events(events: Iterable[Notification]) -> list[Notification]:
    """Events in fold order with repeated ``notification_id`` removed (first in order kept)."""
    seen: set[str] = set()
    unique: list[Notification] = []
    for event in _sorted_by_event_order(list(events)):
        if event.notification_id not in seen:
            seen.add(event.notification_id)
            unique.append(event)
    return unique


def _concerned_codes(event: Notification) -> set[str]:
    codes = {event.resident_code}
    if event.change_kind is ChangeKind.RESIDENT_CODE_CHANGE and event.new_resident_code is not None:
        codes.add(event.new_resident_code)
    return codes


def _concerns(event: Notification, code: str) -> bool:
    return event.resident_code == code or (
        event.change_kind is ChangeKind.RESIDENT_CODE_CHANGE and event.new_resident_code == code
    )


def _perspective(events: list[Notification]) -> str:
    common: set[str] | None = None
    for event in events:
        codes = _concerned_codes(event)
        common = codes if common is None else common & codes
    if common is None or len(common) != 1:
        raise ValueError(
            "cannot tell whose state to fold (events of several codes, or only a code change): "
            "pass resident_code"
        )
    return next(iter(common))


def _snapshot(
    event: Notification,
    code: str,
    version: int,
    status: ResidentStatus,
    *,
    death_date: _dt.date | None = None,
    successor_code: str | None = None,
    predecessor_code: str | None = None,
    moved_to_municipality_code: str | None = None,
) -> ResidentState:
    # One construction (not a snapshot plus dataclasses.replace): the fold builds one state per event.
    return ResidentState(
        resident_code=code,
        resident_kind=event.resident_kind,
        family_name=event.family_name,
        given_name=event.given_name,
        kana=event.kana,
        alphabetic_name=event.alphabetic_name,
        common_name=event.common_name,
        former_family_name=event.former_family_name,
        birth_date=event.birth_date,
        sex=event.sex,
        address=event.address,
        status=status,
        last_change_kind=event.change_kind,
        last_changed_on=event.occurred_on,
        last_notified_on=event.notified_on,
        version=version,
        death_date=death_date,
        successor_code=successor_code,
        predecessor_code=predecessor_code,
        moved_to_municipality_code=moved_to_municipality_code,
    )


_STATUS_AFTER: dict[ChangeKind, ResidentStatus] = {
    ChangeKind.MOVE_OUT: ResidentStatus.MOVED_OUT,
    ChangeKind.DEATH: ResidentStatus.DECEASED,
    ChangeKind.EX_OFFICIO_DELETION: ResidentStatus.DELETED,
}


_HOLDER_ONLY: frozenset[ChangeKind] = frozenset(
    {
        ChangeKind.MOVE_OUT,
        ChangeKind.EX_OFFICIO_DELETION,
        ChangeKind.ADDRESS_CHANGE,
        ChangeKind.NAME_CHANGE,
        ChangeKind.COMMON_NAME_CHANGE,
        ChangeKind.NATIONALITY_CHANGE,
        ChangeKind.EX_OFFICIO_CORRECTION,
    }
)
"""Kinds only the municipality holding the record may apply; from anywhere else they are stale."""


def _apply(state: ResidentState | None, event: Notification, code: str) -> ResidentState:
    version = 1 if state is None else state.version + 1
    kind = event.change_kind

    if kind is ChangeKind.RESIDENT_CODE_CHANGE and event.new_resident_code == code:
        # The new code's record begins here, carrying the identity from the change notification.
        return _snapshot(event, code, version, ResidentStatus.CURRENT, predecessor_code=event.resident_code)

    if state is None:
        status = _STATUS_AFTER.get(kind, ResidentStatus.CURRENT)
        if kind is ChangeKind.RESIDENT_CODE_CHANGE:
            return _snapshot(
                event, code, version, ResidentStatus.CODE_RETIRED, successor_code=event.new_resident_code
            )
        return _snapshot(
            event,
            code,
            version,
            status,
            death_date=event.occurred_on if kind is ChangeKind.DEATH else None,
            moved_to_municipality_code=event.next_municipality_code,
        )

    unchanged = replace(state, version=version)
    holder = state.address.municipality_code
    if state.status is ResidentStatus.CODE_RETIRED:
        return unchanged
    if state.status is ResidentStatus.DECEASED:
        if kind is ChangeKind.EX_OFFICIO_CORRECTION and event.municipality_code == holder:
            return _snapshot(
                event,
                code,
                version,
                ResidentStatus.DECEASED,
                death_date=state.death_date,
                predecessor_code=state.predecessor_code,
            )
        return unchanged
    if kind in _HOLDER_ONLY and event.municipality_code != holder:
        return unchanged
    if kind is ChangeKind.MOVE_OUT and state.status is not ResidentStatus.CURRENT:
        return unchanged

    predecessor = state.predecessor_code
    if kind is ChangeKind.RESIDENT_CODE_CHANGE:
        return _snapshot(
            event,
            code,
            version,
            ResidentStatus.CODE_RETIRED,
            successor_code=event.new_resident_code,
            predecessor_code=predecessor,
        )
    if kind.group is ChangeGroup.CORRECTION:
        # A correction amends the record without changing where it stands (a 除票 stays one).
        return _snapshot(
            event,
            code,
            version,
            state.status,
            moved_to_municipality_code=state.moved_to_municipality_code,
            predecessor_code=predecessor,
        )
    status = _STATUS_AFTER.get(kind, ResidentStatus.CURRENT)
    return _snapshot(
        event,
        code,
        version,
        status,
        death_date=event.occurred_on if kind is ChangeKind.DEATH else None,
        moved_to_municipality_code=event.next_municipality_code,
        predecessor_code=predecessor,
    )


def fold(events: Iterable[Notification], resident_code: str | None = None) -> ResidentState | None:
    """The state of ``resident_code`` after all ``events``, whatever order they are given in.

    ``events`` are the notifications concerning that code (a 住民票コード変更 concerns both its old and
    new code); events about other codes are ignored. When ``resident_code`` is omitted it is inferred
    as the one code every event concerns; ``ValueError`` if that is ambiguous (e.g. only a code
    change). Returns ``None`` when there is nothing to fold.
    """
    ordered = sort_events(events)
    if not ordered:
        return None
    code = resident_code if resident_code is not None else _perspective(ordered)
    state: ResidentState | None = None
    for event in ordered:
        if _concerns(event, code):
            state = _apply(state, event, code)
    return state


def fold_each(
    known: Iterable[Notification], fresh: Iterable[Notification], resident_code: str
) -> list[ResidentState | None]:
    """``[fold([*known, *fresh[:i + 1]], resident_code) for i in range(len(fresh))]``, computed faster.

    ``known`` is folded once; each fresh event that sorts strictly after every event before it (and
    repeats no ``notification_id``) is applied to the previous state, which is what the full fold
    would do with it. Any other event (out of order, a tie, a repeated id) is folded from scratch
    over everything so far, so the result is always that of :func:`fold`.
    """
    so_far = list(known)
    ordered = sort_events(so_far)
    state: ResidentState | None = None
    for event in ordered:
        if _concerns(event, resident_code):
            state = _apply(state, event, resident_code)
    seen = {event.notification_id for event in so_far}
    last = max((_order_prefix(event) for event in so_far), default=None)
    states: list[ResidentState | None] = []
    for event in fresh:
        so_far.append(event)
        prefix = _order_prefix(event)
        if event.notification_id not in seen and (last is None or prefix > last):
            if _concerns(event, resident_code):
                state = _apply(state, event, resident_code)
        else:
            state = fold(so_far, resident_code)
        seen.add(event.notification_id)
        if last is None or prefix > last:
            last = prefix
        states.append(state)
    return states
