"""Chaos: under a steady load of notifications (municipal CS RecordChange) and lookups (agency jps,
B1-PENSION-BENEFIT), every service process is SIGKILLed in turn and PostgreSQL is restarted.

After each fault: every acknowledged notification is at the national store exactly once, every answer the
client received has its access-log record, the access log verifies, and the clients saw only retryable
statuses (UNAVAILABLE; DEADLINE_EXCEEDED while a process was gone) and never wrong data.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from juki import domain
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.card.v1 import card_pb2
from juki._gen.juki.disclosure.v1 import disclosure_pb2
from juki._gen.juki.intake.v1 import intake_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc

from tests.faults import (
    NAKANO,
    PENSION,
    RECORD_CHANGE,
    YOKOHAMA,
    Mesh,
    Resident,
    birth,
    call_raw,
    local_mesh,
    national_residents,
    provisions,
    register_entries,
    serving,
    verify_log,
)

pytestmark = pytest.mark.chaos

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# Order: the tiers a notification crosses, then the lookup path, then the rest, then the database.
# "postgresql" is a crash-like immediate restart by pg_ctl; "postgresql-kill" SIGKILLs the postmaster and
# leaves the restart to the supervisor, three times, for a median time to recovery.
FAULTS = ("intake-prefecture-13", "intake-national", "lookup", "accesslog", "card", "disclosure",
          f"municipal-{NAKANO}", "postgresql", "postgresql-kill", "postgresql-kill", "postgresql-kill")
RETRY_PAUSE = 0.05  # the clients' pause before a retry: fine enough to time a recovery


@dataclass
class Load:
    """Notification and lookup clients that retry what is retryable and remember what was acknowledged."""

    mesh: Mesh
    parents: dict[str, list[municipal_pb2.ResidentEntry]]
    residents: list[Resident]
    acked: dict[str, str] = field(default_factory=dict)  # resident code of a birth -> notification id
    answers: Counter[str] = field(default_factory=Counter)  # resident code -> answers received
    statuses: Counter[str] = field(default_factory=Counter)  # every non-OK status the clients saw
    unexpected: list[str] = field(default_factory=list)  # non-retryable failures and wrong data
    retries: int = 0
    lost_answers: int = 0  # retries answered from an earlier attempt (replayed): its answer was lost
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ack_times: list[float] = field(default_factory=list)  # time.monotonic() of every acknowledgement
    answer_times: list[float] = field(default_factory=list)  # time.monotonic() of every lookup answer
    reads: Counter[str] = field(default_factory=Counter)  # "instance STATUS" of the reader's calls
    lookup_errors: int = 0  # statuses the agency's lookups saw (after the channel's own retries)

    async def _notify_once(self, municipality: str, rng: random.Random, today: dt.date) -> None:
        parent = rng.choice(self.parents[municipality])
        request = birth(parent, rng, today)
        # One request id per birth, kept across retries: a retry whose first attempt committed before the
        # process died is answered from that attempt (replayed), never refused or applied twice.
        request.request_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        code = request.entry.resident_code
        stub = municipal_pb2_grpc.MunicipalServiceStub(self.mesh.channel(f"municipal-{municipality}", "operator",
                                                                         "demo-operator"))
        attempts = 0
        while True:
            attempts += 1
            self.mesh.sign(request, RECORD_CHANGE)  # a fresh proof per attempt (a replayed one is refused)
            try:
                reply = await stub.RecordChange(request, timeout=20)
            except grpc.aio.AioRpcError as error:
                self.statuses[error.code().name] += 1
                if error.code() in RETRYABLE and attempts < 2000:
                    self.retries += 1
                    await asyncio.sleep(RETRY_PAUSE)
                    continue
                self.unexpected.append(f"RecordChange {code}: {error.code().name} {error.details()}")
                return
            if reply.resident_code != code:
                self.unexpected.append(f"RecordChange {code} answered for {reply.resident_code}")
            if reply.replayed:
                self.lost_answers += 1  # an earlier attempt committed; its answer was lost with the process
            self.acked[code] = reply.notification_id
            self.ack_times.append(time.monotonic())
            return

    async def notifier(self, municipality: str, seed: int) -> None:
        rng = random.Random(seed)
        today = domain.SystemClock().today()
        while not self.stop.is_set():
            await self._notify_once(municipality, rng, today)
            await asyncio.sleep(0.05)

    async def looker(self, offset: int) -> None:
        stub = lookup_pb2_grpc.LookupServiceStub(self.mesh.channel("lookup", "agency", "jps"))
        n = offset
        while not self.stop.is_set():
            resident = self.residents[n % len(self.residents)]
            n += 1
            try:
                reply = await stub.LookupByCode(
                    lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=resident.code), timeout=20)
            except grpc.aio.AioRpcError as error:
                self.statuses[error.code().name] += 1
                self.lookup_errors += 1
                if error.code() in RETRYABLE:
                    self.retries += 1
                    await asyncio.sleep(RETRY_PAUSE)
                else:
                    self.unexpected.append(f"LookupByCode {resident.code}: {error.code().name} {error.details()}")
                continue
            record = reply.record
            if (record.resident_code, record.name.family_name, record.name.given_name) != (
                    resident.code, resident.family_name, resident.given_name):
                self.unexpected.append(f"LookupByCode {resident.code} answered {record.resident_code} "
                                       f"{record.name.family_name} {record.name.given_name}")
            self.answers[resident.code] += 1
            self.answer_times.append(time.monotonic())

    async def reader(self) -> None:
        """Reads of every other service that has a database, so that each one meets every outage.

        Any answer is fine (a resident found, a card not found) except INTERNAL/UNKNOWN: an outage must
        reach callers as UNAVAILABLE. Each call is a fresh one (no retry), so every fault is seen.
        """
        mesh = self.mesh
        n = 0
        while not self.stop.is_set():
            resident = self.residents[n % len(self.residents)]
            n += 1
            calls: list[tuple[str, str, tuple[str, str], Any]] = [
                ("intake-national", "/juki.intake.v1.IntakeService/GetResident", ("operator", "demo-operator"),
                 intake_pb2.GetResidentRequest(resident_code=resident.code)),
                ("intake-prefecture-13", "/juki.intake.v1.IntakeService/GetIntakeStatus",
                 ("operator", "demo-operator"), intake_pb2.GetIntakeStatusRequest()),
                ("card", "/juki.card.v1.CardService/GetCardStatus", ("operator", "demo-operator"),
                 card_pb2.GetCardStatusRequest(card_number=f"{n:016d}")),
                ("accesslog", "/juki.accesslog.v1.AccessLogService/ListProvisions", ("service", "disclosure"),
                 accesslog_pb2.ListProvisionsRequest(resident_code=resident.code, page_size=5)),
                (f"municipal-{NAKANO}", "/juki.municipal.v1.MunicipalService/GetResidentEntry",
                 ("operator", "demo-operator"),
                 municipal_pb2.GetResidentEntryRequest(resident_code=resident.code,
                                                       requesting_municipality_code=NAKANO)),
            ]
            disclosure = disclosure_pb2.GetDisclosureRequest(resident_code=resident.code)
            mesh.sign(disclosure, "/juki.disclosure.v1.DisclosureService/GetDisclosure", "counter_operator")
            calls.append(("disclosure", "/juki.disclosure.v1.DisclosureService/GetDisclosure",
                          ("operator", "demo-operator"), disclosure))
            for instance, method, identity, request in calls:
                if "operator_proof" in request.DESCRIPTOR.fields_by_name:
                    mesh.sign(request, method)
                code, details = await call_raw(mesh.channel(instance, *identity), method,
                                               request.SerializeToString(), timeout=20)
                self.reads[f"{instance} {code.name}"] += 1
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    self.unexpected.append(f"{method} answered {code.name}: {details}")
            await asyncio.sleep(0.05)

    def run(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self.notifier(NAKANO, 1)),
            asyncio.create_task(self.notifier(YOKOHAMA, 2)),
            asyncio.create_task(self.looker(0)),
            asyncio.create_task(self.looker(7)),
            asyncio.create_task(self.reader()),
        ]


@pytest.fixture(scope="module", params=[1, 2], ids=["replicas-1", "replicas-2"])
async def chaos_mesh(request: pytest.FixtureRequest) -> AsyncIterator[Mesh]:
    # Checkpoints often, so that every fault lands between signed checkpoints and VerifyLog checks them.
    # At 2 replicas (`juki up --replicas 2`) the first replica of each service is the one killed.
    async with local_mesh(60, prefix="juki-chaos-", extra_env={"JUKI_ACCESSLOG_CHECKPOINT_SECONDS": "2"},
                          replicas=request.param) as mesh:
        yield mesh


async def restart_postgresql(mesh: Mesh) -> None:
    """An immediate (crash-like) restart of the embedded server: WAL recovery on the way back up."""
    embedded = mesh.supervisor.embedded
    assert embedded is not None, "the chaos suite runs on the embedded PostgreSQL"
    await asyncio.to_thread(embedded.restart, "immediate")


async def inject(mesh: Mesh, fault: str) -> float:
    """Inject one fault and wait until the failed part is back; returns when it was ready (monotonic)."""
    if fault == "postgresql":
        await restart_postgresql(mesh)
        return time.monotonic()
    if fault == "postgresql-kill":
        pid = await mesh.supervisor.kill_database()
        await mesh.supervisor.wait_database_restarted(pid, timeout=90)
        return time.monotonic()
    pid = await mesh.supervisor.kill(fault)
    await mesh.supervisor.wait_restarted(fault, pid, timeout=90)
    return time.monotonic()


async def first_success_after(times: list[float], since: float, timeout: float = 90) -> float | None:
    """The first time in ``times`` (appended to as the load runs) after ``since``; None if none comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        later = [t for t in times if t > since]
        if later:
            return min(later)
        await asyncio.sleep(0.02)
    return None


async def until_delivered(mesh: Mesh, acked: dict[str, str], timeout: float = 120) -> dict[str, int]:
    """Wait until every acknowledged birth is at the national store; return its notification count per code."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while True:
        conn = await mesh.admin()
        try:
            rows = await conn.fetch(
                "SELECT n.resident_code, count(*) AS c FROM intake_national.notifications n "
                "WHERE n.resident_code = ANY($1::text[]) GROUP BY n.resident_code", list(acked))
            resident_rows = await conn.fetchval(
                "SELECT count(*) FROM intake_national.residents WHERE resident_code = ANY($1::text[])", list(acked))
        finally:
            await conn.close()
        counts = {r["resident_code"]: int(r["c"]) for r in rows}
        if (len(counts) == len(acked) and resident_rows == len(acked)) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.5)


@pytest.mark.timeout(900)  # eight faults, each waited out; generous for a loaded CI machine
async def test_the_mesh_loses_nothing_when_each_process_and_the_database_fail(chaos_mesh: Mesh) -> None:
    mesh = chaos_mesh
    parents = {m: await register_entries(mesh, m, 20) for m in (NAKANO, YOKOHAMA)}
    residents = await national_residents(mesh, 24)
    assert all(parents.values()) and len(residents) >= 10, "the seeded population is too small"
    load = Load(mesh, parents, residents)
    tasks = load.run()
    report: list[dict[str, object]] = []
    try:
        await asyncio.sleep(3)
        for fault in FAULTS:
            before = (len(load.acked), sum(load.answers.values()))
            errors_before = load.lookup_errors
            injected = time.monotonic()
            ready = await inject(mesh, fault)
            # Successes after the failed part is back (one already in flight at the fault does not count).
            first_ack = await first_success_after(load.ack_times, ready)
            first_answer = await first_success_after(load.answer_times, ready)
            assert first_ack is not None and first_answer is not None, f"after {fault}: the load never recovered"
            await asyncio.sleep(2)  # the load runs on against the restarted process
            lookup_errors = load.lookup_errors - errors_before
            if mesh.supervisor.replicas > 1 and not fault.startswith("postgresql"):
                # Another replica was there all along: the channel's retry policy (UNAVAILABLE on
                # idempotent methods, round_robin) absorbs the killed one; the agency sees nothing.
                assert lookup_errors == 0, f"after {fault} at {mesh.supervisor.replicas} replicas: {lookup_errors}"
            snapshot = dict(load.acked)
            counts = await until_delivered(mesh, snapshot)
            missing = sorted(set(snapshot) - set(counts))
            doubled = sorted(c for c, n in counts.items() if n != 1)
            assert not missing, f"after {fault}: acknowledged births missing at the national store: {missing[:5]}"
            assert not doubled, f"after {fault}: births at the national store more than once: {doubled[:5]}"
            verified = await verify_log(mesh)
            assert verified.ok, f"after {fault}: the access log does not verify: {verified.problem}"
            assert not load.unexpected, f"after {fault}: {load.unexpected[:5]}"
            report.append({"fault": fault, "notifications_acked": len(snapshot) - before[0],
                           "lookups_answered": sum(load.answers.values()) - before[1],
                           "restarts": dict(mesh.supervisor.restarts),
                           # time to recovery: from the fault to the first acknowledgement / answer, and
                           # from the failed part's readiness to the first success after it
                           "fault_to_first_ack_s": round(first_ack - injected, 3),
                           "fault_to_first_answer_s": round(first_answer - injected, 3),
                           "ready_after_fault_s": round(ready - injected, 3),
                           "ready_to_first_ack_s": round(first_ack - ready, 3),
                           "ready_to_first_answer_s": round(first_answer - ready, 3),
                           "lookup_errors": lookup_errors})
    finally:
        load.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    # Every answer the agency received has its PROVIDED record (to jps, for the pension 事務).
    for code, answered in sorted(load.answers.items()):
        logged = [p for p in await provisions(mesh, code)
                  if p.record.recipient == "spiffe://juki.local/agency/jps" and p.record.purpose == PENSION]
        assert len(logged) >= answered, f"{code}: {answered} answers received, {len(logged)} provisions logged"
    assert not load.unexpected, load.unexpected[:10]
    assert set(load.statuses) <= {c.name for c in RETRYABLE}, load.statuses
    assert len(load.acked) > len(FAULTS) and sum(load.answers.values()) > len(FAULTS)
    for instance in ("card", "disclosure", "lookup", "accesslog", "intake-national", f"municipal-{NAKANO}"):
        assert await serving(mesh.channel(instance, "operator", "demo-operator"))
    assert all(mesh.supervisor.restarts.get(f, 0) >= 1 for f in FAULTS if not f.startswith("postgresql"))
    assert mesh.supervisor.restarts.get("postgresql", 0) == FAULTS.count("postgresql-kill")

    # The operator's verb agrees.
    verify = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "juki", "audit", "verify", "--data-dir", str(mesh.supervisor.data_dir),
                         "--json"], capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    kills = [r for r in report if r["fault"] == "postgresql-kill"]
    database_recovery = {
        "kill_to_first_ack_p50_s": statistics.median(float(str(r["fault_to_first_ack_s"])) for r in kills),
        "kill_to_first_answer_p50_s": statistics.median(float(str(r["fault_to_first_answer_s"])) for r in kills),
    }
    summary = {"replicas": mesh.supervisor.replicas, "faults": report, "database_recovery": database_recovery, "notifications_acked": len(load.acked), "lookups_answered": sum(load.answers.values()),
               "client_statuses": dict(load.statuses), "retries": load.retries, "lost_answers": load.lost_answers,
               "reads": dict(sorted(load.reads.items()))}
    print("CHAOS " + json.dumps(summary, ensure_ascii=False))
