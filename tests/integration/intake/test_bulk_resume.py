"""A bulk load is resumable: its progress is recorded with each batch, GetBulkLoad tells where to go on
(at a prefecture, no further than the national intake has it), a resumed load applies and counts each
record once; GetBulkLoad refuses bad input by field and anyone but the load's sender."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import asyncpg
import grpc
import pytest
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc

from tests.faults import refusal
from tests.integration.intake.helpers import NAKANO, YOKOHAMA, Mesh, date, intake_mesh, new_code

pytestmark = pytest.mark.timeout(120)

STATE = intake_pb2.BulkLoadState
CHIYODA = "131016"  # another municipality of Tokyo


@pytest.fixture
async def mesh(ca: Any, settings_factory: Any) -> Any:
    async with intake_mesh(ca, settings_factory) as running_mesh:
        yield running_mesh


def records(municipality: str, count: int) -> list[common_pb2.IdentityRecord]:
    """``count`` valid records of ``municipality`` in ascending resident-code order."""
    place = {NAKANO: ("東京都", "中野区", "中野四丁目8番1号"), YOKOHAMA: ("神奈川県", "横浜市", "中区本町6丁目50番地の10")}
    prefecture, city, street = place[municipality]
    address = common_pb2.Address(municipality_code=municipality, prefecture=prefecture, municipality=city,
                                 street=street)
    return [
        common_pb2.IdentityRecord(
            resident_code=code, resident_kind=common_pb2.RESIDENT_KIND_JAPANESE,
            name=common_pb2.PersonName(family_name="続", given_name=f"再開{i}"),
            birth_date=date(dt.date(1960, 1, 1) + dt.timedelta(days=i)), sex=common_pb2.SEX_FEMALE,
            address=address, status=common_pb2.RESIDENT_STATUS_CURRENT, last_changed_on=date(dt.date(2003, 8, 14)),
        )
        for i, code in enumerate(sorted(new_code() for _ in range(count)))
    ]


def batches_of(load_id: str, municipality: str, loaded: list[common_pb2.IdentityRecord], size: int
               ) -> list[intake_pb2.BulkLoadRequest]:
    """The load in batches, each but the last announcing more (as a resuming sender sends it)."""
    out = [intake_pb2.BulkLoadRequest(load_id=load_id, municipality_code=municipality, through_sequence=0,
                                      records=loaded[i : i + size], more_batches=True)
           for i in range(0, len(loaded), size)]
    out[-1].more_batches = False
    return out


async def progress(mesh: Mesh, load_id: str, municipality: str = NAKANO,
                   stub: intake_pb2_grpc.IntakeServiceStub | None = None) -> intake_pb2.GetBulkLoadResponse:
    return await (stub or mesh.as_municipality(municipality)).GetBulkLoad(
        intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=municipality))


async def interrupted(mesh: Mesh, load_id: str, batches: list[intake_pb2.BulkLoadRequest], upto: int) -> None:
    """Send batches[:upto], wait until both tiers have applied them, then cut the stream off (the sender
    dies: the intake sees the stream end after a batch that announced more)."""
    last = batches[upto - 1].records[-1].resident_code
    never = asyncio.Event()

    async def stream() -> Any:
        for batch in batches[:upto]:
            yield batch
        await never.wait()

    stub = mesh.as_municipality(NAKANO)
    call = stub.BulkLoad(stream())
    while (await progress(mesh, load_id, stub=stub)).last_resident_code != last:
        await asyncio.sleep(0.05)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_a_resumed_load_applies_and_counts_each_record_once(mesh: Mesh, settings_factory: Any) -> None:
    loaded = records(NAKANO, 60)
    load_id = f"resume-{loaded[0].resident_code}"
    batches = batches_of(load_id, NAKANO, loaded, 10)
    assert (await progress(mesh, load_id)).state == STATE.BULK_LOAD_STATE_NOT_STARTED

    await interrupted(mesh, load_id, batches, 3)
    state = await progress(mesh, load_id)
    assert state.state == STATE.BULK_LOAD_STATE_IN_PROGRESS
    assert state.last_resident_code == loaded[29].resident_code
    assert (state.records_received, state.records_applied) == (30, 30)

    # Resumed one batch early (as a sender resuming from the national intake's point would): the records
    # the tiers already hold are skipped, not applied or counted again.
    summary = await mesh.as_municipality(NAKANO).BulkLoad(iter(batches[2:]))  # type: ignore[arg-type]
    assert (summary.records_received, summary.records_applied, summary.records_unchanged) == (60, 60, 0)
    done = await progress(mesh, load_id)
    assert done.state == STATE.BULK_LOAD_STATE_FINISHED
    assert (done.records_received, done.records_applied, done.last_resident_code) == (
        60, 60, loaded[-1].resident_code)
    national = await mesh.national_as("prefecture", "13").GetBulkLoad(
        intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=NAKANO))
    assert (national.state, national.records_applied) == (STATE.BULK_LOAD_STATE_FINISHED, 60)

    conn = await settings_factory.database.admin()
    try:
        for schema in ("intake_p13", "intake_national"):
            counts = await conn.fetchrow(
                f"SELECT (SELECT count(*) FROM {schema}.residents WHERE resident_code = ANY($1::text[])"
                " AND version = 1) AS residents,"
                f" (SELECT count(*) FROM {schema}.resident_versions WHERE resident_code = ANY($1::text[])) AS versions,"
                f" (SELECT count(*) FROM {schema}.resident_changes WHERE resident_code = ANY($1::text[])) AS changes",
                [r.resident_code for r in loaded])
            assert dict(counts) == {"residents": 60, "versions": 60, "changes": 60}, schema
    finally:
        await conn.close()


async def test_the_prefecture_resumes_no_further_than_the_national_intake(mesh: Mesh, settings_factory: Any) -> None:
    loaded = records(NAKANO, 20)
    load_id = f"behind-{loaded[0].resident_code}"
    batches = batches_of(load_id, NAKANO, loaded, 5)
    await interrupted(mesh, load_id, batches, 4)
    # The national intake lost its last two batches (as if it had died before committing them).
    conn: asyncpg.Connection = await settings_factory.database.admin()
    try:
        result = await conn.execute(
            "UPDATE intake_national.bulk_loads SET last_resident_code = $2 WHERE load_id = $1",
            load_id, loaded[9].resident_code)
        assert result == "UPDATE 1"
    finally:
        await conn.close()
    assert (await progress(mesh, load_id)).last_resident_code == loaded[9].resident_code
    national = await mesh.national_as("prefecture", "13").GetBulkLoad(
        intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=NAKANO))
    assert national.last_resident_code == loaded[9].resident_code


async def test_a_load_out_of_order_is_not_resumable(mesh: Mesh) -> None:
    loaded = records(NAKANO, 6)
    load_id = f"unordered-{loaded[0].resident_code}"
    shuffled = [loaded[3], loaded[4], loaded[5], loaded[0], loaded[1], loaded[2]]
    summary = await mesh.as_municipality(NAKANO).BulkLoad(iter(batches_of(load_id, NAKANO, shuffled, 3)))  # type: ignore[arg-type]
    assert summary.records_applied == 6  # the earlier codes of the second batch were applied, not skipped
    state = await progress(mesh, load_id)
    assert (state.state, state.last_resident_code) == (STATE.BULK_LOAD_STATE_FINISHED, "")


async def test_a_load_id_of_another_municipality_is_refused(mesh: Mesh) -> None:
    loaded = records(NAKANO, 2)
    load_id = f"taken-{loaded[0].resident_code}"
    await mesh.as_municipality(NAKANO).BulkLoad(iter(batches_of(load_id, NAKANO, loaded, 2)))  # type: ignore[arg-type]
    theirs = records(NAKANO, 1)[0]
    theirs.address.municipality_code = CHIYODA
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.as_municipality(CHIYODA).BulkLoad(iter(batches_of(load_id, CHIYODA, [theirs], 1)))  # type: ignore[arg-type]
    assert (caught.value.code(), refusal(caught.value).fields) == (grpc.StatusCode.INVALID_ARGUMENT, ("load_id",))


@pytest.mark.parametrize(("load_id", "municipality", "field"), [
    ("", NAKANO, "load_id"),
    ("x" * 129, NAKANO, "load_id"),
    ("load\x00id", NAKANO, "load_id"),
    ("some-load", "", "municipality_code"),
    ("some-load", "999999", "municipality_code"),
    ("some-load", "13114８", "municipality_code"),
])
async def test_get_bulk_load_names_the_bad_field(mesh: Mesh, load_id: str, municipality: str, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.as_municipality(NAKANO).GetBulkLoad(
            intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=municipality))
    assert (caught.value.code(), refusal(caught.value).fields) == (grpc.StatusCode.INVALID_ARGUMENT, (field,))


async def test_only_the_sender_of_a_load_reads_its_progress(mesh: Mesh) -> None:
    loaded = records(NAKANO, 2)
    load_id = f"mine-{loaded[0].resident_code}"
    await mesh.as_municipality(NAKANO).BulkLoad(iter(batches_of(load_id, NAKANO, loaded, 2)))  # type: ignore[arg-type]
    ask = intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=NAKANO)

    async def code_of(call: Any) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        return caught.value.code()

    denied = grpc.StatusCode.PERMISSION_DENIED
    # Another municipality: not for NAKANO's code, nor NAKANO's load under its own code.
    assert await code_of(mesh.as_municipality(CHIYODA).GetBulkLoad(ask)) == denied
    assert await code_of(mesh.as_municipality(CHIYODA).GetBulkLoad(
        intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=CHIYODA))) == denied
    # Not agencies, services or operators, at either tier; at the national tier only the prefecture.
    for kind, name in (("agency", "jps"), ("service", "lookup"), ("operator", "demo-operator")):
        assert await code_of(mesh.prefecture_as("13", kind, name).GetBulkLoad(ask)) == denied
        assert await code_of(mesh.national_as(kind, name).GetBulkLoad(ask)) == denied
    assert await code_of(mesh.national_as("municipality", NAKANO).GetBulkLoad(ask)) == denied
    assert await code_of(mesh.national_as("prefecture", "14").GetBulkLoad(ask)) == denied
    assert await code_of(mesh.prefecture_as("14", "municipality", YOKOHAMA).GetBulkLoad(
        intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=NAKANO))) == denied
    mine = await mesh.as_municipality(NAKANO).GetBulkLoad(ask)
    theirs = await mesh.national_as("prefecture", "13").GetBulkLoad(ask)
    assert mine.state == theirs.state == STATE.BULK_LOAD_STATE_FINISHED


async def test_a_sender_failing_mid_stream_leaves_the_load_in_progress_at_both_tiers(mesh: Mesh) -> None:
    """A client whose batch source fails (its register read breaks off) can end its stream as if the
    load were complete; the batches announced more, so neither tier finishes the load."""
    loaded = records(NAKANO, 20)
    load_id = f"broken-{loaded[0].resident_code}"
    batches = batches_of(load_id, NAKANO, loaded, 5)
    stub = mesh.as_municipality(NAKANO)

    async def stream() -> Any:
        for batch in batches[:2]:
            yield batch
        while (await progress(mesh, load_id, stub=stub)).last_resident_code != loaded[9].resident_code:
            await asyncio.sleep(0.05)
        raise RuntimeError("the register read failed")

    with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
        await stub.BulkLoad(stream())
    national = mesh.national_as("prefecture", "13")
    ask = intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=NAKANO)
    for _ in range(20):  # both tiers have seen the stream end by now, or soon
        states = [(await stub.GetBulkLoad(ask)).state, (await national.GetBulkLoad(ask)).state]
        assert states == [STATE.BULK_LOAD_STATE_IN_PROGRESS] * 2
        await asyncio.sleep(0.05)
    summary = await stub.BulkLoad(iter(batches[2:]))  # type: ignore[arg-type]
    assert (summary.records_received, summary.records_applied) == (20, 20)
    assert (await national.GetBulkLoad(ask)).records_applied == 20
