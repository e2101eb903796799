"""gRPC's C core writes to file descriptor 2; routed away, the service's own log keeps JSON lines only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# A child whose stderr is its service log (as under `juki up`): a line written to fd 2 the way the C core
# writes, then a JSON log record through Python's logging.
CHILD = """
import logging, os, sys
from juki.mesh import telemetry
if len(sys.argv) > 1:
    telemetry.route_native_stderr(sys.argv[1])
telemetry.configure_logging("test")
os.write(2, b"I1202 00:00:00.000 ssl_transport_security.cc Handshake failed PEER_DID_NOT_RETURN_A_CERTIFICATE\\n")
logging.getLogger("x").warning("served")
"""


def run_child(log: Path, *argv: str) -> list[str]:
    with log.open("wb") as out:
        subprocess.run([sys.executable, "-c", CHILD, *argv], stdout=out, stderr=out, check=True, timeout=60)
    return log.read_text().splitlines()


def test_native_lines_go_to_their_own_file(tmp_path: Path) -> None:
    lines = run_child(tmp_path / "svc.log", str(tmp_path / "svc.grpc.log"))
    assert [json.loads(line)["msg"] for line in lines] == ["served"]
    assert "Handshake failed" in (tmp_path / "svc.grpc.log").read_text()


def test_without_routing_the_service_log_is_not_json(tmp_path: Path) -> None:
    lines = run_child(tmp_path / "svc.log")
    with pytest.raises(ValueError):
        [json.loads(line) for line in lines]
