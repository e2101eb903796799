"""`juki bench audit` at a small size: the fast fill, proofs at each size, and the incremental audit."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


async def test_bench_audit_reports_incremental_audit_and_proof_sizes() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", "bench", "audit", "--records", "3000", "--new", "700", "--sizes", "1000",
        "--proofs", "5", "--chunk", "1000", "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    figures = json.loads(out)
    assert figures["incremental_ok"] and figures["consistency_proof_checked"], figures
    assert figures["incremental_records_hashed"] == 700 and figures["log_records"] == 3000
    assert [p["leaves"] for p in figures["proofs"]] == [1000, 3000]
    # O(log n): a proof has at most ceil(log2 n) hashes (+1 for a consistency proof).
    assert figures["proofs"][0]["inclusion_proof_hashes_max"] <= 10
    assert figures["proofs"][1]["inclusion_proof_hashes_max"] <= 12
    assert figures["proofs"][1]["consistency_proof_hashes_max"] <= 13
    # the proofs as served (from the level-0 tiles' middles) are the proofs from the tiles alone
    assert [p["served_proofs_differing"] for p in figures["proofs"]] == [0, 0]
    assert "incremental_seconds" in figures and "fill_records_per_s" in figures
