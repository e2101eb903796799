"""Settings: parsed once at start-up into frozen objects, validated, secrets hidden.

Every option is a command-line flag and an environment variable (``JUKI_*``); a secret also has a
``*_FILE`` variant. Services receive a :class:`ServiceSettings`; nothing reads ``os.environ`` later.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from juki.mesh.errors import SettingsError

SPIFFE_TRUST_DOMAIN = "juki.local"

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
        pool_min = int(_env(environ, "JUKI_DATABASE_POOL_MIN", "2") or 2)
        pool_max = int(_env(environ, "JUKI_DATABASE_POOL_MAX", "10") or 10)
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
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)


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
    clock = _env(env, "JUKI_CLOCK", "system") or "system"
    if clock != "system" and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", clock):
        raise SettingsError(f"JUKI_CLOCK must be 'system' or YYYY-MM-DD, got {clock!r}")
    extra = {
        k[len("JUKI_"):].lower(): v
        for k, v in env.items()
        if k.startswith("JUKI_")
        and (k.endswith("_FILE") or not any(s in k for s in ("PASSWORD", "DATABASE_URL", "SECRET")))
    }
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
        extra=extra,
    )
