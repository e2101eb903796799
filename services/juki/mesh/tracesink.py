"""A small offline trace collector and viewer: receives OTLP/gRPC spans, keeps them, draws a trace.

``juki traces collect`` listens on loopback as an OTLP endpoint (point ``juki up --otlp`` at it) and
appends every span as one JSON line to ``<data dir>/traces/spans.jsonl``; ``juki traces show`` draws
one trace as a waterfall (SVG inside a self-contained HTML page, or text). Tests use the same
collector to prove that one trace follows a call across processes.
"""

from __future__ import annotations

import asyncio
import html
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int
    attributes: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> SpanRecord:
        return cls(**json.loads(line))


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(
        any_value
    )


def spans_from_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[SpanRecord]:
    found: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        service = next(
            (_value(a.value) for a in resource_spans.resource.attributes if a.key == "service.name"), "unknown"
        )
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                found.append(SpanRecord(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    name=span.name,
                    service=str(service),
                    kind=int(span.kind),
                    start_ns=int(span.start_time_unix_nano),
                    end_ns=int(span.end_time_unix_nano),
                    status_code=int(span.status.code),
                    attributes={a.key: _value(a.value) for a in span.attributes},
                ))
    return found


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: TraceSink) -> None:
        self.sink = sink

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.sink.add(spans_from_request(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceSink:
    """Collected spans in memory, optionally appended to a JSON-lines file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.spans: list[SpanRecord] = []
        self.server: grpc.aio.Server | None = None
        self.endpoint = ""
        self._changed = asyncio.Event()

    def add(self, spans: Iterable[SpanRecord]) -> None:
        batch = list(spans)
        self.spans.extend(batch)
        if self.path is not None and batch:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                for span in batch:
                    f.write(span.to_json() + "\n")
        self._changed.set()

    async def start(self, listen: str = "127.0.0.1:0") -> str:
        # The collector endpoint carries telemetry only, bound to loopback, as a local collector is.
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Collector(self), self.server)
        port = self.server.add_insecure_port(listen)
        await self.server.start()
        self.endpoint = f"http://{listen.rsplit(':', 1)[0]}:{port}"
        return self.endpoint

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0.5)

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> list[SpanRecord]:
        """Wait until ``predicate(spans)`` holds; return the spans."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self.spans):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"spans seen: {sorted({(s.service, s.name) for s in self.spans})}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
            except TimeoutError:
                pass
        return self.spans


def load_spans(path: Path) -> list[SpanRecord]:
    if not path.is_file():
        return []
    return [SpanRecord.from_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def traces(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    grouped: dict[str, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        grouped[span.trace_id].append(span)
    return dict(grouped)


def _ordered(spans: list[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """Spans depth-first from the roots, each with its depth."""
    children: dict[str, list[SpanRecord]] = defaultdict(list)
    ids = {s.span_id for s in spans}
    roots = []
    for span in sorted(spans, key=lambda s: s.start_ns):
        if span.parent_span_id and span.parent_span_id in ids:
            children[span.parent_span_id].append(span)
        else:
            roots.append(span)
    out: list[tuple[int, SpanRecord]] = []

    def walk(span: SpanRecord, depth: int) -> None:
        out.append((depth, span))
        for child in children[span.span_id]:
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return out


def render_text(spans: list[SpanRecord]) -> str:
    start = min(s.start_ns for s in spans)
    lines = []
    for depth, span in _ordered(spans):
        offset = (span.start_ns - start) / 1e6
        duration = (span.end_ns - span.start_ns) / 1e6
        lines.append(f"{offset:8.2f} ms {duration:8.2f} ms  {'  ' * depth}{span.service}: {span.name}")
    return "\n".join(lines)


_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]


def render_html(spans: list[SpanRecord], title: str = "trace") -> str:
    """A self-contained page with an SVG waterfall of one trace."""
    ordered = _ordered(spans)
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    total = max(end - start, 1)
    services = sorted({s.service for s in spans})
    colour = {svc: _COLOURS[i % len(_COLOURS)] for i, svc in enumerate(services)}
    label_w, bar_w, row_h = 430, 620, 26
    height = row_h * len(ordered) + 60
    rows = []
    for i, (depth, span) in enumerate(ordered):
        y = 40 + i * row_h
        x = label_w + bar_w * (span.start_ns - start) / total
        w = max(bar_w * (span.end_ns - span.start_ns) / total, 2)
        ms = (span.end_ns - span.start_ns) / 1e6
        rows.append(
            f'<text x="{8 + depth * 14}" y="{y + 16}" font-size="13">{html.escape(span.service)}: '
            f'{html.escape(span.name)}</text>'
            f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" rx="3" fill="{colour[span.service]}">'
            f"<title>{html.escape(span.name)} {ms:.2f} ms</title></rect>"
            + (
                f'<text x="{x + w + 4:.1f}" y="{y + 16}" font-size="11" fill="#444">{ms:.2f} ms</text>'
                if x + w + 70 < label_w + bar_w + 80
                else f'<text x="{x + w - 4:.1f}" y="{y + 16}" font-size="11" fill="#fff" text-anchor="end">'
                f"{ms:.2f} ms</text>"
            )
        )
    axis = (
        f'<line x1="{label_w}" y1="32" x2="{label_w + bar_w}" y2="32" stroke="#999"/>'
        f'<text x="{label_w}" y="26" font-size="11">0 ms</text>'
        f'<text x="{label_w + bar_w - 60}" y="26" font-size="11">{total / 1e6:.2f} ms</text>'
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 80}" height="{height}" '
        f'font-family="sans-serif">{axis}{"".join(rows)}</svg>'
    )
    legend = " ".join(
        f'<span style="color:{colour[s]}">&#9632;</span> {html.escape(s)}' for s in services
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2><p>{legend}</p>{svg}</body></html>"
    )
