"""Shared fixtures: a real embedded PostgreSQL, the mesh's own CA, and in-process mTLS servers.

Set ``JUKI_TEST_DATABASE_URL`` (an administrative URL) to use another PostgreSQL instead of the
embedded one. Data directories live under the system temp dir, never inside the repository (the
embedded server opens the folders above its data directory for traversal).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from juki.mesh import db
from juki.mesh.embedded import start_embedded
from juki.mesh.settings import (
    AccessLogSettings,
    DatabaseSettings,
    Peers,
    Secret,
    ServiceSettings,
    TlsFiles,
    role_name,
    schema_name,
)
from juki.mesh.supervisor import MeshLayout, ensure_pki, migration_targets
from juki.mesh.tls import secure_channel

LAYOUT = MeshLayout()


@pytest.fixture(scope="session")
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="juki-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ca(data_dir: Path) -> Any:
    return ensure_pki(data_dir, LAYOUT)


class Database:
    """The test database: an administrative URL and a URL per service role."""

    def __init__(self, admin_url: str, role_url: Any) -> None:
        self.admin_url = admin_url
        self._role_url = role_url

    def url(self, instance: str) -> str:
        return str(self._role_url(role_name(instance)))

    def settings(self, instance: str) -> DatabaseSettings:
        return DatabaseSettings(url=Secret(self.url(instance)), schema=schema_name(instance), pool_min=1, pool_max=4)

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_url)


@pytest.fixture(scope="session")
def database(data_dir: Path) -> Iterator[Database]:
    external = os.environ.get("JUKI_TEST_DATABASE_URL")
    if external:
        from urllib.parse import urlsplit, urlunsplit

        def role_url(role: str) -> str:
            parts = urlsplit(external)
            netloc = f"{role}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

        database = Database(external, role_url)
        asyncio.run(db.migrate(external, migration_targets(LAYOUT)))
        yield database
        return
    embedded = start_embedded(data_dir)
    asyncio.run(db.migrate(embedded.admin_url, migration_targets(LAYOUT)))
    yield Database(embedded.admin_url, embedded.url)
    embedded.stop()


def tls_for(ca: Any, kind: str, name: str) -> TlsFiles:
    cert, key = ca.paths(kind, name)
    if not cert.is_file():
        ca.issue(kind, name)
    return TlsFiles(ca=ca.ca_cert_path, cert=cert, key=key, crl=ca.crl_path)


def make_settings(
    ca: Any, database: Database, data_dir: Path, service: str, instance: str, identity: tuple[str, str],
    **overrides: Any,
) -> ServiceSettings:
    """Settings for an in-process service on a free loopback port."""
    settings = ServiceSettings(
        service=service,
        instance=instance,
        listen="127.0.0.1:0",
        tls=tls_for(ca, *identity),
        database=database.settings(instance),
        data_dir=data_dir,
        peers=Peers(),
        accesslog=AccessLogSettings(
            signing_key_file=ca.paths("signing", "accesslog")[1],
            signing_cert_file=ca.paths("signing", "accesslog")[0],
            pseudonym_key_file=_pseudonym_key(data_dir),
        ),
    )
    return replace(settings, **overrides)


def _pseudonym_key(data_dir: Path) -> Path:
    path = data_dir / "pseudonym.key"
    if not path.exists():
        path.write_text(os.urandom(32).hex())
        path.chmod(0o600)
    return path


@contextlib.asynccontextmanager
async def running(settings: ServiceSettings, service: Any) -> AsyncIterator[str]:
    """Start a service in this process (real mTLS server, real database); yield its address."""
    from juki.mesh.server import start_server

    bindings = await service.start()
    server = await start_server(settings, bindings, on_refusal=getattr(service, "on_refusal", None))
    try:
        yield server.address
    finally:
        await server.stop(0.5)
        await service.stop()


def channel_as(ca: Any, kind: str, name: str, address: str) -> grpc.aio.Channel:
    """An mTLS channel to ``address`` with the certificate of ``kind/name`` (issued on demand)."""
    return secure_channel(address, tls_for(ca, kind, name))


@pytest.fixture
def settings_factory(ca: Any, database: Database, data_dir: Path) -> Any:
    def factory(service: str, instance: str, identity: tuple[str, str], **overrides: Any) -> ServiceSettings:
        return make_settings(ca, database, data_dir, service, instance, identity, **overrides)

    factory.database = database  # type: ignore[attr-defined]
    return factory


async def forget_municipality(database: Database, code: str) -> None:
    """Give one municipality a clean slate in the shared test database.

    Tests of the intake impersonate municipalities with their own sequence numbers; a later test that
    runs the real CS of the same municipality would otherwise meet a history it never wrote (sequence
    conflicts). Its notifications, sequence and connection state at every intake tier, and its CS's
    outbox, are removed; residents folded from them stay.
    """
    conn = await database.admin()
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.columns "
            "WHERE column_name = 'municipality_code' AND table_schema LIKE 'intake_%' "
            "AND table_name IN (SELECT table_name FROM information_schema.tables t "
            "WHERE t.table_schema = columns.table_schema AND t.table_type = 'BASE TABLE')"
        )
        for row in tables:
            if row["table_name"] == "residents":
                continue
            await conn.execute(
                f'DELETE FROM "{row["table_schema"]}"."{row["table_name"]}" WHERE municipality_code = $1', code
            )
        schema = schema_name(f"municipal-{code}")
        if await conn.fetchval("SELECT 1 FROM information_schema.schemata WHERE schema_name = $1", schema):
            await conn.execute(f'TRUNCATE "{schema}".outbox')
            await conn.execute(f'UPDATE "{schema}".outbox_state SET last_sequence = 0, connected = true')
    finally:
        await conn.close()
