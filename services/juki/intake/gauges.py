"""Gauges of a prefecture intake for the people on call: connection state and the relay's backlog.

The states live in PostgreSQL, and a gauge's callback runs synchronously inside a scrape, so a background
task samples them every few seconds and the callbacks report the last sample. A scrape therefore never
waits on the database, and the figures are at most one interval old (alerts wait minutes, not seconds).

Exported (Prometheus names):

- ``juki_intake_municipality_connected{prefecture, municipality}``: 1 connected, 0 cut off
  (``juki intake disconnect``);
- ``juki_intake_municipality_connection_changed_seconds{prefecture, municipality}``: when that state
  last changed (Unix time), so "disconnected for more than an hour" is one expression;
- ``juki_intake_outbox_backlog{prefecture}``: notifications not yet acknowledged by the national intake;
- ``juki_intake_outbox_oldest_age_seconds{prefecture}``: age of the oldest of them (0 when empty). The
  relay lag histogram records a notification only once it is acknowledged, so a relay that is stuck
  records nothing; this gauge keeps growing instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Observation

from juki.intake.store import Store
from juki.mesh import metrics
from juki.mesh.outage import Outage
from juki.mesh.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True)
class _Connection:
    municipality_code: str
    connected: bool
    changed: float  # Unix time


@dataclass(frozen=True)
class Sample:
    connections: tuple[_Connection, ...] = ()
    backlog: int = 0
    oldest_age_seconds: float = 0.0


class IntakeGauges:
    """Samples a prefecture intake's state and exports it as gauges."""

    def __init__(self, store: Store, prefecture: str, interval: float = SAMPLE_INTERVAL_SECONDS) -> None:
        self._store = store
        self._prefecture = prefecture
        self._interval = interval
        self._sample: Sample | None = None  # nothing is reported before the first sample
        self._task: asyncio.Task[None] | None = None
        self._outage = Outage("the database (intake gauges)", log)
        meter = metrics.meter("juki.intake")
        meter.create_observable_gauge(
            "juki.intake.municipality.connected", callbacks=[self._connected],
            description="1 when the municipality is connected to its prefecture, 0 when cut off")
        meter.create_observable_gauge(
            "juki.intake.municipality.connection_changed", callbacks=[self._changed], unit="s",
            description="when the municipality's connection state last changed (Unix time)")
        meter.create_observable_gauge(
            "juki.intake.outbox.backlog", callbacks=[self._backlog], unit="{notification}",
            description="notifications waiting to be acknowledged by the national intake")
        meter.create_observable_gauge(
            "juki.intake.outbox.oldest_age", callbacks=[self._oldest], unit="s",
            description="age of the oldest notification waiting to be relayed (0 when none waits)")

    async def sample(self) -> Sample:
        """Read the state once (also what the background task does every interval)."""
        rows = await self._store.pool.fetch(
            "SELECT municipality_code, connected, extract(epoch FROM connection_changed)::float8 AS changed"
            " FROM municipalities ORDER BY municipality_code")
        backlog, lag_ms = await self._store.outbox_totals()
        self._sample = Sample(
            connections=tuple(_Connection(r["municipality_code"], r["connected"], r["changed"]) for r in rows),
            backlog=backlog, oldest_age_seconds=lag_ms / 1000,
        )
        return self._sample

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="intake-gauges")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
                self._outage.succeeded()
            except Exception as exc:  # the last sample stays; the database's own alerts say why
                self._outage.failed(exc)
            await asyncio.sleep(self._interval)

    def _labels(self, municipality_code: str | None = None) -> dict[str, str]:
        labels = {"prefecture": self._prefecture}
        if municipality_code is not None:
            labels["municipality"] = municipality_code
        return labels

    def _connected(self, options: CallbackOptions) -> Iterable[Observation]:
        for row in self._sample.connections if self._sample else ():
            yield Observation(1 if row.connected else 0, self._labels(row.municipality_code))

    def _changed(self, options: CallbackOptions) -> Iterable[Observation]:
        for row in self._sample.connections if self._sample else ():
            yield Observation(row.changed, self._labels(row.municipality_code))

    def _backlog(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._sample is not None:
            yield Observation(self._sample.backlog, self._labels())

    def _oldest(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._sample is not None:
            yield Observation(self._sample.oldest_age_seconds, self._labels())
