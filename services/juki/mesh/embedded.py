"""The embedded PostgreSQL (``pgserver``) a local mesh uses when no database URL is configured.

The server lives in ``<data dir>/pg`` and listens on a Unix socket only.

Every ``pg_ctl``/``initdb`` call runs in a short-lived helper process (``python -m juki.mesh.embedded``),
never in the caller. Run as root, pgserver starts PostgreSQL as its own ``pgserver`` user, which makes
``subprocess`` use a real ``fork()`` (``vfork`` cannot change the user). A real fork in a process that
already has gRPC threads runs gRPC's fork handlers while other threads are inside gRPC, and the child
can die with SIGSEGV before it reaches ``exec`` (seen as ``pg_ctl ... died with SIGSEGV`` after
``fork_posix.cc: Other threads are currently calling into gRPC, skipping fork() handlers``). The helper
is started with ``vfork``+``exec`` (no user change, no ``preexec_fn``), imports neither gRPC nor
asyncio, and so forks from a clean, single-threaded process whatever its caller is doing.

Who may stop the server: every process that starts or joins it is listed as an owner in
``<data dir>/pg.owners.json``; ``stop()`` removes the caller and stops the server only when no live owner
is left (``juki migrate`` against a running ``juki up`` must not stop the mesh's database). Owners that
died without stopping are dropped. A killed server leaves a stale ``postmaster.pid``, and pgserver's own
``.handle_pids.json`` may list dead processes; both are recovered from on the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

DATABASE = "juki"
HELPER_TIMEOUT = 120.0


class EmbeddedDatabaseError(RuntimeError):
    """The helper could not start, stop or restart the embedded server; the message carries its output."""


# -- state that the caller manages itself (no fork involved) ------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_postgres(pid: int) -> bool:
    try:
        return "postgres" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return True  # cannot tell: let PostgreSQL decide


def recover_stale_state(pgdata: Path) -> list[str]:
    """Drop dead owners from pgserver's handle list and a postmaster.pid whose process is gone."""
    notes: list[str] = []
    handles = pgdata / ".handle_pids.json"
    if handles.is_file():
        try:
            pids = [int(p) for p in json.loads(handles.read_text() or "[]")]
        except (ValueError, json.JSONDecodeError):
            pids = []
        alive = [p for p in pids if _pid_alive(p) and p != os.getpid()]
        if alive != pids:
            handles.write_text(json.dumps(alive))
            notes.append(f"dropped dead owner pids {sorted(set(pids) - set(alive))}")
    postmaster = pgdata / "postmaster.pid"
    if postmaster.is_file():
        pid = postmaster_pid(pgdata)
        if pid is None or not _pid_alive(pid) or not _is_postgres(pid):
            postmaster.unlink(missing_ok=True)
            notes.append(f"removed stale postmaster.pid (pid {pid})")
    return notes


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid in ``postmaster.pid``, or None when there is none (whether or not it is alive)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid > 0 else None


def _owners_file(pgdata: Path) -> Path:
    return pgdata.parent / "pg.owners.json"


@contextlib.contextmanager
def _owners(pgdata: Path) -> Iterator[list[int]]:
    """The live owners of the server, under an exclusive lock; the list is written back on exit."""
    path = _owners_file(pgdata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            raw = json.loads(path.read_text()) if path.is_file() else []
        except (OSError, json.JSONDecodeError):
            raw = []
        owners = [int(p) for p in raw if isinstance(p, int) and _pid_alive(int(p))]
        yield owners
        path.write_text(json.dumps(sorted(set(owners))))


# -- the handle the caller keeps ----------------------------------------------------------------------------

@dataclass
class EmbeddedPostgres:
    """A running embedded server and the URLs to reach it as any role."""

    pgdata: Path
    socket_dir: str
    port: int
    # Starts, restarts and stops from this process one at a time: a watcher that finds the server down in
    # the middle of a restart must not start a second postmaster on the same data directory.
    _lifecycle: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def url(self, role: str = "postgres", database: str = DATABASE) -> str:
        return f"postgresql://{quote(role)}@/{database}?host={quote(self.socket_dir)}&port={self.port}"

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    @property
    def log_file(self) -> Path:
        return self.pgdata / "log"

    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None."""
        pid = postmaster_pid(self.pgdata)
        return pid if pid is not None and _pid_alive(pid) and _is_postgres(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def ensure_running(self) -> bool:
        """Start the server again if it is not running (after a crash: stale state cleaned, WAL replayed).

        Returns True when it had to be started. The socket directory and port do not change, so URLs that
        services hold stay valid.
        """
        with self._lifecycle:
            if self.running():
                return False  # running again (a restart in progress has finished)
            _run_helper("start", self.pgdata)
            return True

    def restart(self, mode: str = "fast") -> None:
        """Restart the server; ``mode="immediate"`` is a crash-like restart (WAL recovery on start)."""
        with self._lifecycle:
            _run_helper("restart", self.pgdata, "--mode", mode)

    def stop(self) -> None:
        """Leave the server; stop it when no other live process still uses it."""
        with _owners(self.pgdata) as owners:
            if os.getpid() in owners:
                owners.remove(os.getpid())
            last = not owners
        if last:
            with self._lifecycle:
                _run_helper("stop", self.pgdata)


def start_embedded(data_dir: Path) -> EmbeddedPostgres:
    """Start (or join) the embedded server in ``data_dir/pg`` and make sure the ``juki`` database exists."""
    from juki.extras import need

    need("pgserver", "local", "the embedded PostgreSQL (used when no database URL is given)")
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = (data_dir / "pg").resolve()
    with _owners(pgdata) as owners:
        info = _run_helper("start", pgdata)
        owners.append(os.getpid())
    return EmbeddedPostgres(pgdata=pgdata, socket_dir=str(info["socket_dir"]), port=int(str(info["port"])))


def _run_helper(action: str, pgdata: Path, *args: str) -> dict[str, object]:
    """Run one action in a fresh helper process; its JSON answer, or EmbeddedDatabaseError with its output."""
    # Temporary files, not pipes: the postmaster that pg_ctl starts would inherit a pipe and keep it open,
    # and reading it to its end would then wait for the server to exit.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            result = subprocess.run(
                [sys.executable, "-m", "juki.mesh.embedded", action, str(pgdata), *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=HELPER_TIMEOUT, check=False,
                env=_helper_env(),
            )
        except subprocess.TimeoutExpired as error:
            raise EmbeddedDatabaseError(f"embedded PostgreSQL: {action} took over {HELPER_TIMEOUT:.0f} s") from error
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if result.returncode != 0:
        raise EmbeddedDatabaseError(
            f"embedded PostgreSQL: {action} failed (exit {result.returncode}): {stderr.strip()[-4000:]}")
    for line in stderr.splitlines():
        if line.startswith("note: "):
            log.warning("embedded PostgreSQL: %s", line[6:])
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    answer: dict[str, object] = json.loads(lines[-1]) if lines else {}
    return answer


def _helper_env() -> dict[str, str]:
    env = dict(os.environ)
    # pgserver keeps its lock file in the XDG runtime dir; give it a private one when unset.
    if not env.get("XDG_RUNTIME_DIR"):
        path = Path(tempfile.gettempdir()) / f"juki-runtime-{os.getuid()}"
        path.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(path)
    # The helper finds this package the way its caller did, even when the caller was started from a path.
    here = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# -- the helper process --------------------------------------------------------------------------------------

def _helper_start(pgdata: Path) -> dict[str, object]:
    import pgserver  # imported here only: it reads XDG_RUNTIME_DIR at import time

    if pgdata.exists():
        for note in recover_stale_state(pgdata):
            print(f"note: {note}", file=sys.stderr)
    # cleanup_mode=None: the server outlives this helper; stopping is the owners' decision (see stop()).
    handle = pgserver.get_server(pgdata, cleanup_mode=None)
    _tune(handle)
    exists = handle.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
    if "(1 row)" not in exists:
        handle.psql(f"CREATE DATABASE {DATABASE};")
    info = handle.get_postmaster_info()
    return {"socket_dir": str(info.socket_dir), "port": int(info.port), "pid": int(info.pid)}


def _pg_ctl(pgdata: Path, args: list[str], timeout: float = 60) -> None:
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    user = "pgserver" if os.geteuid() == 0 else None  # pgserver runs the server as this user under root
    pg_ctl(args, pgdata=pgdata, user=user, timeout=timeout)


def _socket_dir(pgdata: Path) -> str:
    lines = (pgdata / "postmaster.pid").read_text().splitlines()
    return lines[4].strip()


def _helper_restart(pgdata: Path, mode: str) -> dict[str, object]:
    socket_dir = _socket_dir(pgdata)
    _pg_ctl(pgdata, ["-w", "-m", mode, "restart", "-o", f'-h "" -k {socket_dir}', "-l", str(pgdata / "log")])
    return {"pid": postmaster_pid(pgdata)}


def _helper_stop(pgdata: Path) -> dict[str, object]:
    pid = postmaster_pid(pgdata)
    if pid is None or not _pid_alive(pid):
        return {"stopped": False}
    _pg_ctl(pgdata, ["-w", "-m", "fast", "stop"])
    return {"stopped": True}


def _psql_rows(handle: object, sql: str) -> list[list[str]]:
    """Rows of one query through psql (unaligned, ``|``-separated), in this helper process."""
    from pgserver._commands import POSTGRES_BIN_PATH

    uri = handle.get_uri()  # type: ignore[attr-defined]
    out = subprocess.run([str(POSTGRES_BIN_PATH / "psql"), "-X", "-A", "-t", "-F", "|", "-c", sql, uri],
                         capture_output=True, text=True, check=True, timeout=60, stdin=subprocess.DEVNULL)
    return [line.split("|") for line in out.stdout.splitlines() if line]


_UNIT_BYTES = {"B": 1, "kB": 1024, "8kB": 8192, "16kB": 16384, "MB": 1024 * 1024}
_UNIT_MS = {"ms": 1, "s": 1000, "min": 60_000}


def _normal(value: str, unit: str) -> str:
    """A setting in a comparable form: memory in bytes, time in ms, anything else as written."""
    from juki.mesh.pgtune import parse_size

    if unit in _UNIT_BYTES:
        try:
            return str(parse_size(value) if not value.isdigit() else int(value) * _UNIT_BYTES[unit])
        except ValueError:
            return value
    if unit in _UNIT_MS:
        for suffix, factor in (("min", 60_000), ("ms", 1), ("s", 1000)):
            if value.endswith(suffix) and value[: -len(suffix)].isdigit():
                return str(int(value[: -len(suffix)]) * factor)
        return str(int(value) * _UNIT_MS[unit]) if value.isdigit() else value
    return value


def _tune(handle: object) -> None:
    """Size the server for this machine (mesh/pgtune.py) at every start; restart only when that must.

    Parameters that differ from the running server are written with ALTER SYSTEM; if one of them can only
    change at a restart (shared_buffers, max_connections, ...), the server is restarted, else reloaded.
    """
    from juki.mesh.pgtune import embedded_parameters

    wanted = embedded_parameters()
    names = ",".join(f"'{name}'" for name in wanted)
    current = {row[0]: row for row in _psql_rows(
        handle, f"SELECT name, setting, coalesce(unit, ''), context FROM pg_settings WHERE name IN ({names})")}
    unknown = sorted(set(wanted) - set(current))
    if unknown:
        raise EmbeddedDatabaseError(f"unknown PostgreSQL parameters (JUKI_PG_*?): {', '.join(unknown)}")
    changed = {name: value for name, value in wanted.items()
               if _normal(value, current[name][2]) != _normal(current[name][1], current[name][2])}
    if not changed:
        return
    handle.psql("".join(  # type: ignore[attr-defined]
        f"ALTER SYSTEM SET {name} = '{value}';" for name, value in changed.items()))
    if any(current[name][3] == "postmaster" for name in changed):
        pgdata = Path(handle.pgdata)  # type: ignore[attr-defined]
        _helper_restart(pgdata, "fast")
        _wait_ready(handle, pgdata)
    else:
        handle.psql("SELECT pg_reload_conf();")  # type: ignore[attr-defined]


def _wait_ready(handle: object, pgdata: Path) -> None:
    from pgserver.utils import PostmasterInfo

    # pgserver caches the postmaster's details; read them again after the restart.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is not None and info.is_running() and info.status == "ready":
            handle._postmaster_info = info  # type: ignore[attr-defined]
            return
        time.sleep(0.1)
    raise EmbeddedDatabaseError("embedded PostgreSQL did not come back after tuning")


def main(argv: list[str]) -> int:
    """``python -m juki.mesh.embedded start|stop|restart PGDATA [--mode fast|immediate]``: one JSON line."""
    if len(argv) < 2 or argv[0] not in ("start", "stop", "restart"):
        print("usage: python -m juki.mesh.embedded start|stop|restart PGDATA [--mode fast|immediate]",
              file=sys.stderr)
        return 2
    action, pgdata = argv[0], Path(argv[1]).resolve()
    if action == "start":
        answer = _helper_start(pgdata)
    elif action == "stop":
        answer = _helper_stop(pgdata)
    else:
        mode = argv[argv.index("--mode") + 1] if "--mode" in argv else "fast"
        answer = _helper_restart(pgdata, mode)
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
