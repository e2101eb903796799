"""OpenTelemetry tracing and structured logs that carry the trace id.

The exporter is chosen by the standard variables: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console`` or
``none``) and ``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``. When neither is
set, nothing is exported. ``OTEL_SERVICE_NAME`` names the process; the mesh sets it per service.

Which spans are recorded is the sampler's choice, set by the standard ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` (for example ``parentbased_traceidratio`` with ``0.01``). When the first is not
set, the sampler is parent-based: a call whose caller sampled its trace is recorded; a call starting a
trace is recorded when spans are exported, and not recorded when nothing would export them (recording a
span nobody reads costs a busy service a large share of its CPU). A span that is not recorded still has
its ids: W3C context still crosses every hop, and logs and access-log records still carry the trace id.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler

_configured = False


def _choose_exporter() -> SpanExporter | None:
    choice = os.environ.get("OTEL_TRACES_EXPORTER")
    if not choice:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        choice = "otlp" if endpoint else "none"
    choice = choice.split(",")[0].strip().lower()
    if choice == "none":
        return None
    if choice == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    if choice == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        if protocol != "grpc":
            logging.getLogger(__name__).warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s unsupported; using grpc", protocol)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={choice!r} is not supported (otlp, console, none)")


def setup(service_name: str) -> None:
    """Configure tracing and logging once per process."""
    if setup_tracing(service_name):
        configure_logging(service_name)


def setup_tracing(service_name: str) -> bool:
    """Configure the tracer provider once per process; False if it was already configured."""
    global _configured
    if _configured:
        return False
    _configured = True
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name),
                                "service.namespace": "juki"})
    exporter = _choose_exporter()
    provider = TracerProvider(resource=resource, sampler=choose_sampler(exporter is not None))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def choose_sampler(exporting: bool) -> Sampler | None:
    """The sampler of this process: ``None`` (the SDK reads ``OTEL_TRACES_SAMPLER``/``_ARG``) when the
    variable is set; otherwise parent-based, starting traces recorded only when spans are exported."""
    if os.environ.get("OTEL_TRACES_SAMPLER", "").strip():
        return None
    return ParentBased(ALWAYS_ON if exporting else ALWAYS_OFF)


def recording() -> bool:
    """Whether the current span is recorded: inner spans of a call that is not sampled are not started."""
    return trace.get_current_span().is_recording()


def export_requested() -> bool:
    """Whether the standard ``OTEL_*`` variables ask for spans to be exported from this process."""
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")[0].strip().lower()
    if choice:
        return choice != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup_client(spiffe_id: str) -> None:
    """Make a command-line client a traced client when the ``OTEL_*`` variables ask for export.

    Its calls then start CLIENT spans (the channels' interceptors) that the services' spans join, so a
    trace begins at the caller. The service name is the caller's identity (``agency-jps-client`` for
    ``spiffe://juki.local/agency/jps``) unless ``OTEL_SERVICE_NAME`` says otherwise. Logging is left as the
    command set it: a CLI prints for people, not JSON lines.
    """
    if export_requested():
        identity = spiffe_id.removeprefix("spiffe://").split("/", 1)[-1].replace("/", "-")
        setup_tracing(f"{identity}-client")


def shutdown() -> None:
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that start a client span and inject W3C ``traceparent`` into metadata."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


_SERVER_TRACER: trace.Tracer | None = None


def start_server_span(
    method: str, metadata: Any, attributes: dict[str, str]
) -> trace.Span:
    """A SERVER span for one RPC, child of the caller's W3C ``traceparent`` (from gRPC metadata)."""
    global _SERVER_TRACER
    if _SERVER_TRACER is None:
        _SERVER_TRACER = trace.get_tracer("juki.rpc")
    carrier = {key: value for key, value in (metadata or ()) if key in ("traceparent", "tracestate")}
    parent = propagate.extract(carrier) if carrier else None
    return _SERVER_TRACER.start_span(method, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)


def activate(span: trace.Span) -> Any:
    """Make ``span`` current for the rest of the call; returns the token for :func:`end_server_span`."""
    return otel_context.attach(trace.set_span_in_context(span))


def end_server_span(span: trace.Span, token: Any, code: str) -> None:
    span.set_attribute("rpc.grpc.status_code", code)
    if code not in ("OK", "NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED", "ALREADY_EXISTS",
                    "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"):
        span.set_status(trace.Status(trace.StatusCode.ERROR, code))
    span.end()
    try:
        otel_context.detach(token)
    except ValueError:  # detached in another context (a stream finished by another task): harmless
        pass


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the trace and span id of the current span."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ctx = trace.get_current_span().get_span_context()
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
            entry["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def route_native_stderr(path: str) -> None:
    """Send what gRPC's C core writes to file descriptor 2 into ``path``; Python keeps the old stderr.

    The C core logs straight to fd 2 (``I1202 ... Handshake failed ...``), bypassing Python's logging,
    and under ``juki up`` fd 2 is the service's JSON log. Python's own stderr (the JSON handler, an
    uncaught traceback) moves to a duplicate of the original descriptor, so the service log keeps only
    JSON lines and the C core's lines land in their own file. Call it before logging is configured.
    """
    original = os.dup(2)
    native = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(native, 2)
    os.close(native)
    sys.stderr = open(original, "w", buffering=1, encoding="utf-8", errors="backslashreplace")


def configure_logging(service: str, level: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("JUKI_LOG_LEVEL", "INFO").upper())
    for noisy in ("asyncio", "grpc._cython", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
