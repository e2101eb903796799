"""The municipal CS alone: register, household, outbox numbering, operator proofs, refusals."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.municipal.app import create

from tests.conftest import channel_as, running
from tests.integration.municipal.helpers import date, person, reason_of, sign, violations_of

RECORD = "/juki.municipal.v1.MunicipalService/RecordChange"
CODE = "131148"


@pytest.fixture
async def nakano(settings_factory: Any) -> AsyncIterator[str]:
    settings = settings_factory("municipal", f"municipal-{CODE}", ("municipality", CODE), municipality=CODE,
                                clock="2024-04-01")
    async with running(settings, create(settings)) as address:
        yield address


def record(ca: Any, kind: int, entry: municipal_pb2.ResidentEntry, occurred: str = "2024-03-30",
           **extra: Any) -> municipal_pb2.RecordChangeRequest:
    request = municipal_pb2.RecordChangeRequest(
        change_kind=kind, entry=entry, occurred_on=date(occurred), notified_on=date("2024-04-01"),  # type: ignore[arg-type]
        **extra,
    )
    return sign(ca, request, RECORD)  # type: ignore[no-any-return]


async def test_birth_gets_a_code_an_entry_and_the_next_sequence(ca: Any, nakano: str) -> None:
    async with channel_as(ca, "operator", "demo-operator", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        before = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
        head = await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person()))
        assert head.sequence == before.last_sequence + 1
        head_entry = (await stub.GetResidentEntry(
            municipal_pb2.GetResidentEntryRequest(resident_code=head.resident_code))).entry
        assert head_entry.relationship == "世帯主" and head_entry.household_head == "中野　一郎"
        assert head_entry.address.municipality == "中野区" and head_entry.address.prefecture == "東京都"
        child = person(given="花子", born="2024-03-30", sex=common_pb2.SEX_FEMALE,
                       household_id=head_entry.household_id, relationship="子")
        born = await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_BIRTH, child))
        assert born.sequence == head.sequence + 1 and len(born.resident_code) == 11
        assert born.resident_code != head.resident_code
        entry = (await stub.GetResidentEntry(municipal_pb2.GetResidentEntryRequest(
            resident_code=born.resident_code))).entry
        assert entry.household_head == "中野　一郎" and entry.relationship == "子"
        assert entry.status == common_pb2.RESIDENT_STATUS_CURRENT
        household = await stub.ListHousehold(municipal_pb2.ListHouseholdRequest(household_id=entry.household_id))
        assert [m.resident_code for m in household.members] == [head.resident_code, born.resident_code]
        assert household.head_resident_code == head.resident_code
        status = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
        assert status.last_sequence == born.sequence
        assert status.pending >= 2  # no prefecture configured: everything stays queued


async def test_concurrent_changes_get_consecutive_sequences(ca: Any, nakano: str) -> None:
    async with channel_as(ca, "operator", "demo-operator", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        results = await asyncio.gather(*[
            stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given=f"太郎{'一二三四五六七八'[i]}")))
            for i in range(8)
        ])
        sequences = sorted(r.sequence for r in results)
        assert sequences == list(range(sequences[0], sequences[0] + 8))


async def test_move_out_then_changes_are_refused_as_not_found(ca: Any, nakano: str) -> None:
    async with channel_as(ca, "operator", "demo-operator", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        moved = await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given="次郎")))
        await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_OUT, person(code=moved.resident_code),
                                       occurred="2024-03-31", next_municipality_code="141003"))
        entry = (await stub.GetResidentEntry(municipal_pb2.GetResidentEntryRequest(
            resident_code=moved.resident_code))).entry
        assert entry.status == common_pb2.RESIDENT_STATUS_MOVED_OUT
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_ADDRESS_CHANGE,
                                           person(code=moved.resident_code, street="中央一丁目1番1号")))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason_of(refused.value) == "RESIDENT_NOT_FOUND"


async def test_address_change_keeps_the_previous_address(ca: Any, nakano: str) -> None:
    async with channel_as(ca, "operator", "demo-operator", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        moved = await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given="三郎")))
        await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_ADDRESS_CHANGE,
                                       person(code=moved.resident_code, street="中央一丁目1番1号"),
                                       occurred="2024-03-31"))
        entry = (await stub.GetResidentEntry(municipal_pb2.GetResidentEntryRequest(
            resident_code=moved.resident_code))).entry
        assert entry.address.street == "中央一丁目1番1号"
        assert entry.previous_address.street == "中野四丁目8番1号"
        assert entry.address_since.day == 31 and entry.version == 2


async def test_bad_input_names_the_field(ca: Any, nakano: str) -> None:
    async with channel_as(ca, "operator", "demo-operator", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as bad_street:
            await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(street="中野\x07一丁目")))
        assert bad_street.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "entry.address.street" in violations_of(bad_street.value)
        with pytest.raises(grpc.aio.AioRpcError) as future:
            await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(), occurred="2024-04-02"))
        assert future.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "occurred_on" in violations_of(future.value)
        with pytest.raises(grpc.aio.AioRpcError) as month:
            request = record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person())
            request.entry.birth_date.month = 13
            await stub.RecordChange(sign(ca, request, RECORD))
        assert month.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "entry.birth_date" in violations_of(month.value)


async def test_operator_proof_is_required_and_single_use(ca: Any, nakano: str) -> None:
    async with channel_as(ca, "operator", "demo-operator", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        unsigned = municipal_pb2.RecordChangeRequest(
            change_kind=common_pb2.CHANGE_KIND_MOVE_IN, entry=person(given="四郎"),
            occurred_on=date("2024-03-30"), notified_on=date("2024-04-01"),
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.RecordChange(unsigned)
        assert reason_of(missing.value) == "OPERATOR_PROOF_INVALID"
        signed = record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given="四郎"))
        await stub.RecordChange(signed)
        with pytest.raises(grpc.aio.AioRpcError) as replayed:
            await stub.RecordChange(signed)
        assert reason_of(replayed.value) == "OPERATOR_PROOF_REPLAYED"
        tampered = record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given="五郎"))
        tampered.entry.name.given_name = "六郎"
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await stub.RecordChange(tampered)
        assert reason_of(forged.value) == "OPERATOR_PROOF_INVALID"
        assert "operator_proof.signature" in violations_of(forged.value)


async def test_other_peers_are_refused(ca: Any, nakano: str) -> None:
    async with channel_as(ca, "agency", "jps", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetResidentEntry(municipal_pb2.GetResidentEntryRequest(resident_code="24727059608"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with channel_as(ca, "municipality", "141003", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as spoofed:
            await stub.GetResidentEntry(municipal_pb2.GetResidentEntryRequest(
                resident_code="24727059608", requesting_municipality_code="131148"))
        assert reason_of(spoofed.value) == "PEER_NOT_AUTHORISED"
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.GetResidentEntry(municipal_pb2.GetResidentEntryRequest(
                resident_code="24727059608", requesting_municipality_code="141003"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_operator_passwords_are_checked_when_configured(ca: Any, settings_factory: Any, tmp_path: Any) -> None:
    import json

    from juki.mesh.operator import hash_operator_password

    passwords = tmp_path / "operators.json"
    passwords.write_text(json.dumps({"demo-operator": hash_operator_password("暗証-2002")}))
    settings = settings_factory("municipal", f"municipal-{CODE}", ("municipality", CODE), municipality=CODE,
                                clock="2024-04-01", operator_passwords_file=passwords)
    async with running(settings, create(settings)) as address, \
            channel_as(ca, "operator", "demo-operator", address) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)

        def request(password: str) -> municipal_pb2.RecordChangeRequest:
            message = municipal_pb2.RecordChangeRequest(
                change_kind=common_pb2.CHANGE_KIND_MOVE_IN, entry=person(given="暗証"),
                occurred_on=date("2024-03-30"), notified_on=date("2024-04-01"))
            return sign(ca, message, RECORD, password=password)  # type: ignore[no-any-return]

        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.RecordChange(request("guess"))
        assert reason_of(wrong.value) == "OPERATOR_PROOF_INVALID"
        assert violations_of(wrong.value) == ["operator_proof.password"]
        assert (await stub.RecordChange(request("暗証-2002"))).sequence > 0


async def test_a_retried_change_with_its_request_id_is_answered_once(ca: Any, nakano: str) -> None:
    """AIP-155: a counter terminal that lost the answer retries with the same request id (and a fresh
    operator proof) and gets the first answer; nothing is applied or queued twice, even concurrently."""
    request_id = str(uuid.uuid4())
    async with channel_as(ca, "operator", "demo-operator", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        before = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
        first = await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given="再送"),
                                               request_id=request_id))
        assert not first.replayed and first.sequence == before.last_sequence + 1
        again = await asyncio.gather(*[
            stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given="再送"), request_id=request_id))
            for _ in range(3)])
        for answer in again:
            assert answer.replayed
            assert (answer.notification_id, answer.sequence, answer.resident_code) == (
                first.notification_id, first.sequence, first.resident_code)
        after = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
        assert after.last_sequence == first.sequence  # one notification queued, not four

        # Without a request id, the same change is a new one (two move-ins of two people of that name).
        other = await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given="再送")))
        assert not other.replayed and other.sequence == first.sequence + 1
        assert other.resident_code != first.resident_code


async def test_a_request_id_reused_for_another_change_or_malformed_is_refused(ca: Any, nakano: str) -> None:
    request_id = str(uuid.uuid4())
    async with channel_as(ca, "operator", "demo-operator", nakano) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given="一番"), request_id=request_id))
        before = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
        for bad_id, changed in ((request_id, "二番"), ("not-a-uuid", "三番")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RecordChange(record(ca, common_pb2.CHANGE_KIND_MOVE_IN, person(given=changed),
                                               request_id=bad_id))
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert violations_of(refused.value) == ["request_id"]
        after = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
        assert after.last_sequence == before.last_sequence  # nothing applied
