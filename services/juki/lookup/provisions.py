"""Group commit of provision records to the access-log service.

Every answer of the lookup service waits until the provision records it carries are durable in the
access log. Concurrent requests enqueue their records; one sender task takes everything queued, sends
it as one batch on a single ``AppendStream`` call and keeps going while acknowledgements come back
(they arrive in order). Each waiter resumes when the acknowledgement of its batch arrives. Under load a
batch holds the records of every request that arrived during the previous round trip, so the cost of
durability is shared instead of paid per call.

When the access log cannot be reached, or does not acknowledge in time, every waiting request fails
with ``ACCESS_LOG_UNAVAILABLE`` and nothing is provided; the stream is reopened for the next request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from juki._gen.juki.accesslog.v1 import accesslog_pb2
from juki.mesh import metrics, wire
from juki.mesh.errors import JukiError, Reason
from juki.mesh.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Records per AppendStream message; one caller's records are never split (a verification batch stays
# one access-log call), so a single large caller can exceed this.
MAX_BATCH_RECORDS = 20_000
# Batches sent and not yet acknowledged; more overlaps round trips, fewer makes bigger batches.
MAX_IN_FLIGHT = 4
# A second batch goes out before the first is acknowledged only when this many records wait.
PIPELINE_RECORDS = 1_000
# An idle stream is closed after this long and reopened by the next request.
IDLE_SECONDS = 30.0


APPEND_STREAM = "/juki.accesslog.v1.AccessLogService/AppendStream"


_APPEND = wire.tags(accesslog_pb2.AppendStreamRequest)


def _append_stream_request(batch_id: str, records: Sequence[bytes], traceparent: str = "") -> bytes:
    """An ``AppendStreamRequest`` written directly from serialised records.

    Records are built from per-call templates as bytes (see ``service.Authorised``), so a batch of
    thousands is joined here instead of being parsed into messages and serialised again. The traceparent
    is the trace the log's work on this batch continues.
    """
    return b"".join((
        wire.text(_APPEND["batch_id"], batch_id),
        wire.repeated_messages(_APPEND["records"], records),
        wire.text(_APPEND["traceparent"], traceparent),
    ))


def _passthrough(request: bytes) -> bytes:
    return request


_BATCH_RECORDS = metrics.meter("juki.lookup").create_histogram(
    "juki.lookup.provision_batch.records", unit="{record}",
    description="provision records per group-committed access-log batch",
)


@dataclass
class _Pending:
    records: Sequence[bytes]
    future: asyncio.Future[None]
    traceparent: str = ""


def _current_traceparent() -> str:
    """The W3C traceparent of the caller's span, carried to the access log with the batch."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


@dataclass
class _Batch:
    batch_id: str
    waiters: list[_Pending] = field(default_factory=list)
    count: int = 0
    sent_at: float = 0.0


@dataclass
class _Stream:
    """One AppendStream call and what is in flight on it."""

    call: grpc.aio.StreamStreamCall
    in_flight: collections.deque[_Batch] = field(default_factory=collections.deque)
    # Set by the watchdog before it cancels the call, so that the reader can say why the call ended.
    timed_out: bool = False


def _collect(task: asyncio.Task[None]) -> None:
    """Done callback: retrieve a helper task's exception, so that none is left "never retrieved".

    Where a helper's failure matters it has already been acted on (the sender re-raises the reader's
    error from ``reader.result()``); what is left here are failures after the stream was given up.
    """
    if not task.cancelled() and (error := task.exception()) is not None:
        log.debug("access log stream helper %s ended with %r", task.get_name(), error)


def _describe(error: BaseException) -> str:
    """A short, truthful account of why the stream ended, for the log."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"the access log ended the stream with {error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


@dataclass
class ProvisionLogStats:
    """Counters for metrics and benchmarks."""

    batches: int = 0
    records: int = 0
    failures: int = 0
    timeouts: int = 0


class ProvisionLog:
    """Client of ``AccessLogService.AppendStream`` with group commit; one per lookup process."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        ack_timeout: float = 5.0,
        max_batch_records: int = MAX_BATCH_RECORDS,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._append_stream = channel.stream_stream(
            APPEND_STREAM, request_serializer=_passthrough,
            response_deserializer=accesslog_pb2.AppendStreamResponse.FromString,
        )
        self._ack_timeout = ack_timeout
        self._max_batch_records = max_batch_records
        self._max_in_flight = max_in_flight
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_records = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = ProvisionLogStats()

    async def record(self, records: Sequence[bytes]) -> None:
        """Return once ``records`` (serialised ProvisionRecords) are durable in the access log; raise
        ACCESS_LOG_UNAVAILABLE otherwise.

        The acknowledgement timeout is enforced once, by the stream's reader, not per waiter: a
        stream that stops acknowledging fails every waiter together.
        """
        if not records:
            return
        if self._closed:
            raise JukiError(Reason.ACCESS_LOG_UNAVAILABLE, "the lookup service is stopping")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append(_Pending(records, future, _current_traceparent()))
        self._queued_records += len(records)
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._start_sender(loop)
        await future

    def _start_sender(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._run(), name="provision-log")
        self._task.add_done_callback(self._sender_done)

    @staticmethod
    def _sender_done(task: asyncio.Task[None]) -> None:
        # _run handles every failure of the stream itself; anything else is a fault of this module.
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("the provision log sender failed", exc_info=error)

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait(self._task)
        self._fail_all(self._queue, "the lookup service is stopping")
        self._queue.clear()
        self._queued_records = 0

    # -- the sender -----------------------------------------------------------------------------------

    def _take_batch(self) -> _Batch:
        batch = _Batch(uuid.uuid4().hex)
        while self._queue:
            pending = self._queue[0]
            if batch.waiters and batch.count + len(pending.records) > self._max_batch_records:
                break
            self._queue.popleft()
            self._queued_records -= len(pending.records)
            if pending.future.done():  # its caller gave up (deadline): do not log what was not provided
                continue
            batch.waiters.append(pending)
            batch.count += len(pending.records)
        return batch

    async def _run(self) -> None:
        """Open one stream and pump batches until it fails or stays idle."""
        loop = asyncio.get_running_loop()
        stream = _Stream(self._append_stream(wait_for_ready=False))
        call, in_flight = stream.call, stream.in_flight
        reader = loop.create_task(self._read_acks(stream), name="provision-log-acks")
        reader.add_done_callback(_collect)
        reader.add_done_callback(lambda _: self._wakeup.set())
        watching = loop.create_task(self._watchdog(stream, reader), name="provision-log-watchdog")
        watching.add_done_callback(_collect)
        failed = False
        idle = False
        try:
            while True:
                if reader.done():
                    reader.result()  # raises what broke the stream
                    break  # the log ended the stream cleanly: open a new one for what is queued
                if not self._ready_to_send(in_flight):
                    self._wakeup.clear()
                    if in_flight or self._queue:
                        await self._wakeup.wait()
                        continue
                    try:  # idle: keep the stream a while for the next burst, then end it
                        await asyncio.wait_for(self._wakeup.wait(), IDLE_SECONDS)
                    except TimeoutError:
                        idle = True
                        break
                    continue
                batch = self._take_batch()
                if not batch.waiters:
                    continue
                traceparent = batch.waiters[0].traceparent
                if len(batch.waiters) == 1:
                    request = _append_stream_request(batch.batch_id, batch.waiters[0].records, traceparent)
                else:
                    request = _append_stream_request(
                        batch.batch_id, [record for pending in batch.waiters for record in pending.records],
                        traceparent,
                    )
                batch.sent_at = loop.time()
                in_flight.append(batch)
                await call.write(request)
                self.stats.batches += 1
                self.stats.records += batch.count
                _BATCH_RECORDS.record(batch.count)
            if not reader.done():
                # Half-close: the log acknowledges what is in flight, then ends its side. Waiting for
                # that end closes the stream cleanly; cancelling it instead would look like a failure.
                with contextlib.suppress(Exception):  # a call that already failed: the reader says why
                    await call.done_writing()
                if in_flight:
                    await reader  # the watchdog bounds this wait
                elif idle:
                    await asyncio.wait({reader}, timeout=self._ack_timeout)
                    if reader.done():
                        reader.result()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: everyone waiting fails, nothing is provided
            failed = True
            self.stats.failures += 1
            # The reader knows best why the stream ended (a write fails only because the call did).
            cause = reader.exception() if reader.done() and not reader.cancelled() else None
            log.warning("access log stream failed: %s", _describe(cause or exc))
        finally:
            watching.cancel()
            if not reader.done():
                reader.cancel()
            call.cancel()
            for batch in in_flight:
                self._fail_all(batch.waiters, "the access log is unavailable; nothing was provided")
            if self._queue and not self._closed:
                if failed:
                    # Requests queued while the stream broke fail too; the next request opens a new one.
                    self._fail_all(self._queue, "the access log is unavailable; nothing was provided")
                    self._queue.clear()
                    self._queued_records = 0
                else:
                    # Requests that arrived while an idle stream was closing get a fresh stream.
                    self._start_sender(loop)

    def _ready_to_send(self, in_flight: collections.deque[_Batch]) -> bool:
        """Send now when nothing is in flight; otherwise only a large backlog overlaps round trips.

        Small batches wait for the acknowledgement in flight, so under load each batch carries every
        request that arrived meanwhile (fewer, larger commits); large ones (batch verification) are
        pipelined so that the log commits one while lookup prepares the next.
        """
        if not self._queue:
            return False
        if not in_flight:
            return True
        return len(in_flight) < self._max_in_flight and self._queued_records >= PIPELINE_RECORDS

    async def _watchdog(self, stream: _Stream, reader: asyncio.Task[None]) -> None:
        """One timer for the whole stream instead of one per waiter: a batch unacknowledged for longer
        than the timeout ends the stream, which fails every waiter."""
        loop = asyncio.get_running_loop()
        while not reader.done():
            await asyncio.sleep(self._ack_timeout / 4)
            in_flight = stream.in_flight
            if in_flight and loop.time() - in_flight[0].sent_at > self._ack_timeout:
                self.stats.timeouts += 1
                stream.timed_out = True
                stream.call.cancel()
                return

    async def _read_acks(self, stream: _Stream) -> None:
        call, in_flight = stream.call, stream.in_flight
        while True:
            try:
                ack = await call.read()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this reader itself is being cancelled: the stream is being given up
                # Otherwise the call was cancelled under the reader (grpc reports that as CancelledError).
                if stream.timed_out:
                    raise ConnectionError(
                        f"the access log did not acknowledge within {self._ack_timeout:g} s") from None
                raise ConnectionError("the access log stream was cancelled") from None
            if ack is grpc.aio.EOF:
                if in_flight:
                    raise ConnectionError("the access log closed the stream with batches unacknowledged")
                return
            if not in_flight or ack.batch_id != in_flight[0].batch_id:
                raise ConnectionError(f"unexpected acknowledgement {ack.batch_id!r}")
            batch = in_flight.popleft()
            if ack.count != batch.count:
                raise ConnectionError(f"access log stored {ack.count} of {batch.count} records")
            for pending in batch.waiters:
                if not pending.future.done():
                    pending.future.set_result(None)
            self._wakeup.set()

    @staticmethod
    def _fail_all(waiters: Sequence[_Pending] | collections.deque[_Pending], message: str) -> None:
        for pending in waiters:
            if not pending.future.done():
                pending.future.set_exception(JukiError(Reason.ACCESS_LOG_UNAVAILABLE, message))
