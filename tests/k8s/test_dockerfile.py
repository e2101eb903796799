"""The container image's contract, read from the Dockerfile (no Docker engine is needed)."""

from __future__ import annotations

import json
import re

from .k8s_policy import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def test_multi_stage_from_python_3_11_slim() -> None:
    build_arg = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert build_arg and build_arg.group(1).startswith("python:3.11-slim")
    builder, runtime = stages()
    assert builder[0][1] == "${PYTHON_IMAGE} AS builder" and runtime[0][1] == "${PYTHON_IMAGE} AS runtime"


def test_builder_installs_the_package_into_a_venv_that_the_runtime_copies() -> None:
    builder, runtime = stages()
    runs = " ".join(rest for keyword, rest in builder if keyword == "RUN")
    assert "python -m venv /opt/juki" in runs
    assert "/opt/juki/bin/pip install ." in runs and " -e " not in runs, "editable installs point into /src"
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert copies == ["--from=builder /opt/juki /opt/juki"], "only the venv reaches the runtime image"


def test_the_image_installs_the_base_dependencies_only() -> None:
    """No extra (local: pgserver, cli: rich and reportlab, seed: Faker) reaches the service image."""
    builder, _ = stages()
    runs = " ".join(rest for keyword, rest in builder if keyword == "RUN")
    installs = re.findall(r"/opt/juki/bin/pip install (\S+)", runs)
    assert installs == ["."], f"the image installs {installs}, not the bare package"
    assert "! /opt/juki/bin/pip show --quiet pgserver Faker rich reportlab" in runs, (
        "the build must fail if an extra's package is installed all the same"
    )


def test_runtime_is_non_root_and_starts_a_service_chosen_by_argument() -> None:
    runtime = dict(stages()[1])
    assert runtime["USER"] == "10001:10001"
    assert json.loads(runtime["ENTRYPOINT"]) == ["juki", "serve"]
    assert runtime["STOPSIGNAL"] == "SIGTERM"
    assert set(runtime["EXPOSE"].split()) == {"50051", "50052", "9464"}
    env = runtime["ENV"]
    assert "PATH=/opt/juki/bin:$PATH" in env and "HOME=/tmp" in env and "PYTHONDONTWRITEBYTECODE=1" in env


def test_dockerignore_admits_only_the_package_sources() -> None:
    lines = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert admitted >= {"pyproject.toml", "services"}
    assert not admitted & {".venv", ".git", "tests", "k8s"}
