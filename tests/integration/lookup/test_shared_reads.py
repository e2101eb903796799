"""Lookups by code in flight together share one store read and one access-log append (lookup.bycode).

Against the real store and the real access log: calls of one group are each answered with their own
resident and each logged, a code the store does not know is answered "not found" and logged nowhere, a
call abandoned before its group starts is neither read nor logged, and a call that finds nothing under
way reads on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki.lookup.app import PROVIDER, LookupApp, create
from juki.lookup.bycode import CodeReads
from juki.lookup.service import _FIELDS_BY_CODES
from juki.mesh.errors import JukiError, Reason, from_grpc_error

from tests.conftest import channel_as, running
from tests.integration.lookup.conftest import Mesh, add_resident, fresh_code

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

PENSION = "B1-PENSION-BENEFIT"


@pytest_asyncio.fixture(loop_scope="session")
async def app(mesh: Mesh) -> AsyncIterator[tuple[LookupApp, str]]:
    settings = mesh.lookup_settings()
    service = create(settings)
    async with running(settings, service) as address:
        yield service, address


def _reads(app: LookupApp) -> CodeReads:
    assert app.servicer is not None
    return app.servicer._reads


def _provision(code: str) -> bytes:
    record = accesslog_pb2.ProvisionRecord(
        recipient="spiffe://juki.local/agency/jps", recipient_name="日本年金機構", purpose=PENSION,
        query_mode=common_pb2.QUERY_MODE_BY_CODE, provider_tier=common_pb2.TIER_NATIONAL, provider=PROVIDER,
        outcome=accesslog_pb2.PROVISION_OUTCOME_PROVIDED, resident_code=code, fields=[common_pb2.FIELD_NAME],
    )
    record.provided_at.GetCurrentTime()
    return record.SerializeToString()


async def test_calls_of_one_turn_share_one_read_and_each_is_answered_and_logged(
        app: tuple[LookupApp, str], mesh: Mesh) -> None:
    reads = _reads(app[0])
    known = [await add_resident(mesh.database, family_name=name) for name in ("佐藤", "鈴木", "高橋")]
    unknown = fresh_code()
    asked = [*known, *known, unknown]
    before = reads.groups
    rows = await asyncio.gather(*(reads.read(code, _provision(code)) for code in asked))
    # The first finds nothing under way and reads on its own; the six arriving meanwhile share one read.
    assert reads.groups - before == 2
    assert [row["resident_code"] if row is not None else None for row in rows] == [*known, *known, None]
    assert [row["family_name"] for row in rows[:3] if row is not None] == ["佐藤", "鈴木", "高橋"]
    for code in known:
        assert len(await mesh.provisions(code)) == 2  # each call's own record
    assert await mesh.provisions(unknown, include_refused=True) == []


async def test_a_call_abandoned_before_its_group_starts_is_neither_read_nor_logged(
        app: tuple[LookupApp, str], mesh: Mesh) -> None:
    reads = _reads(app[0])
    alone, abandoned, kept = [await add_resident(mesh.database) for _ in range(3)]
    leading = asyncio.ensure_future(reads.read(alone, _provision(alone)))  # reads on its own
    first = asyncio.ensure_future(reads.read(abandoned, _provision(abandoned)))
    second = asyncio.ensure_future(reads.read(kept, _provision(kept)))
    await asyncio.sleep(0)  # the two others are queued behind the lone read; their group starts after it
    first.cancel()
    assert await leading is not None
    row = await second
    assert row is not None and row["resident_code"] == kept
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert first.cancelled()
    assert len(await mesh.provisions(kept)) == 1
    assert await mesh.provisions(abandoned) == []


async def test_concurrent_lookups_over_the_wire_each_get_their_resident(
        app: tuple[LookupApp, str], mesh: Mesh) -> None:
    codes = [await add_resident(mesh.database, given_name=name) for name in ("一郎", "花子", "陽子", "健")]
    unknown = fresh_code()
    channel = channel_as(mesh.ca, "agency", "jps", app[1])
    try:
        stub = lookup_pb2_grpc.LookupServiceStub(channel)
        answers = await asyncio.gather(*(
            stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
            for code in [*codes, unknown]), return_exceptions=True)
    finally:
        await channel.close()
    for code, name, answer in zip(codes, ("一郎", "花子", "陽子", "健"), answers, strict=False):
        assert isinstance(answer, lookup_pb2.LookupByCodeResponse)
        assert answer.record.resident_code == code and answer.record.name.given_name == name
        assert list(answer.provided_fields) and len(await mesh.provisions(code)) == 1
    missing = answers[-1]
    assert isinstance(missing, grpc.aio.AioRpcError) and missing.code() == grpc.StatusCode.NOT_FOUND
    assert from_grpc_error(missing).reason is Reason.RESIDENT_NOT_FOUND
    assert await mesh.provisions(unknown) == []


async def test_stopping_fails_the_calls_still_waiting(mesh: Mesh) -> None:
    settings = mesh.lookup_settings()
    service = create(settings)
    async with running(settings, service):
        reads = _reads(service)
        code = await add_resident(mesh.database)
        alone = asyncio.ensure_future(reads.read(code, _provision(code)))  # under way: it is answered
        waiting = asyncio.ensure_future(reads.read(code, _provision(code)))  # queued behind it: it fails
        await asyncio.sleep(0)
        await reads.close()
        with pytest.raises(JukiError) as failure:
            await waiting
        assert failure.value.reason is Reason.ACCESS_LOG_UNAVAILABLE
        assert await alone is not None


async def test_a_stalled_store_read_fails_its_group_as_retryable_and_the_next_group_reads(
        app: tuple[LookupApp, str], mesh: Mesh) -> None:
    service = app[0]
    assert service.pool is not None and service.provisions is not None
    reads = CodeReads(service.pool, _FIELDS_BY_CODES, service.provisions, store_timeout=0.5)
    code = await add_resident(mesh.database)
    holder = await mesh.database.admin()
    try:
        # A lock that every SELECT on the store waits for: the group's read cannot finish.
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE intake_national.residents IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(JukiError) as stalled:
            await reads.read(code, _provision(code))
        assert stalled.value.reason is Reason.DEPENDENCY_UNAVAILABLE and stalled.value.retryable
        await transaction.rollback()
        row = await reads.read(code, _provision(code))
        assert row is not None and row["resident_code"] == code
        assert len(await mesh.provisions(code)) == 1  # only the answered call is logged
    finally:
        await holder.close()
        await reads.close()
