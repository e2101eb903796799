"""Intake verbs against a running mesh.

``juki notify KIND ...`` sends one notification to the prefecture intake as the municipality's CS
(its certificate from ``endpoints.json``); ``juki intake status`` shows, per municipality and tier, the
acknowledged sequence, connection state and relay lag; ``juki intake disconnect|connect CODE`` marks a
municipality cut off from (or back on) the network, signed with the operator's key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import uuid
from typing import Any

from juki import domain
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.intake.v1 import intake_pb2, intake_pb2_grpc
from juki.cli.main import add_data_dir
from juki.extras import need
from juki.mesh.client import MeshClient
from juki.mesh.operator import sign_with_files

KINDS = {name.removeprefix("CHANGE_KIND_").lower().replace("_", "-"): value
         for name, value in common_pb2.ChangeKind.items() if value}
OUTCOMES = {value: name.removeprefix("NOTIFICATION_OUTCOME_") for name, value in intake_pb2.NotificationOutcome.items()}


def register(sub: Any) -> None:
    notify = sub.add_parser("notify", help="send one notification (異動) to the prefecture intake as a municipality")
    add_data_dir(notify)
    notify.add_argument("kind", choices=sorted(KINDS), help="異動事由")
    notify.add_argument("--municipality", default="131148", help="notifying municipality (default 131148 中野区)")
    notify.add_argument("--resident-code", help="住民票コード (default: a new one, for a birth)")
    notify.add_argument("--new-resident-code", default="", help="for resident-code-change")
    notify.add_argument("--family-name", default="中野")
    notify.add_argument("--given-name", default="太郎")
    notify.add_argument("--family-name-kana", default="")
    notify.add_argument("--given-name-kana", default="")
    notify.add_argument("--birth-date", help="YYYY-MM-DD (a birth: the occurred date)")
    notify.add_argument("--sex", choices=("male", "female"), default="male")
    notify.add_argument("--street", default="中野四丁目8番1号")
    notify.add_argument("--occurred-on", help="異動年月日, YYYY-MM-DD (default today)")
    notify.add_argument("--notified-on", help="届出年月日, YYYY-MM-DD (default: occurred-on)")
    notify.add_argument("--from-municipality", default="", help="move-in: the municipality moved from")
    notify.add_argument("--to-municipality", default="", help="move-out: the municipality moved to")
    notify.add_argument("--foreign", action="store_true", help="a foreign resident")
    notify.add_argument("--alphabetic-name", default="")
    notify.add_argument("--common-name", default="", help="通称 (foreign residents)")
    notify.add_argument("--sequence", type=int, help="default: the next after the highest the prefecture holds")
    notify.add_argument("--notification-id", help="default: a new UUID")
    notify.set_defaults(func=cmd_notify)

    intake = sub.add_parser("intake", help="intake operations: status, disconnect, connect")
    verbs = intake.add_subparsers(dest="intake_command", required=True, metavar="VERB")
    status = verbs.add_parser("status", help="per municipality: sequence, connection state, relay lag")
    add_data_dir(status)
    status.add_argument("municipalities", nargs="*", help="only these (6 digits)")
    status.add_argument("--json", action="store_true", help="one JSON object per line (a row), for scripts")
    status.set_defaults(func=cmd_status)
    for verb, connected in (("disconnect", False), ("connect", True)):
        parser = verbs.add_parser(verb, help=f"mark a municipality {'dis' if not connected else ''}connected")
        add_data_dir(parser)
        parser.add_argument("municipality")
        parser.add_argument("--reason", default="")
        parser.add_argument("--password", default=None, help="operator password (default: the demo operator's)")
        parser.set_defaults(func=cmd_connection, connected=connected)


def _date(text: str | None, default: dt.date) -> common_pb2.Date:
    day = dt.date.fromisoformat(text) if text else default
    return common_pb2.Date(year=day.year, month=day.month, day=day.day, precision=common_pb2.DATE_PRECISION_FULL)


def build_notification(args: argparse.Namespace, sequence: int) -> intake_pb2.Notification:
    today = dt.date.today()
    occurred = dt.date.fromisoformat(args.occurred_on) if args.occurred_on else today
    kind = KINDS[args.kind]
    birth = args.birth_date or (occurred.isoformat() if kind == common_pb2.CHANGE_KIND_BIRTH else "1980-01-01")
    place = domain.municipality(args.municipality)
    return intake_pb2.Notification(
        notification_id=args.notification_id or str(uuid.uuid4()),
        municipality_code=args.municipality,
        sequence=sequence,
        change_kind=kind,
        resident_code=args.resident_code or domain.generate_resident_code(random.SystemRandom()),
        new_resident_code=args.new_resident_code,
        resident_kind=common_pb2.RESIDENT_KIND_FOREIGN if args.foreign else common_pb2.RESIDENT_KIND_JAPANESE,
        name=common_pb2.PersonName(
            family_name=args.family_name, given_name=args.given_name, family_name_kana=args.family_name_kana,
            given_name_kana=args.given_name_kana, alphabetic_name=args.alphabetic_name,
            common_name=args.common_name,
        ),
        birth_date=_date(birth, today),
        sex=common_pb2.SEX_MALE if args.sex == "male" else common_pb2.SEX_FEMALE,
        address=common_pb2.Address(
            municipality_code=args.municipality, prefecture=place.prefecture_name if place else "",
            municipality=place.city_name if place else "", street=args.street,
        ),
        previous_municipality_code=args.from_municipality,
        next_municipality_code=args.to_municipality,
        occurred_on=_date(args.occurred_on, today),
        notified_on=_date(args.notified_on or args.occurred_on, today),
    )


async def cmd_notify(args: argparse.Namespace) -> int:
    console = _console("juki notify")
    async with MeshClient(args.data_dir, identity=f"municipality-{args.municipality}") as client:
        stub = intake_pb2_grpc.IntakeServiceStub(client.channel(f"intake-prefecture-{args.municipality[:2]}"))
        sequence = args.sequence
        if sequence is None:
            state = await stub.GetSequenceState(intake_pb2.GetSequenceStateRequest(
                municipality_code=args.municipality))
            sequence = state.highest_received_sequence + 1
        message = build_notification(args, sequence)
        response = await stub.SubmitNotifications(intake_pb2.SubmitNotificationsRequest(notifications=[message]))
    result = response.results[0]
    console.print(f"{OUTCOMES[result.outcome]}: notification {result.notification_id} sequence {result.sequence}"
                  f" resident {message.resident_code}")
    for violation in result.violations:
        console.print(f"  {violation.field}: {violation.description}")
    return 0 if result.outcome != intake_pb2.NOTIFICATION_OUTCOME_REJECTED else 1


def _instances(client: MeshClient) -> list[str]:
    services = client.endpoints["services"]
    return [name for name in sorted(services) if name.startswith("intake-")]


def _timestamp(message: Any, field: str) -> str:
    return getattr(message, field).ToDatetime().isoformat() + "Z" if message.HasField(field) else ""


async def cmd_status(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    async with MeshClient(args.data_dir, identity="operator") as client:
        for instance in _instances(client):
            stub = intake_pb2_grpc.IntakeServiceStub(client.channel(instance))
            status = await stub.GetIntakeStatus(intake_pb2.GetIntakeStatusRequest(
                municipality_codes=args.municipalities))
            tier = instance.removeprefix("intake-")
            for row in status.municipalities:
                place = domain.municipality(row.municipality_code)
                rows.append({
                    "tier": tier, "municipality_code": row.municipality_code,
                    "municipality": place.city_name if place else "", "last_sequence": row.last_sequence,
                    "connected": row.connected, "connection_since": _timestamp(row, "connection_since"),
                    "connection_reason": row.connection_reason, "outbox_backlog": row.outbox_backlog,
                    "relay_lag_ms": row.relay_lag_ms, "last_accepted_at": _timestamp(row, "last_accepted_at"),
                })
            if not status.municipalities:
                rows.append({"tier": tier, "municipality_code": "", "outbox_backlog": status.outbox_backlog,
                             "relay_lag_ms": status.relay_lag_ms})
    if args.json:
        for entry in rows:
            print(json.dumps(entry, ensure_ascii=False))
        return 0
    # Piped or redirected, rich would wrap the table to 80 columns and cut the cells; a reader of a file
    # or of `grep` wants whole rows, so only a terminal's own width limits the table.
    console = _console("juki intake status", whole_rows=not sys.stdout.isatty())
    from rich.table import Table

    table = Table(title="notification intake")
    for column in ("tier", "municipality", "last seq", "connected", "since", "reason", "backlog", "relay lag ms",
                   "last accepted"):
        table.add_column(column, overflow="fold")
    for entry in rows:
        if not entry["municipality_code"]:
            table.add_row(entry["tier"], "-", "", "", "", "", str(entry["outbox_backlog"]),
                          str(entry["relay_lag_ms"]), "")
            continue
        table.add_row(
            entry["tier"], f"{entry['municipality_code']} {entry['municipality']}", str(entry["last_sequence"]),
            "yes" if entry["connected"] else "NO", entry["connection_since"][:16].replace("T", " "),
            entry["connection_reason"], str(entry["outbox_backlog"]), str(entry["relay_lag_ms"]),
            entry["last_accepted_at"][11:19],
        )
    console.print(table)
    return 0


async def cmd_connection(args: argparse.Namespace) -> int:
    async with MeshClient(args.data_dir, identity="operator") as client:
        entry = client.endpoints["clients"]["operator"]
        request = intake_pb2.SetConnectionStateRequest(
            municipality_code=args.municipality, connected=args.connected, reason=args.reason)
        method = "/juki.intake.v1.IntakeService/SetConnectionState"
        from pathlib import Path

        password = args.password if args.password is not None else client.password
        sign_with_files(request, method, Path(entry["cert"]), Path(entry["key"]), password)
        stub = intake_pb2_grpc.IntakeServiceStub(client.channel(f"intake-prefecture-{args.municipality[:2]}"))
        response = await stub.SetConnectionState(request)
    state = "connected" if response.status.connected else "disconnected"
    _console(f"juki intake {'connect' if args.connected else 'disconnect'}").print(
        f"{args.municipality}: {state} ({response.status.connection_reason})")
    return 0



def _console(command: str, whole_rows: bool = False) -> Any:
    """rich's console on stdout (rich is in the ``cli`` extra); ``whole_rows``: no wrapping at 80 columns."""
    need("rich", "cli", command)
    from rich.console import Console

    return Console(width=1_000, soft_wrap=True) if whole_rows else Console()
