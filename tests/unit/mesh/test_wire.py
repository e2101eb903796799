"""The wire module's tags and encoders write exactly what ``SerializeToString`` writes."""

from __future__ import annotations

import datetime as dt
import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from juki import _gen
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2
from juki.domain.policy import IdentityField
from juki.mesh import wire


def _messages() -> Iterator[type[Message]]:
    """Every message class of the project's protos, nested ones included."""
    for info in pkgutil.walk_packages(_gen.__path__, _gen.__name__ + "."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        pending: list[Descriptor] = list(module.DESCRIPTOR.message_types_by_name.values())
        while pending:
            descriptor = pending.pop()
            pending.extend(descriptor.nested_types)
            if descriptor.GetOptions().map_entry:
                continue
            yield descriptor._concrete_class


def _set_one(message: Message, field: FieldDescriptor) -> None:
    """Give ``field`` a value that is serialised (non-default)."""
    target: Any = getattr(message, field.name)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            key_type = field.message_type.fields_by_name["key"].type
            key: Any = "k" if key_type == FieldDescriptor.TYPE_STRING else 1
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                target[key].SetInParent()
            else:
                target[key] = _scalar(value_field)
        elif field.is_repeated:
            target.add()
        else:
            target.SetInParent()
        return
    if field.is_repeated:
        target.append(_scalar(field))
    else:
        setattr(message, field.name, _scalar(field))


def _scalar(field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_STRING:
        return "x"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return b"x"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 1.5
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number or 1
    return 1


MESSAGES = sorted(_messages(), key=lambda m: m.DESCRIPTOR.full_name)


def test_every_project_message_is_covered() -> None:
    names = {m.DESCRIPTOR.full_name for m in MESSAGES}
    assert {"juki.common.v1.IdentityRecord", "juki.accesslog.v1.AppendStreamRequest",
            "juki.intake.v1.StreamNotificationsRequest", "juki.lookup.v1.VerifyResult"} <= names


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.DESCRIPTOR.full_name)
def test_tags_are_what_the_library_serialises(message: type[Message]) -> None:
    for name, tag in wire.tags(message).items():
        field = message.DESCRIPTOR.fields_by_name[name]
        one = message()
        _set_one(one, field)
        assert one.SerializeToString().startswith(tag), field.full_name


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**31, 2**63 - 1, 2**64 - 1])
def test_varint_equals_a_serialised_uint64(value: int) -> None:
    serialised = intake_pb2.StreamNotificationsRequest(batch_id=value).SerializeToString()
    tag = wire.field_tag(intake_pb2.StreamNotificationsRequest, "batch_id")
    assert serialised == (tag + wire.varint(value) if value else b"")


def test_negative_numbers_are_refused() -> None:
    with pytest.raises(ValueError):
        wire.varint(-1)


def test_text_number_and_repeated_helpers() -> None:
    tags = wire.tags(accesslog_pb2.AppendStreamRequest)
    records = [accesslog_pb2.ProvisionRecord(resident_code=str(n) * 11, recipient="r" * n) for n in range(1, 4)]
    long_id = "b" * 300  # a length of two varint bytes
    expected = accesslog_pb2.AppendStreamRequest(batch_id=long_id, records=records, traceparent="00-ab")
    written = (wire.text(tags["batch_id"], long_id)
               + wire.repeated_messages(tags["records"], [r.SerializeToString() for r in records])
               + wire.text(tags["traceparent"], "00-ab"))
    assert written == expected.SerializeToString()
    assert wire.text(tags["batch_id"], "") == b"" and wire.number(tags["batch_id"], 0) == b""


def test_provision_batches_are_the_serialised_request() -> None:
    from juki.lookup.provisions import _append_stream_request

    records = [accesslog_pb2.ProvisionRecord(resident_code="24727059608", fields=[1, 2, 3]).SerializeToString()] * 3
    for traceparent in ("", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"):
        expected = accesslog_pb2.AppendStreamRequest(
            batch_id="batch-1", records=[accesslog_pb2.ProvisionRecord.FromString(r) for r in records],
            traceparent=traceparent)
        assert _append_stream_request("batch-1", records, traceparent) == expected.SerializeToString()


def test_relay_requests_are_the_serialised_request() -> None:
    from juki.intake.relay import encode_request

    notes = [intake_pb2.Notification(notification_id=f"n{i}") for i in range(3)]
    for batch_id in (0, 1, 2**40):
        expected = intake_pb2.StreamNotificationsRequest(batch_id=batch_id, notifications=notes)
        assert encode_request(batch_id, [n.SerializeToString() for n in notes]) == expected.SerializeToString()


def test_provision_code_field_and_verify_results_are_the_serialised_messages() -> None:
    from juki.lookup.records import RecordEncoder
    from juki.lookup.service import _verify_one, code_field

    assert code_field("24727059608") == accesslog_pb2.ProvisionRecord(resident_code="24727059608").SerializeToString()
    row = dict(
        resident_code="24727059608", resident_kind=1, family_name="山田", given_name="太郎",
        family_name_kana="ヤマダ", given_name_kana="タロウ", alphabetic_name="", common_name="",
        former_family_name="", birth_year=1950, birth_month=4, birth_day=1, sex=1, municipality_code="131148",
        prefecture="東京都", municipality="中野区", street="中野四丁目8番1号", status=1, last_change_kind=3,
        last_changed_on=dt.date(2003, 9, 16), last_notified_on=dt.date(2003, 9, 17), death_date=None,
        successor_code=None, version=7,
        municipality_as_of=dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=dt.UTC), municipality_connected=False,
    )
    encoder = RecordEncoder(frozenset(IdentityField))
    record = encoder.encode(row)
    # Fields are written in field-number order, so the bytes equal the library's and not only the parse.
    assert common_pb2.IdentityRecord.FromString(record).SerializeToString() == record
    item = lookup_pb2.VerifyItem(item_id=300, resident_code="24727059608")
    expected = lookup_pb2.VerifyResult(item_id=300, status=lookup_pb2.VERIFY_STATUS_CURRENT,
                                       record=common_pb2.IdentityRecord.FromString(record))
    assert _verify_one(item, row, encoder) == expected.SerializeToString()
    missing = lookup_pb2.VerifyResult(item_id=300, status=lookup_pb2.VERIFY_STATUS_NOT_FOUND)
    assert _verify_one(item, None, encoder) == missing.SerializeToString()


def test_timestamp_tags_match_the_well_known_type() -> None:
    stamp = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    tags = wire.tags(timestamp_pb2.Timestamp)
    assert (wire.number(tags["seconds"], stamp.seconds) + wire.number(tags["nanos"], stamp.nanos)
            == stamp.SerializeToString())
