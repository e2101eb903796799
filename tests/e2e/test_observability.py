"""What the people on call rely on, against the whole local mesh: metric names, gauges, logs, CLI traces."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from juki.cli.main import build_parser
from juki.mesh.supervisor import Supervisor, read_endpoints
from juki.mesh.tracesink import TraceSink

from tests.k8s.exported_metrics import exported

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def scrape(endpoints: dict[str, Any], instance: str) -> str:
    with urllib.request.urlopen(endpoints["services"][instance]["metrics"], timeout=10) as response:
        return str(response.read().decode())


def sample_names(text: str) -> set[str]:
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def until(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    """Poll until ``predicate()`` is truthy (the intake gauges are sampled every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(predicate)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}")
        await asyncio.sleep(0.2)


async def run_cli(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return int(await args.func(args))


async def test_every_scraped_name_is_one_the_code_derivation_gives(mesh: Supervisor) -> None:
    """The alert and dashboard tests check names against tests/k8s/exported_metrics.py; this checks it."""
    endpoints = read_endpoints(mesh.data_dir)
    derived = exported()
    scraped: set[str] = set()
    for instance in endpoints["services"]:
        scraped |= {n for n in sample_names(await asyncio.to_thread(scrape, endpoints, instance))
                    if n.startswith("juki_")}
    assert scraped - derived == set()
    assert {"juki_rpc_server_requests_total", "juki_rpc_server_duration_milliseconds_bucket",
            "juki_db_pool_connections", "juki_tls_certificate_not_after_seconds",
            "juki_accesslog_backlog", "juki_accesslog_head_sequence"} <= scraped


async def test_each_service_exports_the_expiry_of_the_certificate_it_serves(mesh: Supervisor) -> None:
    endpoints = read_endpoints(mesh.data_dir)
    assert mesh.ca is not None
    for spec in mesh.specs:
        certificate = x509.load_pem_x509_certificate(mesh.ca.paths(*spec.identity)[0].read_bytes())
        text = await asyncio.to_thread(scrape, endpoints, spec.instance)
        exported_value = value(text, "juki_tls_certificate_not_after_seconds",
                               spiffe_id=endpoints["services"][spec.instance]["spiffe_id"])
        assert exported_value == certificate.not_valid_after_utc.timestamp(), (spec.instance, text[-2000:])


async def test_a_disconnected_municipality_shows_in_the_prefecture_gauges(mesh: Supervisor) -> None:
    endpoints = read_endpoints(mesh.data_dir)
    folder = str(mesh.data_dir)

    def connected() -> float | None:
        return value(scrape(endpoints, "intake-prefecture-13"), "juki_intake_municipality_connected",
                     prefecture="13", municipality="131148")

    await until(lambda: connected() == 1, "131148 connected")
    text = await asyncio.to_thread(scrape, endpoints, "intake-prefecture-13")
    assert value(text, "juki_intake_outbox_backlog", prefecture="13") is not None
    assert value(text, "juki_intake_outbox_oldest_age_seconds", prefecture="13") is not None
    before = value(text, "juki_intake_municipality_connection_changed_seconds", municipality="131148")
    assert await run_cli("intake", "disconnect", "131148", "--data-dir", folder, "--reason", "gauge test") == 0
    try:
        await until(lambda: connected() == 0, "131148 disconnected")
        after = value(await asyncio.to_thread(scrape, endpoints, "intake-prefecture-13"),
                      "juki_intake_municipality_connection_changed_seconds", municipality="131148")
        assert before is not None and after is not None and after > before
    finally:
        assert await run_cli("intake", "connect", "131148", "--data-dir", folder, "--reason", "back") == 0
    await until(lambda: connected() == 1, "131148 connected again")


async def test_service_logs_stay_json_lines_after_a_client_without_a_certificate(mesh: Supervisor) -> None:
    endpoints = read_endpoints(mesh.data_dir)
    ca = Path(endpoints["ca"]).read_bytes()
    for instance in ("lookup", "accesslog", "intake-prefecture-13"):
        # The server requires a client certificate: the handshake is refused before any service code runs.
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(endpoints["services"][instance]["address"], credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    code = await _some_resident(mesh)
    assert await run_cli("lookup", code, "--purpose", "B1-PENSION-BENEFIT", "--data-dir", str(mesh.data_dir)) == 0
    bad: list[str] = []
    for spec in mesh.specs:
        log = mesh.data_dir / "run" / f"{spec.instance}.log"
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                bad.append(f"{log.name}:{number}: {line[:300]}")
        assert (mesh.data_dir / "run" / f"{spec.instance}.grpc.log").is_file()
    assert not bad, "\n".join(bad[:20])


async def test_the_cli_is_a_traced_client_when_otel_variables_are_set(mesh: Supervisor, trace_sink: TraceSink) -> None:
    code = await _some_resident(mesh)
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": trace_sink.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    env.pop("OTEL_SERVICE_NAME", None)
    env.pop("OTEL_TRACES_EXPORTER", None)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "juki", "lookup", code, "--purpose", "B1-PENSION-BENEFIT", "--data-dir",
         str(mesh.data_dir)],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr

    def cli_span(spans: list[Any]) -> bool:
        return any(s.service == "agency-jps-client" and s.name.endswith("/LookupByCode") for s in spans)

    await trace_sink.wait_for(cli_span, timeout=30)
    trace_id = next(s.trace_id for s in trace_sink.spans
                    if s.service == "agency-jps-client" and s.name.endswith("/LookupByCode"))

    def joined(spans: list[Any]) -> bool:
        return {"agency-jps-client", "juki-lookup", "juki-accesslog"} <= {s.service for s in spans
                                                                          if s.trace_id == trace_id}

    await trace_sink.wait_for(joined, timeout=30)


async def _some_resident(mesh: Supervisor) -> str:
    import asyncpg

    conn = await asyncpg.connect(mesh.admin_url)
    try:
        code = await conn.fetchval("SELECT resident_code FROM intake_national.residents WHERE status = 1 LIMIT 1")
    finally:
        await conn.close()
    assert code
    return str(code)
