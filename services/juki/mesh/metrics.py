"""OpenTelemetry metrics, scrapeable by Prometheus.

Every service records, through the mesh interceptor, requests, latency and errors per RPC. Services add
their own instruments (batch sizes, relay lag, access-log backlog) with :func:`meter`, and register
their database pool with :func:`observe_pool` for saturation. With ``JUKI_METRICS_LISTEN`` set
(``host:port``), ``/metrics`` is served in the Prometheus text format; with
``OTEL_METRICS_EXPORTER=otlp`` metrics are also pushed to the OTLP endpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

log = logging.getLogger(__name__)

_configured = False
_pools: dict[str, Any] = {}


def setup(service_name: str) -> None:
    """Configure the meter provider once per process (readers chosen by the environment)."""
    global _configured
    if _configured:
        return
    _configured = True
    readers: list[MetricReader] = []
    listen = os.environ.get("JUKI_METRICS_LISTEN")
    if listen:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0")
        readers.append(PrometheusMetricReader())
        log.info("metrics on http://%s/metrics", listen)
    if os.environ.get("OTEL_METRICS_EXPORTER", "").lower() == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name),
                                "service.namespace": "juki"})
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    meter("juki.mesh").create_observable_gauge(
        "juki.db.pool.connections", callbacks=[_pool_callback], unit="{connection}",
        description="database pool connections by state (in use, idle, max)",
    )


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


def observe_pool(name: str, pool: Any) -> None:
    """Report an asyncpg pool's saturation (in use / idle / max) as a gauge."""
    _pools[name] = pool


def _pool_callback(options: CallbackOptions) -> Iterable[Observation]:
    for name, pool in list(_pools.items()):
        try:
            size, idle, maximum = pool.get_size(), pool.get_idle_size(), pool.get_max_size()
        except Exception:  # a closed pool has nothing to report
            continue
        yield Observation(size - idle, {"pool": name, "state": "in_use"})
        yield Observation(idle, {"pool": name, "state": "idle"})
        yield Observation(maximum, {"pool": name, "state": "max"})


class RpcMetrics:
    """Requests, latency and errors per RPC, recorded by the mesh interceptor."""

    def __init__(self) -> None:
        m = meter("juki.rpc")
        self.duration = m.create_histogram(
            "juki.rpc.server.duration", unit="ms", description="server-side RPC latency",
        )
        self.requests = m.create_counter("juki.rpc.server.requests", description="RPCs served, by method and code")

    def record(self, method: str, code: str, millis: float) -> None:
        attributes = {"rpc.method": method, "rpc.grpc.status_code": code}
        self.duration.record(millis, attributes)
        self.requests.add(1, attributes)
