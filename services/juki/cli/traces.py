"""``juki traces``: an offline OTLP collector and a waterfall view of one trace."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from juki.cli.main import add_data_dir
from juki.mesh.errors import SettingsError
from juki.mesh.settings import default_data_dir
from juki.mesh.supervisor import wait_for_signals
from juki.mesh.tracesink import TraceSink, load_spans, render_html, render_text, traces


def register(sub: Any) -> None:
    parser = sub.add_parser("traces", help="collect traces offline (OTLP/gRPC) and show one as a waterfall")
    add_data_dir(parser)
    verbs = parser.add_subparsers(dest="traces_command", required=True)
    collect = verbs.add_parser("collect", help="listen for OTLP/gRPC spans (point `juki up --otlp` here)")
    collect.add_argument("--listen", default="127.0.0.1:4317")
    collect.set_defaults(func=cmd_collect)
    show = verbs.add_parser("show", help="draw a trace (default: the latest one that reached the access log)")
    show.add_argument("trace_id", nargs="?")
    show.add_argument("--format", choices=("text", "html"), default="text")
    show.add_argument("--out", type=Path)
    show.set_defaults(func=cmd_show)
    listing = verbs.add_parser("list", help="list collected traces")
    listing.set_defaults(func=cmd_list)


def _spans_file(args: argparse.Namespace) -> Path:
    return (args.data_dir or default_data_dir()).expanduser() / "traces" / "spans.jsonl"


async def cmd_collect(args: argparse.Namespace) -> int:
    sink = TraceSink(_spans_file(args))
    endpoint = await sink.start(args.listen)
    print(f"collecting OTLP/gRPC spans on {endpoint} into {sink.path}; Ctrl-C to stop")
    stop = asyncio.Event()
    wait_for_signals(stop)
    await stop.wait()
    await sink.stop()
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for trace_id, spans in traces(load_spans(_spans_file(args))).items():
        services = sorted({s.service for s in spans})
        root = min(spans, key=lambda s: s.start_ns)
        print(f"{trace_id}  {len(spans):3d} spans  {root.name}  [{', '.join(services)}]")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    grouped = traces(load_spans(_spans_file(args)))
    if not grouped:
        raise SettingsError(f"no spans collected in {_spans_file(args)} (run `juki traces collect` first)")
    if args.trace_id:
        if args.trace_id not in grouped:
            raise SettingsError(f"no trace {args.trace_id}")
        spans = grouped[args.trace_id]
    else:
        spans = max(grouped.values(), key=lambda group: (len({s.service for s in group}), max(s.end_ns for s in group)))
    if args.format == "html":
        page = render_html(spans, title=f"trace {spans[0].trace_id}")
        if args.out:
            args.out.write_text(page, encoding="utf-8")
            print(f"wrote {args.out}")
        else:
            print(page)
    else:
        print(render_text(spans))
    return 0
