"""Access-log fixtures: a fresh log (its own schema and role) per test, served over real mTLS."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki.accesslog.app import AccessLogApp, create
from juki.domain import generate_resident_code
from juki.mesh import db
from juki.mesh.settings import ServiceSettings

from tests.conftest import channel_as, running


@dataclass
class LiveLog:
    settings: ServiceSettings
    app: AccessLogApp
    address: str
    schema: str
    ca: Any
    channels: list[Any] = field(default_factory=list)

    def stub(self, kind: str = "service", name: str = "lookup") -> accesslog_pb2_grpc.AccessLogServiceStub:
        channel = channel_as(self.ca, kind, name, self.address)
        self.channels.append(channel)  # a stub does not keep its channel alive
        return accesslog_pb2_grpc.AccessLogServiceStub(channel)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def fresh_instance(database: Any) -> str:
    """A new access-log instance with its own schema and role, all migrations applied."""
    instance = f"accesslog-t{uuid.uuid4().hex[:10]}"
    await db.migrate(database.admin_url, [db.MigrationTarget("accesslog", instance)])
    return instance


@pytest.fixture
async def live_log(settings_factory: Any, database: Any, ca: Any) -> AsyncIterator[LiveLog]:
    instance = await fresh_instance(database)
    base = settings_factory("accesslog", instance, ("service", "accesslog"))
    settings = settings_factory(
        "accesslog", instance, ("service", "accesslog"),

        accesslog=dataclasses.replace(base.accesslog, checkpoint_seconds=0, verify_seconds=0),
    )
    app = create(settings)
    async with running(settings, app) as address:
        live = LiveLog(settings, app, address, settings.database.schema, ca)
        yield live
        await live.close()


def provision(resident_code: str, *, purpose: str = "J001", seconds: int = 1_700_000_000,
              outcome: int = accesslog_pb2.PROVISION_OUTCOME_PROVIDED) -> accesslog_pb2.ProvisionRecord:
    record = accesslog_pb2.ProvisionRecord(
        recipient="spiffe://juki.local/agency/jps", recipient_name="日本年金機構", purpose=purpose,
        purpose_name="年金給付の事務", query_mode=common_pb2.QUERY_MODE_BY_CODE, provider_tier=common_pb2.TIER_NATIONAL,
        provider="spiffe://juki.local/service/lookup", fields=[common_pb2.FIELD_NAME, common_pb2.FIELD_ADDRESS],
        resident_code=resident_code, outcome=outcome, trace_id="0" * 32, reason="年金受給者の現況確認",
    )
    record.provided_at.FromSeconds(seconds)
    return record


def codes(count: int, seed: int = 7) -> list[str]:
    import random

    rng = random.Random(seed)
    return [generate_resident_code(rng) for _ in range(count)]
