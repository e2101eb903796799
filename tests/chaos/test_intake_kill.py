"""Faults lose nothing acknowledged: SIGKILL the prefecture intake mid-stream and the national intake
mid-relay, restart both, and every acknowledged notification is at the national centre exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import grpc
import pytest
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki.bench.intake import NAKANO, IntakeEnvironment, births, wait_relayed
from juki.mesh.tls import secure_channel

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

ACCEPTED = (intake_pb2.NOTIFICATION_OUTCOME_ACCEPTED, intake_pb2.NOTIFICATION_OUTCOME_DUPLICATE)


class Sender:
    """中野区's CS: sends batches, resumes after a crash from the prefecture's sequence state."""

    def __init__(self, env: IntakeEnvironment) -> None:
        self.env = env
        self.messages = births(1, 6000, 7_000_000)
        self.acknowledged: set[str] = set()
        self._channel: Any = None

    def stub(self) -> intake_pb2_grpc.IntakeServiceStub:
        if self._channel is None:
            self._channel = secure_channel(self.env.prefecture, self.env.tls("municipality", NAKANO))
        return intake_pb2_grpc.IntakeServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def send(self, first: int, last: int) -> None:
        """Submit messages[first:last] in batches of 500; record what was acknowledged."""
        batch = self.messages[first:last]
        for start in range(0, len(batch), 500):
            response = await self.stub().SubmitNotifications(
                intake_pb2.SubmitNotificationsRequest(notifications=batch[start : start + 500]), timeout=30)
            for result in response.results:
                assert result.outcome in ACCEPTED, result
                self.acknowledged.add(result.notification_id)

    def acknowledged_prefix(self) -> int:
        """How many messages, from the first, this CS holds an acknowledgement for (its own resume point)."""
        for index, message in enumerate(self.messages):
            if message.notification_id not in self.acknowledged:
                return index
        return len(self.messages)

    async def resume_point(self) -> int:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                state = await self.stub().GetSequenceState(
                    intake_pb2.GetSequenceStateRequest(municipality_code=NAKANO), timeout=5)
                return int(state.last_acknowledged_sequence)
            except grpc.aio.AioRpcError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)


@pytest.fixture
async def env() -> Any:
    environment = IntakeEnvironment()
    try:
        await environment.start()
        yield environment
    finally:
        environment.close()


async def test_killed_tiers_lose_nothing_acknowledged(env: IntakeEnvironment) -> None:
    sender = Sender(env)
    await sender.send(0, 1000)

    # SIGKILL the prefecture while a batch is in flight; what was not acknowledged is resent.
    in_flight = asyncio.create_task(sender.send(1000, 3000))
    await asyncio.sleep(0.3)
    env.kill("intake-prefecture-13")
    with contextlib.suppress(grpc.aio.AioRpcError):
        await in_flight
    await sender.close()
    env.spawn("intake-prefecture-13")
    resume = await sender.resume_point()
    own = sender.acknowledged_prefix()
    # Nothing the CS had acknowledged is missing at the prefecture (its sequence may be further on: a
    # batch can commit just before the kill, with its answer never sent).
    assert resume >= own >= 1000
    # The CS resends everything it holds no acknowledgement for; what the prefecture already has is
    # answered DUPLICATE with the first result, so it ends acknowledged exactly once.
    await sender.send(own, 4500)

    # SIGKILL the national centre while the relay is streaming to it; the outbox brings it up to date.
    env.kill("intake-national")
    await sender.send(4500, 6000)
    await asyncio.sleep(0.5)
    env.spawn("intake-national")

    operator = secure_channel(env.prefecture, env.tls("operator", "demo-operator"))
    try:
        await wait_relayed(intake_pb2_grpc.IntakeServiceStub(operator), timeout=120)
    finally:
        await operator.close()
        await sender.close()

    everything = {m.notification_id for m in sender.messages}
    assert sender.acknowledged == everything  # the resumed sender got every one acknowledged
    admin = await asyncpg.connect(env.pg.admin_url)
    try:
        ids = sorted(sender.acknowledged)
        national = await admin.fetchval(
            "SELECT count(*) FROM intake_national.notifications WHERE notification_id = ANY($1::text[])", ids)
        codes = [m.resident_code for m in sender.messages]
        residents = await admin.fetchval(
            "SELECT count(*) FROM intake_national.residents WHERE resident_code = ANY($1::text[])", codes)
        versions = await admin.fetch(
            "SELECT resident_code, count(*) AS n FROM intake_national.resident_versions"
            " WHERE resident_code = ANY($1::text[]) GROUP BY resident_code", codes)
        prefecture = await admin.fetchval(
            "SELECT count(*) FROM intake_p13.notifications WHERE notification_id = ANY($1::text[])", ids)
    finally:
        await admin.close()
    assert prefecture == len(ids)
    assert national == len(ids)
    assert residents == len(codes)
    assert len(versions) == len(codes) and all(row["n"] == 1 for row in versions)  # applied exactly once
