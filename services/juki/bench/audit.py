"""``juki bench audit``: the cost of auditing a large access log, in a throwaway embedded PostgreSQL.

The log is filled fast, not through the service: synthetic records are chained, hashed into the Merkle
tree and written with one COPY per chunk, tiles included (juki.accesslog.loader, what the writer does).
Figures from the same run:

  * ``incremental_seconds``: ``verify_log`` continuing from a verified checkpoint at ``log_records``
    over ``new_records`` appended since (signatures, the stored root at the old size, the new leaves and
    tiles, the consistency proof to the new checkpoint): what ``juki audit verify`` pays per run;
  * ``proofs``: at each size of ``--sizes``, the inclusion and consistency proof size (hashes, bytes) and
    the time to read and build one from the tiles (p50/p99 over ``--proofs`` random leaves): O(log n);
  * ``fill_records_per_s``: the rate of the fast fill (the ceiling of this machine for the writer's work).

``--history-checkpoints N`` signs N checkpoints (chain and tree, at sizes spread over the log before the
audited one) as a running log accumulates them, one every few seconds: a log of 10 million records
filled at a national rate (10^8 a year) over 36 days holds about 300,000 of each kind at the default
interval of 10 s. An incremental audit must not pay for them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

from juki.accesslog import chain, notes
from juki.bench.accesslog import BenchEnvironment, _consistency, _inclusion, sample_records
from juki.bench.harness import emit, json_flag, percentile

GOAL_INCREMENTAL_SECONDS = 2.0
SCHEMA = "accesslog"
ORIGIN = "juki.local/accesslog"


def register_bench(bench_sub: Any) -> None:
    parser = bench_sub.add_parser("audit", help="incremental audit and proof cost on a large access log")
    parser.add_argument("--records", type=int, default=10_000_000, help="records in the log before the audit")
    parser.add_argument("--new", type=int, default=100_000, help="records appended since the last audit")
    parser.add_argument("--sizes", default="1000000,10000000",
                        help="comma-separated log sizes at which proofs are measured (those up to --records)")
    parser.add_argument("--proofs", type=int, default=200, help="proofs measured per size")
    parser.add_argument("--chunk", type=int, default=200_000, help="records per COPY transaction of the fill")
    parser.add_argument("--history-checkpoints", type=int, default=0,
                        help="signed checkpoints of each kind in the log's history before the audited one")
    json_flag(parser)
    parser.set_defaults(func=cmd_bench_audit)


def synthetic(first_sequence: int, count: int, key: bytes) -> Iterator[tuple[bytes, int, int, bytes]]:
    """Prepared records (subject, provided_at µs, outcome, payload) as the writer stores them: a thousand
    distinct residents and payloads, cycled."""
    pseudonymise = chain.Pseudonymiser(key)
    template = sample_records(1000, seed=7)
    subjects = [pseudonymise(record.resident_code) for record in template]
    for record in template:
        record.resident_code = ""
    payloads = [record.SerializeToString() for record in template]
    base_us = 1_700_000_000_000_000
    for sequence in range(first_sequence, first_sequence + count):
        k = sequence % 1000
        yield subjects[k], base_us + sequence * 1000, 1, payloads[k]


async def proof_figures(conn: Any, size: int, samples: int) -> dict[str, Any]:
    """Proofs at ``size``: from the tiles alone (as an audit computes them), and as the service serves
    them (level-0 tiles' middles, upper tiles kept across calls); the two must agree."""
    from juki.accesslog import tiles

    rng = random.Random(size)
    cache = tiles.TileCache()
    inclusion_ms: list[float] = []
    served_ms: list[float] = []
    consistency_ms: list[float] = []
    inclusion_hashes: list[int] = []
    consistency_hashes: list[int] = []
    mismatches = 0
    for _ in range(samples):
        index, old = rng.randrange(size), rng.randrange(1, size)
        started = time.perf_counter()
        proof = await tiles.compute(conn, functools.partial(_inclusion, index, size), SCHEMA)
        inclusion_ms.append((time.perf_counter() - started) * 1000)
        inclusion_hashes.append(len(proof))
        started = time.perf_counter()
        served = await tiles.compute(conn, functools.partial(_inclusion, index, size), SCHEMA, cache, middles=True)
        served_ms.append((time.perf_counter() - started) * 1000)
        mismatches += served != proof
        started = time.perf_counter()
        proof = await tiles.compute(conn, functools.partial(_consistency, old, size), SCHEMA)
        consistency_ms.append((time.perf_counter() - started) * 1000)
        consistency_hashes.append(len(proof))

    return {
        "leaves": size,
        "inclusion_proof_hashes_max": max(inclusion_hashes),
        "inclusion_proof_bytes_max": 32 * max(inclusion_hashes),
        "inclusion_proof_p50_ms": round(statistics.median(inclusion_ms), 3),
        "inclusion_proof_p99_ms": round(percentile(inclusion_ms, 0.99), 3),
        "served_inclusion_proof_p50_ms": round(statistics.median(served_ms), 3),
        "served_inclusion_proof_p99_ms": round(percentile(served_ms, 0.99), 3),
        "served_proofs_differing": mismatches,
        "consistency_proof_hashes_max": max(consistency_hashes),
        "consistency_proof_bytes_max": 32 * max(consistency_hashes),
        "consistency_proof_p50_ms": round(statistics.median(consistency_ms), 3),
        "consistency_proof_p99_ms": round(percentile(consistency_ms, 0.99), 3),
    }


async def sign_checkpoints(conn: Any, signer: chain.Signer, size: int, root: bytes, chain_hash: bytes) -> str:
    """What the service's checkpointer signs: the chain head and a C2SP note of the tree."""

    signed_at_ns = time.time_ns()
    await conn.execute(
        f'INSERT INTO "{SCHEMA}".checkpoints (sequence, chain_hash, signed_at_ns, signature, key_id, kind)'
        " VALUES ($1, $2, $3, $4, $5, 'periodic')",
        size, chain_hash, signed_at_ns, signer.sign(size, chain_hash, signed_at_ns), signer.key_id)
    note = signer.note_signer(ORIGIN).sign(notes.Checkpoint(ORIGIN, size, root).body())
    await conn.execute(
        f'INSERT INTO "{SCHEMA}".tree_checkpoints (tree_size, root_hash, signed_at_ns, note) VALUES ($1, $2, $3, $4)',
        size, root, signed_at_ns, note)
    return note


def _roots(sizes: list[int], node: Any) -> list[bytes]:
    from juki.accesslog import merkle

    return [merkle.root(n, node) for n in sizes]


async def sign_history(conn: Any, signer: chain.Signer, size: int, count: int, batch: int = 2_000) -> None:
    """``count`` signed checkpoints of each kind at sizes spread over 1..size - 1, with the stored log's
    chain hashes and the tree's roots at those sizes, in signing order, as a running log leaves them."""
    from juki.accesslog import tiles

    sizes = sorted({max(1, (size - 1) * (k + 1) // count) for k in range(count)})
    signed_at_ns = time.time_ns() - 10 * len(sizes) * 10**9
    note_signer = signer.note_signer(ORIGIN)
    for start in range(0, len(sizes), batch):
        part = sizes[start:start + batch]
        hashes = {int(r["sequence"]): bytes(r["chain_hash"]) for r in await conn.fetch(
            f'SELECT sequence, chain_hash FROM "{SCHEMA}".records WHERE sequence = ANY($1::bigint[])', part)}
        roots = await tiles.compute(conn, functools.partial(_roots, part), SCHEMA)
        chain_rows, tree_rows = [], []
        for n, root in zip(part, roots, strict=True):
            signed_at_ns += 10 * 10**9
            chain_rows.append((n, hashes[n], signed_at_ns, signer.sign(n, hashes[n], signed_at_ns), signer.key_id,
                               "periodic"))
            tree_rows.append((n, root, signed_at_ns, note_signer.sign(notes.Checkpoint(ORIGIN, n, root).body())))
        await conn.copy_records_to_table("checkpoints", schema_name=SCHEMA, records=chain_rows, columns=[
            "sequence", "chain_hash", "signed_at_ns", "signature", "key_id", "kind"])
        await conn.copy_records_to_table("tree_checkpoints", schema_name=SCHEMA, records=tree_rows,
                                         columns=["tree_size", "root_hash", "signed_at_ns", "note"])


async def run(env: BenchEnvironment, args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    from juki.accesslog import loader
    from juki.accesslog.verify import TreeState, verify_log
    from juki.accesslog.writer import micros_timestamps

    key = os.urandom(32)
    signer = chain.Signer(env.ca.paths("signing", "accesslog")[1])
    verifier = chain.CheckpointVerifier(env.ca.paths("signing", "accesslog")[0], env.ca.ca_cert_path)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip() and 0 < int(s) <= args.records}
                   | {args.records})
    figures: dict[str, Any] = {"bench": "audit", "cpus": os.cpu_count(), "log_records": args.records,
                               "new_records": args.new, "goal_incremental_seconds": GOAL_INCREMENTAL_SECONDS}
    filler = await asyncpg.connect(env.pg.admin_url)
    plain = await asyncpg.connect(env.pg.admin_url)
    try:
        await micros_timestamps(filler)
        now_us = time.time_ns() // 1000
        done = 0
        fill_seconds = 0.0
        proofs: list[dict[str, Any]] = []
        loaded: loader.Loaded | None = None
        for size in sizes:
            started = time.perf_counter()
            loaded = await loader.load(filler, SCHEMA, synthetic(done + 1, size - done, key), now_us, chunk=args.chunk)
            fill_seconds += time.perf_counter() - started
            done = size
            proofs.append(await proof_figures(plain, size, args.proofs))
        assert loaded is not None
        figures["fill_seconds"] = round(fill_seconds, 1)
        figures["fill_records_per_s"] = round(args.records / fill_seconds) if fill_seconds else 0
        figures["proofs"] = proofs
        # A checkpoint at the log's size, verified before (its tree state is what an auditor keeps), then
        # the new records and the checkpoint over them.
        old_root = loaded.frontier.root()
        if args.history_checkpoints:
            started = time.perf_counter()
            await sign_history(plain, signer, loaded.sequence, args.history_checkpoints)
            figures["history_checkpoints"] = args.history_checkpoints
            figures["history_sign_seconds"] = round(time.perf_counter() - started, 1)
        await sign_checkpoints(plain, signer, loaded.sequence, old_root, loaded.chain_hash)
        state = TreeState(loaded.sequence, old_root, tuple(loaded.frontier.hashes), loaded.chain_hash)
        newer = await loader.load(filler, SCHEMA, synthetic(done + 1, args.new, key), now_us, chunk=args.chunk)
        await sign_checkpoints(plain, signer, newer.sequence, newer.frontier.root(), newer.chain_hash)
        await plain.execute(f'ANALYZE "{SCHEMA}".records')
        started = time.perf_counter()
        result = await verify_log(plain, verifier, schema=SCHEMA, resume=state, origin=ORIGIN)
        incremental = time.perf_counter() - started
    finally:
        await filler.close()
        await plain.close()
    tree = result.tree
    figures.update({
        "incremental_ok": result.ok, "problem": result.problem,
        "incremental_seconds": round(incremental, 3),
        "incremental_records_hashed": tree.records_hashed if tree is not None else 0,
        "incremental_records_per_s": round(tree.records_hashed / incremental) if tree is not None and incremental else 0,
        "consistency_proof_checked": bool(tree is not None and tree.consistency_checked),
        "incremental_within_goal": incremental <= GOAL_INCREMENTAL_SECONDS,
    })
    return figures


async def cmd_bench_audit(args: argparse.Namespace) -> int:
    if args.records < 1 or args.new < 1:
        print(json.dumps({"error": "--records and --new must be positive"}))
        return 2
    env = BenchEnvironment("audit")
    try:
        await env.migrate()
        figures = await run(env, args)
    finally:
        await asyncio.to_thread(env.close)
    emit(figures)
    return 0 if figures["incremental_ok"] else 1
