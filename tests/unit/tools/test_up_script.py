"""``tools/up`` and ``tools/test`` install (through the one ``tools/setup``) only when needed, so a
restart works without a package index, and always under the lock's versions.

The scripts run in a scratch checkout whose ``.venv/bin/python`` and ``.venv/bin/juki`` are stand-ins
that log how they were called: no pip, no mesh, no tests, only the decision.
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
    for script in ("up", "test", "setup"):
        shutil.copy(REPO_ROOT / "tools" / script, tmp_path / "tools" / script)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "requirements").mkdir()
    shutil.copy(REPO_ROOT / "requirements" / "lock.txt", tmp_path / "requirements" / "lock.txt")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "juki"):
        stand_in = bin_dir / name
        # As `python -` the stand-in answers the extras the project's install satisfied: those of
        # $SATISFIED_EXTRAS (the real one reads the installed metadata).
        stand_in.write_text(f'#!/bin/sh\necho "{name} $*" >> "$(dirname "$0")/../calls.log"\n'
                            'if [ "$1" = - ]; then cat >/dev/null; printf "%s\\n" $SATISFIED_EXTRAS; fi\n')
        stand_in.chmod(0o755)
    return tmp_path


def up(checkout: Path, **env: str) -> list[str]:
    log = checkout / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    subprocess.run([str(checkout / "tools" / "up"), "--population", "10"], check=True, timeout=60,
                   env={**os.environ, **env})
    return log.read_text().splitlines()


def run_tests(checkout: Path, **env: str) -> list[str]:
    log = checkout / ".venv" / "calls.log"
    log.unlink(missing_ok=True)
    subprocess.run([str(checkout / "tools" / "test"), "tests/unit"], check=True, timeout=60,
                   env={**os.environ, **env})
    return log.read_text().splitlines()


def installs(calls: list[str]) -> bool:
    return any("pip install" in call for call in calls)


def installed_spec(calls: list[str]) -> str:
    (install,) = [call for call in calls if "pip install" in call and " -e " in call]
    return install.rsplit(" -e ", 1)[1]


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


def test_up_and_test_install_their_extras_under_the_lock(checkout: Path) -> None:
    first = up(checkout)
    assert installed_spec(first) == ".[local,cli,seed]"
    assert any("--constraint requirements/lock.txt" in call for call in first)
    tested = run_tests(checkout, SATISFIED_EXTRAS="dev local cli seed")  # dev brings the others along
    assert installed_spec(tested) == ".[dev]"  # an extra the last install did not bring
    assert tested[-1] == "python -m pytest tests/unit"
    assert not installs(run_tests(checkout))
    assert not installs(up(checkout))  # both installs are stamped, with what dev brought along


def test_a_refreshed_lock_installs_again(checkout: Path) -> None:
    up(checkout)
    os.utime(checkout / ".venv" / ".juki-installed", (1_000_000, 1_000_000))
    os.utime(checkout / "pyproject.toml", (1_000_000, 1_000_000))
    assert installs(up(checkout))  # the lock is newer than the stamp
    assert not installs(up(checkout))
