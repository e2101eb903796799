"""`juki bench disclose` at a small size: a log filled with its tree, every answer carrying proofs that
verify against the signed root."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


async def test_bench_disclose_answers_with_inclusion_proofs_that_verify() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", "bench", "disclose", "--records", "5000", "--population", "300",
        "--runs", "40", "--chunk", "1500", "--verify", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    figures = json.loads(out)
    assert figures["log_records"] == 5000 and figures["proofs"] is True and figures["proof_tree_size"] == 5000
    returned = round(figures["provisions_returned_per_run"] * figures["runs"])
    assert returned > 0 and figures["proofs_verified"] == returned and figures["proofs_failed"] == 0, figures
    assert 1 <= figures["inclusion_proof_hashes_max"] <= 13  # ceil(log2 5000)
    # The loaded log is the writer's: the chain, the leaves, the tiles and the signed checkpoints verify.
    assert figures["verified_ok"] and figures["verified_records"] == 5000, figures
    assert figures["p99_ms"] >= figures["p50_ms"] > 0 and figures["tiles_bytes"] > 0 and figures["table_bytes"] > 0
