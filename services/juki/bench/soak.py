"""``juki bench soak``: hold lookups and notifications at a fraction of the measured maximum for N minutes.

On a fresh local mesh (one process per service, the embedded PostgreSQL, a seeded population): first a
short closed-loop run measures the maximum rate of agency lookups (LookupByCode, B1-PENSION-BENEFIT) and of
notifications (births at the municipal CS, RecordChange with an operator proof) running together; then both
are offered, open-loop, at ``--fraction`` (default 80%) of those rates for ``--minutes``. Prints one JSON
object: the maxima, the rates held, per-minute throughput and p50/p99 latency, errors by status, and the
resident memory (VmRSS from /proc) of every service process at the start and at the end of the soak.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc

from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.bench.harness import emit, json_flag, percentile, rss_kib
from juki.mesh.operator import sign_operator_proof
from juki.mesh.settings import TlsFiles, schema_name
from juki.mesh.supervisor import MeshLayout, Supervisor
from juki.mesh.tls import secure_channel

if TYPE_CHECKING:
    from rich.console import Console

PENSION = "B1-PENSION-BENEFIT"
RECORD_CHANGE = "/juki.municipal.v1.MunicipalService/RecordChange"


def register_bench(bench_sub: Any) -> None:
    parser = bench_sub.add_parser("soak", help="hold lookups and notifications at 80%% of the maximum for N minutes")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    parser.add_argument("--population", type=int, default=2_000, help="residents to seed (default 2000)")
    parser.add_argument("--fraction", type=float, default=0.8, help="share of the measured maximum to hold")
    parser.add_argument("--probe-seconds", type=float, default=15.0, help="length of the maximum-rate probe")
    parser.add_argument("--concurrency", type=int, default=32, help="lookups in flight while probing")
    json_flag(parser)
    parser.set_defaults(func=cmd_bench_soak)


def _percentile(values: list[float], fraction: float) -> float:
    return round(percentile(values, fraction), 2)


@dataclass
class Sample:
    at: float
    kind: str
    millis: float
    status: str


@dataclass
class Workload:
    """The two request kinds against a running mesh, each timed."""

    supervisor: Supervisor
    residents: list[str]
    parents: dict[str, list[municipal_pb2.ResidentEntry]]
    samples: list[Sample] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(20020805))
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def tls(self, kind: str, name: str) -> TlsFiles:
        assert self.supervisor.ca is not None
        cert, key = self.supervisor.ca.paths(kind, name)
        return TlsFiles(ca=self.supervisor.ca.ca_cert_path, cert=cert, key=key)

    def channel(self, instance: str, kind: str, name: str) -> grpc.aio.Channel:
        if instance not in self.channels:
            self.channels[instance] = secure_channel(self.supervisor.address(instance), self.tls(kind, name))
        return self.channels[instance]

    async def _timed(self, kind: str, call: Callable[[], Awaitable[Any]]) -> None:
        started = time.perf_counter()
        status = "OK"
        try:
            await call()
        except grpc.aio.AioRpcError as error:
            status = error.code().name
        self.samples.append(Sample(time.monotonic(), kind, (time.perf_counter() - started) * 1000, status))

    async def lookup(self) -> None:
        stub = lookup_pb2_grpc.LookupServiceStub(self.channel("lookup", "agency", "jps"))
        code = self.rng.choice(self.residents)
        await self._timed("lookup", lambda: stub.LookupByCode(
            lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=code), timeout=30))

    async def notify(self) -> None:
        municipality = self.rng.choice(list(self.parents))
        parent = self.rng.choice(self.parents[municipality])
        today = domain.SystemClock().today()
        born = today - dt.timedelta(days=self.rng.randint(1, 10))
        date = common_pb2.Date(year=born.year, month=born.month, day=born.day)
        entry = municipal_pb2.ResidentEntry(
            resident_code=domain.generate_resident_code(self.rng),
            name=common_pb2.PersonName(family_name=parent.name.family_name, given_name="未来",
                                       family_name_kana=parent.name.family_name_kana, given_name_kana="ミライ"),
            birth_date=date, sex=common_pb2.SEX_FEMALE, address=parent.address,
            resident_kind=common_pb2.RESIDENT_KIND_JAPANESE, household_id=parent.household_id,
            household_head=parent.household_head, relationship="子", registered_domicile=parent.registered_domicile,
            head_of_family_register=parent.head_of_family_register,
        )
        request = municipal_pb2.RecordChangeRequest(
            change_kind=common_pb2.CHANGE_KIND_BIRTH, entry=entry, occurred_on=date,
            notified_on=common_pb2.Date(year=today.year, month=today.month, day=today.day))
        operator = self.tls("operator", "demo-operator")
        sign_operator_proof(request, RECORD_CHANGE, cert_pem=operator.cert.read_bytes(),
                            key_pem=operator.key.read_bytes(), password="demo-password")
        stub = municipal_pb2_grpc.MunicipalServiceStub(
            self.channel(f"municipal-{municipality}", "operator", "demo-operator"))
        await self._timed("notification", lambda: stub.RecordChange(request, timeout=30))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


async def closed_loop(work: Workload, seconds: float, lookups: int, notifiers: int) -> dict[str, float]:
    """Every worker sends its next request as soon as the last is answered: the maximum rates."""
    stop = time.monotonic() + seconds
    first = len(work.samples)

    async def worker(step: Callable[[], Awaitable[None]]) -> None:
        while time.monotonic() < stop:
            await step()

    started = time.monotonic()
    await asyncio.gather(*[worker(work.lookup) for _ in range(lookups)],
                         *[worker(work.notify) for _ in range(notifiers)])
    elapsed = time.monotonic() - started
    done = [s for s in work.samples[first:] if s.status == "OK"]
    return {kind: sum(1 for s in done if s.kind == kind) / elapsed for kind in ("lookup", "notification")}


async def open_loop(work: Workload, rates: dict[str, float], seconds: float, progress: Callable[[float], None],
                    max_in_flight: int = 512) -> int:
    """Offer each kind at its rate whatever the answers do; return the requests not sent (all slots busy)."""
    in_flight: set[asyncio.Task[None]] = set()
    dropped = 0
    started = time.monotonic()
    steps = {"lookup": work.lookup, "notification": work.notify}
    sent = {kind: 0 for kind in rates}
    while (now := time.monotonic()) - started < seconds:
        for kind, rate in rates.items():
            due = int((now - started) * rate) - sent[kind]
            for _ in range(max(0, due)):
                sent[kind] += 1
                if len(in_flight) >= max_in_flight:
                    dropped += 1
                    continue
                task = asyncio.create_task(steps[kind]())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        progress(now - started)
        await asyncio.sleep(0.005)
    if in_flight:
        await asyncio.wait(in_flight, timeout=60)
    return dropped


def per_minute(samples: list[Sample], start: float, seconds: float) -> list[dict[str, Any]]:
    minutes = []
    for index in range(max(1, int(seconds // 60 + (1 if seconds % 60 > 1 else 0)))):
        lo, hi = start + index * 60, min(start + (index + 1) * 60, start + seconds)
        window = [s for s in samples if lo <= s.at < hi]
        span = max(hi - lo, 1e-9)
        entry: dict[str, Any] = {"minute": index + 1, "seconds": round(span, 1)}
        for kind in ("lookup", "notification"):
            ok = [s.millis for s in window if s.kind == kind and s.status == "OK"]
            entry[kind] = {"per_second": round(len(ok) / span, 1), "p50_ms": _percentile(ok, 0.5),
                           "p99_ms": _percentile(ok, 0.99),
                           "errors": sum(1 for s in window if s.kind == kind and s.status != "OK")}
        minutes.append(entry)
    return minutes


async def _seeded(supervisor: Supervisor) -> tuple[list[str], dict[str, list[municipal_pb2.ResidentEntry]]]:
    conn = await asyncpg.connect(supervisor.admin_url)
    try:
        deadline = time.monotonic() + 300
        while True:
            codes = [r["resident_code"] for r in await conn.fetch(
                "SELECT resident_code FROM intake_national.residents WHERE status = 1")]
            registered = 0
            for m in supervisor.layout.municipalities:
                registered += int(await conn.fetchval(f'SELECT count(*) FROM "{schema_name("municipal-" + m)}".residents'))
            if len(codes) >= registered * 0.9 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        parents = {}
        for m in supervisor.layout.municipalities:
            rows = await conn.fetch(
                f'SELECT entry FROM "{schema_name("municipal-" + m)}".residents '
                "WHERE relationship IN ('世帯主', '妻', '夫') AND status = 1 LIMIT 200")
            parents[m] = [municipal_pb2.ResidentEntry.FromString(bytes(r["entry"])) for r in rows]
    finally:
        await conn.close()
    return codes, parents


def memory(supervisor: Supervisor) -> dict[str, int | None]:
    return {name: rss_kib(proc.pid) for name, proc in supervisor.processes.items()}


async def run_soak(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from juki.seeding.registers import seed_population

    data_dir = Path(tempfile.mkdtemp(prefix="juki-bench-soak-"))
    supervisor = Supervisor(data_dir, MeshLayout())
    try:
        console.log("starting a local mesh")
        await supervisor.prepare()
        await supervisor.start()
        await seed_population(supervisor, args.population, 20020805, echo=lambda line: None)
        residents, parents = await _seeded(supervisor)
        if not residents or not all(parents.values()):
            raise RuntimeError("the seeded population did not reach the national store")
        work = Workload(supervisor, residents, parents)
        try:
            console.log(f"probing the maximum for {args.probe_seconds:.0f} s")
            await closed_loop(work, 3, 4, 1)  # warm-up: connections, caches, JIT of the pools
            maximum = await closed_loop(work, args.probe_seconds, args.concurrency, max(2, args.concurrency // 8))
            rates = {kind: max(1.0, rate * args.fraction) for kind, rate in maximum.items()}
            work.samples.clear()
            seconds = args.minutes * 60
            rss_start = memory(supervisor)
            soak_start = time.monotonic()
            with Progress(TextColumn("soak"), BarColumn(), TimeElapsedColumn(), console=console,
                          transient=True) as bar:
                task = bar.add_task("soak", total=seconds)
                dropped = await open_loop(work, rates, seconds, lambda elapsed: bar.update(task, completed=elapsed))
            rss_end = memory(supervisor)
            samples = list(work.samples)
        finally:
            await work.close()
        errors = Counter(f"{s.kind}:{s.status}" for s in samples if s.status != "OK")
        ok = {kind: [s.millis for s in samples if s.kind == kind and s.status == "OK"]
              for kind in ("lookup", "notification")}
        growth = {name: (rss_end[name] or 0) - (rss_start[name] or 0) for name in rss_start}
        return {
            "bench": "soak",
            "minutes": args.minutes,
            "population": len(residents),
            "maximum_per_second": {k: round(v, 1) for k, v in maximum.items()},
            "target_per_second": {k: round(v, 1) for k, v in rates.items()},
            "held_per_second": {k: round(len(v) / seconds, 1) for k, v in ok.items()},
            "latency_ms": {k: {"p50": _percentile(v, 0.5), "p99": _percentile(v, 0.99), "count": len(v)}
                           for k, v in ok.items()},
            "per_minute": per_minute(samples, soak_start, seconds),
            "errors": dict(errors),
            "not_sent_all_slots_busy": dropped,
            "rss_kib_start": rss_start,
            "rss_kib_end": rss_end,
            "rss_kib_growth": growth,
            "restarts": dict(supervisor.restarts),
        }
    finally:
        await supervisor.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def cmd_bench_soak(args: argparse.Namespace) -> int:
    from juki.extras import need

    need("rich", "cli", "juki bench soak")
    need("faker", "seed", "juki bench soak (it seeds a population)")
    need("pgserver", "local", "juki bench soak (it runs a local mesh)")
    from rich.console import Console

    console = Console(stderr=True)
    if args.minutes <= 0 or not 0 < args.fraction <= 1:
        console.print("--minutes must be positive and --fraction in (0, 1]")
        return 2
    result = await run_soak(args, console)
    emit(result)
    return 0 if not result["errors"] and not result["restarts"] else 1
