"""A service runs with the base dependencies only: pgserver, Faker, rich and reportlab are extras.

The container image installs the base dependencies (``pip install .``), so nothing a service process
imports may need an extra. Each check runs in a fresh interpreter in which the extras' packages cannot
be imported (``sys.modules[name] = None`` is how the import system spells "not installed": ``import``
raises ModuleNotFoundError and ``importlib.util.find_spec`` answers None), as in the image.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from juki.extras import EXTRAS

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

# The distributions of each extra, as pyproject names them, and the top-level module each installs.
DISTRIBUTIONS = {"pgserver": "pgserver", "faker": "faker", "rich": "rich", "reportlab": "reportlab"}
BLOCKED = sorted(module for modules in EXTRAS.values() for module in modules)


def _name(requirement: str) -> str:
    for stop in "<>=!~[; ":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower()


def run_without_extras(code: str) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys\nfor _name in {BLOCKED!r}:\n    sys.modules[_name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
        cwd=REPO,
    )


def test_base_dependencies_leave_the_extras_out_and_each_extra_names_its_packages() -> None:
    base = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = PYPROJECT["optional-dependencies"]
    assert not base & set(DISTRIBUTIONS), "the service image would install an extra's package"
    assert {"grpcio", "asyncpg", "cryptography", "protobuf"} <= base
    for extra, modules in EXTRAS.items():
        assert {_name(r) for r in extras[extra]} == {DISTRIBUTIONS[m] for m in modules}, extra
    assert "juki[local,cli,seed]" in extras["dev"], "the tests need every extra"


def test_the_blocking_works() -> None:
    result = run_without_extras("""
        import importlib.util
        assert importlib.util.find_spec("rich") is None
        try:
            from rich.progress import Progress
        except ModuleNotFoundError:
            print("blocked")
    """)
    assert result.stdout.strip() == "blocked", result.stderr


def test_every_service_serves_without_the_extras() -> None:
    """The serve path of ``juki serve SERVICE`` (the image's entrypoint): the CLI's parser with every
    command module (``juki --help`` too), the server and each service's app module."""
    result = run_without_extras("""
        import importlib
        from juki.cli import infra
        from juki.cli.main import build_parser

        parser = build_parser()  # imports every command and bench module
        for service in infra.SERVICES:
            args = parser.parse_args(["serve", service])
            assert args.func is infra.cmd_serve
            module = importlib.import_module(f"juki.{service}.app")
            assert callable(module.create), service
        import juki.mesh.server, juki.mesh.telemetry, juki.mesh.db, juki.mesh.embedded  # noqa: F401
        assert parser.parse_args(["migrate", "--database-url", "postgresql://x/y"]).func is infra.cmd_migrate
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in {"juki"})
        print(len(loaded))
    """)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 50


def test_a_command_that_needs_an_extra_says_which() -> None:
    result = run_without_extras("""
        from juki.cli.main import main
        sys.exit(main(["verify", "--purpose", "B1-PENSION-BENEFIT", "no-such-file.csv"]))
    """)
    assert result.returncode == 2, result.stderr
    assert "'cli' extra" in result.stderr and "pip install 'juki[cli]'" in result.stderr


def test_the_embedded_database_and_the_population_name_their_extras(tmp_path: Path) -> None:
    result = run_without_extras(f"""
        from pathlib import Path
        from juki.extras import MissingExtra
        from juki.mesh.embedded import start_embedded
        from juki.seeding.population import generate

        for attempt in (lambda: start_embedded(Path({str(tmp_path)!r})), lambda: next(iter(generate(1, 1)))):
            try:
                attempt()
            except MissingExtra as exc:
                print(exc)
    """)
    assert result.returncode == 0, result.stderr
    local, seed = result.stdout.strip().splitlines()
    assert "pgserver" in local and "'local' extra" in local
    assert "faker" in seed and "'seed' extra" in seed
    assert not (tmp_path / "pg").exists(), "nothing is started before the check"
