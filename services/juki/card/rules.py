"""住基カード rules, pure and in one place: validity, state on a given day, PIN format and hashing.

Dates follow DOMAIN.md and :mod:`juki.domain.changes`:

* cards exist from the second phase (2003-08-25); the last day of issuance and renewal is 2015-12-22
  (:data:`~juki.domain.CARD_ISSUANCE_ENDS`), so 2015-12-23 is refused with CARD_ISSUANCE_ENDED;
* a card is valid through the same calendar date 10 years after issue (29 February -> 28 February);
  a foreign resident's card through the end of the period of stay when that is earlier; it is expired
  from the next day;
* from 2012-07-09 a card stays usable after its holder moves (continued use); before, it lapses with
  the move-in at the new municipality;
* 転入転出の特例 (法 24条の2): a 付記転出届 is accepted from 14 days before its planned move date, or
  within 14 days after a move already made (planned date from 14 days before today to 14 days after
  it); the 特例転入 must come within 14 days of the actual move-in and no later than 30 days after the
  planned date, whichever is earlier: the last day is accepted, the next refused with
  SPECIAL_MOVE_IN_EXPIRED.

Stored states are ACTIVE, LOCKED, SUSPENDED and REVOKED; EXPIRED is never stored but evaluated
against the business clock, so a card expires without anyone touching it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from juki import domain
from juki._gen.juki.card.v1 import card_pb2
from juki.mesh.errors import JukiError, Reason, invalid

MAX_PIN_ATTEMPTS = 3
RENEWAL_WINDOW_DAYS = 90
"""A card may be renewed from this many days before its expiry (the old card is then revoked)."""

_PIN = re.compile(r"[0-9]{4}")
# scrypt with N=2**14, r=8, p=1: ~16 MiB and tens of milliseconds per check; a 4-digit PIN space is
# tiny, so the hash must be slow and salted per card (the lockout is the real protection).
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

ACTIVE = card_pb2.CARD_STATE_ACTIVE
LOCKED = card_pb2.CARD_STATE_LOCKED
SUSPENDED = card_pb2.CARD_STATE_SUSPENDED
REVOKED = card_pb2.CARD_STATE_REVOKED
EXPIRED = card_pb2.CARD_STATE_EXPIRED


def check_pin_format(pin: str, field: str = "pin") -> None:
    if not _PIN.fullmatch(pin):
        raise invalid(field, "the PIN (暗証番号) is exactly 4 digits")


def hash_pin(pin: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """(salt, scrypt hash) of a PIN; CPU-bound, call it off the event loop."""
    salt = salt or os.urandom(16)
    return salt, hashlib.scrypt(pin.encode(), salt=salt, **_SCRYPT)


def pin_matches(pin: str, salt: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(hash_pin(pin, salt)[1], expected)


def add_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def check_issuance(today: dt.date) -> None:
    """Refuse issuance (and renewal) outside 2003-08-25 .. 2015-12-22."""
    if today > domain.CARD_ISSUANCE_ENDS:
        raise JukiError(Reason.CARD_ISSUANCE_ENDED,
                        f"住基カード issuance and renewal ended on {domain.CARD_ISSUANCE_ENDS}; today is {today}")
    if today < domain.SECOND_PHASE:
        raise JukiError(Reason.FAILED_PRECONDITION, f"住基カード are issued from {domain.SECOND_PHASE}")


def expiry(issued_on: dt.date, period_of_stay_end: dt.date | None) -> dt.date:
    """Last day of validity: 10 years, or the end of the period of stay if earlier (foreign residents)."""
    ten_years = add_years(issued_on, domain.CARD_VALIDITY_YEARS)
    if period_of_stay_end is not None and period_of_stay_end < ten_years:
        return period_of_stay_end
    return ten_years


@dataclass(frozen=True)
class CardFacts:
    """What the rules need of a stored card."""

    stored_state: int
    expires_on: dt.date


def effective_state(card: CardFacts, today: dt.date) -> int:
    """The state on ``today``: revoked wins, then expiry, then suspension or lock."""
    if card.stored_state == REVOKED:
        return REVOKED
    if today > card.expires_on:
        return EXPIRED
    return card.stored_state


def require_usable(card: CardFacts, today: dt.date, *, allow_locked: bool = False) -> None:
    """Refuse any use of a card that is revoked, expired, suspended or (unless allowed) locked."""
    state = effective_state(card, today)
    if state == REVOKED:
        raise JukiError(Reason.CARD_REVOKED)
    if state == EXPIRED:
        raise JukiError(Reason.CARD_EXPIRED, f"the card expired after {card.expires_on}")
    if state == SUSPENDED:
        raise JukiError(Reason.CARD_SUSPENDED)
    if state == LOCKED and not allow_locked:
        raise JukiError(Reason.CARD_LOCKED)


def continued_use_after_move(move_in_on: dt.date) -> bool:
    """Whether the card stays valid after its holder moves in elsewhere on ``move_in_on``."""
    return move_in_on >= domain.CONTINUED_CARD_USE_AFTER_MOVE


def check_special_move_out(planned_move_on: dt.date, today: dt.date) -> None:
    """A 付記転出届 filed ``today``: from 14 days before the planned date, or within 14 days after the move."""
    days = dt.timedelta(days=domain.SPECIAL_MOVE_IN_DAYS)
    if planned_move_on > today + days:
        raise invalid("planned_move_on", f"a 付記転出届 is accepted from {domain.SPECIAL_MOVE_IN_DAYS} days before"
                                         f" the planned move date ({planned_move_on - days} at the earliest)")
    if planned_move_on < today - days:
        raise invalid("planned_move_on", f"the planned move date lies more than {domain.SPECIAL_MOVE_IN_DAYS} days"
                                         " in the past")


def special_move_in_deadline(planned_move_on: dt.date, moved_in_on: dt.date | None = None) -> dt.date:
    """Last day of the 特例転入: 30 days after the planned move date, and (once the move-in date is known)
    no later than 14 days after it."""
    latest = planned_move_on + dt.timedelta(days=domain.SPECIAL_MOVE_IN_AFTER_PLANNED_DAYS)
    if moved_in_on is None:
        return latest
    return min(latest, moved_in_on + dt.timedelta(days=domain.SPECIAL_MOVE_IN_DAYS))


def check_special_move_in(deadline: dt.date, moved_in_on: dt.date, today: dt.date) -> None:
    """``deadline`` is the one given at filing (:func:`special_move_in_deadline` of the planned date)."""
    last = min(deadline, moved_in_on + dt.timedelta(days=domain.SPECIAL_MOVE_IN_DAYS))
    if today > last:
        raise JukiError(
            Reason.SPECIAL_MOVE_IN_EXPIRED,
            f"the special move-in had to be made by {last} (within {domain.SPECIAL_MOVE_IN_DAYS} days of the"
            f" move-in on {moved_in_on}, and by {deadline}); today is {today}",
        )
