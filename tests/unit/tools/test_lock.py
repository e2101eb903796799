"""requirements/lock.txt pins every dependency pyproject.toml declares, at a version it allows.

tools/setup installs under the lock as constraints; a dependency added to pyproject.toml without a
refreshed lock (tools/lock) would install unpinned, and a pin outside a changed range would make pip fail.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[3]


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO_ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"pinned twice: {name}"
        pins[name] = match[2]
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        found += [Requirement(r) for r in extra]
    return [r for r in found if canonicalize_name(r.name) != canonicalize_name(project["name"])]


@pytest.mark.parametrize("requirement", _declared(), ids=str)
def test_every_declared_dependency_is_pinned_within_its_range(requirement: Requirement) -> None:
    pins = _pins()
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{requirement} is not in requirements/lock.txt; run tools/lock"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"the lock pins {name}=={pins[name]}, outside {requirement}; run tools/lock"
    )


def test_the_lint_tools_are_pinned_exactly_as_the_lock_has_them() -> None:
    """Lint runs as a test: a new ruff or mypy must come by a change here, never by itself."""
    pins = _pins()
    for tool in ("ruff", "mypy"):
        (requirement,) = [r for r in _declared() if canonicalize_name(r.name) == tool]
        assert str(requirement.specifier) == f"=={pins[tool]}"
