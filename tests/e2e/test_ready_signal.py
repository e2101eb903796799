"""`juki up`'s readiness signal: once `endpoints.json` appears, the mesh answers for its whole population.

`juki up` runs as a new user runs it, in a child process; the test waits for the file, as the README tells
clients to, and then asks at once.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import asyncpg
import pytest
from juki.mesh.settings import schema_name

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MUNICIPALITIES = ("131148", "141003")


async def _juki(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_when_endpoints_json_appears_the_seeded_mesh_answers() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="juki-ready-"))
    stale = {"ready": True, "services": {}, "clients": {}}
    (data_dir / "endpoints.json").write_text(json.dumps(stale))  # left by a mesh killed earlier
    log = (data_dir / "up.log").open("wb")
    up = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "juki", "up", "--data-dir", str(data_dir), "--population", "120",
        stdout=log, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        endpoints_file = data_dir / "endpoints.json"
        # The stale file goes before anything starts; the new one comes once the mesh is ready.
        while endpoints_file.is_file() and json.loads(endpoints_file.read_text()) == stale:
            assert up.returncode is None, (data_dir / "up.log").read_text()
            await asyncio.sleep(0.02)
        while not endpoints_file.is_file():
            assert up.returncode is None, (data_dir / "up.log").read_text()
            await asyncio.sleep(0.02)
        endpoints = json.loads(endpoints_file.read_text())  # written atomically: never half a file
        conn = await asyncpg.connect(endpoints["database"]["admin_url"])
        try:
            registered = [row["resident_code"] for m in MUNICIPALITIES for row in await conn.fetch(
                f'SELECT resident_code FROM "{schema_name("municipal-" + m)}".residents ORDER BY resident_code')]
            national = int(await conn.fetchval('SELECT count(*) FROM intake_national.residents'))
        finally:
            await conn.close()
        assert len(registered) == 120  # seeded before the signal
        assert national >= len(registered)  # and relayed to the national store
        assert endpoints["ready"] is True
        for code in (registered[0], registered[-1]):
            status, out = await _juki("lookup", code, "--purpose", "B1-PENSION-BENEFIT", "--data-dir", str(data_dir))
            assert status == 0, out
            assert json.loads(out)["record"]["name"]["familyName"]
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
            await up.wait()
        log.close()
        assert not (data_dir / "endpoints.json").exists()  # gone with the mesh
        shutil.rmtree(data_dir, ignore_errors=True)
