"""Lookup's own faults in a healthy mesh: the provision stream to the real access log closing when idle,
refused or torn down, and a VerifyBatch stream aborted with work in its pipeline. None may leave a task
whose exception nobody collects ("Task exception was never retrieved"), and every message must say
what really happened."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki._gen.juki.common.v1 import common_pb2
from juki._gen.juki.lookup.v1 import lookup_pb2
from juki.lookup import provisions
from juki.lookup.app import METHODS, SERVICE_NAME, LookupApp
from juki.lookup.provisions import ProvisionLog
from juki.lookup.service import MAX_VERIFY_ITEMS, LookupServicer
from juki.mesh.errors import JukiError, Reason
from juki.mesh.methods import CallMethod, current_method
from juki.mesh.tls import Peer, current_peer, secure_channel

from tests.conftest import running, tls_for
from tests.integration.lookup.conftest import Mesh, add_resident, fresh_code
from tests.integration.lookup.test_lookup import PENSION
from tests.loop_watch import loop_errors

pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]


def _provision(code: str) -> bytes:
    record = accesslog_pb2.ProvisionRecord(
        recipient="spiffe://juki.local/agency/jps", recipient_name="日本年金機構", purpose=PENSION,
        query_mode=common_pb2.QUERY_MODE_BY_CODE, provider_tier=common_pb2.TIER_NATIONAL,
        provider="spiffe://juki.local/service/lookup", resident_code=code,
        outcome=accesslog_pb2.PROVISION_OUTCOME_PROVIDED,
    )
    record.provided_at.GetCurrentTime()
    return record.SerializeToString()


def _log_channel(mesh: Mesh, kind: str, name: str, address: str) -> grpc.aio.Channel:
    """A channel to the access log as the lookup service opens it: mTLS, no per-message tracing."""
    return secure_channel(address, tls_for(mesh.ca, kind, name), interceptors=[])


def _warnings(caplog: pytest.LogCaptureFixture, logger: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith(logger)]


async def _stream_closed(log: ProvisionLog) -> None:
    """Wait until the sender has ended its stream (after IDLE_SECONDS without traffic, or a failure)."""
    task = log._task  # the sender of the stream opened by the last record()
    assert task is not None
    await asyncio.wait({task})


async def test_an_idle_provision_stream_closes_without_any_error(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(provisions, "IDLE_SECONDS", 0.05)
    channel = _log_channel(mesh, "service", "lookup", mesh.accesslog)
    log = ProvisionLog(channel)
    try:
        caplog.set_level(logging.DEBUG, logger="juki.lookup.provisions")
        async with loop_errors() as errors:
            # What earlier tests left as garbage was collected, and reported by the loop's default
            # handler, as the block began: not this test's.
            caplog.clear()
            code = fresh_code()
            await log.record([_provision(code)])
            await _stream_closed(log)
            # The next burst opens a fresh stream and is logged as usual.
            await log.record([_provision(code)])
            await _stream_closed(log)
    finally:
        await log.close()
        await channel.close()
    assert errors == []
    assert _warnings(caplog) == []
    assert log.stats.failures == 0 and log.stats.batches == 2
    assert len(await mesh.provisions(code)) == 2


async def test_stopping_with_an_open_provision_stream_leaves_no_error(mesh: Mesh) -> None:
    channel = _log_channel(mesh, "service", "lookup", mesh.accesslog)
    log = ProvisionLog(channel)
    async with loop_errors() as errors:
        await log.record([_provision(fresh_code())])
        await log.close()  # what LookupApp.stop does, well within IDLE_SECONDS of the last record
        await channel.close()
    assert errors == []


async def test_a_refused_provision_stream_says_it_was_refused(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    # An agency may not append to the access log: the log refuses the stream itself.
    channel = _log_channel(mesh, "agency", "jps", mesh.accesslog)
    log = ProvisionLog(channel)
    try:
        caplog.set_level(logging.WARNING, logger="juki.lookup.provisions")
        async with loop_errors() as errors:
            with pytest.raises(JukiError) as failed:
                await log.record([_provision(fresh_code())])
            await _stream_closed(log)
    finally:
        await log.close()
        await channel.close()
    assert failed.value.reason is Reason.ACCESS_LOG_UNAVAILABLE
    assert errors == []
    (warning,) = _warnings(caplog, "juki.lookup")
    assert "PERMISSION_DENIED" in warning and "acknowledge" not in warning


async def test_a_torn_down_provision_stream_says_so_and_the_next_request_fails_cleanly(
    mesh: Mesh, caplog: pytest.LogCaptureFixture,
) -> None:
    from juki.accesslog import app as accesslog_app

    settings = mesh.accesslog_settings
    caplog.set_level(logging.WARNING, logger="juki.lookup.provisions")
    async with loop_errors() as errors:
        async with running(settings, accesslog_app.create(settings)) as address:
            channel = _log_channel(mesh, "service", "lookup", address)
            log = ProvisionLog(channel)
            await log.record([_provision(fresh_code())])
            sender = log._task
        # The log went away under an open, idle stream.
        assert sender is not None
        await asyncio.wait({sender})
        with pytest.raises(JukiError) as failed:
            await log.record([_provision(fresh_code())])
        await _stream_closed(log)
        await log.close()
        await channel.close()
    assert failed.value.reason is Reason.ACCESS_LOG_UNAVAILABLE
    assert errors == []
    warnings = _warnings(caplog, "juki.lookup")
    assert warnings and not any("acknowledge" in warning for warning in warnings), warnings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def servicer(mesh: Mesh) -> AsyncIterator[LookupServicer]:
    """The lookup servicer itself (real pool, real access log), to drive a stream step by step."""
    app = LookupApp(mesh.lookup_settings())
    (binding,) = await app.start()
    yield binding.servicer
    await app.stop()


async def test_an_aborted_verify_stream_leaves_no_task_of_its_pipeline_behind(
    mesh: Mesh, servicer: LookupServicer,
) -> None:
    code = await add_resident(mesh.database)
    item = lookup_pb2.VerifyItem(item_id=1, resident_code=code)
    fifth_sent = asyncio.Event()

    async def requests() -> AsyncIterator[lookup_pb2.VerifyBatchRequest]:
        yield lookup_pb2.VerifyBatchRequest(purpose=PENSION, items=[item])
        for _ in range(3):
            yield lookup_pb2.VerifyBatchRequest(items=[item])
        fifth_sent.set()
        # The fifth message cannot be verified (too many items): its task fails as soon as it runs.
        yield lookup_pb2.VerifyBatchRequest(items=[item] * (MAX_VERIFY_ITEMS + 1))
        await asyncio.Event().wait()  # and the client sends nothing more

    # What the mesh interceptor sets for a call: the verified peer and the method's row of the table.
    token = current_peer.set(Peer("spiffe://juki.local/agency/jps", "agency", "jps", 0))
    path = f"/{SERVICE_NAME}/VerifyBatch"
    method_token = current_method.set(CallMethod(path, SERVICE_NAME, "VerifyBatch", METHODS["VerifyBatch"]))
    try:
        async with loop_errors() as errors:
            answers = servicer.VerifyBatch(requests(), None)  # type: ignore[arg-type]
            first = lookup_pb2.VerifyBatchResponse.FromString(await answers.__anext__())
            assert first.results[0].status == lookup_pb2.VERIFY_STATUS_CURRENT
            # The client reads no further: messages 2-4 wait answered in the pipeline, and the task of
            # the fifth was started while the pipeline was full. Then the client goes away.
            await fifth_sent.wait()
            await answers.aclose()  # type: ignore[attr-defined]
            for _ in range(5):  # let whatever is left run its course
                await asyncio.sleep(0)
    finally:
        current_method.reset(method_token)
        current_peer.reset(token)
    # Neither an exception never retrieved nor a task destroyed while still pending.
    assert errors == []

