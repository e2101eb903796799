"""Seeding a fresh local mesh with a synthetic population (``juki up --population N``).

The municipal registers are the source of truth: each municipality's share of the generated people is
written straight into its CS schema (COPY as the administrative role, for speed), then each CS sends its
whole register up through the real path (MunicipalService.ResyncToPrefecture -> IntakeService.BulkLoad
at the prefecture, relayed to the national centre). A mesh that already holds residents is left as it is.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc

from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.mesh.operator import sign_operator_proof
from juki.mesh.settings import TlsFiles, schema_name
from juki.mesh.supervisor import DEMO_OPERATOR_PASSWORD
from juki.mesh.tls import secure_channel
from juki.municipal import convert
from juki.seeding.population import FOREIGN_SHARE, Person, Relationship, generate

RESYNC_METHOD = "/juki.municipal.v1.MunicipalService/ResyncToPrefecture"
COPY_BATCH = 20_000
RESYNC_DEADLINE = 24 * 3600  # a big register takes long; an interrupted one continues when sent again
RESYNC_CALLS = 100  # ResyncToPrefecture calls of one register (each may be cut at the maximum connection age)


def individual_number(resident_code: str) -> str:
    """A deterministic, well-formed 個人番号 (12 digits, the last a check digit) for a synthetic resident."""
    body = str(int.from_bytes(hashlib.sha256(resident_code.encode()).digest()[:8], "big") % 10**11).zfill(11)
    total = 0
    for n, digit in enumerate(reversed(body), start=1):
        weight = n + 1 if n <= 6 else n - 5
        total += int(digit) * weight
    remainder = total % 11
    return body + str(0 if remainder <= 1 else 11 - remainder)


def _registered_on(person: Person, today: dt.date) -> dt.date:
    start = domain.FOREIGN_RESIDENTS_REGISTERED if person.resident_kind is domain.ResidentKind.FOREIGN \
        else domain.NETWORK_START
    return min(max(person.birth_date.earliest(), start), today)


def entry_from_person(person: Person, household_head: str, registered_on: dt.date,
                      household_prefix: str = "") -> municipal_pb2.ResidentEntry:
    """A synthetic person as the 住民票 entry of their municipality."""
    kana_family, _, kana_given = (person.kana or "").partition(convert.IDEOGRAPHIC_SPACE)
    return municipal_pb2.ResidentEntry(
        resident_code=person.resident_code,
        name=common_pb2.PersonName(
            family_name=person.family_name, given_name=person.given_name,
            family_name_kana=kana_family, given_name_kana=kana_given,
            alphabetic_name=person.alphabetic_name or "", common_name=person.common_name or "",
        ),
        birth_date=convert.partial_to_proto(person.birth_date),
        sex=convert.sex_to_proto(person.sex),
        address=convert.full_address(person.address.municipality_code, person.address.street),
        resident_kind=convert.kind_to_proto(person.resident_kind),
        household_id=f"{household_prefix or person.address.municipality_code}-{person.household_id}",
        household_head=household_head,
        relationship=person.relationship.value,
        registered_domicile=person.honseki or "",
        head_of_family_register=person.hittousha or "",
        status=common_pb2.RESIDENT_STATUS_CURRENT,
        became_resident_on=convert.date_to_proto(registered_on),
        address_since=convert.date_to_proto(registered_on),
        address_notified_on=convert.date_to_proto(registered_on),
        version=1,
    )


def business_day(supervisor: Any) -> dt.date:
    """The mesh's business date (``juki up --clock``), so the population is as old as the mesh's today."""
    import os

    setting = supervisor.extra_env.get("JUKI_CLOCK") or os.environ.get("JUKI_CLOCK")
    return domain.parse_clock(setting).today()


async def _count(conn: asyncpg.Connection, schema: str) -> int:
    return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".residents'))


async def load_registers(admin_url: str, municipalities: list[str], n: int, seed: int,
                         today: dt.date | None = None) -> Counter[str]:
    """Generate ``n`` residents across ``municipalities`` and COPY them into the municipal schemas.

    Ages are as of ``today`` (the business day); before 2012-07-09 there are no foreign residents' 住民票.
    """
    today = today or domain.SystemClock().today()
    foreign_share = FOREIGN_SHARE if today >= domain.FOREIGN_RESIDENTS_REGISTERED else 0.0
    loaded: Counter[str] = Counter()
    conn = await asyncpg.connect(admin_url)
    try:
        pending: dict[str, list[tuple[Any, ...]]] = {m: [] for m in municipalities}
        heads: dict[tuple[str, int], str] = {}

        async def flush(code: str) -> None:
            rows = pending[code]
            if rows:
                await conn.copy_records_to_table(
                    "residents", schema_name=schema_name(f"municipal-{code}"), records=rows,
                    columns=["resident_code", "household_id", "relationship", "status", "entry", "version"],
                )
                loaded[code] += len(rows)
                pending[code] = []

        for person in generate(n, seed, municipalities, reference_date=today, foreign_share=foreign_share):
            code = person.address.municipality_code
            key = (code, person.household_id)
            full_name = convert.IDEOGRAPHIC_SPACE.join(p for p in (person.family_name, person.given_name) if p)
            if person.relationship is Relationship.HEAD or key not in heads:
                heads[key] = full_name
            entry = entry_from_person(person, heads[key], _registered_on(person, today), f"{code}-s{seed}")
            entry.individual_number = individual_number(person.resident_code)
            pending[code].append((entry.resident_code, entry.household_id, entry.relationship, entry.status,
                                  entry.SerializeToString(), entry.version))
            if len(pending[code]) >= COPY_BATCH:
                await flush(code)
        for code in municipalities:
            await flush(code)
    finally:
        await conn.close()
    return loaded


async def resync(address: str, tls: TlsFiles, operator: tuple[Any, Any]) -> municipal_pb2.ResyncToPrefectureResponse:
    """Ask one municipal CS to send its whole register to its prefecture, as the demo operator."""
    cert, key = operator
    request = municipal_pb2.ResyncToPrefectureRequest()
    sign_operator_proof(request, RESYNC_METHOD, cert_pem=cert.read_bytes(), key_pem=key.read_bytes(),
                        password=DEMO_OPERATOR_PASSWORD)
    async with secure_channel(address, tls) as channel:
        stub = municipal_pb2_grpc.MunicipalServiceStub(channel)
        for call in range(1, RESYNC_CALLS + 1):
            try:
                response: municipal_pb2.ResyncToPrefectureResponse = await stub.ResyncToPrefecture(
                    request, timeout=RESYNC_DEADLINE)
                return response
            except grpc.aio.AioRpcError as error:
                # A call longer than the CS's maximum connection age is cut; the next one continues the load.
                if error.code() != grpc.StatusCode.UNAVAILABLE or call == RESYNC_CALLS:
                    raise
                await asyncio.sleep(1.0)
                sign_operator_proof(request, RESYNC_METHOD, cert_pem=cert.read_bytes(), key_pem=key.read_bytes(),
                                    password=DEMO_OPERATOR_PASSWORD)  # a fresh proof (a nonce is used once)
    raise AssertionError("unreachable")


async def _not_at_prefecture(admin_url: str, municipalities: list[str]) -> list[str]:
    """Municipalities of which the prefecture's store holds no resident (or cannot be read), or whose CS
    has a resync in progress (interrupted: sent again, it continues where the prefecture has it)."""
    conn = await asyncpg.connect(admin_url)
    try:
        found = []
        for code in municipalities:
            schema = schema_name(f"intake-prefecture-{code[:2]}")
            try:
                held = await conn.fetchval(
                    f'SELECT EXISTS (SELECT 1 FROM "{schema}".residents WHERE municipality_code = $1)', code)
            except asyncpg.PostgresError:
                held = False
            register = schema_name(f"municipal-{code}")
            try:
                unfinished = await conn.fetchval(f"SELECT resync_load_id <> '' FROM \"{register}\".outbox_state")
            except asyncpg.PostgresError:
                unfinished = False
            if not held or unfinished:
                found.append(code)
        return found
    finally:
        await conn.close()


async def _resync_all(supervisor: Any, municipalities: list[str], echo: Callable[[str], None]
                      ) -> tuple[int, int, list[str]]:
    """ResyncToPrefecture at each CS as the demo operator; (applied, rejected, problems)."""
    ca = supervisor.ca
    operator = ca.paths("operator", "demo-operator")
    tls = TlsFiles(ca=ca.ca_cert_path, cert=operator[0], key=operator[1])
    applied = rejected = 0
    problems: list[str] = []
    for code in municipalities:
        echo(f"  {code}: sending the register to the prefecture (BulkLoad) ...")
        try:
            result = await resync(supervisor.address(f"municipal-{code}"), tls, operator)
        except grpc.aio.AioRpcError as error:
            problems.append(f"{code} resync failed: {error.code().name} {error.details()}")
            continue
        applied += result.records_applied
        rejected += result.records_rejected
    return applied, rejected, problems


async def seed_population(supervisor: Any, n: int, seed: int, echo: Callable[[str], None]) -> str:
    """Seed an empty mesh (called by ``juki up`` once every service runs); return a one-line summary."""
    municipalities = list(supervisor.layout.municipalities)
    conn = await asyncpg.connect(supervisor.admin_url)
    try:
        existing = {m: await _count(conn, schema_name(f"municipal-{m}")) for m in municipalities}
    finally:
        await conn.close()
    if any(existing.values()):
        counts = ", ".join(f"{m} {c}" for m, c in existing.items())
        summary = f"already seeded ({sum(existing.values())} residents: {counts}); reusing the data"
        # A register whose prefecture holds none of it (an earlier resync failed) is sent up again.
        missing = [m for m in await _not_at_prefecture(supervisor.admin_url, municipalities) if existing[m]]
        if missing:
            applied, _, problems = await _resync_all(supervisor, missing, echo)
            summary += f"; resynced {', '.join(missing)} ({applied} applied)" + "".join(f"; {p}" for p in problems)
        return summary
    if n <= 0:
        return "no population requested"
    echo(f"generating {n} synthetic residents (seed {seed}) across {', '.join(municipalities)} ...")
    loaded = await load_registers(supervisor.admin_url, municipalities, n, seed, business_day(supervisor))
    for code in municipalities:
        echo(f"  {code}: {loaded[code]} residents in the register")
    applied, rejected, problems = await _resync_all(supervisor, municipalities, echo)
    parts = ", ".join(f"{m} {loaded[m]}" for m in municipalities)
    summary = f"seeded {sum(loaded.values())} residents ({parts}); prefectures applied {applied}"
    if rejected:
        summary += f", rejected {rejected}"
    if problems:
        summary += "; " + "; ".join(problems)
    return summary
