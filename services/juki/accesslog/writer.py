"""The single writer of the access log: group commit, sequence numbers, the hash chain and the Merkle tree.

Every Append/AppendStream batch is handed to :meth:`LogWriter.append`, which queues it and waits. One
writer task drains the queue: all batches waiting at that moment go into one transaction (one COPY of
the records, one COPY of the batch ids, one COMMIT), then every waiting caller is answered. A caller is
answered only after COMMIT, so an acknowledgement means the records are durable.

Sequence numbers and chain hashes are assigned inside the transaction, after an advisory lock that
serialises writers of the same log across processes (several replicas may run); the head of the chain
is read again under the lock, so a replica that lost the race continues from the real head.

The same pass hashes each record as a leaf of the Merkle tree (juki.accesslog.merkle) onto the
writer's frontier and collects the tile hashes the group completes; they are inserted in the group's
transaction (juki.accesslog.tiles), so the stored tree always covers exactly the committed records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki.accesslog import chain, merkle, tiles
from juki.mesh.errors import JukiError, Reason

log = logging.getLogger(__name__)

# Key of the advisory lock serialising writers of one log (per schema: hashtext of the lock name).
LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('juki-accesslog-writer:' || current_schema()))"
# The head of the chain: the last record, or, when a retention purge removed every record, the purge
# checkpoint that anchors the chain (sequences continue after the purged ones).
HEAD_SQL = (
    "SELECT sequence, chain_hash FROM ("
    "(SELECT sequence, chain_hash FROM records ORDER BY sequence DESC LIMIT 1) UNION ALL"
    " (SELECT sequence, chain_hash FROM checkpoints WHERE kind = 'purge' ORDER BY sequence DESC LIMIT 1)"
    ") AS heads ORDER BY sequence DESC LIMIT 1"
)
RECORD_COLUMNS = ("sequence", "subject", "provided_at", "recorded_at", "outcome", "payload", "chain_hash")
TILE_COLUMNS = ("level", "tile_index", "end_width", "hashes")
MIDDLE_COLUMNS = ("tile_index", "end_width", "hashes")
# The fragments of the tiles and of the level-0 tiles' middles a group extends: one statement.
TILES_INSERT = (
    "WITH tile_rows AS (INSERT INTO tiles (level, tile_index, end_width, hashes)"
    " SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::smallint[], $4::bytea[]))"
    " INSERT INTO tile_middles (tile_index, end_width, hashes)"
    " SELECT * FROM unnest($5::bigint[], $6::smallint[], $7::bytea[])"
)


def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as ``width`` column lists (for a statement over ``unnest`` of arrays)."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


async def copy_tiles(conn: asyncpg.Connection, fragments: tiles.Fragments, schema: str) -> None:
    """The tile and middle fragments a large append made, by COPY (the bulk paths)."""
    tile_rows, middle_rows = await tiles.whole_when_complete(conn, fragments.rows(), fragments.middle_rows(), schema)
    await conn.copy_records_to_table("tiles", records=tile_rows, columns=TILE_COLUMNS, schema_name=schema)
    await conn.copy_records_to_table("tile_middles", records=middle_rows, columns=MIDDLE_COLUMNS, schema_name=schema)


# PostgreSQL counts timestamps in microseconds since 2000-01-01; Unix since 1970-01-01.
_PG_EPOCH_OFFSET_US = 946_684_800_000_000


async def micros_timestamps(conn: asyncpg.Connection) -> None:
    """Pool ``init`` of the writer: timestamptz travels as integer microseconds since the Unix epoch.

    The writer assigns two timestamps per record; building datetime objects for them cost more than
    the COPY encoding of a whole row. Only the writer's own connections use this codec.
    """
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", format="tuple",
        encoder=lambda micros: (micros - _PG_EPOCH_OFFSET_US,),
        decoder=lambda value: value[0] + _PG_EPOCH_OFFSET_US,
    )


# A record ready for the chain: (subject, provided_at in microseconds, outcome, payload).
PreparedRecord = tuple[bytes, int, int, bytes]


def prepare(
    records: Sequence[accesslog_pb2.ProvisionRecord],
    pseudonymise: Callable[[str], bytes],
    now_us: int,
    valid_code: Callable[[str], bool] = lambda code: True,
) -> list[PreparedRecord] | None:
    """Pseudonymise and serialise records in one pass; None when any record is malformed.

    Mutates the records (resident_code cleared, provided_at defaulted to now). On None the batch is
    restored and the caller builds the precise field violations with a slower pass; the happy path
    walks the batch once.
    """
    prepared: list[PreparedRecord] = []
    append = prepared.append
    cleared: list[str] = []
    keep = cleared.append
    for record in records:
        code = record.resident_code
        outcome = record.outcome
        if (code and not valid_code(code)) or (not code and outcome == 1) or (outcome != 1 and outcome != 2):
            for index, original in enumerate(cleared):  # put the batch back as it came, for the error report
                records[index].resident_code = original
            return None
        keep(code)
        if code:
            record.resident_code = ""
        stamp = record.provided_at
        provided = stamp.seconds * 1_000_000 + stamp.nanos // 1000
        if not provided:
            stamp.FromMicroseconds(now_us)
            provided = now_us
        append((pseudonymise(code), provided, outcome, record.SerializeToString()))
    return prepared


@dataclass(frozen=True)
class Ack:
    first_sequence: int
    count: int


@dataclass
class _Pending:
    batch_id: str
    records: list[PreparedRecord]
    future: asyncio.Future[Ack]


@dataclass
class _Built:
    """A group with sequences and hashes assigned from a given head."""

    base_sequence: int
    base_hash: bytes
    recorded_us: int
    rows: list[tuple[object, ...]] = field(default_factory=list)
    new_batches: list[tuple[str, int, int, int]] = field(default_factory=list)
    answers: dict[int, Ack] = field(default_factory=dict)
    end_sequence: int = 0
    end_hash: bytes = b""
    base_frontier: merkle.Frontier = field(default_factory=merkle.Frontier)
    end_frontier: merkle.Frontier = field(default_factory=merkle.Frontier)
    tile_rows: list[tiles.TileRow] = field(default_factory=list)
    middle_rows: list[tiles.MiddleRow] = field(default_factory=list)


@dataclass
class WriterStats:
    groups: int = 0
    records: int = 0
    last_group_size: int = 0
    largest_group: int = 0
    rebuilds: int = 0  # groups re-chained under the lock (another writer moved the head, or a commit failed)
    durations_ms: list[float] = field(default_factory=list)


class _Instruments:
    """OpenTelemetry instruments of the writer (exported with the mesh's metrics)."""

    def __init__(self, writer: LogWriter) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation

        from juki.mesh import metrics

        meter = metrics.meter("juki.accesslog")
        self.group_records = meter.create_histogram(
            "juki.accesslog.group_commit.records", unit="{record}", description="records per group commit")
        self.commit_ms = meter.create_histogram(
            "juki.accesslog.group_commit.duration", unit="ms", description="lock, COPY and COMMIT of one group")
        self.failed_records = meter.create_counter(
            "juki.accesslog.append.failed_records", unit="{record}",
            description="records of group commits that failed (their callers were refused)")

        def backlog(options: CallbackOptions) -> list[Observation]:
            return [Observation(sum(len(item.records) for item in writer._pending))]

        def head(options: CallbackOptions) -> list[Observation]:
            return [Observation(writer.head_sequence)]

        meter.create_observable_gauge("juki.accesslog.backlog", callbacks=[backlog], unit="{record}",
                                      description="records waiting for a group commit")
        meter.create_observable_gauge("juki.accesslog.head_sequence", callbacks=[head],
                                      description="sequence of the last durable record")


class LogWriter:
    """Group-committing single writer of one access-log schema."""

    def __init__(self, pool: asyncpg.Pool, schema: str, *, max_group_records: int = 100_000) -> None:
        self._pool = pool
        self._schema = schema
        self._max_group = max_group_records
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.head_sequence = 0
        self.head_hash = chain.GENESIS
        self.frontier = merkle.Frontier()  # the tree over records 1..head_sequence
        self._respeculate = False
        self.stats = WriterStats()
        self._instruments = _Instruments(self)

    async def start(self) -> None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(HEAD_SQL)
            if row is not None:
                self.head_sequence, self.head_hash = int(row["sequence"]), bytes(row["chain_hash"])
            self.frontier = await self._tree_through(conn, self.head_sequence)
        self._task = asyncio.create_task(self._run(), name=f"accesslog-writer-{self._schema}")

    async def _tree_through(self, conn: asyncpg.Connection, sequence: int) -> merkle.Frontier:
        """The tree's frontier over records 1..sequence, first adding the leaves of records the stored
        tree lacks (a log written before the tree existed): under the writers' lock, in chunks."""
        size = await tiles.tree_size(conn)  # more than ``sequence`` when another replica wrote since
        while size < sequence:
            async with conn.transaction():
                await conn.execute(LOCK_SQL)
                size = await tiles.tree_size(conn)
                frontier = await tiles.load_frontier(conn, size)
                rows = await conn.fetch(
                    "SELECT sequence, subject, provided_at, recorded_at, outcome, payload FROM records"
                    " WHERE sequence > $1 ORDER BY sequence LIMIT 50000", size,
                )
                if not rows or int(rows[0]["sequence"]) != size + 1:
                    raise RuntimeError(f"cannot build the Merkle tree: record {size + 1} is missing (purged"
                                       " before the tree existed?)")
                fragments = tiles.Fragments()
                for r in rows:
                    frontier.append(merkle.leaf_hash(chain.canonical_bytes(
                        int(r["sequence"]), r["provided_at"], r["recorded_at"], int(r["outcome"]),
                        bytes(r["subject"]), bytes(r["payload"]))), fragments)
                await copy_tiles(conn, fragments, self._schema)
                log.info("added %d records to the Merkle tree (now %d leaves)", len(rows), frontier.size)
                size = frontier.size
        return await tiles.load_frontier(conn, sequence)

    async def stop(self) -> None:
        """Write everything queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def append(self, records: list[PreparedRecord], batch_id: str = "") -> Ack:
        if self._closing:
            raise JukiError(Reason.ACCESS_LOG_UNAVAILABLE, "the access log is shutting down", retry_after_seconds=1)
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(batch_id, records, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        # Commits are pipelined: while one group is in COPY/COMMIT, the next one is chained in Python
        # from the speculative head (the end of the group in flight). Under the lock each commit checks
        # that the head it was built on is the real one, and rebuilds it otherwise (after a failed commit,
        # or when another replica wrote in between), so speculation never breaks the chain.
        in_flight: list[asyncio.Task[None]] = []
        speculative = (self.head_sequence, self.head_hash, self.frontier)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                while len(in_flight) >= 2:
                    with contextlib.suppress(Exception):
                        await in_flight[0]
                    in_flight.pop(0)
                group: list[_Pending] = []
                size = 0
                while self._pending and (not group or size + len(self._pending[0].records) <= self._max_group):
                    item = self._pending.pop(0)
                    group.append(item)
                    size += len(item.records)
                if self._respeculate:
                    # A commit failed or found another head: let the pipeline drain, restart from the real head.
                    for task in in_flight:
                        with contextlib.suppress(Exception):
                            await task
                    in_flight.clear()
                    speculative = (self.head_sequence, self.head_hash, self.frontier)
                    self._respeculate = False
                built = self._build(group, speculative, {})
                speculative = (built.end_sequence, built.end_hash, built.end_frontier)
                previous = in_flight[-1] if in_flight else None
                in_flight.append(asyncio.create_task(self._commit_guarded(group, built, previous)))
            if self._closing and not self._pending:
                for task in in_flight:
                    with contextlib.suppress(Exception):
                        await task
                return

    async def _commit_guarded(self, group: list[_Pending], built: _Built, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        try:
            await self._commit(group, built)
        except Exception as exc:  # every waiter learns that nothing of its batch is durable
            self._respeculate = True
            log.error("access-log group commit failed: %s", exc)
            self._instruments.failed_records.add(sum(len(item.records) for item in group))
            error = exc if isinstance(exc, JukiError) else JukiError(
                Reason.ACCESS_LOG_UNAVAILABLE, f"the access log could not commit: {type(exc).__name__}",
                retry_after_seconds=0.5,
            )
            for item in group:
                if not item.future.done():
                    item.future.set_exception(error)

    def _build(
        self, group: list[_Pending], head: tuple[int, bytes, merkle.Frontier], known: dict[str, Ack]
    ) -> _Built:
        """Assign sequences, chain hashes and tree leaves to a group, starting after ``head``."""
        recorded_us = time.time_ns() // 1000
        built = _Built(head[0], head[1], recorded_us, base_frontier=head[2])
        known = dict(known)
        sequence, previous = head[0], head[1]
        frontier = head[2].copy()
        fragments = tiles.Fragments()
        leaves: list[bytes] = []
        add_leaf = leaves.append
        leaf_hash = merkle.leaf_hash
        canonical = chain.canonical_bytes
        next_hash = chain.next_hash
        rows = built.rows
        for index, item in enumerate(group):
            if item.batch_id and item.batch_id in known:
                built.answers[index] = known[item.batch_id]
                continue
            first = sequence + 1
            for subject, provided_us, outcome, payload in item.records:
                sequence += 1
                record_bytes = canonical(sequence, provided_us, recorded_us, outcome, subject, payload)
                previous = next_hash(previous, record_bytes)
                add_leaf(leaf_hash(record_bytes))
                rows.append((sequence, subject, provided_us, recorded_us, outcome, payload, previous))
            ack = Ack(first, len(item.records))
            built.answers[index] = ack
            if item.batch_id:
                known[item.batch_id] = ack
                built.new_batches.append((item.batch_id, ack.first_sequence, ack.count, recorded_us))
        frontier.extend(leaves, fragments.run)  # the group's leaves onto the tree, a level at a time
        built.end_sequence, built.end_hash = sequence, previous
        built.end_frontier, built.tile_rows, built.middle_rows = frontier, fragments.rows(), fragments.middle_rows()
        return built

    async def _commit(self, group: list[_Pending], built: _Built) -> None:
        started = time.perf_counter()
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_SQL)
            row = await conn.fetchrow(HEAD_SQL)
            head_at = (int(row["sequence"]), bytes(row["chain_hash"])) if row else (0, chain.GENESIS)
            batch_ids = [item.batch_id for item in group if item.batch_id]
            known: dict[str, Ack] = {}
            if batch_ids:
                for found in await conn.fetch(
                    "SELECT batch_id, first_sequence, count FROM batches WHERE batch_id = ANY($1::text[])", batch_ids
                ):
                    known[found["batch_id"]] = Ack(int(found["first_sequence"]), int(found["count"]))
            moved = head_at != (built.base_sequence, built.base_hash)
            if moved:
                self._respeculate = True
                self.stats.rebuilds += 1
            if known or moved:
                # Another writer moved the head: its tree is in the tiles it committed with its records.
                frontier = await tiles.load_frontier(conn, head_at[0]) if moved else built.base_frontier
                built = self._build(group, (*head_at, frontier), known)
            if built.rows:
                await conn.copy_records_to_table(
                    "records", records=built.rows, columns=RECORD_COLUMNS, schema_name=self._schema
                )
            if built.tile_rows:
                # A few rows per group (one fragment per tile touched): one INSERT of arrays, not a COPY.
                # A tile this group completes is written whole (one read of its earlier fragments).
                tile_rows, middle_rows = await tiles.whole_when_complete(conn, built.tile_rows, built.middle_rows)
                await conn.execute(TILES_INSERT, *columns(tile_rows, 4), *columns(middle_rows, 3))
            if built.new_batches:
                await conn.copy_records_to_table(
                    "batches", records=built.new_batches,
                    columns=("batch_id", "first_sequence", "count", "recorded_at"), schema_name=self._schema,
                )
        # Committed: from here on the records are durable.
        self.head_sequence, self.head_hash = built.end_sequence, built.end_hash
        self.frontier = built.end_frontier
        count = len(built.rows)
        self.stats.groups += 1
        self.stats.records += count
        self.stats.last_group_size = count
        self.stats.largest_group = max(self.stats.largest_group, count)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.stats.durations_ms.append(elapsed_ms)
        self._instruments.group_records.record(count)
        self._instruments.commit_ms.record(elapsed_ms)
        del self.stats.durations_ms[:-1000]
        for index, item in enumerate(group):
            if not item.future.done():
                item.future.set_result(built.answers[index])
