"""``juki bench disclose``: the disclosure query on a big access log, in a throwaway embedded PostgreSQL.

The log is filled with ``--records`` (default 10 million) chained records about a population of
``--population`` residents (default 1 million; a tenth of them pensioners, checked far more often),
spread over seven years in sequence order, written as the writer writes them: the chain, the Merkle
leaves and the tree's tiles, one COPY per chunk (``juki.accesslog.loader``; the subject index is built
after the load, as a restore would). A signed checkpoint (chain and C2SP tree note) covers the whole log.
Then the real access-log service answers ListProvisions as the disclosure service asks it for a resident's
page — over mutual TLS, with ``proof_tree_size`` set to the signed size, so that every provision comes
with its leaf and its inclusion proof — for random residents: half without filter, half limited to the
last year. Each answer's proofs are then checked against the signed root (outside the timed call), as
``juki proof verify`` checks them. Prints one JSON object: p50_ms, p99_ms, log_records, proofs,
proofs_verified, runs, and the same query's bare SQL figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki.bench.harness import emit, json_flag, percentile
from juki.domain import resident_code_from_body

if TYPE_CHECKING:
    from juki.accesslog.loader import Loaded
    from juki.accesslog.writer import PreparedRecord

YEAR_US = 365 * 86_400 * 1_000_000
GOAL_P99_MS = 10  # each answer with its inclusion proofs, on a log of 10 million records or more


def register_bench(bench_sub: Any) -> None:
    parser = bench_sub.add_parser("disclose", help="disclosure query latency on a big access log (p50/p99 ms)")
    parser.add_argument("--records", type=int, default=10_000_000, help="records in the log (default 10 million)")
    parser.add_argument("--population", type=int, default=1_000_000, help="residents the records are about")
    parser.add_argument("--runs", type=int, default=2_000, help="disclosure queries to time")
    parser.add_argument("--page-size", type=int, default=50, help="provisions per disclosure page")
    parser.add_argument("--chunk", type=int, default=100_000, help="records per COPY (one transaction each)")
    parser.add_argument("--group", type=int, default=0,
                        help="store the tree's tiles as group commits of this many records would (the service"
                             " under light load writes a few records per commit); default: one fragment per tile"
                             " per chunk")
    parser.add_argument("--seed", type=int, default=20020805)
    parser.add_argument("--verify", action="store_true", help="also verify the whole chain and checkpoint afterwards")
    json_flag(parser)
    parser.set_defaults(func=cmd_bench_disclose)


def _templates() -> list[bytes]:
    """Serialised records without resident code and time, one per kind of provision."""
    shapes = [
        ("spiffe://juki.local/agency/jps", "日本年金機構", "B1-PENSION-BENEFIT",
         "厚生年金保険法による保険給付の支給に関する事務", common_pb2.QUERY_MODE_BATCH_VERIFY, "年金受給者の現況確認"),
        ("spiffe://juki.local/agency/jps", "日本年金機構", "B1-NATIONAL-PENSION",
         "国民年金法による年金である給付若しくは一時金の支給又は保険料の納付に関する事務",
         common_pb2.QUERY_MODE_BY_CODE, "住所変更の確認"),
        ("spiffe://juki.local/agency/mofa", "外務省", "B1-PASSPORT", "旅券の発給に関する事務",
         common_pb2.QUERY_MODE_BY_FOUR_ITEMS, "旅券発給申請の本人確認"),
        ("spiffe://juki.local/municipality/141003", "横浜市", "B4-WIDE-AREA-COPY", "住民票の写しの広域交付",
         common_pb2.QUERY_MODE_WIDE_AREA_COPY, "住民票の写しの広域交付"),
    ]
    out = []
    for recipient, name, purpose, purpose_name, mode, reason in shapes:
        out.append(accesslog_pb2.ProvisionRecord(
            recipient=recipient, recipient_name=name, purpose=purpose, purpose_name=purpose_name, query_mode=mode,
            provider_tier=common_pb2.TIER_NATIONAL, provider="spiffe://juki.local/service/lookup",
            fields=[common_pb2.FIELD_NAME, common_pb2.FIELD_BIRTH_DATE, common_pb2.FIELD_ADDRESS],
            outcome=accesslog_pb2.PROVISION_OUTCOME_PROVIDED, reason=reason,
        ).SerializeToString(deterministic=True))
    return out


def _records(args: argparse.Namespace, subjects: list[bytes], start_us: int, step: int) -> Iterator[PreparedRecord]:
    """The log's records as the writer prepares them: (subject, provided_at µs, outcome, payload)."""
    from google.protobuf import timestamp_pb2

    rng = random.Random(args.seed)
    templates = _templates()
    pensioners = max(1, len(subjects) // 10)
    stamp = timestamp_pb2.Timestamp()
    for sequence in range(1, args.records + 1):
        who = rng.randrange(pensioners) if rng.random() < 0.4 else rng.randrange(len(subjects))
        provided_us = start_us + sequence * step
        stamp.seconds, stamp.nanos = divmod(provided_us, 1_000_000)
        stamp.nanos *= 1000
        payload = templates[who % 4 if who >= pensioners else 0] + b"\x0a" + bytes(
            [stamp.ByteSize()]) + stamp.SerializeToString()
        yield subjects[who], provided_us, 1, payload


async def fill(env: Any, args: argparse.Namespace, subjects: list[bytes]) -> tuple[Loaded, float]:
    """Load ``args.records`` records with the tree's tiles; return the log's head and the seconds taken."""
    import asyncpg

    from juki.accesslog import loader
    from juki.accesslog.writer import micros_timestamps
    from juki.extras import need

    need("rich", "cli", "juki bench disclose")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    now_us = time.time_ns() // 1000
    start_us = now_us - 7 * YEAR_US
    step = max(1, (now_us - start_us) // max(args.records, 1))
    conn = await asyncpg.connect(env.pg.admin_url)
    await micros_timestamps(conn)
    started = time.perf_counter()
    try:
        await conn.execute("DROP INDEX accesslog.records_subject")
        with Progress(TextColumn("filling the access log"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as progress:
            task = progress.add_task("fill", total=args.records)

            def counted() -> Iterator[PreparedRecord]:
                for n, record in enumerate(_records(args, subjects, start_us, step), 1):
                    if n % 10_000 == 0:
                        progress.update(task, completed=n)
                    yield record

            # Recorded when provided, so that the records spread over the log's monthly partitions.
            loaded = await loader.load(conn, "accesslog", counted(), lambda sequence: start_us + sequence * step,
                                       chunk=args.chunk, group=args.group)
        await conn.execute("CREATE INDEX records_subject ON accesslog.records (subject, provided_at, sequence)")
        await conn.execute("ANALYZE accesslog.records")
        await conn.execute("ANALYZE accesslog.tiles")
    finally:
        await conn.close()
    return loaded, time.perf_counter() - started


async def measure(env: Any, args: argparse.Namespace, codes: list[str], pseudonym_key: bytes,
                  tree_size: int, root: bytes) -> dict[str, Any]:
    from juki.accesslog import chain, merkle
    from juki.accesslog.app import create
    from juki.mesh.server import start_server
    from juki.mesh.settings import TlsFiles
    from juki.mesh.tls import secure_channel

    env.ca.issue("service", "disclosure")
    settings = env.settings()
    app = create(settings)
    bindings = await app.start()
    server = await start_server(settings, bindings)
    cert, key = env.ca.paths("service", "disclosure")
    channel = secure_channel(server.address, TlsFiles(ca=env.ca.ca_cert_path, cert=cert, key=key))
    stub = accesslog_pb2_grpc.AccessLogServiceStub(channel)
    rng = random.Random(args.seed + 1)
    year_ago = time.gmtime(time.time() - 365 * 86_400)
    from_date = common_pb2.Date(year=year_ago.tm_year, month=year_ago.tm_mon, day=year_ago.tm_mday)
    grpc_ms: list[float] = []
    sql_ms: list[float] = []
    returned = verified = 0
    page_sizes: list[int] = []
    failed: list[str] = []
    proof_hashes: list[int] = []
    try:
        for warm in range(20):
            await stub.ListProvisions(accesslog_pb2.ListProvisionsRequest(resident_code=codes[warm],
                                                                          proof_tree_size=tree_size))
        assert app.pool is not None
        for run in range(args.runs):
            code = codes[rng.randrange(len(codes))]
            request = accesslog_pb2.ListProvisionsRequest(resident_code=code, page_size=args.page_size,
                                                          proof_tree_size=tree_size)
            if run % 2:
                request.from_date.CopyFrom(from_date)
            started = time.perf_counter()
            reply = await stub.ListProvisions(request, timeout=30)
            grpc_ms.append((time.perf_counter() - started) * 1000)
            returned += len(reply.provisions)
            page_sizes.append(len(reply.provisions))
            # What the resident's verifier does with each provision (not timed: it runs on their side).
            for logged in reply.provisions:
                proof_hashes.append(len(logged.inclusion_proof))
                if logged.proof_tree_size == tree_size and merkle.verify_inclusion(
                        merkle.leaf_hash(logged.leaf), logged.sequence - 1, tree_size, logged.inclusion_proof, root):
                    verified += 1
                elif len(failed) < 5:
                    failed.append(f"record {logged.sequence} of {code}: its inclusion proof does not verify")
            subject = chain.pseudonym(pseudonym_key, code)
            async with app.pool.acquire() as conn:
                started = time.perf_counter()
                await conn.fetch(
                    "SELECT sequence, provided_at, recorded_at, payload FROM records WHERE subject = $1"
                    " AND outcome = 1 ORDER BY provided_at DESC, sequence DESC LIMIT $2", subject, args.page_size + 1)
                sql_ms.append((time.perf_counter() - started) * 1000)
    finally:
        await channel.close()
        await server.stop(1)
        await app.stop()
    return {
        "p50_ms": round(statistics.median(grpc_ms), 3),
        "p99_ms": round(percentile(grpc_ms, 0.99), 3),
        "max_ms": round(max(grpc_ms), 3),
        "sql_p50_ms": round(statistics.median(sql_ms), 3),
        "sql_p99_ms": round(percentile(sql_ms, 0.99), 3),
        "provisions_returned_per_run": round(returned / max(args.runs, 1), 1),
        "proofs": True, "proof_tree_size": tree_size,
        "proofs_verified": verified, "proofs_failed": returned - verified, "proof_failures": failed,
        "inclusion_proof_hashes_max": max(proof_hashes, default=0),
        # The tail is the residents with many provisions (pensioners): one proof, and one level-0 tile
        # to hash, per provision shown.
        "provisions_in_slowest_1pct": _slowest(grpc_ms, page_sizes),
        "p99_ms_pages_of_10_or_fewer": round(percentile([ms for ms, n in zip(grpc_ms, page_sizes, strict=True)
                                                         if n <= 10] or [0.0], 0.99), 3),
    }


def _slowest(times: list[float], counts: list[int]) -> dict[str, float]:
    """Provisions per answer among the slowest 1 % of answers, and among all."""
    ranked = sorted(zip(times, counts, strict=True), reverse=True)[:max(1, len(times) // 100)]
    return {"median": statistics.median(n for _, n in ranked), "all_median": statistics.median(counts or [0])}


async def cmd_bench_disclose(args: argparse.Namespace) -> int:
    from juki.accesslog import chain
    from juki.bench.accesslog import BenchEnvironment
    from juki.bench.audit import sign_checkpoints

    env = BenchEnvironment("disclose")
    try:
        await env.migrate()
        pseudonym_key = bytes.fromhex(env.pseudonym_file.read_text().strip())
        rng = random.Random(args.seed)
        bodies = rng.sample(range(1_000_000_000, 10_000_000_000), args.population)
        codes = [resident_code_from_body(body) for body in bodies]
        pseudonymise = chain.Pseudonymiser(pseudonym_key)
        subjects = [pseudonymise(code) for code in codes]
        loaded, fill_seconds = await fill(env, args, subjects)
        head, root = loaded.sequence, loaded.frontier.root()
        # Sign the checkpoints over the filled log, as the service's checkpointer would have.
        import asyncpg

        signer = chain.Signer(env.ca.paths("signing", "accesslog")[1])
        conn = await asyncpg.connect(env.pg.admin_url)
        try:
            await sign_checkpoints(conn, signer, head, root, loaded.chain_hash)
            size = await conn.fetchval(  # the monthly partitions (the partitioned parent holds nothing)
                "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::bigint FROM pg_inherits"
                " WHERE inhparent = 'accesslog.records'::regclass")
            tiles_size = await conn.fetchval("SELECT pg_total_relation_size('accesslog.tiles')")
            middles_size = await conn.fetchval("SELECT pg_total_relation_size('accesslog.tile_middles')")
            tile_rows = await conn.fetchval("SELECT count(*) FROM accesslog.tiles")
        finally:
            await conn.close()
        figures: dict[str, Any] = {
            "bench": "disclose", "log_records": head, "population": args.population, "runs": args.runs,
            "page_size": args.page_size, "fill_seconds": round(fill_seconds, 1),
            "fill_records_per_s": round(head / fill_seconds) if fill_seconds else 0,
            "table_bytes": size, "tiles_bytes": tiles_size,
            "middles_bytes": middles_size, "tile_rows": tile_rows, "fill_group_records": args.group or None,
            "goal_p99_ms": GOAL_P99_MS,
        }
        figures.update(await measure(env, args, codes, pseudonym_key, head, root))
        figures["within_goal"] = figures["p99_ms"] <= GOAL_P99_MS and figures["proofs_failed"] == 0
        if args.verify:
            from juki.accesslog.verify import verify_log

            verifier = chain.CheckpointVerifier(env.ca.paths("signing", "accesslog")[0], env.ca.ca_cert_path)
            conn = await asyncpg.connect(env.pg.admin_url)
            try:
                started = time.perf_counter()
                result = await verify_log(conn, verifier, schema="accesslog")
                figures.update({"verified_ok": result.ok, "verified_records": result.records_checked,
                                "verify_seconds": round(time.perf_counter() - started, 1)})
            finally:
                await conn.close()
    finally:
        env.close()
    emit(figures)
    return 0 if figures["proofs_failed"] == 0 and figures.get("verified_ok", True) else 1
