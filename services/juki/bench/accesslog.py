"""``juki bench accesslog``: append throughput of the access log, in a throwaway embedded PostgreSQL.

Two figures from the same run:
  * ``writer_records_per_s``: the service core (pseudonymise, serialise, chain, COPY, COMMIT) fed by
    concurrent producers, as the servicer feeds it;
  * ``grpc_records_per_s``: end to end over mutual TLS with AppendStream (the path lookup uses), the
    client in a separate process; ``grpc_ratio`` = grpc / writer.
Every acknowledged batch is durable (synchronous_commit on); the log is verified at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki.bench.harness import Harness, emit, json_flag
from juki.domain import generate_resident_code


def register_bench(bench_sub: Any) -> None:
    parser = bench_sub.add_parser("accesslog", help="access-log append throughput (records/s)")
    parser.add_argument("--records", type=int, default=1_000_000, help="records to append in the writer phase")
    parser.add_argument("--grpc-records", type=int, default=400_000, help="records to append over gRPC (0 to skip)")
    parser.add_argument("--batch", type=int, default=5_000, help="records per Append batch")
    parser.add_argument("--producers", type=int, default=4, help="concurrent producers / streams")
    json_flag(parser)
    parser.set_defaults(func=cmd_bench_accesslog)


def sample_records(count: int, seed: int = 1) -> list[accesslog_pb2.ProvisionRecord]:
    rng = random.Random(seed)
    residents = [generate_resident_code(rng) for _ in range(min(count, 100_000))]
    base = 1_700_000_000
    out = []
    for index in range(count):
        record = accesslog_pb2.ProvisionRecord(
            recipient="spiffe://juki.local/agency/jps", recipient_name="日本年金機構", purpose="J001",
            purpose_name="年金給付の事務", query_mode=common_pb2.QUERY_MODE_BATCH_VERIFY,
            provider_tier=common_pb2.TIER_NATIONAL, provider="spiffe://juki.local/service/lookup",
            fields=[common_pb2.FIELD_NAME, common_pb2.FIELD_ADDRESS, common_pb2.FIELD_CHANGE_INFO],
            resident_code=residents[index % len(residents)],
            outcome=accesslog_pb2.PROVISION_OUTCOME_PROVIDED, trace_id=f"{rng.getrandbits(128):032x}",
        )
        record.provided_at.FromSeconds(base + index)
        out.append(record)
    return out


class BenchEnvironment(Harness):
    """The harness with the access-log schema; the service runs in this process (:meth:`settings`)."""

    def __init__(self, name: str = "accesslog") -> None:
        super().__init__(name)

    async def migrate(self, instance: str = "accesslog") -> None:
        await self.prepare([("accesslog", instance)])

    def settings(self, instance: str = "accesslog") -> Any:
        from juki.mesh.settings import (
            AccessLogSettings,
            DatabaseSettings,
            Peers,
            Secret,
            ServiceSettings,
            TlsFiles,
            role_name,
            schema_name,
        )

        cert, key = self.ca.paths("service", "accesslog")
        sign_cert, sign_key = self.ca.paths("signing", "accesslog")
        return ServiceSettings(
            service="accesslog", instance=instance, listen="127.0.0.1:0",
            tls=TlsFiles(ca=self.ca.ca_cert_path, cert=cert, key=key, crl=self.ca.crl_path),
            database=DatabaseSettings(url=Secret(self.pg.url(role_name(instance))), schema=schema_name(instance),
                                      pool_min=2, pool_max=8),
            data_dir=self.root, peers=Peers(),
            accesslog=AccessLogSettings(signing_key_file=sign_key, signing_cert_file=sign_cert,
                                        pseudonym_key_file=self.pseudonym_file, checkpoint_seconds=5,
                                        verify_seconds=0),
        )

async def writer_phase(env: BenchEnvironment, records: int, batch: int, producers: int) -> dict[str, Any]:
    from juki.accesslog import chain
    from juki.accesslog.app import create
    from juki.accesslog.service import valid_code
    from juki.accesslog.writer import prepare

    app = create(env.settings())
    await app.start()
    assert app.writer is not None
    pseudonymise = chain.Pseudonymiser(app.pseudonym_key)
    template = sample_records(min(records, 200_000))
    batches = [template[i:i + batch] for i in range(0, len(template), batch)]
    # Requests arrive as bytes: each producer parses one (as the gRPC server would), checks, prepares.
    wire = [accesslog_pb2.AppendRequest(records=b).SerializeToString() for b in batches]
    total = records // batch
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(total):
        queue.put_nowait(index)

    async def producer() -> None:
        assert app.writer is not None
        while not queue.empty():
            index = queue.get_nowait()
            request = accesslog_pb2.AppendRequest.FromString(wire[index % len(wire)])
            prepared = prepare(request.records, pseudonymise, time.time_ns() // 1000, valid_code)
            assert prepared is not None
            await app.writer.append(prepared)

    started = time.perf_counter()
    await asyncio.gather(*[producer() for _ in range(producers)])
    elapsed = time.perf_counter() - started
    stats = app.writer.stats
    # Where the time goes: the service's Python work per record (parse, check, pseudonymise, serialise,
    # chain, tree leaf and tile hashes) without the database, and the records per second of the commits
    # themselves (lock, COPY, COMMIT; the next group is chained in Python meanwhile).
    from juki.accesslog.merkle import Frontier
    from juki.accesslog.writer import _Pending

    sample = accesslog_pb2.AppendRequest(records=template[:50_000]).SerializeToString()
    started = time.perf_counter()
    parsed = accesslog_pb2.AppendRequest.FromString(sample)
    prepared_sample = prepare(parsed.records, pseudonymise, time.time_ns() // 1000, valid_code)
    assert prepared_sample is not None
    app.writer._build([_Pending("", prepared_sample, asyncio.get_running_loop().create_future())], (0, b"\0" * 32, Frontier()), {})
    python_us = (time.perf_counter() - started) / len(parsed.records) * 1e6
    await app.stop()
    commit_seconds = sum(stats.durations_ms) / 1000
    return {
        "writer_records": total * batch,
        "writer_seconds": round(elapsed, 3),
        "writer_records_per_s": round(total * batch / elapsed),
        "group_commits": stats.groups,
        "largest_group": stats.largest_group,
        "python_us_per_record": round(python_us, 2),
        "commit_records_per_s": round(stats.records / commit_seconds) if commit_seconds else 0,
    }


CLIENT = r"""
import asyncio, json, sys, time
from pathlib import Path
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki.bench.accesslog import sample_records
from juki.mesh.settings import TlsFiles
from juki.mesh.tls import secure_channel

address, ca, cert, key, records, batch, streams = sys.argv[1:8]
records, batch, streams = int(records), int(batch), int(streams)
template = sample_records(min(records, 100_000))
payloads = [accesslog_pb2.AppendStreamRequest(records=template[i:i + batch]) for i in range(0, len(template), batch)]

async def main():
    channel = secure_channel(address, TlsFiles(ca=Path(ca), cert=Path(cert), key=Path(key)))
    stub = accesslog_pb2_grpc.AccessLogServiceStub(channel)
    per_stream = records // batch // streams
    async def one(s):
        async def requests():
            for i in range(per_stream):
                yield payloads[(s * per_stream + i) % len(payloads)]
        return sum([a.count async for a in stub.AppendStream(requests())])
    started = time.perf_counter()
    counts = await asyncio.gather(*[one(s) for s in range(streams)])
    elapsed = time.perf_counter() - started
    await channel.close()
    print(json.dumps({"records": sum(counts), "seconds": elapsed}))

asyncio.run(main())
"""


async def grpc_phase(env: BenchEnvironment, records: int, batch: int, streams: int) -> dict[str, Any]:
    from juki.accesslog.app import create
    from juki.mesh.server import start_server

    settings = env.settings()
    app = create(settings)
    bindings = await app.start()
    server = await start_server(settings, bindings)
    cert, key = env.ca.paths("service", "lookup")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, server.address, str(env.ca.ca_cert_path), str(cert), str(key),
            str(records), str(batch), str(streams), stdout=subprocess.PIPE,
        )
        out, _ = await process.communicate()
        figures = json.loads(out)
    finally:
        await server.stop(1)
        await app.stop()
    return {
        "grpc_records": figures["records"],
        "grpc_seconds": round(figures["seconds"], 3),
        "grpc_records_per_s": round(figures["records"] / figures["seconds"]),
    }


def _inclusion(index: int, size: int, node: Any) -> list[bytes]:
    from juki.accesslog import merkle

    return merkle.inclusion_proof(index, size, node)


def _consistency(old: int, size: int, node: Any) -> list[bytes]:
    from juki.accesslog import merkle

    return merkle.consistency_proof(old, size, node)


async def verify_phase(env: BenchEnvironment) -> dict[str, Any]:
    import functools
    import random
    import statistics

    import asyncpg

    from juki.accesslog import chain, tiles
    from juki.accesslog.verify import verify_log

    verifier = chain.CheckpointVerifier(env.ca.paths("signing", "accesslog")[0], env.ca.ca_cert_path)
    conn = await asyncpg.connect(env.pg.admin_url)
    try:
        started = time.perf_counter()
        result = await verify_log(conn, verifier, schema="accesslog")
        elapsed = time.perf_counter() - started
        # Incremental: continuing from what the full run reached (nothing new to hash: the fixed cost of
        # the signature, root and consistency checks an auditor pays per run).
        started = time.perf_counter()
        again = await verify_log(conn, verifier, schema="accesslog", resume=result.tree.at_head)
        incremental = time.perf_counter() - started
        # Proofs from the tiles: O(log n) stored hashes each, whatever the size of the log.
        size = await tiles.tree_size(conn, "accesslog")
        rng = random.Random(1)
        inclusion: list[float] = []
        consistency: list[float] = []
        for _ in range(200):
            index, old = rng.randrange(size), rng.randrange(1, size + 1)
            started = time.perf_counter()
            await tiles.compute(conn, functools.partial(_inclusion, index, size), "accesslog")
            inclusion.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await tiles.compute(conn, functools.partial(_consistency, old, size), "accesslog")
            consistency.append((time.perf_counter() - started) * 1000)
    finally:
        await conn.close()
    return {"verified_ok": result.ok and again.ok, "verified_records": result.records_checked,
            "verify_records_per_s": round(result.records_checked / elapsed) if elapsed else 0,
            "incremental_verify_ms": round(incremental * 1000, 2), "tree_size": size,
            "inclusion_proof_p50_ms": round(statistics.median(inclusion), 3),
            "consistency_proof_p50_ms": round(statistics.median(consistency), 3)}


async def cmd_bench_accesslog(args: argparse.Namespace) -> int:
    env = BenchEnvironment()
    try:
        await env.migrate()
        figures: dict[str, Any] = {"bench": "accesslog", "batch": args.batch, "producers": args.producers,
                                   "cpus": os.cpu_count(), "goal_records_per_s": 200_000}
        figures.update(await writer_phase(env, args.records, args.batch, args.producers))
        if args.grpc_records:
            figures.update(await grpc_phase(env, args.grpc_records, args.batch, args.producers))
            figures["grpc_ratio"] = round(figures["grpc_records_per_s"] / figures["writer_records_per_s"], 3)
        figures.update(await verify_phase(env))
    finally:
        env.close()
    emit(figures)
    return 0 if figures.get("verified_ok") else 1
