"""``juki up``'s hint names a command that works from where it was started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from juki.cli.infra import juki_command


@pytest.fixture
def venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "juki"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    return tmp_path


def test_the_venv_script_relative_to_the_checkout_when_juki_is_not_on_path(
    venv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(venv)
    assert juki_command() == ".venv/bin/juki"


def test_an_absolute_path_from_elsewhere(venv: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert juki_command() == str(venv / ".venv" / "bin" / "juki")


def test_plain_juki_when_this_one_is_on_path(venv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{venv / '.venv' / 'bin'}:/usr/bin:/bin")
    assert juki_command() == "juki"
