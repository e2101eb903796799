"""Rows of the national identity store -> ``IdentityRecord`` messages, filtered to a grant's fields.

The column layout is the contract in ``juki/intake/migrations/0001_store.sql``. Filtering happens here,
once: a field outside the grant is never set on the message, so it cannot leave the service.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

from google.protobuf import timestamp_pb2

from juki._gen.juki.common.v1 import common_pb2
from juki.domain.policy import IdentityField, QueryMode
from juki.mesh.settings import schema_name

# The columns every query of the store selects, in one place so that every query mode reads alike.
RECORD_COLUMNS = (
    "r.resident_code, r.resident_kind, r.family_name, r.given_name, r.family_name_kana, r.given_name_kana,"
    " r.alphabetic_name, r.common_name, r.former_family_name, r.birth_year, r.birth_month, r.birth_day,"
    " r.sex, r.municipality_code, r.prefecture, r.municipality, r.street, r.status, r.last_change_kind,"
    " r.last_changed_on, r.last_notified_on, r.death_date, r.successor_code, r.version,"
    " m.as_of AS municipality_as_of, m.connected AS municipality_connected"
)
# The national store's schema (owned by intake-national); lookup's own tables are on its search path.
NATIONAL_SCHEMA = schema_name("intake-national")
RECORD_FROM = (
    f"{NATIONAL_SCHEMA}.residents r"
    f" LEFT JOIN {NATIONAL_SCHEMA}.municipalities m ON m.municipality_code = r.municipality_code"
)

FieldNumber: TypeAlias = common_pb2.Field.ValueType
ModeNumber: TypeAlias = common_pb2.QueryMode.ValueType
FIELD_TO_PROTO: dict[IdentityField, FieldNumber] = {
    field: common_pb2.Field.Value(f"FIELD_{field.value}") for field in IdentityField
}
PROTO_TO_FIELD: dict[FieldNumber, IdentityField] = {number: field for field, number in FIELD_TO_PROTO.items()}
MODE_TO_PROTO: dict[QueryMode, ModeNumber] = {
    mode: common_pb2.QueryMode.Value(f"QUERY_MODE_{mode.value}") for mode in QueryMode
}

RESIDENT_STATUS_CURRENT = common_pb2.RESIDENT_STATUS_CURRENT
RESIDENT_STATUS_DECEASED = common_pb2.RESIDENT_STATUS_DECEASED
RESIDENT_STATUS_MOVED_OUT = common_pb2.RESIDENT_STATUS_MOVED_OUT
RESIDENT_STATUS_DELETED = common_pb2.RESIDENT_STATUS_DELETED
RESIDENT_STATUS_CODE_RETIRED = common_pb2.RESIDENT_STATUS_CODE_RETIRED


def proto_fields(fields: Iterable[IdentityField]) -> list[FieldNumber]:
    """Proto ``Field`` numbers of ``fields``, in proto order (stable for logs and responses)."""
    return sorted(FIELD_TO_PROTO[field] for field in fields)


def date_message(value: _dt.date | None) -> common_pb2.Date | None:
    if value is None:
        return None
    return common_pb2.Date(
        year=value.year, month=value.month, day=value.day, precision=common_pb2.DATE_PRECISION_FULL
    )


def birth_date_message(year: int, month: int, day: int) -> common_pb2.Date:
    """生年月日, possibly partly unknown: 0 marks an unknown part (see ``values.PartialDate``)."""
    if not year:
        precision = common_pb2.DATE_PRECISION_UNKNOWN
    elif not month:
        precision = common_pb2.DATE_PRECISION_YEAR_ONLY
    elif not day:
        precision = common_pb2.DATE_PRECISION_YEAR_MONTH
    else:
        precision = common_pb2.DATE_PRECISION_FULL
    return common_pb2.Date(year=year, month=month, day=day, precision=precision)


def _timestamp(value: _dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def address_message(row: Mapping[str, Any]) -> common_pb2.Address:
    return common_pb2.Address(
        municipality_code=row["municipality_code"],
        prefecture=row["prefecture"],
        municipality=row["municipality"],
        street=row["street"],
    )


def identity_record(row: Mapping[str, Any], fields: frozenset[IdentityField]) -> common_pb2.IdentityRecord:
    """The record of one store row with only ``fields`` set (plus version and freshness, always)."""
    record = common_pb2.IdentityRecord(version=row["version"])
    as_of = row["municipality_as_of"]
    if as_of is not None:
        record.as_of.CopyFrom(_timestamp(as_of))
    # A municipality missing from the table is unknown to the national tier: treat as not fresh.
    record.stale = row["municipality_connected"] is not True
    if IdentityField.RESIDENT_CODE in fields:
        record.resident_code = row["resident_code"]
    if IdentityField.NAME in fields:
        record.resident_kind = row["resident_kind"]
        name = record.name
        name.family_name = row["family_name"]
        name.given_name = row["given_name"]
        name.family_name_kana = row["family_name_kana"]
        name.given_name_kana = row["given_name_kana"]
        name.alphabetic_name = row["alphabetic_name"]
        name.common_name = row["common_name"]
        name.former_family_name = row["former_family_name"]
    if IdentityField.BIRTH_DATE in fields:
        record.birth_date.CopyFrom(birth_date_message(row["birth_year"], row["birth_month"], row["birth_day"]))
    if IdentityField.SEX in fields:
        record.sex = row["sex"]
    if IdentityField.ADDRESS in fields:
        record.address.CopyFrom(address_message(row))
    if IdentityField.CHANGE_INFO in fields:
        record.status = row["status"]
        record.last_change_kind = row["last_change_kind"]
        changed = date_message(row["last_changed_on"])
        if changed is not None:
            record.last_changed_on.CopyFrom(changed)
        notified = date_message(row["last_notified_on"])
        if notified is not None:
            record.last_notified_on.CopyFrom(notified)
        if row["successor_code"]:
            record.successor_code = row["successor_code"]
    return record
