"""The AccessLogService servicer: proto <-> writer, listing, verification, checkpoints and proofs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki.accesslog import chain, merkle, notes, tiles, witness
from juki.accesslog.verify import TreeState, verify_log
from juki.accesslog.writer import LogWriter, prepare
from juki.domain import JAPAN_TIME, is_valid_resident_code
from juki.mesh.errors import FieldViolation, JukiError, Reason, invalid, invalid_many
from juki.mesh.pki import load_revoked_serials
from juki.mesh.tls import require_peer

MAX_BATCH_RECORDS = 100_000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_OTHER_CODES = 16
# A cosignature dated further ahead than this (clock skew) is refused (C2SP tlog-cosignature allows it).
MAX_COSIGNATURE_SKEW_SECONDS = 300


def valid_code(code: str) -> bool:
    """Same answer as juki.domain.is_valid_resident_code, five times faster: it runs once per record."""
    if len(code) != 11 or not code.isascii() or not code.isdigit():
        return False
    b = code.encode()
    # weights 5,4,3,2,7,6,5,4,3,2 from the left (2,3,4,5,6,7,2,3,4,5 from the rightmost body digit);
    # the ASCII offset of the ten digits (sum of weights 41 times 48) is taken off at once.
    r = (5 * b[0] + 4 * b[1] + 3 * b[2] + 2 * b[3] + 7 * b[4] + 6 * b[5] + 5 * b[6] + 4 * b[7] + 3 * b[8]
         + 2 * b[9] - 41 * 48) % 11
    return b[10] - 48 == (0 if r <= 1 else 11 - r)


def check_records(records: Any, prefix: str = "records") -> None:
    """Refuse a batch naming a malformed resident code or an unknown outcome (INVALID_ARGUMENT)."""
    if len(records) > MAX_BATCH_RECORDS:
        raise invalid(prefix, f"at most {MAX_BATCH_RECORDS} records per batch")
    violations: list[FieldViolation] = []
    for index, record in enumerate(records):
        code = record.resident_code
        if code and not valid_code(code):
            violations.append(FieldViolation(f"{prefix}[{index}].resident_code", "not a valid 住民票コード",
                                             Reason.CHECK_DIGIT_MISMATCH.name if len(code) == 11 and code.isdigit()
                                             else Reason.INVALID_FIELD.name))
        if record.outcome not in (1, 2):
            violations.append(FieldViolation(f"{prefix}[{index}].outcome", "must be PROVIDED or REFUSED"))
        if not code and record.outcome == accesslog_pb2.PROVISION_OUTCOME_PROVIDED:
            violations.append(FieldViolation(f"{prefix}[{index}].resident_code",
                                             "a provision must name the resident it concerns"))
        if len(violations) >= 100:
            break
    if violations:
        raise invalid_many(violations)


def date_bound(value: common_pb2.Date, field: str, *, end: bool) -> dt.datetime | None:
    """Start of the day (or of the next day, for an inclusive end) in Japan time; None when unset."""
    if not (value.year or value.month or value.day):
        return None
    try:
        day = dt.date(value.year, value.month, value.day)
    except ValueError as exc:
        raise invalid(field, f"not a calendar date: {exc}") from exc
    if end:
        day += dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=JAPAN_TIME)


def encode_token(provided_at: dt.datetime, sequence: int) -> str:
    micros = (provided_at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}:{sequence}".encode()).decode()


def decode_token(token: str) -> tuple[dt.datetime, int]:
    try:
        micros, sequence = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=int(micros)), int(sequence)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid("page_token", "not a token this service issued") from exc


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# Tree sizes beyond this cannot be stored (bigint) and are refused before any query.
MAX_TREE_SIZE = (1 << 63) - 1


def micros(value: dt.datetime) -> int:
    return (value - _EPOCH) // dt.timedelta(microseconds=1)


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def checkpoint_message(cp: chain.StoredCheckpoint | None) -> accesslog_pb2.Checkpoint:
    if cp is None:
        return accesslog_pb2.Checkpoint()
    seconds, nanos = divmod(cp.signed_at_ns, 1_000_000_000)
    return accesslog_pb2.Checkpoint(
        sequence=cp.sequence, chain_hash=cp.chain_hash, signature=cp.signature, key_id=cp.key_id,
        signed_at=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
    )


_TRACER = trace.get_tracer("juki.accesslog")
_TRACE_FORMAT = TraceContextTextMapPropagator()


def _collect(task: asyncio.Task[tuple[int, int]]) -> None:
    if not task.cancelled():
        task.exception()


class AccessLogServicer(accesslog_pb2_grpc.AccessLogServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        writer: LogWriter,
        pseudonym_key: bytes,
        verifier: chain.CheckpointVerifier,
        checkpointer: Any,
        crl: Path | None = None,
    ) -> None:
        self._pool = pool
        self._writer = writer
        self._key = pseudonym_key
        self._pseudonymise = chain.Pseudonymiser(pseudonym_key)
        self._verifier = verifier
        self._checkpointer = checkpointer
        self._note_verifier = verifier.note_verifier(checkpointer.origin)
        self._verify_lock = asyncio.Lock()
        self._crl = crl  # revoked witness cosigning keys are refused
        self._revoked: tuple[float, frozenset[int]] = (-1.0, frozenset())
        self.last_verification: tuple[float, accesslog_pb2.VerifyLogResponse] | None = None
        self._reached: TreeState | None = None  # what the last good verification reached (tree frontier included)
        self._full_at: tuple[float, Any] | None = None  # when the last full verification succeeded
        self._tiles = tiles.TileCache()  # interior nodes of complete upper tiles, for proofs
        self._tree_seen = 0  # the largest tree size read from the tiles: the tree only grows

    async def _append(self, records: Any, batch_id: str, prefix: str) -> tuple[int, int]:
        if len(records) > MAX_BATCH_RECORDS:
            raise invalid(prefix, f"at most {MAX_BATCH_RECORDS} records per batch")
        if not records:
            return 0, 0
        prepared = prepare(records, self._pseudonymise, time.time_ns() // 1000, valid_code)
        if prepared is None:
            check_records(records, prefix)
            raise invalid(prefix, "a record is malformed")
        ack = await self._writer.append(prepared, batch_id)
        return ack.first_sequence, ack.count

    async def _append_traced(self, records: Any, batch_id: str, traceparent: str) -> tuple[int, int]:
        """:meth:`_append` inside a span that continues the trace of the request that opened the batch."""
        parent = _TRACE_FORMAT.extract({"traceparent": traceparent}) if traceparent else None
        with _TRACER.start_as_current_span(
            "accesslog.append_batch", context=parent, attributes={"juki.batch.records": len(records)}
        ):
            return await self._append(records, batch_id, "records")

    async def Append(
        self, request: accesslog_pb2.AppendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> accesslog_pb2.AppendResponse:
        if request.traceparent:
            first, count = await self._append_traced(request.records, request.batch_id, request.traceparent)
        else:
            first, count = await self._append(request.records, request.batch_id, "records")
        return accesslog_pb2.AppendResponse(first_sequence=first, count=count)

    async def AppendStream(
        self,
        request_iterator: AsyncIterator[accesslog_pb2.AppendStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[accesslog_pb2.AppendStreamResponse]:
        # Batches are read ahead of their acknowledgements (at most 64) so that several of them can
        # share one commit; acknowledgements still go out in request order, each once its batch is durable.
        window = asyncio.Semaphore(64)
        acks: asyncio.Queue[tuple[str, asyncio.Task[tuple[int, int]]] | None] = asyncio.Queue()

        async def reader() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(
                        self._append_traced(request.records, request.batch_id, request.traceparent)
                    )
                    acks.put_nowait((request.batch_id, task))
            finally:
                acks.put_nowait(None)

        reading = asyncio.create_task(reader())
        try:
            while True:
                item = await acks.get()
                if item is None:
                    break
                batch_id, task = item
                first, count = await task
                window.release()
                yield accesslog_pb2.AppendStreamResponse(batch_id=batch_id, first_sequence=first, count=count)
            await reading
        finally:
            if not reading.done():
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reading
            elif not reading.cancelled():
                # The stream was closed while the reader had already ended (e.g. the server stopping under
                # it): its outcome is collected here, not left for the loop to report as lost.
                reading.exception()
            # Batches read but not acknowledged (the stream failed or was cancelled) may still commit; a
            # sender retries them with the same batch_id. Their outcome is collected, never left dangling.
            while not acks.empty():
                left = acks.get_nowait()
                if left is not None:
                    left[1].add_done_callback(_collect)

    async def ListProvisions(
        self, request: accesslog_pb2.ListProvisionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> accesslog_pb2.ListProvisionsResponse:
        code = request.resident_code
        if not is_valid_resident_code(code):
            raise invalid("resident_code", "not a valid 住民票コード")
        if request.page_size < 0:
            raise invalid("page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = date_bound(request.from_date, "from_date", end=False)
        end = date_bound(request.to_date, "to_date", end=True)
        if start and end and start >= end:
            raise invalid("to_date", "must not be before from_date")
        proof_size = request.proof_tree_size
        if proof_size:
            await self._check_size("proof_tree_size", proof_size)
        witnessed_size = request.witnessed_tree_size
        if witnessed_size and not proof_size:
            raise invalid("witnessed_tree_size", "only with proof_tree_size")
        if witnessed_size > proof_size:
            raise invalid("witnessed_tree_size", "must not be larger than proof_tree_size")
        if len(request.other_resident_codes) > MAX_OTHER_CODES:
            raise invalid("other_resident_codes", f"at most {MAX_OTHER_CODES} earlier codes")
        codes_by_subject = {chain.pseudonym(self._key, code): code}
        for index, other in enumerate(request.other_resident_codes):
            if not is_valid_resident_code(other):
                raise invalid(f"other_resident_codes[{index}]", "not a valid 住民票コード")
            codes_by_subject.setdefault(chain.pseudonym(self._key, other), other)
        args: list[Any]
        if len(codes_by_subject) == 1:
            conditions, args = ["subject = $1"], list(codes_by_subject)
        else:
            conditions, args = ["subject = ANY($1::bytea[])"], [list(codes_by_subject)]
        if start is not None:
            args.append(start)
            conditions.append(f"provided_at >= ${len(args)}")
        if end is not None:
            args.append(end)
            conditions.append(f"provided_at < ${len(args)}")
        if not request.include_refused:
            conditions.append(f"outcome = {accesslog_pb2.PROVISION_OUTCOME_PROVIDED}")
        if proof_size:
            args.append(proof_size)
            conditions.append(f"sequence <= ${len(args)}")
        if request.page_token:
            after_time, after_sequence = decode_token(request.page_token)
            args += [after_time, after_sequence]
            conditions.append(f"(provided_at, sequence) < (${len(args) - 1}, ${len(args)})")
        args.append(size + 1)
        sql = (
            "SELECT sequence, subject, provided_at, recorded_at, outcome, payload FROM records WHERE "
            + " AND ".join(conditions)
            + f" ORDER BY provided_at DESC, sequence DESC LIMIT ${len(args)}"
        )
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
            proofs: list[list[bytes]] = []
            sizes: list[int] = []
            if proof_size and rows:
                # Every proof of the page from one read of the tiles they need; a record the witnessed
                # (smaller) tree holds is proven into that one.
                indices = [int(row["sequence"]) - 1 for row in rows[:size]]
                sizes = [witnessed_size if i < witnessed_size else proof_size for i in indices]
                proofs = await tiles.compute(
                    conn, lambda node: merkle.inclusion_proofs(list(zip(indices, sizes, strict=True)), node),
                    cache=self._tiles, middles=True)
        response = accesslog_pb2.ListProvisionsResponse()
        for position, row in enumerate(rows[:size]):
            record = accesslog_pb2.ProvisionRecord.FromString(row["payload"])
            record.resident_code = codes_by_subject.get(bytes(row["subject"]), code)
            logged = accesslog_pb2.LoggedProvision(
                sequence=row["sequence"], record=record, recorded_at=timestamp(row["recorded_at"])
            )
            if proofs:
                logged.leaf = chain.canonical_bytes(
                    int(row["sequence"]), micros(row["provided_at"]), micros(row["recorded_at"]), int(row["outcome"]),
                    bytes(row["subject"]), bytes(row["payload"]),
                )
                logged.inclusion_proof.extend(proofs[position])
                logged.proof_tree_size = sizes[position]
            response.provisions.append(logged)
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = encode_token(last["provided_at"], int(last["sequence"]))
        return response

    async def verify_now(self, *, full: bool = True) -> accesslog_pb2.VerifyLogResponse:
        """Verify the log through its head: from the start when ``full`` (or when nothing was verified
        yet), otherwise only the records appended since the last verification, continuing its tree
        frontier. No periodic whole-log recompute: the stored tree at the resumed size must still have
        the root verified then, and the tiles' consistency proof to the latest checkpoint must verify;
        a full recompute is what an auditor asks for (``juki audit verify --full``)."""
        async with self._verify_lock, self._pool.acquire() as conn:
            resume = None if full else self._reached
            result = await verify_log(conn, self._verifier, resume=resume, origin=self._checkpointer.origin)
        response = accesslog_pb2.VerifyLogResponse(
            ok=result.ok, records_checked=result.records_checked, checkpoints_checked=result.checkpoints_checked,
            first_bad_sequence=result.first_bad_sequence, problem=result.problem,
            latest_checkpoint=checkpoint_message(result.latest_checkpoint),
            through_sequence=result.last_sequence if result.ok else 0,
        )
        response.verified_at.GetCurrentTime()
        if result.ok and result.last_hash:
            self._reached = result.tree.at_head
            if resume is None:
                self._full_at = (time.monotonic(), response.verified_at)
        elif not result.ok:
            self._reached = self._full_at = None
        if self._full_at is not None:
            response.full_verified_at.CopyFrom(self._full_at[1])
        self.last_verification = (time.monotonic(), response)
        return response

    async def _head(self) -> int:
        return int(await self._pool.fetchval("SELECT coalesce(max(sequence), 0) FROM records"))

    async def VerifyLog(
        self, request: accesslog_pb2.VerifyLogRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> accesslog_pb2.VerifyLogResponse:
        if request.max_age_seconds:
            if self._verify_lock.locked():
                async with self._verify_lock:  # a verification is running: its result will do
                    pass
            if self.last_verification is not None:
                at, response = self.last_verification
                # A recent result is reused only while it still covers the head of the log; otherwise
                # the records appended since are verified incrementally (cheap), so the answer always
                # speaks for every record that exists now.
                if time.monotonic() - at <= request.max_age_seconds and response.through_sequence >= await self._head():
                    return response
            return await self.verify_now(full=False)
        return await self.verify_now()

    async def _check_size(self, field: str, size: int) -> None:
        """Refuse a ``size`` that is not a tree the log has (1..its current size). The tree only grows
        (appends add leaves, a purge keeps every hash), so a size at most the largest one seen is known
        to exist without a query; only a larger one reads the tiles (any replica's appends included)."""
        if size < 1:
            raise invalid(field, "a tree has at least one leaf")
        if size > MAX_TREE_SIZE:
            raise invalid(field, "larger than any tree this log can hold")
        if size <= self._tree_seen:
            return
        async with self._pool.acquire() as conn:
            current = await tiles.tree_size(conn)
        self._tree_seen = max(self._tree_seen, current)
        if size > current:
            raise invalid(field, f"the log's tree holds {current} leaves")

    async def GetCheckpoint(
        self, request: accesslog_pb2.GetCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> accesslog_pb2.GetCheckpointResponse:
        since: notes.Checkpoint | None = None
        if request.since_checkpoint:
            try:
                since = self._note_verifier.verify_checkpoint(request.since_checkpoint)
            except notes.NoteError as exc:
                raise invalid("since_checkpoint", str(exc)) from exc
        latest = await self._checkpointer.latest(create=True)
        tree = await self._checkpointer.latest_tree(create=True)
        if latest is None or tree is None:
            raise JukiError(Reason.FAILED_PRECONDITION, "the access log is empty: no checkpoint yet")
        response = accesslog_pb2.GetCheckpointResponse(
            checkpoint=checkpoint_message(latest), tree_checkpoint=tree.note,
            signing_certificate=self._verifier.certificate_pem,
        )
        witnessed = await self.witnessed_checkpoint()
        if witnessed is not None:
            response.witnessed_checkpoint, certificates = witnessed
            response.witness_certificates.extend(certificates)
        if since is not None:
            if since.tree_size > tree.tree_size:
                raise invalid("since_checkpoint", f"larger than the log's latest checkpoint ({tree.tree_size})")
            first, second = since.tree_size, tree.tree_size
            async with self._pool.acquire() as conn:
                response.consistency_proof.extend(
                    await tiles.compute(conn, lambda node: merkle.consistency_proof(first, second, node),
                                        cache=self._tiles, middles=True))
        return response

    async def GetInclusionProof(
        self, request: accesslog_pb2.GetInclusionProofRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> accesslog_pb2.GetInclusionProofResponse:
        size = request.tree_size
        await self._check_size("tree_size", size)
        index = request.leaf_index
        if index >= size:
            raise invalid("leaf_index", "must be less than tree_size")
        async with self._pool.acquire() as conn:
            leaf, proof = await tiles.compute(
                conn, lambda node: (node(0, index), merkle.inclusion_proof(index, size, node)), cache=self._tiles, middles=True)
        return accesslog_pb2.GetInclusionProofResponse(leaf_hash=leaf, inclusion_proof=proof)

    async def GetConsistencyProof(
        self, request: accesslog_pb2.GetConsistencyProofRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> accesslog_pb2.GetConsistencyProofResponse:
        first, second = request.first_size, request.second_size
        if first < 1:
            raise invalid("first_size", "a tree has at least one leaf")
        await self._check_size("second_size", second)
        if first > second:
            raise invalid("first_size", "must not be larger than second_size")
        async with self._pool.acquire() as conn:
            proof = await tiles.compute(conn, lambda node: merkle.consistency_proof(first, second, node),
                                        cache=self._tiles, middles=True)
        return accesslog_pb2.GetConsistencyProofResponse(consistency_proof=proof)

    def _revoked_serials(self) -> frozenset[int]:
        if self._crl is None:
            return frozenset()
        try:
            mtime = self._crl.stat().st_mtime
        except OSError:
            return self._revoked[1]
        if mtime != self._revoked[0]:
            self._revoked = (mtime, load_revoked_serials(self._crl, self._verifier.ca_path))
        return self._revoked[1]

    async def witnessed_checkpoint(self) -> tuple[str, list[str]] | None:
        """The latest tree checkpoint witnesses cosigned, with their lines, and their certificates."""
        async with self._pool.acquire() as conn:
            latest = await conn.fetchrow(
                "SELECT tree_size, root_hash FROM cosignatures ORDER BY tree_size DESC LIMIT 1")
            if latest is None:
                return None
            size, root = latest["tree_size"], latest["root_hash"]
            note = await conn.fetchval(
                "SELECT note FROM tree_checkpoints WHERE tree_size = $1 AND root_hash = $2"
                " ORDER BY signed_at_ns DESC LIMIT 1", size, root)
            rows = await conn.fetch(
                "SELECT DISTINCT ON (witness) witness, line, certificate FROM cosignatures"
                " WHERE tree_size = $1 AND root_hash = $2 ORDER BY witness, cosigned_at DESC", size, root)
        if note is None:
            return None
        return note + "".join(row["line"] for row in rows), [row["certificate"] for row in rows]

    async def AddCosignature(
        self, request: accesslog_pb2.AddCosignatureRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> accesslog_pb2.AddCosignatureResponse:
        peer = require_peer()
        if not request.witness_certificate:
            raise invalid("witness_certificate", "the witness's cosigning certificate is required")
        try:
            certified = witness.certified_witness(request.witness_certificate.encode(), self._verifier.ca_pem,
                                                  at=dt.datetime.now(dt.UTC), revoked=self._revoked_serials())
        except ValueError as exc:
            raise JukiError(Reason.PEER_NOT_AUTHORISED, f"witness_certificate: {exc}: the key is unknown to the"
                            " mesh CA, its cosignature is refused") from exc
        if peer.kind != "witness" or peer.name != certified.name:
            raise JukiError(Reason.PEER_NOT_AUTHORISED, f"witness_certificate: it certifies witness {certified.name},"
                            f" the caller is {peer.spiffe_id}")
        if not request.cosigned_checkpoint:
            raise invalid("cosigned_checkpoint", "the cosigned checkpoint is required")
        try:
            checkpoint = self._note_verifier.verify_checkpoint(request.cosigned_checkpoint)
        except notes.NoteError as exc:
            raise invalid("cosigned_checkpoint", str(exc)) from exc
        note = request.cosigned_checkpoint
        cut = note.rfind("\n\n")
        body = note[:cut + 1]
        for name in witness.cosigners(note, self._checkpointer.origin):
            if name != certified.key_name:
                raise JukiError(Reason.PEER_NOT_AUTHORISED, f"cosigned_checkpoint: a cosignature by {name}: a"
                                f" witness submits its own cosignature only (the caller is {peer.spiffe_id})")
        line, cosigned_at = "", -1
        problem = f"the note carries no cosignature of {certified.key_name}"
        reason = Reason.INVALID_FIELD
        for candidate in note[cut + 2:].splitlines(keepends=True):
            if not candidate.startswith(f"{notes.SIGNATURE_PREFIX}{certified.key_name} "):
                continue
            try:
                cosigned_at = certified.verifier().verify(body + "\n" + candidate)
            except notes.NoteError as exc:
                # Another key under this witness's name, or a bad signature: not by the key the CA certified.
                try:
                    submitted = base64.b64decode(candidate.rstrip("\n").rsplit(" ", 1)[-1], validate=True)[:4].hex()
                except ValueError:
                    submitted = "unreadable"
                problem, reason = f"{exc}; the line's key id is {submitted}", Reason.PEER_NOT_AUTHORISED
                continue
            line = candidate
            break
        if line and cosigned_at > time.time() + MAX_COSIGNATURE_SKEW_SECONDS:
            raise invalid("cosigned_checkpoint", f"the cosignature of witness {certified.name} is dated in the future")
        if not line:
            message = f"cosigned_checkpoint: {problem} (witness {certified.name}, certified key id {certified.key_id})"
            raise JukiError(reason, message, violations=[FieldViolation("cosigned_checkpoint", message, reason.name)])
        async with self._pool.acquire() as conn, conn.transaction():
            signed = await conn.fetchval(
                "SELECT true FROM tree_checkpoints WHERE tree_size = $1 AND root_hash = $2 LIMIT 1",
                checkpoint.tree_size, checkpoint.root_hash)
            if not signed:
                raise invalid("cosigned_checkpoint", f"the log signed no checkpoint of tree size {checkpoint.tree_size}"
                              " with that root")
            if checkpoint.tree_size > await tiles.tree_size(conn) \
                    or await tiles.root_at(conn, checkpoint.tree_size) != checkpoint.root_hash:
                raise invalid("cosigned_checkpoint", f"the log's stored tree has another root at size"
                              f" {checkpoint.tree_size}")
            await conn.execute(
                "INSERT INTO cosignatures (tree_size, root_hash, witness, key_id, cosigned_at, line, certificate)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                checkpoint.tree_size, checkpoint.root_hash, certified.name, bytes.fromhex(certified.key_id),
                cosigned_at, line, certified.certificate_pem,
            )
            count = await conn.fetchval(
                "SELECT count(DISTINCT witness) FROM cosignatures WHERE tree_size = $1", checkpoint.tree_size)
        return accesslog_pb2.AddCosignatureResponse(tree_size=checkpoint.tree_size, witnesses=int(count))
