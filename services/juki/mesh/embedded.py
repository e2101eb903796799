"""The embedded PostgreSQL (``pgserver``) a local mesh uses when no database URL is configured.

The server lives in ``<data dir>/pg`` and listens on a Unix socket only. A previous run that was
killed may leave its pid in ``.handle_pids.json`` (pgserver would then never stop the server) or a
stale ``postmaster.pid``; both are recovered from here rather than being fatal.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

DATABASE = "juki"


def _prepare_runtime_dir() -> None:
    # pgserver keeps its lock file in the XDG runtime dir; give it a private one when unset.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(tempfile.gettempdir()) / f"juki-runtime-{os.getuid()}"
        path.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        try:
            pid = int(postmaster.read_text().splitlines()[0])
        except (ValueError, IndexError):
            pid = -1
        if pid <= 0 or not _pid_alive(pid) or not _is_postgres(pid):
            postmaster.unlink()
            notes.append(f"removed stale postmaster.pid (pid {pid})")
    return notes


def _is_postgres(pid: int) -> bool:
    try:
        return "postgres" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return True  # cannot tell: let PostgreSQL decide


@dataclass
class EmbeddedPostgres:
    """A running embedded server and the URLs to reach it as any role."""

    pgdata: Path
    handle: Any
    socket_dir: str
    port: int

    def url(self, role: str = "postgres", database: str = DATABASE) -> str:
        return f"postgresql://{quote(role)}@/{database}?host={quote(self.socket_dir)}&port={self.port}"

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def stop(self) -> None:
        self.handle.cleanup()


def start_embedded(data_dir: Path) -> EmbeddedPostgres:
    """Start (or join) the embedded server in ``data_dir/pg`` and make sure the ``juki`` database exists."""
    _prepare_runtime_dir()
    import pgserver  # imported late: it reads XDG_RUNTIME_DIR at import time

    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = (data_dir / "pg").resolve()
    if pgdata.exists():
        for note in recover_stale_state(pgdata):
            log.warning("embedded PostgreSQL: %s", note)
    first = not (pgdata / "PG_VERSION").exists()
    handle = pgserver.get_server(pgdata, cleanup_mode="stop")
    if first:
        _tune(handle)
    info = handle.get_postmaster_info()
    socket_dir = str(info.socket_dir)
    port = int(info.port)
    exists = handle.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")
    if "(1 row)" not in exists:
        handle.psql(f"CREATE DATABASE {DATABASE};")
    return EmbeddedPostgres(pgdata=pgdata, handle=handle, socket_dir=socket_dir, port=port)


def _tune(handle: Any) -> None:
    """Settings for a mesh on one small machine; applied once, on the first start."""
    handle.psql(
        "ALTER SYSTEM SET max_connections = 200;"
        "ALTER SYSTEM SET shared_buffers = '512MB';"
        "ALTER SYSTEM SET wal_buffers = '16MB';"
        "ALTER SYSTEM SET max_wal_size = '2GB';"
        "ALTER SYSTEM SET checkpoint_timeout = '15min';"
        "ALTER SYSTEM SET commit_delay = 0;"
    )
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    pg_ctl(["-w", "restart", "-o", f'-h "" -k {handle.get_postmaster_info().socket_dir}', "-l", str(handle.log)],
           pgdata=handle.pgdata, user=handle.system_user, timeout=30)
    handle._postmaster_info = None
    from pgserver.utils import PostmasterInfo

    handle._postmaster_info = PostmasterInfo.read_from_pgdata(handle.pgdata)
