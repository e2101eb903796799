"""A register load survives the death of every process on its way: SIGKILL the municipal CS a quarter of
the way (the repeated ResyncToPrefecture continues the same load from where both tiers have it), then the
prefecture intake and the national intake under that call (the CS continues the stream by itself). In the
end each resident is at both tiers exactly once, at version 1 with one history row and one change-feed
row, and only the few batches in flight at each death were sent again."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import grpc
import pytest
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki.bench.load import FIRST_BODY, LoadEnvironment
from juki.domain.codes import resident_code_from_body
from juki.mesh.tls import secure_channel
from juki.municipal.app import RESYNC_WINDOW

from tests.faults import LOOP_ERROR_MARKERS

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

RESIDENTS = 30_000
BATCH = 200
NAKANO = "131148"


@pytest.fixture
async def env() -> Any:
    environment = LoadEnvironment(batch=BATCH)
    try:
        await environment.start()
        await environment.fill(RESIDENTS)
        yield environment
    finally:
        environment.close()


async def national_progress(admin: asyncpg.Connection) -> int:
    """Records of the load the national intake has committed (each counted once)."""
    return int(await admin.fetchval("SELECT coalesce(max(records_received), 0) FROM intake_national.bulk_loads"))


async def resume_point(env: LoadEnvironment, load_id: str) -> str:
    """Where the CS will resume: GetBulkLoad at the prefecture, asked as 中野区 (as the CS asks)."""
    async with secure_channel(env.address("intake-prefecture-13"), env.tls("municipality", NAKANO)) as channel:
        state = await intake_pb2_grpc.IntakeServiceStub(channel).GetBulkLoad(
            intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=NAKANO), timeout=30)
    assert state.state == intake_pb2.BULK_LOAD_STATE_IN_PROGRESS, state
    return state.last_resident_code


async def until_national_holds(admin: asyncpg.Connection, share: float, call: asyncio.Task[Any]) -> int:
    """Wait until the national intake holds ``share`` of the load; how much it holds then."""
    while (done := await national_progress(admin)) < RESIDENTS * share:
        assert not call.done(), f"the call ended before the kill: {call}"
        await asyncio.sleep(0.02)
    return done


async def test_a_load_resumes_after_each_process_is_killed(env: LoadEnvironment) -> None:
    codes = [resident_code_from_body(FIRST_BODY + i) for i in range(RESIDENTS)]
    admin = await asyncpg.connect(env.pg.admin_url)
    try:
        # The CS dies a quarter of the way: the operator's call fails; the CS has the load in its database.
        first = asyncio.create_task(env.resync(timeout=300))
        held = await until_national_holds(admin, 0.25, first)
        env.kill("municipal-131148")
        with pytest.raises(grpc.aio.AioRpcError):
            await first
        env.spawn("municipal-131148")
        load_id = await admin.fetchval("SELECT resync_load_id FROM municipal_131148.outbox_state")
        assert load_id
        resumed_after = await resume_point(env, load_id)
        assert resumed_after >= codes[held - 1]  # everything the national intake had is skipped

        # The call made again continues that load; the prefecture intake, then the national intake, die
        # under it and come back, and the CS continues the stream each time within the same call.
        second = asyncio.create_task(env.resync(timeout=300))
        await until_national_holds(admin, 0.5, second)
        env.kill("intake-prefecture-13")
        env.spawn("intake-prefecture-13")
        await until_national_holds(admin, 0.75, second)
        env.kill("intake-national")
        env.spawn("intake-national")
        response = await second
        assert response.load_id == load_id  # the same load, continued
        assert response.resumptions >= 3  # the CS's own death, then each intake's
        remaining = sum(1 for code in codes if code > resumed_after)
        resent = response.records_sent - remaining
        # Only the batches in flight at each intake's death (at most the CS's window) were sent twice.
        assert 0 <= resent <= 2 * RESYNC_WINDOW * BATCH, (response.records_sent, remaining)
        assert response.records_applied == RESIDENTS  # the prefecture's summary covers the whole load

        for schema in ("intake_p13", "intake_national"):
            row = await admin.fetchrow(
                f"SELECT (SELECT count(*) FROM {schema}.residents WHERE municipality_code = $1) AS residents,"
                f" (SELECT count(*) FROM {schema}.residents WHERE municipality_code = $1 AND version = 1) AS v1,"
                f" (SELECT count(*) FROM {schema}.resident_versions) AS versions,"
                f" (SELECT count(DISTINCT resident_code) FROM {schema}.resident_versions) AS versioned,"
                f" (SELECT count(*) FROM {schema}.resident_changes) AS changes,"
                f" (SELECT count(DISTINCT resident_code) FROM {schema}.resident_changes) AS changed",
                NAKANO)
            assert dict(row) == {"residents": RESIDENTS, "v1": RESIDENTS, "versions": RESIDENTS,
                                 "versioned": RESIDENTS, "changes": RESIDENTS, "changed": RESIDENTS}, schema
            held = {r["resident_code"] for r in await admin.fetch(f"SELECT resident_code FROM {schema}.residents")}
            assert held == set(codes), schema
            load = await admin.fetchrow(f"SELECT * FROM {schema}.bulk_loads WHERE load_id = $1", load_id)
            assert load["finished_at"] is not None, schema
            assert (load["records_received"], load["records_applied"], load["records_unchanged"]) == (
                RESIDENTS, RESIDENTS, 0), schema
            assert await admin.fetchval(f"SELECT count(*) FROM {schema}.bulk_loads") == 1, schema
        state = await admin.fetchrow("SELECT resync_load_id, last_resync_load_id FROM municipal_131148.outbox_state")
        assert (state["resync_load_id"], state["last_resync_load_id"]) == ("", load_id)
    finally:
        await admin.close()

    found = [f"{path.name}: {line[:300]}" for path in sorted(env.root.glob("*.log"))
             for line in path.read_text(errors="replace").splitlines()
             if any(marker in line for marker in LOOP_ERROR_MARKERS)]
    assert not found, "services left asyncio errors uncollected:\n" + "\n".join(found[:20])
