"""A whole local mesh (``juki up``'s supervisor: one process per service) for end-to-end tests.

Services export their spans to an in-test OTLP collector, so tests can follow one trace across processes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from juki.mesh.supervisor import Supervisor
from juki.mesh.tracesink import TraceSink

from tests.faults import loop_errors

POPULATION = 300


@pytest.fixture(scope="session")
async def trace_sink() -> AsyncIterator[TraceSink]:
    sink = TraceSink()
    await sink.start()
    yield sink
    await sink.stop()


@pytest.fixture(scope="session")
async def mesh(trace_sink: TraceSink) -> AsyncIterator[Supervisor]:
    from juki.seeding.registers import seed_population

    data_dir = Path(tempfile.mkdtemp(prefix="juki-e2e-"))
    supervisor = Supervisor(
        data_dir,
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": trace_sink.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    await supervisor.prepare()
    try:
        await supervisor.start()
        await seed_population(supervisor, POPULATION, 1, echo=lambda line: None)
        yield supervisor
        await supervisor.stop()
        found = loop_errors(data_dir)
        assert not found, "services left asyncio errors uncollected:\n" + "\n".join(found[:20])
    finally:
        await supervisor.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
