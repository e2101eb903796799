"""A real access-log service and a lookup service in this process, on real mTLS, on the test database.

Residents are written straight into the national store (``intake_national``), as the national intake
would have folded them; each test draws fresh random codes so that tests never see each other's rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.lookup.v1 import lookup_pb2_grpc
from juki.domain.codes import generate_resident_code
from juki.domain.names import address_key, match_key
from juki.mesh.settings import Peers, ServiceSettings

from tests.conftest import Database, channel_as, make_settings, running

_rng = random.Random()


def fresh_code() -> str:
    return generate_resident_code(_rng)


@dataclass
class Mesh:
    """Addresses of the in-process services and helpers to reach them."""

    ca: Any
    database: Database
    data_dir: Path
    accesslog: str
    lookup: str
    accesslog_settings: ServiceSettings
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def lookup_as(self, kind: str, name: str, address: str | None = None) -> lookup_pb2_grpc.LookupServiceStub:
        """A stub with the certificate of ``kind/name``; its channel lives until the module ends."""
        channel = channel_as(self.ca, kind, name, address or self.lookup)
        self.channels.append(channel)
        return lookup_pb2_grpc.LookupServiceStub(channel)

    def lookup_settings(self, **options: Any) -> ServiceSettings:
        """Settings of a lookup service using this mesh; ``options`` are fields of ``LookupSettings``."""
        settings = make_settings(
            self.ca, self.database, self.data_dir, "lookup", "lookup", ("service", "lookup"),
            peers=Peers(accesslog=self.accesslog),
        )
        return replace(settings, lookup=replace(settings.lookup, **options))

    async def provisions(self, code: str, include_refused: bool = False) -> list[accesslog_pb2.LoggedProvision]:
        channel = channel_as(self.ca, "service", "disclosure", self.accesslog)
        try:
            stub = accesslog_pb2_grpc.AccessLogServiceStub(channel)
            response = await stub.ListProvisions(accesslog_pb2.ListProvisionsRequest(
                resident_code=code, include_refused=include_refused, page_size=1000,
            ))
            return list(response.provisions)
        finally:
            await channel.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(ca: Any, database: Database, data_dir: Path) -> AsyncIterator[Mesh]:
    from juki.accesslog import app as accesslog_app
    from juki.lookup.app import create

    log_settings = make_settings(ca, database, data_dir, "accesslog", "accesslog", ("service", "accesslog"))
    async with contextlib.AsyncExitStack() as stack:
        log_address = await stack.enter_async_context(running(log_settings, accesslog_app.create(log_settings)))
        mesh = Mesh(ca, database, data_dir, log_address, "", log_settings)
        lookup_settings = mesh.lookup_settings()
        mesh.lookup = await stack.enter_async_context(running(lookup_settings, create(lookup_settings)))
        await ensure_municipality(database, "131148")
        yield mesh
        for channel in mesh.channels:
            await channel.close()


async def ensure_municipality(database: Database, code: str, *, connected: bool = True) -> None:
    conn = await database.admin()
    try:
        await conn.execute(
            "INSERT INTO intake_national.municipalities (municipality_code, connected) VALUES ($1, $2)"
            " ON CONFLICT (municipality_code) DO UPDATE SET connected = EXCLUDED.connected",
            code, connected,
        )
    finally:
        await conn.close()


async def add_resident(
    database: Database,
    code: str | None = None,
    *,
    family_name: str = "山田",
    given_name: str = "太郎",
    family_name_kana: str = "ヤマダ",
    given_name_kana: str = "タロウ",
    birth: tuple[int, int, int] = (1950, 4, 1),
    sex: int = 1,
    municipality_code: str = "131148",
    street: str = "中野四丁目8番1号",
    status: int = 1,
    last_change_kind: int = 3,
    death_date: dt.date | None = None,
    successor_code: str | None = None,
) -> str:
    """Write one folded resident into the national store; return its code."""
    code = code or fresh_code()
    conn = await database.admin()
    try:
        await conn.execute(
            """INSERT INTO intake_national.residents (resident_code, resident_kind, family_name, given_name,
                   family_name_kana, given_name_kana, birth_year, birth_month, birth_day, sex, municipality_code,
                   prefecture, municipality, street, status, last_change_kind, last_changed_on, last_notified_on,
                   death_date, successor_code, name_key, address_key)
               VALUES ($1, 1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '東京都', '中野区', $11, $12, $13,
                   $14, $14, $15, $16, $17, $18)""",
            code, family_name, given_name, family_name_kana, given_name_kana, *birth, sex, municipality_code,
            street, status, last_change_kind, death_date or dt.date(2003, 9, 16), death_date, successor_code,
            match_key(family_name + given_name), address_key(street),
        )
    finally:
        await conn.close()
    return code


async def add_change(database: Database, code: str, kind: int, occurred_on: dt.date) -> int:
    conn = await database.admin()
    try:
        change_id: int = await conn.fetchval(
            "INSERT INTO intake_national.resident_changes (resident_code, change_kind, occurred_on)"
            " VALUES ($1, $2, $3) RETURNING change_id",
            code, kind, occurred_on,
        )
        return change_id
    finally:
        await conn.close()
