"""``juki serve lookup --processes N``: one pod's service as N processes sharing one port (SO_REUSEPORT).

A Python process runs its handlers on one core (one interpreter lock); a pod with several cores runs one
process per core, as gRPC's Python multiprocessing example does. This parent reserves the listen port
with ``SO_REUSEPORT`` (keeping the socket, unbound to any server, so that the port stays this pod's), then
starts N ``juki serve`` children on it, each a whole service with ``JUKI_REUSE_PORT`` set so that its
gRPC server binds the same port; the kernel spreads new connections over them. The parent serves
nothing: it writes the ready file once every child is ready (with every child's pid), passes SIGTERM and
SIGINT on, and when one child ends on its own it stops the others and exits non-zero, so that the pod is
restarted whole.

Per child: ``JUKI_READY_FILE`` is a file of its own beside the parent's; the health port (when set) is
shared like the gRPC port; the metrics port (``JUKI_METRICS_LISTEN`` host:port) becomes port + index, since
each process has its own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from juki.mesh.settings import ServiceSettings, SettingsError

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
# Services that can run as several processes behind one port: they keep no state of their own in memory
# that another process would have to see (lookup reads the store; its quota leases are per process).
SHARED_PORT_SERVICES = frozenset({"lookup"})


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind (not listen) a SO_REUSEPORT socket on ``listen``; (the socket, host:port with the chosen port)."""
    host, _, port = listen.rpartition(":")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0:
        raise SettingsError("--processes needs SO_REUSEPORT, which this system does not offer")
    sock.bind((host.strip("[]") or "0.0.0.0", int(port)))
    return sock, f"{host}:{sock.getsockname()[1]}"


def _metrics_address(listen: str, index: int) -> str:
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + index}" if int(port) else listen


def child_environment(settings: ServiceSettings, address: str, index: int, ready: Path) -> dict[str, str]:
    """The environment of child ``index``: the shared address, its own ready file and metrics port."""
    env = dict(os.environ)
    env.update({"JUKI_LISTEN": address, "JUKI_REUSE_PORT": "true", "JUKI_READY_FILE": str(ready)})
    if settings.metrics_listen:
        env["JUKI_METRICS_LISTEN"] = _metrics_address(settings.metrics_listen, index)
    return env


async def serve_processes(settings: ServiceSettings, serve_args: Sequence[str], processes: int) -> int:
    """Run ``juki serve <serve_args>`` as ``processes`` children on one port until SIGTERM/SIGINT."""
    if settings.service not in SHARED_PORT_SERVICES:
        raise SettingsError(f"--processes is offered for {', '.join(sorted(SHARED_PORT_SERVICES))} only")
    if processes < 1:
        raise SettingsError("--processes must be at least 1")
    reserved, address = reserve_port(settings.listen)
    base = settings.ready_file or Path(settings.data_dir) / f"{settings.instance}.ready"
    readies = [base.with_name(f"{base.name}.{index}") for index in range(processes)]
    children: list[asyncio.subprocess.Process] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for index, ready in enumerate(readies):
            ready.unlink(missing_ok=True)
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "juki", "serve", *serve_args,
                env=child_environment(settings, address, index, ready), stdin=asyncio.subprocess.DEVNULL,
            ))
        await _wait_ready(children, readies)
        if settings.ready_file is not None:
            tmp = settings.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), "instance": settings.instance,
                                       "pids": [child.pid for child in children]}))
            tmp.replace(settings.ready_file)
        log.info("%s serving on %s as %d processes", settings.instance, address, processes)
        ended = [asyncio.ensure_future(child.wait()) for child in children]
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopping, *ended], return_when=asyncio.FIRST_COMPLETED)
        failed = not stop.is_set()
        stopping.cancel()
        if failed:
            log.error("a process of %s ended on its own: stopping the others", settings.instance)
        return 1 if failed else 0
    finally:
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        for child in children:
            await child.wait()
        reserved.close()
        for ready in readies:
            ready.unlink(missing_ok=True)


async def _wait_ready(children: Sequence[asyncio.subprocess.Process], readies: Sequence[Path]) -> None:
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
    while not all(ready.is_file() for ready in readies):
        if any(child.returncode is not None for child in children):
            raise RuntimeError("a process ended before it was ready")
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"the processes were not ready within {READY_TIMEOUT:g} s")
        await asyncio.sleep(0.05)
