"""Retention: purge records older than the kept period (7 years by default) without breaking the chain.

This is the one privileged path of the access log. The service's own role can never delete, so the
purge runs with the administrative database role (``juki audit purge``, or a scheduled Job in
Kubernetes), holding the checkpoint signing key. In one transaction, under the writers' advisory lock:

1. the part to be purged is verified (a purge must not launder tampering);
2. a *purge checkpoint* signs (last purged sequence, its chain hash) with its own payload prefix;
3. the records up to that sequence are deleted (their batch ids too).

Verification then starts from the latest purge checkpoint instead of the genesis hash: the first
remaining record must chain from it, and nothing but a record purged that way may be missing.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

import asyncpg

from juki.accesslog import chain
from juki.accesslog.verify import verify_log

DEFAULT_RETENTION = dt.timedelta(days=7 * 365 + 2)  # 7 years, as prefectures keep provision records


@dataclass(frozen=True)
class PurgeResult:
    purged: int
    anchor_sequence: int
    problem: str = ""


async def purge(
    conn: asyncpg.Connection,
    schema: str,
    signer: chain.Signer,
    verifier: chain.CheckpointVerifier,
    *,
    older_than: dt.datetime,
) -> PurgeResult:
    """Delete the records recorded before ``older_than`` (a prefix of the log), anchored by a signed checkpoint.

    ``conn`` must be an administrative connection. Records are purged by sequence up to the last one
    recorded before the cut-off, so the remaining log is always a contiguous suffix.
    """
    verified = await verify_log(conn, verifier, schema=schema)
    if not verified.ok:
        return PurgeResult(0, 0, f"refusing to purge a log that does not verify: {verified.problem}")
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock(hashtext('juki-accesslog-writer:' || '{schema}'))")
        row = await conn.fetchrow(
            f'SELECT sequence, chain_hash FROM "{schema}".records WHERE recorded_at < $1'
            " ORDER BY sequence DESC LIMIT 1",
            older_than,
        )
        if row is None:
            return PurgeResult(0, 0)
        anchor, anchor_hash = int(row["sequence"]), bytes(row["chain_hash"])
        signed_at_ns = time.time_ns()
        signature = signer.sign(anchor, anchor_hash, signed_at_ns, purge=True)
        await conn.execute(
            f'INSERT INTO "{schema}".checkpoints (sequence, chain_hash, signed_at_ns, signature, key_id, kind)'
            " VALUES ($1, $2, $3, $4, $5, 'purge')",
            anchor, anchor_hash, signed_at_ns, signature, signer.key_id,
        )
        status = await conn.execute(f'DELETE FROM "{schema}".records WHERE sequence <= $1', anchor)
        await conn.execute(
            f'DELETE FROM "{schema}".batches WHERE first_sequence + count - 1 <= $1', anchor
        )
    return PurgeResult(int(status.split()[-1]), anchor)
