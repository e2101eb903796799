"""Builders for intake tests: valid notifications and in-process prefecture + national nodes."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki.mesh.settings import Peers

from tests.conftest import channel_as, forget_municipality, running

NAKANO = "131148"
YOKOHAMA = "141003"
_RNG = random.Random(20020805)
_SEQUENCES: dict[str, itertools.count[int]] = {}


def next_sequence(municipality: str) -> int:
    return next(_SEQUENCES.setdefault(municipality, itertools.count(1)))


def new_code() -> str:
    return domain.generate_resident_code(_RNG)


def date(day: dt.date) -> common_pb2.Date:
    return common_pb2.Date(year=day.year, month=day.month, day=day.day, precision=common_pb2.DATE_PRECISION_FULL)


def notification(
    municipality: str = NAKANO,
    *,
    kind: int = common_pb2.CHANGE_KIND_BIRTH,
    code: str | None = None,
    occurred: dt.date = dt.date(2020, 4, 1),
    notified: dt.date | None = None,
    born: dt.date | None = None,
    family: str = "中野",
    given: str = "花子",
    street: str = "中野四丁目8番1号",
    sequence: int | None = None,
    resident_kind: int = common_pb2.RESIDENT_KIND_JAPANESE,
    **fields: Any,
) -> intake_pb2.Notification:
    place = domain.municipality(municipality)
    assert place is not None
    birth = born or (occurred if kind == common_pb2.CHANGE_KIND_BIRTH else dt.date(1980, 5, 17))
    return intake_pb2.Notification(
        notification_id=str(uuid.uuid4()),
        municipality_code=municipality,
        sequence=sequence if sequence is not None else next_sequence(municipality),
        change_kind=kind,  # type: ignore[arg-type]
        resident_code=code or new_code(),
        resident_kind=resident_kind,  # type: ignore[arg-type]
        name=common_pb2.PersonName(family_name=family, given_name=given, family_name_kana="ナカノ",
                                   given_name_kana="ハナコ"),
        birth_date=date(birth),
        sex=common_pb2.SEX_FEMALE,
        address=common_pb2.Address(municipality_code=municipality, prefecture=place.prefecture_name,
                                   municipality=place.city_name, street=street),
        occurred_on=date(occurred),
        notified_on=date(notified or occurred),
        **fields,
    )


@dataclass
class Mesh:
    """A national intake and the prefecture intakes 13 and 14, in this process."""

    ca: Any
    national: str
    prefectures: dict[str, str]
    channels: list[Any] = field(default_factory=list)

    def _stub(self, kind: str, name: str, address: str) -> intake_pb2_grpc.IntakeServiceStub:
        # The channel is kept: a grpc.aio channel closes itself once no Python object refers to it.
        channel = channel_as(self.ca, kind, name, address)
        self.channels.append(channel)
        return intake_pb2_grpc.IntakeServiceStub(channel)

    def as_municipality(self, code: str) -> intake_pb2_grpc.IntakeServiceStub:
        return self._stub("municipality", code, self.prefectures[code[:2]])

    def national_as(self, kind: str, name: str) -> intake_pb2_grpc.IntakeServiceStub:
        return self._stub(kind, name, self.national)

    def prefecture_as(self, prefecture: str, kind: str, name: str) -> intake_pb2_grpc.IntakeServiceStub:
        return self._stub(kind, name, self.prefectures[prefecture])


@contextlib.asynccontextmanager
async def intake_mesh(ca: Any, settings_factory: Any, **overrides: Any) -> AsyncIterator[Mesh]:
    from juki.intake.app import create

    # Other suites run the real CS of these municipalities on the shared database: start from a clean
    # slate for them, and number this mesh's notifications from 1 again.
    for code in (NAKANO, YOKOHAMA):
        await forget_municipality(settings_factory.database, code)
    _SEQUENCES.clear()

    national_settings = settings_factory("intake", "intake-national", ("service", "intake-national"),
                                         tier="national", **overrides)
    async with running(national_settings, create(national_settings)) as national:
        prefectures: dict[str, str] = {}
        async with contextlib.AsyncExitStack() as stack:
            for prefecture in ("13", "14"):
                settings = settings_factory(
                    "intake", f"intake-prefecture-{prefecture}", ("prefecture", prefecture),
                    tier="prefecture", prefecture=prefecture, peers=Peers(national_intake=national), **overrides,
                )
                prefectures[prefecture] = await stack.enter_async_context(running(settings, create(settings)))
            mesh = Mesh(ca, national, prefectures)
            try:
                yield mesh
            finally:
                for channel in mesh.channels:
                    await channel.close()


def with_id(message: intake_pb2.Notification, **changes: Any) -> intake_pb2.Notification:
    copy = intake_pb2.Notification()
    copy.CopyFrom(message)
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


__all__ = ["NAKANO", "YOKOHAMA", "Mesh", "date", "intake_mesh", "new_code", "next_sequence", "notification",
           "replace", "with_id"]


async def national_record(mesh: Mesh, code: str, *, timeout: float = 20.0) -> common_pb2.IdentityRecord:
    """The national record of ``code``, waiting for the relay to bring it."""
    import asyncio

    import grpc

    stub = mesh.national_as("service", "lookup")
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return (await stub.GetResident(intake_pb2.GetResidentRequest(resident_code=code))).record
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
