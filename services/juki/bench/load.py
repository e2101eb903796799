"""``juki bench load``: a municipality's whole register loaded up through the real path, and its memory.

A throwaway environment (:class:`LoadEnvironment`): the embedded PostgreSQL with 中野区's CS schema and
the prefecture-13 and national intake schemas, the mesh's CA, and the three real services as child
processes (``python -m juki serve ...``, as ``juki up`` starts them). 中野区's register is filled with
``--residents`` synthetic residents by COPY (as seeding does, but from a few serialised templates with
the codes written in, so 10 million take minutes, not hours). Then, as the demo operator, the bench asks
the CS for ResyncToPrefecture (again when a call outlives the CS's maximum connection age and is cut: the
next call continues the load) and times it: the CS reads its register through a server-side cursor and
streams it to the prefecture intake (IntakeService.BulkLoad), which applies each batch in one transaction
and streams it on to the national intake as it goes; the call returns once both tiers hold the load.

Memory: every 0.2 s during the load the bench samples VmRSS (and RssAnon, the private part) of the CS,
both intakes, every PostgreSQL backend and itself; at the end it reads each process's VmHWM (its
lifetime peak) from /proc/PID/status. A bounded load shows the same peaks at 100k, 1M and 10M; the
curve (RSS at each tenth of the load) shows whether anything grows while it runs.

:class:`LoadEnvironment` is also used by the chaos test of resumed loads (kill a process, restart it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.bench.harness import Harness, emit, json_flag
from juki.bench.intake import NAKANO, _free_port
from juki.domain.codes import resident_code_from_body

RESYNC_METHOD = "/juki.municipal.v1.MunicipalService/ResyncToPrefecture"
PLACEHOLDER = b"00000000000"  # the resident code in a template entry, replaced by each resident's
FIRST_BODY = 3_000_000_000  # resident codes from resident_code_from_body(FIRST_BODY) on, ascending
COPY_CHUNK = 50_000
SAMPLE_SECONDS = 0.2
SERVICES = ("municipal-131148", "intake-prefecture-13", "intake-national")
MAX_CALLS = 100  # ResyncToPrefecture calls of one load (each cut at the CS's maximum connection age)


def register_bench(bench_sub: Any) -> None:
    parser = bench_sub.add_parser(
        "load", help="a register loaded CS -> prefecture -> national (BulkLoad): time and peak RSS per process")
    json_flag(parser)
    parser.add_argument("--residents", type=int, default=1_000_000, help="residents in the register")
    parser.add_argument("--batch", type=int, default=0, help="records per BulkLoad batch (default: the CS's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.set_defaults(func=cmd_bench_load)


class LoadEnvironment(Harness):
    """The harness with 中野区's CS, the prefecture-13 intake and the national intake, on fixed ports (a
    killed service restarts with ``spawn(name)`` where its clients expect it)."""

    def __init__(self, *, keep: bool = False, batch: int = 0) -> None:
        super().__init__("load", keep=keep)
        self.batch = batch
        self.ports = {name: _free_port() for name in SERVICES}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    async def start(self) -> None:
        await self.prepare([("intake", "intake-national"), ("intake", "intake-prefecture-13"),
                            ("municipal", "municipal-131148")])
        self.spawn_service("intake-national", ["intake", "--tier", "national"], self._env("intake-national"))
        self.spawn_service("intake-prefecture-13", ["intake", "--tier", "prefecture", "--prefecture", "13"],
                           self._env("intake-prefecture-13"))
        self.spawn_service("municipal-131148", ["municipal", "--municipality", NAKANO], self._env("municipal-131148"))

    def _operator_passwords(self) -> Path:
        from juki.mesh.operator import hash_operator_password
        from juki.mesh.supervisor import DEMO_OPERATOR_PASSWORD

        path = self.root / "operator-passwords.json"
        if not path.is_file():
            path.write_text(json.dumps({"demo-operator": hash_operator_password(DEMO_OPERATOR_PASSWORD)}))
            path.chmod(0o600)
        return path

    def _env(self, name: str) -> dict[str, str]:
        from juki.mesh.settings import role_name

        identity = {"municipal-131148": ("municipality", NAKANO), "intake-prefecture-13": ("prefecture", "13"),
                    "intake-national": ("service", "intake-national")}[name]
        settings = {
            "JUKI_DATABASE_URL": self.pg.url(role_name(name)),
            "JUKI_NATIONAL_INTAKE_ADDRESS": self.address("intake-national"),
            "JUKI_PREFECTURE_INTAKE_ADDRESS": self.address("intake-prefecture-13"),
            "JUKI_OPERATOR_PASSWORDS_FILE": str(self._operator_passwords()),
        }
        if self.batch:
            settings["JUKI_MUNICIPAL_RESYNC_BATCH"] = str(self.batch)
        return self.server_env(name, identity, listen=self.address(name), **settings)

    async def fill(self, residents: int) -> float:
        """COPY ``residents`` synthetic residents into 中野区's register; the seconds it took."""
        import asyncpg

        from juki.mesh.settings import schema_name

        started = time.perf_counter()
        templates = _templates()
        conn = await asyncpg.connect(self.pg.admin_url)
        try:
            schema = schema_name("municipal-131148")
            for first in range(0, residents, COPY_CHUNK):
                rows = []
                for index in range(first, min(first + COPY_CHUNK, residents)):
                    code = resident_code_from_body(FIRST_BODY + index)
                    household = f"{NAKANO}-{code}"
                    rows.append((code, household, "世帯主", common_pb2.RESIDENT_STATUS_CURRENT,
                                 templates[index % len(templates)].replace(PLACEHOLDER, code.encode()), 1))
                await conn.copy_records_to_table(
                    "residents", schema_name=schema, records=rows,
                    columns=["resident_code", "household_id", "relationship", "status", "entry", "version"],
                )
            await conn.execute(f'ANALYZE "{schema}".residents')
        finally:
            await conn.close()
        return time.perf_counter() - started

    async def resync_to_end(self) -> tuple[municipal_pb2.ResyncToPrefectureResponse, int]:
        """ResyncToPrefecture until the load is complete: a call longer than the CS's maximum connection
        age is cut (UNAVAILABLE), and the next one continues the load. The last answer and the calls."""
        import grpc

        calls = 0
        while True:
            calls += 1
            try:
                return await self.resync(), calls
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or calls >= MAX_CALLS:
                    raise
                await asyncio.sleep(1.0)

    async def resync(self, timeout: float = 24 * 3600) -> municipal_pb2.ResyncToPrefectureResponse:
        """ResyncToPrefecture at the CS, as the demo operator (a fresh channel each time)."""
        from juki.mesh.operator import sign_operator_proof
        from juki.mesh.supervisor import DEMO_OPERATOR_PASSWORD
        from juki.mesh.tls import secure_channel

        tls = self.tls("operator", "demo-operator")
        request = municipal_pb2.ResyncToPrefectureRequest()
        sign_operator_proof(request, RESYNC_METHOD, cert_pem=tls.cert.read_bytes(), key_pem=tls.key.read_bytes(),
                            password=DEMO_OPERATOR_PASSWORD)
        async with secure_channel(self.address("municipal-131148"), tls) as channel:
            response: municipal_pb2.ResyncToPrefectureResponse = await municipal_pb2_grpc.MunicipalServiceStub(
                channel).ResyncToPrefecture(request, timeout=timeout)
        return response


def _templates() -> list[bytes]:
    """Serialised 住民票 entries of 中野区 with PLACEHOLDER for the code (and in the household id)."""
    from juki.municipal import convert

    names = [("佐藤", "太郎", "サトウ", "タロウ", common_pb2.SEX_MALE), ("鈴木", "花子", "スズキ", "ハナコ", common_pb2.SEX_FEMALE),
             ("高橋", "一郎", "タカハシ", "イチロウ", common_pb2.SEX_MALE), ("田中", "美咲", "タナカ", "ミサキ", common_pb2.SEX_FEMALE),
             ("渡辺", "健", "ワタナベ", "ケン", common_pb2.SEX_MALE), ("伊藤", "陽子", "イトウ", "ヨウコ", common_pb2.SEX_FEMALE),
             ("山本", "大輔", "ヤマモト", "ダイスケ", common_pb2.SEX_MALE), ("中村", "愛", "ナカムラ", "アイ", common_pb2.SEX_FEMALE)]
    out = []
    for number, (family, given, family_kana, given_kana, sex) in enumerate(names * 4):
        since = common_pb2.Date(year=2002, month=8, day=5, precision=common_pb2.DATE_PRECISION_FULL)
        entry = municipal_pb2.ResidentEntry(
            resident_code=PLACEHOLDER.decode(),
            name=common_pb2.PersonName(family_name=family, given_name=given, family_name_kana=family_kana,
                                       given_name_kana=given_kana),
            birth_date=common_pb2.Date(year=1940 + number * 2, month=1 + number % 12, day=1 + number % 28,
                                       precision=common_pb2.DATE_PRECISION_FULL),
            sex=sex,
            address=convert.full_address(NAKANO, f"中野{1 + number % 6}丁目{1 + number}番{1 + number % 9}号"),
            resident_kind=common_pb2.RESIDENT_KIND_JAPANESE,
            household_id=f"{NAKANO}-{PLACEHOLDER.decode()}",
            household_head=f"{family}\u3000{given}",
            relationship="世帯主",
            status=common_pb2.RESIDENT_STATUS_CURRENT,
            became_resident_on=since, address_since=since, address_notified_on=since,
            version=1,
        )
        blob = entry.SerializeToString()
        assert blob.count(PLACEHOLDER) == 2, "the placeholder must appear only as the code and household id"
        out.append(blob)
    return out


# -- memory ----------------------------------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon (KiB) of a process; empty when it is gone."""
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                found[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return found


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


class MemorySampler:
    """VmRSS / RssAnon of the services, this process and every PostgreSQL process, sampled while a load
    runs; peaks and a curve (the samples at each tenth of the elapsed time)."""

    def __init__(self, env: LoadEnvironment) -> None:
        self._services = {name: env.processes[name].pid for name in SERVICES}
        self._services["bench"] = os.getpid()
        self._postmaster = int((Path(env.pg.pgdata) / "postmaster.pid").read_text().split()[0])
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.peak_rss: dict[str, int] = {}
        self.peak_anon: dict[str, int] = {}
        self.backends: dict[int, dict[str, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0

    def _sample(self) -> None:
        now = time.perf_counter() - self._started
        point: dict[str, int] = {}
        for name, pid in self._services.items():
            status = _status(pid)
            if status:
                point[name] = status["VmRSS"]
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), status["VmRSS"])
                self.peak_anon[name] = max(self.peak_anon.get(name, 0), status.get("RssAnon", 0))
        anon_total = 0
        for pid in _children(self._postmaster):
            status = _status(pid)
            if status:
                seen = self.backends.setdefault(pid, {"rss": 0, "anon": 0, "hwm": 0})
                seen["rss"] = max(seen["rss"], status["VmRSS"])
                seen["anon"] = max(seen["anon"], status.get("RssAnon", 0))
                seen["hwm"] = max(seen["hwm"], status.get("VmHWM", 0))
                anon_total += status.get("RssAnon", 0)
        point["postgres_anon_total"] = anon_total
        self.peak_rss["postgres_anon_total"] = max(self.peak_rss.get("postgres_anon_total", 0), anon_total)
        self.samples.append((now, point))

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(SAMPLE_SECONDS)

    def start(self) -> None:
        self._started = time.perf_counter()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._sample()

    def report(self) -> dict[str, Any]:
        hwm = {name: _status(pid).get("VmHWM", 0) for name, pid in self._services.items()}
        processes = {
            name: {"vmhwm_kib": hwm[name], "rss_peak_sampled_kib": self.peak_rss.get(name, 0),
                   "rss_anon_peak_kib": self.peak_anon.get(name, 0)}
            for name in self._services
        }
        busy = [b for b in self.backends.values() if b["anon"]]
        processes["postgres_backends"] = {
            "processes": len(self.backends),
            "max_vmhwm_kib": max((b["hwm"] for b in busy), default=0),
            "max_rss_peak_sampled_kib": max((b["rss"] for b in busy), default=0),
            "max_rss_anon_peak_kib": max((b["anon"] for b in busy), default=0),
            "rss_anon_total_peak_kib": self.peak_rss.get("postgres_anon_total", 0),
        }
        curve: dict[str, list[int]] = {name: [] for name in (*self._services, "postgres_anon_total")}
        if self.samples:
            end = self.samples[-1][0]
            for tenth in range(11):
                moment = end * tenth / 10
                _, point = min(self.samples, key=lambda s: abs(s[0] - moment))
                for name in curve:
                    curve[name].append(point.get(name, 0))
        return {"processes": processes, "rss_curve_kib": curve}


async def bench_load(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    from juki.mesh.settings import MunicipalSettings

    env = LoadEnvironment(keep=args.keep, batch=args.batch)
    try:
        await env.start()
        fill_seconds = await env.fill(args.residents)
        sampler = MemorySampler(env)
        sampler.start()
        started = time.perf_counter()
        response, calls = await env.resync_to_end()
        seconds = time.perf_counter() - started
        await sampler.stop()
        admin = await asyncpg.connect(env.pg.admin_url)
        try:
            national = int(await admin.fetchval(
                "SELECT count(*) FROM intake_national.residents WHERE municipality_code = $1", NAKANO))
            prefecture = int(await admin.fetchval(
                "SELECT count(*) FROM intake_p13.residents WHERE municipality_code = $1", NAKANO))
            database_bytes = int(await admin.fetchval("SELECT pg_database_size(current_database())"))
            shared_buffers = str(await admin.fetchval("SHOW shared_buffers"))
        finally:
            await admin.close()
        if national != args.residents or prefecture != args.residents:
            raise RuntimeError(f"loaded {args.residents}, but the prefecture holds {prefecture} and the "
                               f"national store {national}")
        memory = sampler.report()
        return {
            "benchmark": "load",
            "residents": args.residents,
            "load_seconds": round(seconds, 2),
            "records_per_second": round(args.residents / seconds, 1),
            "unit": "records durable at the prefecture and the national intake, through ResyncToPrefecture",
            "records_sent": response.records_sent,
            "records_applied": response.records_applied,
            "resumptions": response.resumptions,
            "calls": calls,  # the last call's records_sent counts only what it sent (after its resume point)
            "batch": env.batch or MunicipalSettings().resync_batch,
            "fill_seconds": round(fill_seconds, 2),
            "database_bytes": database_bytes,
            # A backend's VmRSS counts the shared buffers it touched (bounded by this); RssAnon is its own.
            "postgres_shared_buffers": shared_buffers,
            **memory,
        }
    finally:
        env.close()


async def cmd_bench_load(args: argparse.Namespace) -> int:
    if args.residents < 1:
        raise SystemExit("--residents must be at least 1")
    emit(await bench_load(args))
    return 0
