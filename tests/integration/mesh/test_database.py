"""Embedded PostgreSQL recovery and the migrations runner, against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from juki.mesh import db
from juki.mesh.embedded import recover_stale_state, start_embedded

OWNER = """
import sys, time
from pathlib import Path
from juki.mesh.embedded import start_embedded
pg = start_embedded(Path(sys.argv[1]))
print(pg.pid(), flush=True)
time.sleep(600)
"""


def _wait_gone(pid: int) -> None:
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _select_one(url: str) -> int:
    async def query() -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()

    return asyncio.run(query())


@pytest.mark.slow
def test_killed_owner_and_killed_server_are_recovered_from() -> None:
    with tempfile.TemporaryDirectory(prefix="juki-stale-") as tmp:
        data = Path(tmp)
        owner = subprocess.Popen([sys.executable, "-c", OWNER, str(data)], stdout=subprocess.PIPE, text=True)
        assert owner.stdout is not None
        postmaster_pid = int(owner.stdout.readline())
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        owner.stdout.close()
        assert owner.pid in json.loads((data / "pg.owners.json").read_text())  # listed, though dead now
        # Kill the server too, leaving a stale postmaster.pid behind.
        os.kill(postmaster_pid, signal.SIGKILL)
        _wait_gone(postmaster_pid)
        assert (data / "pg" / "postmaster.pid").exists()
        pg = start_embedded(data)
        try:
            assert pg.pid() not in (None, postmaster_pid)
            assert json.loads((data / "pg.owners.json").read_text()) == [os.getpid()]  # the dead owner is gone
            assert _select_one(pg.admin_url) == 1
        finally:
            pg.stop()
        assert not (data / "pg" / "postmaster.pid").exists()  # the last owner stopped the server


@pytest.mark.slow
def test_a_joining_process_does_not_stop_the_server_of_another() -> None:
    with tempfile.TemporaryDirectory(prefix="juki-join-") as tmp:
        data = Path(tmp)
        owner = subprocess.Popen([sys.executable, "-c", OWNER, str(data)], stdout=subprocess.PIPE, text=True)
        assert owner.stdout is not None
        try:
            postmaster_pid = int(owner.stdout.readline())
            joined = start_embedded(data)
            joined.stop()  # as `juki migrate` does against a running mesh
            assert joined.pid() == postmaster_pid
            assert _select_one(joined.admin_url) == 1
        finally:
            owner.kill()
            owner.wait()
            owner.stdout.close()
        last = start_embedded(data)
        last.stop()
        _wait_gone(postmaster_pid)
        assert last.pid() is None


GRPC_THEN_START = """
import asyncio, sys, threading
from pathlib import Path
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from juki.mesh.embedded import start_embedded

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    stop = asyncio.Event()

    async def hammer():  # other threads keep calling into gRPC while the database starts
        while not stop.is_set():
            await stub.Check(health_pb2.HealthCheckRequest())

    load = [asyncio.create_task(hammer()) for _ in range(8)]
    pg = await asyncio.to_thread(start_embedded, Path(sys.argv[1]))
    await asyncio.to_thread(pg.restart, "immediate")
    stop.set()
    await asyncio.gather(*load)
    print(threading.active_count(), pg.pid(), flush=True)
    await asyncio.to_thread(pg.stop)
    await channel.close()
    await server.stop(0)

asyncio.run(main())
"""


@pytest.mark.slow
def test_the_server_starts_from_a_process_busy_in_grpc() -> None:
    """The database is started and restarted while gRPC threads are busy in the caller (fork safety)."""
    with tempfile.TemporaryDirectory(prefix="juki-fork-") as tmp:
        result = subprocess.run([sys.executable, "-c", GRPC_THEN_START, tmp], capture_output=True, text=True,
                                timeout=240, env={**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "true"})
        assert result.returncode == 0, result.stderr[-3000:]
        threads, pid = result.stdout.split()
        assert int(threads) > 1 and int(pid) > 0


def test_recover_ignores_live_owners(tmp_path: Path) -> None:
    (tmp_path / ".handle_pids.json").write_text(json.dumps([os.getppid(), 2**22 + 12345]))
    notes = recover_stale_state(tmp_path)
    assert json.loads((tmp_path / ".handle_pids.json").read_text()) == [os.getppid()]
    assert notes and "dead owner" in notes[0]


async def test_every_instance_has_its_schema_role_and_migrations(database: Any) -> None:
    conn: asyncpg.Connection = await database.admin()
    try:
        from juki.mesh.supervisor import migration_targets

        from tests.conftest import LAYOUT

        for target in migration_targets(LAYOUT):
            role = await conn.fetchrow(
                "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = $1", target.role
            )
            assert role is not None and not any(role.values()), target.role
            applied = await conn.fetchval(f'SELECT count(*) FROM "{target.schema}".schema_migrations')
            assert applied == len(db.load_migrations(target.package))
            # Roles cannot reach schemas they do not own.
            others = [t for t in migration_targets(LAYOUT) if t.schema != target.schema and t.package != "lookup"]
            for other in others[:2]:
                usable = await conn.fetchval("SELECT has_schema_privilege($1, $2, 'USAGE')", target.role, other.schema)
                if target.package == "lookup" and other.instance == "intake-national":
                    continue
                assert not usable, f"{target.role} can use {other.schema}"
    finally:
        await conn.close()


async def test_a_changed_migration_is_refused(database: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    target = db.MigrationTarget("intake", "intake-national")
    original = db.load_migrations

    def tampered(package: str) -> list[db.Migration]:
        found = original(package)
        return [db.Migration(m.version, m.name, m.sql + "\n-- edited") for m in found]

    monkeypatch.setattr(db, "load_migrations", tampered)
    with pytest.raises(db.MigrationError, match="changed after it was applied"):
        await db.migrate(database.admin_url, [target])


async def test_migrate_twice_applies_nothing(database: Any) -> None:
    from juki.mesh.supervisor import migration_targets

    from tests.conftest import LAYOUT

    applied = await db.migrate(database.admin_url, migration_targets(LAYOUT))
    assert all(not versions for versions in applied.values())
