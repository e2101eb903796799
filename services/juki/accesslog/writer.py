"""The single writer of the access log: group commit, sequence numbers and the hash chain.

Every Append/AppendStream batch is handed to :meth:`LogWriter.append`, which queues it and waits. One
writer task drains the queue: all batches waiting at that moment go into one transaction (one COPY of
the records, one COPY of the batch ids, one COMMIT), then every waiting caller is answered. A caller is
answered only after COMMIT, so an acknowledgement means the records are durable.

Sequence numbers and chain hashes are assigned inside the transaction, after an advisory lock that
serialises writers of the same log across processes (several replicas may run); the head of the chain
is read again under the lock, so a replica that lost the race continues from the real head.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki.accesslog import chain
from juki.mesh.errors import JukiError, Reason

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# Key of the advisory lock serialising writers of one log (per schema: hashtext of the lock name).
LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('juki-accesslog-writer:' || current_schema()))"
HEAD_SQL = "SELECT sequence, chain_hash FROM records ORDER BY sequence DESC LIMIT 1"
RECORD_COLUMNS = ("sequence", "subject", "provided_at", "recorded_at", "outcome", "payload", "chain_hash")


def micros_to_datetime(micros: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=micros)


@dataclass(frozen=True)
class PreparedRecord:
    """A record ready for the chain: everything but its sequence, recorded_at and hash."""

    subject: bytes
    provided_at_us: int
    outcome: int
    payload: bytes


def prepare(records: Sequence[accesslog_pb2.ProvisionRecord], pseudonym_key: bytes, now_us: int) -> list[PreparedRecord]:
    """Pseudonymise and serialise records (mutates them: resident_code is cleared)."""
    prepared: list[PreparedRecord] = []
    append = prepared.append
    digest = chain.pseudonym
    for record in records:
        code = record.resident_code
        record.resident_code = ""
        stamp = record.provided_at
        provided = stamp.seconds * 1_000_000 + stamp.nanos // 1000 if (stamp.seconds or stamp.nanos) else now_us
        if not (stamp.seconds or stamp.nanos):
            record.provided_at.FromMicroseconds(now_us)
        append(PreparedRecord(digest(pseudonym_key, code), provided, record.outcome,
                              record.SerializeToString(deterministic=True)))
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
class WriterStats:
    groups: int = 0
    records: int = 0
    last_group_size: int = 0
    largest_group: int = 0
    durations_ms: list[float] = field(default_factory=list)


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
        self.stats = WriterStats()

    async def start(self) -> None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(HEAD_SQL)
        if row is not None:
            self.head_sequence, self.head_hash = int(row["sequence"]), bytes(row["chain_hash"])
        self._task = asyncio.create_task(self._run(), name=f"accesslog-writer-{self._schema}")

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
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                group: list[_Pending] = []
                size = 0
                while self._pending and (not group or size + len(self._pending[0].records) <= self._max_group):
                    item = self._pending.pop(0)
                    group.append(item)
                    size += len(item.records)
                try:
                    await self._commit(group)
                except Exception as exc:  # every waiter learns that nothing of its batch is durable
                    log.error("access-log group commit failed: %s", exc)
                    error = exc if isinstance(exc, JukiError) else JukiError(
                        Reason.ACCESS_LOG_UNAVAILABLE, f"the access log could not commit: {type(exc).__name__}",
                        retry_after_seconds=0.5,
                    )
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(error)
            if self._closing and not self._pending:
                return

    async def _commit(self, group: list[_Pending]) -> None:
        started = time.perf_counter()
        answers: dict[int, Ack] = {}
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_SQL)
            row = await conn.fetchrow(HEAD_SQL)
            head_sequence, head_hash = (int(row["sequence"]), bytes(row["chain_hash"])) if row else (0, chain.GENESIS)
            batch_ids = [item.batch_id for item in group if item.batch_id]
            known: dict[str, Ack] = {}
            if batch_ids:
                for found in await conn.fetch(
                    "SELECT batch_id, first_sequence, count FROM batches WHERE batch_id = ANY($1::text[])", batch_ids
                ):
                    known[found["batch_id"]] = Ack(int(found["first_sequence"]), int(found["count"]))
            recorded_us = time.time_ns() // 1000
            recorded_at = micros_to_datetime(recorded_us)
            rows: list[tuple[object, ...]] = []
            new_batches: list[tuple[str, int, int, dt.datetime]] = []
            sequence, previous = head_sequence, head_hash
            canonical_header = chain.canonical_bytes
            sha = chain.next_hash
            to_datetime = micros_to_datetime
            for index, item in enumerate(group):
                if item.batch_id and item.batch_id in known:
                    answers[index] = known[item.batch_id]
                    continue
                first = sequence + 1
                for record in item.records:
                    sequence += 1
                    previous = sha(previous, canonical_header(
                        sequence, record.provided_at_us, recorded_us, record.outcome, record.subject, record.payload
                    ))
                    rows.append((sequence, record.subject, to_datetime(record.provided_at_us), recorded_at,
                                 record.outcome, record.payload, previous))
                ack = Ack(first, len(item.records))
                answers[index] = ack
                if item.batch_id:
                    known[item.batch_id] = ack
                    new_batches.append((item.batch_id, ack.first_sequence, ack.count, recorded_at))
            if rows:
                await conn.copy_records_to_table(
                    "records", records=rows, columns=RECORD_COLUMNS, schema_name=self._schema
                )
            if new_batches:
                await conn.copy_records_to_table(
                    "batches", records=new_batches, columns=("batch_id", "first_sequence", "count", "recorded_at"),
                    schema_name=self._schema,
                )
        # Committed: from here on the records are durable.
        self.head_sequence, self.head_hash = sequence, previous
        self.stats.groups += 1
        self.stats.records += len(rows)
        self.stats.last_group_size = len(rows)
        self.stats.largest_group = max(self.stats.largest_group, len(rows))
        with contextlib.suppress(Exception):
            self.stats.durations_ms.append((time.perf_counter() - started) * 1000)
            del self.stats.durations_ms[:-1000]
        for index, item in enumerate(group):
            if not item.future.done():
                item.future.set_result(answers[index])
