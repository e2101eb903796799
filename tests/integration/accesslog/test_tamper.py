"""`juki audit verify` against logs tampered with directly in the database, and the retention purge."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki.accesslog import chain
from juki.accesslog.retention import purge

from tests.integration.accesslog.conftest import LiveLog, codes, provision

pytestmark = pytest.mark.timeout(120)


async def audit(database: Any, ca: Any, schema: str, *extra: str) -> tuple[int, dict[str, Any]]:
    """Run `juki audit verify --json` as a real process against the admin URL (its state file beside the
    other tests' temporary files, one per log)."""
    state = Path(tempfile.gettempdir()) / "juki-audit-state" / f"{schema}.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", "audit", "verify", "--json", "--database-url", database.admin_url,
        "--schema", schema, "--ca", str(ca.ca_cert_path), "--signing-cert", str(ca.paths("signing", "accesslog")[0]),
        "--state", str(state), *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    assert out, err.decode()
    return process.returncode, json.loads(out)


async def filled(live_log: LiveLog, count: int = 20) -> None:
    stub = live_log.stub()
    residents = codes(count, seed=11)
    for start in range(0, count, 5):
        await stub.Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in residents[start:start + 5]]))
    # A signed checkpoint over the whole log (as the periodic one would make).
    await live_log.stub("operator", "demo-operator").GetCheckpoint(accesslog_pb2.GetCheckpointRequest())


async def admin_execute(database: Any, *statements: str) -> None:
    conn = await database.admin()
    try:
        async with conn.transaction():
            for statement in statements:
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_intact_log_verifies(live_log: LiveLog, database: Any, ca: Any) -> None:
    await filled(live_log)
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0, report
    assert report["ok"] and report["records_checked"] == 20 and report["checkpoints_checked"] == 1


async def test_altered_row_is_named(live_log: LiveLog, database: Any, ca: Any) -> None:
    await filled(live_log)
    record = accesslog_pb2.ProvisionRecord(purpose="FORGED")
    await admin_execute(database, f"UPDATE \"{live_log.schema}\".records SET payload = '\\x{record.SerializeToString().hex()}'"
                                  " WHERE sequence = 7")
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 7, report


async def test_altered_row_with_recomputed_chain_is_caught_by_the_checkpoint(
    live_log: LiveLog, database: Any, ca: Any
) -> None:
    await filled(live_log)
    conn = await database.admin()
    try:
        rows = await conn.fetch(
            f'SELECT sequence, subject, (EXTRACT(EPOCH FROM provided_at) * 1000000)::bigint AS p,'
            f' (EXTRACT(EPOCH FROM recorded_at) * 1000000)::bigint AS r, outcome, payload, chain_hash'
            f' FROM "{live_log.schema}".records ORDER BY sequence'
        )
        previous = chain.GENESIS
        async with conn.transaction():
            for row in rows:
                outcome = 2 if row["sequence"] == 12 else row["outcome"]
                previous = chain.next_hash(previous, chain.canonical_bytes(
                    row["sequence"], row["p"], row["r"], outcome, bytes(row["subject"]), bytes(row["payload"])))
                await conn.execute(
                    f'UPDATE "{live_log.schema}".records SET outcome = $2, chain_hash = $3 WHERE sequence = $1',
                    row["sequence"], outcome, previous,
                )
    finally:
        await conn.close()
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 20 and "checkpoint" in report["problem"], report


async def test_deleted_row_is_named(live_log: LiveLog, database: Any, ca: Any) -> None:
    await filled(live_log)
    await admin_execute(database, f'DELETE FROM "{live_log.schema}".records WHERE sequence = 9')
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 9, report


async def test_deleted_tail_covered_by_a_checkpoint_is_named(live_log: LiveLog, database: Any, ca: Any) -> None:
    await filled(live_log)
    await admin_execute(database, f'DELETE FROM "{live_log.schema}".records WHERE sequence >= 18')
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 18, report


async def test_deleted_head_without_purge_anchor_is_named(live_log: LiveLog, database: Any, ca: Any) -> None:
    await filled(live_log)
    await admin_execute(database, f'DELETE FROM "{live_log.schema}".records WHERE sequence <= 3')
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 1, report


async def test_inserted_row_is_named(live_log: LiveLog, database: Any, ca: Any) -> None:
    await filled(live_log)
    table = f'"{live_log.schema}".records'
    forged = provision(codes(1, seed=99)[0]).SerializeToString().hex()
    await admin_execute(
        database,
        # make room after 5 and slip a forged record in as the new 6th, copying its neighbour's hash
        f"UPDATE {table} SET sequence = sequence + 1000 WHERE sequence >= 6",
        f"UPDATE {table} SET sequence = sequence - 999 WHERE sequence >= 1006",
        f"INSERT INTO {table} (sequence, subject, provided_at, recorded_at, outcome, payload, chain_hash)"
        f" SELECT 6, subject, provided_at, recorded_at, outcome, '\\x{forged}', chain_hash FROM {table} WHERE sequence = 7",
    )
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 6, report


async def test_reordered_rows_are_named(live_log: LiveLog, database: Any, ca: Any) -> None:
    await filled(live_log)
    table = f'"{live_log.schema}".records'
    await admin_execute(
        database,
        f"UPDATE {table} SET sequence = -1 WHERE sequence = 4",
        f"UPDATE {table} SET sequence = 4 WHERE sequence = 15",
        f"UPDATE {table} SET sequence = 15 WHERE sequence = -1",
    )
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 4, report


async def test_purge_keeps_the_rest_verifiable(live_log: LiveLog, database: Any, ca: Any) -> None:
    from tests.integration.accesslog.test_partitions import load_at, month_start

    # Records 1..20 recorded two months ago: retention drops whole monthly partitions.
    await load_at(database, live_log.schema, live_log.app.pseudonym_key, codes(20, seed=11), month_start(2))
    cutoff = month_start(1)
    stub = live_log.stub()
    await stub.Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(5, seed=3)]))  # 21..25
    signer = chain.Signer(ca.paths("signing", "accesslog")[1])
    verifier = chain.CheckpointVerifier(ca.paths("signing", "accesslog")[0], ca.ca_cert_path)
    conn = await database.admin()
    try:
        result = await purge(conn, live_log.schema, signer, verifier, older_than=cutoff)
    finally:
        await conn.close()
    assert (result.purged, result.anchor_sequence, result.problem) == (20, 20, "")
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0, report
    assert report["first_sequence"] == 21 and report["records_checked"] == 5
    # The service keeps appending on top of the purged log, and it still verifies.
    await stub.Append(accesslog_pb2.AppendRequest(records=[provision(codes(1, seed=4)[0])]))
    verified = await live_log.stub("operator", "demo-operator").VerifyLog(accesslog_pb2.VerifyLogRequest())
    assert verified.ok and verified.records_checked == 6
    # Deleting beyond the purge anchor is still caught.
    await admin_execute(database, f'DELETE FROM "{live_log.schema}".records WHERE sequence = 21')
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 21, report


async def test_an_ordinary_checkpoint_cannot_anchor_a_deleted_prefix(live_log: LiveLog, database: Any, ca: Any) -> None:
    await filled(live_log, 10)  # checkpoint at 10
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(codes(1, seed=5)[0])]))
    await admin_execute(database, f'DELETE FROM "{live_log.schema}".records WHERE sequence <= 10')
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 1, report


async def test_juki_audit_purge_command(live_log: LiveLog, database: Any, ca: Any) -> None:
    from tests.integration.accesslog.test_partitions import load_at, month_start

    await load_at(database, live_log.schema, live_log.app.pseudonym_key, codes(10, seed=11), month_start(1))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", "audit", "purge", "--older-than-days", "0", "--database-url", database.admin_url,
        "--schema", live_log.schema, "--ca", str(ca.ca_cert_path),
        "--signing-cert", str(ca.paths("signing", "accesslog")[0]),
        "--signing-key", str(ca.paths("signing", "accesslog")[1]),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert json.loads(out)["purged"] == 10
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0 and report["records_checked"] == 0, report
    reply = await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(codes(1, seed=12)[0])]))
    assert reply.first_sequence == 11  # sequences continue after the purged ones, chained from the anchor
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0 and report["first_sequence"] == 11 and report["records_checked"] == 1, report


async def test_audit_continues_from_the_last_verified_checkpoint(live_log: LiveLog, database: Any, ca: Any) -> None:
    auditor = live_log.stub("operator", "demo-operator")
    await filled(live_log)  # records 1..20, tree checkpoint of size 20
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0 and report["mode"] == "full" and report["records_hashed"] == 20, report
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(300, seed=5)]))
    await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())  # tree checkpoint of size 320
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0, report
    assert (report["mode"], report["resumed_from_tree_size"], report["records_hashed"]) == ("incremental", 20, 300)
    assert report["consistency_proof_checked"] and report["latest_tree_size"] == 320
    # An old record altered after it was verified: an incremental run does not re-read it; --full does.
    await admin_execute(database, f'UPDATE "{live_log.schema}".records SET outcome = 2 WHERE sequence = 5')
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0 and report["records_hashed"] == 0, report
    code, report = await audit(database, ca, live_log.schema, "--full")
    assert code == 1 and report["first_bad_sequence"] == 5, report


async def test_an_incremental_audit_reads_only_the_checkpoints_since_its_state(
    live_log: LiveLog, database: Any, ca: Any
) -> None:
    auditor = live_log.stub("operator", "demo-operator")
    await filled(live_log)  # records 1..20, one checkpoint of each kind at 20
    for seed in range(6):  # a log signs a checkpoint every few seconds: 6 more of each kind, 21..26
        await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(codes(1, seed=60 + seed)[0])]))
        await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    code, report = await audit(database, ca, live_log.schema, "--full")
    assert code == 0 and (report["checkpoints_checked"], report["tree_checkpoints_checked"]) == (7, 7), report
    await live_log.stub().Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in codes(2, seed=70)]))
    await auditor.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())  # 28
    code, report = await audit(database, ca, live_log.schema)
    # The one at its state (26) and the new one: not the 6 before, which the full run checked.
    assert code == 0 and report["mode"] == "incremental", report
    assert (report["checkpoints_checked"], report["tree_checkpoints_checked"]) == (2, 2), report
    # A signature damaged since, on a checkpoint before the state, is left to --full; one after it is not.
    await admin_execute(database, f'UPDATE "{live_log.schema}".checkpoints SET signature = \'\\x{"00" * 64}\''
                                  " WHERE sequence = 22")
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0 and report["checkpoints_checked"] == 1, report  # the state moved to 28
    code, report = await audit(database, ca, live_log.schema, "--full")
    assert code == 1 and report["first_bad_sequence"] == 22 and "signature" in report["problem"], report
    await admin_execute(database, f'UPDATE "{live_log.schema}".checkpoints SET signature = \'\\x{"00" * 64}\''
                                  " WHERE sequence = 28")
    code, report = await audit(database, ca, live_log.schema)
    assert code == 1 and report["first_bad_sequence"] == 28 and "signature" in report["problem"], report


async def test_an_altered_stored_tile_hash_is_named(live_log: LiveLog, database: Any, ca: Any) -> None:
    await filled(live_log)
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0, report
    # Leaf 7 (record 8) in the stored level-0 tile: the records are untouched, the tree is not. The
    # records came in batches of 5, so the tile is stored as fragments of 5; leaf 7 is third in the second.
    await admin_execute(
        database,
        f'UPDATE "{live_log.schema}".tiles SET hashes = overlay(hashes placing \'\\x{"ab" * 32}\'::bytea'
        f" from 2 * 32 + 1 for 32) WHERE level = 0 AND tile_index = 0 AND end_width = 10",
    )
    code, report = await audit(database, ca, live_log.schema)  # incremental: the old root no longer holds
    assert code == 1 and report["first_bad_sequence"] == 20 and "root verified before" in report["problem"], report
    code, report = await audit(database, ca, live_log.schema, "--full")
    assert code == 1 and report["first_bad_sequence"] == 8 and "tile hash of record 8" in report["problem"], report


async def test_an_altered_stored_middle_is_named_and_never_yields_a_proof_that_verifies(
    live_log: LiveLog, database: Any, ca: Any
) -> None:
    """The middle of a level-0 tile (its tree-level-4 nodes, which proofs served to readers use) is held
    to the records like the tiles: a full audit names the altered node, and a proof through it fails."""
    from juki.accesslog import merkle, notes

    await filled(live_log)
    operator = live_log.stub("operator", "demo-operator")
    signed = notes.parse_checkpoint(notes.split_note(
        (await operator.GetCheckpoint(accesslog_pb2.GetCheckpointRequest())).tree_checkpoint)[0])
    size, root = signed.tree_size, signed.root_hash
    assert size == 20
    # Before: a proof verifies (of leaf 3, whose path does not cross node 4/0: the serving process keeps
    # the right edge's nodes it computed, and tile 0 is the right edge here).
    before = await operator.GetInclusionProof(accesslog_pb2.GetInclusionProofRequest(leaf_index=3, tree_size=size))
    assert merkle.verify_inclusion(before.leaf_hash, 3, size, list(before.inclusion_proof), root)
    request = accesslog_pb2.GetInclusionProofRequest(leaf_index=17, tree_size=size)
    # Node 4/0 (the root of records 1..16) is the middle's first hash, and a sibling on record 18's path.
    await admin_execute(
        database,
        f'UPDATE "{live_log.schema}".tile_middles SET hashes = overlay(hashes placing \'\\x{"cd" * 32}\'::bytea'
        f" from 1 for 32) WHERE tile_index = 0 AND end_width = 1",
    )
    after = await operator.GetInclusionProof(request)
    assert not merkle.verify_inclusion(after.leaf_hash, 17, size, list(after.inclusion_proof), root)
    code, report = await audit(database, ca, live_log.schema, "--full")
    assert code == 1 and report["first_bad_sequence"] == 16, report
    assert "middle hash of tree node 4/0 (records up to 16)" in report["problem"], report


async def test_a_forked_tree_two_roots_for_one_size_is_detected(live_log: LiveLog, database: Any, ca: Any) -> None:
    from juki.accesslog import notes

    await filled(live_log)  # tree checkpoint of size 20
    code, report = await audit(database, ca, live_log.schema)
    assert code == 0, report
    # The log (its key) signs a second, different root for size 20: a split view shown to someone else.
    signer = chain.Signer(ca.paths("signing", "accesslog")[1]).note_signer("juki.local/accesslog")
    forked = signer.sign(notes.Checkpoint("juki.local/accesslog", 20, bytes(32)).body())
    conn = await database.admin()
    try:
        await conn.execute(
            f'INSERT INTO "{live_log.schema}".tree_checkpoints (tree_size, root_hash, signed_at_ns, note)'
            " VALUES (20, $1, 1, $2)", bytes(32), forked)
    finally:
        await conn.close()
    for extra in ((), ("--full",)):
        code, report = await audit(database, ca, live_log.schema, *extra)
        assert code == 1 and report["first_bad_sequence"] == 20 and "forked" in report["problem"], report
