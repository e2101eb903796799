"""The access log against real PostgreSQL and real mTLS: append, chain, checkpoints, listing, access."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki.accesslog import chain
from juki.accesslog.verify import verify_log
from juki.mesh.errors import from_grpc_error

from tests.integration.accesslog.conftest import LiveLog, codes, provision

pytestmark = pytest.mark.timeout(120)


def _bad_fields(exc: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for v in from_grpc_error(exc).violations]


async def test_append_assigns_consecutive_sequences_and_stores_only_a_pseudonym(live_log: LiveLog, database: Any) -> None:
    stub = live_log.stub()
    resident = codes(1)[0]
    first = await stub.Append(accesslog_pb2.AppendRequest(records=[provision(resident), provision(resident)]))
    second = await stub.Append(accesslog_pb2.AppendRequest(records=[provision(resident)]))
    assert (first.first_sequence, first.count) == (1, 2)
    assert (second.first_sequence, second.count) == (3, 1)
    admin = await database.admin()
    try:
        rows = await admin.fetch(f'SELECT subject, payload FROM "{live_log.schema}".records ORDER BY sequence')
    finally:
        await admin.close()
    assert len(rows) == 3
    for row in rows:
        assert resident.encode() not in bytes(row["payload"])
        assert bytes(row["subject"]) == chain.pseudonym(live_log.app.pseudonym_key, resident)
        assert len(bytes(row["subject"])) == 32


async def test_retried_batch_id_returns_the_first_acknowledgement(live_log: LiveLog) -> None:
    stub = live_log.stub()
    resident = codes(1)[0]
    request = accesslog_pb2.AppendRequest(batch_id="batch-1", records=[provision(resident)] * 3)
    one = await stub.Append(request)
    two = await stub.Append(request)
    assert (one.first_sequence, one.count) == (two.first_sequence, two.count) == (1, 3)
    verified = await live_log.stub("operator", "demo-operator").VerifyLog(accesslog_pb2.VerifyLogRequest())
    assert verified.records_checked == 3


async def test_concurrent_appends_share_commits_and_all_chain(live_log: LiveLog) -> None:
    stub = live_log.stub()
    residents = codes(20)
    replies = await asyncio.gather(*[
        stub.Append(accesslog_pb2.AppendRequest(records=[provision(code)] * 5)) for code in residents
    ])
    spans = sorted((r.first_sequence, r.first_sequence + r.count - 1) for r in replies)
    assert spans[0][0] == 1 and spans[-1][1] == 100
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))
    assert live_log.app.writer is not None and live_log.app.writer.stats.groups < 20
    result = await live_log.stub("operator", "demo-operator").VerifyLog(accesslog_pb2.VerifyLogRequest())
    assert result.ok and result.records_checked == 100


async def test_append_stream_acknowledges_each_batch_in_order(live_log: LiveLog) -> None:
    stub = live_log.stub()
    residents = codes(10)

    async def requests() -> Any:
        for index, code in enumerate(residents):
            yield accesslog_pb2.AppendStreamRequest(batch_id=f"s-{index}", records=[provision(code)] * 4)

    acks = [ack async for ack in stub.AppendStream(requests())]
    assert [a.batch_id for a in acks] == [f"s-{i}" for i in range(10)]
    assert [a.first_sequence for a in acks] == [1 + 4 * i for i in range(10)]


async def test_bad_resident_code_is_invalid_argument_naming_the_record(live_log: LiveLog) -> None:
    stub = live_log.stub()
    good = codes(1)[0]
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Append(accesslog_pb2.AppendRequest(records=[provision(good), provision(bad)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(caught.value) == ["records[1].resident_code"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await live_log.stub("service", "disclosure").ListProvisions(
            accesslog_pb2.ListProvisionsRequest(resident_code=good, from_date=common_pb2.Date(year=2024, month=2, day=30))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(caught.value) == ["from_date"]


async def test_access_is_deny_by_default(live_log: LiveLog) -> None:
    resident = codes(1)[0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await live_log.stub("agency", "jps").Append(accesslog_pb2.AppendRequest(records=[provision(resident)]))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await live_log.stub("service", "lookup").ListProvisions(accesslog_pb2.ListProvisionsRequest(resident_code=resident))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await live_log.stub("agency", "jps").VerifyLog(accesslog_pb2.VerifyLogRequest())
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_list_provisions_newest_first_filtered_and_paged(live_log: LiveLog) -> None:
    stub = live_log.stub()
    me, other = codes(2)
    day = 86_400
    base = 1_704_034_800  # 2024-01-01 00:00 JST
    records = [provision(me, seconds=base + i * day, purpose=f"P{i:03d}") for i in range(30)]
    records += [provision(other, seconds=base + i * day) for i in range(5)]
    records.append(provision(me, seconds=base + 3 * day + 10, outcome=accesslog_pb2.PROVISION_OUTCOME_REFUSED))
    await stub.Append(accesslog_pb2.AppendRequest(records=records))
    reader = live_log.stub("service", "disclosure")
    seen: list[str] = []
    token = ""
    while True:
        page = await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(
            resident_code=me, page_size=7, page_token=token,
            from_date=common_pb2.Date(year=2024, month=1, day=5), to_date=common_pb2.Date(year=2024, month=1, day=24),
        ))
        seen += [p.record.purpose for p in page.provisions]
        assert all(p.record.resident_code == me for p in page.provisions)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"P{i:03d}" for i in range(23, 3, -1)]
    with_refused = await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(
        resident_code=me, include_refused=True, page_size=1000))
    assert len(with_refused.provisions) == 31


async def test_service_role_cannot_update_or_delete(live_log: LiveLog, database: Any) -> None:
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(codes(1)[0])]))
    conn = await asyncpg.connect(live_log.settings.database.url.reveal())
    try:
        for statement in (
            f'UPDATE "{live_log.schema}".records SET outcome = 2',
            f'DELETE FROM "{live_log.schema}".records',
            f'UPDATE "{live_log.schema}".checkpoints SET kind = \'purge\'',
            f'TRUNCATE "{live_log.schema}".records',
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        assert await conn.fetchval(f'SELECT count(*) FROM "{live_log.schema}".records') == 1
    finally:
        await conn.close()


async def test_checkpoint_is_signed_by_the_pki_signing_key(live_log: LiveLog, ca: Any) -> None:
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(5)]))
    reply = await live_log.stub("operator", "demo-operator").GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    cp = reply.checkpoint
    assert cp.sequence == 5
    verifier = chain.CheckpointVerifier(ca.paths("signing", "accesslog")[0], ca.ca_cert_path)
    signed_ns = cp.signed_at.seconds * 1_000_000_000 + cp.signed_at.nanos
    assert verifier.verify(cp.sequence, cp.chain_hash, signed_ns, cp.signature, cp.key_id)
    assert not verifier.verify(cp.sequence, bytes(32), signed_ns, cp.signature, cp.key_id)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    payload = chain.checkpoint_payload(cp.sequence, cp.chain_hash, signed_ns)
    assert payload.startswith(b"juki-accesslog-checkpoint-v1\n5\n")
    public = verifier._public_key
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(cp.signature, payload)


async def test_shutdown_signs_a_checkpoint(settings_factory: Any, database: Any, ca: Any) -> None:
    from juki.accesslog.app import create

    from tests.conftest import running
    from tests.integration.accesslog.conftest import fresh_instance

    instance = await fresh_instance(database)
    base = settings_factory("accesslog", instance, ("service", "accesslog"))
    settings = settings_factory("accesslog", instance, ("service", "accesslog"),
                                accesslog=dataclasses.replace(base.accesslog, checkpoint_seconds=3600,
                                                              verify_seconds=0))
    app = create(settings)
    async with running(settings, app) as address:
        log = LiveLog(settings, app, address, settings.database.schema, ca)
        await log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(4)]))
        await log.close()
    admin = await database.admin()
    try:
        rows = await admin.fetch(f'SELECT sequence, kind FROM "{settings.database.schema}".checkpoints')
    finally:
        await admin.close()
    assert [(r["sequence"], r["kind"]) for r in rows] == [(4, "shutdown")]


async def test_periodic_checkpoints(settings_factory: Any, database: Any, ca: Any) -> None:
    from juki.accesslog.app import create

    from tests.conftest import running
    from tests.integration.accesslog.conftest import fresh_instance

    instance = await fresh_instance(database)
    base = settings_factory("accesslog", instance, ("service", "accesslog"))
    settings = settings_factory("accesslog", instance, ("service", "accesslog"),
                                accesslog=dataclasses.replace(base.accesslog, checkpoint_seconds=0.2,
                                                              verify_seconds=0))
    app = create(settings)
    async with running(settings, app) as address:
        live = LiveLog(settings, app, address, settings.database.schema, ca)
        stub = live.stub()
        await stub.Append(accesslog_pb2.AppendRequest(records=[provision(codes(1)[0])]))
        await asyncio.sleep(0.6)
        await stub.Append(accesslog_pb2.AppendRequest(records=[provision(codes(1)[0])]))
        await asyncio.sleep(0.6)
        admin = await database.admin()
        try:
            kinds = await admin.fetch(f'SELECT sequence, kind FROM "{settings.database.schema}".checkpoints ORDER BY 1')
        finally:
            await admin.close()
        await live.close()
    assert [(r["sequence"], r["kind"]) for r in kinds] == [(1, "periodic"), (2, "periodic")]


def _signing(ca: Any) -> tuple[chain.CheckpointVerifier, Path]:
    return chain.CheckpointVerifier(ca.paths("signing", "accesslog")[0], ca.ca_cert_path), ca.paths("signing", "accesslog")[1]


async def test_forged_checkpoint_signature_is_found(live_log: LiveLog, database: Any, ca: Any) -> None:
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(3)]))
    await live_log.stub("operator", "demo-operator").GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    admin = await database.admin()
    try:
        await admin.execute(f'UPDATE "{live_log.schema}".checkpoints SET signed_at_ns = signed_at_ns + 1')
        verifier, _ = _signing(ca)
        result = await verify_log(admin, verifier, schema=live_log.schema)
    finally:
        await admin.close()
    assert not result.ok and result.first_bad_sequence == 3 and "signature" in result.problem


async def test_verify_log_may_answer_from_a_recent_verification(live_log: LiveLog, database: Any) -> None:
    """A recent result is reused only while it covers the head; newer records are verified incrementally;
    a full verification (no max age) still recomputes everything, so it finds an old record altered later."""
    auditor = live_log.stub("operator", "demo-operator")
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(3)]))
    first = await auditor.VerifyLog(accesslog_pb2.VerifyLogRequest())
    again = await auditor.VerifyLog(accesslog_pb2.VerifyLogRequest(max_age_seconds=3600))
    assert again.verified_at == first.verified_at and again.through_sequence == first.through_sequence == 3
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(2, seed=8)]))
    grown = await auditor.VerifyLog(accesslog_pb2.VerifyLogRequest(max_age_seconds=3600))
    assert grown.ok and (grown.records_checked, grown.through_sequence) == (5, 5)
    assert grown.full_verified_at == first.verified_at  # incremental: the full run is still the first one
    conn = await database.admin()
    try:
        await conn.execute(f'UPDATE "{live_log.schema}".records SET outcome = 2 WHERE sequence = 2')
    finally:
        await conn.close()
    full = await auditor.VerifyLog(accesslog_pb2.VerifyLogRequest())
    assert not full.ok and full.first_bad_sequence == 2 and full.through_sequence == 0


async def test_two_replicas_writing_one_log_keep_one_chain(live_log: LiveLog) -> None:
    """A second service process on the same schema: the advisory lock and the head re-read under it
    keep one gap-free chain, even though each replica chains its groups speculatively."""
    from juki.accesslog.app import create

    from tests.conftest import running

    second = create(live_log.settings)
    async with running(live_log.settings, second) as address:
        other = LiveLog(live_log.settings, second, address, live_log.schema, live_log.ca)
        stubs = [live_log.stub(), other.stub()]
        residents = codes(40, seed=21)
        replies = await asyncio.gather(*[
            stubs[index % 2].Append(accesslog_pb2.AppendRequest(records=[provision(code)] * 25))
            for index, code in enumerate(residents)
        ])
        await other.close()
    assert live_log.app.writer is not None and second.writer is not None
    assert live_log.app.writer.stats.rebuilds + second.writer.stats.rebuilds > 0  # the race did happen
    spans = sorted((r.first_sequence, r.first_sequence + r.count - 1) for r in replies)
    assert spans[0][0] == 1 and spans[-1][1] == 1000
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))
    result = await live_log.stub("operator", "demo-operator").VerifyLog(accesslog_pb2.VerifyLogRequest())
    assert result.ok and result.records_checked == 1000, result.problem


async def test_a_failed_commit_acknowledges_nothing_and_the_log_recovers(live_log: LiveLog, database: Any) -> None:
    stub = live_log.stub()
    await stub.Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(3)]))
    role = f"juki_{live_log.schema}"
    admin = await database.admin()
    try:
        await admin.execute(f'REVOKE INSERT ON "{live_log.schema}".records FROM "{role}"')
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(2, seed=8)]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        await admin.execute(f'GRANT INSERT ON "{live_log.schema}".records TO "{role}"')
    finally:
        await admin.close()
    reply = await stub.Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(2, seed=9)]))
    assert (reply.first_sequence, reply.count) == (4, 2)  # nothing of the failed batch was kept
    verified = await live_log.stub("operator", "demo-operator").VerifyLog(accesslog_pb2.VerifyLogRequest())
    assert verified.ok and verified.records_checked == 5


async def test_append_stream_stops_at_a_bad_batch_and_keeps_the_good_ones(live_log: LiveLog) -> None:
    stub = live_log.stub()
    good = codes(1, seed=31)[0]
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)

    async def requests() -> Any:
        yield accesslog_pb2.AppendStreamRequest(batch_id="g1", records=[provision(good)] * 3)
        yield accesslog_pb2.AppendStreamRequest(batch_id="b1", records=[provision(good), provision(bad)])

    acks: list[accesslog_pb2.AppendStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for ack in stub.AppendStream(requests()):
            acks.append(ack)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(caught.value) == ["records[1].resident_code"]
    assert [(a.batch_id, a.first_sequence, a.count) for a in acks] == [("g1", 1, 3)]
    reply = await stub.Append(accesslog_pb2.AppendRequest(batch_id="g2", records=[provision(good)]))
    assert reply.first_sequence == 4


async def test_list_provisions_across_earlier_codes(live_log: LiveLog) -> None:
    new, old, stranger = codes(3, seed=41)
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[
        provision(old, seconds=100, purpose="A"), provision(stranger, seconds=150, purpose="X"),
        provision(new, seconds=200, purpose="B"), provision(old, seconds=300, purpose="C"),
    ]))
    reader = live_log.stub("service", "disclosure")
    first = await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(
        resident_code=new, other_resident_codes=[old], page_size=2))
    second = await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(
        resident_code=new, other_resident_codes=[old], page_size=2, page_token=first.next_page_token))
    seen = [(p.record.purpose, p.record.resident_code) for p in [*first.provisions, *second.provisions]]
    assert seen == [("C", old), ("B", new), ("A", old)] and not second.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(resident_code=new, other_resident_codes=["1"]))
    assert _bad_fields(caught.value) == ["other_resident_codes[0]"]


async def tree_from_records(database: Any, schema: str) -> tuple[int, bytes, bytes]:
    """(size, root recomputed from every record, root computed from the stored tiles)."""
    from juki.accesslog import merkle, tiles

    admin = await database.admin()
    try:
        rows = await admin.fetch(
            f'SELECT sequence, subject, (EXTRACT(EPOCH FROM provided_at) * 1000000)::bigint AS p,'
            f' (EXTRACT(EPOCH FROM recorded_at) * 1000000)::bigint AS r, outcome, payload'
            f' FROM "{schema}".records ORDER BY sequence'
        )
        frontier = merkle.Frontier()
        for row in rows:
            frontier.append(merkle.leaf_hash(chain.canonical_bytes(
                row["sequence"], row["p"], row["r"], row["outcome"], bytes(row["subject"]), bytes(row["payload"]))))
        size = await tiles.tree_size(admin, schema)
        stored = await tiles.root_at(admin, size, schema)
    finally:
        await admin.close()
    assert size == frontier.size
    return size, frontier.root(), stored


async def test_tiles_hold_the_tree_of_the_records_across_replicas_and_restarts(live_log: LiveLog, database: Any) -> None:
    from juki.accesslog.app import create

    from tests.conftest import running

    stub = live_log.stub()
    for count in (1, 255, 1, 300, 7):  # commits that straddle tile boundaries
        await stub.Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(count, seed=count)]))
    second = create(live_log.settings)
    async with running(live_log.settings, second) as address:
        other = LiveLog(live_log.settings, second, address, live_log.schema, live_log.ca)
        stubs = [stub, other.stub()]
        await asyncio.gather(*[
            stubs[index % 2].Append(accesslog_pb2.AppendRequest(records=[provision(code)] * 9))
            for index, code in enumerate(codes(30, seed=22))
        ])
        await other.close()
    await stub.Append(accesslog_pb2.AppendRequest(records=[provision(codes(1, seed=23)[0])]))
    size, recomputed, stored = await tree_from_records(database, live_log.schema)
    assert size == 564 + 270 + 1
    assert stored == recomputed
    assert live_log.app.writer is not None and live_log.app.writer.frontier.root() == recomputed


async def test_a_log_written_before_the_tree_existed_gets_its_tiles_at_start(live_log: LiveLog, database: Any) -> None:
    from juki.accesslog.app import create

    from tests.conftest import running

    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(300, seed=3)]))
    admin = await database.admin()
    try:
        for table in ("tiles", "tile_middles"):  # as before migration 0002
            await admin.execute(f'DELETE FROM "{live_log.schema}".{table}')
    finally:
        await admin.close()
    restarted = create(live_log.settings)
    async with running(live_log.settings, restarted) as address:
        other = LiveLog(live_log.settings, restarted, address, live_log.schema, live_log.ca)
        await other.stub().Append(accesslog_pb2.AppendRequest(records=[provision(codes(1, seed=4)[0])]))
        await other.close()
    size, recomputed, stored = await tree_from_records(database, live_log.schema)
    assert size == 301 and stored == recomputed
