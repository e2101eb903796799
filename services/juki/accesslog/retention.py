"""Retention: drop the monthly partitions of records older than the kept period (7 years by default),
without deleting a row and without breaking the chain or the Merkle tree.

This is the one privileged path of the access log. The service's own role can never delete, so the
purge runs with the administrative database role (``juki audit purge``, or a scheduled Job in
Kubernetes), holding the checkpoint signing key. In one transaction, under the writers' advisory lock:

1. the log is verified first (a purge must not launder tampering): in full, or — given the tree state an
   earlier verification reached (the auditor's, ``juki audit verify``'s state file) — incrementally, which
   hashes only the records since that state; the records to drop are then recomputed on their own (their
   chain from the previous anchor, each leaf against the tree's tiles) along with the first record kept,
   which must chain from the new anchor. So a purge costs O(new records + dropped records + log n), never
   a pass over the records it keeps;
2. the partitions to drop are the months (``records_YYYYMM``, migration 0004) that end before the
   cut-off and whose records are a prefix of the log: every remaining record has a larger sequence (a
   month never holds an earlier record than the one before it unless clocks of replicas disagreed; the
   prefix then stops there);
3. a *purge checkpoint* signs (last dropped sequence, its chain hash) with its own payload prefix, and a
   C2SP tree checkpoint signs the stored tree at its current size: the tiles stay, so every remaining
   record keeps its inclusion proof, and the tree's signed roots stay checkable;
4. the partitions (and the batch ids of the same months) are detached and dropped: no DELETE.

Verification then starts from the latest purge checkpoint instead of the genesis hash: the first
remaining record must chain from it, and nothing but records purged that way may be missing. Records of
a month without a partition (the DEFAULT partition) are never dropped.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass, field

import asyncpg

from juki.accesslog import chain, notes, tiles
from juki.accesslog.verify import DEFAULT_ORIGIN, TreeProgress, TreeState, verify_log, verify_range

DEFAULT_RETENTION = dt.timedelta(days=7 * 365 + 2)  # 7 years, as prefectures keep provision records
_MONTHLY = re.compile(r"records_(\d{4})(\d{2})")


@dataclass(frozen=True)
class PurgeResult:
    purged: int
    anchor_sequence: int
    problem: str = ""
    partitions: list[str] = field(default_factory=list)  # the records partitions dropped
    kept: str = ""  # why an older partition was kept, if one was
    verification: str = ""  # "incremental" (from an earlier verification's tree state) or "full"
    records_hashed: int = 0  # records whose hashes the purge recomputed: new ones, then dropped ones
    tree: TreeProgress | None = None  # the verification's tree side (its state at the latest checkpoint)


@dataclass(frozen=True)
class _Partition:
    name: str
    end: dt.datetime  # exclusive upper bound of its month
    first: int | None  # sequences it holds (None when empty)
    last: int | None


async def _partitions(conn: asyncpg.Connection, schema: str, parent: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
        " WHERE n.nspname = $1 AND p.relname = $2 ORDER BY c.relname", schema, parent)
    return [str(row["relname"]) for row in rows]


def _month_end(name: str) -> dt.datetime | None:
    match = _MONTHLY.fullmatch(name)
    if match is None:
        return None
    year, month = int(match.group(1)), int(match.group(2))
    return dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=dt.UTC)


async def purge(
    conn: asyncpg.Connection,
    schema: str,
    signer: chain.Signer,
    verifier: chain.CheckpointVerifier,
    *,
    older_than: dt.datetime,
    origin: str = DEFAULT_ORIGIN,
    resume: TreeState | None = None,
) -> PurgeResult:
    """Drop the monthly partitions that end before ``older_than`` and hold a prefix of the log, anchored
    by a signed purge checkpoint. ``conn`` must be an administrative connection. ``resume``: the tree state
    an earlier verification reached, to verify incrementally (None: the whole log)."""
    verified = await verify_log(conn, verifier, schema=schema, origin=origin, resume=resume)
    if not verified.ok:
        return PurgeResult(0, 0, f"refusing to purge a log that does not verify: {verified.problem}")
    tree = verified.tree
    incremental = tree is not None and tree.resumed_from > 0
    hashed = tree.records_hashed if tree is not None else verified.records_checked
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('juki-accesslog-writer:' || $1))", schema)
        partitions: list[_Partition] = []
        for name in await _partitions(conn, schema, "records"):
            bounds = await conn.fetchrow(f'SELECT min(sequence) AS first, max(sequence) AS last FROM "{schema}"."{name}"')
            end = _month_end(name)
            partitions.append(_Partition(name, end or dt.datetime.max.replace(tzinfo=dt.UTC),
                                         bounds["first"], bounds["last"]))
        candidates = sorted((p for p in partitions if p.end <= older_than and _month_end(p.name)),
                            key=lambda p: p.end)
        chosen: list[_Partition] = []
        kept = ""
        for index in range(len(candidates), 0, -1):
            prefix = candidates[:index]
            rest = [p for p in partitions if p not in prefix and p.first is not None]
            last = max((p.last for p in prefix if p.last is not None), default=0)
            first_kept = min((p.first for p in rest if p.first is not None), default=None)
            if first_kept is None or last < first_kept:
                chosen = prefix
                break
            kept = (f"{candidates[index - 1].name} holds record {last}, after record {first_kept} of a newer"
                    " partition: kept until the whole prefix can go")
        anchor = max((p.last for p in chosen if p.last is not None), default=0)
        purged = 0
        if anchor and incremental:
            # The verification did not hash the records it had verified before: recompute those to drop,
            # from the previous anchor, and the first one kept (it must chain from the new anchor).
            previous = await conn.fetchrow(
                f'SELECT sequence, chain_hash FROM "{schema}".checkpoints WHERE kind = \'purge\''
                " ORDER BY sequence DESC LIMIT 1")
            after, start = (int(previous["sequence"]), bytes(previous["chain_hash"])) if previous else (0, chain.GENESIS)
            last = max((p.last for p in partitions if p.last is not None), default=anchor)
            checked = await verify_range(conn, schema, after, start, min(anchor + 1, last))
            hashed += checked.records_hashed
            if checked.problem is not None:
                return PurgeResult(0, 0, f"refusing to purge a log that does not verify: {checked.problem[1]}",
                                   verification="incremental", records_hashed=hashed)
        if anchor:
            anchor_hash = bytes(await conn.fetchval(
                f'SELECT chain_hash FROM "{schema}".records WHERE sequence = $1', anchor))
            signed_at_ns = time.time_ns()
            await conn.execute(
                f'INSERT INTO "{schema}".checkpoints (sequence, chain_hash, signed_at_ns, signature, key_id, kind)'
                " VALUES ($1, $2, $3, $4, $5, 'purge')",
                anchor, anchor_hash, signed_at_ns, signer.sign(anchor, anchor_hash, signed_at_ns, purge=True),
                signer.key_id,
            )
            size = await tiles.tree_size(conn, schema)
            root = await tiles.root_at(conn, size, schema)
            await conn.execute(
                f'INSERT INTO "{schema}".tree_checkpoints (tree_size, root_hash, signed_at_ns, note)'
                " VALUES ($1, $2, $3, $4)",
                size, root, signed_at_ns, signer.note_signer(origin).sign(notes.Checkpoint(origin, size, root).body()),
            )
        chosen_months = {p.name.removeprefix("records_") for p in chosen}
        for p in chosen:
            purged += int(await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{p.name}"'))
        for parent in ("records", "batches"):
            for name in await _partitions(conn, schema, parent):
                if name.removeprefix(f"{parent}_") in chosen_months:
                    await conn.execute(f'ALTER TABLE "{schema}"."{parent}" DETACH PARTITION "{schema}"."{name}"')
                    await conn.execute(f'DROP TABLE "{schema}"."{name}"')
    return PurgeResult(purged, anchor, partitions=[p.name for p in chosen], kept=kept,
                       verification="incremental" if incremental else "full", records_hashed=hashed, tree=tree)
