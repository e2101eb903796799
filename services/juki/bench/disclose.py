"""``juki bench disclose``: the disclosure query on a big access log, in a throwaway embedded PostgreSQL.

The log is filled with ``--records`` (default 10 million) chained records about a population of
``--population`` residents (default 1 million; a tenth of them pensioners, checked far more often),
spread over seven years in sequence order, COPYed straight into the table (indexes built after the
load, as a restore would). Then the real access-log service answers ListProvisions — the query behind
every GetDisclosure page — over mutual TLS, as the disclosure service asks it, for random residents:
half without filter, half limited to the last year. Prints one JSON object: p50_ms, p99_ms,
log_records, runs, and the same figures for the bare SQL.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki.bench.harness import emit, json_flag, percentile
from juki.domain import resident_code_from_body

YEAR_US = 365 * 86_400 * 1_000_000


def register_bench(bench_sub: Any) -> None:
    parser = bench_sub.add_parser("disclose", help="disclosure query latency on a big access log (p50/p99 ms)")
    parser.add_argument("--records", type=int, default=10_000_000, help="records in the log (default 10 million)")
    parser.add_argument("--population", type=int, default=1_000_000, help="residents the records are about")
    parser.add_argument("--runs", type=int, default=2_000, help="disclosure queries to time")
    parser.add_argument("--page-size", type=int, default=50, help="provisions per disclosure page")
    parser.add_argument("--chunk", type=int, default=250_000, help="records per COPY")
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


async def fill(env: Any, args: argparse.Namespace, codes: list[str], subjects: list[bytes]) -> tuple[int, bytes, float]:
    """COPY ``args.records`` chained records; return the head (sequence, hash) and the seconds taken."""
    import asyncpg
    from google.protobuf import timestamp_pb2

    from juki.accesslog import chain
    from juki.accesslog.writer import RECORD_COLUMNS, micros_timestamps
    from juki.extras import need

    need("rich", "cli", "juki bench disclose")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rng = random.Random(args.seed)
    templates = _templates()
    now_us = time.time_ns() // 1000
    start_us = now_us - 7 * YEAR_US
    step = max(1, (now_us - start_us) // max(args.records, 1))
    pensioners = max(1, len(codes) // 10)
    conn = await asyncpg.connect(env.pg.admin_url)
    await micros_timestamps(conn)
    started = time.perf_counter()
    try:
        await conn.execute("DROP INDEX accesslog.records_subject")
        await conn.execute("ALTER TABLE accesslog.records DROP CONSTRAINT records_pkey")
        sequence, previous = 0, chain.GENESIS
        canonical, next_hash = chain.canonical_bytes, chain.next_hash
        stamp = timestamp_pb2.Timestamp()
        with Progress(TextColumn("filling the access log"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True) as progress:
            task = progress.add_task("fill", total=args.records)
            while sequence < args.records:
                rows = []
                for _ in range(min(args.chunk, args.records - sequence)):
                    sequence += 1
                    who = rng.randrange(pensioners) if rng.random() < 0.4 else rng.randrange(len(codes))
                    provided_us = start_us + sequence * step
                    stamp.seconds, stamp.nanos = divmod(provided_us, 1_000_000)
                    stamp.nanos *= 1000
                    payload = templates[who % 4 if who >= pensioners else 0] + b"\x0a" + bytes(
                        [stamp.ByteSize()]) + stamp.SerializeToString()
                    subject = subjects[who]
                    previous = next_hash(previous, canonical(sequence, provided_us, provided_us, 1, subject, payload))
                    rows.append((sequence, subject, provided_us, provided_us, 1, payload, previous))
                await conn.copy_records_to_table("records", records=rows, columns=RECORD_COLUMNS,
                                                 schema_name="accesslog")
                progress.update(task, completed=sequence)
        await conn.execute("ALTER TABLE accesslog.records ADD PRIMARY KEY (sequence, recorded_at)")  # partitioned by month
        await conn.execute("CREATE INDEX records_subject ON accesslog.records (subject, provided_at, sequence)")
        await conn.execute("ANALYZE accesslog.records")
    finally:
        await conn.close()
    return sequence, previous, time.perf_counter() - started


async def measure(env: Any, args: argparse.Namespace, codes: list[str], pseudonym_key: bytes) -> dict[str, Any]:
    from juki.accesslog import chain
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
    returned = 0
    try:
        for warm in range(20):
            await stub.ListProvisions(accesslog_pb2.ListProvisionsRequest(resident_code=codes[warm]))
        assert app.pool is not None
        for run in range(args.runs):
            code = codes[rng.randrange(len(codes))]
            request = accesslog_pb2.ListProvisionsRequest(resident_code=code, page_size=args.page_size)
            if run % 2:
                request.from_date.CopyFrom(from_date)
            started = time.perf_counter()
            reply = await stub.ListProvisions(request, timeout=30)
            grpc_ms.append((time.perf_counter() - started) * 1000)
            returned += len(reply.provisions)
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
    }


async def cmd_bench_disclose(args: argparse.Namespace) -> int:
    from juki.accesslog import chain
    from juki.bench.accesslog import BenchEnvironment

    env = BenchEnvironment("disclose")
    try:
        await env.migrate()
        pseudonym_key = bytes.fromhex(env.pseudonym_file.read_text().strip())
        rng = random.Random(args.seed)
        bodies = rng.sample(range(1_000_000_000, 10_000_000_000), args.population)
        codes = [resident_code_from_body(body) for body in bodies]
        pseudonymise = chain.Pseudonymiser(pseudonym_key)
        subjects = [pseudonymise(code) for code in codes]
        head, head_hash, fill_seconds = await fill(env, args, codes, subjects)
        # Sign a checkpoint over the filled log, as the service would have.
        import asyncpg

        signer = chain.Signer(env.ca.paths("signing", "accesslog")[1])
        conn = await asyncpg.connect(env.pg.admin_url)
        try:
            signed_ns = time.time_ns()
            await conn.execute(
                "INSERT INTO accesslog.checkpoints (sequence, chain_hash, signed_at_ns, signature, key_id, kind)"
                " VALUES ($1, $2, $3, $4, $5, 'periodic')",
                head, head_hash, signed_ns, signer.sign(head, head_hash, signed_ns), signer.key_id)
            size = await conn.fetchval("SELECT pg_total_relation_size('accesslog.records')")
        finally:
            await conn.close()
        figures: dict[str, Any] = {
            "bench": "disclose", "log_records": head, "population": args.population, "runs": args.runs,
            "page_size": args.page_size, "fill_seconds": round(fill_seconds, 1),
            "fill_records_per_s": round(head / fill_seconds) if fill_seconds else 0,
            "table_bytes": size, "goal_p99_ms": 50,
        }
        figures.update(await measure(env, args, codes, pseudonym_key))
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
    return 0
