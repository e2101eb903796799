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
from juki.mesh import wire
from juki.mesh.settings import schema_name

_varint = wire.varint
_text = wire.text
_message = wire.length_delimited

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


# -- the batch fast path: records written as protobuf bytes directly ------------------------------------

# Tags of the messages written here, computed from their descriptors (see ``mesh.wire``).
_RECORD = wire.tags(common_pb2.IdentityRecord)
_NAME = wire.tags(common_pb2.PersonName)
_ADDRESS = wire.tags(common_pb2.Address)
_DATE = wire.tags(common_pb2.Date)
_TIMESTAMP = wire.tags(timestamp_pb2.Timestamp)
_STALE_TRUE = _RECORD["stale"] + wire.varint(1)


def _date_bytes(value: _dt.date) -> bytes:
    return (_DATE["year"] + _varint(value.year) + _DATE["month"] + _varint(value.month) + _DATE["day"]
            + _varint(value.day) + _DATE["precision"] + _varint(common_pb2.DATE_PRECISION_FULL))


class RecordEncoder:
    """Writes ``IdentityRecord`` bytes for store rows, equal to :func:`identity_record` once parsed.

    Verification answers thousands of records per message; building each as a message costs several
    times more than writing its bytes. Freshness and dates repeat across rows and are cached.
    """

    def __init__(self, fields: frozenset[IdentityField]) -> None:
        self.fields = fields
        self._code = IdentityField.RESIDENT_CODE in fields
        self._name = IdentityField.NAME in fields
        self._birth = IdentityField.BIRTH_DATE in fields
        self._sex = IdentityField.SEX in fields
        self._address = IdentityField.ADDRESS in fields
        self._change = IdentityField.CHANGE_INFO in fields
        self._freshness: dict[tuple[Any, Any], bytes] = {}
        self._dates: dict[tuple[bytes, _dt.date], bytes] = {}
        self._births: dict[tuple[int, int, int], bytes] = {}

    def _date(self, tag: bytes, value: _dt.date | None) -> bytes:
        if value is None:
            return b""
        key = (tag, value)
        cached = self._dates.get(key)
        if cached is None:
            cached = self._dates[key] = _message(tag, _date_bytes(value))
        return cached

    def _fresh(self, as_of: _dt.datetime | None, connected: bool | None) -> bytes:
        key = (as_of, connected)
        cached = self._freshness.get(key)
        if cached is None:
            part = b""
            if as_of is not None:
                stamp = _timestamp(as_of)
                body = wire.number(_TIMESTAMP["seconds"], stamp.seconds) + wire.number(_TIMESTAMP["nanos"], stamp.nanos)
                part += _message(_RECORD["as_of"], body)
            if connected is not True:
                part += _STALE_TRUE
            cached = self._freshness[key] = part
        return cached

    def encode(self, row: Mapping[str, Any]) -> bytes:
        parts: list[bytes] = []
        append = parts.append
        if self._code:
            append(_text(_RECORD["resident_code"], row["resident_code"]))
        if self._name:
            if row["resident_kind"]:
                append(_RECORD["resident_kind"] + _varint(row["resident_kind"]))
            name = b"".join((
                _text(_NAME["family_name"], row["family_name"]), _text(_NAME["given_name"], row["given_name"]),
                _text(_NAME["family_name_kana"], row["family_name_kana"]),
                _text(_NAME["given_name_kana"], row["given_name_kana"]),
                _text(_NAME["alphabetic_name"], row["alphabetic_name"]),
                _text(_NAME["common_name"], row["common_name"]),
                _text(_NAME["former_family_name"], row["former_family_name"]),
            ))
            append(_message(_RECORD["name"], name))
        if self._birth:
            birth = (row["birth_year"], row["birth_month"], row["birth_day"])
            cached = self._births.get(birth)
            if cached is None:
                cached = self._births[birth] = _message(
                    _RECORD["birth_date"], birth_date_message(*birth).SerializeToString())
            append(cached)
        if self._sex and row["sex"]:
            append(_RECORD["sex"] + _varint(row["sex"]))
        if self._address:
            address = b"".join((
                _text(_ADDRESS["municipality_code"], row["municipality_code"]),
                _text(_ADDRESS["prefecture"], row["prefecture"]),
                _text(_ADDRESS["municipality"], row["municipality"]), _text(_ADDRESS["street"], row["street"]),
            ))
            append(_message(_RECORD["address"], address))
        if self._change:
            if row["status"]:
                append(_RECORD["status"] + _varint(row["status"]))
            if row["last_change_kind"]:
                append(_RECORD["last_change_kind"] + _varint(row["last_change_kind"]))
            append(self._date(_RECORD["last_changed_on"], row["last_changed_on"]))
            append(_text(_RECORD["successor_code"], row["successor_code"]))
        if row["version"]:
            append(_RECORD["version"] + _varint(row["version"]))
        append(self._fresh(row["municipality_as_of"], row["municipality_connected"]))
        if self._change:
            append(self._date(_RECORD["last_notified_on"], row["last_notified_on"]))
        return b"".join(parts)
