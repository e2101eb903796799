"""Proto <-> domain conversions of the intake: notifications in, identity records and rows out."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2
from juki.mesh.errors import FieldViolation

IDEOGRAPHIC_SPACE = "\u3000"

# Domain notification attribute -> the proto field path a sender should fix.
_PROTO_FIELDS = {
    "family_name": "name.family_name",
    "given_name": "name.given_name",
    "kana": "name.family_name_kana",
    "alphabetic_name": "name.alphabetic_name",
    "common_name": "name.common_name",
    "former_family_name": "name.former_family_name",
}


class MalformedNotification(ValueError):
    """A notification that cannot even be read into the domain form (missing or impossible values)."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


_CHANGE_KINDS = frozenset(common_pb2.ChangeKind.values()) - {common_pb2.CHANGE_KIND_UNSPECIFIED}
_CHANGE_KIND_NAMES = {value: name.removeprefix("CHANGE_KIND_") for name, value in common_pb2.ChangeKind.items()}
_CHANGE_KIND_NUMBERS = {name.removeprefix("CHANGE_KIND_"): value for name, value in common_pb2.ChangeKind.items()}
_STATUS_NUMBERS = {name.removeprefix("RESIDENT_STATUS_"): value for name, value in common_pb2.ResidentStatus.items()}
_PRECISIONS = frozenset(common_pb2.DatePrecision.values())
_DOMAIN_KINDS = {
    number: domain.ChangeKind(name) for number, name in _CHANGE_KIND_NAMES.items() if name in domain.ChangeKind.__members__
}


def proto_field(domain_field: str) -> str:
    return _PROTO_FIELDS.get(domain_field, domain_field)


def content_digest(message: intake_pb2.Notification) -> bytes:
    """SHA-256 of the deterministic serialisation: the same id with other content is a conflict."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).digest()


# Dates repeat (birth dates, recent change dates): the immutable values are shared, not rebuilt and
# re-checked per notification. Invalid ones raise every time (exceptions are not cached).
_date = functools.lru_cache(maxsize=65536)(dt.date)


@functools.lru_cache(maxsize=65536)
def _partial_date(year: int, month: int | None, day: int | None) -> domain.PartialDate:
    return domain.PartialDate(year, month, day)


def _full_date(value: common_pb2.Date, field: str, problems: list[FieldViolation]) -> dt.date | None:
    if value.year == 0 and value.month == 0 and value.day == 0:
        problems.append(FieldViolation(field, f"{field} is required"))
        return None
    if value.precision not in (common_pb2.DATE_PRECISION_UNSPECIFIED, common_pb2.DATE_PRECISION_FULL):
        problems.append(FieldViolation(field, f"{field} must be a full date"))
        return None
    try:
        return _date(value.year, value.month, value.day)
    except ValueError as exc:
        problems.append(FieldViolation(field, f"{field} is not a calendar date: {exc}"))
        return None


def partial_from_proto(value: common_pb2.Date, field: str, problems: list[FieldViolation]) -> domain.PartialDate | None:
    """A possibly partly unknown 生年月日: unknown parts are 0 (see DatePrecision); year always known."""
    precision = value.precision
    month: int | None = value.month or None
    day: int | None = value.day or None
    if precision == common_pb2.DATE_PRECISION_YEAR_MONTH and value.day:
        problems.append(FieldViolation(f"{field}.day", "day must be 0 with DATE_PRECISION_YEAR_MONTH"))
        return None
    if precision == common_pb2.DATE_PRECISION_YEAR_ONLY and (value.month or value.day):
        problems.append(FieldViolation(f"{field}.month", "month and day must be 0 with DATE_PRECISION_YEAR_ONLY"))
        return None
    if precision in (common_pb2.DATE_PRECISION_UNSPECIFIED, common_pb2.DATE_PRECISION_FULL) and not (
        value.month and value.day
    ):
        problems.append(FieldViolation(field, f"{field} needs year, month and day (or a partial precision)"))
        return None
    if precision == common_pb2.DATE_PRECISION_UNKNOWN:
        problems.append(FieldViolation(f"{field}.precision", "the birth year must be known"))
        return None
    if precision not in _PRECISIONS:
        problems.append(FieldViolation(f"{field}.precision", "unknown DatePrecision"))
        return None
    try:
        return _partial_date(value.year, month, day)
    except ValueError as exc:
        problems.append(FieldViolation(field, f"{field}: {exc}"))
        return None


def partial_to_proto(value: domain.PartialDate) -> common_pb2.Date:
    if value.month is None:
        precision = common_pb2.DATE_PRECISION_YEAR_ONLY
    elif value.day is None:
        precision = common_pb2.DATE_PRECISION_YEAR_MONTH
    else:
        precision = common_pb2.DATE_PRECISION_FULL
    return common_pb2.Date(year=value.year, month=value.month or 0, day=value.day or 0, precision=precision)


def date_to_proto(day: dt.date | None) -> common_pb2.Date:
    if day is None:
        return common_pb2.Date()
    return common_pb2.Date(year=day.year, month=day.month, day=day.day, precision=common_pb2.DATE_PRECISION_FULL)


def change_kind_to_proto(kind: domain.ChangeKind) -> int:
    # NATIONALITY_CHANGE (domain only) is recorded as an ex officio correction on the wire.
    return int(_CHANGE_KIND_NUMBERS.get(kind.value, common_pb2.CHANGE_KIND_EX_OFFICIO_CORRECTION))


def status_to_proto(status: domain.ResidentStatus) -> int:
    return int(_STATUS_NUMBERS[status.value])


@functools.lru_cache(maxsize=65536)
def name_key(text: str) -> str:
    return domain.match_key(text)


@functools.lru_cache(maxsize=65536)
def street_key(text: str) -> str:
    return domain.address_key(text)


def to_domain(message: intake_pb2.Notification) -> domain.Notification:
    """The domain form of a wire notification; :class:`MalformedNotification` when unreadable."""
    problems: list[FieldViolation] = []
    if message.change_kind not in _CHANGE_KINDS:
        problems.append(FieldViolation("change_kind", "change_kind must be a known ChangeKind"))
    if message.resident_kind not in (common_pb2.RESIDENT_KIND_JAPANESE, common_pb2.RESIDENT_KIND_FOREIGN):
        problems.append(FieldViolation("resident_kind", "resident_kind must be JAPANESE or FOREIGN"))
    if message.sex not in (common_pb2.SEX_MALE, common_pb2.SEX_FEMALE):
        problems.append(FieldViolation("sex", "sex must be SEX_MALE or SEX_FEMALE"))
    if not message.HasField("address"):
        problems.append(FieldViolation("address", "address is required"))
    birth = partial_from_proto(message.birth_date, "birth_date", problems)
    occurred = _full_date(message.occurred_on, "occurred_on", problems)
    notified = _full_date(message.notified_on, "notified_on", problems)
    if problems or birth is None or occurred is None or notified is None:
        raise MalformedNotification(problems)
    name = message.name
    kana = IDEOGRAPHIC_SPACE.join(k for k in (name.family_name_kana, name.given_name_kana) if k) or None
    kind = _DOMAIN_KINDS.get(message.change_kind)
    if kind is None:
        kind = domain.ChangeKind(_CHANGE_KIND_NAMES[message.change_kind])
    return domain.Notification(
        notification_id=message.notification_id,
        municipality_code=message.municipality_code,
        sequence=message.sequence,
        change_kind=kind,
        resident_code=message.resident_code,
        resident_kind=(
            domain.ResidentKind.FOREIGN
            if message.resident_kind == common_pb2.RESIDENT_KIND_FOREIGN
            else domain.ResidentKind.JAPANESE
        ),
        family_name=name.family_name,
        given_name=name.given_name,
        birth_date=birth,
        sex=domain.Sex.MALE if message.sex == common_pb2.SEX_MALE else domain.Sex.FEMALE,
        address=domain.Address(message.address.municipality_code, message.address.street),
        occurred_on=occurred,
        notified_on=notified,
        kana=kana,
        alphabetic_name=name.alphabetic_name or None,
        common_name=name.common_name or None,
        former_family_name=name.former_family_name or None,
        new_resident_code=message.new_resident_code or None,
        previous_municipality_code=message.previous_municipality_code or None,
        next_municipality_code=message.next_municipality_code or None,
    )


def split_kana(kana: str | None) -> tuple[str, str]:
    family, _, given = (kana or "").partition(IDEOGRAPHIC_SPACE)
    return family, given


def resident_row(state: domain.ResidentState, version: int | None = None) -> tuple[Any, ...]:
    """The ``residents`` row of a folded state, in the column order of :data:`RESIDENT_COLUMNS`.

    ``version`` replaces the fold's own event count (see :meth:`juki.intake.store.Store._fold`).
    """
    place = domain.municipality(state.address.municipality_code)
    family_kana, given_kana = split_kana(state.kana)
    birth = state.birth_date
    return (
        state.resident_code,
        1 if state.resident_kind is domain.ResidentKind.JAPANESE else 2,
        state.family_name,
        state.given_name,
        family_kana,
        given_kana,
        state.alphabetic_name or "",
        state.common_name or "",
        state.former_family_name or "",
        birth.year,
        birth.month or 0,
        birth.day or 0,
        state.sex.value,
        state.address.municipality_code,
        place.prefecture_name if place else "",
        place.city_name if place else "",
        state.address.street,
        status_to_proto(state.status),
        change_kind_to_proto(state.last_change_kind),
        state.last_changed_on,
        state.last_notified_on,
        state.death_date,
        state.successor_code,
        state.predecessor_code,
        state.version if version is None else version,
        name_key(state.family_name + state.given_name),
        street_key(state.address.street),
    )


RESIDENT_COLUMNS = (
    "resident_code", "resident_kind", "family_name", "given_name", "family_name_kana", "given_name_kana",
    "alphabetic_name", "common_name", "former_family_name", "birth_year", "birth_month", "birth_day", "sex",
    "municipality_code", "prefecture", "municipality", "street", "status", "last_change_kind",
    "last_changed_on", "last_notified_on", "death_date", "successor_code", "predecessor_code", "version",
    "name_key", "address_key",
)


def _set_date(target: common_pb2.Date, day: dt.date | None) -> None:
    if day is None:
        target.SetInParent()  # present and empty, as date_to_proto(None)
        return
    target.year, target.month, target.day = day.year, day.month, day.day
    target.precision = common_pb2.DATE_PRECISION_FULL


def record_from_resident_row(row: tuple[Any, ...]) -> common_pb2.IdentityRecord:
    """``record_from_row`` of a :func:`resident_row` tuple, field by field (no dict, no nested constructors).

    The intake builds one per stored version, so this is on the hot path; the result is identical.
    """
    (code, kind, family, given, family_kana, given_kana, alphabetic, common, former, year, month, day, sex,
     municipality_code, prefecture, municipality, street, status, last_kind, changed_on, notified_on,
     _death, successor, _predecessor, version, _name_key, _address_key) = row
    record = common_pb2.IdentityRecord()
    record.resident_code = code
    record.resident_kind = kind
    name = record.name
    name.family_name, name.given_name = family, given
    name.family_name_kana, name.given_name_kana = family_kana, given_kana
    name.alphabetic_name, name.common_name, name.former_family_name = alphabetic, common, former
    birth = record.birth_date
    birth.year, birth.month, birth.day = year, month, day
    if month and day:
        birth.precision = common_pb2.DATE_PRECISION_FULL
    elif month:
        birth.precision = common_pb2.DATE_PRECISION_YEAR_MONTH
    else:
        birth.precision = common_pb2.DATE_PRECISION_YEAR_ONLY
    record.sex = sex
    address = record.address
    address.municipality_code, address.prefecture = municipality_code, prefecture
    address.municipality, address.street = municipality, street
    record.status = status
    record.last_change_kind = last_kind
    _set_date(record.last_changed_on, changed_on)
    _set_date(record.last_notified_on, notified_on)
    record.successor_code = successor or ""
    record.version = version
    return record


def record_from_row(row: Any) -> common_pb2.IdentityRecord:
    """The IdentityRecord of a ``residents`` row (with ``as_of``/``connected`` of its municipality if joined)."""
    month, day = row["birth_month"], row["birth_day"]
    if month and day:
        precision = common_pb2.DATE_PRECISION_FULL
    elif month:
        precision = common_pb2.DATE_PRECISION_YEAR_MONTH
    else:
        precision = common_pb2.DATE_PRECISION_YEAR_ONLY
    record = common_pb2.IdentityRecord(
        resident_code=row["resident_code"],
        resident_kind=row["resident_kind"],
        name=common_pb2.PersonName(
            family_name=row["family_name"], given_name=row["given_name"],
            family_name_kana=row["family_name_kana"], given_name_kana=row["given_name_kana"],
            alphabetic_name=row["alphabetic_name"], common_name=row["common_name"],
            former_family_name=row["former_family_name"],
        ),
        birth_date=common_pb2.Date(year=row["birth_year"], month=month, day=day, precision=precision),
        sex=row["sex"],
        address=common_pb2.Address(
            municipality_code=row["municipality_code"], prefecture=row["prefecture"],
            municipality=row["municipality"], street=row["street"],
        ),
        status=row["status"],
        last_change_kind=row["last_change_kind"],
        last_changed_on=date_to_proto(row["last_changed_on"]),
        last_notified_on=date_to_proto(row["last_notified_on"]),
        successor_code=row["successor_code"] or "",
        version=row["version"],
    )
    keys = row.keys()
    if "as_of" in keys and row["as_of"] is not None:
        record.as_of.CopyFrom(timestamp(row["as_of"]))
    if "connected" in keys:
        record.stale = row["connected"] is False
    return record


def timestamp(moment: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp
