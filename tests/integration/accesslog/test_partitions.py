"""Records partitioned by month (migration 0004, also on a log made before it) and retention by partition:
the purge detaches and drops whole months, never deletes a row, and what remains still verifies and
still proves into signed checkpoints (the tiles stay)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki.accesslog import chain, loader, merkle, notes
from juki.accesslog.retention import purge
from juki.accesslog.service import valid_code
from juki.accesslog.writer import micros_timestamps, prepare
from juki.mesh import db

from tests.integration.accesslog.conftest import LiveLog, codes, provision
from tests.integration.accesslog.test_tamper import audit

pytestmark = pytest.mark.timeout(180)
ORIGIN = "juki.local/accesslog"


def month_start(months_ago: int) -> dt.datetime:
    now = dt.datetime.now(dt.UTC)
    index = now.year * 12 + now.month - 1 - months_ago
    return dt.datetime(index // 12, index % 12 + 1, 1, tzinfo=dt.UTC)


def micros(value: dt.datetime) -> int:
    return (value - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


async def load_at(database: Any, schema: str, key: bytes, residents: list[str], when: dt.datetime) -> loader.Loaded:
    """Records of ``residents`` recorded at ``when`` (a past month), as the writer would have made them."""
    conn = await asyncpg.connect(database.admin_url)
    try:
        await conn.execute(f'SELECT "{schema}".ensure_partitions($1, $1)', when)
        await micros_timestamps(conn)
        prepared = prepare([provision(code, seconds=int(when.timestamp())) for code in residents],
                           chain.Pseudonymiser(key), micros(when), valid_code)
        assert prepared is not None
        return await loader.load(conn, schema, prepared, micros(when) + 3_600_000_000)
    finally:
        await conn.close()


async def partitions(database: Any, schema: str) -> list[str]:
    conn = await asyncpg.connect(database.admin_url)
    try:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p"
            " ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace WHERE n.nspname = $1"
            " AND p.relname = 'records' ORDER BY 1", schema)
        return [row["relname"] for row in rows]
    finally:
        await conn.close()


async def forbid_deletes(database: Any, schema: str) -> None:
    """A trigger that refuses any DELETE of a record row: retention must drop partitions instead."""
    conn = await asyncpg.connect(database.admin_url)
    try:
        await conn.execute(
            f'CREATE FUNCTION "{schema}".no_delete() RETURNS trigger LANGUAGE plpgsql AS'
            " $$ BEGIN RAISE EXCEPTION 'a record row was deleted'; END $$")
        await conn.execute(f'CREATE TRIGGER no_delete BEFORE DELETE ON "{schema}".records FOR EACH ROW'
                           f' EXECUTE FUNCTION "{schema}".no_delete()')
    finally:
        await conn.close()


async def test_records_live_in_monthly_partitions(live_log: LiveLog, database: Any) -> None:
    names = await partitions(database, live_log.schema)
    this_month = month_start(0)
    for ahead in range(3):  # this month and the next two, made by the service at start
        index = this_month.year * 12 + this_month.month - 1 + ahead
        assert f"records_{index // 12:04d}{index % 12 + 1:02d}" in names
    assert "records_default" in names
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(3)]))
    conn = await asyncpg.connect(database.admin_url)
    try:
        where = await conn.fetch(f'SELECT tableoid::regclass::text AS part FROM "{live_log.schema}".records')
        assert {row["part"].split(".")[-1].strip('"') for row in where} == {f"records_{this_month:%Y%m}"}
    finally:
        await conn.close()


async def test_purge_drops_whole_months_and_the_rest_still_verifies_and_proves(
    live_log: LiveLog, database: Any, ca: Any
) -> None:
    schema, key = live_log.schema, live_log.app.pseudonym_key
    old, newer = codes(20, seed=21), codes(5, seed=22)
    await load_at(database, schema, key, old, month_start(3))  # records 1..20, three months ago
    await load_at(database, schema, key, newer, month_start(2))  # 21..25, two months ago
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(5, seed=23)]))
    auditor = live_log.stub("operator", "demo-operator")
    before = await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())  # tree of size 30
    await forbid_deletes(database, schema)
    signer = chain.Signer(ca.paths("signing", "accesslog")[1])
    verifier = chain.CheckpointVerifier(ca.paths("signing", "accesslog")[0], ca.ca_cert_path)
    conn = await database.admin()
    try:
        result = await purge(conn, schema, signer, verifier, older_than=month_start(2))
    finally:
        await conn.close()
    gone = f"records_{month_start(3):%Y%m}"
    assert (result.purged, result.anchor_sequence, result.problem, result.partitions) == (20, 20, "", [gone])
    assert gone not in await partitions(database, schema)
    assert f"records_{month_start(2):%Y%m}" in await partitions(database, schema)
    # The audit verifies what remains, from the purge anchor, and the service's own verification too.
    code, report = await audit(database, ca, schema, "--full")
    assert code == 0 and report["first_sequence"] == 21 and report["records_checked"] == 10, report
    verified = await auditor.VerifyLog(accesslog_pb2.VerifyLogRequest())
    assert verified.ok and verified.records_checked == 10, verified
    # Disclosure of what remains: each remaining record proves into the checkpoint signed before the purge
    # and into the one the purge signed (the tiles, hashes of purged leaves included, stay).
    after = await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest(since_checkpoint=before.tree_checkpoint))
    log_key = live_log.app.verifier.note_verifier(ORIGIN)
    old_cp, new_cp = log_key.verify_checkpoint(before.tree_checkpoint), log_key.verify_checkpoint(after.tree_checkpoint)
    assert new_cp.tree_size == old_cp.tree_size == 30 and new_cp.root_hash == old_cp.root_hash
    reader = live_log.stub("service", "disclosure")
    listed = await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(resident_code=newer[2], proof_tree_size=30))
    logged = listed.provisions[0]
    assert logged.sequence == 23
    assert merkle.verify_inclusion(merkle.leaf_hash(logged.leaf), 22, 30, list(logged.inclusion_proof),
                                   old_cp.root_hash)
    purged = await reader.ListProvisions(accesslog_pb2.ListProvisionsRequest(resident_code=old[2]))
    assert not purged.provisions
    # The purge is anchored: a signed purge checkpoint at 20 and a signed tree checkpoint over the tree.
    conn = await database.admin()
    try:
        anchor = await conn.fetchrow(f'SELECT sequence FROM "{schema}".checkpoints WHERE kind = \'purge\'')
        assert anchor["sequence"] == 20
        notes_after = await conn.fetch(f'SELECT note FROM "{schema}".tree_checkpoints ORDER BY signed_at_ns')
        assert isinstance(log_key.verify_checkpoint(notes_after[-1]["note"]), notes.Checkpoint)
    finally:
        await conn.close()
    # The service keeps appending; a record deleted past the anchor is still named.
    reply = await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(codes(1, seed=24)[0])]))
    assert reply.first_sequence == 31


async def test_a_month_holding_a_later_record_than_a_newer_month_is_kept(
    live_log: LiveLog, database: Any, ca: Any
) -> None:
    schema, key = live_log.schema, live_log.app.pseudonym_key
    await load_at(database, schema, key, codes(4, seed=31), month_start(2))  # 1..4, two months ago
    await load_at(database, schema, key, codes(3, seed=32), month_start(4))  # 5..7, "four months ago" (a skewed clock)
    signer = chain.Signer(ca.paths("signing", "accesslog")[1])
    verifier = chain.CheckpointVerifier(ca.paths("signing", "accesslog")[0], ca.ca_cert_path)
    conn = await database.admin()
    try:
        # Dropping the older month would remove 5..7 but keep 1..4: not a prefix, so nothing goes.
        result = await purge(conn, schema, signer, verifier, older_than=month_start(3))
        assert (result.purged, result.anchor_sequence, result.partitions) == (0, 0, [])
        assert "kept" in result.kept
        result = await purge(conn, schema, signer, verifier, older_than=month_start(1))
        assert (result.purged, result.anchor_sequence) == (7, 7)
    finally:
        await conn.close()


async def test_a_log_made_before_partitions_migrates_with_its_rows(
    database: Any, settings_factory: Any, ca: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema at migration 3 (plain tables) with records, migrated to 4: the rows move into monthly
    partitions, the log verifies, and the service appends after them."""
    import uuid

    from juki.accesslog.app import create, read_pseudonym_key

    from tests.conftest import running

    instance = f"accesslog-t{uuid.uuid4().hex[:10]}"
    real = db.load_migrations
    # migrations 1-3, and the middles table today's loader writes (0006, independent of 4 and 5)
    monkeypatch.setattr(db, "load_migrations",
                        lambda package: [m for m in real(package) if m.version <= 3 or m.name == "tile_middles"])
    await db.migrate(database.admin_url, [db.MigrationTarget("accesslog", instance)])
    schema = db.schema_name(instance)
    conn = await asyncpg.connect(database.admin_url)
    try:
        assert await conn.fetchval("SELECT relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                                   " WHERE n.nspname = $1 AND relname = 'records'", schema) == b"r"
    finally:
        await conn.close()
    base = settings_factory("accesslog", instance, ("service", "accesslog"))
    settings = settings_factory("accesslog", instance, ("service", "accesslog"),
                                accesslog=dataclasses.replace(base.accesslog, checkpoint_seconds=0, verify_seconds=0))
    key = read_pseudonym_key(settings.accesslog.pseudonym_key_file)
    conn = await asyncpg.connect(database.admin_url)
    try:
        await micros_timestamps(conn)
        for months_ago, seed in ((5, 41), (1, 42)):
            when = month_start(months_ago)
            prepared = prepare([provision(c) for c in codes(6, seed=seed)], chain.Pseudonymiser(key), micros(when),
                               valid_code)
            assert prepared is not None
            await loader.load(conn, schema, prepared, micros(when) + 1)
    finally:
        await conn.close()
    monkeypatch.setattr(db, "load_migrations", real)
    assert await db.migrate(database.admin_url, [db.MigrationTarget("accesslog", instance)]) == {instance: [4, 5]}
    names = await partitions(database, schema)
    assert {f"records_{month_start(5):%Y%m}", f"records_{month_start(1):%Y%m}", "records_default"} <= set(names)
    conn = await asyncpg.connect(database.admin_url)
    try:
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".records') == 12
        assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".records_default') == 0
    finally:
        await conn.close()
    app = create(settings)
    async with running(settings, app) as address:
        live = LiveLog(settings, app, address, schema, ca)
        try:
            reply = await live.stub().Append(accesslog_pb2.AppendRequest(records=[provision(codes(1, seed=43)[0])]))
            assert reply.first_sequence == 13
            await live.stub("operator", "demo-operator").GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
            code, report = await audit(database, ca, schema, "--full")
            assert code == 0 and report["records_checked"] == 13, report
        finally:
            await live.close()


async def purge_cli(database: Any, ca: Any, schema: str, older_than: dt.datetime, *extra: str) -> tuple[int, str, str]:
    """`juki audit purge` as a real process, with the state file `audit` (juki audit verify) keeps."""
    state = Path(tempfile.gettempdir()) / "juki-audit-state" / f"{schema}.json"
    days = (dt.datetime.now(dt.UTC) - older_than).total_seconds() / 86_400
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", "audit", "purge", "--database-url", database.admin_url, "--schema", schema,
        "--ca", str(ca.ca_cert_path), "--signing-cert", str(ca.paths("signing", "accesslog")[0]),
        "--signing-key", str(ca.paths("signing", "accesslog")[1]), "--state", str(state),
        "--older-than-days", f"{days:.6f}", *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def months_of_records(live_log: LiveLog, database: Any) -> None:
    """Records 1..20 three months ago, 21..25 two months ago, 26..30 now, under a signed checkpoint."""
    schema, key = live_log.schema, live_log.app.pseudonym_key
    await load_at(database, schema, key, codes(20, seed=41), month_start(3))
    await load_at(database, schema, key, codes(5, seed=42), month_start(2))
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(5, seed=43)]))
    await live_log.stub("operator", "demo-operator").GetCheckpoint(accesslog_pb2.GetCheckpointRequest())


async def test_purge_continues_from_the_auditors_state_and_hashes_only_new_and_dropped_records(
    live_log: LiveLog, database: Any, ca: Any
) -> None:
    schema = live_log.schema
    await months_of_records(live_log, database)
    code, report = await audit(database, ca, schema, "--full")  # the auditor's state: the tree at 30
    assert code == 0 and report["latest_tree_size"] == 30, report
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(3, seed=44)]))
    await live_log.stub("operator", "demo-operator").GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    await forbid_deletes(database, schema)
    code, out, err = await purge_cli(database, ca, schema, month_start(2))
    assert code == 0, err
    result = json.loads(out)
    # The 3 new records, then the 20 dropped and the first kept (21, chaining from the anchor at 20):
    # never the 9 kept records the auditor had verified before.
    assert (result["verification"], result["records_hashed"]) == ("incremental", 3 + 20 + 1), result
    assert (result["purged"], result["anchor_sequence"]) == (20, 20), result
    code, report = await audit(database, ca, schema)  # continues from the state the purge saved
    assert code == 0 and report["mode"] == "incremental" and report["records_hashed"] == 0, report
    code, report = await audit(database, ca, schema, "--full")
    assert code == 0 and report["first_sequence"] == 21 and report["records_checked"] == 13, report


@pytest.mark.parametrize("tamper", ["payload", "delete"])
async def test_an_incremental_purge_refuses_a_record_to_drop_altered_since_the_last_audit(
    live_log: LiveLog, database: Any, ca: Any, tamper: str
) -> None:
    schema = live_log.schema
    await months_of_records(live_log, database)
    code, _ = await audit(database, ca, schema, "--full")
    assert code == 0
    # After the audit, a record about to be dropped is altered (or removed): the incremental verification
    # alone would not see it (it hashes only what is new), the purge's check of what it drops does.
    conn = await database.admin()
    try:
        if tamper == "payload":
            await conn.execute(f'UPDATE "{schema}".records SET payload = payload || \'\\x00\'::bytea WHERE sequence = 7')
        else:
            await conn.execute(f'DELETE FROM "{schema}".records WHERE sequence = 7')
    finally:
        await conn.close()
    before = await partitions(database, schema)
    code, out, err = await purge_cli(database, ca, schema, month_start(2))
    assert code == 1 and not out, out
    assert "refusing to purge" in err and "record 7" in err, err
    assert await partitions(database, schema) == before  # nothing dropped
