"""The Merkle tree's hashes in PostgreSQL as tlog-tiles (height 8): writing fragments, reading nodes.

Tile (L, I) holds the hashes of tree level 8L, nodes 256*I .. 256*I + 255 (fewer in a partial tile). A
node of level 8L + j (0 <= j < 8) is the root of 2**j consecutive hashes of one tile of level L, so any
node is one tile away. Rows are fragments (see migration 0002): a tile is the concatenation of its
fragments in ``end_width`` order.

Group commits of a few records leave many fragments per tile (64 to 128 for a level-0 tile at 2 to 4
records per commit), so the commit that completes a tile writes its last fragment as the tile whole
(:func:`whole_when_complete`), and a computation reads that one row of each complete tile; audits read
every fragment and hold the whole tile to them.

Every read goes through :func:`compute`: the node ids a computation needs are listed first
(juki.accesslog.merkle.nodes_needed), their tiles fetched in one query, then the computation runs.

A node inside a tile (tree level 8L + j, j > 0) is the root of 2**j of its hashes, so a proof crossing a
tile needs up to 255 hashes computed from it. A complete tile never changes, so its interior nodes are
computed once, all together (its *pyramid*), and shared by every proof of the computation; a
:class:`TileCache` keeps the pyramids of upper tiles (tile level 1 and above, one per 65,536 leaves, which
every proof crosses) across calls of one serving process.

Level-0 tiles are read at random (one per provision shown), so neither is cached: instead the writer
stores each one's *middle*, the 16 hashes of tree level 4 under it (migration 0006), and a proof served
to a reader computes a level-0 tile's nodes from the leaf's 16 hashes and the middle: 22 hashes instead
of the 247 of a pyramid. Audits and the writer never read middles; audits recompute and compare them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import asyncpg

from juki.accesslog import merkle

HEIGHT = 8
WIDTH = 1 << HEIGHT
MIDDLE = 4  # the tree level whose nodes are stored as each level-0 tile's middle
MIDDLE_WIDTH = WIDTH >> MIDDLE  # 16 per level-0 tile
T = TypeVar("T")

# (level, tile_index, end_width, hashes) as stored
TileRow = tuple[int, int, int, bytes]
# (tile_index, end_width, hashes) of a level-0 tile's middle, as stored
MiddleRow = tuple[int, int, bytes]
# The interior of a complete tile: for j = 0..8, the 256 >> j node hashes of its level j, concatenated.
Pyramid = tuple[bytes, ...]


class TileError(Exception):
    """The stored tiles do not hold a hash they must hold (a gap or an overlap), or a tile stored whole
    differs from its fragments: damaged storage, in tile (``level``, ``tile_index``)."""

    def __init__(self, level: int, tile_index: int, problem: str) -> None:
        super().__init__(f"tile {level}/{tile_index}: {problem}")
        self.level, self.tile_index = level, tile_index

    @property
    def first_sequence(self) -> int:
        """The first record under the tile (a middle's, level -1, is that of its level-0 tile)."""
        return (self.tile_index << (HEIGHT * (max(self.level, 0) + 1))) + 1


def _table(schema: str | None, name: str = "tiles") -> str:
    return f'"{schema}".{name}' if schema else name


def _collect(into: dict[T, tuple[int, list[bytes]]], key: T, offset: int, values: Sequence[bytes]) -> None:
    """Add a run of hashes at ``offset`` of the tile ``key`` (runs of one tile arrive in index order)."""
    found = into.get(key)
    if found is None:
        into[key] = (offset, list(values))
    else:
        found[1].extend(values)


def _collect_run(
    into: dict[T, tuple[int, list[bytes]]], shift: int, key: Callable[[int], T], index: int, values: Sequence[bytes]
) -> None:
    """Add a run of one level's nodes from ``index`` to tiles of ``2**shift`` hashes, split where a tile ends."""
    width, count, done = 1 << shift, len(values), 0
    while done < count:
        tile, offset = index >> shift, index & (width - 1)
        take = min(count - done, width - offset)
        _collect(into, key(tile), offset, values[done:done + take])
        done += take
        index += take


class Fragments:
    """Collects the nodes a group commit completes and turns those of tile levels into fragment rows, and
    those of tree level 4 into level-0 tiles' middles."""

    def __init__(self) -> None:
        self._by_tile: dict[tuple[int, int], tuple[int, list[bytes]]] = {}
        self._middles: dict[int, tuple[int, list[bytes]]] = {}
        self._cut: tuple[list[TileRow], list[MiddleRow]] = ([], [])

    def __call__(self, level: int, index: int, value: bytes) -> None:
        """``merkle.Frontier.append``'s ``completed`` callback."""
        if level == MIDDLE:
            _collect(self._middles, index >> MIDDLE, index & (MIDDLE_WIDTH - 1), (value,))
        elif level % HEIGHT == 0:
            _collect(self._by_tile, (level // HEIGHT, index >> HEIGHT), index & (WIDTH - 1), (value,))

    def run(self, level: int, index: int, values: Sequence[bytes]) -> None:
        """``merkle.Frontier.extend``'s ``completed`` callback: a run of one level's nodes from ``index``."""
        if level == MIDDLE:
            _collect_run(self._middles, MIDDLE, lambda tile: tile, index, values)
        elif level % HEIGHT == 0:
            _collect_run(self._by_tile, HEIGHT, lambda tile: (level // HEIGHT, tile), index, values)

    def cut(self) -> None:
        """End a group commit: the hashes collected so far make their fragments, later ones start new ones
        (a bulk path writing many commits' rows at once, as the writer would have stored them)."""
        self._cut[0].extend(self._rows())
        self._cut[1].extend(self._middle_rows())
        self._by_tile.clear()
        self._middles.clear()

    def _rows(self) -> list[TileRow]:
        return [(level, tile, start + len(hashes), b"".join(hashes))
                for (level, tile), (start, hashes) in sorted(self._by_tile.items())]

    def _middle_rows(self) -> list[MiddleRow]:
        return [(tile, start + len(hashes), b"".join(hashes)) for tile, (start, hashes) in sorted(self._middles.items())]

    def rows(self) -> list[TileRow]:
        return [*self._cut[0], *self._rows()]

    def middle_rows(self) -> list[MiddleRow]:
        return [*self._cut[1], *self._middle_rows()]


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
    data = concatenated(level, tile_index, fragments)
    return [data[i:i + merkle.HASH_SIZE] for i in range(0, len(data), merkle.HASH_SIZE)]


def concatenated(level: int, tile_index: int, fragments: Iterable[tuple[int, bytes]]) -> bytes:
    """The hashes of one tile from its fragments, as one byte string (what proofs read: no split). A
    fragment from the tile's start after others is the tile whole (see :func:`whole_when_complete`): it
    must repeat them, and replaces them."""
    parts: list[bytes] = []
    count = 0
    for end_width, data in fragments:
        start = end_width - len(data) // merkle.HASH_SIZE
        if start == 0 and count:
            if not data.startswith(b"".join(parts)):
                raise TileError(level, tile_index, f"the whole tile through {end_width} differs from its first"
                                f" {count} hashes as stored in fragments")
            parts = []
        elif start != count:
            raise TileError(level, tile_index, f"a fragment ending at {end_width} starts at {start}, after {count}"
                            " hashes")
        parts.append(data)
        count = end_width
    return b"".join(parts)


def whole_prefix(fragments: Iterable[tuple[int, bytes]]) -> bytes:
    """A middle from its fragments (by end_width), as far as they run without a gap or overlap: a middle
    only spares hashing, so a damaged one is used as far as it is whole (an audit names the damage)."""
    parts: list[bytes] = []
    count = 0
    for end_width, data in fragments:
        start = end_width - len(data) // merkle.HASH_SIZE
        if start == 0 and count and data.startswith(b"".join(parts)):
            parts = []  # the middle whole, as written by the commit that completed it
        elif start != count:
            break
        parts.append(data)
        count = end_width
    return b"".join(parts)


def _latest(table: str, match: str, width: int) -> str:
    """SQL (a LATERAL body): the fragments of one tile (rows of ``table`` where ``match``), or only its row
    stored whole when there is one: that row is found by the primary key, and the scan of the fragments
    is gated off (a one-time filter) when it exists."""
    whole = f"end_width = {width} AND octet_length(hashes) = {width * merkle.HASH_SIZE}"
    return (f"SELECT end_width, hashes FROM {table} WHERE {match} AND {whole}"
            f" UNION ALL SELECT end_width, hashes FROM {table} WHERE {match}"
            f" AND NOT EXISTS (SELECT 1 FROM {table} WHERE {match} AND {whole})")


async def _fragments(
    conn: asyncpg.Connection, wanted: Iterable[tuple[int, int]], schema: str | None,
    middles: Iterable[int] = (), *, latest: bool = False,
) -> tuple[dict[tuple[int, int], list[tuple[int, bytes]]], dict[int, list[tuple[int, bytes]]]]:
    """The fragments of the ``wanted`` tiles, and of the middles of the level-0 tiles ``middles``: one query.
    ``latest``: of a tile stored whole, that row alone (what a computation needs; audits read them all)."""
    keys = sorted(set(wanted))
    middle_keys = sorted(set(middles))
    if not keys and not middle_keys:
        return {}, {}
    tiles_table, middles_table = _table(schema), _table(schema, "tile_middles")
    tile_match = "level = w.level AND tile_index = w.tile_index"
    tile_rows = (_latest(tiles_table, tile_match, WIDTH) if latest
                 else f"SELECT end_width, hashes FROM {tiles_table} WHERE {tile_match}")
    sql = (f"SELECT w.level, w.tile_index, t.end_width, t.hashes"
           f" FROM unnest($1::smallint[], $2::bigint[]) AS w(level, tile_index), LATERAL ({tile_rows}) t")
    args: list[object] = [[k[0] for k in keys], [k[1] for k in keys]]
    if middle_keys:  # level -1 marks a middle's rows
        middle_match = "tile_index = v.tile_index"
        middle_rows = (_latest(middles_table, middle_match, MIDDLE_WIDTH) if latest
                       else f"SELECT end_width, hashes FROM {middles_table} WHERE {middle_match}")
        sql += (f" UNION ALL SELECT -1, v.tile_index, m.end_width, m.hashes"
                f" FROM unnest($3::bigint[]) AS v(tile_index), LATERAL ({middle_rows}) m")
        args.append(middle_keys)
    rows = await conn.fetch(sql + " ORDER BY 1, 2, 3", *args)
    grouped: dict[tuple[int, int], list[tuple[int, bytes]]] = {key: [] for key in keys}
    middle_grouped: dict[int, list[tuple[int, bytes]]] = {}
    for row in rows:
        fragment = (int(row["end_width"]), bytes(row["hashes"]))
        if row["level"] < 0:
            middle_grouped.setdefault(int(row["tile_index"]), []).append(fragment)
        else:
            grouped[(int(row["level"]), int(row["tile_index"]))].append(fragment)
    return grouped, middle_grouped


def _start(end_width: int, data: bytes) -> int:
    return end_width - len(data) // merkle.HASH_SIZE


def _completed_elsewhere(keyed: Sequence[tuple[T, int, bytes]], width: int) -> list[T]:
    """Of (key, end_width, hashes) rows, the keys of tiles a row completes whose start the rows lack (the
    hashes before them are stored)."""
    first: dict[T, int] = {}
    return [key for key, end, data in keyed
            if first.setdefault(key, _start(end, data)) > 0 and end == width and _start(end, data) > 0]


def _made_whole(keyed: Sequence[tuple[T, int, bytes]], width: int, stored: Mapping[T, list[tuple[int, bytes]]],
                name: Callable[[T], tuple[int, int]]) -> list[tuple[T, int, bytes]]:
    """The rows, each that completes a tile it did not start carrying the tile whole (from ``stored`` and
    the rows before it)."""
    earlier: dict[T, list[tuple[int, bytes]]] = {}
    out = []
    for key, end, data in keyed:
        before = earlier.setdefault(key, list(stored.get(key, ())))
        if end == width and (start := _start(end, data)) > 0:
            data = concatenated(*name(key), [*before, (end, data)])
            if len(data) != width * merkle.HASH_SIZE:
                raise TileError(*name(key), f"its stored fragments do not reach the {start} hashes before the"
                                " commit completing it")
        before.append((end, data))
        out.append((key, end, data))
    return out


async def whole_when_complete(
    conn: asyncpg.Connection, rows: Sequence[TileRow], middle_rows: Sequence[MiddleRow], schema: str | None = None,
) -> tuple[list[TileRow], list[MiddleRow]]:
    """The rows to store, with each fragment that completes a tile (or a middle) it did not start carrying
    the tile whole: the hashes stored before it (read here, under the writers' lock, when ``rows`` do not
    hold them) and its own. Readers of a complete tile then read one row, not the 64 to 128 fragments
    that group commits of a few records leave; the earlier fragments stay (the log's role may only
    INSERT), and audits check that the whole tile repeats them. Rows of one tile come in end_width order."""
    tile_keyed = [((level, tile), end, data) for level, tile, end, data in rows]
    middle_keyed = [(tile, end, data) for tile, end, data in middle_rows]
    stored_tiles, stored_middles = await _fragments(  # no query when nothing needs one
        conn, _completed_elsewhere(tile_keyed, WIDTH), schema, _completed_elsewhere(middle_keyed, MIDDLE_WIDTH))
    return ([(level, tile, end, data)
             for (level, tile), end, data in _made_whole(tile_keyed, WIDTH, stored_tiles, lambda key: key)],
            [(tile, end, data)
             for tile, end, data in _made_whole(middle_keyed, MIDDLE_WIDTH, stored_middles, lambda key: (-1, key))])


async def read_middle_fragments(
    conn: asyncpg.Connection, tile_indexes: Iterable[int], schema: str | None = None
) -> dict[int, list[tuple[int, bytes]]]:
    """Every stored fragment ((end_width, hashes), by end_width) of the middles of level-0 tiles (audits
    hold each one to the records; a log written before middles has none for its older tiles)."""
    _, grouped = await _fragments(conn, (), schema, tile_indexes)
    return grouped


async def read_tiles(
    conn: asyncpg.Connection, wanted: Iterable[tuple[int, int]], schema: str | None = None
) -> dict[tuple[int, int], list[bytes]]:
    grouped, _ = await _fragments(conn, wanted, schema)
    return {key: assemble(key[0], key[1], fragments) for key, fragments in grouped.items()}


def pyramid(hashes: Sequence[bytes] | bytes) -> Pyramid:
    """Every interior node of a complete tile (255 hashes), level by level. A node's two children are 64
    consecutive bytes of the level below, hashed as they lie."""
    sha256, prefix, pair = hashlib.sha256, b"\x01", 2 * merkle.HASH_SIZE
    data = hashes if isinstance(hashes, bytes) else b"".join(hashes)
    levels = [data]
    while len(data) > merkle.HASH_SIZE:
        data = b"".join([sha256(prefix + data[i:i + pair]).digest() for i in range(0, len(data), pair)])
        levels.append(data)
    return tuple(levels)


class TileCache:
    """Pyramids of complete upper tiles, kept across calls by one serving process (least recently used
    first out). 16 KiB each: the default of 1,024 holds every upper tile of a log of 67 million leaves.
    Only a server's proofs use it; audits read the stored tiles every time."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._pyramids: OrderedDict[tuple[int, int], Pyramid] = OrderedDict()
        # Nodes of partial tiles (only the tree's right edge has them, and every proof to a recent size
        # crosses it): a perfect subtree's hash never changes once its leaves exist.
        self.nodes: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple[int, int]) -> Pyramid | None:
        found = self._pyramids.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
            self._pyramids.move_to_end(key)
        return found

    def put(self, key: tuple[int, int], value: Pyramid) -> None:
        if key[0] < 1:  # level-0 tiles, one per 256 leaves, are read at random: they would flush the rest
            return
        self._pyramids[key] = value
        self._pyramids.move_to_end(key)
        while len(self._pyramids) > self.capacity:
            self._pyramids.popitem(last=False)

    def put_node(self, key: tuple[int, int], value: bytes) -> None:
        self.nodes[key] = value
        self.nodes.move_to_end(key)
        while len(self.nodes) > 16 * self.capacity:
            self.nodes.popitem(last=False)


def oracle(
    tiles: Mapping[tuple[int, int], Sequence[bytes] | bytes],
    pyramids: dict[tuple[int, int], Pyramid] | None = None,
    cache: TileCache | None = None,
    middles: Mapping[int, bytes] | None = None,
    held: Mapping[tuple[int, int], bytes] | None = None,
) -> merkle.NodeOracle:
    """Node hashes from fetched tiles (each node from one tile; a tile's hashes as a list or as one byte
    string): from the pyramid of a complete tile (built on first need, kept in ``pyramids`` and offered
    to ``cache``), from a partial one by hashing (remembered, and offered to ``cache`` for upper tiles).
    A level-0 tile with a middle in ``middles`` has no pyramid built: its nodes below tree level 4 are
    hashed from at most 8 of its hashes, those above from at most 8 of the middle's."""
    built = pyramids if pyramids is not None else {}
    memo: dict[tuple[int, int], bytes] = dict(held) if held else {}  # ``held``: nodes known beforehand
    shared = cache.nodes if cache is not None else memo
    middle_of = middles if middles is not None else {}
    size = merkle.HASH_SIZE

    def reduce(hashes: list[bytes]) -> bytes:
        while len(hashes) > 1:
            hashes = [merkle.node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
        return hashes[0]

    def node(level: int, index: int) -> bytes:
        tile_level, tile_index, first, count = _tile_span(level, index)
        key = (tile_level, tile_index)
        j = level - tile_level * HEIGHT
        levels = built.get(key)
        if levels is not None:
            at = (first >> j) * size
            return levels[j][at:at + size]
        known = memo.get((level, index)) or shared.get((level, index))
        if known is not None:
            return known
        stored = tiles.get(key, b"")
        width = len(stored) // size if isinstance(stored, bytes) else len(stored)
        middle = middle_of.get(tile_index, b"") if tile_level == 0 else b""
        if middle and j >= MIDDLE and (first + count) >> MIDDLE <= len(middle) // size:
            at = (first >> MIDDLE) * size
            value = reduce([middle[i:i + size] for i in range(at, at + (count >> MIDDLE) * size, size)])
            memo[(level, index)] = value
            if cache is not None and width < WIDTH:  # the right edge's (see below)
                cache.put_node((level, index), value)
            return value
        if width == WIDTH and j > 0 and not (middle and j < MIDDLE):
            levels = built[key] = pyramid(stored)
            if cache is not None:
                cache.put(key, levels)
            at = (first >> j) * size
            return levels[j][at:at + size]
        if first + count > width:
            raise TileError(tile_level, tile_index, f"lacks the hashes of node {level}/{index}")
        if isinstance(stored, bytes):
            value = reduce([stored[i * size:(i + 1) * size] for i in range(first, first + count)])
        else:
            value = reduce([stored[i] for i in range(first, first + count)])
        memo[(level, index)] = value
        if cache is not None and width < WIDTH:  # a node of a partial tile: only the right edge has them
            cache.put_node((level, index), value)
        return value

    return node


async def compute(
    conn: asyncpg.Connection, computation: Callable[[merkle.NodeOracle], T], schema: str | None = None,
    cache: TileCache | None = None, *, middles: bool = False,
) -> T:
    """Run a tree computation (a root, a proof, a frontier) on the stored tiles, reading them in one query
    (the upper tiles ``cache`` holds are not read again). ``middles``: also read the level-0 tiles' middles
    and compute from them (proofs served to readers; the writer and audits compute from the tiles alone)."""
    # The right edge's nodes the cache holds are not read again: a partial tile is read whole (as many
    # rows as commits extended it), and every proof into one tree size needs the same ones.
    needed = merkle.nodes_needed(computation)
    known = cache.nodes if cache is not None else {}
    held = {node: known[node] for node in needed if node in known}  # kept for this computation
    wanted = {_tile_span(level, index)[:2] for level, index in needed if (level, index) not in held}
    pyramids: dict[tuple[int, int], Pyramid] = {}
    if cache is not None:
        for key in wanted:
            if key[0] >= 1 and (found := cache.get(key)) is not None:
                pyramids[key] = found
    grouped, middle_grouped = await _fragments(
        conn, wanted.difference(pyramids), schema, [key[1] for key in wanted if key[0] == 0] if middles else (),
        latest=True)
    tiles = {key: concatenated(key[0], key[1], fragments) for key, fragments in grouped.items()}
    found_middles = {key: whole_prefix(fragments) for key, fragments in middle_grouped.items()}
    return computation(oracle(tiles, pyramids, cache, found_middles, held))


async def load_frontier(conn: asyncpg.Connection, size: int, schema: str | None = None) -> merkle.Frontier:
    return await compute(conn, lambda node: merkle.Frontier.load(size, node), schema)


async def root_at(conn: asyncpg.Connection, size: int, schema: str | None = None) -> bytes:
    return await compute(conn, lambda node: merkle.root(size, node), schema)
