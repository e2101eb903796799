"""Typed settings: every JUKI_* variable is declared, a misspelt one stops the start, values are checked at start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from juki.mesh.errors import SettingsError
from juki.mesh.settings import (
    VARIABLE_PREFIXES,
    VARIABLES,
    AccessLogSettings,
    LookupSettings,
    ServerSettings,
    is_declared,
    load_service_settings,
)

REPO = Path(__file__).resolve().parents[3]
# Where JUKI_* names are written: code, manifests, scripts, docs. Generated code and build output are not.
SCANNED = ("services/juki", "tools", "tests", "k8s", "docs", "examples", ".ci", "README.md", "Dockerfile")
SKIPPED_PARTS = {"_gen", "__pycache__", "juki.egg-info", ".mypy_cache", ".ruff_cache", "node_modules"}
# JUKI_ names in the repository that are not environment variables.
NOT_VARIABLES = {"JUKI_SERVICES"}  # tests/e2e: a Python constant, the set of the mesh's gRPC services
THIS_FILE = Path(__file__).resolve()
DECLARATIONS = REPO / "services" / "juki" / "mesh" / "settings.py"
NAME = re.compile(r"\bJUKI_[A-Z0-9_]+")


def _environ(tmp_path: Path, **extra: str) -> dict[str, str]:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("unused")
    return {
        "JUKI_TLS_CA_FILE": str(tmp_path / "ca.pem"),
        "JUKI_TLS_CERT_FILE": str(tmp_path / "cert.pem"),
        "JUKI_TLS_KEY_FILE": str(tmp_path / "key.pem"),
        "JUKI_DATABASE_URL": "postgresql://u@localhost/juki",
        "PATH": "/usr/bin",  # not ours: never looked at
        **extra,
    }


def _names_in_repository() -> dict[str, str]:
    found: dict[str, str] = {}
    for top in SCANNED:
        root = REPO / top
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            if SKIPPED_PARTS & set(path.relative_to(REPO).parts) or path.suffix in (".pyc", ".pem", ".key"):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if path == THIS_FILE:
                continue  # its misspelt examples are the point
            if path == DECLARATIONS:  # the table itself is not a use
                start = text.index("VARIABLES: Mapping[str, str] = {")
                text = text[:start] + text[text.index("\n}\n", start):]
            for name in NAME.findall(text):
                found.setdefault(name, str(path.relative_to(REPO)))
    return found


def test_every_juki_name_in_the_repository_is_declared() -> None:
    names = _names_in_repository()
    assert "JUKI_SHUTDOWN_GRACE_SECONDS" in names and "JUKI_METRICS_LISTEN" in names  # the scan sees k8s/
    undeclared = {}
    for name, where in names.items():
        if name in NOT_VARIABLES:
            continue
        if name.endswith("_"):  # a family written as a prefix, e.g. JUKI_PG_* or JUKI_LOOKUP_*
            if not any(v.startswith(name) for v in VARIABLES) and name not in VARIABLE_PREFIXES:
                undeclared[name] = where
        elif not is_declared(name):
            undeclared[name] = where
    assert not undeclared, f"declare these in mesh/settings.py VARIABLES: {undeclared}"


def test_every_declared_name_is_used_somewhere() -> None:
    names = _names_in_repository()
    # The *_FILE variant of a secret is read through a name built at run time (read_secret).
    unused = sorted(set(VARIABLES) - set(names) - {"JUKI_DATABASE_URL_FILE"})
    assert not unused, f"declared but used nowhere: {unused}"


def test_a_misspelt_variable_stops_the_start_naming_the_closest_one(tmp_path: Path) -> None:
    environ = _environ(tmp_path, JUKI_SHUTDOWN_GRACE_SECOND="30")
    with pytest.raises(SettingsError) as raised:
        load_service_settings("card", environ=environ)
    assert "JUKI_SHUTDOWN_GRACE_SECOND " in str(raised.value) + " "
    assert "did you mean JUKI_SHUTDOWN_GRACE_SECONDS?" in str(raised.value)


def test_an_unknown_variable_without_a_near_name_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="unknown setting JUKI_FROBNICATE"):
        load_service_settings("card", environ=_environ(tmp_path, JUKI_FROBNICATE="1"))


def test_declared_families_and_tool_variables_are_accepted(tmp_path: Path) -> None:
    environ = _environ(tmp_path, JUKI_PG_SHARED_BUFFERS="1GB", JUKI_REINSTALL="1", JUKI_TEST_DATABASE_URL="x")
    assert load_service_settings("card", environ=environ).service == "card"


@pytest.mark.parametrize(("name", "value"), [
    ("JUKI_SHUTDOWN_GRACE_SECONDS", "soon"),
    ("JUKI_SHUTDOWN_GRACE_SECONDS", "-1"),
    ("JUKI_SHUTDOWN_GRACE_SECONDS", "nan"),
    ("JUKI_MAX_CONNECTION_AGE_SECONDS", "0"),
    ("JUKI_DATABASE_POOL_MAX", "many"),
    ("JUKI_MIGRATE_ON_START", "true"),
    ("JUKI_MIGRATE_ON_START", "maybe"),
    ("JUKI_METRICS_LISTEN", "9464"),
])
def test_server_values_are_checked_at_start_by_every_service(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_service_settings("card", environ=_environ(tmp_path, **{name: value}))


def test_server_values_are_typed(tmp_path: Path) -> None:
    environ = _environ(tmp_path, JUKI_SHUTDOWN_GRACE_SECONDS="20", JUKI_MAX_CONNECTION_AGE_SECONDS="60",
                       JUKI_MIGRATE_ON_START="false", JUKI_OPERATOR_PASSWORDS_FILE="/etc/juki/operators.json")
    settings = load_service_settings("disclosure", environ=environ)
    assert settings.server == ServerSettings(max_connection_age_seconds=60.0, shutdown_grace_seconds=20.0)
    assert settings.operator_passwords_file == Path("/etc/juki/operators.json")
    assert (settings.metrics_listen, settings.ready_file) == (None, None)
    listed = load_service_settings("card", environ=_environ(
        tmp_path, JUKI_METRICS_LISTEN="0.0.0.0:9464", JUKI_READY_FILE=str(tmp_path / "card.ready")))
    assert (listed.metrics_listen, listed.ready_file) == ("0.0.0.0:9464", tmp_path / "card.ready")
    assert load_service_settings("card", environ=_environ(tmp_path)).server == ServerSettings()
    # Set by `juki serve lookup --processes N` for its processes only; never on by default.
    assert load_service_settings("lookup", environ=_environ(tmp_path, JUKI_REUSE_PORT="true")).server.reuse_port
    assert not load_service_settings("lookup", environ=_environ(tmp_path)).server.reuse_port


@pytest.mark.parametrize(("name", "value"), [
    ("JUKI_LOOKUP_QUOTA_MULTIPLIER", "0"),
    ("JUKI_LOOKUP_ACK_TIMEOUT", "-5"),
    ("JUKI_LOOKUP_ACK_TIMEOUT", "five"),
    ("JUKI_LOOKUP_LOG_IN_FLIGHT", "0"),
    ("JUKI_LOOKUP_LOG_IN_FLIGHT", "2.5"),
    ("JUKI_LOOKUP_READ_GROUPS", "0"),
])
def test_lookup_values_are_checked_at_start(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_service_settings("lookup", environ=_environ(tmp_path, **{name: value}))


def test_lookup_and_accesslog_sections_are_typed(tmp_path: Path) -> None:
    environ = _environ(tmp_path, JUKI_LOOKUP_QUOTA_MULTIPLIER="1000", JUKI_LOOKUP_ACK_TIMEOUT="2.5",
                       JUKI_LOOKUP_LOG_IN_FLIGHT="8", JUKI_LOOKUP_READ_GROUPS="3", JUKI_ACCESSLOG_CHECKPOINT_SECONDS="0.5",
                       JUKI_ACCESSLOG_MAX_GROUP_RECORDS="10", JUKI_PSEUDONYM_KEY_FILE="/k")
    lookup = load_service_settings("lookup", environ=environ)
    assert lookup.lookup == LookupSettings(quota_multiplier=1000.0, ack_timeout_seconds=2.5, log_in_flight=8,
                                           read_groups=3)
    assert lookup.accesslog == AccessLogSettings()  # another service's section is not its business
    log = load_service_settings("accesslog", environ=environ).accesslog
    assert (log.checkpoint_seconds, log.max_group_records, log.pseudonym_key_file) == (0.5, 10, Path("/k"))


def test_settings_hold_no_untyped_bag() -> None:
    from juki.mesh.settings import ServiceSettings

    assert "extra" not in ServiceSettings.__dataclass_fields__


def test_the_municipal_resync_batch_is_typed_and_checked(tmp_path: Path) -> None:
    from juki.mesh.settings import MunicipalSettings

    environ = _environ(tmp_path, JUKI_MUNICIPALITY="131148", JUKI_MUNICIPAL_RESYNC_BATCH="200")
    assert load_service_settings("municipal", environ=environ).municipal == MunicipalSettings(resync_batch=200)
    assert load_service_settings("card", environ=environ).municipal == MunicipalSettings()
    for bad in ("0", "10001", "many"):
        with pytest.raises(SettingsError, match="JUKI_MUNICIPAL_RESYNC_BATCH"):
            load_service_settings("municipal", environ=_environ(
                tmp_path, JUKI_MUNICIPALITY="131148", JUKI_MUNICIPAL_RESYNC_BATCH=bad))
