"""The committed stubs in services/juki/_gen match the protos, and the protos pass `buf lint`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = REPO_ROOT / "tools" / "gen_protos.py"

pytestmark = pytest.mark.timeout(300)


def _buf() -> str:
    for candidate in (Path(sys.executable).parent / "buf", Path(sysconfig.get_path("scripts")) / "buf"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("buf")
    if found is None:
        pytest.fail("buf not found; install the dev extra (buf-bin)")
    return found


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        "generated stubs are stale; run `python tools/gen_protos.py`\n" + result.stdout + result.stderr
    )


def test_buf_lint_passes() -> None:
    result = subprocess.run([_buf(), "lint"], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_import_under_the_application_package() -> None:
    from juki._gen.juki.common.v1 import common_pb2
    from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc

    request = lookup_pb2.LookupByCodeRequest(
        purpose="1-92", resident_code="24727059608", requested_fields=[common_pb2.FIELD_NAME]
    )
    assert lookup_pb2.LookupByCodeRequest.FromString(request.SerializeToString()) == request
    assert lookup_pb2.LookupByCodeRequest.__module__ == "juki._gen.juki.lookup.v1.lookup_pb2"
    assert hasattr(lookup_pb2_grpc, "add_LookupServiceServicer_to_server")


def test_buf_breaking_against_main_passes() -> None:
    """The protos in the work tree keep wire and source compatibility with the main branch."""
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--breaking"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
