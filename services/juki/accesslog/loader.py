"""Records loaded straight into an access-log schema, without the service: what the writer does (the chain,
the Merkle leaves and tiles, one COPY per chunk, under the writers' advisory lock), for building large
synthetic logs fast (``juki bench audit``) and logs recorded at chosen times (tests of retention).

The connection must be administrative or the log's own, with ``juki.accesslog.writer.micros_timestamps``
as its timestamptz codec (timestamps travel as integer microseconds). A running service's writer notices
the moved head under its lock and continues from it, as it does for another replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import asyncpg

from juki.accesslog import chain, merkle, tiles
from juki.accesslog.writer import HEAD_SQL, RECORD_COLUMNS, PreparedRecord, copy_tiles


@dataclass(frozen=True)
class Loaded:
    """The log after a load: its head (sequence, chain hash) and the tree's frontier there."""

    sequence: int
    chain_hash: bytes
    frontier: merkle.Frontier


async def load(
    conn: asyncpg.Connection,
    schema: str,
    records: Iterable[PreparedRecord],
    recorded_us: int | Callable[[int], int],
    *,
    chunk: int = 100_000,
    group: int = 0,
) -> Loaded:
    """Append ``records`` after the log's head, ``chunk`` per transaction. ``recorded_us``: the recording
    time (microseconds since the epoch) of every record, or a function of the sequence giving it.
    ``group``: store the tree's tiles as group commits of that many records would (one fragment per tile
    each touches), not one per chunk: the tile rows of a log written by the service under light load."""
    stamp = recorded_us if callable(recorded_us) else (lambda _sequence: recorded_us)
    canonical, next_hash, leaf_hash = chain.canonical_bytes, chain.next_hash, merkle.leaf_hash
    iterator = iter(records)
    loaded: Loaded | None = None
    while True:
        batch = [record for _, record in zip(range(chunk), iterator, strict=False)]
        if not batch and loaded is not None:
            return loaded
        async with conn.transaction():
            await conn.execute(f"SET LOCAL search_path TO \"{schema}\", public")
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('juki-accesslog-writer:' || $1))", schema)
            row = await conn.fetchrow(HEAD_SQL)
            sequence, previous = (int(row["sequence"]), bytes(row["chain_hash"])) if row else (0, chain.GENESIS)
            frontier = await tiles.load_frontier(conn, sequence)
            fragments = tiles.Fragments()
            leaves: list[bytes] = []
            add_leaf = leaves.append
            rows = []
            for subject, provided_us, outcome, payload in batch:
                sequence += 1
                at = stamp(sequence)
                record_bytes = canonical(sequence, provided_us, at, outcome, subject, payload)
                previous = next_hash(previous, record_bytes)
                add_leaf(leaf_hash(record_bytes))
                rows.append((sequence, subject, provided_us, at, outcome, payload, previous))
            step = group or max(len(leaves), 1)
            for at in range(0, len(leaves), step):
                frontier.extend(leaves[at:at + step], fragments.run)
                fragments.cut()
            if rows:
                await conn.copy_records_to_table("records", records=rows, columns=RECORD_COLUMNS, schema_name=schema)
                await copy_tiles(conn, fragments, schema)
        loaded = Loaded(sequence, previous, frontier)
        if not batch:
            return loaded
