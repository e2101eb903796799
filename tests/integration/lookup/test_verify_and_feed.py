"""Batch verification, the change feed and operator proofs, against the real access log."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import grpc
import pytest
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2
from juki.domain.policy import Policy
from juki.lookup.app import LookupApp
from juki.mesh.operator import sign_with_files

from tests.conftest import running
from tests.integration.lookup.conftest import Mesh, add_change, add_resident, fresh_code
from tests.integration.lookup.test_lookup import PENSION, details

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]


async def test_verify_batch_answers_every_status_in_order_and_logs_every_item(mesh: Mesh) -> None:
    current = await add_resident(mesh.database)
    deceased = await add_resident(mesh.database, status=2, last_change_kind=6, death_date=dt.date(2024, 1, 15))
    successor = fresh_code()
    retired = await add_resident(mesh.database, status=5, last_change_kind=11, successor_code=successor)
    moved = await add_resident(mesh.database, last_change_kind=1, street="中央三丁目5番2号")
    mismatch = await add_resident(mesh.database, given_name="次郎")
    missing = fresh_code()
    items = [
        lookup_pb2.VerifyItem(item_id=10, resident_code=current,
                              expected_name=common_pb2.PersonName(family_name="山田", given_name="太郎"),
                              expected_birth_date=common_pb2.Date(year=1950, month=4, day=1)),
        lookup_pb2.VerifyItem(item_id=11, resident_code=deceased),
        lookup_pb2.VerifyItem(item_id=12, resident_code=retired),
        lookup_pb2.VerifyItem(item_id=13, resident_code=moved),
        lookup_pb2.VerifyItem(item_id=14, resident_code=mismatch,
                              expected_name=common_pb2.PersonName(given_name="太郎"),
                              expected_birth_date=common_pb2.Date(year=1950, month=4, day=2)),
        lookup_pb2.VerifyItem(item_id=15, resident_code=missing),
    ]
    stub = mesh.lookup_as("agency", "jps")
    call = stub.VerifyBatch()
    await call.write(lookup_pb2.VerifyBatchRequest(purpose=PENSION, items=items[:3]))
    first = await call.read()
    await call.write(lookup_pb2.VerifyBatchRequest(items=items[3:]))
    second = await call.read()
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    results = [*first.results, *second.results]
    assert [r.item_id for r in results] == [10, 11, 12, 13, 14, 15]
    assert [r.status for r in results] == [
        lookup_pb2.VERIFY_STATUS_CURRENT, lookup_pb2.VERIFY_STATUS_DECEASED, lookup_pb2.VERIFY_STATUS_CODE_CHANGED,
        lookup_pb2.VERIFY_STATUS_MOVED, lookup_pb2.VERIFY_STATUS_MISMATCH, lookup_pb2.VERIFY_STATUS_NOT_FOUND,
    ]
    assert (results[1].death_date.year, results[1].death_date.month, results[1].death_date.day) == (2024, 1, 15)
    assert results[2].new_resident_code == successor
    assert results[3].new_address.street == "中央三丁目5番2号"
    assert set(results[4].mismatched_fields) == {common_pb2.FIELD_NAME, common_pb2.FIELD_BIRTH_DATE}
    assert not results[5].HasField("record")
    for code in (current, deceased, retired, moved, mismatch):
        (entry,) = await mesh.provisions(code)
        assert entry.record.query_mode == common_pb2.QUERY_MODE_BATCH_VERIFY
        assert entry.record.fields
    (not_found,) = await mesh.provisions(missing)
    assert list(not_found.record.fields) == []


async def test_verify_batch_refuses_a_bad_code_naming_the_item(mesh: Mesh) -> None:
    stub = mesh.lookup_as("agency", "jps")
    items = [lookup_pb2.VerifyItem(item_id=1, resident_code=fresh_code()),
             lookup_pb2.VerifyItem(item_id=2, resident_code="24727059609")]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.VerifyBatch(iter([lookup_pb2.VerifyBatchRequest(purpose=PENSION, items=items)])).read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(refused.value)[1] == ["items[1].resident_code"]


async def test_change_feed_lists_watched_changes_after_a_resumable_cursor(mesh: Mesh) -> None:
    watched = await add_resident(mesh.database)
    other = await add_resident(mesh.database)
    stub = mesh.lookup_as("agency", "kkr")
    purpose = "B1-NATIONAL-MUTUAL-AID-PENSION"
    registered = await stub.RegisterWatch(lookup_pb2.RegisterWatchRequest(purpose=purpose, resident_codes=[watched]))
    again = await stub.RegisterWatch(lookup_pb2.RegisterWatchRequest(purpose=purpose, resident_codes=[watched]))
    assert (registered.registered_count, again.registered_count, again.watched_count) == (1, 0, 1)
    start = await stub.ListChanges(lookup_pb2.ListChangesRequest(purpose=purpose))
    cursor = start.next_cursor
    await add_change(mesh.database, other, common_pb2.CHANGE_KIND_ADDRESS_CHANGE, dt.date(2024, 5, 1))
    first_id = await add_change(mesh.database, watched, common_pb2.CHANGE_KIND_ADDRESS_CHANGE, dt.date(2024, 5, 1))
    await add_change(mesh.database, watched, common_pb2.CHANGE_KIND_DEATH, dt.date(2024, 6, 1))
    page = await stub.ListChanges(lookup_pb2.ListChangesRequest(purpose=purpose, cursor=cursor, max_changes=1))
    assert [(e.resident_code, e.change_kind, e.cursor) for e in page.changes] == [
        (watched, common_pb2.CHANGE_KIND_ADDRESS_CHANGE, str(first_id)),
    ]
    assert page.changes[0].record.resident_code == watched
    rest = await stub.ListChanges(lookup_pb2.ListChangesRequest(purpose=purpose, cursor=page.next_cursor))
    assert [e.change_kind for e in rest.changes] == [common_pb2.CHANGE_KIND_DEATH]
    empty = await stub.ListChanges(lookup_pb2.ListChangesRequest(purpose=purpose, cursor=rest.next_cursor))
    assert not empty.changes and empty.next_cursor == rest.next_cursor
    modes = [p.record.query_mode for p in await mesh.provisions(watched)]
    assert modes == [common_pb2.QUERY_MODE_CHANGE_FEED] * 2
    # Another agency's watch list is its own: jps watches nothing under its 事務.
    jps = await mesh.lookup_as("agency", "jps").ListChanges(
        lookup_pb2.ListChangesRequest(purpose=PENSION, cursor=cursor))
    assert all(e.resident_code != watched for e in jps.changes)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.ListChanges(lookup_pb2.ListChangesRequest(purpose=purpose, cursor="abc"))
    assert details(bad.value)[1] == ["cursor"]


async def test_stream_changes_follows_new_changes(mesh: Mesh) -> None:
    code = await add_resident(mesh.database)
    stub = mesh.lookup_as("agency", "jps")
    await stub.RegisterWatch(lookup_pb2.RegisterWatchRequest(purpose=PENSION, resident_codes=[code]))
    start = await stub.ListChanges(lookup_pb2.ListChangesRequest(purpose=PENSION, max_changes=10_000))
    cursor = start.next_cursor
    while start.changes:
        start = await stub.ListChanges(lookup_pb2.ListChangesRequest(purpose=PENSION, cursor=cursor))
        cursor = start.next_cursor
    call = stub.StreamChanges(lookup_pb2.StreamChangesRequest(purpose=PENSION, cursor=cursor))
    try:
        await asyncio.sleep(0.3)
        change_id = await add_change(mesh.database, code, common_pb2.CHANGE_KIND_DEATH, dt.date(2024, 7, 1))
        message = await asyncio.wait_for(call.read(), 10)
        assert [e.cursor for e in message.changes] == [str(change_id)]
        assert message.next_cursor == str(change_id)
    finally:
        call.cancel()


def _operator_policy() -> Policy:
    """The packaged table plus a row for the demo operator (a prefecture's counter staff)."""
    from importlib import resources

    document = json.loads(resources.files("juki.domain").joinpath("policy_data.json").read_text(encoding="utf-8"))
    document["agencies"].append({
        "identity": "spiffe://juki.local/operator/demo-operator", "name": "東京都 窓口担当者",
        "public_body": True, "quota_per_second": 50,
        "purposes": [{"code": "PREF-COUNTER", "name": "本人確認情報の照会 (窓口)", "schedule_row": "別表第五 第一号",
                      "modes": ["BY_CODE"], "fields": ["NAME", "BIRTH_DATE", "SEX", "ADDRESS"]}],
    })
    return Policy.from_dict(document)


async def test_an_operator_must_sign_each_request_and_a_replay_is_refused(mesh: Mesh) -> None:
    code = await add_resident(mesh.database)
    settings = mesh.lookup_settings()
    method = "/juki.lookup.v1.LookupService/LookupByCode"
    cert, key = mesh.ca.paths("operator", "demo-operator")
    async with running(settings, LookupApp(settings, policy=_operator_policy())) as address:
        stub = mesh.lookup_as("operator", "demo-operator", address)
        unsigned = lookup_pb2.LookupByCodeRequest(purpose="PREF-COUNTER", resident_code=code)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.LookupByCode(unsigned)
        assert details(missing.value)[0] == "OPERATOR_PROOF_INVALID"
        signed = lookup_pb2.LookupByCodeRequest(purpose="PREF-COUNTER", resident_code=code)
        sign_with_files(signed, method, cert, key, password="demo")
        response = await stub.LookupByCode(signed)
        assert response.record.name.family_name == "山田" and response.record.resident_code == ""
        with pytest.raises(grpc.aio.AioRpcError) as replay:
            await stub.LookupByCode(signed)
        assert details(replay.value)[0] == "OPERATOR_PROOF_REPLAYED"
        tampered = lookup_pb2.LookupByCodeRequest(purpose="PREF-COUNTER", resident_code=code)
        sign_with_files(tampered, method, cert, key)
        tampered.resident_code = await add_resident(mesh.database)
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await stub.LookupByCode(tampered)
        assert details(forged.value)[0] == "OPERATOR_PROOF_INVALID"
    (entry,) = await mesh.provisions(code)
    assert entry.record.operator_id == "demo-operator"



async def test_a_purpose_without_the_change_feed_cannot_watch(mesh: Mesh) -> None:
    code = await add_resident(mesh.database)
    stub = mesh.lookup_as("agency", "mofa")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RegisterWatch(lookup_pb2.RegisterWatchRequest(
            purpose="B1-PASSPORT-ISSUANCE", resident_codes=[code]))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert details(refused.value)[0] == "MODE_NOT_GRANTED"


async def test_verify_results_carry_only_the_granted_fields(mesh: Mesh) -> None:
    code = await add_resident(mesh.database, status=5, last_change_kind=11, successor_code=fresh_code())
    stub = mesh.lookup_as("agency", "jps")
    call = stub.VerifyBatch(iter([lookup_pb2.VerifyBatchRequest(
        purpose=PENSION, items=[lookup_pb2.VerifyItem(item_id=1, resident_code=code)],
        requested_fields=[common_pb2.FIELD_NAME],
    )]))
    (result,) = (await call.read()).results
    assert result.status == lookup_pb2.VERIFY_STATUS_CODE_CHANGED
    assert result.new_resident_code == ""  # the resident code was not asked for, so not provided
    assert result.record.name.family_name == "山田"
    assert not result.record.resident_code and not result.record.HasField("address")
    (entry,) = await mesh.provisions(code)
    assert list(entry.record.fields) == [common_pb2.FIELD_NAME]
