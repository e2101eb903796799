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


# -- the batch fast path: records written as protobuf bytes directly ------------------------------------

_ONE_BYTE = tuple(bytes((value,)) for value in range(128))


def _varint(value: int) -> bytes:
    if value < 128:
        return _ONE_BYTE[value]  # lengths, enums and small numbers: most varints written here
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _text(tag: bytes, value: str | None) -> bytes:
    if not value:
        return b""
    encoded = value.encode()
    length = len(encoded)
    return tag + (_ONE_BYTE[length] if length < 128 else _varint(length)) + encoded


def _message(tag: bytes, body: bytes) -> bytes:
    return tag + _varint(len(body)) + body


def _date_bytes(value: _dt.date) -> bytes:
    return b"\x08" + _varint(value.year) + b"\x10" + _varint(value.month) + b"\x18" + _varint(value.day) + b"\x20\x01"


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
                body = (b"\x08" + _varint(stamp.seconds) if stamp.seconds else b"") + (
                    b"\x10" + _varint(stamp.nanos) if stamp.nanos else b"")
                part += _message(b"\x62", body)
            if connected is not True:
                part += b"\x68\x01"
            cached = self._freshness[key] = part
        return cached

    def encode(self, row: Mapping[str, Any]) -> bytes:
        parts: list[bytes] = []
        append = parts.append
        if self._code:
            append(_text(b"\x0a", row["resident_code"]))
        if self._name:
            if row["resident_kind"]:
                append(b"\x10" + _varint(row["resident_kind"]))
            name = b"".join((
                _text(b"\x0a", row["family_name"]), _text(b"\x12", row["given_name"]),
                _text(b"\x1a", row["family_name_kana"]), _text(b"\x22", row["given_name_kana"]),
                _text(b"\x2a", row["alphabetic_name"]), _text(b"\x32", row["common_name"]),
                _text(b"\x3a", row["former_family_name"]),
            ))
            append(_message(b"\x1a", name))
        if self._birth:
            birth = (row["birth_year"], row["birth_month"], row["birth_day"])
            cached = self._births.get(birth)
            if cached is None:
                cached = self._births[birth] = _message(b"\x22", birth_date_message(*birth).SerializeToString())
            append(cached)
        if self._sex and row["sex"]:
            append(b"\x28" + _varint(row["sex"]))
        if self._address:
            address = b"".join((
                _text(b"\x0a", row["municipality_code"]), _text(b"\x12", row["prefecture"]),
                _text(b"\x1a", row["municipality"]), _text(b"\x22", row["street"]),
            ))
            append(_message(b"\x32", address))
        if self._change:
            if row["status"]:
                append(b"\x38" + _varint(row["status"]))
            if row["last_change_kind"]:
                append(b"\x40" + _varint(row["last_change_kind"]))
            append(self._date(b"\x4a", row["last_changed_on"]))
            append(_text(b"\x52", row["successor_code"]))
        if row["version"]:
            append(b"\x58" + _varint(row["version"]))
        append(self._fresh(row["municipality_as_of"], row["municipality_connected"]))
        if self._change:
            append(self._date(b"\x72", row["last_notified_on"]))
        return b"".join(parts)
