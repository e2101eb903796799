"""``juki disclose CODE``: a resident's disclosure (本人確認情報の提供状況の開示) as text, JSON, HTML or PDF.

With ``--card N --pin P`` the resident proves identity with the 住基カード and PIN; without them the
demo counter operator of the local mesh signs an operator proof (photo ID checked at the counter).
The call is made as the mesh's ``operator`` client identity (a counter terminal).

The JSON form carries, for each provision, its access-log leaf and inclusion proof, and the signed
checkpoints and signing certificate they lead to: ``juki proof verify FILE`` checks it offline.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.disclosure.v1 import disclosure_pb2, disclosure_pb2_grpc
from juki.cli.main import add_data_dir
from juki.domain import JAPAN_TIME
from juki.extras import need
from juki.mesh.errors import SettingsError
from juki.mesh.settings import spiffe_id

TITLE = "本人確認情報の提供状況の開示"
METHOD = "/juki.disclosure.v1.DisclosureService/GetDisclosure"

QUERY_MODE_LABELS = {
    common_pb2.QUERY_MODE_BY_CODE: "住民票コードによる照会",
    common_pb2.QUERY_MODE_BY_FOUR_ITEMS: "基本4情報による検索",
    common_pb2.QUERY_MODE_BATCH_VERIFY: "一括照会",
    common_pb2.QUERY_MODE_CHANGE_FEED: "異動情報の提供",
    common_pb2.QUERY_MODE_WIDE_AREA_COPY: "住民票の写しの広域交付",
    common_pb2.QUERY_MODE_DISCLOSURE: "本人開示",
    common_pb2.QUERY_MODE_CARD_USE: "住基カードの利用",
}
FIELD_LABELS = {
    common_pb2.FIELD_RESIDENT_CODE: "住民票コード",
    common_pb2.FIELD_NAME: "氏名",
    common_pb2.FIELD_BIRTH_DATE: "生年月日",
    common_pb2.FIELD_SEX: "性別",
    common_pb2.FIELD_ADDRESS: "住所",
    common_pb2.FIELD_CHANGE_INFO: "異動情報",
}
TIER_LABELS = {common_pb2.TIER_MUNICIPALITY: "市町村", common_pb2.TIER_PREFECTURE: "都道府県",
               common_pb2.TIER_NATIONAL: "全国センター（J-LIS）"}
CHANGE_LABELS = {
    common_pb2.CHANGE_KIND_MOVE_IN: "転入", common_pb2.CHANGE_KIND_SPECIAL_MOVE_IN: "特例転入",
    common_pb2.CHANGE_KIND_BIRTH: "出生", common_pb2.CHANGE_KIND_EX_OFFICIO_ENTRY: "職権記載",
    common_pb2.CHANGE_KIND_MOVE_OUT: "転出", common_pb2.CHANGE_KIND_DEATH: "死亡",
    common_pb2.CHANGE_KIND_EX_OFFICIO_DELETION: "職権消除", common_pb2.CHANGE_KIND_ADDRESS_CHANGE: "転居",
    common_pb2.CHANGE_KIND_NAME_CHANGE: "氏名変更", common_pb2.CHANGE_KIND_COMMON_NAME_CHANGE: "通称の記載・削除",
    common_pb2.CHANGE_KIND_RESIDENT_CODE_CHANGE: "住民票コード変更",
    common_pb2.CHANGE_KIND_EX_OFFICIO_CORRECTION: "職権修正",
}
SEX_LABELS = {common_pb2.SEX_MALE: "男", common_pb2.SEX_FEMALE: "女"}
PROVIDER_NAMES = {
    spiffe_id("service", "lookup"): "地方公共団体情報システム機構（本人確認情報照会）",
    spiffe_id("service", "disclosure"): "地方公共団体情報システム機構（本人開示）",
    spiffe_id("service", "card"): "住基カード処理",
}


def register(sub: Any) -> None:
    parser = sub.add_parser("disclose", help=f"a resident's own record and every provision of it ({TITLE})")
    add_data_dir(parser)
    parser.add_argument("resident_code", help="住民票コード of the resident")
    parser.add_argument("--card", help="card number of the resident's 住基カード")
    parser.add_argument("--pin", help="the card's 4-digit PIN (暗証番号)")
    parser.add_argument("--password", default=None,
                        help="the counter operator's password (counter disclosure; default: the demo operator's)")
    parser.add_argument("--from", dest="from_date", type=dt.date.fromisoformat, help="first day (YYYY-MM-DD)")
    parser.add_argument("--to", dest="to_date", type=dt.date.fromisoformat, help="last day (YYYY-MM-DD)")
    parser.add_argument("--page-size", type=int, default=200, help="provisions per request (all pages are fetched)")
    parser.add_argument("--max-provisions", type=int, default=10_000, help="stop after this many provisions")
    parser.add_argument("--format", choices=("text", "json", "html", "pdf"), default="text")
    parser.add_argument("--out", type=Path, help="write the document here (required for pdf)")
    parser.set_defaults(func=cmd_disclose)


@dataclass
class Document:
    """Everything shown to the resident, gathered from all pages."""

    resident_code: str
    identity: common_pb2.IdentityRecord
    history: list[disclosure_pb2.HistoryEntry]
    provisions: list[disclosure_pb2.Provision]
    integrity: disclosure_pb2.IntegrityReport
    proof: str
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(JAPAN_TIME))
    truncated: bool = False
    # The access log's signed tree checkpoints (by tree size) the provisions' proofs lead to (each page
    # is proven into the checkpoint taken for it), the tree size of each provision's proof, and the
    # certificate of the signing key.
    checkpoints: dict[int, str] = field(default_factory=dict)
    proof_sizes: list[int] = field(default_factory=list)
    signing_certificate: str = ""
    # Certificates (by the mesh CA) of the witnesses whose cosignatures the checkpoints carry.
    witness_certificates: list[str] = field(default_factory=list)


def _date(value: dt.date | None) -> common_pb2.Date | None:
    return common_pb2.Date(year=value.year, month=value.month, day=value.day) if value else None


def _stamp(ts: Any) -> str:
    if not (ts.seconds or ts.nanos):
        return "—"
    return str(ts.ToDatetime(tzinfo=dt.UTC).astimezone(JAPAN_TIME).strftime("%Y年%m月%d日 %H:%M:%S"))


def _day(value: common_pb2.Date) -> str:
    if not value.year:
        return "不詳"
    text = f"{value.year}年"
    text += f"{value.month}月" if value.month else ""
    text += f"{value.day}日" if value.day else ""
    return text


def validate(args: argparse.Namespace) -> None:
    """Refuse a bad command line before any call: a disclosure is itself a provision (本人開示) and is logged."""
    if bool(args.card) != bool(args.pin):
        raise SettingsError("give both --card and --pin, or neither (counter disclosure with the operator's proof)")
    if args.format == "pdf" and args.out is None:
        raise SettingsError("--format pdf needs --out FILE")
    if args.page_size <= 0:
        raise SettingsError("--page-size must be positive")
    if args.max_provisions <= 0:
        raise SettingsError("--max-provisions must be positive")
    if args.from_date and args.to_date and args.from_date > args.to_date:
        raise SettingsError("--from must not be after --to")
    if args.out is not None and not args.out.expanduser().resolve().parent.is_dir():
        raise SettingsError(f"--out: no directory {args.out.expanduser().resolve().parent}")


async def fetch(args: argparse.Namespace) -> Document:
    from juki.mesh.client import MeshClient
    from juki.mesh.operator import sign_operator_proof

    validate(args)
    async with MeshClient(args.data_dir, identity="operator") as client:
        stub = disclosure_pb2_grpc.DisclosureServiceStub(client.channel("disclosure"))
        operator = client.endpoints["clients"]["operator"]
        provisions: list[disclosure_pb2.Provision] = []
        token = ""
        reply: disclosure_pb2.GetDisclosureResponse | None = None
        truncated = False
        checkpoints: dict[int, str] = {}
        proof_sizes: list[int] = []
        witness_certificates: dict[str, None] = {}
        while True:
            request = disclosure_pb2.GetDisclosureRequest(
                resident_code=args.resident_code, page_size=args.page_size, page_token=token,
                from_date=_date(args.from_date), to_date=_date(args.to_date),
            )
            if args.card:
                request.card_proof.card_number = args.card
                request.card_proof.pin = args.pin
            else:
                sign_operator_proof(request, METHOD, cert_pem=Path(operator["cert"]).read_bytes(),
                                    key_pem=Path(operator["key"]).read_bytes(),
                                    password=args.password if args.password is not None else operator.get("password", ""),
                                    proof_field="counter_operator")
            page = await stub.GetDisclosure(request, timeout=600)
            reply = reply or page
            provisions += list(page.provisions)
            note = page.integrity.tree_checkpoint
            size = int(note.split("\n")[1]) if note.count("\n") >= 2 and note.split("\n")[1].isdigit() else 0
            if size:
                checkpoints[size] = note
            witnessed = page.integrity.witnessed_checkpoint
            if witnessed and witnessed.count("\n") >= 2 and witnessed.split("\n")[1].isdigit():
                # The cosigned checkpoint (preferred for the provisions it holds) with its witnesses' lines.
                checkpoints[int(witnessed.split("\n")[1])] = witnessed
                witness_certificates.update(dict.fromkeys(page.integrity.witness_certificates))
            proof_sizes += [p.proof_tree_size or size for p in page.provisions]
            token = page.next_page_token
            if not token:
                break
            if len(provisions) >= args.max_provisions:
                truncated = True
                break
    assert reply is not None
    return Document(args.resident_code, reply.identity, list(reply.history), provisions, reply.integrity,
                    "住基カード及び暗証番号" if args.card else "窓口における本人確認（写真付き身分証明書）",
                    truncated=truncated, checkpoints=checkpoints, proof_sizes=proof_sizes,
                    signing_certificate=reply.integrity.signing_certificate,
                    witness_certificates=list(witness_certificates))


def witness_statement(doc: Document) -> str:
    """Which witnesses cosigned the checkpoint the older provisions are proven into (empty if none)."""
    note = doc.integrity.witnessed_checkpoint
    lines = note.split("\n")
    names = [line.split(" ")[1].rsplit("/", 1)[-1] for line in lines[lines.index("") + 1:] if line.count(" ") == 2
             and line.split(" ")[1].startswith("juki.local/witness/")] if "" in lines else []
    if not names or len(lines) < 2:
        return ""
    return (f"証人（{'、'.join(names)}）が連署したチェックポイント（木のサイズ{lines[1]}）に含まれる提供記録は、"
            "そのチェックポイントへの包含証明を付しています。")


def integrity_statement(doc: Document) -> str:
    report = doc.integrity
    if report.chain_verified:
        return (
            f"提供記録の完全性: 検証済み。記録番号{report.verified_through_sequence}までの全{report.records_checked}件の"
            f"記録のハッシュ連鎖（SHA-256）を再計算し、"
            f"電子署名付きチェックポイント{report.checkpoints_checked}件（Ed25519、鍵ID {report.signing_key_id[:16]}…）"
            f"の署名と連鎖値を確認しました。最新チェックポイント: 記録番号{report.checkpoint_sequence}"
            f"（{_stamp(report.checkpoint_signed_at)} 署名）。検証日時: {_stamp(report.verified_at)}"
            + (f"（全件の再計算: {_stamp(report.full_verified_at)}）" if report.HasField("full_verified_at") else "")
            + "。" + witness_statement(doc)
        )
    return f"提供記録の完全性: 検証に失敗しました（{report.problem}）。この開示内容は改ざんされている可能性があります。"


def provision_row(p: disclosure_pb2.Provision, resident_code: str) -> dict[str, Any]:
    """One provision as the resident reads it (the same words in every format)."""
    return {
        "記録番号": p.sequence,
        "提供年月日": _stamp(p.provided_at),
        "機能区分": QUERY_MODE_LABELS.get(p.query_mode, "—"),
        "利用事由": p.reason,
        "提供事務区分": f"{p.purpose_name}（{p.purpose}）",
        "提供元": PROVIDER_NAMES.get(p.provider, p.provider) + f"［{TIER_LABELS.get(p.provider_tier, '—')}］",
        "提供先": p.recipient_name or p.recipient,
        "提供した情報": "・".join(FIELD_LABELS.get(f, "?") for f in p.fields)
        + (f"（旧住民票コード {p.resident_code} による提供）"
           if p.resident_code and p.resident_code != resident_code else ""),
    }


PROOF_KEY = "透明性ログの証明"
LOG_KEY = "透明性ログ"


def _with_proof(row: dict[str, Any], p: disclosure_pb2.Provision, tree_size: int) -> dict[str, Any]:
    if p.leaf and tree_size:
        row[PROOF_KEY] = {
            "leaf_index": p.sequence - 1,
            "tree_size": tree_size,
            "leaf": base64.b64encode(p.leaf).decode(),
            "inclusion_proof": [base64.b64encode(h).decode() for h in p.inclusion_proof],
        }
    return row


def as_dict(doc: Document) -> dict[str, Any]:
    identity = doc.identity
    sizes = doc.proof_sizes or [0] * len(doc.provisions)
    return {
        "title": TITLE,
        "作成日時": doc.created_at.isoformat(),
        "本人確認の方法": doc.proof,
        "本人確認情報": {
            "住民票コード": identity.resident_code,
            "氏名": f"{identity.name.family_name} {identity.name.given_name}".strip(),
            "氏名（フリガナ）": f"{identity.name.family_name_kana} {identity.name.given_name_kana}".strip(),
            "生年月日": _day(identity.birth_date),
            "性別": SEX_LABELS.get(identity.sex, "—"),
            "住所": f"{identity.address.prefecture}{identity.address.municipality}{identity.address.street}",
            "異動事由": CHANGE_LABELS.get(identity.last_change_kind, "—"),
            "異動年月日": _day(identity.last_changed_on),
        },
        "異動履歴": [
            {"版": h.version, "異動事由": CHANGE_LABELS.get(h.change_kind, "—"), "異動年月日": _day(h.occurred_on),
             "届出年月日": _day(h.notified_on), "記録日時": _stamp(h.recorded_at)}
            for h in doc.history
        ],
        "提供状況": [
            _with_proof(provision_row(p, doc.resident_code), p, size) for p, size in zip(doc.provisions, sizes, strict=True)
        ],
        "一部省略": doc.truncated,
        "完全性": {
            "検証結果": "検証済み" if doc.integrity.chain_verified else "検証失敗",
            "説明": integrity_statement(doc),
            "検証した記録数": doc.integrity.records_checked,
            "最新チェックポイント": doc.integrity.checkpoint_sequence,
        },
        # What `juki proof verify` needs besides the CA certificate.
        LOG_KEY: {
            "checkpoints": [doc.checkpoints[size] for size in sorted(doc.checkpoints)],
            "signing_certificate": doc.signing_certificate,
            "witness_certificates": doc.witness_certificates,
        },
    }


def render_text(doc: Document) -> str:
    data = as_dict(doc)
    lines = [TITLE, "=" * 40, f"作成日時: {doc.created_at:%Y年%m月%d日 %H:%M}", f"本人確認の方法: {doc.proof}", "",
             "■ 本人確認情報"]
    lines += [f"  {key}: {value}" for key, value in data["本人確認情報"].items()]
    lines += ["", "■ 異動履歴"]
    lines += [f"  第{h['版']}版 {h['異動年月日']} {h['異動事由']}（届出 {h['届出年月日']}）" for h in data["異動履歴"]]
    lines += ["", f"■ 提供状況（新しい順、{len(doc.provisions)}件）"]
    for p in data["提供状況"]:
        lines.append(f"  [記録番号 {p['記録番号']}] 提供年月日: {p['提供年月日']}  機能区分: {p['機能区分']}")
        lines.append(f"      提供先: {p['提供先']}  提供元: {p['提供元']}")
        lines.append(f"      提供事務区分: {p['提供事務区分']}  利用事由: {p['利用事由']}")
        lines.append(f"      提供した情報: {p['提供した情報']}")
    if doc.truncated:
        lines.append("  （件数が多いため以降を省略しました）")
    lines += ["", "■ " + integrity_statement(doc), ""]
    return "\n".join(lines)


def render_html(doc: Document) -> str:
    data = as_dict(doc)
    e = html.escape

    def table(headers: list[str], rows: list[dict[str, Any]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(str(r[h]))}</td>" for h in headers) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    identity_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in data["本人確認情報"].items())
    status_class = "ok" if doc.integrity.chain_verified else "bad"
    return f"""<!DOCTYPE html>
<html lang="ja"><head><meta charset="utf-8"><title>{e(TITLE)}</title>
<style>
body {{ font-family: "Hiragino Mincho ProN", "Yu Mincho", serif; margin: 2em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #444; padding: 0.25em 0.5em; font-size: 0.9em; text-align: left; }}
.ok {{ color: #064; }} .bad {{ color: #a00; font-weight: bold; }}
@media print {{ body {{ margin: 0; }} }}
</style></head><body>
<h1>{e(TITLE)}</h1>
<p>作成日時: {e(f"{doc.created_at:%Y年%m月%d日 %H:%M}")}　本人確認の方法: {e(doc.proof)}</p>
<h2>本人確認情報</h2><table>{identity_rows}</table>
<h2>異動履歴</h2>{table(["版", "異動事由", "異動年月日", "届出年月日", "記録日時"], data["異動履歴"])}
<h2>提供状況（新しい順、{len(doc.provisions)}件）</h2>
{table(["記録番号", "提供年月日", "機能区分", "利用事由", "提供事務区分", "提供元", "提供先", "提供した情報"], data["提供状況"])}
<h2>提供記録の完全性</h2><p class="{status_class}">{e(integrity_statement(doc))}</p>
</body></html>
"""


def render_pdf(doc: Document, out: Path) -> None:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    from juki.cli.fonts import japanese_font

    # An embedded TrueType font (IPAex Gothic): the PDF prints the same on a machine without Japanese fonts.
    font = japanese_font()
    body = ParagraphStyle("body", fontName=font, fontSize=8.5, leading=11)
    small = ParagraphStyle("small", parent=body, fontSize=7.5, leading=9.5)
    heading = ParagraphStyle("heading", fontName=font, fontSize=12, leading=16, spaceBefore=6)
    title = ParagraphStyle("title", fontName=font, fontSize=16, leading=22)
    data = as_dict(doc)
    grid = TableStyle([
        ("GRID", (0, 0), (-1, -1), 0.4, colors.black),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8e8e8")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ])

    def cells(rows: list[list[str]], style: ParagraphStyle = small) -> list[list[Paragraph]]:
        return [[Paragraph(html.escape(str(c)), style) for c in row] for row in rows]

    story: list[Any] = [
        Paragraph(TITLE, title),
        Paragraph(html.escape(f"作成日時: {doc.created_at:%Y年%m月%d日 %H:%M}　本人確認の方法: {doc.proof}"), body),
        Spacer(1, 4 * mm), Paragraph("本人確認情報", heading),
    ]
    identity = Table(cells([[k, str(v)] for k, v in data["本人確認情報"].items()], body), colWidths=[40 * mm, 160 * mm])
    identity.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.4, colors.black)]))
    story += [identity, Paragraph("異動履歴", heading)]
    history_headers = ["版", "異動事由", "異動年月日", "届出年月日", "記録日時"]
    history = Table(cells([history_headers] + [[str(h[k]) for k in history_headers] for h in data["異動履歴"]]),
                    repeatRows=1)
    history.setStyle(grid)
    story += [history, Paragraph(f"提供状況（新しい順、{len(doc.provisions)}件）", heading)]
    headers = ["記録番号", "提供年月日", "機能区分", "利用事由", "提供事務区分", "提供元", "提供先", "提供した情報"]
    widths = [16, 30, 26, 34, 52, 40, 36, 30]
    provisions = Table(cells([headers] + [[str(p[k]) for k in headers] for p in data["提供状況"]]),
                       colWidths=[w * mm for w in widths], repeatRows=1)
    provisions.setStyle(grid)
    story += [provisions, Paragraph("提供記録の完全性", heading), Paragraph(html.escape(integrity_statement(doc)), body)]
    SimpleDocTemplate(str(out), pagesize=landscape(A4), title=TITLE, leftMargin=12 * mm, rightMargin=12 * mm,
                      topMargin=12 * mm, bottomMargin=12 * mm).build(story)


def write(doc: Document, fmt: str, out: Path | None) -> None:
    if fmt == "pdf":
        if out is None:
            raise SettingsError("--format pdf needs --out FILE")
        render_pdf(doc, out)
        return
    text = {"text": render_text, "html": render_html,
            "json": lambda d: json.dumps(as_dict(d), ensure_ascii=False, indent=2)}[fmt](doc)
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        out.write_text(text, encoding="utf-8")


async def cmd_disclose(args: argparse.Namespace) -> int:
    validate(args)
    if args.format == "pdf":
        need("reportlab", "cli", "juki disclose --format pdf")  # before the call, which records a provision
    doc = await fetch(args)
    write(doc, args.format, args.out)
    if args.out is not None:
        print(f"wrote {args.out} ({args.format}, {len(doc.provisions)} provisions)", file=sys.stderr)
    return 0 if doc.integrity.chain_verified else 1
