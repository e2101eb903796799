"""Entry point of the access-log service: ``juki serve accesslog``.

Settings (``JUKI_*``; see juki.mesh.settings):
  ACCESSLOG_SIGNING_KEY_FILE / ACCESSLOG_SIGNING_CERT_FILE  Ed25519 checkpoint key and its certificate
  PSEUDONYM_KEY_FILE              key of the HMAC pseudonym stored instead of the 住民票コード
  ACCESSLOG_CHECKPOINT_SECONDS    interval of signed checkpoints (default 10; also one on shutdown)
  ACCESSLOG_VERIFY_SECONDS        interval of the background verification (default 600; 0 = never):
                                  the whole log at start, then incrementally
  ACCESSLOG_MAX_GROUP_RECORDS     records per group commit at most (default 100000)
  ACCESSLOG_ORIGIN                origin of the tree checkpoints and key name of their signature
                                  (default juki.local/accesslog); one per log, so verifiers tell logs apart
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from juki._gen.juki.accesslog.v1 import accesslog_pb2_grpc
from juki.accesslog import chain, notes, tiles
from juki.accesslog.service import AccessLogServicer
from juki.accesslog.writer import LogWriter, micros_timestamps
from juki.mesh import db
from juki.mesh.errors import SettingsError
from juki.mesh.server import ServiceBinding
from juki.mesh.settings import ServiceSettings, spiffe_id
from juki.mesh.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVICE_NAME = "juki.accesslog.v1.AccessLogService"
DISCLOSURE = spiffe_id("service", "disclosure")
ACCESS = {
    "Append": frozenset({"service"}),
    "AppendStream": frozenset({"service"}),
    "ListProvisions": frozenset({DISCLOSURE}),
    "VerifyLog": frozenset({"operator", "service"}),
    # Checkpoints and proofs: the disclosure service (proofs shown to residents), other services, and
    # operators auditing the log. They reveal hashes only, never a record.
    "GetCheckpoint": frozenset({"operator", "service", "witness"}),
    "GetInclusionProof": frozenset({"operator", "service"}),
    "GetConsistencyProof": frozenset({"operator", "service", "witness"}),
    # Witnesses (spiffe://juki.local/witness/NAME) fetch checkpoints and submit their cosignatures; they
    # may call nothing else (deny by default).
    "AddCosignature": frozenset({"witness"}),
}
DEFAULT_ORIGIN = "juki.local/accesslog"


def read_pseudonym_key(path: str | Path | None) -> bytes:
    if not path:
        raise SettingsError("the access log needs JUKI_PSEUDONYM_KEY_FILE (key of the resident-code pseudonym)")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"JUKI_PSEUDONYM_KEY_FILE: cannot read {path}: {exc.strerror}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = text.encode()
    if len(key) < 16:
        raise SettingsError("JUKI_PSEUDONYM_KEY_FILE: the key must hold at least 16 bytes")
    return key


@dataclass(frozen=True)
class TreeCheckpoint:
    note: str
    tree_size: int
    root_hash: bytes


class Checkpointer:
    """Signs (sequence, chain hash) of the committed head every few seconds and on shutdown, and with
    it a C2SP checkpoint of the Merkle tree as stored (so that it covers what every replica committed)."""

    def __init__(
        self, pool: asyncpg.Pool, writer: LogWriter, signer: chain.Signer, interval: float,
        origin: str = DEFAULT_ORIGIN,
    ) -> None:
        self._pool = pool
        self._writer = writer
        self._signer = signer
        self._note_signer = signer.note_signer(origin)
        self.origin = origin
        self._interval = interval
        self._signed_sequence = -1
        self._signed_tree_size = -1
        self._tree_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async with self._pool.acquire() as conn:
            # The heads signed so far (index reads: a log keeps millions of checkpoints over the years).
            self._signed_sequence = int(await conn.fetchval(
                "SELECT coalesce(max(sequence), 0) FROM checkpoints WHERE kind <> 'purge'"))
            self._signed_tree_size = int(await conn.fetchval("SELECT coalesce(max(tree_size), 0) FROM tree_checkpoints"))
        if self._interval > 0:
            self._task = asyncio.create_task(self._run(), name="accesslog-checkpointer")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.checkpoint("periodic")
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("checkpoint failed, will retry: %s", exc)

    async def tree_checkpoint(self) -> TreeCheckpoint | None:
        """Sign the stored tree's head, unless it is signed already (O(log n) tile reads)."""
        async with self._tree_lock, self._pool.acquire() as conn, \
                conn.transaction(isolation="repeatable_read", readonly=True):
            size = await tiles.tree_size(conn)
            if size == 0 or size <= self._signed_tree_size:
                return None
            root_hash = await tiles.root_at(conn, size)
        signed_at_ns = time.time_ns()
        note = self._note_signer.sign(notes.Checkpoint(self.origin, size, root_hash).body())
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO tree_checkpoints (tree_size, root_hash, signed_at_ns, note) VALUES ($1, $2, $3, $4)",
                size, root_hash, signed_at_ns, note,
            )
        self._signed_tree_size = max(self._signed_tree_size, size)
        return TreeCheckpoint(note, size, root_hash)

    async def latest_tree(self, *, create: bool = False) -> TreeCheckpoint | None:
        if create:
            await self.tree_checkpoint()
        row = await self._pool.fetchrow(
            "SELECT note, tree_size, root_hash FROM tree_checkpoints ORDER BY tree_size DESC, signed_at_ns DESC LIMIT 1"
        )
        return None if row is None else TreeCheckpoint(row["note"], int(row["tree_size"]), bytes(row["root_hash"]))

    async def checkpoint(self, kind: str) -> chain.StoredCheckpoint | None:
        """Sign the head this process committed, unless it is signed already; and the tree's head."""
        await self.tree_checkpoint()
        sequence, chain_hash = self._writer.head_sequence, self._writer.head_hash
        if sequence == 0 or sequence <= self._signed_sequence:
            return None
        signed_at_ns = time.time_ns()
        cp = chain.StoredCheckpoint(sequence, chain_hash, signed_at_ns,
                                    self._signer.sign(sequence, chain_hash, signed_at_ns), self._signer.key_id, kind)
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO checkpoints (sequence, chain_hash, signed_at_ns, signature, key_id, kind)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                cp.sequence, cp.chain_hash, cp.signed_at_ns, cp.signature, cp.key_id, cp.kind,
            )
        self._signed_sequence = sequence
        return cp

    async def latest(self, *, create: bool = False) -> chain.StoredCheckpoint | None:
        if create:
            await self.checkpoint("periodic")
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT sequence, chain_hash, signed_at_ns, signature, key_id, kind FROM checkpoints"
                " WHERE kind <> 'purge' ORDER BY sequence DESC, signed_at_ns DESC LIMIT 1"
            )
        if row is None:
            return None
        return chain.StoredCheckpoint(int(row["sequence"]), bytes(row["chain_hash"]), int(row["signed_at_ns"]),
                                      bytes(row["signature"]), row["key_id"], row["kind"])

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.checkpoint("shutdown")


class AccessLogApp:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        options = settings.accesslog
        key_file = options.signing_key_file
        cert_file = options.signing_cert_file
        if not key_file or not cert_file:
            raise SettingsError("the access log needs JUKI_ACCESSLOG_SIGNING_KEY_FILE and _CERT_FILE")
        self.signer = chain.Signer(key_file)
        self.verifier = chain.CheckpointVerifier(cert_file, settings.tls.ca)
        if self.verifier.key_id != self.signer.key_id:
            raise SettingsError("the access-log signing key does not match its certificate")
        self.pseudonym_key = read_pseudonym_key(options.pseudonym_key_file)
        self.checkpoint_seconds = options.checkpoint_seconds
        self.verify_seconds = options.verify_seconds
        self.max_group = options.max_group_records
        self.origin = options.origin or DEFAULT_ORIGIN
        try:
            self.note_verifier = self.verifier.note_verifier(self.origin)
        except ValueError as exc:
            raise SettingsError(f"JUKI_ACCESSLOG_ORIGIN: {exc}") from exc
        self.pool: asyncpg.Pool | None = None
        self.writer_pool: asyncpg.Pool | None = None
        self.writer: LogWriter | None = None
        self.checkpointer: Checkpointer | None = None
        self.servicer: AccessLogServicer | None = None
        self._verifier_task: asyncio.Task[None] | None = None
        self._partitions_task: asyncio.Task[None] | None = None

    async def start(self) -> Sequence[ServiceBinding]:
        self.pool = await db.create_pool(self.settings.database, self.settings.instance)
        await ensure_partitions(self.pool)
        self._partitions_task = asyncio.create_task(self._partitions_periodically(), name="accesslog-partitions")
        self.writer_pool = await create_writer_pool(self.settings)
        self.writer = LogWriter(self.writer_pool, self.settings.database.schema, max_group_records=self.max_group)
        await self.writer.start()
        self.checkpointer = Checkpointer(self.pool, self.writer, self.signer, self.checkpoint_seconds, self.origin)
        await self.checkpointer.start()
        self.servicer = AccessLogServicer(self.pool, self.writer, self.pseudonym_key, self.verifier, self.checkpointer,
                                          crl=self.settings.tls.crl)
        if self.verify_seconds > 0:
            self._verifier_task = asyncio.create_task(self._verify_periodically(), name="accesslog-verifier")
        return [ServiceBinding(SERVICE_NAME, accesslog_pb2_grpc.add_AccessLogServiceServicer_to_server,
                               self.servicer, ACCESS)]

    async def _verify_periodically(self) -> None:
        assert self.servicer is not None
        full = True  # the whole log once at start; then the records appended since, with the tree's checks
        while True:
            try:
                result = await self.servicer.verify_now(full=full)
                full = not result.ok
                if not result.ok:
                    log.error("access log verification FAILED at sequence %d: %s",
                              result.first_bad_sequence, result.problem)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("background verification failed: %s", exc)
            await asyncio.sleep(self.verify_seconds)

    async def _partitions_periodically(self) -> None:
        assert self.pool is not None
        while True:
            await asyncio.sleep(PARTITIONS_SECONDS)
            try:
                await ensure_partitions(self.pool)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("could not make the next months' partitions, will retry: %s", exc)

    async def stop(self) -> None:
        await cancel_and_wait(self._verifier_task)
        await cancel_and_wait(self._partitions_task)
        if self.writer is not None:
            await self.writer.stop()
        if self.checkpointer is not None:
            await self.checkpointer.stop()
        if self.writer_pool is not None:
            await self.writer_pool.close()
        if self.pool is not None:
            await self.pool.close()


# Monthly partitions of the records are made this far ahead, checked this often (migration 0004).
PARTITIONS_AHEAD = "2 months"
PARTITIONS_SECONDS = 6 * 3600


async def ensure_partitions(pool: asyncpg.Pool) -> int:
    """Make the partitions of this month and the next ones if missing (the function runs as the schema's
    owner; the service's role cannot create tables). The number made."""
    return int(await pool.fetchval(
        f"SELECT ensure_partitions(now(), now() + interval '{PARTITIONS_AHEAD}')"))


async def create_writer_pool(settings: ServiceSettings) -> asyncpg.Pool:
    """The writer's own two connections (one committing, one waiting for the lock), integer timestamps."""
    pool = await asyncpg.create_pool(
        settings.database.url.reveal(), min_size=1, max_size=2, init=micros_timestamps,
        server_settings={"search_path": f"{settings.database.schema},public",
                         "application_name": f"{settings.instance}-writer"},
    )
    assert pool is not None
    return pool


def create(settings: ServiceSettings) -> AccessLogApp:
    return AccessLogApp(settings)
