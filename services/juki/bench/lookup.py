"""``juki bench lookup`` and ``juki bench verify``: the lookup service against a synthetic national store.

Each run builds a throwaway environment in a temporary directory: an embedded PostgreSQL with the
access-log, national-store and lookup schemas, N synthetic residents (valid check digits, generated
inside PostgreSQL), a CA, and three server processes — the real access-log service, the real lookup
service (each ``python -m juki serve ...``, as ``juki up`` starts them) and a bare mTLS ``grpc.aio``
echo server. The client runs in this process, so client and servers do not share one GIL.

``lookup``: unary LookupByCode calls by the pension service (日本年金機構) over mTLS, with authorisation,
tracing at its default configuration and every provision durable in the access log before the answer,
``--concurrency`` calls in flight. The ceiling is the same client making the same calls, with the same
message sizes, to the echo server. ``verify``: a pension file of ``--codes`` codes through one
VerifyBatch stream, every item logged; the ceiling is the same stream shape answered by the echo
server with no work behind it. Runs alternate ceiling and service; figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki.bench.harness import CpuMeter, Harness, emit, json_flag, percentile, serve_echo
from juki.domain.codes import resident_code_from_body
from juki.mesh import wire

PENSION = "B1-PENSION-BENEFIT"
ECHO_UNARY = "/juki.bench.v1.Echo/LookupByCode"
ECHO_VERIFY = "/juki.bench.v1.Echo/VerifyBatch"
BODY_BASE = 1_000_000_000
BODY_STEP = 7  # resident i has code body BODY_BASE + i * BODY_STEP: unique, valid, cheap to recompute
_WEIGHTS = (2, 3, 4, 5, 6, 7, 2, 3, 4, 5)


def register_bench(bench_sub: Any) -> None:
    lookup = bench_sub.add_parser("lookup", help="unary lookups by code vs the bare mTLS echo ceiling")
    _common(lookup)
    lookup.add_argument("--concurrency", type=int, default=8, help="calls in flight (default 8)")
    lookup.add_argument("--seconds", type=float, default=5.0, help="length of each measured run (default 5)")
    lookup.set_defaults(func=cmd_bench_lookup)

    verify = bench_sub.add_parser("verify", help="batch verification of a pension file vs the same stream shape")
    _common(verify)
    verify.add_argument("--codes", type=int, default=1_000_000, help="codes in the pension file (default 1,000,000)")
    verify.add_argument("--batch", type=int, default=10_000, help="items per VerifyBatch message (default 10,000)")
    verify.add_argument("--processes", type=int, default=1,
                        help="lookup processes (each with its own echo twin); the file is split between them")
    verify.set_defaults(func=cmd_bench_verify)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--residents", type=int, default=1_000_000, help="residents in the store (default 1,000,000)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each side (default 3)")
    json_flag(parser)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, profiles)")
    parser.add_argument("--profile", type=Path,
                        help="record each server with py-spy (must be installed) into this folder (raw stacks)")


# -- the environment -------------------------------------------------------------------------------------

def _check_digit_sql(body: str) -> str:
    total = " + ".join(f"(({body} / {10 ** k}) % 10) * {w}" for k, w in enumerate(_WEIGHTS))
    return f"(CASE WHEN ({total}) % 11 <= 1 THEN 0 ELSE 11 - ({total}) % 11 END)"


_FAMILY = ("山田", "佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "中村", "小林", "加藤")
_GIVEN = ("太郎", "花子", "一郎", "陽子", "健", "美咲", "翔", "由美", "大輔", "恵")


def code_sql(index: str) -> str:
    """SQL computing :func:`resident_code` of the integer expression ``index`` (check digit included)."""
    body = f"({BODY_BASE}::bigint + ({index})::bigint * {BODY_STEP})"
    return f"{body}::text || {_check_digit_sql(body)}::text"


def load_sql(first: int, last: int) -> str:
    """One INSERT ... SELECT generating residents ``first``..``last`` (folded) inside PostgreSQL."""
    families = "(ARRAY[" + ",".join(f"'{n}'" for n in _FAMILY) + "])"
    givens = "(ARRAY[" + ",".join(f"'{n}'" for n in _GIVEN) + "])"
    return f"""
    INSERT INTO intake_national.residents (resident_code, resident_kind, family_name, given_name,
        family_name_kana, given_name_kana, birth_year, birth_month, birth_day, sex, municipality_code,
        prefecture, municipality, street, status, last_change_kind, last_changed_on, last_notified_on,
        death_date, version, name_key, address_key)
    SELECT {code_sql("i")}, 1,
        {families}[1 + i % 10], {givens}[1 + (i / 10) % 10], 'ヤマダ', 'タロウ',
        1930 + i % 70, 1 + i % 12, 1 + i % 28, 1 + i % 2,
        CASE WHEN i % 2 = 0 THEN '131148' ELSE '141003' END,
        CASE WHEN i % 2 = 0 THEN '東京都' ELSE '神奈川県' END,
        CASE WHEN i % 2 = 0 THEN '中野区' ELSE '横浜市' END,
        '中央' || (1 + i % 9) || '丁目' || (1 + i % 30) || '番' || (1 + i % 20) || '号',
        CASE WHEN i % 50 = 0 THEN 2 ELSE 1 END,
        CASE WHEN i % 50 = 0 THEN 6 WHEN i % 7 = 0 THEN 1 ELSE 3 END,
        DATE '2003-09-16', DATE '2003-09-17',
        CASE WHEN i % 50 = 0 THEN DATE '2024-01-15' END, 1,
        {families}[1 + i % 10] || {givens}[1 + (i / 10) % 10], ''
    FROM generate_series({first}, {last}) AS i
    """


def resident_code(index: int) -> str:
    return resident_code_from_body(BODY_BASE + index * BODY_STEP)


class Environment(Harness):
    """The harness with the loaded store and the three kinds of server process: the access log, the
    lookup service(s) and, beside each lookup process, its echo twin (the ceiling)."""

    def __init__(self, residents: int, keep: bool = False, profile: Path | None = None, processes: int = 1) -> None:
        super().__init__("lookup", keep=keep, profile=profile)
        self.residents = residents
        self.lookup_processes = processes
        self.addresses: dict[str, str] = {}
        self.load_seconds = 0.0

    async def start(self) -> None:
        await self.prepare([("accesslog", "accesslog"), ("intake", "intake-national"), ("lookup", "lookup")])
        await self._load()
        self.addresses["accesslog"] = self._spawn("accesslog", ["serve", "accesslog"], ("service", "accesslog"))
        for index in range(self.lookup_processes):
            suffix = f"-{index}" if index else ""
            self.addresses["lookup" + suffix] = self._spawn(
                "lookup" + suffix, ["serve", "lookup"], ("service", "lookup"), role="juki_lookup")
            self.addresses["echo" + suffix] = self._spawn("echo" + suffix, [], ("service", "lookup"), echo=True)

    async def _load(self) -> None:
        import asyncpg

        started = time.perf_counter()
        conn = await asyncpg.connect(self.pg.admin_url)
        try:
            await conn.execute("SET synchronous_commit = off")
            await conn.execute(
                "INSERT INTO intake_national.municipalities (municipality_code) VALUES ('131148'), ('141003')"
            )
            step = 1_000_000
            for start in range(0, self.residents, step):
                chunk = min(step, self.residents - start)
                await conn.execute(load_sql(start, start + chunk - 1))
            await conn.execute("ANALYZE intake_national.residents")
        finally:
            await conn.close()
        self.load_seconds = time.perf_counter() - started

    def _env(self, name: str, identity: tuple[str, str], role: str | None = None) -> dict[str, str]:
        # A mesh's own settings must not leak in; lookup tuning (JUKI_LOOKUP_*) may, for experiments.
        return self.server_env(
            name, identity, keep_prefixes=("JUKI_LOOKUP_",),
            JUKI_DATABASE_URL=self.pg.url(role or "juki_" + name),
            JUKI_ACCESSLOG_ADDRESS=self.addresses.get("accesslog", ""),
            JUKI_ACCESSLOG_SIGNING_KEY_FILE=str(self.ca.paths("signing", "accesslog")[1]),
            JUKI_ACCESSLOG_SIGNING_CERT_FILE=str(self.ca.paths("signing", "accesslog")[0]),
            JUKI_PSEUDONYM_KEY_FILE=str(self.pseudonym_file),
            # The 別表 quota of the pension service (2,000/s) would cap the figure being measured.
            JUKI_LOOKUP_QUOTA_MULTIPLIER=os.environ.get("JUKI_LOOKUP_QUOTA_MULTIPLIER", "1000"),
        )

    def _spawn(
        self, name: str, args: list[str], identity: tuple[str, str], echo: bool = False, role: str | None = None
    ) -> str:
        env = self._env(name, identity, role)
        if echo:
            return self.spawn_echo(name, "juki.bench.lookup", env)
        return self.spawn_service(name, args[1:], env)


# -- the echo server (a child process) --------------------------------------------------------------------

def _canned_record() -> common_pb2.IdentityRecord:
    record = common_pb2.IdentityRecord(
        resident_code=resident_code(1), resident_kind=common_pb2.RESIDENT_KIND_JAPANESE,
        name=common_pb2.PersonName(family_name="佐藤", given_name="花子", family_name_kana="ヤマダ",
                                   given_name_kana="タロウ"),
        birth_date=common_pb2.Date(year=1931, month=2, day=2, precision=common_pb2.DATE_PRECISION_FULL),
        sex=common_pb2.SEX_FEMALE,
        address=common_pb2.Address(municipality_code="141003", prefecture="神奈川県", municipality="横浜市",
                                   street="中央2丁目2番2号"),
        status=common_pb2.RESIDENT_STATUS_CURRENT, last_change_kind=common_pb2.CHANGE_KIND_BIRTH,
        last_changed_on=common_pb2.Date(year=2003, month=9, day=16, precision=common_pb2.DATE_PRECISION_FULL),
        last_notified_on=common_pb2.Date(year=2003, month=9, day=17, precision=common_pb2.DATE_PRECISION_FULL),
        version=1,
    )
    record.as_of.GetCurrentTime()
    return record


def echo_handlers() -> Any:
    """The echo server's handlers (see :func:`juki.bench.harness.serve_echo`): lookup-shaped answers, no work."""
    record = _canned_record()
    unary_answer = lookup_pb2.LookupByCodeResponse(
        record=record, provided_fields=list(common_pb2.Field.values())[1:]).SerializeToString()
    record_bytes = record.SerializeToString()
    # A VerifyResult minus its item_id: status CURRENT and the record, as lookup writes it (mesh.wire).
    result_tags = wire.tags(lookup_pb2.VerifyResult)
    result_tail = (wire.number(result_tags["status"], lookup_pb2.VERIFY_STATUS_CURRENT)
                   + wire.length_delimited(result_tags["record"], record_bytes))
    results_tag = wire.field_tag(lookup_pb2.VerifyBatchResponse, "results")

    async def unary(request: bytes, context: Any) -> bytes:
        return unary_answer

    async def verify(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for raw in requests:
            request = lookup_pb2.VerifyBatchRequest.FromString(raw)
            parts = []
            for item in request.items:
                result = result_tags["item_id"] + wire.varint(item.item_id) + result_tail
                parts.append(wire.length_delimited(results_tag, result))
            yield b"".join(parts)

    def same(value: bytes) -> bytes:
        return value

    handler = grpc.method_handlers_generic_handler("juki.bench.v1.Echo", {
        "LookupByCode": grpc.unary_unary_rpc_method_handler(unary, same, same),
        "VerifyBatch": grpc.stream_stream_rpc_method_handler(verify, same, same),
    })
    return lambda server: server.add_generic_rpc_handlers((handler,))


# -- measuring -----------------------------------------------------------------------------------------

async def _closed_loop(call: Any, requests: list[Any], concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """``concurrency`` workers calling back to back for ``seconds``; (calls/s, latencies in ms)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    count = len(requests)

    async def worker(offset: int) -> None:
        index = offset
        clock = time.perf_counter
        while clock() < deadline:
            started = clock()
            await call(requests[index % count])
            latencies.append((clock() - started) * 1000)
            index += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


def _lookup_requests(residents: int, count: int = 20_000) -> list[lookup_pb2.LookupByCodeRequest]:
    rng = random.Random(4)
    return [lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=resident_code(rng.randrange(residents)))
            for _ in range(count)]


async def measure_visibility(env: Environment, call: Any, samples: int = 200) -> dict[str, float]:
    """How long after the national store commits a change a lookup returns it (ms, from the commit).

    A change is written as the national intake applies one (new version of the resident, a row in the
    change feed) in one transaction; the intake acknowledges a notification only after that commit,
    so this bounds "acknowledged -> visible". Lookup reads the store itself (no cache), so the figure is
    one lookup's latency, measured while nothing else runs.
    """
    import asyncpg

    conn = await asyncpg.connect(env.pg.admin_url)
    delays: list[float] = []
    rng = random.Random(6)
    try:
        for sample in range(samples):
            code = resident_code(rng.randrange(env.residents))
            async with conn.transaction():
                version = await conn.fetchval(
                    "UPDATE intake_national.residents SET street = $2, version = version + 1, last_change_kind = 8"
                    " WHERE resident_code = $1 RETURNING version", code, f"本町{sample}丁目1番1号",
                )
                await conn.execute(
                    "INSERT INTO intake_national.resident_changes (resident_code, change_kind, occurred_on)"
                    " VALUES ($1, 8, CURRENT_DATE)", code,
                )
            committed = time.perf_counter()
            while True:
                answer = await call(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
                if answer.record.version >= version:
                    break
            delays.append((time.perf_counter() - committed) * 1000)
    finally:
        await conn.close()
    return {"visibility_p50_ms": round(percentile(delays, 0.5), 3),
            "visibility_p99_ms": round(percentile(delays, 0.99), 3), "visibility_samples": samples}


async def bench_lookup(env: Environment, concurrency: int, seconds: float, runs: int) -> dict[str, Any]:
    from juki.mesh.tls import secure_channel

    tls = env.tls("agency", "jps")
    requests = _lookup_requests(env.residents)
    lookup_channel = secure_channel(env.addresses["lookup"], tls)
    echo_channel = secure_channel(env.addresses["echo"], tls)
    lookup_call = lookup_pb2_grpc.LookupServiceStub(lookup_channel).LookupByCode
    echo_call = echo_channel.unary_unary(
        ECHO_UNARY, request_serializer=lookup_pb2.LookupByCodeRequest.SerializeToString,
        response_deserializer=lookup_pb2.LookupByCodeResponse.FromString,
    )
    try:
        answer = await lookup_call(requests[0])  # fails loudly if the service refuses
        assert answer.record.resident_code == requests[0].resident_code
        await _closed_loop(echo_call, requests, concurrency, 1.0)  # warm-up
        await _closed_loop(lookup_call, requests, concurrency, 1.0)
        service: list[tuple[float, list[float]]] = []
        ceiling: list[tuple[float, list[float]]] = []
        meter = CpuMeter(env)
        for _ in range(runs):
            ceiling.append(await _closed_loop(echo_call, requests, concurrency, seconds))
            meter.restart()
            service.append(await _closed_loop(lookup_call, requests, concurrency, seconds))
            meter.stop()
        visibility = await measure_visibility(env, lookup_call)
    finally:
        await lookup_channel.close()
        await echo_channel.close()
    throughput = statistics.median(r for r, _ in service)
    ceiling_rate = statistics.median(r for r, _ in ceiling)
    latencies = [latency for _, run in service for latency in run]
    echo_latencies = [latency for _, run in ceiling for latency in run]
    return {
        "throughput": round(throughput, 1),
        "ceiling": round(ceiling_rate, 1),
        "ratio": round(throughput / ceiling_rate, 3),
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "ceiling_p50_ms": round(percentile(echo_latencies, 0.50), 3),
        "ceiling_p99_ms": round(percentile(echo_latencies, 0.99), 3),
        "runs": runs,
        "run_throughputs": [round(r, 1) for r, _ in service],
        "run_ceilings": [round(r, 1) for r, _ in ceiling],
        "concurrency": concurrency,
        "seconds_per_run": seconds,
        # Where the CPU of one lookup went, by process (postgres: the benchmark's server and backends).
        "cpu_us_per_call": meter.per_unit(sum(len(run) for _, run in service)),
        **visibility,
    }


def _verify_messages(residents: int, codes: int, batch: int) -> list[lookup_pb2.VerifyBatchRequest]:
    """The pension file: ``codes`` codes of pensioners, about 1 in 100 not (or no longer) in the store."""
    rng = random.Random(5)
    messages = []
    for start in range(0, codes, batch):
        message = lookup_pb2.VerifyBatchRequest()
        if start == 0:
            message.purpose = PENSION
        for item_id in range(start, min(codes, start + batch)):
            index = rng.randrange(residents) if rng.random() >= 0.01 else residents + rng.randrange(residents)
            message.items.add(item_id=item_id, resident_code=resident_code(index))
        messages.append(message)
    return messages


async def _stream(call_factory: Any, messages: list[Any]) -> tuple[float, int]:
    """Send every message on one stream while reading answers; (records/s, results counted)."""
    started = time.perf_counter()
    call = call_factory()
    expected = sum(len(m.items) for m in messages)

    async def send() -> None:
        for message in messages:
            await call.write(message)
        await call.done_writing()

    sender = asyncio.ensure_future(send())
    results = 0
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            break
        results += len(response.results)
    await sender
    elapsed = time.perf_counter() - started
    if results != expected:
        raise RuntimeError(f"the stream answered {results} of {expected} items")
    return results / elapsed, results


async def _streams(call_factories: list[Any], messages: list[Any]) -> float:
    """The pension file split into one contiguous part per server, streamed at once; records/s overall."""
    parts = len(call_factories)
    size = -(-len(messages) // parts)
    chunks = [messages[i * size:(i + 1) * size] for i in range(parts)]
    for chunk in chunks[1:]:
        if chunk:
            first = lookup_pb2.VerifyBatchRequest()
            first.CopyFrom(chunk[0])
            first.purpose = PENSION
            chunk[0] = first
    started = time.perf_counter()
    counted = await asyncio.gather(*(
        _stream(factory, chunk) for factory, chunk in zip(call_factories, chunks, strict=True) if chunk
    ))
    return sum(results for _, results in counted) / (time.perf_counter() - started)


async def bench_verify(env: Environment, codes: int, batch: int, runs: int) -> dict[str, Any]:
    from juki.mesh.tls import secure_channel

    tls = env.tls("agency", "jps")
    messages = _verify_messages(env.residents, codes, batch)
    suffixes = [f"-{index}" if index else "" for index in range(env.lookup_processes)]
    channels = [secure_channel(env.addresses[name + suffix], tls) for suffix in suffixes for name in ("lookup", "echo")]
    services = [lookup_pb2_grpc.LookupServiceStub(channel).VerifyBatch for channel in channels[0::2]]
    echoes = [channel.stream_stream(
        ECHO_VERIFY, request_serializer=lookup_pb2.VerifyBatchRequest.SerializeToString,
        response_deserializer=lookup_pb2.VerifyBatchResponse.FromString,
    ) for channel in channels[1::2]]
    try:
        warm = messages[:2]
        for factory in [*services, *echoes]:
            await _stream(factory, warm)
        service: list[float] = []
        ceiling: list[float] = []
        meter = CpuMeter(env)
        for _ in range(runs):
            ceiling.append(await _streams(echoes, messages))
            meter.restart()
            service.append(await _streams(services, messages))
            meter.stop()
    finally:
        for channel in channels:
            await channel.close()
    throughput = statistics.median(service)
    ceiling_rate = statistics.median(ceiling)
    return {
        "throughput": round(throughput, 1),
        "ceiling": round(ceiling_rate, 1),
        "ratio": round(throughput / ceiling_rate, 3),
        "runs": runs,
        "run_throughputs": [round(r, 1) for r in service],
        "run_ceilings": [round(r, 1) for r in ceiling],
        "codes": codes,
        "batch": batch,
        "lookup_processes": env.lookup_processes,
        "cpu_us_per_record": meter.per_unit(runs * codes),
    }


async def _logged(env: Environment) -> tuple[int, int]:
    """(records, batches) in the access log: every provision, and how many group-commit batches carried them."""
    import asyncpg

    conn = await asyncpg.connect(env.pg.admin_url)
    try:
        records: int = await conn.fetchval("SELECT count(*) FROM accesslog.records")
        batches: int = await conn.fetchval("SELECT count(*) FROM accesslog.batches")
        return records, batches
    except asyncpg.PostgresError:
        return -1, -1
    finally:
        await conn.close()


_STORE_IO = (
    "SELECT coalesce(sum(heap_blks_hit), 0)::bigint AS heap_hit, coalesce(sum(heap_blks_read), 0)::bigint AS heap_read,"
    " coalesce(sum(idx_blks_hit), 0)::bigint AS idx_hit, coalesce(sum(idx_blks_read), 0)::bigint AS idx_read"
    " FROM pg_statio_all_tables WHERE schemaname = 'intake_national' AND relname = 'residents'"
)


async def _store_io(env: Environment) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(env.pg.admin_url)
    try:
        return dict(await conn.fetchrow(_STORE_IO))
    finally:
        await conn.close()


async def _store_facts(env: Environment, before: dict[str, int], codes: list[str]) -> dict[str, Any]:
    """The identity store as the benchmark met it: sizes, PostgreSQL's cache, the hit ratio of the measured
    runs (blocks of the residents table and its indexes found in shared buffers), and the plans of the two
    hot queries with their buffer counts (one code; a 10,000-code VerifyBatch message)."""
    import asyncpg

    from juki.lookup.service import _FIELDS_BY_CODE, _FIELDS_BY_CODES

    after = await _store_io(env)
    delta = {k: after[k] - before[k] for k in after}
    hits, reads = delta["heap_hit"] + delta["idx_hit"], delta["heap_read"] + delta["idx_read"]
    conn = await asyncpg.connect(env.pg.admin_url)
    try:
        sizes = await conn.fetchrow(
            "SELECT pg_table_size('intake_national.residents') AS heap,"
            " pg_indexes_size('intake_national.residents') AS indexes, current_setting('shared_buffers') AS cache")
        plans = {}
        for name, query, argument in (("by_code", _FIELDS_BY_CODE, codes[0]),
                                      ("by_10000_codes", _FIELDS_BY_CODES, codes[:10_000])):
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) {query}", argument)
            plans[name] = [r[0].strip() for r in rows if "Buffers" in r[0] or "->" in r[0] or "Scan" in r[0]][:8]
    finally:
        await conn.close()
    return {
        "heap_mb": round(sizes["heap"] / 2**20), "indexes_mb": round(sizes["indexes"] / 2**20),
        "shared_buffers": sizes["cache"],
        "buffer_hit_ratio": round(hits / (hits + reads), 4) if hits + reads else None,
        "blocks_read_from_disk_or_os_cache": reads,
        "plans": plans,
    }


async def _run(args: argparse.Namespace, kind: str) -> int:
    env = Environment(args.residents, keep=args.keep, profile=args.profile,
                      processes=getattr(args, "processes", 1))
    try:
        await env.start()
        before = await _store_io(env)
        if kind == "lookup":
            result = await bench_lookup(env, args.concurrency, args.seconds, args.runs)
        else:
            result = await bench_verify(env, args.codes, args.batch, args.runs)
        sample = [resident_code(i) for i in random.Random(9).sample(range(args.residents), min(10_000, args.residents))]
        result["store"] = await _store_facts(env, before, sample)
        result["residents"] = args.residents
        result["load_seconds"] = round(env.load_seconds, 1)
        result["access_log_records"], result["access_log_batches"] = await _logged(env)
        result["cpus"] = os.cpu_count()
        if args.keep:
            result["directory"] = str(env.root)
            result["pids"] = env.pids()
    finally:
        env.close()
    emit(result)
    return 0


async def cmd_bench_lookup(args: argparse.Namespace) -> int:
    return await _run(args, "lookup")


async def cmd_bench_verify(args: argparse.Namespace) -> int:
    return await _run(args, "verify")


if __name__ == "__main__":
    asyncio.run(serve_echo(echo_handlers()))

