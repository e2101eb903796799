"""The 本人確認情報 change notification and the rules it must pass before anything stores it.

A municipality sends one :class:`Notification` per change (異動). Every notification carries the whole
record as it stands *after* the change (the four items, kind, code, address), not a diff: this is how
the network transmits 本人確認情報, and it lets the national fold stay correct when notifications arrive
late or out of order.

:func:`check_notification` normalises the text fields and returns the normalised copy with every
violation found (not just the first), so a caller can answer with one ``BadRequest`` listing them all.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
from collections.abc import Callable
from dataclasses import dataclass

from .changes import (
    FOREIGN_RESIDENTS_JOIN,
    FOREIGN_RESIDENTS_REGISTERED,
    NETWORK_START,
    SECOND_PHASE,
    ChangeKind,
)
from .codes import is_municipality, is_valid_local_government_code, is_valid_resident_code
from .names import (
    InvalidText,
    normalise_alphabetic_name,
    normalise_kana,
    normalise_name,
    normalise_street,
)
from .values import Address, PartialDate, ResidentKind, Sex

__all__ = [
    "FORMER_NAME_RECORDED",
    "MAX_NOTIFICATION_ID_LENGTH",
    "FieldViolation",
    "Notification",
    "ViolationReason",
    "check_notification",
    "normalise_notification",
    "validate_notification",
]

FORMER_NAME_RECORDED = _dt.date(2019, 11, 5)
"""旧氏 can be recorded on the 住民票 from this date (住基法施行令 amendment)."""

MAX_NOTIFICATION_ID_LENGTH = 128


class ViolationReason(enum.StrEnum):
    """Why a field was refused; the strings are the stable reasons of the error catalog."""

    INVALID_FIELD = "INVALID_FIELD"
    CHECK_DIGIT_MISMATCH = "CHECK_DIGIT_MISMATCH"
    UNKNOWN_MUNICIPALITY = "UNKNOWN_MUNICIPALITY"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One refused field, shaped like ``google.rpc.BadRequest.FieldViolation`` plus a stable reason.

    ``field`` is the dotted attribute path of :class:`Notification` (``address.municipality_code``).
    """

    field: str
    description: str
    reason: ViolationReason = ViolationReason.INVALID_FIELD


@dataclass(frozen=True, slots=True)
class Notification:
    """One change of one resident's 本人確認情報, as sent by the municipality ``municipality_code``.

    ``sequence`` numbers the municipality's notifications (1, 2, ...). The name fields follow the
    住民票: ``family_name``/``given_name`` (for a foreign resident, in the script of the residence card;
    ``given_name`` may be empty for a single name), ``kana`` (フリガナ, optional), ``alphabetic_name``
    (foreign residents only, required for them), ``common_name`` (通称, foreign residents only) and
    ``former_family_name`` (旧氏). ``address`` is the address in the notifying municipality — for a
    転出 the address being left; the destination is ``next_municipality_code``.
    ``previous_municipality_code`` (転入, 特例転入) and ``next_municipality_code`` (転出) are ``None`` for
    a move from or to abroad (国外). ``new_resident_code`` is set only for 住民票コード変更.
    """

    notification_id: str
    municipality_code: str
    sequence: int
    change_kind: ChangeKind
    resident_code: str
    resident_kind: ResidentKind
    family_name: str
    given_name: str
    birth_date: PartialDate
    sex: Sex
    address: Address
    occurred_on: _dt.date
    notified_on: _dt.date
    kana: str | None = None
    alphabetic_name: str | None = None
    common_name: str | None = None
    former_family_name: str | None = None
    new_resident_code: str | None = None
    previous_municipality_code: str | None = None
    next_municipality_code: str | None = None


def _is_latin(text: str) -> bool:
    return any(c.isascii() and c.isalpha() for c in text) and all(
        c.isascii()
        or ("\u00c0" <= c <= "\u024f")
        or ("\u1e00" <= c <= "\u1eff")
        or c.isspace()
        or "\uff01" <= c <= "\uff5e"
        for c in text
    )


def _foreign_name_part(text: str) -> str:
    """A foreign resident's 氏/名 in Latin script is kept as on the residence card, not widened."""
    return normalise_alphabetic_name(text) if _is_latin(text) else normalise_name(text)


def _normalise(
    value: str | None,
    field: str,
    normaliser: Callable[[str], str],
    violations: list[FieldViolation],
) -> str | None:
    if value is None:
        return None
    try:
        return normaliser(value)
    except InvalidText as error:
        violations.append(FieldViolation(field, f"{field} {error.description}"))
        return value


def check_notification(
    notification: Notification, today: _dt.date
) -> tuple[Notification, list[FieldViolation]]:
    """Normalise ``notification`` and check every rule; return the normalised copy and all violations.

    ``today`` is the business date (Japan time) of the receiving tier. An empty list means the
    notification may be stored as returned.
    """
    violations: list[FieldViolation] = []
    normal = _normalise_into(notification, violations)
    _check_identifiers(normal, violations)
    _check_codes(normal, violations)
    _check_dates(normal, today, violations)
    _check_kind_rules(normal, violations)
    _check_names(normal, violations)
    return normal, violations


def validate_notification(notification: Notification, today: _dt.date) -> list[FieldViolation]:
    """Every violation of ``notification`` (see :func:`check_notification`); empty when it is valid."""
    return check_notification(notification, today)[1]


def normalise_notification(notification: Notification) -> Notification:
    """The notification with its names and street in their stored spelling (see :mod:`.names`).

    Text that cannot be normalised is left as it is; :func:`validate_notification` reports it.
    """
    return _normalise_into(notification, [])


def _normalise_into(notification: Notification, violations: list[FieldViolation]) -> Notification:
    foreign = notification.resident_kind is ResidentKind.FOREIGN
    name_part = _foreign_name_part if foreign else normalise_name
    family_name = _normalise(notification.family_name, "family_name", name_part, violations)
    given_name: str | None = notification.given_name
    if foreign and not notification.given_name.strip():
        given_name = ""  # a single name (no given name) is allowed for foreign residents
    else:
        given_name = _normalise(notification.given_name, "given_name", name_part, violations)
    street = _normalise(notification.address.street, "address.street", normalise_street, violations) or ""
    family_name = family_name or ""
    given_name = given_name or ""
    kana = _normalise(notification.kana, "kana", normalise_kana, violations)
    alphabetic_name = _normalise(
        notification.alphabetic_name, "alphabetic_name", normalise_alphabetic_name, violations
    )
    common_name = _normalise(notification.common_name, "common_name", normalise_name, violations)
    former_family_name = _normalise(notification.former_family_name, "former_family_name", name_part, violations)
    if (
        family_name == notification.family_name
        and given_name == notification.given_name
        and street == notification.address.street
        and kana == notification.kana
        and alphabetic_name == notification.alphabetic_name
        and common_name == notification.common_name
        and former_family_name == notification.former_family_name
    ):
        return notification  # already in its stored spelling (frozen, so sharing it is safe)
    address = notification.address
    return dataclasses.replace(
        notification,
        family_name=family_name,
        given_name=given_name,
        kana=kana,
        alphabetic_name=alphabetic_name,
        common_name=common_name,
        former_family_name=former_family_name,
        address=address if street == address.street else dataclasses.replace(address, street=street),
    )


def _check_identifiers(notification: Notification, violations: list[FieldViolation]) -> None:
    identifier = notification.notification_id
    if not identifier or len(identifier) > MAX_NOTIFICATION_ID_LENGTH or not identifier.isprintable():
        violations.append(
            FieldViolation(
                "notification_id",
                f"notification_id must be 1..{MAX_NOTIFICATION_ID_LENGTH} printable characters",
            )
        )
    if notification.sequence < 1:
        violations.append(FieldViolation("sequence", "sequence must be a positive integer"))


def _municipality_violation(code: str, field: str) -> FieldViolation | None:
    """The violation of a municipality code, by the most specific reason; ``None`` when it is fine."""
    if not (len(code) == 6 and code.isascii() and code.isdigit()):
        return FieldViolation(field, f"{field} must be a 6-digit local-government code")
    if not is_valid_local_government_code(code):
        return FieldViolation(
            field, f"{field} {code} fails the JIS X 0402 check digit", ViolationReason.CHECK_DIGIT_MISMATCH
        )
    if not is_municipality(code):
        return FieldViolation(
            field, f"{field} {code} is not a listed municipality", ViolationReason.UNKNOWN_MUNICIPALITY
        )
    return None


def _resident_code_violation(code: str, field: str) -> FieldViolation | None:
    if not (len(code) == 11 and code.isascii() and code.isdigit()):
        return FieldViolation(field, f"{field} must be 11 digits")
    if not is_valid_resident_code(code):
        return FieldViolation(field, f"{field} fails the check digit", ViolationReason.CHECK_DIGIT_MISMATCH)
    return None


def _check_codes(notification: Notification, violations: list[FieldViolation]) -> None:
    for found in (
        _resident_code_violation(notification.resident_code, "resident_code"),
        _municipality_violation(notification.municipality_code, "municipality_code"),
    ):
        if found is not None:
            violations.append(found)
    address_code = notification.address.municipality_code
    if address_code != notification.municipality_code:
        # The record a municipality sends is always one of its own residents (for a 転出, the address
        # being left), so the address lies in the notifying municipality whatever the kind.
        violations.append(
            FieldViolation(
                "address.municipality_code",
                f"address.municipality_code {address_code} differs from the notifying municipality "
                f"{notification.municipality_code}",
            )
        )


def _check_dates(notification: Notification, today: _dt.date, violations: list[FieldViolation]) -> None:
    occurred, notified = notification.occurred_on, notification.notified_on
    if occurred > notified:
        violations.append(
            FieldViolation("occurred_on", f"occurred_on {occurred} is after notified_on {notified}")
        )
    if notified > today:
        violations.append(FieldViolation("notified_on", f"notified_on {notified} is after today {today}"))
    if notified < NETWORK_START:
        violations.append(
            FieldViolation(
                "notified_on", f"notified_on {notified} is before the network began ({NETWORK_START})"
            )
        )
    if notification.resident_kind is ResidentKind.FOREIGN:
        if notified < FOREIGN_RESIDENTS_JOIN:
            violations.append(
                FieldViolation(
                    "resident_kind",
                    f"foreign residents are notified from {FOREIGN_RESIDENTS_JOIN}, not on {notified}",
                )
            )
        if occurred < FOREIGN_RESIDENTS_REGISTERED:
            violations.append(
                FieldViolation(
                    "occurred_on",
                    f"foreign residents have a 住民票 from {FOREIGN_RESIDENTS_REGISTERED}, not on {occurred}",
                )
            )
    if notification.birth_date.earliest() > occurred:
        violations.append(
            FieldViolation(
                "birth_date", f"birth_date {notification.birth_date} is after occurred_on {occurred}"
            )
        )
    if notification.former_family_name is not None and notified < FORMER_NAME_RECORDED:
        violations.append(
            FieldViolation(
                "former_family_name", f"旧氏 (former family name) is recorded from {FORMER_NAME_RECORDED}"
            )
        )


def _check_kind_rules(notification: Notification, violations: list[FieldViolation]) -> None:
    kind = notification.change_kind
    foreign = notification.resident_kind is ResidentKind.FOREIGN

    new_code = notification.new_resident_code
    if kind is ChangeKind.RESIDENT_CODE_CHANGE:
        if new_code is None:
            violations.append(
                FieldViolation("new_resident_code", "a 住民票コード変更 needs new_resident_code")
            )
        else:
            found = _resident_code_violation(new_code, "new_resident_code")
            if found is not None:
                violations.append(found)
            elif new_code == notification.resident_code:
                violations.append(
                    FieldViolation("new_resident_code", "new_resident_code must differ from resident_code")
                )
    elif new_code is not None:
        violations.append(
            FieldViolation(
                "new_resident_code", f"new_resident_code is only for {ChangeKind.RESIDENT_CODE_CHANGE.value}"
            )
        )

    previous = notification.previous_municipality_code
    if kind in (ChangeKind.MOVE_IN, ChangeKind.SPECIAL_MOVE_IN):
        if previous is None:
            if kind is ChangeKind.SPECIAL_MOVE_IN:
                violations.append(
                    FieldViolation(
                        "previous_municipality_code", "a 特例転入 needs the municipality moved from"
                    )
                )
        else:
            _check_other_municipality(notification, previous, "previous_municipality_code", violations)
    elif previous is not None:
        violations.append(
            FieldViolation("previous_municipality_code", "previous_municipality_code is only for 転入")
        )

    following = notification.next_municipality_code
    if kind is ChangeKind.MOVE_OUT:
        if following is not None:
            _check_other_municipality(notification, following, "next_municipality_code", violations)
    elif following is not None:
        violations.append(FieldViolation("next_municipality_code", "next_municipality_code is only for 転出"))

    if kind is ChangeKind.SPECIAL_MOVE_IN and notification.occurred_on < SECOND_PHASE:
        violations.append(
            FieldViolation("change_kind", f"特例転入 exists from {SECOND_PHASE} (needs a 住基カード)")
        )
    if kind is ChangeKind.COMMON_NAME_CHANGE and not foreign:
        violations.append(FieldViolation("change_kind", "通称 changes are for foreign residents only"))
    if kind is ChangeKind.BIRTH:
        birth = notification.birth_date
        if not birth.is_complete or birth.to_date() != notification.occurred_on:
            violations.append(
                FieldViolation("birth_date", "for a 出生 the birth_date is the occurred_on date, fully known")
            )


def _check_other_municipality(
    notification: Notification, code: str, field: str, violations: list[FieldViolation]
) -> None:
    found = _municipality_violation(code, field)
    if found is not None:
        violations.append(found)
    elif code == notification.municipality_code:
        violations.append(
            FieldViolation(field, f"{field} must be another municipality (same-town moves are 転居)")
        )


def _check_names(notification: Notification, violations: list[FieldViolation]) -> None:
    foreign = notification.resident_kind is ResidentKind.FOREIGN
    if not foreign and not notification.given_name:
        violations.append(FieldViolation("given_name", "given_name must not be empty"))
    if foreign and notification.alphabetic_name is None:
        violations.append(
            FieldViolation("alphabetic_name", "a foreign resident's alphabetic_name is required")
        )
    if not foreign and notification.alphabetic_name is not None:
        violations.append(FieldViolation("alphabetic_name", "alphabetic_name is for foreign residents only"))
    if not foreign and notification.common_name is not None:
        violations.append(FieldViolation("common_name", "通称 (common name) is for foreign residents only"))
