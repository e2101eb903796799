"""The local mesh: PKI, database, migrations, one process per service, endpoints.json, restarts.

``juki up`` and ``juki demo`` run this. Each service is a child process (``python -m juki serve ...``)
so that a fault in one is a fault in one, as in Kubernetes; the supervisor restarts a child that dies
and stops them all, in reverse order, on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from juki.mesh import db, pki
from juki.mesh.embedded import EmbeddedDatabaseError, EmbeddedPostgres, start_embedded
from juki.mesh.errors import SettingsError
from juki.mesh.settings import role_name

log = logging.getLogger(__name__)

ENDPOINTS_FILE = "endpoints.json"
DATABASE_INSTANCE = "postgresql"  # the embedded database's name in restart counts
# The local mesh's demo operator signs with its key and this password (checked against a salted hash).
DEMO_OPERATOR_PASSWORD = "demo-password"


@dataclass(frozen=True)
class MeshLayout:
    """Which prefectures and municipalities a local mesh runs."""

    prefectures: tuple[str, ...] = ("13", "14")  # 東京都, 神奈川県
    municipalities: tuple[str, ...] = ("131148", "141003")  # 中野区, 横浜市

    def __post_init__(self) -> None:
        for m in self.municipalities:
            if m[:2] not in self.prefectures:
                raise SettingsError(f"municipality {m} needs its prefecture {m[:2]} in the mesh")


@dataclass
class ChildSpec:
    """One service process of the mesh."""

    instance: str
    package: str
    args: list[str]
    identity: tuple[str, str]  # PKI (kind, name) of its certificate
    port: int = 0
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    replica: int = 0  # 0 for the first process of an instance; replicas share its schema, role and identity

    @property
    def key(self) -> str:
        """The process's own name (logs, readiness, restarts): the instance, then ``.1``, ``.2`` for replicas."""
        return self.instance if self.replica == 0 else f"{self.instance}.{self.replica}"


def instances(layout: MeshLayout, replicas: int = 1) -> list[ChildSpec]:
    """Children in start order: every service starts after the ones it calls; ``replicas`` processes each.

    Every service can run as several processes on one database: reads need nothing; the national fold and
    bulk loads serialise per resident on advisory locks; card PINs and municipal sequences on row locks;
    the access log's appends on its advisory lock; outbox relays and senders on a leader lease (only one
    replica relays at a time, another takes over when it dies).
    """
    if replicas < 1:
        raise SettingsError(f"replicas must be at least 1, not {replicas}")
    return [replace(spec, replica=n, env=dict(spec.env)) for spec in _first_replicas(layout) for n in range(replicas)]


def _first_replicas(layout: MeshLayout) -> list[ChildSpec]:
    specs = [
        ChildSpec("accesslog", "accesslog", ["accesslog"], ("service", "accesslog")),
        ChildSpec("intake-national", "intake", ["intake", "--tier", "national"], ("service", "intake-national")),
    ]
    specs += [
        ChildSpec(f"intake-prefecture-{p}", "intake", ["intake", "--tier", "prefecture", "--prefecture", p],
                  ("prefecture", p))
        for p in layout.prefectures
    ]
    specs += [
        ChildSpec("lookup", "lookup", ["lookup"], ("service", "lookup")),
    ]
    specs += [
        ChildSpec(f"municipal-{m}", "municipal", ["municipal", "--municipality", m], ("municipality", m))
        for m in layout.municipalities
    ]
    specs += [
        ChildSpec("card", "card", ["card"], ("service", "card")),
        ChildSpec("disclosure", "disclosure", ["disclosure"], ("service", "disclosure")),
    ]
    return specs


def migration_targets(layout: MeshLayout) -> list[db.MigrationTarget]:
    return [db.MigrationTarget(spec.package, spec.instance) for spec in _first_replicas(layout)]


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port for a service to listen on later, below the kernel's ephemeral range.

    A port taken by binding port 0 comes from the ephemeral range, and between here and the moment the
    child binds it, any outgoing connection on this machine (a gRPC client, a test) may be given the same
    port as its local end: the child then fails with "Address already in use". Ports below that range are
    never given to outgoing connections; each is handed out once per process.
    """
    high = max(_ephemeral_low() - 1, 20_000)
    for _ in range(1000):
        port = random.randint(15_000, high)
        if port not in _HANDED_OUT and _port_free(port):
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ensure_pki(data_dir: Path, layout: MeshLayout) -> pki.CertificateAuthority:
    ca = pki.CertificateAuthority(data_dir / "pki")
    ca.create()
    for kind, name, display in pki.mesh_identities(list(layout.prefectures), list(layout.municipalities)):
        ca.issue(kind, name, display_name=display)
    return ca


class Supervisor:
    """Owns the database handle and the service processes of one local mesh."""

    def __init__(
        self,
        data_dir: Path,
        layout: MeshLayout | None = None,
        *,
        database_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        echo: Callable[[str], None] = lambda line: None,
        replicas: int = 1,
    ) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.layout = layout or MeshLayout()
        self.replicas = replicas
        self.database_url = database_url
        self.extra_env = dict(extra_env or {})
        self.echo = echo
        self.embedded: EmbeddedPostgres | None = None
        self.specs = instances(self.layout, replicas)
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {}
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self.ca: pki.CertificateAuthority | None = None

    # -- set-up ------------------------------------------------------------------------------------

    def role_url(self, role: str) -> str:
        if self.embedded is not None:
            return self.embedded.url(role)
        assert self.database_url is not None
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.database_url)
        host = parts.hostname or ""
        netloc = f"{role}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def admin_url(self) -> str:
        if self.embedded is not None:
            return self.embedded.admin_url
        assert self.database_url is not None
        return self.database_url

    async def prepare(self) -> None:
        """PKI, database and migrations: everything before the first process starts."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Left by a mesh that did not stop cleanly: it would tell clients a mesh is ready that is not.
        (self.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        (self.data_dir / "run").mkdir(exist_ok=True)
        self.echo(f"data directory {self.data_dir}")
        self.ca = ensure_pki(self.data_dir, self.layout)
        if self.database_url is None:
            self.embedded = await asyncio.to_thread(start_embedded, self.data_dir)
            self.echo(f"embedded PostgreSQL ready (socket {self.embedded.socket_dir})")
        applied = await db.migrate(self.admin_url, migration_targets(self.layout))
        fresh = sum(len(v) for v in applied.values())
        self.echo(f"migrations: {fresh} applied" if fresh else "migrations: up to date")
        self._assign_ports()

    def _assign_ports(self) -> None:
        ports_file = self.data_dir / "run" / "ports.json"
        known: dict[str, int] = {}
        if ports_file.is_file():
            with contextlib.suppress(ValueError, json.JSONDecodeError):
                known = {k: int(v) for k, v in json.loads(ports_file.read_text()).items()}
        for spec in self.specs:
            port = known.get(spec.key)
            spec.port = port if port and _port_free(port) else free_port()
            metrics_port = known.get(f"{spec.key}/metrics")
            spec.metrics_port = metrics_port if metrics_port and _port_free(metrics_port) else free_port()
        ports = {s.key: s.port for s in self.specs} | {f"{s.key}/metrics": s.metrics_port for s in self.specs}
        ports_file.write_text(json.dumps(ports, indent=1))

    def addresses(self, instance: str) -> list[str]:
        """Every replica's address of ``instance`` (or of one process, given its key)."""
        found = [f"127.0.0.1:{spec.port}" for spec in self.specs if instance in (spec.instance, spec.key)]
        if not found:
            raise KeyError(instance)
        return found

    def address(self, instance: str) -> str:
        """The gRPC target of ``instance``: one address, or every replica's (``ipv4:a,b``: round_robin per call)."""
        found = self.addresses(instance)
        return found[0] if len(found) == 1 else "ipv4:" + ",".join(found)


    def _env_for(self, spec: ChildSpec) -> dict[str, str]:
        assert self.ca is not None
        cert, key = self.ca.paths(*spec.identity)
        env = dict(os.environ)
        env.update(self.extra_env)
        prefecture = spec.instance.rsplit("-", 1)[-1][:2] if spec.package in ("municipal",) else None
        env.update({
            "JUKI_DATA_DIR": str(self.data_dir),
            "JUKI_LISTEN": f"127.0.0.1:{spec.port}",
            "JUKI_REPLICA": spec.key,
            "JUKI_METRICS_LISTEN": f"127.0.0.1:{spec.metrics_port}",
            "JUKI_TLS_CA_FILE": str(self.ca.ca_cert_path),
            "JUKI_TLS_CERT_FILE": str(cert),
            "JUKI_TLS_KEY_FILE": str(key),
            "JUKI_TLS_CRL_FILE": str(self.ca.crl_path),
            "JUKI_DATABASE_URL": self.role_url(role_name(spec.instance)),
            "JUKI_ACCESSLOG_ADDRESS": self.address("accesslog"),
            "JUKI_NATIONAL_INTAKE_ADDRESS": self.address("intake-national"),
            "JUKI_LOOKUP_ADDRESS": self.address("lookup"),
            "JUKI_CARD_ADDRESS": self.address("card"),
            "JUKI_MUNICIPAL_ADDRESSES": ",".join(
                f"{m}={self.address('municipal-' + m)}" for m in self.layout.municipalities
            ),
            "JUKI_PREFECTURE_INTAKE_ADDRESSES": ",".join(
                f"{p}={self.address('intake-prefecture-' + p)}" for p in self.layout.prefectures
            ),
            "JUKI_ACCESSLOG_SIGNING_KEY_FILE": str(self.ca.paths("signing", "accesslog")[1]),
            "JUKI_ACCESSLOG_SIGNING_CERT_FILE": str(self.ca.paths("signing", "accesslog")[0]),
            "JUKI_PSEUDONYM_KEY_FILE": str(self._pseudonym_key()),
            "JUKI_OPERATOR_PASSWORDS_FILE": str(self._operator_passwords()),
            "JUKI_READY_FILE": str(self.data_dir / "run" / f"{spec.key}.ready"),
            "OTEL_SERVICE_NAME": f"juki-{spec.instance}",
            "OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id={spec.key}",
            "PYTHONUNBUFFERED": "1",
            # gRPC's C core logs to fd 2 in its own format; run/<instance>.log is JSON lines only. The
            # child moves the C core's output to run/<instance>.grpc.log, and only its errors are kept
            # (at INFO it writes a line for every refused TLS handshake, e.g. a client without a
            # certificate). GRPC_VERBOSITY or GRPC_TRACE set by the caller still apply: their output goes
            # to that file too.
            "JUKI_NATIVE_LOG_FILE": str(self.data_dir / "run" / f"{spec.key}.grpc.log"),
            "GRPC_VERBOSITY": env.get("GRPC_VERBOSITY", "ERROR"),
        })
        if prefecture:
            env["JUKI_PREFECTURE_INTAKE_ADDRESS"] = self.address(f"intake-prefecture-{prefecture}")
        env.update(spec.env)
        return env

    def _operator_passwords(self) -> Path:
        """Password hashes of the local mesh's operators (the demo operator's is DEMO_OPERATOR_PASSWORD)."""
        path = self.data_dir / "pki" / "operator-passwords.json"
        if not path.is_file():
            from juki.mesh.operator import hash_operator_password

            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"demo-operator": hash_operator_password(DEMO_OPERATOR_PASSWORD)}, f)
        return path

    def _pseudonym_key(self) -> Path:
        path = self.data_dir / "pki" / "pseudonym.key"
        if not path.is_file():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex())
        return path

    # -- processes ----------------------------------------------------------------------------------

    async def _spawn(self, spec: ChildSpec) -> asyncio.subprocess.Process:
        ready = self.data_dir / "run" / f"{spec.key}.ready"
        ready.unlink(missing_ok=True)
        logfile = open(self.data_dir / "run" / f"{spec.key}.log", "ab")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "juki", "serve", *spec.args,
            env=self._env_for(spec), stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile,
            start_new_session=True,
        )
        logfile.close()
        self.processes[spec.key] = proc
        deadline = time.monotonic() + 60
        while not ready.is_file():
            if proc.returncode is not None:
                tail = (self.data_dir / "run" / f"{spec.key}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{spec.key} exited with {proc.returncode} during start-up:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{spec.key} did not become ready within 60 s")
            await asyncio.sleep(0.05)
        return proc

    async def start(self, *, publish: bool = True) -> None:
        """Start every process. ``publish=False`` leaves ``endpoints.json`` to :meth:`write_endpoints`,
        called once the mesh is ready for clients (``juki up`` seeds the population first)."""
        for spec in self.specs:
            await self._spawn(spec)
            self.echo(f"  {spec.key:<24} 127.0.0.1:{spec.port}  pid {self.processes[spec.key].pid}")
        if publish:
            self.write_endpoints()
        self._watchers = [asyncio.create_task(self._watch(spec)) for spec in self.specs]
        if self.embedded is not None:
            self._watchers.append(asyncio.create_task(self._watch_database(self.embedded)))

    async def _watch(self, spec: ChildSpec) -> None:
        """Restart a child that dies while the mesh is up, as Kubernetes would."""
        backoff = 0.2
        while not self._stopping:
            proc = self.processes[spec.key]
            code = await proc.wait()
            if self._stopping:
                return
            self.restarts[spec.key] = self.restarts.get(spec.key, 0) + 1
            log.warning("%s exited with %s; restarting", spec.key, code)
            self.echo(f"{spec.key} exited with {code}; restarting")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            try:
                await self._spawn(spec)
                backoff = 0.2
            except RuntimeError as exc:
                log.error("restart of %s failed: %s", spec.key, exc)

    async def _watch_database(self, embedded: EmbeddedPostgres, interval: float = 0.25) -> None:
        """Start the embedded PostgreSQL again when it dies, as the services' own restarts do for them.

        The postmaster's pid is checked every ``interval``. After a crash the helper cleans the stale pid
        state and starts the server, which replays its WAL before it accepts connections; while the old
        server's children still hold its shared memory the start fails and is tried again with a capped
        backoff. Services reconnect by themselves (their pools replace broken connections).
        """
        down_since: float | None = None
        attempts = 0
        backoff = 0.2
        while not self._stopping:
            if embedded.running():
                await asyncio.sleep(interval)
                continue
            if down_since is None:
                down_since = time.monotonic()
                attempts = 0
                log.warning("embedded PostgreSQL is not running; starting it unless it comes back")
            attempts += 1
            try:
                started = await asyncio.to_thread(embedded.ensure_running)
            except EmbeddedDatabaseError as error:
                if self._stopping:
                    return
                log.info("embedded PostgreSQL restart attempt %d failed: %s", attempts, str(error)[-300:])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            took = time.monotonic() - down_since
            if not started:  # it was down only for a restart made by someone else (pg_ctl restart)
                log.info("embedded PostgreSQL is running again after %.1f s (restarted, not by this watcher)", took)
                down_since, backoff = None, 0.2
                continue
            self.restarts[DATABASE_INSTANCE] = self.restarts.get(DATABASE_INSTANCE, 0) + 1
            log.warning("embedded PostgreSQL back after %.1f s with %d attempts", took, attempts)
            self.echo(f"embedded PostgreSQL back after {took:.1f} s with {attempts} attempt(s)")
            down_since, backoff = None, 0.2

    async def kill_database(self, sig: int = signal.SIGKILL) -> int:
        """Signal the embedded postmaster (chaos tests); the database watcher restarts it. Returns its pid."""
        assert self.embedded is not None, "only the embedded database can be killed"
        pid = self.embedded.pid()
        assert pid is not None, "the embedded database is not running"
        os.kill(pid, sig)
        return pid

    async def wait_database_restarted(self, old_pid: int, timeout: float = 60) -> None:
        assert self.embedded is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.embedded.pid()
            if pid is not None and pid != old_pid:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the embedded database was not restarted within {timeout} s")

    async def kill(self, instance: str, sig: int = signal.SIGKILL) -> int:
        """Send a signal to one child (chaos tests); the watcher restarts it. Returns the old pid."""
        proc = self.processes[instance]
        proc.send_signal(sig)
        return proc.pid

    async def wait_restarted(self, instance: str, old_pid: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        ready = self.data_dir / "run" / f"{instance}.ready"
        while time.monotonic() < deadline:
            proc = self.processes.get(instance)
            if proc is not None and proc.pid != old_pid and proc.returncode is None and ready.is_file():
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{instance} was not restarted within {timeout} s")

    async def stop(self) -> None:
        self._stopping = True
        for spec in reversed(self.specs):
            proc = self.processes.get(spec.key)
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for spec in reversed(self.specs):
            proc = self.processes.get(spec.key)
            if proc is None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), timeout=20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._watchers:
            task.cancel()
        (self.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None

    # -- endpoints.json ------------------------------------------------------------------------------

    def write_endpoints(self) -> Path:
        assert self.ca is not None
        ca = self.ca

        def client(kind: str, name: str) -> dict[str, str]:
            cert, key = ca.paths(kind, name)
            return {"spiffe_id": pki.spiffe_id(kind, name), "cert": str(cert), "key": str(key)}

        document: dict[str, Any] = {
            # The readiness signal: the file is written (atomically) only once every service answers and,
            # under `juki up`, the population is seeded; it is removed when the mesh stops.
            "ready": True,
            "data_dir": str(self.data_dir),
            "supervisor_pid": os.getpid(),
            "ca": str(ca.ca_cert_path),
            "crl": str(ca.crl_path),
            # Per instance: the target clients use (every replica's address, balanced per call), the first
            # replica's metrics and pid (as before replicas), and each replica on its own.
            "services": {
                spec.instance: {
                    "address": self.address(spec.instance),
                    "addresses": self.addresses(spec.instance),
                    "spiffe_id": pki.spiffe_id(*spec.identity),
                    "metrics": f"http://127.0.0.1:{spec.metrics_port}/metrics",
                    "pid": self.processes[spec.key].pid if spec.key in self.processes else None,
                    "replicas": [
                        {"name": r.key, "address": f"127.0.0.1:{r.port}",
                         "metrics": f"http://127.0.0.1:{r.metrics_port}/metrics",
                         "pid": self.processes[r.key].pid if r.key in self.processes else None}
                        for r in self.specs if r.instance == spec.instance
                    ],
                }
                for spec in self.specs if spec.replica == 0
            },
            "clients": {
                "agency": client("agency", "jps"),
                "operator": {**client("operator", "demo-operator"), "password": DEMO_OPERATOR_PASSWORD},
                "private": client("private", "acme-insurance"),
                **{f"municipality-{m}": client("municipality", m) for m in self.layout.municipalities},
                **{f"prefecture-{p}": client("prefecture", p) for p in self.layout.prefectures},
            },
            "database": {"admin_url": self.admin_url, "embedded": self.embedded is not None},
            "layout": {"prefectures": list(self.layout.prefectures),
                       "municipalities": list(self.layout.municipalities)},
        }
        path = self.data_dir / ENDPOINTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False))
        tmp.replace(path)
        return path


def read_endpoints(data_dir: Path) -> dict[str, Any]:
    path = data_dir.expanduser() / ENDPOINTS_FILE
    if not path.is_file():
        raise SettingsError(
            f"no running mesh found: {path} does not exist (start one with `juki up`, or pass --data-dir)"
        )
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def wait_for_signals(stop: asyncio.Event, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
