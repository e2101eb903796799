"""``tools/up`` installs only when needed, so a restart works without a package index.

The script runs in a scratch checkout whose ``.venv/bin/python`` and ``.venv/bin/juki`` are stand-ins
that log how they were called: no pip, no mesh, only the decision.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO_ROOT / "tools" / "up", tmp_path / "tools" / "up")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "juki"):
        stand_in = bin_dir / name
        stand_in.write_text(f'#!/bin/sh\necho "{name} $*" >> "$(dirname "$0")/../calls.log"\n')
        stand_in.chmod(0o755)
    return tmp_path


def up(checkout: Path, **env: str) -> list[str]:
    log = checkout / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    subprocess.run([str(checkout / "tools" / "up"), "--population", "10"], check=True, timeout=60,
                   env={**os.environ, **env})
    return log.read_text().splitlines()


def installs(calls: list[str]) -> bool:
    return any("pip install" in call for call in calls)


def test_first_start_installs_then_restarts_do_not(checkout: Path) -> None:
    first = up(checkout)
    assert installs(first) and first[-1] == "juki up --population 10"
    again = up(checkout)
    assert again == ["juki up --population 10"]  # no pip: works with no package index


def test_a_newer_pyproject_or_a_request_installs_again(checkout: Path) -> None:
    up(checkout)
    stamp = checkout / ".venv" / ".juki-installed"
    os.utime(stamp, (1_000_000, 1_000_000))  # older than pyproject.toml: its dependencies may have changed
    assert installs(up(checkout))
    assert not installs(up(checkout))
    assert installs(up(checkout, JUKI_REINSTALL="1"))


def test_an_unfinished_install_is_retried(checkout: Path) -> None:
    up(checkout)
    (checkout / ".venv" / ".juki-installed").unlink()  # e.g. pip was interrupted before the stamp
    assert installs(up(checkout))
