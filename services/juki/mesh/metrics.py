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
# The certificate each server of this process serves with: SPIFFE id -> not-after (Unix seconds).
_certificates: dict[str, float] = {}


def setup(service_name: str, listen: str | None = None) -> None:
    """Configure the meter provider once per process: Prometheus on ``listen`` (host:port), OTLP by the environment."""
    global _configured
    if _configured:
        return
    _configured = True
    readers: list[MetricReader] = []
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
    # Exported from the service itself, not from cert-manager: what matters to callers is the certificate
    # the process actually serves, and a renewed Secret is only used after the pod restarts (k8s/README.md).
    meter("juki.mesh").create_observable_gauge(
        "juki.tls.certificate.not_after", callbacks=[_certificate_callback], unit="s",
        description="expiry (Unix time) of the certificate this service serves with, by SPIFFE id",
    )


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


def observe_pool(name: str, pool: Any) -> None:
    """Report an asyncpg pool's saturation (in use / idle / max) as a gauge."""
    _pools[name] = pool


def observe_certificate(certificate_pem: bytes) -> None:
    """Export the not-after of the certificate a server serves with (read once, at start)."""
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(certificate_pem)
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    identity = uris[0] if uris else certificate.subject.rfc4514_string()
    _certificates[identity] = certificate.not_valid_after_utc.timestamp()


def _certificate_callback(options: CallbackOptions) -> Iterable[Observation]:
    for identity, not_after in list(_certificates.items()):
        yield Observation(not_after, {"spiffe_id": identity})


def _pool_callback(options: CallbackOptions) -> Iterable[Observation]:
    for name, pool in list(_pools.items()):
        try:
            size, idle, maximum = pool.get_size(), pool.get_idle_size(), pool.get_max_size()
        except Exception:  # a closed pool has nothing to report
            continue
        yield Observation(size - idle, {"pool": name, "state": "in_use"})
        yield Observation(idle, {"pool": name, "state": "idle"})
        yield Observation(maximum, {"pool": name, "state": "max"})


# Bucket boundaries (milliseconds) of the RPC latency histograms: from 0.25 ms (a call on loopback that
# does nothing) to 10 s (past any deadline the mesh sets). The SDK's default boundaries (0, 5, 10, 25, 50,
# 75, 100, 250, ...) put every lookup between 5 and 10 ms in one bucket, so a p99 goal of 10 ms (lookup)
# could not be told from 5 ms; these are fine around each goal the README checks (10 ms, 50 ms, 1 s), and
# 10 ms and 50 ms are boundaries, so "is p99 within the goal" is read off one bucket's count exactly.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9, 10, 12.5, 15, 20, 25, 30, 40, 50, 75, 100,
    150, 200, 300, 500, 750, 1_000, 2_000, 5_000, 10_000,
)


class RpcMetrics:
    """Requests, latency and errors per RPC, recorded by the mesh interceptor."""

    def __init__(self) -> None:
        m = meter("juki.rpc")
        # Advisory boundaries travel with the instrument (even one created before the provider is set),
        # so every reader - Prometheus or OTLP - gets them without a View in each process's setup.
        self.duration = m.create_histogram(
            "juki.rpc.server.duration", unit="ms", description="server-side RPC latency",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self.requests = m.create_counter("juki.rpc.server.requests", description="RPCs served, by method and code")

    def record(self, method: str, code: str, millis: float) -> None:
        attributes = {"rpc.method": method, "rpc.grpc.status_code": code}
        self.duration.record(millis, attributes)
        self.requests.add(1, attributes)
