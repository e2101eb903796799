"""Shared helpers of the chaos, fuzz and security suites: a whole local mesh, typed stubs as any identity,
raw calls with hand-made bytes, and the error details (google.rpc ErrorInfo / BadRequest) of a refusal.

The mesh is the one ``juki up`` runs (one process per service, the embedded PostgreSQL, the mesh's own CA),
seeded with a small synthetic population.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from juki import domain
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2
from juki.mesh.errors import from_grpc_error
from juki.mesh.operator import sign_operator_proof
from juki.mesh.settings import TlsFiles, schema_name
from juki.mesh.supervisor import MeshLayout, Supervisor
from juki.mesh.tls import CHANNEL_OPTIONS, channel_credentials, secure_channel

PENSION = "B1-PENSION-BENEFIT"
NAKANO = "131148"
YOKOHAMA = "141003"
RECORD_CHANGE = "/juki.municipal.v1.MunicipalService/RecordChange"


@dataclass
class Mesh:
    """A running local mesh and the clients a test needs."""

    supervisor: Supervisor
    channels: dict[tuple[str, str, str], grpc.aio.Channel] = field(default_factory=dict)

    @property
    def ca(self) -> Any:
        assert self.supervisor.ca is not None
        return self.supervisor.ca

    @property
    def admin_url(self) -> str:
        return self.supervisor.admin_url

    def tls(self, kind: str, name: str) -> TlsFiles:
        cert, key = self.ca.paths(kind, name)
        if not cert.is_file():
            self.ca.issue(kind, name)
        return TlsFiles(ca=self.ca.ca_cert_path, cert=cert, key=key, crl=self.ca.crl_path)

    def address(self, instance: str) -> str:
        return self.supervisor.address(instance)

    def channel(self, instance: str, kind: str, name: str) -> grpc.aio.Channel:
        """A cached mTLS channel to ``instance`` as ``kind/name``."""
        key = (instance, kind, name)
        if key not in self.channels:
            address, tls = self.address(instance), self.tls(kind, name)
            self.channels[key] = _remember_identity(secure_channel(address, tls), address, tls)
        return self.channels[key]

    def fresh_channel(self, instance: str, kind: str, name: str) -> grpc.aio.Channel:
        address, tls = self.address(instance), self.tls(kind, name)
        return _remember_identity(secure_channel(address, tls), address, tls)

    def sign(self, request: Any, method: str, field_name: str = "operator_proof",
             operator: str = "demo-operator") -> common_pb2.OperatorProof:
        cert, key = self.tls("operator", operator).cert, self.tls("operator", operator).key
        return sign_operator_proof(request, method, cert_pem=cert.read_bytes(), key_pem=key.read_bytes(),
                                   password="demo-password", proof_field=field_name)

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_url)

    async def close_channels(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()


@contextlib.asynccontextmanager
async def local_mesh(population: int = 80, *, prefix: str = "juki-faults-", seed: int = 8,
                     extra_env: dict[str, str] | None = None, replicas: int = 1) -> AsyncIterator[Mesh]:
    """Start a seeded local mesh (two prefectures, 中野区 and 横浜市) in a temporary data directory."""
    from juki.seeding.registers import seed_population

    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    supervisor = Supervisor(data_dir, MeshLayout(), extra_env=extra_env or {}, replicas=replicas)
    mesh = Mesh(supervisor)
    try:
        await supervisor.prepare()
        await supervisor.start()
        await seed_population(supervisor, population, seed, echo=lambda line: None)
        await _until_national(mesh, population)
        yield mesh
        await mesh.close_channels()
        await supervisor.stop()
        found = loop_errors(data_dir)
        assert not found, "services left asyncio errors uncollected:\n" + "\n".join(found[:20])
    finally:
        await mesh.close_channels()
        await supervisor.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# What asyncio writes when a task's or future's error was never collected, or a callback failed: each is a
# fault of the service (an error nobody handled), whatever else the test saw.
LOOP_ERROR_MARKERS = (
    "Task exception was never retrieved",
    "Future exception was never retrieved",
    "Task was destroyed but it is pending",
    "Exception in callback",
    "Unhandled error in exception handler",
    "Exception ignored in",
)


def loop_errors(data_dir: Path) -> list[str]:
    """Lines of the services' logs (``run/*.log``) that report an uncollected asyncio error."""
    found = []
    for path in sorted((data_dir / "run").glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if any(marker in line for marker in LOOP_ERROR_MARKERS):
                found.append(f"{path.name}: {line[:500]}")
    return found


async def _until_national(mesh: Mesh, population: int, timeout: float = 120) -> None:
    """Wait until the prefectures have relayed the seeded registers to the national store."""
    deadline = time.monotonic() + timeout
    while True:
        conn = await mesh.admin()
        try:
            held = int(await conn.fetchval("SELECT count(*) FROM intake_national.residents"))
            registered = 0
            for m in mesh.supervisor.layout.municipalities:
                registered += int(await conn.fetchval(
                    f'SELECT count(*) FROM "{schema_name("municipal-" + m)}".residents'))
        finally:
            await conn.close()
        if held >= registered > 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the national store holds {held} of {registered} seeded residents")
        await asyncio.sleep(0.25)


# -- error details ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    reason: str  # ErrorInfo.reason ("" when the status carries none)
    fields: tuple[str, ...]  # BadRequest field violations
    message: str


def refusal(error: grpc.aio.AioRpcError) -> Refusal:
    remote = from_grpc_error(error)
    return Refusal(remote.code, remote.reason_name, tuple(v.field for v in remote.violations), remote.message)


# The same mTLS identity as a blocking channel, for each aio channel handed out by a Mesh (see call_raw).
_BLOCKING_TWINS: weakref.WeakKeyDictionary[grpc.aio.Channel, tuple[str, TlsFiles]] = weakref.WeakKeyDictionary()
_BLOCKING_CHANNELS: dict[tuple[str, TlsFiles], grpc.Channel] = {}


def _remember_identity(channel: grpc.aio.Channel, address: str, tls: TlsFiles) -> grpc.aio.Channel:
    _BLOCKING_TWINS[channel] = (address, tls)
    return channel


def _blocking_twin(channel: grpc.aio.Channel) -> grpc.Channel | None:
    known = _BLOCKING_TWINS.get(channel)
    if known is None:
        return None
    if known not in _BLOCKING_CHANNELS:
        address, tls = known
        _BLOCKING_CHANNELS[known] = grpc.secure_channel(address, channel_credentials(tls), options=CHANNEL_OPTIONS)
    return _BLOCKING_CHANNELS[known]


def _blocking_stream_call(channel: grpc.Channel, method: str, payload: bytes, server_stream: bool,
                          timeout: float) -> tuple[grpc.StatusCode, Refusal | None]:
    try:
        if server_stream:
            for _ in channel.stream_stream(method)(iter([payload]), timeout=timeout):
                pass
        else:
            channel.stream_unary(method)(iter([payload]), timeout=timeout)
    except grpc.RpcError as error:
        return error.code(), refusal(error)  # type: ignore[attr-defined, arg-type]
    return grpc.StatusCode.OK, None


async def call_raw(channel: grpc.aio.Channel, method: str, payload: bytes, *, client_stream: bool = False,
                   server_stream: bool = False, timeout: float = 30) -> tuple[grpc.StatusCode, Refusal | None]:
    """Send ``payload`` (raw bytes, whatever they are) to ``method``; the final status and its details.

    Client-streaming calls go through the blocking API with the same identity. The asyncio client has a
    race of its own: when the server ends a stream (a refusal, an oversized message) while the client is
    still sending, the failed send makes the client record INTERNAL "Internal error from Core" with no
    details (``grpc.aio._call._StreamRequestMixin._write`` -> ``set_internal_error``), and the caller sees
    that instead of the server's status. The blocking client stops sending and reports the status the
    server actually sent, which is what these suites judge.
    """
    twin = _blocking_twin(channel) if client_stream else None
    if twin is not None:
        return await asyncio.to_thread(_blocking_stream_call, twin, method, payload, server_stream, timeout)
    try:
        if client_stream:
            async def one() -> AsyncIterator[bytes]:
                yield payload

            if server_stream:
                call = channel.stream_stream(method)(one(), timeout=timeout)
                async for _ in call:
                    pass
            else:
                await channel.stream_unary(method)(one(), timeout=timeout)
        elif server_stream:
            async for _ in channel.unary_stream(method)(payload, timeout=timeout):
                break
        else:
            await channel.unary_unary(method)(payload, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return error.code(), refusal(error)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # grpc's own cancellation of a streaming call whose deadline passed on the client side.
        return grpc.StatusCode.DEADLINE_EXCEEDED, None
    return grpc.StatusCode.OK, None


async def serving(channel: grpc.aio.Channel, timeout: float = 20) -> bool:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# -- data ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resident:
    code: str
    family_name: str
    given_name: str
    municipality_code: str


async def national_residents(mesh: Mesh, limit: int, municipality: str | None = None) -> list[Resident]:
    """Current residents of the national store (seeded ones), ordered by code."""
    conn = await mesh.admin()
    try:
        rows = await conn.fetch(
            "SELECT resident_code, family_name, given_name, municipality_code FROM intake_national.residents "
            "WHERE status = 1 AND ($2::text IS NULL OR municipality_code = $2) ORDER BY resident_code LIMIT $1",
            limit, municipality,
        )
    finally:
        await conn.close()
    return [Resident(r["resident_code"], r["family_name"], r["given_name"], r["municipality_code"]) for r in rows]


async def register_entries(mesh: Mesh, municipality: str, limit: int) -> list[municipal_pb2.ResidentEntry]:
    """Adults' 住民票 of a municipality's register, as its CS keeps them."""
    conn = await mesh.admin()
    try:
        rows = await conn.fetch(
            f'SELECT entry FROM "{schema_name("municipal-" + municipality)}".residents '
            "WHERE relationship IN ('世帯主', '妻', '夫') AND status = 1 ORDER BY resident_code LIMIT $1", limit,
        )
    finally:
        await conn.close()
    return [municipal_pb2.ResidentEntry.FromString(bytes(r["entry"])) for r in rows]


def pdate(day: dt.date) -> common_pb2.Date:
    return common_pb2.Date(year=day.year, month=day.month, day=day.day)


def birth(parent: municipal_pb2.ResidentEntry, rng: random.Random, today: dt.date,
          given_name: str = "未来") -> municipal_pb2.RecordChangeRequest:
    """A 出生 at the parent's address, in the parent's household (unsigned)."""
    born = today - dt.timedelta(days=rng.randint(1, 10))
    entry = municipal_pb2.ResidentEntry(
        resident_code=domain.generate_resident_code(rng),
        name=common_pb2.PersonName(family_name=parent.name.family_name, given_name=given_name,
                                   family_name_kana=parent.name.family_name_kana, given_name_kana="ミライ"),
        birth_date=pdate(born), sex=common_pb2.SEX_FEMALE, address=parent.address,
        resident_kind=common_pb2.RESIDENT_KIND_JAPANESE, household_id=parent.household_id,
        household_head=parent.household_head, relationship="子", registered_domicile=parent.registered_domicile,
        head_of_family_register=parent.head_of_family_register,
    )
    return municipal_pb2.RecordChangeRequest(
        change_kind=common_pb2.CHANGE_KIND_BIRTH, entry=entry, occurred_on=pdate(born), notified_on=pdate(today),
    )


# -- the access log ------------------------------------------------------------------------------------

async def provisions(mesh: Mesh, resident_code: str, *, include_refused: bool = False,
                     ) -> list[accesslog_pb2.LoggedProvision]:
    """Every access-log record of ``resident_code`` (read as the disclosure service may)."""
    stub = accesslog_pb2_grpc.AccessLogServiceStub(mesh.channel("accesslog", "service", "disclosure"))
    found: list[accesslog_pb2.LoggedProvision] = []
    token = ""
    while True:
        reply = await stub.ListProvisions(accesslog_pb2.ListProvisionsRequest(
            resident_code=resident_code, page_size=500, page_token=token, include_refused=include_refused,
        ), timeout=60)
        found += reply.provisions
        token = reply.next_page_token
        if not token:
            return found


async def verify_log(mesh: Mesh) -> accesslog_pb2.VerifyLogResponse:
    stub = accesslog_pb2_grpc.AccessLogServiceStub(mesh.channel("accesslog", "operator", "demo-operator"))
    reply: accesslog_pb2.VerifyLogResponse = await stub.VerifyLog(accesslog_pb2.VerifyLogRequest(), timeout=120)
    return reply


async def refused_records(mesh: Mesh) -> list[accesslog_pb2.ProvisionRecord]:
    """Every REFUSED record of the access log (read as the administrator: the payload is the record)."""
    conn = await mesh.admin()
    try:
        rows = await conn.fetch("SELECT payload FROM accesslog.records WHERE outcome = $1 ORDER BY sequence",
                                accesslog_pb2.PROVISION_OUTCOME_REFUSED)
    finally:
        await conn.close()
    out = []
    for row in rows:
        with contextlib.suppress(Exception):
            out.append(accesslog_pb2.ProvisionRecord.FromString(bytes(row["payload"])))
    return out
