"""Embedded PostgreSQL recovery and the migrations runner, against real servers."""

from __future__ import annotations

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
print(pg.handle.get_pid(), flush=True)
time.sleep(600)
"""


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
        handles = json.loads((data / "pg" / ".handle_pids.json").read_text())
        assert owner.pid in handles  # the dead owner is still listed: pgserver would never stop the server
        # Kill the server too, leaving a stale postmaster.pid behind.
        os.kill(postmaster_pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(postmaster_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        assert (data / "pg" / "postmaster.pid").exists()
        pg = start_embedded(data)
        try:
            assert pg.handle.get_pid() != postmaster_pid
            assert owner.pid not in json.loads((data / "pg" / ".handle_pids.json").read_text())
            assert "(1 row)" in pg.handle.psql("SELECT 1;")
        finally:
            pg.stop()
        assert not (data / "pg" / "postmaster.pid").exists()  # the last owner stopped the server


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
