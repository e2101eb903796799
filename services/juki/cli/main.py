"""The ``juki`` command: one entry point, a module per group of verbs.

Each module in :data:`COMMAND_MODULES` has ``register(subparsers)``, which adds its verbs and sets
``func`` (a coroutine function or a plain function taking the parsed arguments) on each.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from juki.mesh.errors import JukiError, SettingsError, from_grpc_error
from juki.mesh.settings import default_data_dir

COMMAND_MODULES = (
    "juki.cli.infra",
    "juki.cli.demo",
    "juki.cli.agency",
    "juki.cli.intake",
    "juki.cli.card",
    "juki.cli.disclose",
    "juki.cli.audit",
    "juki.cli.proof",
    "juki.cli.bench",
    "juki.cli.traces",
)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help=f"the local mesh's data directory (default: $JUKI_DATA_DIR or {default_data_dir()})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="juki",
        description="Juki-net mesh: the Basic Resident Registration Network as a mutual-TLS gRPC mesh.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in load_modules(COMMAND_MODULES):
        module.register(sub)
    data_dir_after_every_verb(parser)
    return parser


def data_dir_after_every_verb(parser: argparse.ArgumentParser, inherited: bool = False) -> None:
    """Let every verb below a parser that takes ``--data-dir`` take it too, so it may follow any verb.

    ``juki pki issue agency mofa --data-dir D`` and ``juki pki --data-dir D issue agency mofa`` mean the
    same. The copies default to SUPPRESS: a sub-verb given no ``--data-dir`` keeps the one before it
    instead of resetting it to the default.
    """
    inherited = inherited or "--data-dir" in parser._option_string_actions
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            if inherited and "--data-dir" not in child._option_string_actions:
                child.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                                   help="the local mesh's data directory (may also come before the verb)")
            data_dir_after_every_verb(child, inherited)


def load_modules(names: Sequence[str]) -> list[Any]:
    """Import the verb modules (of ``juki`` or of ``juki bench``); a missing one is an error, not a gap."""
    return [importlib.import_module(name) for name in names]


def format_rpc_error(exc: grpc.RpcError) -> str:
    """A failed call as the command line shows it: status, reason, field violations and retry delay."""
    remote = from_grpc_error(exc)
    lines = [f"error: {remote.code.name}: {remote.message}"]
    if remote.reason_name:
        lines.append(f"  reason: {remote.reason_name}")
    lines.extend(f"  {violation.field}: {violation.description}" for violation in remote.violations)
    if remote.retry_after_seconds is not None:
        lines.append(f"  retry after {remote.retry_after_seconds:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except (SettingsError, JukiError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(format_rpc_error(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        # Spans are exported in batches from a background thread: flush them before the process exits.
        from juki.mesh import telemetry

        telemetry.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
