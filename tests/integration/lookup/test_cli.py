"""``juki lookup`` and ``juki verify`` as an agency runs them: the real command, in a child process,
against the in-process lookup and access log found through an ``endpoints.json``."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
import tempfile
from pathlib import Path

import pytest
from juki.mesh import pki

from tests.integration.lookup.conftest import Mesh, add_resident, fresh_code

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]


def _endpoints(mesh: Mesh, folder: Path) -> Path:
    def client(kind: str, name: str) -> dict[str, str]:
        cert, key = mesh.ca.paths(kind, name)
        return {"spiffe_id": pki.spiffe_id(kind, name), "cert": str(cert), "key": str(key)}

    document = {
        "ca": str(mesh.ca.ca_cert_path),
        "services": {"lookup": {"address": mesh.lookup}, "accesslog": {"address": mesh.accesslog}},
        "clients": {"agency": client("agency", "jps"), "private": client("private", "acme-insurance")},
    }
    (folder / "endpoints.json").write_text(json.dumps(document))
    return folder


async def _juki(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_juki_lookup_prints_the_record(mesh: Mesh) -> None:
    code = await add_resident(mesh.database, family_name="鈴木")
    with tempfile.TemporaryDirectory() as folder:
        data_dir = _endpoints(mesh, Path(folder))
        status, out, err = await _juki("lookup", code, "--purpose", "B1-PENSION-BENEFIT", "--data-dir", str(data_dir))
        assert status == 0, err
        assert json.loads(out)["record"]["name"]["familyName"] == "鈴木"
        status, out, err = await _juki("lookup", code, "--purpose", "B1-PENSION-BENEFIT", "--identity", "private",
                                       "--data-dir", str(data_dir))
        assert status == 1 and "NOT_A_PUBLIC_BODY" in err


async def test_juki_verify_writes_one_result_per_row(mesh: Mesh) -> None:
    current = await add_resident(mesh.database)
    deceased = await add_resident(mesh.database, status=2, last_change_kind=6)
    missing = fresh_code()
    with tempfile.TemporaryDirectory() as folder:
        data_dir = _endpoints(mesh, Path(folder))
        source = Path(folder) / "pensioners.csv"
        source.write_text(
            "resident_code,family_name,given_name,birth_date\n"
            f"{current},山田,太郎,1950-04-01\n{deceased},,,\n{missing},,,\n{current},山田,花子,\n",
            encoding="utf-8",
        )
        results = Path(folder) / "results.csv"
        status, _, err = await _juki("verify", str(source), "--purpose", "B1-PENSION-BENEFIT", "--out", str(results),
                                     "--batch", "2", "--data-dir", str(data_dir))
        assert status == 0, err
        with results.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [(r["row"], r["resident_code"], r["status"]) for r in rows] == [
            ("1", current, "CURRENT"), ("2", deceased, "DECEASED"), ("3", missing, "NOT_FOUND"),
            ("4", current, "MISMATCH"),
        ]
        assert rows[3]["mismatched_fields"] == "NAME"
        assert json.loads(err.strip().splitlines()[-1])["rows"] == 4
        assert [r["line"] for r in rows] == ["2", "3", "4", "5"]


async def test_juki_verify_reports_bad_rows_by_line_and_answers_every_other_row(mesh: Mesh) -> None:
    current = await add_resident(mesh.database)
    deceased = await add_resident(mesh.database, status=2, last_change_kind=6)
    missing = fresh_code()
    wrong_digit = current[:10] + str((int(current[10]) + 1) % 10)
    with tempfile.TemporaryDirectory() as folder:
        data_dir = _endpoints(mesh, Path(folder))
        source = Path(folder) / "pensioners.csv"
        # Line 1 is the header; line 4 is blank; line 6's quoted name spans two lines, so the rows after
        # it sit one line further down than their row count suggests.
        source.write_text(
            "resident_code,family_name,given_name,birth_date\n"  # 1
            f"{current},山田,太郎,1950-04-01\n"  # 2
            f"{wrong_digit},,,\n"  # 3: check digit
            "\n"  # 4
            "1234567890,,,\n"  # 5: ten digits
            f"{deceased},\"山\n田\",,\n"  # 6-7
            "12345-67890,,,\n"  # 8: characters
            f"{current},山田,太郎,1950/04/01\n"  # 9: birth date, refused before it is sent
            f"{missing},,,\n",  # 10
            encoding="utf-8",
        )
        results = Path(folder) / "results.csv"
        status, _, err = await _juki("verify", str(source), "--purpose", "B1-PENSION-BENEFIT", "--out", str(results),
                                     "--batch", "2", "--data-dir", str(data_dir))
        assert status == 3, err
        with results.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [(r["line"], r["resident_code"], r["status"]) for r in rows] == [
            ("2", current, "CURRENT"), ("6", deceased, "DECEASED"), ("10", missing, "NOT_FOUND"),
        ]
        reported = [line for line in err.splitlines() if line.startswith("line ")]
        assert sorted(reported, key=lambda line: int(line.split()[1].rstrip(":"))) == [
            f"line 3: resident_code '{wrong_digit}': the check digit does not match (CHECK_DIGIT_MISMATCH)",
            "line 5: resident_code '1234567890': a resident code has 11 digits (INVALID_FIELD)",
            "line 8: resident_code '12345-67890': a resident code holds the ASCII digits 0-9 only (INVALID_FIELD)",
            "line 9: birth_date must be YYYY-MM-DD, got '1950/04/01'",
        ]
        summary = json.loads(err.strip().splitlines()[-1])
        assert (summary["rows"], summary["bad_rows"], summary["CURRENT"]) == (7, 4, 1)


async def test_juki_verify_help_documents_the_exit_codes() -> None:
    status, out, _ = await _juki("verify", "--help")
    assert status == 0
    assert "exit codes:" in out and "some rows were bad" in out


async def test_juki_lookup_as_any_identity_the_ca_issued(mesh: Mesh) -> None:
    """`juki pki issue agency mofa` makes an identity the CLI can use, not only the demo clients."""
    code = await add_resident(mesh.database, family_name="高橋")
    mesh.ca.issue("agency", "mofa")
    with tempfile.TemporaryDirectory() as folder:
        data_dir = _endpoints(mesh, Path(folder))
        for identity in ("agency/mofa", "spiffe://juki.local/agency/mofa"):
            status, out, err = await _juki("lookup", code, "--purpose", "B1-PASSPORT-ISSUANCE", "--identity", identity,
                                           "--data-dir", str(data_dir))
            assert status == 0, err
            assert json.loads(out)["record"]["name"]["familyName"] == "高橋"
        recipients = {entry.record.recipient for entry in await mesh.provisions(code)}
        assert recipients == {"spiffe://juki.local/agency/mofa"}
        status, _, err = await _juki("lookup", code, "--purpose", "B1-PASSPORT-ISSUANCE", "--identity", "agency/never-issued",
                                     "--data-dir", str(data_dir))
        assert status == 2 and "no agency/never-issued" in err
