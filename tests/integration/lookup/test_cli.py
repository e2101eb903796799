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
