"""docs/agencies.md holds: its tables are the catalog and the policy, its service config retries what it
says against a real lookup service, and its grpcurl recipes run as written against the real lookup
service and access log."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import tempfile
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import pytest
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki.lookup.app import create
from juki.mesh.errors import Reason
from juki.mesh.server import start_server
from juki.mesh.settings import Peers
from juki.mesh.tls import channel_credentials

from tests.conftest import tls_for
from tests.integration.lookup.conftest import Mesh, add_resident
from tests.integration.lookup.test_cli import _endpoints
from tests.integration.mesh.test_stream_teardown import RecordedMetrics

pytestmark = [pytest.mark.timeout(120)]
async_test = pytest.mark.asyncio(loop_scope="session")

DOCS = Path(__file__).resolve().parents[3] / "docs"
GUIDE = DOCS / "agencies.md"
SERVICE_CONFIG = DOCS / "agency-service-config.json"


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of each row of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_every_error_reason_is_documented_with_its_status_and_retry() -> None:
    rows = _table_rows(GUIDE.read_text(encoding="utf-8"), "| reason | status | retry?")
    documented = {row[0].strip("`"): row for row in rows}
    assert set(documented) == set(Reason.__members__)
    for reason in Reason:
        _, status, retry, what = documented[reason.name]
        assert status == reason.value.code.name, reason
        assert retry.startswith("yes") == reason.value.retryable, reason
        assert what, reason


def test_the_purpose_table_is_the_packaged_policy() -> None:
    policy = json.loads(resources.files("juki.domain").joinpath("policy_data.json").read_text(encoding="utf-8"))
    expected = {
        (agency["identity"], purpose["code"]): (purpose["modes"], purpose["fields"])
        for agency in policy["agencies"] if agency["public_body"]
        for purpose in agency.get("purposes", [])
    }
    rows = _table_rows(GUIDE.read_text(encoding="utf-8"), "| recipient (SPIFFE id) |")
    documented = {
        (row[0].strip("`"), row[2].strip("`")): (row[4].split(", "), row[5].split(", ")) for row in rows
    }
    assert documented == expected


@async_test
async def test_the_service_config_sets_deadlines_and_retries_an_unavailable_lookup(mesh: Mesh) -> None:
    config = json.loads(SERVICE_CONFIG.read_text(encoding="utf-8"))
    (lookup_policy,) = [entry for entry in config["methodConfig"]
                        if {"service": "juki.lookup.v1.LookupService", "method": "LookupByCode"} in entry["name"]]
    attempts = lookup_policy["retryPolicy"]["maxAttempts"]
    code = await add_resident(mesh.database)
    # A lookup whose access log cannot be reached: every attempt fails with ACCESS_LOG_UNAVAILABLE and
    # provides nothing, which is what makes the retry safe.
    settings = mesh.lookup_settings(ack_timeout_seconds=1)
    settings = replace(settings, peers=Peers(accesslog="127.0.0.1:1"))
    app = create(settings)
    server = await start_server(settings, await app.start(), on_refusal=app.on_refusal)
    assert server.interceptor is not None
    metrics = server.interceptor.metrics = RecordedMetrics()
    channel = grpc.aio.secure_channel(
        server.address, channel_credentials(tls_for(mesh.ca, "agency", "jps")),
        options=[("grpc.service_config", SERVICE_CONFIG.read_text(encoding="utf-8")), ("grpc.enable_retries", 1)],
    )
    try:
        stub = lookup_pb2_grpc.LookupServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose="B1-PENSION-BENEFIT", resident_code=code))
    finally:
        await channel.close()
        await server.stop(0.1)
        await app.stop()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    method = "/juki.lookup.v1.LookupService/LookupByCode"
    assert metrics.recorded == [(method, "UNAVAILABLE")] * attempts
    assert await mesh.provisions(code) == []


def _recipes() -> list[str]:
    """The shell blocks of the grpcurl section, in order; the first sets up the variables."""
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index("## 6. Trying it with grpcurl"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section  # this section only
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


async def _bash(script: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@async_test
async def test_the_grpcurl_recipes_run_as_written(mesh: Mesh) -> None:
    setup, *recipes = _recipes()
    assert len(recipes) == 5
    code = await add_resident(mesh.database, family_name="佐藤", street="中野二丁目1番1号")
    with tempfile.TemporaryDirectory() as folder:
        data_dir = _endpoints(mesh, Path(folder))
        env: dict[str, Any] = {
            **os.environ, "JUKI_DATA_DIR": str(data_dir), "CODE": code,
            # grpcurl and python3 as a user of the dev install has them: the virtualenv's first.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        outputs = []
        for recipe in recipes:
            status, out, err = await _bash(setup + recipe, env)
            assert status == 0, (recipe, err)
            outputs.append(out)
    listing, purposes, lookup, verify, refusal = outputs
    assert "juki.lookup.v1.LookupService" in listing and "rpc VerifyBatch" in listing and "SERVING" in listing
    assert "B1-PENSION-BENEFIT" in purposes
    assert "佐藤" in lookup and "中野二丁目1番1号" in lookup and "birth_date" not in lookup
    answers = [json.loads(chunk) for chunk in re.split(r"(?<=\n})\n", verify.strip())]
    results = [result for answer in answers for result in answer["results"]]
    assert [result["status"] for result in results] == ["VERIFY_STATUS_CURRENT", "VERIFY_STATUS_INVALID"]
    assert results[1]["violation"]["defect"] == "RESIDENT_CODE_DEFECT_CHECK_DIGIT"
    assert results[1]["violation"]["reason"] == "ERROR_REASON_CHECK_DIGIT_MISMATCH"
    assert "PURPOSE_NOT_GRANTED" in refusal and "grpcurl exited with 71" in refusal
