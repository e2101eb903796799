"""Tile fragments written commit by commit hold the same tree as the leaves, at every level."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from juki.accesslog import merkle, tiles


def test_fragments_of_uneven_commits_rebuild_every_root_and_proof() -> None:
    rng = random.Random(5)
    frontier = merkle.Frontier()
    stored: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
    leaves: list[bytes] = []
    roots = {0: merkle.EMPTY_ROOT}
    while frontier.size < 70_000:  # past one level-2 tile entry (65,536 leaves)
        fragments = tiles.Fragments()
        for _ in range(rng.choice((1, 3, 255, 256, 700, 5000))):
            leaves.append(merkle.leaf_hash(len(leaves).to_bytes(8, "big")))
            frontier.append(leaves[-1], fragments)
        roots[frontier.size] = frontier.root()
        for level, tile_index, end_width, hashes in fragments.rows():
            stored.setdefault((level, tile_index), []).append((end_width, hashes))
    assert (2, 0) in stored
    assembled = {key: tiles.assemble(key[0], key[1], sorted(parts)) for key, parts in stored.items()}
    node = tiles.oracle(assembled)
    for size, expected in roots.items():
        assert merkle.root(size, node) == expected
        assert merkle.Frontier.load(size, node).root() == expected
    size = frontier.size
    for index in (0, 255, 256, 65_535, 65_536, size - 1):
        proof = merkle.inclusion_proof(index, size, node)
        assert merkle.verify_inclusion(leaves[index], index, size, proof, roots[size])
    first = next(s for s in roots if s > 66_000)
    proof = merkle.consistency_proof(first, size, node)
    assert merkle.verify_consistency(first, size, roots[first], roots[size], proof)


def test_a_gap_or_an_overlap_in_fragments_is_a_tile_error() -> None:
    h = bytes(32)
    assert len(tiles.assemble(0, 0, [(2, h * 2), (3, h)])) == 3
    with pytest.raises(tiles.TileError):
        tiles.assemble(0, 0, [(2, h * 2), (4, h)])
    with pytest.raises(tiles.TileError):
        tiles.assemble(0, 0, [(2, h * 2), (3, h * 2)])
    with pytest.raises(tiles.TileError):
        tiles.oracle({(0, 0): [h]})(1, 0)
    assert tiles.concatenated(0, 0, [(2, h * 2), (3, h)]) == h * 3
    for broken in ([(2, h * 2), (4, h)], [(2, h * 2), (3, h * 2)]):
        with pytest.raises(tiles.TileError):
            tiles.concatenated(0, 0, broken)
    with pytest.raises(tiles.TileError):
        tiles.oracle({(0, 0): h})(1, 0)


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 MTH over already hashed leaves, by its recursive definition."""
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return merkle.node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 1500), chunks=st.lists(st.integers(1, 600), max_size=6))
def test_extending_by_runs_builds_the_tree_and_fragments_of_appending_one_by_one(start: int, chunks: list[int]) -> None:
    """The writer appends a group's leaves a level at a time (Frontier.extend, Fragments.run); the tree,
    its frontier and the tile fragments must be exactly those of appending leaf by leaf."""
    leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(start + sum(chunks))]
    one_by_one, by_runs = merkle.Frontier(), merkle.Frontier()
    for leaf in leaves[:start]:
        one_by_one.append(leaf)
        by_runs.append(leaf)
    expected, got = tiles.Fragments(), tiles.Fragments()
    for leaf in leaves[start:]:
        one_by_one.append(leaf, expected)
    position = start
    for size in chunks:
        by_runs.extend(leaves[position:position + size], got.run)
        position += size
    assert (by_runs.size, by_runs.hashes) == (one_by_one.size, one_by_one.hashes)
    assert by_runs.root() == _mth(leaves)
    assert got.rows() == expected.rows()


def test_a_pyramid_holds_every_perfect_subtree_of_its_tile() -> None:
    leaves = [hashlib.sha256(i.to_bytes(2, "big")).digest() for i in range(tiles.WIDTH)]
    levels = tiles.pyramid(leaves)
    assert [len(level) // 32 for level in levels] == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    for j, level in enumerate(levels):
        width = 1 << j
        for k in {0, min(1, len(level) // 32 - 1), len(level) // 32 - 1}:
            assert level[32 * k:32 * (k + 1)] == _mth(leaves[k * width:(k + 1) * width])


def test_proofs_from_cached_upper_tiles_are_those_from_the_stored_tiles() -> None:
    """A serving process keeps the pyramids of complete upper tiles across calls; each answer must be
    the one computed from the stored tiles alone, and level-0 tiles must not crowd the cache."""
    frontier, fragments = merkle.Frontier(), tiles.Fragments()
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(200_000)]  # 3 level-1 tiles, one partial
    frontier.extend(leaves, fragments.run)
    stored = {(level, index): tiles.assemble(level, index, [(end, data)])
              for level, index, end, data in fragments.rows()}
    cache = tiles.TileCache(capacity=2)
    rng = random.Random(3)
    size = frontier.size
    for _ in range(40):
        index = rng.randrange(size)
        plain = merkle.inclusion_proof(index, size, tiles.oracle(stored))
        known = {key: found for key in stored if key[0] >= 1 and (found := cache.get(key)) is not None}
        cached = merkle.inclusion_proof(index, size, tiles.oracle(  # tiles as read for proofs: one byte string
            {key: b"".join(value) for key, value in stored.items() if key not in known}, known, cache))
        assert cached == plain and merkle.verify_inclusion(leaves[index], index, size, cached, frontier.root())
    assert cache.hits > 0 and cache.nodes  # the partial level-1 tile's nodes are remembered too
    assert all(key[0] >= 1 for key in cache._pyramids) and len(cache._pyramids) <= 2
    assert all(level > 0 for level, _ in cache.nodes)  # interior nodes of the right edge's partial tiles


def _stored(
    tile_rows: list[tiles.TileRow], middle_rows: list[tiles.MiddleRow]
) -> tuple[dict[tuple[int, int], bytes], dict[int, bytes]]:
    """Tiles and middles as a proof reads them (each one byte string, from its fragments)."""
    stored: dict[tuple[int, int], list[tuple[int, bytes]]] = {}
    for level, index, end, data in tile_rows:
        stored.setdefault((level, index), []).append((end, data))
    middles: dict[int, list[tuple[int, bytes]]] = {}
    for index, end, data in middle_rows:
        middles.setdefault(index, []).append((end, data))
    return ({key: tiles.concatenated(key[0], key[1], sorted(parts)) for key, parts in stored.items()},
            {key: tiles.whole_prefix(sorted(parts)) for key, parts in middles.items()})


def test_middles_hold_tree_level_4_and_spare_the_hashing_of_level_0_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each level-0 tile's middle is its 16 nodes of tree level 4, written commit by commit like the tiles;
    proofs computed with the middles are the proofs computed from the tiles alone, with a tenth of the
    hashing, at every size (partial tiles and partial middles at the right edge included)."""
    rng = random.Random(11)
    frontier = merkle.Frontier()
    leaves: list[bytes] = []
    merged_rows: list[tiles.MiddleRow] = []
    tile_rows: list[tiles.TileRow] = []
    while frontier.size < 3000:
        fragments = tiles.Fragments()
        count = rng.choice((1, 5, 17, 300))
        batch = [merkle.leaf_hash(n.to_bytes(4, "big")) for n in range(len(leaves), len(leaves) + count)]
        leaves += batch
        if rng.random() < 0.5:
            frontier.extend(batch, fragments.run)
        else:
            for leaf in batch:
                frontier.append(leaf, fragments)
        merged_rows += fragments.middle_rows()
        tile_rows += fragments.rows()
    size = frontier.size
    # every middle row is a run of tree-level-4 nodes at its place
    for tile_index, end_width, data in merged_rows:
        start = end_width - len(data) // 32
        for k in range(start, end_width):
            node = tile_index * 16 + k
            assert data[(k - start) * 32:(k - start + 1) * 32] == _mth(leaves[node * 16:(node + 1) * 16])
    assert {index for index, _, _ in merged_rows} == set(range(size // 256 + (size % 256 >= 16)))
    plain_tiles, middles = _stored(tile_rows, merged_rows)

    hashed = [0]
    real = merkle.node_hash

    def counting(left: bytes, right: bytes) -> bytes:
        hashed[0] += 1
        return real(left, right)

    real_pyramid = tiles.pyramid

    def counting_pyramid(hashes: bytes) -> tiles.Pyramid:
        hashed[0] += tiles.WIDTH - 1
        return real_pyramid(hashes)

    monkeypatch.setattr(merkle, "node_hash", counting)
    monkeypatch.setattr(tiles, "pyramid", counting_pyramid)
    for tree_size in (size, 2000, 256 * 7 + 40, 257, 17):
        for index in sorted({0, 15, 16, 255, tree_size // 2, tree_size - 1}):
            if index >= tree_size:
                continue
            hashed[0] = 0
            plain = merkle.inclusion_proof(index, tree_size, tiles.oracle(plain_tiles))
            without = hashed[0]
            hashed[0] = 0
            with_middles = merkle.inclusion_proof(index, tree_size, tiles.oracle(plain_tiles, middles=middles))
            spared = hashed[0]
            assert with_middles == plain
            assert merkle.verify_inclusion(leaves[index], index, tree_size, with_middles,
                                           _mth(leaves[:tree_size]))
            if index < (tree_size // 256) * 256 - 256:  # a leaf of a complete tile, not the last one
                assert spared * 5 <= without, (tree_size, index, spared, without)
    for first, second in ((1, size), (300, 2000), (2000, size), (4096 - 1, size)):
        if second > size or first > second:
            continue
        assert merkle.consistency_proof(first, second, tiles.oracle(plain_tiles, middles=middles)) == \
            merkle.consistency_proof(first, second, tiles.oracle(plain_tiles))


def test_a_damaged_middle_is_used_only_as_far_as_it_is_whole() -> None:
    h, g = bytes(32), b"\x01" * 32
    assert tiles.whole_prefix([(2, h * 2), (3, g)]) == h * 2 + g
    assert tiles.whole_prefix([(2, h * 2), (4, g)]) == h * 2  # a gap: what follows is not used
    assert tiles.whole_prefix([(1, h), (1, g)]) == h  # an overlap likewise
    leaves = [merkle.leaf_hash(n.to_bytes(2, "big")) for n in range(256)]
    fragments = tiles.Fragments()
    merkle.Frontier().extend(leaves, fragments.run)
    stored, middles = _stored(fragments.rows(), fragments.middle_rows())
    cut = {0: middles[0][:5 * 32]}  # only the first 5 level-4 nodes: the rest come from the tile
    for index in (0, 100, 255):
        assert merkle.inclusion_proof(index, 256, tiles.oracle(stored, middles=cut)) == \
            merkle.inclusion_proof(index, 256, tiles.oracle(stored))


def test_a_tile_stored_whole_replaces_its_fragments_and_must_repeat_them() -> None:
    a, b, c = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
    # Fragments of two commits, then the commit completing the tile stored it whole.
    assert tiles.concatenated(1, 3, [(1, a), (2, b), (3, a + b + c)]) == a + b + c
    assert tiles.assemble(1, 3, [(1, a), (2, b), (3, a + b + c)]) == [a, b, c]
    with pytest.raises(tiles.TileError) as raised:
        tiles.concatenated(1, 3, [(1, a), (2, b), (3, a + a + c)])  # the whole tile differs from a fragment
    assert "differs" in str(raised.value) and raised.value.first_sequence == 3 * 65_536 + 1
    assert tiles.whole_prefix([(1, a), (2, b), (3, a + b + c)]) == a + b + c
    assert tiles.whole_prefix([(1, a), (2, b), (3, c + b + c)]) == a + b  # a middle: used as far as it holds


def test_cut_fragments_are_those_of_separate_group_commits() -> None:
    leaves = [merkle.leaf_hash(n.to_bytes(2, "big")) for n in range(600)]
    frontier, cut = merkle.Frontier(), tiles.Fragments()
    one_by_one: list[tiles.TileRow] = []
    middles_one_by_one: list[tiles.MiddleRow] = []
    for at in range(0, 600, 3):
        frontier.extend(leaves[at:at + 3], cut.run)
        cut.cut()
        alone = tiles.Fragments()
        merkle.Frontier.load(at, lambda level, index: _mth(leaves[index << level:(index + 1) << level])).extend(
            leaves[at:at + 3], alone.run)
        one_by_one += alone.rows()
        middles_one_by_one += alone.middle_rows()
    assert cut.rows() == one_by_one and cut.middle_rows() == middles_one_by_one
    assert sum(1 for row in cut.rows() if row[:2] == (0, 0)) == 86  # 256 leaves in groups of 3
    stored, middles = _stored(cut.rows(), cut.middle_rows())
    assert stored[(0, 0)] == b"".join(leaves[:256]) and len(middles[0]) == 16 * 32
