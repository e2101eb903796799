"""Counter verbs for resident cards and wide-area copies against a running mesh.

``juki card issue|verify-pin|change-pin|suspend|release|revoke|unlock|status`` and
``juki copy CODE --card N --pin P [--format text|pdf]``. The caller is the mesh's demo counter operator
(``endpoints.json``); every state-changing request carries an operator proof signed with its key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from juki._gen.juki.card.v1 import card_pb2, card_pb2_grpc
from juki._gen.juki.common.v1 import common_pb2
from juki.cli.main import add_data_dir
from juki.extras import need
from juki.mesh.client import MeshClient
from juki.mesh.operator import sign_with_files

METHOD = "/juki.card.v1.CardService/"
STATES = {
    card_pb2.CARD_STATE_ACTIVE: "有効 (active)",
    card_pb2.CARD_STATE_LOCKED: "ロック (locked: 3 wrong PINs; unlock in person)",
    card_pb2.CARD_STATE_SUSPENDED: "一時停止 (suspended; release in person with photo ID)",
    card_pb2.CARD_STATE_REVOKED: "廃止 (revoked)",
    card_pb2.CARD_STATE_EXPIRED: "有効期限切れ (expired)",
}


def register(sub: Any) -> None:
    card = sub.add_parser("card", help="住基カード at the counter: issue, PIN, suspend, release, revoke, unlock, status")
    verbs = card.add_subparsers(dest="card_command", required=True, metavar="VERB")

    issue = verbs.add_parser("issue", help="issue a card (until 2015-12-22 on the business clock)")
    _common(issue)
    issue.add_argument("resident_code")
    issue.add_argument("--municipality", required=True, help="the applicant's home municipality (6 digits)")
    issue.add_argument("--type", choices=("A", "B"), default="A", help="A: no photo; B: with photo")
    issue.add_argument("--pin", required=True, help="4-digit PIN chosen by the applicant")
    issue.add_argument("--photo", type=Path, help="JPEG photo (type B)")
    issue.add_argument("--period-of-stay-end", help="YYYY-MM-DD; foreign residents")
    issue.set_defaults(func=cmd_issue)

    verify = verbs.add_parser("verify-pin", help="check a PIN (3 wrong ones lock the card)")
    _common(verify)
    verify.add_argument("card_number")
    verify.add_argument("--pin", required=True)
    verify.set_defaults(func=cmd_verify_pin)

    change = verbs.add_parser("change-pin", help="change the PIN given the current one")
    _common(change)
    change.add_argument("card_number")
    change.add_argument("--pin", required=True, help="current PIN")
    change.add_argument("--new-pin", required=True)
    change.set_defaults(func=cmd_change_pin)

    suspend = verbs.add_parser("suspend", help="一時停止 on loss (by phone or at the counter)")
    _common(suspend)
    suspend.add_argument("card_number")
    suspend.add_argument("--channel", choices=("phone", "counter"), default="phone")
    suspend.add_argument("--reason", default="紛失")
    suspend.set_defaults(func=cmd_suspend)

    release = verbs.add_parser("release", help="release a suspension in person with photo ID")
    _common(release)
    release.add_argument("card_number")
    release.add_argument("--identity-document", required=True,
                         help="photo ID checked: passport, driving_licence, card_type_b, residence_card, ...")
    release.set_defaults(func=cmd_release)

    revoke = verbs.add_parser("revoke", help="revoke (廃止) a card for good")
    _common(revoke)
    revoke.add_argument("card_number")
    revoke.add_argument("--reason", required=True, help="e.g. 返納, 死亡, 住民票コード変更")
    revoke.set_defaults(func=cmd_revoke)

    unlock = verbs.add_parser("unlock", help="unlock a locked card in person (optionally set a new PIN)")
    _common(unlock)
    unlock.add_argument("card_number")
    unlock.add_argument("--new-pin", default="")
    unlock.set_defaults(func=cmd_unlock)

    status = verbs.add_parser("status", help="show a card's state on the business clock")
    _common(status)
    status.add_argument("card_number")
    status.set_defaults(func=cmd_status)

    copy = sub.add_parser("copy", help="住民票の写しの広域交付: a copy of a resident certificate at any municipality")
    _common(copy)
    copy.add_argument("resident_code", help="the person the copy is of (the applicant or a household member)")
    copy.add_argument("--card", required=True, help="the applicant's card number")
    copy.add_argument("--pin", required=True, help="the applicant's PIN")
    copy.add_argument("--at", default=None, help="issuing municipality (default: the mesh's first)")
    copy.add_argument("--with-household", action="store_true", help="include 世帯主 and 続柄")
    copy.add_argument("--with-resident-code", action="store_true", help="include the 住民票コード")
    copy.add_argument("--with-individual-number", action="store_true", help="include the 個人番号")
    copy.add_argument("--format", choices=("text", "pdf"), default="text")
    copy.add_argument("--out", type=Path, help="where to write the PDF (default: copy-<document number>.pdf)")
    copy.set_defaults(func=cmd_copy)


def _common(parser: argparse.ArgumentParser) -> None:
    add_data_dir(parser)
    parser.add_argument("--identity", default="operator", help="a demo client (operator, the default) or KIND/NAME of any certificate the CA issued")
    parser.add_argument("--password", default=None, help="operator password (default: the demo operator's)")


class Counter:
    """The counter terminal: a card-service stub and the operator's signing key."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.client = MeshClient(args.data_dir, identity=args.identity)
        self.password = args.password if args.password is not None else self.client.password
        self.stub = card_pb2_grpc.CardServiceStub(self.client.channel("card"))

    def sign(self, request: Any, rpc: str) -> Any:
        if self.client.identity.split("/")[-2] == "operator":
            sign_with_files(request, METHOD + rpc, self.client.tls.cert, self.client.tls.key, self.password)
        return request

    async def close(self) -> None:
        await self.client.close()


def _date(text: str | None) -> common_pb2.Date | None:
    if not text:
        return None
    day = dt.date.fromisoformat(text)
    return common_pb2.Date(year=day.year, month=day.month, day=day.day, precision=common_pb2.DATE_PRECISION_FULL)


def _show_date(value: common_pb2.Date) -> str:
    if not value.year:
        return ""
    return f"{value.year:04d}-{value.month:02d}-{value.day:02d}"


def print_card(card: card_pb2.Card) -> None:
    print(f"card      {card.card_number}  (type {card_pb2.CardType.Name(card.card_type)[-1]})")
    print(f"holder    {card.resident_code}  issued by {card.issuing_municipality_code}")
    print(f"state     {STATES.get(card.state, card_pb2.CardState.Name(card.state))}")
    print(f"valid     {_show_date(card.issued_on)} .. {_show_date(card.expires_on)}")
    print(f"wrong PIN {card.failed_pin_attempts}/3")


async def _run(args: argparse.Namespace, action: Any) -> int:
    counter = Counter(args)
    try:
        await action(counter)
    finally:
        await counter.close()
    return 0


async def cmd_issue(args: argparse.Namespace) -> int:
    async def action(counter: Counter) -> None:
        request = card_pb2.IssueCardRequest(
            resident_code=args.resident_code, municipality_code=args.municipality, pin=args.pin,
            card_type=card_pb2.CARD_TYPE_B if args.type == "B" else card_pb2.CARD_TYPE_A,
            photo=args.photo.read_bytes() if args.photo else b"",
        )
        stay = _date(args.period_of_stay_end)
        if stay is not None:
            request.period_of_stay_end.CopyFrom(stay)
        print_card((await counter.stub.IssueCard(counter.sign(request, "IssueCard"))).card)

    return await _run(args, action)


async def cmd_verify_pin(args: argparse.Namespace) -> int:
    result: list[bool] = []

    async def action(counter: Counter) -> None:
        response = await counter.stub.VerifyPin(card_pb2.VerifyPinRequest(card_number=args.card_number, pin=args.pin))
        print("PIN ok" if response.ok else f"wrong PIN; {response.remaining_attempts} attempt(s) left")
        print(f"state {STATES.get(response.state, '')}")
        result.append(response.ok)

    await _run(args, action)
    return 0 if result and result[0] else 1


async def cmd_change_pin(args: argparse.Namespace) -> int:
    async def action(counter: Counter) -> None:
        response = await counter.stub.ChangePin(card_pb2.ChangePinRequest(
            card_number=args.card_number, current_pin=args.pin, new_pin=args.new_pin))
        print_card(response.card)

    return await _run(args, action)


async def cmd_suspend(args: argparse.Namespace) -> int:
    async def action(counter: Counter) -> None:
        channel = card_pb2.SUSPENSION_CHANNEL_PHONE if args.channel == "phone" else card_pb2.SUSPENSION_CHANNEL_COUNTER
        request = card_pb2.SuspendCardRequest(card_number=args.card_number, channel=channel, reason=args.reason)
        print_card((await counter.stub.SuspendCard(counter.sign(request, "SuspendCard"))).card)

    return await _run(args, action)


async def cmd_release(args: argparse.Namespace) -> int:
    async def action(counter: Counter) -> None:
        request = card_pb2.ReleaseSuspensionRequest(card_number=args.card_number,
                                                    identity_document=args.identity_document)
        print_card((await counter.stub.ReleaseSuspension(counter.sign(request, "ReleaseSuspension"))).card)

    return await _run(args, action)


async def cmd_revoke(args: argparse.Namespace) -> int:
    async def action(counter: Counter) -> None:
        request = card_pb2.RevokeCardRequest(card_number=args.card_number, reason=args.reason)
        print_card((await counter.stub.RevokeCard(counter.sign(request, "RevokeCard"))).card)

    return await _run(args, action)


async def cmd_unlock(args: argparse.Namespace) -> int:
    async def action(counter: Counter) -> None:
        request = card_pb2.UnlockCardRequest(card_number=args.card_number, new_pin=args.new_pin)
        print_card((await counter.stub.UnlockCard(counter.sign(request, "UnlockCard"))).card)

    return await _run(args, action)


async def cmd_status(args: argparse.Namespace) -> int:
    async def action(counter: Counter) -> None:
        response = await counter.stub.GetCardStatus(card_pb2.GetCardStatusRequest(card_number=args.card_number))
        print_card(response.card)

    return await _run(args, action)


def certificate_lines(response: card_pb2.RequestWideAreaCopyResponse) -> list[tuple[str, str]]:
    """The copy as (label, value) rows, in the order of a 住民票の写し."""
    c = response.certificate
    sex = {common_pb2.SEX_MALE: "男", common_pb2.SEX_FEMALE: "女"}.get(c.sex, "")
    name = "　".join(p for p in (c.name.family_name, c.name.given_name) if p)
    kana = "　".join(p for p in (c.name.family_name_kana, c.name.given_name_kana) if p)
    rows = [("氏名", name + (f"（{kana}）" if kana else ""))]
    if c.name.alphabetic_name:
        rows.append(("アルファベット氏名", c.name.alphabetic_name))
    if c.name.common_name:
        rows.append(("通称", c.name.common_name))
    rows += [
        ("生年月日", _show_date(c.birth_date)), ("性別", sex),
        ("住所", f"{c.address.prefecture}{c.address.municipality}{c.address.street}"),
        ("住民となった年月日", _show_date(c.became_resident_on)),
        ("住所を定めた年月日", _show_date(c.address_since)), ("届出年月日", _show_date(c.address_notified_on)),
    ]
    if c.previous_address.municipality_code:
        previous = c.previous_address
        rows.append(("前住所", f"{previous.prefecture}{previous.municipality}{previous.street}"))
    if c.household_head:
        rows += [("世帯主", c.household_head), ("続柄", c.relationship)]
    if c.resident_code:
        rows.append(("住民票コード", c.resident_code))
    if c.individual_number:
        rows.append(("個人番号", c.individual_number))
    if c.period_of_stay_end.year:
        rows.append(("在留期間の満了日", _show_date(c.period_of_stay_end)))
    issued = response.issued_at.ToDatetime(dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=9)))
    rows += [("交付番号", response.document_number),
             ("交付", f"{response.issued_by}  {issued:%Y-%m-%d %H:%M} JST (広域交付)")]
    return rows


def write_pdf(path: Path, response: card_pb2.RequestWideAreaCopyResponse) -> None:
    """Print the copy as an A4 PDF with an embedded Japanese font (IPAex Gothic, shipped with the package)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    from juki.cli.fonts import japanese_font

    font = japanese_font()
    pdf = canvas.Canvas(str(path), pagesize=A4)
    width, height = A4
    pdf.setTitle("住民票の写し")
    pdf.setFont(font, 20)
    pdf.drawCentredString(width / 2, height - 72, "住民票の写し（広域交付）")
    pdf.setFont(font, 11)
    y = height - 120
    for label, value in certificate_lines(response):
        pdf.drawString(60, y, label)
        pdf.drawString(200, y, value)
        pdf.line(56, y - 6, width - 56, y - 6)
        y -= 24
    pdf.setFont(font, 9)
    pdf.drawString(60, y - 20, "この写しは、住民基本台帳ネットワークシステムにより住所地市町村から取得した内容に相違ありません。")
    pdf.drawString(60, y - 34, "本籍・筆頭者は記載しない。世帯主・続柄、個人番号、住民票コードは請求があった場合のみ記載する。")
    pdf.showPage()
    pdf.save()


async def cmd_copy(args: argparse.Namespace) -> int:
    if args.format == "pdf":
        need("reportlab", "cli", "juki copy --format pdf")  # before the copy is issued
    async def action(counter: Counter) -> None:
        issuing = args.at or counter.client.endpoints["layout"]["municipalities"][0]
        request = card_pb2.RequestWideAreaCopyRequest(
            card_proof=common_pb2.CardProof(card_number=args.card, pin=args.pin),
            subject_resident_code=args.resident_code, issuing_municipality_code=issuing,
            include_household_head_and_relationship=args.with_household,
            include_resident_code=args.with_resident_code, include_individual_number=args.with_individual_number,
        )
        response = await counter.stub.RequestWideAreaCopy(counter.sign(request, "RequestWideAreaCopy"))
        if args.format == "pdf":
            out = args.out or Path(f"copy-{response.document_number}.pdf")
            write_pdf(out, response)
            print(f"wrote {out}")
        else:
            print("住民票の写し（広域交付）")
            for label, value in certificate_lines(response):
                print(f"  {label:<12}{value}")
        sys.stdout.flush()

    return await _run(args, action)
