"""The `juki card` / `juki copy` command line: parsing, the printed copy and its PDF."""

from __future__ import annotations

from pathlib import Path

from juki._gen.juki.card.v1 import card_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki.cli.card import certificate_lines, write_pdf
from juki.cli.main import build_parser


def _copy(with_code: bool) -> card_pb2.RequestWideAreaCopyResponse:
    response = card_pb2.RequestWideAreaCopyResponse(
        certificate=card_pb2.ResidentCertificate(
            name=common_pb2.PersonName(family_name="中野", given_name="花子", family_name_kana="ナカノ",
                                       given_name_kana="ハナコ"),
            birth_date=common_pb2.Date(year=2003, month=1, day=6), sex=common_pb2.SEX_FEMALE,
            address=common_pb2.Address(municipality_code="131148", prefecture="東京都", municipality="中野区",
                                       street="中野四丁目8番1号"),
            resident_code="24727059608" if with_code else "",
        ),
        issued_by="141003", document_number="141003-20240401-ABCD",
    )
    response.issued_at.GetCurrentTime()
    return response


def test_the_copy_shows_the_resident_code_only_when_asked_for() -> None:
    without = dict(certificate_lines(_copy(False)))
    assert without["氏名"] == "中野　花子（ナカノ　ハナコ）" and without["住所"] == "東京都中野区中野四丁目8番1号"
    assert "住民票コード" not in without and "世帯主" not in without and "本籍" not in without
    assert dict(certificate_lines(_copy(True)))["住民票コード"] == "24727059608"


def test_the_copy_prints_as_pdf(tmp_path: Path) -> None:
    out = tmp_path / "copy.pdf"
    write_pdf(out, _copy(False))
    data = out.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert b"/FontFile2" in data and b"IPAexGothic" in data and b"Heisei" not in data  # the font is embedded


def test_card_and_copy_verbs_parse() -> None:
    parser = build_parser()
    issue = parser.parse_args(["card", "issue", "24727059608", "--municipality", "131148", "--pin", "1234",
                               "--type", "B", "--photo", "face.jpg"])
    assert issue.func.__name__ == "cmd_issue" and issue.type == "B"
    copy = parser.parse_args(["copy", "24727059608", "--card", "1234567890123456", "--pin", "1234",
                              "--format", "pdf"])
    assert copy.func.__name__ == "cmd_copy" and copy.format == "pdf"
    for verb in ("verify-pin", "suspend", "release", "revoke", "unlock", "status", "change-pin"):
        extra = {"verify-pin": ["--pin", "1"], "release": ["--identity-document", "passport"],
                 "revoke": ["--reason", "返納"], "change-pin": ["--pin", "1", "--new-pin", "2"]}.get(verb, [])
        assert parser.parse_args(["card", verb, "1234567890123456", *extra]).func.__name__.startswith("cmd_")
