"""The Merkle tree's hashes in PostgreSQL as tlog-tiles (height 8): writing fragments, reading nodes.

Tile (L, I) holds the hashes of tree level 8L, nodes 256*I .. 256*I + 255 (fewer in a partial tile). A
node of level 8L + j (0 <= j < 8) is the root of 2**j consecutive hashes of one tile of level L, so any
node is one tile away. Rows are fragments (see migration 0002): a tile is the concatenation of its
fragments in ``end_width`` order.

Every read goes through :func:`compute`: the node ids a computation needs are listed first
(juki.accesslog.merkle.nodes_needed), their tiles fetched in one query, then the computation runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import asyncpg

from juki.accesslog import merkle

HEIGHT = 8
WIDTH = 1 << HEIGHT
T = TypeVar("T")

# (level, tile_index, end_width, hashes) as stored
TileRow = tuple[int, int, int, bytes]


class TileError(Exception):
    """The stored tiles do not hold a hash they must hold (a gap or an overlap): damaged storage."""


def _table(schema: str | None) -> str:
    return f'"{schema}".tiles' if schema else "tiles"


class Fragments:
    """Collects the nodes a group commit completes and turns those of tile levels into fragment rows."""

    def __init__(self) -> None:
        self._by_tile: dict[tuple[int, int], tuple[int, list[bytes]]] = {}

    def __call__(self, level: int, index: int, value: bytes) -> None:
        """``merkle.Frontier.append``'s ``completed`` callback."""
        if level % HEIGHT:
            return
        key = (level // HEIGHT, index >> HEIGHT)
        found = self._by_tile.get(key)
        if found is None:
            self._by_tile[key] = (index & (WIDTH - 1), [value])
        else:
            found[1].append(value)  # nodes of one level complete in index order

    def run(self, level: int, index: int, values: Sequence[bytes]) -> None:
        """``merkle.Frontier.extend``'s ``completed`` callback: a run of one level's nodes from ``index``."""
        if level % HEIGHT or not values:
            return
        tile_level, count, done = level // HEIGHT, len(values), 0
        while done < count:
            tile, offset = index >> HEIGHT, index & (WIDTH - 1)
            take = min(count - done, WIDTH - offset)
            found = self._by_tile.get((tile_level, tile))
            if found is None:
                self._by_tile[(tile_level, tile)] = (offset, list(values[done:done + take]))
            else:
                found[1].extend(values[done:done + take])
            done += take
            index += take

    def rows(self) -> list[TileRow]:
        return [(level, tile, start + len(hashes), b"".join(hashes))
                for (level, tile), (start, hashes) in sorted(self._by_tile.items())]


async def tree_size(conn: asyncpg.Connection, schema: str | None = None) -> int:
    """Leaves in the stored tree: the end of the last level-0 tile."""
    row = await conn.fetchrow(
        f"SELECT tile_index, end_width FROM {_table(schema)} WHERE level = 0"
        " ORDER BY tile_index DESC, end_width DESC LIMIT 1"
    )
    return 0 if row is None else int(row["tile_index"]) * WIDTH + int(row["end_width"])


def _tile_span(level: int, index: int) -> tuple[int, int, int, int]:
    """(tile level, tile index, first position, count) of the stored hashes a node is computed from."""
    tile_level, j = divmod(level, HEIGHT)
    first = index << j
    return tile_level, first >> HEIGHT, first & (WIDTH - 1), 1 << j


def assemble(level: int, tile_index: int, fragments: Iterable[tuple[int, bytes]]) -> list[bytes]:
    """The hashes of one tile from its fragments ((end_width, hashes), by end_width)."""
    hashes: list[bytes] = []
    for end_width, data in fragments:
        count = len(data) // merkle.HASH_SIZE
        start = end_width - count
        if start != len(hashes):
            raise TileError(f"tile {level}/{tile_index}: a fragment ending at {end_width} starts at {start},"
                            f" after {len(hashes)} hashes")
        hashes += [data[i:i + merkle.HASH_SIZE] for i in range(0, len(data), merkle.HASH_SIZE)]
    return hashes


async def read_tiles(
    conn: asyncpg.Connection, wanted: Iterable[tuple[int, int]], schema: str | None = None
) -> dict[tuple[int, int], list[bytes]]:
    keys = sorted(set(wanted))
    if not keys:
        return {}
    rows = await conn.fetch(
        f"SELECT t.level, t.tile_index, t.end_width, t.hashes FROM {_table(schema)} t"
        " JOIN unnest($1::smallint[], $2::bigint[]) AS w(level, tile_index)"
        " ON t.level = w.level AND t.tile_index = w.tile_index ORDER BY t.level, t.tile_index, t.end_width",
        [k[0] for k in keys], [k[1] for k in keys],
    )
    grouped: dict[tuple[int, int], list[tuple[int, bytes]]] = {key: [] for key in keys}
    for row in rows:
        grouped[(int(row["level"]), int(row["tile_index"]))].append((int(row["end_width"]), bytes(row["hashes"])))
    return {key: assemble(key[0], key[1], fragments) for key, fragments in grouped.items()}


def oracle(tiles: dict[tuple[int, int], list[bytes]]) -> merkle.NodeOracle:
    """Node hashes computed from fetched tiles (each node from one tile)."""

    def node(level: int, index: int) -> bytes:
        tile_level, tile_index, first, count = _tile_span(level, index)
        hashes = tiles.get((tile_level, tile_index), [])[first:first + count]
        if len(hashes) != count:
            raise TileError(f"tile {tile_level}/{tile_index} lacks the hashes of node {level}/{index}")
        while len(hashes) > 1:
            hashes = [merkle.node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
        return hashes[0]

    return node


async def compute(
    conn: asyncpg.Connection, computation: Callable[[merkle.NodeOracle], T], schema: str | None = None
) -> T:
    """Run a tree computation (a root, a proof, a frontier) on the stored tiles, reading them in one query."""
    needed = merkle.nodes_needed(computation)
    tiles = await read_tiles(conn, (_tile_span(level, index)[:2] for level, index in needed), schema)
    return computation(oracle(tiles))


async def load_frontier(conn: asyncpg.Connection, size: int, schema: str | None = None) -> merkle.Frontier:
    return await compute(conn, lambda node: merkle.Frontier.load(size, node), schema)


async def root_at(conn: asyncpg.Connection, size: int, schema: str | None = None) -> bytes:
    return await compute(conn, lambda node: merkle.root(size, node), schema)
