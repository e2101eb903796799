"""``juki notify`` and ``juki intake status|disconnect|connect`` against in-process intake nodes."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from juki.cli.main import build_parser
from juki.mesh.supervisor import ENDPOINTS_FILE

from tests.conftest import tls_for
from tests.integration.intake.helpers import Mesh, intake_mesh, national_record

pytestmark = pytest.mark.timeout(120)

MUNICIPALITY = "131130"  # 渋谷区: no other intake test notifies for it


@pytest.fixture
async def mesh(ca: Any, settings_factory: Any) -> Any:
    async with intake_mesh(ca, settings_factory) as running_mesh:
        yield running_mesh


def endpoints(mesh: Mesh, ca: Any) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="juki-cli-test-"))

    def client(kind: str, name: str) -> dict[str, str]:
        files = tls_for(ca, kind, name)
        return {"spiffe_id": f"spiffe://juki.local/{kind}/{name}", "cert": str(files.cert), "key": str(files.key)}

    document = {
        "ca": str(ca.ca_cert_path),
        "services": {
            "intake-national": {"address": mesh.national},
            **{f"intake-prefecture-{p}": {"address": a} for p, a in mesh.prefectures.items()},
        },
        "clients": {"operator": client("operator", "demo-operator"),
                    f"municipality-{MUNICIPALITY}": client("municipality", MUNICIPALITY)},
    }
    (folder / ENDPOINTS_FILE).write_text(json.dumps(document))
    return folder


async def run(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return int(await args.func(args))


async def test_notify_status_and_connection_verbs(mesh: Mesh, ca: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = endpoints(mesh, ca)
    try:
        await _scenario(mesh, str(path), capsys)
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _scenario(mesh: Mesh, folder: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = "24727059608"
    assert await run("notify", "birth", "--data-dir", folder, "--municipality", MUNICIPALITY, "--resident-code", code,
                     "--occurred-on", "2022-04-01", "--street", "宇田川町1番1号") == 0
    assert "ACCEPTED" in capsys.readouterr().out
    record = await national_record(mesh, code)
    assert record.address.municipality == "渋谷区"
    # The next sequence is found from the prefecture; a bad check digit is reported per field.
    assert await run("notify", "birth", "--data-dir", folder, "--municipality", MUNICIPALITY,
                     "--resident-code", "24727059607", "--occurred-on", "2022-04-02") == 1
    assert "resident_code" in capsys.readouterr().out

    reason = "line cut by the prefecture for a security review of the municipal CS"
    assert await run("intake", "disconnect", MUNICIPALITY, "--data-dir", folder, "--reason", reason) == 0
    capsys.readouterr()
    assert await run("intake", "status", MUNICIPALITY, "--data-dir", folder) == 0
    table = capsys.readouterr().out
    assert MUNICIPALITY in table and "NO" in table
    # Not a terminal: whole rows, however wide, never folded to 80 columns.
    (line,) = [line for line in table.splitlines() if "prefecture-13" in line]
    assert reason in line and len(line) > 80, table
    assert await run("intake", "status", MUNICIPALITY, "--data-dir", folder, "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (prefecture,) = [row for row in rows if row["tier"] == "prefecture-13"]
    assert prefecture["municipality_code"] == MUNICIPALITY and prefecture["connected"] is False
    assert prefecture["connection_reason"] == reason and prefecture["municipality"] == "渋谷区"
    assert prefecture["last_sequence"] >= 1 and prefecture["connection_since"].endswith("Z")
    assert await run("intake", "connect", MUNICIPALITY, "--data-dir", folder, "--reason", "back") == 0
    assert "connected" in capsys.readouterr().out
