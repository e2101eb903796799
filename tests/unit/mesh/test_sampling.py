"""Which spans a service records: parent-based, the standard OTEL_TRACES_SAMPLER variables first."""

from __future__ import annotations

import pytest
from juki.mesh import telemetry
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased, _get_from_env_or_default
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags


def _tracer(exporting: bool) -> trace.Tracer:
    return TracerProvider(sampler=telemetry.choose_sampler(exporting)).get_tracer("test")


def _remote_parent(sampled: bool) -> Context:
    context = SpanContext(trace_id=0x1234, span_id=0x99, is_remote=True,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))
    return trace.set_span_in_context(NonRecordingSpan(context))


@pytest.fixture(autouse=True)
def _no_sampler_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)


def test_a_trace_started_here_is_not_recorded_when_nothing_exports_but_keeps_its_ids() -> None:
    span = _tracer(exporting=False).start_span("call")
    assert not span.is_recording()
    assert span.get_span_context().is_valid  # logs and access-log records still carry the trace id


def test_a_trace_started_here_is_recorded_when_spans_are_exported() -> None:
    assert _tracer(exporting=True).start_span("call").is_recording()


@pytest.mark.parametrize("exporting", [False, True])
def test_the_callers_sampling_decision_is_followed(exporting: bool) -> None:
    tracer = _tracer(exporting)
    sampled = tracer.start_span("call", context=_remote_parent(True))
    assert sampled.is_recording() and sampled.get_span_context().trace_id == 0x1234
    assert not tracer.start_span("call", context=_remote_parent(False)).is_recording()


def test_the_standard_variables_choose_the_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    assert telemetry.choose_sampler(False) is None  # left to the SDK, which reads both variables
    chosen = _get_from_env_or_default()
    assert isinstance(chosen, ParentBased)
    root = chosen._root
    assert isinstance(root, TraceIdRatioBased) and root.rate == 0.25


def test_inner_spans_are_started_only_for_a_recorded_call() -> None:
    tracer = _tracer(exporting=False)
    with trace.use_span(tracer.start_span("call"), end_on_exit=True):
        assert not telemetry.recording()
    with trace.use_span(tracer.start_span("call", context=_remote_parent(True)), end_on_exit=True):
        assert telemetry.recording()
