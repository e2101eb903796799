"""The one harness of every ``juki bench``: a throwaway place to measure in, and the measuring tools.

* :class:`Harness`: a temporary directory with the mesh's CA (every identity of the default layout), an
  embedded PostgreSQL with the schemas a bench needs, and server processes started as ``juki up`` starts
  them (``python -m juki serve ...``, ready when they write their ready file), or an echo server;
  closed (processes stopped, database stopped, directory removed unless kept) whatever happens.
* :func:`serve_echo`: the body of an echo server process, a bare mTLS ``grpc.aio`` server with no
  interceptors and no work behind it. Each bench answers with messages of the service's shapes, and the
  same client against it gives the machine's ceiling for that traffic, measured in the same run.
* :class:`CpuMeter`: CPU seconds by process (each server, PostgreSQL with all its backends, this client)
  between readings, from /proc.
* :func:`percentile`, :func:`rss_kib` and :func:`emit` (the one JSON object a bench prints).

Nothing here is imported by a service: the benches are tools around the services, not part of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from juki.mesh.pki import CertificateAuthority
    from juki.mesh.settings import TlsFiles

START_TIMEOUT = 60.0


class Harness:
    """Temporary directory, CA, embedded PostgreSQL and the server processes of one bench run.

    ``name`` names the directory (``juki-bench-<name>-...``); ``keep`` leaves it in place (logs,
    profiles); ``profile`` runs each server under py-spy (raw stacks into that folder).
    """

    def __init__(self, name: str, *, keep: bool = False, profile: Path | None = None) -> None:
        self.keep = keep
        self.profile = profile
        self.root = Path(tempfile.mkdtemp(prefix=f"juki-bench-{name}-"))
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.pg: Any = None
        self._ca: CertificateAuthority | None = None

    # -- the place ------------------------------------------------------------------------------------

    async def prepare(self, migrations: Sequence[tuple[str, str]]) -> None:
        """The CA, the embedded PostgreSQL and the schemas: ``migrations`` are (service, instance) pairs."""
        from juki.mesh import db
        from juki.mesh.embedded import start_embedded
        from juki.mesh.supervisor import MeshLayout, ensure_pki

        self._ca = ensure_pki(self.root, MeshLayout())
        self.pg = start_embedded(self.root)
        await db.migrate(self.pg.admin_url, [db.MigrationTarget(service, instance) for service, instance in migrations])

    @property
    def ca(self) -> CertificateAuthority:
        """The mesh's CA with every identity of the default layout (see :func:`juki.mesh.pki.mesh_identities`)."""
        if self._ca is None:
            raise RuntimeError("the harness is not prepared yet")
        return self._ca

    @property
    def pseudonym_file(self) -> Path:
        """The access log's pseudonym key (made on first use)."""
        path = self.root / "pseudonym.key"
        if not path.is_file():
            path.write_text(os.urandom(32).hex())
        return path

    def tls(self, kind: str, name: str) -> TlsFiles:
        """The client (or server) files of an identity, issued if the CA has not issued it yet."""
        from juki.mesh.settings import TlsFiles

        cert, key = self.ca.paths(kind, name)
        if not cert.is_file():
            self.ca.issue(kind, name)
        return TlsFiles(ca=self.ca.ca_cert_path, cert=cert, key=key)

    # -- server processes -----------------------------------------------------------------------------

    def server_env(self, name: str, identity: tuple[str, str], *, listen: str = "127.0.0.1:0",
                   keep_prefixes: Iterable[str] = (), **settings: str) -> dict[str, str]:
        """The environment of a server process: this place's TLS files, data directory and ready file,
        ``listen``, and ``settings`` (``JUKI_*`` names). The caller's own ``JUKI_*`` variables are dropped
        (a mesh's settings must not leak in) except those starting with one of ``keep_prefixes``."""
        tls = self.tls(*identity)
        keep = tuple(keep_prefixes)
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUKI_") or (keep and k.startswith(keep))}
        env.update({
            "JUKI_DATA_DIR": str(self.root),
            "JUKI_LISTEN": listen,
            "JUKI_TLS_CA_FILE": str(tls.ca),
            "JUKI_TLS_CERT_FILE": str(tls.cert),
            "JUKI_TLS_KEY_FILE": str(tls.key),
            "JUKI_TLS_CRL_FILE": str(self.ca.crl_path),
            "JUKI_READY_FILE": str(self.root / f"{name}.ready"),
            "JUKI_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(settings)
        return env

    def spawn_service(self, name: str, serve: Sequence[str], env: Mapping[str, str]) -> str:
        """``python -m juki serve <serve...>`` as ``name``; its address once it is ready."""
        return self.spawn(name, [sys.executable, "-m", "juki", "serve", *serve], env)

    def spawn_echo(self, name: str, module: str, env: Mapping[str, str]) -> str:
        """``python -m <module>``, whose ``__main__`` runs :func:`serve_echo`; its address once ready."""
        return self.spawn(name, [sys.executable, "-m", module], env)

    def spawn(self, name: str, command: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> str:
        """Start (or, with no command, start again as before) a server process; wait for its ready file."""
        if command is None or env is None:
            command, env = self._commands[name]
        self._commands[name] = (list(command), dict(env))
        ready = Path(env["JUKI_READY_FILE"])
        ready.unlink(missing_ok=True)
        argv = list(command)
        if self.profile is not None:
            self.profile.mkdir(parents=True, exist_ok=True)
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            mode = ["--native"] if os.environ.get("JUKI_BENCH_NATIVE") else ["--nonblocking"]
            argv = [py_spy, "record", *mode, "-r", "250", "-f", "raw", "-o", str(self.profile / f"{name}.txt"),
                    "--", *argv]
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            self.processes[name] = subprocess.Popen(
                argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.is_file():
            if self.processes[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {log_path}:\n" + log_path.read_text()[-3000:])
            time.sleep(0.05)
        return str(json.loads(ready.read_text())["address"])

    def kill(self, name: str) -> None:
        """SIGKILL a server (no drain, no clean shutdown); :meth:`spawn` with its name starts it again."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                # py-spy writes its profile on SIGINT (and then stops the server it runs).
                process.send_signal(signal.SIGINT if self.profile is not None else signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.pg is not None:
            self.pg.stop()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


# -- the echo server (runs in its own process) -------------------------------------------------------------

async def serve_echo(add_handlers: Callable[[grpc.aio.Server], None]) -> None:
    """A bare mTLS ``grpc.aio`` server (the service's TLS settings, no interceptors) on ``JUKI_LISTEN``,
    with the handlers ``add_handlers`` adds; writes ``JUKI_READY_FILE`` and runs until SIGTERM/SIGINT."""
    import grpc

    from juki.mesh.settings import TlsFiles
    from juki.mesh.tls import SERVER_OPTIONS, server_credentials

    tls = TlsFiles(ca=Path(os.environ["JUKI_TLS_CA_FILE"]), cert=Path(os.environ["JUKI_TLS_CERT_FILE"]),
                   key=Path(os.environ["JUKI_TLS_KEY_FILE"]))
    server = grpc.aio.server(options=list(SERVER_OPTIONS))
    add_handlers(server)
    port = server.add_secure_port(os.environ.get("JUKI_LISTEN", "127.0.0.1:0"), server_credentials(tls))
    await server.start()
    ready = Path(os.environ["JUKI_READY_FILE"])
    ready.with_suffix(".tmp").write_text(json.dumps({"address": f"127.0.0.1:{port}", "pid": os.getpid()}))
    ready.with_suffix(".tmp").replace(ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


# -- measuring -------------------------------------------------------------------------------------------

class CpuMeter:
    """CPU seconds used by each server process, PostgreSQL and this client between two readings."""

    def __init__(self, harness: Harness) -> None:
        self._pids = harness.pids()
        self._pgdata = str(harness.pg.pgdata) if harness.pg is not None else ""
        self._start = self._read()
        self.used: dict[str, float] = {}

    @staticmethod
    def _process_seconds(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _postgres_seconds(self) -> float:
        """The bench's own PostgreSQL: its postmaster and every child (backends, WAL writer...)."""
        try:
            postmaster = int((Path(self._pgdata) / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        total = self._process_seconds(postmaster)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if parent == postmaster:
                    total += self._process_seconds(int(entry.name))
        return total

    def _read(self) -> dict[str, float]:
        reading = {name: self._process_seconds(pid) for name, pid in self._pids.items()}
        reading["postgres"] = self._postgres_seconds()
        reading["client"] = time.process_time()
        return reading

    def stop(self) -> None:
        end = self._read()
        for name, value in end.items():
            self.used[name] = self.used.get(name, 0.0) + max(value - self._start.get(name, value), 0.0)

    def restart(self) -> None:
        self._start = self._read()

    def per_unit(self, units: float) -> dict[str, float]:
        """Microseconds of CPU per call (or record) by process; postgres counts every backend."""
        return {name: round(seconds / units * 1e6, 1) for name, seconds in sorted(self.used.items()) if seconds}


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value at ``fraction`` of the sorted values (nearest rank from below); 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process (VmRSS), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def emit(result: Mapping[str, Any]) -> None:
    """Print a bench's one JSON object on stdout (a closed pipe, as with ``| head``, is not an error)."""
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def json_flag(parser: Any) -> None:
    """``--json``: every bench prints one JSON object anyway; the flag is kept for scripts that pass it."""
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default output anyway)")
