"""Municipal CS -> prefecture intake -> national intake over the real path, including a disconnection
(as 中野区 in 2002-09) during which notifications stay queued, and a full resync (BulkLoad)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.mesh.settings import Peers

from tests.conftest import channel_as, forget_municipality, running
from tests.integration.municipal.helpers import date, person, sign

pytestmark = pytest.mark.timeout(120)
NAKANO = "131148"
RECORD = "/juki.municipal.v1.MunicipalService/RecordChange"


@dataclass
class Chain:
    national: str
    prefecture: str
    municipal: str


@pytest.fixture
async def chain(settings_factory: Any, database: Any) -> AsyncIterator[Chain]:
    await forget_municipality(database, NAKANO)
    from juki.intake.app import create as create_intake
    from juki.municipal.app import create as create_municipal

    national = settings_factory("intake", "intake-national", ("service", "intake-national"), tier="national")
    async with contextlib.AsyncExitStack() as stack:
        national_address = await stack.enter_async_context(running(national, create_intake(national)))
        prefecture = settings_factory("intake", "intake-prefecture-13", ("prefecture", "13"), tier="prefecture",
                                      prefecture="13", peers=Peers(national_intake=national_address))
        prefecture_address = await stack.enter_async_context(running(prefecture, create_intake(prefecture)))
        municipal = settings_factory("municipal", f"municipal-{NAKANO}", ("municipality", NAKANO),
                                     municipality=NAKANO, peers=Peers(prefecture_intake=prefecture_address))
        municipal_address = await stack.enter_async_context(running(municipal, create_municipal(municipal)))
        yield Chain(national_address, prefecture_address, municipal_address)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


def today() -> str:
    return domain.SystemClock().today().isoformat()


async def record_birth(ca: Any, stub: municipal_pb2_grpc.MunicipalServiceStub, given: str
                       ) -> municipal_pb2.RecordChangeResponse:
    born = today()
    request = municipal_pb2.RecordChangeRequest(
        change_kind=common_pb2.CHANGE_KIND_BIRTH, entry=person(given=given, born=born),
        occurred_on=date(born), notified_on=date(born))
    response: municipal_pb2.RecordChangeResponse = await stub.RecordChange(sign(ca, request, RECORD))
    return response


async def at_national(ca: Any, address: str, code: str) -> common_pb2.IdentityRecord | None:
    async with channel_as(ca, "service", "lookup", address) as channel:
        try:
            response = await intake_pb2_grpc.IntakeServiceStub(channel).GetResident(
                intake_pb2.GetResidentRequest(resident_code=code))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
    return response.record


async def test_a_birth_reaches_the_national_centre(ca: Any, chain: Chain) -> None:
    async with channel_as(ca, "operator", "demo-operator", chain.municipal) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        born = await record_birth(ca, stub, "誕生")

        async def arrived() -> bool:
            return await at_national(ca, chain.national, born.resident_code) is not None

        await eventually(arrived)
        record = await at_national(ca, chain.national, born.resident_code)
        assert record is not None and record.name.given_name == "誕生"
        assert record.status == common_pb2.RESIDENT_STATUS_CURRENT and record.address.municipality_code == NAKANO

        async def drained() -> bool:
            status = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
            return status.pending == 0 and status.last_acknowledged_sequence == status.last_sequence

        await eventually(drained)


async def test_disconnected_municipality_queues_then_catches_up_in_order(ca: Any, chain: Chain) -> None:
    async with channel_as(ca, "operator", "demo-operator", chain.prefecture) as prefecture_channel, \
            channel_as(ca, "operator", "demo-operator", chain.municipal) as channel:
        prefecture = intake_pb2_grpc.IntakeServiceStub(prefecture_channel)
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)

        async def set_connected(connected: bool) -> None:
            request = intake_pb2.SetConnectionStateRequest(municipality_code=NAKANO, connected=connected,
                                                           reason="区長の判断による切断" if not connected else "再接続")
            await prefecture.SetConnectionState(
                sign(ca, request, "/juki.intake.v1.IntakeService/SetConnectionState"))

        await set_connected(False)
        try:
            first = await record_birth(ca, stub, "切断一")

            async def noticed() -> bool:
                status = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
                return not status.connected and status.pending >= 1

            await eventually(noticed)
            second = await record_birth(ca, stub, "切断二")
            assert second.queued and second.sequence == first.sequence + 1
            assert await at_national(ca, chain.national, second.resident_code) is None
        finally:
            await set_connected(True)

        async def caught_up() -> bool:
            return all([await at_national(ca, chain.national, r.resident_code) is not None for r in (first, second)])

        await eventually(caught_up)
        status = await stub.GetOutboxStatus(municipal_pb2.GetOutboxStatusRequest())
        assert status.connected
        state = await prefecture.GetSequenceState(intake_pb2.GetSequenceStateRequest(municipality_code=NAKANO))
        assert state.last_acknowledged_sequence >= second.sequence and not state.missing_ranges


async def test_resync_sends_the_whole_register(ca: Any, chain: Chain) -> None:
    async with channel_as(ca, "operator", "demo-operator", chain.municipal) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        born = await record_birth(ca, stub, "再送")
        response = await stub.ResyncToPrefecture(sign(
            ca, municipal_pb2.ResyncToPrefectureRequest(), "/juki.municipal.v1.MunicipalService/ResyncToPrefecture"))
        assert response.records_sent >= 1 and response.records_rejected == 0
        assert response.records_applied == response.records_sent
        assert response.through_sequence >= born.sequence


async def test_an_interrupted_resync_continues_the_same_load(ca: Any, chain: Chain, database: Any) -> None:
    """The CS keeps the load in progress in its database; a repeated ResyncToPrefecture asks the
    prefecture where it stands and sends only the records after that point, with the same load id."""
    from juki.municipal import convert

    async with channel_as(ca, "operator", "demo-operator", chain.municipal) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        for given in ("続一", "続二", "続三"):
            await record_birth(ca, stub, given)
        admin = await database.admin()
        try:
            rows = await admin.fetch("SELECT entry FROM municipal_131148.residents ORDER BY resident_code")
            through = await admin.fetchval("SELECT last_sequence FROM municipal_131148.outbox_state")
            entries = [municipal_pb2.ResidentEntry.FromString(r["entry"]) for r in rows]
            # An earlier resync got its first two records to both tiers before the CS died.
            load_id = f"interrupted-{entries[0].resident_code}"
            await admin.execute("UPDATE municipal_131148.outbox_state SET resync_load_id = $1, resync_through = $2",
                                load_id, through)
        finally:
            await admin.close()
        async with channel_as(ca, "municipality", NAKANO, chain.prefecture) as intake:
            intake_stub = intake_pb2_grpc.IntakeServiceStub(intake)
            never = asyncio.Event()

            async def first_batch() -> Any:
                yield intake_pb2.BulkLoadRequest(
                    load_id=load_id, municipality_code=NAKANO, through_sequence=through, more_batches=True,
                    records=[convert.identity_record(e) for e in entries[:2]])
                await never.wait()

            call = intake_stub.BulkLoad(first_batch())
            ask = intake_pb2.GetBulkLoadRequest(load_id=load_id, municipality_code=NAKANO)

            async def both_tiers_have_it() -> bool:
                return (await intake_stub.GetBulkLoad(ask)).last_resident_code == entries[1].resident_code

            await eventually(both_tiers_have_it)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            response = await stub.ResyncToPrefecture(sign(
                ca, municipal_pb2.ResyncToPrefectureRequest(), "/juki.municipal.v1.MunicipalService/ResyncToPrefecture"))
            assert (response.load_id, response.through_sequence) == (load_id, through)
            assert response.records_sent == len(entries) - 2
            assert response.records_applied == len(entries)  # the whole load's summary
            assert (await intake_stub.GetBulkLoad(ask)).state == intake_pb2.BULK_LOAD_STATE_FINISHED
    admin = await database.admin()
    try:
        state = await admin.fetchrow("SELECT resync_load_id, last_resync_load_id FROM municipal_131148.outbox_state")
        assert (state["resync_load_id"], state["last_resync_load_id"]) == ("", load_id)
    finally:
        await admin.close()
    # A further resync is a new load, from the start.
    async with channel_as(ca, "operator", "demo-operator", chain.municipal) as channel:
        again = await municipal_pb2_grpc.MunicipalServiceStub(channel).ResyncToPrefecture(sign(
            ca, municipal_pb2.ResyncToPrefectureRequest(), "/juki.municipal.v1.MunicipalService/ResyncToPrefecture"))
    assert again.load_id != load_id and again.records_sent == len(entries)
