"""``juki serve lookup --processes N``: N lookup processes on one port (SO_REUSEPORT), one pod's cores.

The processes are real ``juki serve`` children of a real parent, on the test database and the test
access log; the tests read the kernel's socket table to see that every child listens on the one port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki.mesh.processes import _metrics_address, child_environment, reserve_port

from tests.conftest import channel_as, make_settings
from tests.integration.lookup.conftest import Mesh, add_resident, fresh_code

pytestmark = pytest.mark.asyncio(loop_scope="session")

PENSION = "B1-PENSION-BENEFIT"


def _listening_ports(pid: int) -> set[int]:
    """TCP ports on which process ``pid`` holds a listening socket (from /proc: its fds and the tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def _start(mesh: Mesh, tmp_path: Path, processes: int) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    settings = make_settings(mesh.ca, mesh.database, mesh.data_dir, "lookup", "lookup", ("service", "lookup"))
    ready = tmp_path / "lookup.ready"
    env = {key: value for key, value in os.environ.items() if not key.startswith("JUKI_")}
    env.update({
        "JUKI_LISTEN": "127.0.0.1:0", "JUKI_READY_FILE": str(ready), "JUKI_DATA_DIR": str(tmp_path),
        "JUKI_TLS_CA_FILE": str(settings.tls.ca), "JUKI_TLS_CERT_FILE": str(settings.tls.cert),
        "JUKI_TLS_KEY_FILE": str(settings.tls.key), "JUKI_DATABASE_URL": mesh.database.url("lookup"),
        "JUKI_ACCESSLOG_ADDRESS": mesh.accesslog, "JUKI_LOG_LEVEL": "WARNING",
    })
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", "serve", "lookup", "--processes", str(processes), env=env,
        stdin=asyncio.subprocess.DEVNULL,
    )
    while not ready.is_file():
        assert parent.returncode is None, "the parent ended before it was ready"
        await asyncio.sleep(0.05)
    return parent, json.loads(ready.read_text())


async def test_every_process_listens_on_the_one_port_and_answers(mesh: Mesh, tmp_path: Path) -> None:
    code = fresh_code()
    await add_resident(mesh.database, code)
    parent, ready = await _start(mesh, tmp_path, 2)
    try:
        port = int(ready["address"].rsplit(":", 1)[1])
        assert ready["pid"] == parent.pid and len(ready["pids"]) == 2
        for pid in ready["pids"]:
            assert port in _listening_ports(pid), f"process {pid} does not listen on {port}"
        assert port not in _listening_ports(parent.pid)  # the parent only keeps the port reserved
        # Separate channels are separate connections, which the kernel spreads over the processes.
        for _ in range(4):
            channel = channel_as(mesh.ca, "agency", "jps", ready["address"])
            try:
                answer = await lookup_pb2_grpc.LookupServiceStub(channel).LookupByCode(
                    lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code))
                assert answer.record.resident_code == code
            finally:
                await channel.close()
        assert len(await mesh.provisions(code)) == 4  # each answer logged, whichever process gave it
    finally:
        if parent.returncode is None:
            parent.send_signal(signal.SIGTERM)
        assert await parent.wait() == 0
    for pid in ready["pids"]:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


async def test_a_process_that_dies_stops_the_pod(mesh: Mesh, tmp_path: Path) -> None:
    parent, ready = await _start(mesh, tmp_path, 2)
    first, second = ready["pids"]
    os.kill(first, signal.SIGKILL)
    # The parent stops the other process and ends non-zero, so that the pod is restarted whole.
    assert await parent.wait() == 1
    assert not Path(f"/proc/{second}").exists() or "zombie" in Path(f"/proc/{second}/status").read_text()


async def test_the_reserved_port_is_shared_and_metrics_ports_are_per_process(tmp_path: Path) -> None:
    reserved, address = reserve_port("127.0.0.1:0")
    try:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert _metrics_address("127.0.0.1:9464", 2) == "127.0.0.1:9466"
        assert _metrics_address("127.0.0.1:0", 2) == "127.0.0.1:0"
    finally:
        reserved.close()


async def test_each_child_gets_the_shared_address_its_ready_file_and_reuse_port(mesh: Mesh, tmp_path: Path) -> None:
    from dataclasses import replace

    settings = replace(make_settings(mesh.ca, mesh.database, mesh.data_dir, "lookup", "lookup",
                                     ("service", "lookup")), metrics_listen="127.0.0.1:9464")
    env = child_environment(settings, "127.0.0.1:5000", 1, tmp_path / "r.1")
    assert env["JUKI_LISTEN"] == "127.0.0.1:5000" and env["JUKI_REUSE_PORT"] == "true"
    assert env["JUKI_READY_FILE"] == str(tmp_path / "r.1") and env["JUKI_METRICS_LISTEN"] == "127.0.0.1:9465"
