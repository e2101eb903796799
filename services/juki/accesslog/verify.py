"""Verification of a stored access log: recompute the chain, check every checkpoint.

Used by the service (VerifyLog, with its own read-only role) and by ``juki audit verify`` straight
against the database (with the administrative URL), so an auditor does not have to trust the service.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from juki.accesslog import chain

_ROWS_SQL = (
    "SELECT sequence, subject, (EXTRACT(EPOCH FROM provided_at) * 1000000)::bigint AS provided_us,"
    " (EXTRACT(EPOCH FROM recorded_at) * 1000000)::bigint AS recorded_us, outcome, payload, chain_hash"
    " FROM {table} WHERE sequence > $1 ORDER BY sequence LIMIT $2"
)


async def load_checkpoints(conn: asyncpg.Connection, schema: str | None = None) -> list[chain.StoredCheckpoint]:
    table = f'"{schema}".checkpoints' if schema else "checkpoints"
    rows = await conn.fetch(
        f"SELECT sequence, chain_hash, signed_at_ns, signature, key_id, kind FROM {table}"
        " ORDER BY sequence, signed_at_ns"
    )
    return [
        chain.StoredCheckpoint(int(r["sequence"]), bytes(r["chain_hash"]), int(r["signed_at_ns"]),
                               bytes(r["signature"]), r["key_id"], r["kind"])
        for r in rows
    ]


async def verify_log(
    conn: asyncpg.Connection,
    verifier: chain.CheckpointVerifier,
    *,
    schema: str | None = None,
    chunk: int = 20_000,
    progress: Callable[[int, int], None] | None = None,
    resume: tuple[int, bytes] | None = None,
) -> chain.VerifyResult:
    """Recompute every record's hash from its stored columns and check the checkpoints.

    The first problem found is reported with its sequence number: a record whose hash does not match
    (altered), a missing sequence (deleted), an unexpected one (inserted or reordered), a checkpoint
    whose signature or chain hash does not match, or records a checkpoint covers that are gone.

    ``resume`` = (sequence, chain hash) of a record an earlier full verification reached: only the
    records after it are recomputed, continuing from its hash (checkpoint signatures are all checked).
    ``result.last_hash`` is the hash of the last record verified, to resume from next time.
    """
    result = chain.VerifyResult()
    records_table = f'"{schema}".records' if schema else "records"
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoints = await load_checkpoints(conn, schema)
        bounds = await conn.fetchrow(f"SELECT min(sequence) AS first, max(sequence) AS last FROM {records_table}")
        first = int(bounds["first"]) if bounds["first"] is not None else 0
        last = int(bounds["last"]) if bounds["last"] is not None else 0
        result.first_sequence, result.last_sequence = first, last

        # Signatures first: a forged checkpoint is a problem whatever the records say.
        by_sequence: dict[int, list[chain.StoredCheckpoint]] = {}
        purge_anchor: chain.StoredCheckpoint | None = None
        for cp in checkpoints:
            purge = cp.kind == "purge"
            if not verifier.verify(cp.sequence, cp.chain_hash, cp.signed_at_ns, cp.signature, cp.key_id, purge=purge):
                result.fail(cp.sequence, f"checkpoint at sequence {cp.sequence} ({cp.kind}): signature does not verify")
                return result
            result.checkpoints_checked += 1
            if purge:
                if purge_anchor is None or cp.sequence > purge_anchor.sequence:
                    purge_anchor = cp
            else:
                result.latest_checkpoint = cp
            by_sequence.setdefault(cp.sequence, []).append(cp)

        # Where the chain starts: genesis, or the signed anchor of the latest purge.
        previous = chain.GENESIS
        expected = 1
        if purge_anchor is not None:
            previous, expected = purge_anchor.chain_hash, purge_anchor.sequence + 1
        if resume is not None and resume[0] >= expected - 1 and first != 0 and first <= resume[0] + 1:
            previous, expected = resume[1], resume[0] + 1
            result.records_checked = resume[0] - first + 1
            first = expected
            result.last_hash = previous
        if first == 0:
            covered = max((cp.sequence for cp in checkpoints), default=0)
            if covered >= expected:
                result.fail(expected, f"records {expected}..{covered} are covered by a checkpoint but missing")
            return result
        if first != expected:
            if first < expected:
                result.fail(first, f"record {first} precedes the purge anchor at {expected - 1}")
            else:
                result.fail(expected, f"record {expected} is missing (the log starts at {first} without a purge anchor)")
            return result

        next_hash = chain.next_hash
        canonical = chain.canonical_bytes
        cursor_after = expected - 1
        while True:
            rows = await conn.fetch(_ROWS_SQL.format(table=records_table), cursor_after, chunk)
            if not rows:
                break
            for row in rows:
                sequence = int(row["sequence"])
                if sequence != expected:
                    result.fail(expected, f"record {expected} is missing or out of order (found {sequence} next)")
                    return result
                computed = next_hash(previous, canonical(
                    sequence, int(row["provided_us"]), int(row["recorded_us"]), int(row["outcome"]),
                    bytes(row["subject"]), bytes(row["payload"]),
                ))
                if computed != bytes(row["chain_hash"]):
                    result.fail(sequence, f"record {sequence} does not match its chain hash (altered, inserted or moved)")
                    return result
                for cp in by_sequence.get(sequence, ()):
                    if cp.chain_hash != computed:
                        result.fail(sequence, f"checkpoint at sequence {sequence} does not match the recomputed chain")
                        return result
                previous = computed
                expected += 1
                result.records_checked += 1
                result.last_hash = computed
            cursor_after = int(rows[-1]["sequence"])
            if progress is not None:
                progress(result.records_checked, last - first + 1)
        covered = max((cp.sequence for cp in checkpoints), default=0)
        if covered >= expected:
            result.fail(expected, f"records {expected}..{covered} are covered by a checkpoint but missing")
    return result
