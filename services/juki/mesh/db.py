"""PostgreSQL: connection pools per service, and the versioned-SQL migrations runner.

Each service instance owns one schema and connects as its own role (``juki_<schema>``). Migrations are
``<package>/migrations/NNNN_name.sql`` files, applied in order, each in a transaction, recorded with a
checksum in ``<schema>.schema_migrations``; an applied file that changed is refused. They run as an
administrative role and grant the service role exactly what it needs. Placeholders: ``{{schema}}``,
``{{role}}`` and ``{{national_schema}}``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from juki.mesh import metrics
from juki.mesh.settings import DatabaseSettings, role_name, schema_name

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """A migration could not be applied, or an applied one was changed afterwards."""


# SQLSTATE classes and codes that mean "the database is not there right now", not "the request is wrong":
# 08 connection exception, 57P01-57P03 admin/crash shutdown and cannot-connect-now (starting up or in WAL
# recovery), 53300 too many connections.
_OUTAGE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


def is_connection_loss(exc: BaseException) -> bool:
    """Whether ``exc`` means the database (or the connection to it) is gone, so the call may be retried.

    asyncpg reports a lost server in several ways, depending on when in a call it is noticed: a refused or
    reset socket (``OSError``/``ConnectionError``), ``ConnectionDoesNotExistError`` and other
    ``InterfaceError``s, ``InternalClientError`` ("cannot switch to state N; another operation is in
    progress": the protocol was torn down in the middle of an operation), a server error of the classes
    above, or a pool acquire that timed out.
    """
    if isinstance(exc, (OSError, ConnectionError, TimeoutError, asyncpg.exceptions.InterfaceError,
                        asyncpg.exceptions.InternalClientError)):
        return True
    return isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate).startswith(_OUTAGE_SQLSTATES)


async def _noop_reset(connection: asyncpg.Connection) -> None:
    # The default reset (RESET ALL, UNLISTEN, close cursors) costs a round trip per release. Services
    # never change session state, so a pooled connection is clean already; measured more than 2x on
    # the lookup path.
    return None


async def create_pool(settings: DatabaseSettings, application_name: str) -> asyncpg.Pool:
    """A pool for one service: its schema first on the search path, no per-release reset."""
    pool = await asyncpg.create_pool(
        settings.url.reveal(),
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        reset=_noop_reset,
        server_settings={"search_path": f"{settings.schema},public", "application_name": application_name},
    )
    assert pool is not None
    metrics.observe_pool(application_name, pool)
    return pool


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationTarget:
    """One service instance to migrate: its code package, schema and role."""

    package: str  # intake, lookup, card, accesslog, disclosure, municipal
    instance: str

    @property
    def schema(self) -> str:
        return schema_name(self.instance)

    @property
    def role(self) -> str:
        return role_name(self.instance)


def load_migrations(package: str) -> list[Migration]:
    root = importlib.resources.files(f"juki.{package}") / "migrations"
    found: list[Migration] = []
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"juki.{package}: two migrations share a version number")
    return found


def render(sql: str, target: MigrationTarget) -> str:
    return (
        sql.replace("{{schema}}", target.schema)
        .replace("{{role}}", target.role)
        .replace("{{national_schema}}", schema_name("intake-national"))
    )


async def ensure_role(conn: asyncpg.Connection, role: str, password: str | None = None) -> None:
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    if not exists:
        await conn.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
    if password is not None:
        await conn.execute(f"ALTER ROLE \"{role}\" PASSWORD '{password.replace(chr(39), chr(39) * 2)}'")


async def migrate(admin_url: str, targets: Sequence[MigrationTarget]) -> dict[str, list[int]]:
    """Apply pending migrations for each target in order; return the versions applied per instance."""
    applied: dict[str, list[int]] = {}
    conn = await asyncpg.connect(admin_url)
    try:
        for target in targets:
            applied[target.instance] = await _migrate_one(conn, target)
    finally:
        await conn.close()
    return applied


async def _migrate_one(conn: asyncpg.Connection, target: MigrationTarget) -> list[int]:
    schema, role = target.schema, target.role
    done: list[int] = []
    async with conn.transaction():
        # One migrator per schema at a time, even when several processes start together.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"juki-migrate:{schema}")
        await ensure_role(conn, role)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'REVOKE ALL ON SCHEMA "{schema}" FROM PUBLIC')
        await conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
            "version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = await conn.fetch(f'SELECT version, checksum FROM "{schema}".schema_migrations')
        known: dict[int, str] = {r["version"]: r["checksum"] for r in rows}
        for migration in load_migrations(target.package):
            if migration.version in known:
                if known[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"{schema}: migration {migration.version:04d}_{migration.name} changed after it was applied"
                    )
                continue
            await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
            await conn.execute(render(migration.sql, target))
            await conn.execute(
                f'INSERT INTO "{schema}".schema_migrations (version, name, checksum) VALUES ($1, $2, $3)',
                migration.version, migration.name, migration.checksum,
            )
            done.append(migration.version)
    return done
