"""Proto <-> domain conversions of the municipal CS: entries, notifications, identity records."""

from __future__ import annotations

import datetime as dt

from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2
from juki.mesh.errors import FieldViolation

IDEOGRAPHIC_SPACE = "\u3000"

# Domain notification fields -> the field of RecordChangeRequest a caller should fix.
_REQUEST_FIELDS = {
    "family_name": "entry.name.family_name",
    "given_name": "entry.name.given_name",
    "kana": "entry.name.family_name_kana",
    "alphabetic_name": "entry.name.alphabetic_name",
    "common_name": "entry.name.common_name",
    "former_family_name": "entry.name.former_family_name",
    "birth_date": "entry.birth_date",
    "sex": "entry.sex",
    "resident_kind": "entry.resident_kind",
    "resident_code": "entry.resident_code",
    "municipality_code": "entry.address.municipality_code",
    "address.street": "entry.address.street",
    "address.municipality_code": "entry.address.municipality_code",
}


def request_field(domain_field: str) -> str:
    return _REQUEST_FIELDS.get(domain_field, domain_field)


def to_violations(found: list[domain.FieldViolation]) -> list[FieldViolation]:
    return [FieldViolation(request_field(v.field), v.description, str(v.reason)) for v in found]


def date_to_proto(day: dt.date | None) -> common_pb2.Date:
    if day is None:
        return common_pb2.Date()
    return common_pb2.Date(year=day.year, month=day.month, day=day.day, precision=common_pb2.DATE_PRECISION_FULL)


def date_from_proto(value: common_pb2.Date) -> dt.date | None:
    """A fully known date, or ``None`` when unset; ``ValueError`` when partial or impossible."""
    if value.year == 0 and value.month == 0 and value.day == 0:
        return None
    if value.precision not in (common_pb2.DATE_PRECISION_UNSPECIFIED, common_pb2.DATE_PRECISION_FULL):
        raise ValueError("must be a full date")
    return dt.date(value.year, value.month, value.day)


def partial_from_proto(value: common_pb2.Date) -> domain.PartialDate:
    """A possibly partly unknown date (生年月日 of some foreign residents); ``ValueError`` if malformed."""
    return domain.PartialDate(value.year, value.month or None, value.day or None)


def partial_to_proto(value: domain.PartialDate) -> common_pb2.Date:
    if value.month is None:
        precision = common_pb2.DATE_PRECISION_YEAR_ONLY
    elif value.day is None:
        precision = common_pb2.DATE_PRECISION_YEAR_MONTH
    else:
        precision = common_pb2.DATE_PRECISION_FULL
    return common_pb2.Date(year=value.year, month=value.month or 0, day=value.day or 0, precision=precision)


def change_kind_to_domain(kind: common_pb2.ChangeKind.ValueType) -> domain.ChangeKind:
    name = common_pb2.ChangeKind.Name(kind)
    return domain.ChangeKind(name.removeprefix("CHANGE_KIND_"))


def change_kind_to_proto(kind: domain.ChangeKind) -> int:
    return int(common_pb2.ChangeKind.Value("CHANGE_KIND_" + kind.value))


def sex_to_domain(sex: int) -> domain.Sex:
    return domain.Sex.MALE if sex == common_pb2.SEX_MALE else domain.Sex.FEMALE


def sex_to_proto(sex: domain.Sex) -> common_pb2.Sex.ValueType:
    return common_pb2.SEX_MALE if sex is domain.Sex.MALE else common_pb2.SEX_FEMALE


def kind_to_domain(kind: int) -> domain.ResidentKind:
    return domain.ResidentKind.FOREIGN if kind == common_pb2.RESIDENT_KIND_FOREIGN else domain.ResidentKind.JAPANESE


def kind_to_proto(kind: domain.ResidentKind) -> common_pb2.ResidentKind.ValueType:
    return (common_pb2.RESIDENT_KIND_FOREIGN if kind is domain.ResidentKind.FOREIGN
            else common_pb2.RESIDENT_KIND_JAPANESE)


def full_address(municipality_code: str, street: str) -> common_pb2.Address:
    """An address with the prefecture and municipality names filled in from the JIS X 0402 list."""
    place = domain.municipality(municipality_code)
    return common_pb2.Address(
        municipality_code=municipality_code,
        prefecture=place.prefecture_name if place else "",
        municipality=place.city_name if place else "",
        street=street,
    )


def full_name(name: common_pb2.PersonName) -> str:
    return IDEOGRAPHIC_SPACE.join(part for part in (name.family_name, name.given_name) if part)


def notification_for(
    entry: municipal_pb2.ResidentEntry,
    *,
    notification_id: str,
    municipality_code: str,
    sequence: int,
    change_kind: common_pb2.ChangeKind.ValueType,
    occurred_on: dt.date,
    notified_on: dt.date,
    previous_municipality_code: str = "",
    next_municipality_code: str = "",
    new_resident_code: str = "",
) -> intake_pb2.Notification:
    """The notification of one change, carrying the record as it stands after it."""
    return intake_pb2.Notification(
        notification_id=notification_id,
        municipality_code=municipality_code,
        sequence=sequence,
        change_kind=change_kind,
        resident_code=entry.resident_code,
        new_resident_code=new_resident_code,
        resident_kind=entry.resident_kind,
        name=entry.name,
        birth_date=entry.birth_date,
        sex=entry.sex,
        address=entry.address,
        previous_municipality_code=previous_municipality_code,
        next_municipality_code=next_municipality_code,
        occurred_on=date_to_proto(occurred_on),
        notified_on=date_to_proto(notified_on),
        period_of_stay_end=entry.period_of_stay_end,
    )


def domain_notification(message: intake_pb2.Notification) -> domain.Notification:
    """The domain form of a notification, for validation; ``ValueError`` on malformed dates."""
    name = message.name
    kana = IDEOGRAPHIC_SPACE.join(k for k in (name.family_name_kana, name.given_name_kana) if k) or None
    occurred = date_from_proto(message.occurred_on)
    notified = date_from_proto(message.notified_on)
    if occurred is None or notified is None:
        raise ValueError("occurred_on and notified_on are required")
    return domain.Notification(
        notification_id=message.notification_id,
        municipality_code=message.municipality_code,
        sequence=message.sequence,
        change_kind=change_kind_to_domain(message.change_kind),
        resident_code=message.resident_code,
        resident_kind=kind_to_domain(message.resident_kind),
        family_name=name.family_name,
        given_name=name.given_name,
        birth_date=partial_from_proto(message.birth_date),
        sex=sex_to_domain(message.sex),
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


def apply_normalised(entry: municipal_pb2.ResidentEntry, normal: domain.Notification) -> None:
    """Write the normalised spelling of names and street back into the stored entry."""
    entry.name.family_name = normal.family_name
    entry.name.given_name = normal.given_name
    if normal.kana:
        family, _, given = normal.kana.partition(IDEOGRAPHIC_SPACE)
        entry.name.family_name_kana, entry.name.given_name_kana = family, given
    entry.name.alphabetic_name = normal.alphabetic_name or ""
    entry.name.common_name = normal.common_name or ""
    entry.name.former_family_name = normal.former_family_name or ""
    entry.address.street = normal.address.street


def identity_record(entry: municipal_pb2.ResidentEntry) -> common_pb2.IdentityRecord:
    """The 本人確認情報 of an entry, as a bulk load carries it."""
    return common_pb2.IdentityRecord(
        resident_code=entry.resident_code,
        resident_kind=entry.resident_kind,
        name=entry.name,
        birth_date=entry.birth_date,
        sex=entry.sex,
        address=entry.address,
        status=entry.status,
        last_change_kind=common_pb2.CHANGE_KIND_EX_OFFICIO_ENTRY,
        last_changed_on=entry.address_since if entry.HasField("address_since") else entry.became_resident_on,
        last_notified_on=entry.address_notified_on,
        version=entry.version,
    )
