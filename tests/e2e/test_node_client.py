"""Interop from another language: the Node.js example of docs/agencies.md (examples/node, with
@grpc/grpc-js and @grpc/proto-loader) against the running mesh, as an agency would run it.

The example's packages come from its lock file (`npm ci`, from the registry the first time). Without Node
the test skips, unless JUKI_REQUIRE_NODE=1 (as in CI), where it fails instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from juki.mesh.supervisor import ENDPOINTS_FILE, Supervisor

from tests.faults import PENSION

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


def _node() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("JUKI_REQUIRE_NODE") == "1":
            pytest.fail("JUKI_REQUIRE_NODE=1 but node/npm are not on PATH")
        pytest.skip("node and npm are not installed")
    return node, npm


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = _node()
    lock = EXAMPLE / "package-lock.json"
    installed = EXAMPLE / "node_modules" / ".package-lock.json"
    if not installed.is_file() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return node


async def _run(node: str, mesh: Supervisor, code: str) -> list[dict[str, Any]]:
    done = await asyncio.to_thread(
        subprocess.run,
        [node, str(EXAMPLE / "client.js"), "--endpoints", str(mesh.data_dir / ENDPOINTS_FILE), "--code", code,
         "--purpose", PENSION],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


async def test_the_node_example_looks_up_verifies_a_stream_and_decodes_a_refusal(node: str, mesh: Supervisor) -> None:
    conn = await asyncpg.connect(mesh.admin_url)
    try:
        row = await conn.fetchrow("SELECT resident_code, family_name FROM intake_national.residents "
                                  "WHERE status = 1 ORDER BY resident_code LIMIT 1")
    finally:
        await conn.close()
    assert row is not None
    code = str(row["resident_code"])

    steps = {line["step"]: line for line in await _run(node, mesh, code)}

    assert set(steps) == {"LookupByCode", "VerifyBatch", "Refused"}, steps
    found = steps["LookupByCode"]
    assert sorted(found["provided_fields"]) == ["FIELD_ADDRESS", "FIELD_NAME"]
    assert found["record"]["name"]["family_name"] == row["family_name"]
    assert found["record"]["address"] and "birth_date" not in found["record"]  # only what was granted and asked

    results = {r["item_id"]: r for r in steps["VerifyBatch"]["results"]}
    assert sorted(results) == [1, 2, 3, 4]  # every item of the three messages has a result
    assert results[1]["status"] == results[3]["status"] == "VERIFY_STATUS_CURRENT"
    assert results[2]["status"] == "VERIFY_STATUS_INVALID"
    assert results[2]["reason"] == "ERROR_REASON_CHECK_DIGIT_MISMATCH"
    assert results[2]["defect"] == "RESIDENT_CODE_DEFECT_CHECK_DIGIT"
    assert results[2]["stream_index"] == 1  # counted over the whole stream, not within its message
    assert results[4]["status"] == "VERIFY_STATUS_INVALID"
    assert results[4]["defect"] == "RESIDENT_CODE_DEFECT_CHARACTERS"
    assert results[4]["stream_index"] == 3

    refused = steps["Refused"]
    assert refused["code"] == "INVALID_ARGUMENT"
    assert refused["domain"] == "juki.local"
    assert refused["reason"] == "CHECK_DIGIT_MISMATCH"
    assert [v["field"] for v in refused["fieldViolations"]] == ["resident_code"]
