"""Protobuf wire encoding for the hot paths that write messages as bytes instead of building them.

Verification answers, provision batches and relayed notifications are joined from bytes that already
exist (stored payloads, per-call templates, cached records); parsing them into messages only to serialise
them again costs several times more than writing the bytes. Everything such a path needs is here, once:
the base-128 varint and the tags of the fields it writes.

A tag is never typed by hand: :func:`tags` computes each field's tag from the message descriptor at import,
so a renumbered or retyped field changes the bytes with it (and a renamed one fails at import). The unit
tests compare every encoder built on this module with ``SerializeToString``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# Wire types (https://protobuf.dev/programming-guides/encoding/#structure).
VARINT = 0
I64 = 1
LEN = 2
I32 = 5

_I64_TYPES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})
_I32_TYPES = frozenset({FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32})
_LEN_TYPES = frozenset({FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE})

_ONE_BYTE = tuple(bytes((value,)) for value in range(128))


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer (lengths, enums, counters, ids)."""
    if value < 128:
        if value < 0:
            raise ValueError("varint() encodes non-negative integers only")
        return _ONE_BYTE[value]  # lengths, enums and small numbers: most varints written
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def wire_type(field: FieldDescriptor) -> int:
    """The wire type a field is written with (a packed repeated scalar is one length-delimited run)."""
    if field.is_repeated and field.is_packed:
        return LEN
    if field.type in _LEN_TYPES:
        return LEN
    if field.type in _I64_TYPES:
        return I64
    if field.type in _I32_TYPES:
        return I32
    if field.type == FieldDescriptor.TYPE_GROUP:
        raise ValueError(f"{field.full_name}: groups are not written by this module")
    return VARINT


def field_tag(message: type[Message], name: str) -> bytes:
    """The tag bytes of field ``name`` of ``message`` (field number and wire type, as a varint)."""
    field = cast(FieldDescriptor, message.DESCRIPTOR.fields_by_name[name])
    return varint((field.number << 3) | wire_type(field))


def tags(message: type[Message]) -> Mapping[str, bytes]:
    """The tag bytes of every field of ``message``, by field name (read-only)."""
    return MappingProxyType({name: field_tag(message, name) for name in message.DESCRIPTOR.fields_by_name})


def length_delimited(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: an embedded message, a string's UTF-8 or bytes."""
    return tag + varint(len(payload)) + payload


def text(tag: bytes, value: str | None) -> bytes:
    """A string field; empty (not written) for an empty string, as proto3 serialises it."""
    if not value:
        return b""
    return length_delimited(tag, value.encode())


def number(tag: bytes, value: int | None) -> bytes:
    """A varint field (integer, enum, bool); empty for zero, as proto3 serialises it."""
    if not value:
        return b""
    return tag + varint(value)


def repeated_messages(tag: bytes, payloads: Sequence[bytes]) -> bytes:
    """A repeated message (or string/bytes) field from already serialised elements, in order."""
    parts: list[bytes] = []
    for payload in payloads:
        parts.append(tag)
        parts.append(varint(len(payload)))
        parts.append(payload)
    return b"".join(parts)
