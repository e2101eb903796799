"""Tiles completed by small group commits are stored whole by the commit that completes them, so that a
proof reads one row per complete tile instead of its 64 to 128 fragments; audits hold the whole tile to
its fragments and to the records."""

from __future__ import annotations

from typing import Any

import pytest
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki.accesslog import merkle, notes, tiles

from tests.integration.accesslog.conftest import LiveLog, codes, provision
from tests.integration.accesslog.test_tamper import admin_execute, audit

pytestmark = pytest.mark.timeout(120)

RECORDS, GROUP = 600, 3  # tiles 0 and 1 complete, tile 2 partial (88 leaves)


async def written_in_small_groups(live_log: LiveLog) -> tuple[int, bytes]:
    """600 records, 3 per Append (one group commit each, as a lightly loaded lookup writes them); the
    signed tree size and root over them."""
    stub = live_log.stub()
    residents = codes(RECORDS, seed=23)
    for start in range(0, RECORDS, GROUP):
        await stub.Append(accesslog_pb2.AppendRequest(records=[provision(c) for c in residents[start:start + GROUP]]))
    response = await live_log.stub("operator", "demo-operator").GetCheckpoint(accesslog_pb2.GetCheckpointRequest())
    signed = notes.parse_checkpoint(notes.split_note(response.tree_checkpoint)[0])
    assert signed.tree_size == RECORDS
    return signed.tree_size, signed.root_hash


async def overwrite_hash(database: Any, table: str, position: int, where: str, byte: str) -> None:
    """Overwrite the stored hash at ``position`` of the rows of ``table`` (schema-qualified) ``where``."""
    await admin_execute(
        database,
        f"UPDATE {table} SET hashes = overlay(hashes placing '\\x{byte * 32}'::bytea"
        f" from {position} * 32 + 1 for 32) WHERE {where}",
    )


async def test_a_complete_tile_is_one_row_to_read_and_proofs_through_it_verify(
    live_log: LiveLog, database: Any, ca: Any
) -> None:
    size, root = await written_in_small_groups(live_log)
    conn = await database.admin()
    try:
        stored = await conn.fetch(
            f'SELECT tile_index, end_width, length(hashes) AS bytes FROM "{live_log.schema}".tiles'
            " WHERE level = 0 ORDER BY tile_index, end_width")
        middles = await conn.fetch(
            f'SELECT tile_index, end_width, length(hashes) AS bytes FROM "{live_log.schema}".tile_middles'
            " ORDER BY tile_index, end_width")
        latest, latest_middles = await tiles._fragments(
            conn, [(0, 0), (0, 1), (0, 2)], live_log.schema, [0, 1, 2], latest=True)
        everything, _ = await tiles._fragments(conn, [(0, 0), (0, 1), (0, 2)], live_log.schema)
    finally:
        await conn.close()
    by_tile: dict[int, list[tuple[int, int]]] = {}
    for row in stored:
        by_tile.setdefault(row["tile_index"], []).append((row["end_width"], row["bytes"]))
    # The commit that completed each tile wrote it whole; the fragments before it stay (INSERT only).
    for tile in (0, 1):
        assert len(by_tile[tile]) > 80, by_tile[tile]  # one fragment per group of 3
        assert by_tile[tile][-1] == (256, 256 * 32)
        assert sum(1 for end, length in by_tile[tile] if length == end * 32) <= 2  # the first, and the whole
    assert by_tile[2][-1][0] == RECORDS - 512 and by_tile[2][-1][1] < by_tile[2][-1][0] * 32
    for tile in (0, 1):
        assert [(m["end_width"], m["bytes"]) for m in middles if m["tile_index"] == tile][-1] == (16, 16 * 32)
    # What a proof reads: the whole row of a complete tile (and middle), every fragment of the partial one.
    assert [len(latest[(0, tile)]) for tile in (0, 1)] == [1, 1]
    assert len(latest[(0, 2)]) == len(everything[(0, 2)]) == len(by_tile[2])
    assert [len(latest_middles[tile]) for tile in (0, 1)] == [1, 1]
    assert tiles.concatenated(0, 0, latest[(0, 0)]) == tiles.concatenated(0, 0, everything[(0, 0)])
    operator = live_log.stub("operator", "demo-operator")
    for index in (0, 100, 255, 256, 511, 512, size - 1):
        proof = await operator.GetInclusionProof(accesslog_pb2.GetInclusionProofRequest(leaf_index=index, tree_size=size))
        assert merkle.verify_inclusion(proof.leaf_hash, index, size, list(proof.inclusion_proof), root), index
    code, report = await audit(database, ca, live_log.schema, "--full")
    assert code == 0 and report["records_checked"] == RECORDS, report


@pytest.mark.parametrize("damaged", ["an earlier fragment", "the whole tile"])
async def test_a_whole_tile_that_differs_from_its_fragments_is_named(
    live_log: LiveLog, database: Any, ca: Any, damaged: str
) -> None:
    size, root = await written_in_small_groups(live_log)
    # tile 1 starts in the group of leaves 255..257: its first fragment ends at 2
    where = "end_width = 2" if damaged == "an earlier fragment" else "end_width = 256"
    await overwrite_hash(database, f'"{live_log.schema}".tiles', 0, f"level = 0 AND tile_index = 1 AND {where}", "ab")
    code, report = await audit(database, ca, live_log.schema, "--full")
    assert code == 1 and report["first_bad_sequence"] == 257, report
    assert "tile 0/1" in report["problem"] and "differs" in report["problem"], report
    if damaged == "the whole tile":  # what readers use: a proof through it no longer verifies
        proof = await live_log.stub("operator", "demo-operator").GetInclusionProof(
            accesslog_pb2.GetInclusionProofRequest(leaf_index=257, tree_size=size))
        assert not merkle.verify_inclusion(proof.leaf_hash, 257, size, list(proof.inclusion_proof), root)


async def test_an_altered_whole_middle_is_named(live_log: LiveLog, database: Any, ca: Any) -> None:
    await written_in_small_groups(live_log)
    await overwrite_hash(database, f'"{live_log.schema}".tile_middles', 5, "tile_index = 0 AND end_width = 16", "cd")
    code, report = await audit(database, ca, live_log.schema, "--full")
    assert code == 1 and report["first_bad_sequence"] == 96, report
    assert "middle hash of tree node 4/5 (records up to 96)" in report["problem"], report


async def test_the_right_edge_is_read_once_for_every_proof_into_one_tree_size(
    live_log: LiveLog, database: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial tile is as many rows as commits extended it, and every proof into one tree size crosses
    the same right edge: once its nodes are in the serving process's cache, later proofs read only the
    tiles of their own leaves."""
    size, root = await written_in_small_groups(live_log)
    read: list[set[tuple[int, int]]] = []
    real = tiles._fragments

    async def recording(conn: Any, wanted: Any, *args: Any, **kwargs: Any) -> Any:
        read.append(set(wanted))
        return await real(conn, wanted, *args, **kwargs)

    monkeypatch.setattr(tiles, "_fragments", recording)
    cache = tiles.TileCache()
    conn = await database.admin()
    try:
        await conn.execute(f'SET search_path TO "{live_log.schema}", public')
        for index in (10, 200, 300, 400, 520):
            proof = await tiles.compute(conn, lambda node, i=index: merkle.inclusion_proof(i, size, node),
                                        cache=cache, middles=True)
            leaf = await tiles.compute(conn, lambda node, i=index: node(0, i))
            assert merkle.verify_inclusion(leaf, index, size, proof, root), index
    finally:
        await conn.close()
    proofs = read[0::2]  # (the leaf reads in between)
    assert {(0, 0), (0, 2), (1, 0)} <= proofs[0], proofs  # the first proof read the partial tiles
    # A proof that needs no right-edge node it has not met reads only its leaf's tile (and the one
    # needing node 8/0, a hash of the partial level-1 tile, reads that once).
    assert proofs[1] == {(0, 0)} and (0, 1) in proofs[2] and proofs[3] == {(0, 1)}, proofs
    assert (0, 2) in proofs[4], proofs  # a leaf in the partial tile itself needs it
