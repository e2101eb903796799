"""``juki demo``: a fresh mesh in a temporary directory and the whole story, every step checked.

The story runs on a business day when 住基カード were still issued (cards ended 2015-12-22), so that
every part of the system has something to do:

1. a birth is notified at 中野区 and reaches the national store through 東京都;
2. a resident moves from 中野区 (東京都) to 横浜市 (神奈川県): 転出 at one, 転入 at the other;
3. 日本年金機構 looks the child up by 住民票コード for a pension 事務, and verifies a batch of pensioners;
4. a resident card is issued at 中野区 and used at 横浜市 for a wide-area residence-certificate copy;
5. the access log's chain and signed checkpoints verify;
6. each resident's disclosure shows every provision of their information: when, to whom, for which 事務.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from juki import domain
from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki._gen.juki.card.v1 import card_pb2, card_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.disclosure.v1 import disclosure_pb2, disclosure_pb2_grpc
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki._gen.juki.lookup.v1 import lookup_pb2, lookup_pb2_grpc
from juki._gen.juki.municipal.v1 import municipal_pb2, municipal_pb2_grpc
from juki.mesh.client import MeshClient
from juki.mesh.operator import sign_operator_proof
from juki.mesh.supervisor import MeshLayout, Supervisor

DEMO_DAY = dt.date(2015, 6, 1)
NAKANO, YOKOHAMA = "131148", "141003"
PENSION = "B1-PENSION-BENEFIT"
T = TypeVar("T")


class DemoFailure(Exception):
    """A step of the story did not check out."""


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="run the end-to-end story against a fresh local mesh; exit 0 if it holds")
    parser.add_argument("--population", type=int, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    parser.set_defaults(func=cmd_demo)


def _date(d: dt.date) -> common_pb2.Date:
    return common_pb2.Date(year=d.year, month=d.month, day=d.day, precision=common_pb2.DATE_PRECISION_FULL)


def _name(record: common_pb2.IdentityRecord | Any) -> str:
    return f"{record.name.family_name}　{record.name.given_name}".strip()


class Story:
    def __init__(self, client: MeshClient, operator: MeshClient) -> None:
        self.agency = client
        self.operator = operator
        self.step = 0
        self.cert = Path(operator.endpoints["clients"]["operator"]["cert"]).read_bytes()
        self.key = Path(operator.endpoints["clients"]["operator"]["key"]).read_bytes()

    def say(self, title: str) -> None:
        self.step += 1
        print(f"\n[{self.step}] {title}")

    @staticmethod
    def ok(text: str) -> None:
        print(f"    ✓ {text}")

    @staticmethod
    def check(condition: bool, text: str) -> None:
        if not condition:
            raise DemoFailure(text)
        print(f"    ✓ {text}")

    def sign(self, request: Any, method: str, field: str = "operator_proof") -> Any:
        sign_operator_proof(request, method, cert_pem=self.cert, key_pem=self.key, password="demo-password",
                            proof_field=field)
        return request

    def municipal(self, code: str) -> municipal_pb2_grpc.MunicipalServiceStub:
        return municipal_pb2_grpc.MunicipalServiceStub(self.operator.channel(f"municipal-{code}"))

    @property
    def national(self) -> intake_pb2_grpc.IntakeServiceStub:
        return intake_pb2_grpc.IntakeServiceStub(self.operator.channel("intake-national"))

    async def until(self, probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 30) -> T:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = await probe()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
                found = None
            if found is not None:
                return found
            await asyncio.sleep(0.1)
        raise DemoFailure(f"timed out waiting for {what}")

    async def national_record(self, code: str, predicate: Callable[[common_pb2.IdentityRecord], bool]) -> Any:
        async def probe() -> common_pb2.IdentityRecord | None:
            reply = await self.national.GetResident(intake_pb2.GetResidentRequest(resident_code=code))
            return reply.record if predicate(reply.record) else None

        return await self.until(probe, f"{code} at the national centre")

    async def record_change(self, code: str, request: municipal_pb2.RecordChangeRequest) -> Any:
        self.sign(request, "/juki.municipal.v1.MunicipalService/RecordChange")
        return await self.municipal(code).RecordChange(request)


async def run_story(data_dir: Path, population: int) -> None:
    supervisor = Supervisor(
        data_dir, MeshLayout(prefectures=("13", "14"), municipalities=(NAKANO, YOKOHAMA)),
        extra_env={"JUKI_CLOCK": DEMO_DAY.isoformat()}, echo=lambda line: print(f"    {line}"),
    )
    from juki.seeding.registers import seed_population

    print(f"Juki-net demo — business day {DEMO_DAY} (住基カード still issued), data in {data_dir}")
    print("\n[0] start the mesh: private CA, embedded PostgreSQL, one process per service")
    await supervisor.prepare()
    await supervisor.start(publish=False)
    try:
        summary = await seed_population(supervisor, population, 20020805, echo=lambda line: print(f"    {line}"))
        supervisor.write_endpoints()
        print(f"    ✓ {summary}")
        agency = MeshClient(data_dir, "agency")
        operator = MeshClient(data_dir, "operator")
        try:
            await _story(Story(agency, operator), supervisor)
        finally:
            await agency.close()
            await operator.close()
    finally:
        print("\nstopping the mesh")
        await supervisor.stop()


async def _seeded_adults(supervisor: Supervisor, municipality: str, count: int) -> list[tuple[str, str]]:
    """(resident code, household id) of adults in a municipality's registry, as its CS keeps them."""
    import asyncpg

    from juki.mesh.settings import schema_name

    conn = await asyncpg.connect(supervisor.admin_url)
    try:
        rows = await conn.fetch(
            f'SELECT resident_code, household_id FROM "{schema_name("municipal-" + municipality)}".residents '
            "WHERE relationship IN ('世帯主', '妻', '夫') AND status = 1 ORDER BY resident_code LIMIT $1",
            count,
        )
    finally:
        await conn.close()
    return [(r["resident_code"], r["household_id"]) for r in rows]


async def _story(story: Story, supervisor: Supervisor) -> None:
    rng = random.Random(7)
    adults = await _seeded_adults(supervisor, NAKANO, 60)
    if len(adults) < 3:
        raise DemoFailure("the seeded registry of 中野区 has too few adults")
    parent_code, household = adults[0]
    mover_code, _ = adults[1]
    holder_code = ""
    for code, _ in adults[2:]:
        entry = (await story.municipal(NAKANO).GetResidentEntry(
            municipal_pb2.GetResidentEntryRequest(resident_code=code, requesting_municipality_code=NAKANO)
        )).entry
        if entry.resident_kind == common_pb2.RESIDENT_KIND_JAPANESE:
            holder_code = code
            break
    if not holder_code:
        raise DemoFailure("no Japanese adult in the seeded registry of 中野区 to hold a card")

    # 1. birth ------------------------------------------------------------------------------------
    story.say("a birth is notified at 中野区 (市町村CS) and reaches the national centre through 東京都")
    child_code = domain.generate_resident_code(rng)
    born = DEMO_DAY - dt.timedelta(days=5)
    parent = await story.municipal(NAKANO).GetResidentEntry(
        municipal_pb2.GetResidentEntryRequest(resident_code=parent_code, requesting_municipality_code=NAKANO)
    )
    entry = municipal_pb2.ResidentEntry(
        resident_code=child_code,
        name=common_pb2.PersonName(family_name=parent.entry.name.family_name, given_name="未来",
                                   family_name_kana=parent.entry.name.family_name_kana, given_name_kana="ミライ"),
        birth_date=_date(born), sex=common_pb2.SEX_FEMALE,
        address=parent.entry.address, resident_kind=common_pb2.RESIDENT_KIND_JAPANESE,
        household_id=household, household_head=parent.entry.household_head, relationship="子",
        registered_domicile=parent.entry.registered_domicile,
        head_of_family_register=parent.entry.head_of_family_register,
    )
    reply = await story.record_change(NAKANO, municipal_pb2.RecordChangeRequest(
        change_kind=common_pb2.CHANGE_KIND_BIRTH, entry=entry, occurred_on=_date(born), notified_on=_date(DEMO_DAY),
    ))
    story.ok(f"中野区 recorded 出生 of {child_code} as notification #{reply.sequence} ({reply.notification_id})")
    record = await story.national_record(child_code, lambda r: r.resident_code == child_code)
    story.check(record.status == common_pb2.RESIDENT_STATUS_CURRENT and record.address.municipality_code == NAKANO,
                f"national centre holds {_name(record)} ({child_code}), born {born}, at {record.address.municipality}")

    # 2. move across prefectures -------------------------------------------------------------------
    story.say("a resident moves from 中野区 (東京都) to 横浜市 (神奈川県): 転出 and 転入 from two places")
    mover = (await story.municipal(NAKANO).GetResidentEntry(
        municipal_pb2.GetResidentEntryRequest(resident_code=mover_code, requesting_municipality_code=NAKANO)
    )).entry
    moved_on = DEMO_DAY - dt.timedelta(days=2)
    out = municipal_pb2.RecordChangeRequest(
        change_kind=common_pb2.CHANGE_KIND_MOVE_OUT, entry=mover, occurred_on=_date(moved_on),
        notified_on=_date(moved_on), next_municipality_code=YOKOHAMA,
    )
    await story.record_change(NAKANO, out)
    arriving = municipal_pb2.ResidentEntry()
    arriving.CopyFrom(mover)
    arriving.address.CopyFrom(common_pb2.Address(municipality_code=YOKOHAMA, street="中区山下町1番地"))
    arriving.household_id = ""
    arriving.relationship = "世帯主"
    arriving.household_head = f"{mover.name.family_name}　{mover.name.given_name}"
    await story.record_change(YOKOHAMA, municipal_pb2.RecordChangeRequest(
        change_kind=common_pb2.CHANGE_KIND_MOVE_IN, entry=arriving, occurred_on=_date(moved_on),
        notified_on=_date(DEMO_DAY), previous_municipality_code=NAKANO,
    ))
    record = await story.national_record(mover_code, lambda r: r.address.municipality_code == YOKOHAMA)
    story.check(record.status == common_pb2.RESIDENT_STATUS_CURRENT,
                f"national centre: {_name(record)} ({mover_code}) now lives in {record.address.prefecture}"
                f"{record.address.municipality}")

    # 3. the pension service -------------------------------------------------------------------------
    story.say("日本年金機構 looks the child up by 住民票コード for a pension 事務 (別表第一)")
    lookup = lookup_pb2_grpc.LookupServiceStub(story.agency.channel("lookup"))
    found = await lookup.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=child_code))
    story.check(found.record.resident_code == child_code and found.record.name.given_name == "未来",
                f"provided {len(found.provided_fields)} items of {child_code} to spiffe://juki.local/agency/jps")
    private = lookup_pb2_grpc.LookupServiceStub(MeshClient(story.agency.data_dir, "private").channel("lookup"))
    try:
        await private.LookupByCode(lookup_pb2.LookupByCodeRequest(purpose=PENSION, resident_code=child_code))
        raise DemoFailure("a private-sector caller was answered")
    except grpc.aio.AioRpcError as exc:
        story.check(exc.code() == grpc.StatusCode.PERMISSION_DENIED,
                    f"a private-sector company asking the same is refused: {exc.code().name}")

    story.say("日本年金機構 verifies a batch of pensioners (現況確認) over one stream")
    codes = [code for code, _ in adults[3:]] + [mover_code, "24727059608"]

    async def requests() -> Any:
        items = [lookup_pb2.VerifyItem(item_id=i, resident_code=c) for i, c in enumerate(codes)]
        yield lookup_pb2.VerifyBatchRequest(purpose=PENSION, items=items[: len(items) // 2])
        yield lookup_pb2.VerifyBatchRequest(items=items[len(items) // 2:])

    statuses: Counter[str] = Counter()
    async for response in lookup.VerifyBatch(requests()):
        for result in response.results:
            statuses[lookup_pb2.VerifyStatus.Name(result.status)] += 1
    story.check(sum(statuses.values()) == len(codes),
                f"{len(codes)} pensioners answered, every item logged: "
                + ", ".join(f"{k.removeprefix('VERIFY_STATUS_')} {v}" for k, v in sorted(statuses.items())))

    # 4. card and wide-area copy ---------------------------------------------------------------------
    story.say("a 住基カード is issued at 中野区 and used at 横浜市 for a 住民票の写し (広域交付)")
    card_stub = card_pb2_grpc.CardServiceStub(story.operator.channel("card"))
    issue = story.sign(card_pb2.IssueCardRequest(
        resident_code=holder_code, card_type=card_pb2.CARD_TYPE_B, pin="4821", photo=b"\x89PNG demo photo",
        municipality_code=NAKANO,
    ), "/juki.card.v1.CardService/IssueCard")
    card = (await card_stub.IssueCard(issue)).card
    story.check(card.state == card_pb2.CARD_STATE_ACTIVE,
                f"card {card.card_number} (type B) issued, valid until "
                f"{card.expires_on.year}-{card.expires_on.month:02d}-{card.expires_on.day:02d}")
    copy_request = story.sign(card_pb2.RequestWideAreaCopyRequest(
        card_proof=common_pb2.CardProof(card_number=card.card_number, pin="4821"),
        subject_resident_code=holder_code, issuing_municipality_code=YOKOHAMA,
    ), "/juki.card.v1.CardService/RequestWideAreaCopy")
    copy = await card_stub.RequestWideAreaCopy(copy_request)
    certificate = copy.certificate
    story.check(certificate.address.municipality_code == NAKANO and not certificate.resident_code,
                f"横浜市 issued copy {copy.document_number} of {certificate.name.family_name}　"
                f"{certificate.name.given_name}'s 住民票 (home 中野区 asked over the network; "
                "本籍, 筆頭者, 住民票コード left out)")

    # 5. the access log -------------------------------------------------------------------------------
    story.say("the access log (提供記録) verifies: hash chain and signed checkpoints")
    audit = accesslog_pb2_grpc.AccessLogServiceStub(story.operator.channel("accesslog"))
    verdict = await story.until(
        lambda: _verified(audit), "a signed checkpoint", timeout=30,
    )
    story.check(verdict.ok, f"{verdict.records_checked} records, {verdict.checkpoints_checked} checkpoints: intact")

    # 6. disclosure -------------------------------------------------------------------------------------
    story.say("disclosure (開示): the child's guardian asks at the counter who received the child's data")
    disclosure = disclosure_pb2_grpc.DisclosureServiceStub(story.operator.channel("disclosure"))
    request = story.sign(disclosure_pb2.GetDisclosureRequest(resident_code=child_code, page_size=50),
                         "/juki.disclosure.v1.DisclosureService/GetDisclosure", field="counter_operator")
    shown = await disclosure.GetDisclosure(request)
    pension_rows = [p for p in shown.provisions if p.purpose == PENSION]
    story.check(bool(pension_rows) and shown.identity.resident_code == child_code,
                f"{len(shown.provisions)} provision(s); e.g. {_provision_line(pension_rows[0])}")
    story.check(shown.integrity.chain_verified, "the disclosure states the log's chain and checkpoint were verified")

    story.say("disclosure with the card and PIN: the card holder sees the wide-area copy and the pension check")
    mine = await disclosure.GetDisclosure(disclosure_pb2.GetDisclosureRequest(
        resident_code=holder_code, card_proof=common_pb2.CardProof(card_number=card.card_number, pin="4821"),
    ))
    modes = {common_pb2.QueryMode.Name(p.query_mode) for p in mine.provisions}
    story.check({"QUERY_MODE_WIDE_AREA_COPY", "QUERY_MODE_BATCH_VERIFY"} <= modes,
                f"{len(mine.provisions)} provisions: " + "; ".join(_provision_line(p) for p in mine.provisions[:3]))


async def _verified(audit: accesslog_pb2_grpc.AccessLogServiceStub) -> Any:
    verdict = await audit.VerifyLog(accesslog_pb2.VerifyLogRequest())
    if not verdict.ok:
        raise DemoFailure(f"the access log does not verify: {verdict}")
    return verdict if verdict.checkpoints_checked > 0 else None


def _provision_line(p: Any) -> str:
    when = dt.datetime.fromtimestamp(p.provided_at.seconds, dt.UTC).astimezone(domain.JAPAN_TIME)
    mode = common_pb2.QueryMode.Name(p.query_mode).removeprefix("QUERY_MODE_")
    return f"{when:%Y-%m-%d %H:%M} {mode} to {p.recipient_name or p.recipient} for {p.purpose_name or p.purpose}"


async def cmd_demo(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="juki-demo-"))
    try:
        await run_story(tmp, args.population)
    except DemoFailure as exc:
        print(f"\n✗ the story did not hold: {exc}")
        return 1
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    print("\n✓ every step checked out")
    return 0
