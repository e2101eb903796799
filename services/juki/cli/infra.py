"""Infrastructure verbs: ``up``, ``serve``, ``migrate``, ``pki``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
from pathlib import Path
from typing import Any

from juki.cli.main import add_data_dir
from juki.mesh import db, pki
from juki.mesh.errors import SettingsError
from juki.mesh.settings import default_data_dir, load_service_settings
from juki.mesh.supervisor import MeshLayout, Supervisor, migration_targets, wait_for_signals

SERVICES = ("intake", "lookup", "card", "accesslog", "disclosure", "municipal")


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="start the whole mesh locally (mTLS, embedded PostgreSQL, synthetic population)")
    add_data_dir(up)
    up.add_argument("--population", type=int, default=3000, help="residents to seed when the store is empty")
    up.add_argument("--seed", type=int, default=20020805, help="seed of the synthetic population")
    up.add_argument("--prefecture", action="append", default=None,
                    help="prefecture codes to run (default: those of the municipalities)")
    up.add_argument("--municipality", action="append", default=None,
                    help="municipality codes to run (default 131148 中野区 and 141003 横浜市)")
    up.add_argument("--otlp", default=None, help="send traces to this OTLP/gRPC endpoint (e.g. http://127.0.0.1:4317)")
    up.add_argument("--clock", default=None, help="business date for the mesh (YYYY-MM-DD; default: today)")
    up.add_argument("--replicas", type=int, default=1,
                    help="processes of every service (default 1); clients balance across them per call")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run one service (used by `juki up` and in containers)")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--tier", choices=("national", "prefecture"))
    serve.add_argument("--prefecture")
    serve.add_argument("--municipality")
    serve.add_argument("--listen", help="host:port (default $JUKI_LISTEN)")
    serve.add_argument("--processes", type=int, default=1,
                       help="lookup only: run N processes sharing the listen port (SO_REUSEPORT), one per core")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations for every service of the local layout")
    add_data_dir(migrate)
    migrate.add_argument("--database-url", help="administrative URL (default: $JUKI_DATABASE_ADMIN_URL or embedded)")
    migrate.add_argument("--service", action="append", help="only these instances (e.g. lookup, intake-national)")
    migrate.set_defaults(func=cmd_migrate)

    p = sub.add_parser("pki", help="the private CA: init, issue, revoke, list")
    add_data_dir(p)
    psub = p.add_subparsers(dest="pki_command", required=True)
    init = psub.add_parser("init", help="create the CA (never overwrites one)")
    init.set_defaults(func=cmd_pki_init)
    issue = psub.add_parser("issue", help="issue a certificate: KIND NAME")
    issue.add_argument("kind", choices=pki.KINDS)
    issue.add_argument("name")
    issue.add_argument("--days", type=int, default=397)
    issue.add_argument("--dns", action="append", default=None)
    issue.add_argument("--display-name")
    issue.add_argument("--force", action="store_true", help="replace an existing certificate")
    issue.set_defaults(func=cmd_pki_issue)
    revoke = psub.add_parser("revoke", help="revoke a certificate: KIND NAME")
    revoke.add_argument("kind", choices=pki.KINDS)
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_pki_revoke)
    listing = psub.add_parser("list", help="list issued certificates")
    listing.set_defaults(func=cmd_pki_list)


def layout_from(args: argparse.Namespace) -> MeshLayout:
    municipalities = tuple(args.municipality or MeshLayout().municipalities)
    prefectures = tuple(args.prefecture or sorted({m[:2] for m in municipalities}))
    return MeshLayout(prefectures=prefectures, municipalities=municipalities)


async def cmd_up(args: argparse.Namespace) -> int:
    import os

    from juki.mesh.settings import read_secret
    from juki.seeding.registers import seed_population

    env: dict[str, str] = {}
    if args.otlp:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = args.otlp
    if args.clock:
        env["JUKI_CLOCK"] = args.clock
    admin = read_secret(os.environ, "JUKI_DATABASE_URL")
    supervisor = Supervisor(
        args.data_dir or default_data_dir(), layout_from(args),
        database_url=admin.reveal() if admin else None, extra_env=env, echo=print, replicas=args.replicas,
    )
    stop = asyncio.Event()
    wait_for_signals(stop)
    try:
        await supervisor.prepare()
        print("starting services:")
        await supervisor.start(publish=False)
        seeded = await seed_population(supervisor, args.population, args.seed, echo=print)
        print(f"population: {seeded}")
        await _until_relayed(supervisor)
        # Last: a client waiting for endpoints.json finds the mesh answering and seeded.
        print(f"endpoints: {supervisor.write_endpoints()}")
        samples = await _sample_codes(supervisor.admin_url)
        if samples:
            print(f"try: {juki_command()} lookup {samples[0]} --purpose B1-PENSION-BENEFIT"
                  f"   (other residents: {', '.join(samples[1:])})")
        print("mesh is up; press Ctrl-C to stop")
        await stop.wait()
    finally:
        print("stopping mesh ...")
        await supervisor.stop()
        print("mesh stopped")
    return 0


def juki_command() -> str:
    """How to run ``juki`` from the current directory: a bare ``juki`` only if it is this one on PATH.

    ``tools/up`` installs into ``.venv`` without activating it, so ``juki`` is usually not on PATH; the
    script beside this interpreter is (``.venv/bin/juki``), shown relative to the current directory
    when it lies inside it.
    """
    import os
    import shlex
    import shutil
    import sys

    script = Path(sys.executable).parent / "juki"
    if not script.is_file():
        return "juki"
    found = shutil.which("juki")
    if found and Path(found).resolve() == script.resolve():
        return "juki"
    try:
        shown = str(script.relative_to(Path.cwd()))
        shown = shown if os.sep in shown else "." + os.sep + shown
    except ValueError:
        shown = str(script)
    return shlex.quote(shown)


async def _until_relayed(supervisor: Supervisor, patience: float = 120.0) -> None:
    """Wait until the national store holds every resident of the municipal registers (the prefectures
    relay what the seeding loaded), so that the mesh answers lookups of the whole population once ready."""
    import time

    import asyncpg

    from juki.mesh.settings import schema_name

    deadline = time.monotonic() + patience
    while True:
        conn = await asyncpg.connect(supervisor.admin_url)
        try:
            held = int(await conn.fetchval(f'SELECT count(*) FROM "{schema_name("intake-national")}".residents'))
            registered = 0
            for m in supervisor.layout.municipalities:
                registered += int(await conn.fetchval(
                    f'SELECT count(*) FROM "{schema_name("municipal-" + m)}".residents'))
        finally:
            await conn.close()
        if held >= registered:
            return
        if time.monotonic() > deadline:
            print(f"warning: the national store holds {held} of {registered} registered residents after"
                  f" {patience:.0f} s; the relay goes on")
            return
        await asyncio.sleep(0.25)


async def _sample_codes(admin_url: str, count: int = 4) -> list[str]:
    """A few current residents of the national store, for a first lookup."""
    import asyncpg

    from juki.mesh.settings import schema_name

    conn = await asyncpg.connect(admin_url)
    try:
        rows = await conn.fetch(
            f'SELECT resident_code FROM "{schema_name("intake-national")}".residents WHERE status = 1 '
            "ORDER BY resident_code LIMIT $1", count,
        )
    finally:
        await conn.close()
    return [r["resident_code"] for r in rows]


async def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from juki.mesh import telemetry
    from juki.mesh.server import serve

    native_log = os.environ.get("JUKI_NATIVE_LOG_FILE")
    if native_log:
        telemetry.route_native_stderr(native_log)

    settings = load_service_settings(
        args.service, tier=args.tier, prefecture=args.prefecture, municipality=args.municipality, listen=args.listen
    )
    if args.processes != 1:
        from juki.mesh.processes import serve_processes

        flags = [f"--{name}={value}" for name in ("tier", "prefecture", "municipality")
                 if (value := getattr(args, name))]
        return await serve_processes(settings, [args.service, *flags], args.processes)
    module = importlib.import_module(f"juki.{args.service}.app")
    service = module.create(settings)
    await serve(settings, service)
    return 0


async def cmd_migrate(args: argparse.Namespace) -> int:
    import os

    from juki.mesh.embedded import start_embedded

    url = args.database_url or os.environ.get("JUKI_DATABASE_ADMIN_URL")
    embedded = None
    if url is None:
        embedded = await asyncio.to_thread(start_embedded, (args.data_dir or default_data_dir()).expanduser())
        url = embedded.admin_url
    targets = migration_targets(MeshLayout())
    if args.service:
        targets = [t for t in targets if t.instance in args.service]
        if not targets:
            raise SettingsError(f"no such service instance: {', '.join(args.service)}")
    try:
        applied = await db.migrate(url, targets)
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    for instance, versions in applied.items():
        print(f"{instance:<24} {'applied ' + ', '.join(map(str, versions)) if versions else 'up to date'}")
    return 0


def _ca(args: argparse.Namespace) -> pki.CertificateAuthority:
    return pki.CertificateAuthority((args.data_dir or default_data_dir()).expanduser() / "pki")


def cmd_pki_init(args: argparse.Namespace) -> int:
    ca = _ca(args)
    existed = ca.exists()
    ca.create()
    print(f"CA {'already exists' if existed else 'created'}: {ca.ca_cert_path}")
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    try:
        issued = _ca(args).issue(
            args.kind, args.name, days=args.days, dns_names=tuple(args.dns or ("localhost",)),
            display_name=args.display_name, overwrite=args.force,
        )
    except pki.PkiError as exc:
        raise SettingsError(str(exc)) from exc
    print(f"{issued.spiffe_id}\n  certificate {issued.cert}\n  key         {issued.key} (mode 0600)")
    return 0


def cmd_pki_revoke(args: argparse.Namespace) -> int:
    try:
        serial = _ca(args).revoke(args.kind, args.name)
    except pki.PkiError as exc:
        raise SettingsError(str(exc)) from exc
    print(f"revoked {args.kind}/{args.name} (serial {serial:x}); services refuse it within seconds")
    return 0


def cmd_pki_list(args: argparse.Namespace) -> int:
    from cryptography import x509

    ca = _ca(args)
    revoked = set(ca.revoked_serials())
    for path in sorted(Path(ca.root).glob("*/*.crt")):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        state = "REVOKED" if cert.serial_number in revoked else "valid"
        print(f"{path.parent.name + '/' + path.stem:<34} until {cert.not_valid_after_utc:%Y-%m-%d}  {state}")
    return 0
