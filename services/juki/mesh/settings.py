"""Settings: parsed once at start-up into frozen objects, validated, secrets hidden.

Every option is a command-line flag and an environment variable (``JUKI_*``); a secret also has a
``*_FILE`` variant. Services receive a :class:`ServiceSettings`; nothing reads ``os.environ`` later.
Each service's own options are typed sections of it (:class:`ServerSettings` for every service,
:class:`LookupSettings`, :class:`AccessLogSettings`), parsed and range-checked at start.

Every ``JUKI_*`` name the project uses anywhere (services, the supervisor, the CLI, tools, tests,
Kubernetes manifests) is declared in :data:`VARIABLES`. A service refuses to start when its environment
holds a ``JUKI_*`` variable that is not declared: a misspelt name would otherwise be ignored silently and
its default used. The error names the variable and the closest declared one.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from juki.mesh.errors import SettingsError

SPIFFE_TRUST_DOMAIN = "juki.local"


def spiffe_id(kind: str, name: str) -> str:
    """The SPIFFE ID of an identity of this mesh: ``spiffe://juki.local/<kind>/<name>``."""
    return f"spiffe://{SPIFFE_TRUST_DOMAIN}/{kind}/{name}"

_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


class Secret:
    """A string that never shows itself in ``repr``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def default_data_dir() -> Path:
    """Where a local mesh keeps its state unless ``--data-dir``/``JUKI_DATA_DIR`` says otherwise.

    Outside any repository on purpose: the embedded PostgreSQL opens the folders above its data
    directory for traversal by its own system user.
    """
    env = os.environ.get("JUKI_DATA_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "juki"


def validate_address(name: str, value: str) -> str:
    """Check ``host:port``; port 0 means "pick a free one" and is allowed for listeners."""
    match = _ADDRESS_RE.match(value)
    if not match or not 0 <= int(match.group(2)) <= 65535:
        raise SettingsError(f"{name}: expected host:port, got {value!r}")
    return value


def _env(environ: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = environ.get(name)
    return value if value not in (None, "") else default


def read_secret(environ: Mapping[str, str], name: str) -> Secret | None:
    """Read ``NAME`` or the file named by ``NAME_FILE`` (the file wins)."""
    path = _env(environ, f"{name}_FILE")
    if path:
        try:
            return Secret(Path(path).read_text(encoding="utf-8").strip())
        except OSError as exc:
            raise SettingsError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from exc
    value = _env(environ, name)
    return Secret(value) if value is not None else None


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one mTLS identity, and the CA that every peer must chain to."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None

    def validate(self) -> TlsFiles:
        for label, path in (("CA", self.ca), ("certificate", self.cert), ("key", self.key)):
            if not path.is_file():
                raise SettingsError(f"TLS {label} file not found: {path}")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TlsFiles:
        missing = [n for n in ("JUKI_TLS_CA_FILE", "JUKI_TLS_CERT_FILE", "JUKI_TLS_KEY_FILE") if not _env(environ, n)]
        if missing:
            raise SettingsError("mutual TLS is mandatory; set " + ", ".join(missing))
        crl = _env(environ, "JUKI_TLS_CRL_FILE")
        return cls(
            ca=Path(environ["JUKI_TLS_CA_FILE"]),
            cert=Path(environ["JUKI_TLS_CERT_FILE"]),
            key=Path(environ["JUKI_TLS_KEY_FILE"]),
            crl=Path(crl) if crl else None,
        ).validate()


@dataclass(frozen=True)
class DatabaseSettings:
    """How a service reaches PostgreSQL: a URL (password hidden) and the schema it owns."""

    url: Secret
    schema: str
    pool_min: int = 2
    pool_max: int = 10

    @classmethod
    def from_env(cls, environ: Mapping[str, str], schema: str) -> DatabaseSettings:
        url = read_secret(environ, "JUKI_DATABASE_URL")
        if url is None:
            host = _env(environ, "JUKI_DATABASE_HOST")
            if host is None:
                raise SettingsError("set JUKI_DATABASE_URL (or JUKI_DATABASE_HOST/_NAME/_USER/_PASSWORD)")
            user = _env(environ, "JUKI_DATABASE_USER", "postgres") or "postgres"
            password = read_secret(environ, "JUKI_DATABASE_PASSWORD")
            port = _env(environ, "JUKI_DATABASE_PORT", "5432")
            name = _env(environ, "JUKI_DATABASE_NAME", "juki")
            credentials = quote(user) + (":" + quote(password.reveal()) if password else "")
            url = Secret(f"postgresql://{credentials}@{host}:{port}/{name}")
        if not url.reveal().startswith(("postgresql://", "postgres://")):
            raise SettingsError("JUKI_DATABASE_URL must be a postgresql:// URL")
        pool_min = _count(environ, "JUKI_DATABASE_POOL_MIN", 2)
        pool_max = _count(environ, "JUKI_DATABASE_POOL_MAX", 10)
        if not 1 <= pool_min <= pool_max <= 200:
            raise SettingsError("database pool sizes must satisfy 1 <= min <= max <= 200")
        return cls(url=url, schema=schema, pool_min=pool_min, pool_max=pool_max)


@dataclass(frozen=True)
class Peers:
    """Addresses of the other services this one calls (empty where it calls none)."""

    accesslog: str | None = None
    national_intake: str | None = None
    prefecture_intake: str | None = None
    card: str | None = None
    lookup: str | None = None
    municipal: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Peers:
        municipal = parse_address_map(_env(environ, "JUKI_MUNICIPAL_ADDRESSES", "") or "", "JUKI_MUNICIPAL_ADDRESSES")
        return cls(
            accesslog=_env(environ, "JUKI_ACCESSLOG_ADDRESS"),
            national_intake=_env(environ, "JUKI_NATIONAL_INTAKE_ADDRESS"),
            prefecture_intake=_env(environ, "JUKI_PREFECTURE_INTAKE_ADDRESS"),
            card=_env(environ, "JUKI_CARD_ADDRESS"),
            lookup=_env(environ, "JUKI_LOOKUP_ADDRESS"),
            municipal=municipal,
        )

    def require(self, name: str) -> str:
        value = getattr(self, name)
        if not value:
            raise SettingsError(f"this service needs the address of {name}: set JUKI_{name.upper()}_ADDRESS")
        return str(value)


def parse_address_map(value: str, name: str) -> dict[str, str]:
    """``code=target,code=target``, where a target may itself list replicas (``ipv4:a:1,b:2``).

    A piece without ``=`` continues the previous target, so ``131148=ipv4:127.0.0.1:1,127.0.0.1:2`` is one
    municipality with two replicas.
    """
    found: dict[str, str] = {}
    last: str | None = None
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        code, sep, address = item.partition("=")
        if sep and address:
            found[code] = address
            last = code
        elif last is not None and not sep:
            found[last] += "," + item
        else:
            raise SettingsError(f"{name}: expected code=host:port, got {item!r}")
    return found


# -- every JUKI_* variable ----------------------------------------------------------------------------

# name -> who reads it and what it means. A service refuses an undeclared JUKI_* variable (see check_variables);
# tests/unit/mesh/test_settings.py checks that every JUKI_* name in the repository is declared here.
VARIABLES: Mapping[str, str] = {
    # every service (load_service_settings)
    "JUKI_LISTEN": "service: gRPC listen address host:port",
    "JUKI_HEALTH_LISTEN": "service: plaintext health-only listen address (Kubernetes probes)",
    "JUKI_METRICS_LISTEN": "service: Prometheus /metrics listen address (mesh/metrics.py)",
    "JUKI_DATA_DIR": "service, CLI, supervisor: local state folder",
    "JUKI_CLOCK": "service, CLI: 'system' or a fixed business day YYYY-MM-DD",
    "JUKI_LOG_LEVEL": "service: log level",
    "JUKI_TIER": "intake: national or prefecture",
    "JUKI_PREFECTURE": "intake, municipal: two-digit prefecture code",
    "JUKI_MUNICIPALITY": "municipal: six-digit municipality code",
    "JUKI_TLS_CA_FILE": "service: the mesh CA certificate",
    "JUKI_TLS_CERT_FILE": "service: this service's certificate",
    "JUKI_TLS_KEY_FILE": "service: this service's private key",
    "JUKI_TLS_CRL_FILE": "service: the CA's revocation list",
    "JUKI_DATABASE_URL": "service: postgresql:// URL (secret)",
    "JUKI_DATABASE_URL_FILE": "service: file holding JUKI_DATABASE_URL",
    "JUKI_DATABASE_HOST": "service: PostgreSQL host, when no URL is given",
    "JUKI_DATABASE_PORT": "service: PostgreSQL port",
    "JUKI_DATABASE_NAME": "service: PostgreSQL database",
    "JUKI_DATABASE_USER": "service: PostgreSQL role",
    "JUKI_DATABASE_PASSWORD": "service: PostgreSQL password (secret)",
    "JUKI_DATABASE_PASSWORD_FILE": "service: file holding JUKI_DATABASE_PASSWORD",
    "JUKI_DATABASE_POOL_MIN": "service: smallest connection pool",
    "JUKI_DATABASE_POOL_MAX": "service: largest connection pool",
    "JUKI_MAX_CONNECTION_AGE_SECONDS": "service: how long a client connection lives (reaches new replicas)",
    "JUKI_SHUTDOWN_GRACE_SECONDS": "service: how long in-flight calls may finish after SIGTERM",
    "JUKI_OPERATOR_PASSWORDS_FILE": "service: operators' scrypt password hashes (JSON)",
    "JUKI_MIGRATE_ON_START": "service: must be false; a serving process never migrates (juki migrate does)",
    "JUKI_READY_FILE": "service: file written once the server listens (supervisor, benches)",
    "JUKI_REUSE_PORT": "service: bind the listen port with SO_REUSEPORT (set by `juki serve --processes N`)",
    "JUKI_NATIVE_LOG_FILE": "service (juki serve): where gRPC's C core writes its stderr",
    "JUKI_REPLICA": "service: replica key given by the supervisor (for its logs)",
    # peers
    "JUKI_ACCESSLOG_ADDRESS": "service: access-log address",
    "JUKI_NATIONAL_INTAKE_ADDRESS": "service: national intake address",
    "JUKI_PREFECTURE_INTAKE_ADDRESS": "municipal: its prefecture intake's address",
    "JUKI_PREFECTURE_INTAKE_ADDRESSES": "supervisor: every prefecture intake, code=address,...",
    "JUKI_CARD_ADDRESS": "service: card service address",
    "JUKI_LOOKUP_ADDRESS": "service: lookup service address",
    "JUKI_MUNICIPAL_ADDRESSES": "service: municipal services, code=address,...",
    # lookup
    "JUKI_LOOKUP_QUOTA_MULTIPLIER": "lookup: scales every 別表 quota (> 0, default 1)",
    "JUKI_LOOKUP_ACK_TIMEOUT": "lookup: seconds to wait for the access log's acknowledgement (> 0, default 5)",
    "JUKI_LOOKUP_LOG_IN_FLIGHT": "lookup: access-log batches sent and not yet acknowledged (>= 1, default 4)",
    "JUKI_LOOKUP_READ_GROUPS": "lookup: groups of lookups by code read and logged at once (>= 1, default 1)",
    # access log
    "JUKI_ACCESSLOG_SIGNING_KEY_FILE": "accesslog: checkpoint signing key",
    "JUKI_ACCESSLOG_SIGNING_CERT_FILE": "accesslog: checkpoint signing certificate",
    "JUKI_ACCESSLOG_CHECKPOINT_SECONDS": "accesslog: seconds between checkpoints (>= 0, default 10)",
    "JUKI_ACCESSLOG_VERIFY_SECONDS": "accesslog: seconds between self-verifications (>= 0, default 600)",
    "JUKI_ACCESSLOG_MAX_GROUP_RECORDS": "accesslog: records per group commit (>= 1, default 100000)",
    "JUKI_ACCESSLOG_ORIGIN": "accesslog: checkpoint origin line",
    "JUKI_PSEUDONYM_KEY_FILE": "accesslog: key of the resident-code pseudonym",
    # municipal CS
    "JUKI_MUNICIPAL_RESYNC_BATCH": "municipal: records per BulkLoad batch of a resync (1..10000, default 1000)",
    # the CLI, the embedded database, tools and tests (declared so that a service started from a shell that
    # sets them does not refuse them)
    "JUKI_DATABASE_ADMIN_URL": "CLI (juki migrate): administrative URL",
    "JUKI_PG_MEMORY": "embedded PostgreSQL: memory budget (JUKI_PG_<PARAMETER> sets one parameter)",
    "JUKI_BENCH_NATIVE": "juki bench lookup: profile native frames",
    "JUKI_TEST_DATABASE_URL": "tests: an external PostgreSQL instead of the embedded one",
    "JUKI_REQUIRE_PROMTOOL": "tests: fail instead of skipping when promtool is missing",
    "JUKI_REQUIRE_NODE": "tests: fail instead of skipping when Node.js is missing (the example client)",
    "JUKI_REINSTALL": "tools/up: reinstall the package",
    "JUKI_IMAGE_DIR": "tools/image: build folder",
}
# Families of names: JUKI_PG_<PARAMETER> overrides one parameter of the embedded PostgreSQL (mesh/pgtune.py).
VARIABLE_PREFIXES: tuple[str, ...] = ("JUKI_PG_",)


def is_declared(name: str) -> bool:
    return name in VARIABLES or any(name.startswith(p) and len(name) > len(p) for p in VARIABLE_PREFIXES)


def check_variables(environ: Mapping[str, str]) -> None:
    """Refuse any undeclared ``JUKI_*`` variable, naming it and the closest declared name."""
    unknown = sorted(name for name in environ if name.startswith("JUKI_") and not is_declared(name))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, VARIABLES, n=1, cutoff=0.6)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise SettingsError("unknown setting " + ", ".join(hints) + "; every JUKI_* variable is listed in mesh/settings.py")


def _number(environ: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0,
            exclusive: bool = False) -> float:
    raw = _env(environ, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < minimum or (exclusive and value == minimum):
        raise SettingsError(f"{name}: must be {'>' if exclusive else '>='} {minimum:g}, got {raw!r}")
    return value


def _count(environ: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = _env(environ, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {raw!r}")
    return value


def _path(environ: Mapping[str, str], name: str) -> Path | None:
    raw = _env(environ, name)
    return Path(raw).expanduser() if raw else None


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = (_env(environ, name, "false") or "false").lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise SettingsError(f"{name}: expected true or false, got {raw!r}")
    return raw in ("true", "1", "yes")


@dataclass(frozen=True)
class ServerSettings:
    """What every service's gRPC server is tuned with."""

    # How soon a long-lived client channel reaches replicas added after it connected.
    max_connection_age_seconds: float = 300.0
    # How long in-flight calls may finish after SIGTERM (Kubernetes: below terminationGracePeriodSeconds).
    shutdown_grace_seconds: float = 10.0
    # Share the listen port with the other processes of `juki serve --processes N` (mesh.processes).
    reuse_port: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServerSettings:
        if _flag(environ, "JUKI_MIGRATE_ON_START"):
            raise SettingsError("JUKI_MIGRATE_ON_START: a serving process never migrates; run `juki migrate`")
        return cls(
            max_connection_age_seconds=_number(environ, "JUKI_MAX_CONNECTION_AGE_SECONDS", 300.0, exclusive=True),
            shutdown_grace_seconds=_number(environ, "JUKI_SHUTDOWN_GRACE_SECONDS", 10.0),
            reuse_port=_flag(environ, "JUKI_REUSE_PORT"),
        )


@dataclass(frozen=True)
class LookupSettings:
    """The lookup service's own options."""

    quota_multiplier: float = 1.0  # scales every 別表 quota; benchmarks raise it
    ack_timeout_seconds: float = 5.0  # wait for the access log's acknowledgement
    log_in_flight: int = 4  # access-log batches sent and not yet acknowledged
    read_groups: int = 1  # groups of lookups by code under way at once (lookup.bycode)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> LookupSettings:
        return cls(
            quota_multiplier=_number(environ, "JUKI_LOOKUP_QUOTA_MULTIPLIER", 1.0, exclusive=True),
            ack_timeout_seconds=_number(environ, "JUKI_LOOKUP_ACK_TIMEOUT", 5.0, exclusive=True),
            log_in_flight=_count(environ, "JUKI_LOOKUP_LOG_IN_FLIGHT", 4),
            read_groups=_count(environ, "JUKI_LOOKUP_READ_GROUPS", 1),
        )


@dataclass(frozen=True)
class AccessLogSettings:
    """The access log's own options (the key files are checked when the log starts)."""

    signing_key_file: Path | None = None
    signing_cert_file: Path | None = None
    pseudonym_key_file: Path | None = None
    checkpoint_seconds: float = 10.0
    verify_seconds: float = 600.0
    max_group_records: int = 100_000
    origin: str = ""  # empty: the default origin

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AccessLogSettings:
        return cls(
            signing_key_file=_path(environ, "JUKI_ACCESSLOG_SIGNING_KEY_FILE"),
            signing_cert_file=_path(environ, "JUKI_ACCESSLOG_SIGNING_CERT_FILE"),
            pseudonym_key_file=_path(environ, "JUKI_PSEUDONYM_KEY_FILE"),
            checkpoint_seconds=_number(environ, "JUKI_ACCESSLOG_CHECKPOINT_SECONDS", 10.0),
            verify_seconds=_number(environ, "JUKI_ACCESSLOG_VERIFY_SECONDS", 600.0),
            max_group_records=_count(environ, "JUKI_ACCESSLOG_MAX_GROUP_RECORDS", 100_000),
            origin=_env(environ, "JUKI_ACCESSLOG_ORIGIN", "") or "",
        )


@dataclass(frozen=True)
class MunicipalSettings:
    """The municipal CS's own options."""

    resync_batch: int = 1000  # records per BulkLoad batch when the register is sent to the prefecture

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> MunicipalSettings:
        batch = _count(environ, "JUKI_MUNICIPAL_RESYNC_BATCH", 1000)
        if batch > 10_000:
            raise SettingsError(f"JUKI_MUNICIPAL_RESYNC_BATCH: must be <= 10000 (the intake's batch limit), got {batch}")
        return cls(resync_batch=batch)


@dataclass(frozen=True)
class ServiceSettings:
    """Everything one service process needs, parsed once."""

    service: str  # intake, lookup, card, accesslog, disclosure, municipal
    instance: str  # e.g. intake-national, intake-prefecture-13, municipal-131148
    listen: str
    tls: TlsFiles
    database: DatabaseSettings
    data_dir: Path
    peers: Peers
    health_listen: str | None = None
    tier: str | None = None  # intake: "national" or "prefecture"
    prefecture: str | None = None  # two digits, e.g. "13"
    municipality: str | None = None  # six digits, e.g. "131148"
    clock: str = "system"  # "system" or an ISO date for a fixed business day
    log_level: str = "INFO"
    operator_passwords_file: Path | None = None
    metrics_listen: str | None = None  # host:port of the Prometheus /metrics endpoint
    ready_file: Path | None = None  # written once the server listens (the supervisor waits for it)
    server: ServerSettings = field(default_factory=ServerSettings)
    lookup: LookupSettings = field(default_factory=LookupSettings)  # read by the lookup service only
    accesslog: AccessLogSettings = field(default_factory=AccessLogSettings)  # read by the access log only
    municipal: MunicipalSettings = field(default_factory=MunicipalSettings)  # read by the municipal CS only


def instance_name(service: str, tier: str | None, prefecture: str | None, municipality: str | None) -> str:
    if service == "intake":
        return "intake-national" if tier == "national" else f"intake-prefecture-{prefecture}"
    if service == "municipal":
        return f"municipal-{municipality}"
    return service


def schema_name(instance: str) -> str:
    """The PostgreSQL schema an instance owns (``intake-prefecture-13`` -> ``intake_p13``)."""
    if instance.startswith("intake-prefecture-"):
        return "intake_p" + instance.rsplit("-", 1)[1]
    return instance.replace("-", "_")


def role_name(instance: str) -> str:
    return "juki_" + schema_name(instance)


def load_service_settings(
    service: str,
    *,
    environ: Mapping[str, str] | None = None,
    tier: str | None = None,
    prefecture: str | None = None,
    municipality: str | None = None,
    listen: str | None = None,
) -> ServiceSettings:
    """Parse and validate the settings of one service from flags (given) and ``JUKI_*`` variables."""
    env = os.environ if environ is None else environ
    check_variables(env)
    tier = tier or _env(env, "JUKI_TIER")
    prefecture = prefecture or _env(env, "JUKI_PREFECTURE")
    municipality = municipality or _env(env, "JUKI_MUNICIPALITY")
    if service == "intake":
        if tier not in ("national", "prefecture"):
            raise SettingsError("intake needs --tier national|prefecture (JUKI_TIER)")
        if tier == "prefecture" and not (prefecture and re.fullmatch(r"\d{2}", prefecture)):
            raise SettingsError("a prefecture intake needs --prefecture NN (JUKI_PREFECTURE), e.g. 13")
    if service == "municipal" and not (municipality and re.fullmatch(r"\d{6}", municipality)):
        raise SettingsError("municipal needs --municipality NNNNNN (JUKI_MUNICIPALITY), e.g. 131148")
    if municipality and not prefecture:
        prefecture = municipality[:2]
    instance = instance_name(service, tier, prefecture, municipality)
    listen_address = validate_address("JUKI_LISTEN", listen or _env(env, "JUKI_LISTEN", "127.0.0.1:0") or "")
    health = _env(env, "JUKI_HEALTH_LISTEN")
    metrics_listen = _env(env, "JUKI_METRICS_LISTEN")
    clock = _env(env, "JUKI_CLOCK", "system") or "system"
    if clock != "system" and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", clock):
        raise SettingsError(f"JUKI_CLOCK must be 'system' or YYYY-MM-DD, got {clock!r}")
    return ServiceSettings(
        service=service,
        instance=instance,
        listen=listen_address,
        tls=TlsFiles.from_env(env),
        database=DatabaseSettings.from_env(env, schema_name(instance)),
        data_dir=Path(_env(env, "JUKI_DATA_DIR", str(default_data_dir())) or "."),
        peers=Peers.from_env(env),
        health_listen=validate_address("JUKI_HEALTH_LISTEN", health) if health else None,
        tier=tier,
        prefecture=prefecture,
        municipality=municipality,
        clock=clock,
        log_level=(_env(env, "JUKI_LOG_LEVEL", "INFO") or "INFO").upper(),
        operator_passwords_file=_path(env, "JUKI_OPERATOR_PASSWORDS_FILE"),
        metrics_listen=validate_address("JUKI_METRICS_LISTEN", metrics_listen) if metrics_listen else None,
        ready_file=_path(env, "JUKI_READY_FILE"),
        server=ServerSettings.from_env(env),
        lookup=LookupSettings.from_env(env) if service == "lookup" else LookupSettings(),
        accesslog=AccessLogSettings.from_env(env) if service == "accesslog" else AccessLogSettings(),
        municipal=MunicipalSettings.from_env(env) if service == "municipal" else MunicipalSettings(),
    )
