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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from juki._gen.juki.accesslog.v1 import accesslog_pb2, accesslog_pb2_grpc
from juki.mesh.errors import JukiError, Reason

log = logging.getLogger(__name__)

# Records per AppendStream message; one caller's records are never split (a verification batch stays
# one access-log call), so a single large caller can exceed this.
MAX_BATCH_RECORDS = 20_000
# Batches sent and not yet acknowledged; more overlaps round trips, fewer makes bigger batches.
MAX_IN_FLIGHT = 4


@dataclass
class _Pending:
    records: Sequence[accesslog_pb2.ProvisionRecord]
    future: asyncio.Future[None]


@dataclass
class _Batch:
    batch_id: str
    waiters: list[_Pending] = field(default_factory=list)
    count: int = 0


@dataclass
class ProvisionLogStats:
    """Counters for metrics and benchmarks."""

    batches: int = 0
    records: int = 0
    failures: int = 0


class ProvisionLog:
    """Client of ``AccessLogService.AppendStream`` with group commit; one per lookup process."""

    def __init__(
        self,
        stub_factory: Callable[[], accesslog_pb2_grpc.AccessLogServiceStub],
        *,
        ack_timeout: float = 5.0,
        max_batch_records: int = MAX_BATCH_RECORDS,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._stub_factory = stub_factory
        self._ack_timeout = ack_timeout
        self._max_batch_records = max_batch_records
        self._max_in_flight = max_in_flight
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = ProvisionLogStats()

    async def record(self, records: Sequence[accesslog_pb2.ProvisionRecord]) -> None:
        """Return once ``records`` are durable in the access log; raise ACCESS_LOG_UNAVAILABLE otherwise."""
        if not records:
            return
        if self._closed:
            raise JukiError(Reason.ACCESS_LOG_UNAVAILABLE, "the lookup service is stopping")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(records, future))
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="provision-log")
        try:
            await asyncio.wait_for(asyncio.shield(future), self._ack_timeout)
        except TimeoutError:
            future.cancel()
            raise JukiError(
                Reason.ACCESS_LOG_UNAVAILABLE, "the access log did not acknowledge in time; nothing was provided"
            ) from None

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(self._queue, "the lookup service is stopping")
        self._queue.clear()

    # -- the sender -----------------------------------------------------------------------------------

    def _take_batch(self) -> _Batch:
        batch = _Batch(uuid.uuid4().hex)
        while self._queue:
            pending = self._queue[0]
            if batch.waiters and batch.count + len(pending.records) > self._max_batch_records:
                break
            self._queue.popleft()
            if pending.future.done():  # its caller gave up (deadline): do not log what was not provided
                continue
            batch.waiters.append(pending)
            batch.count += len(pending.records)
        return batch

    async def _run(self) -> None:
        """Open one stream and pump batches until it fails or the queue stays empty."""
        in_flight: collections.deque[_Batch] = collections.deque()
        call = None
        failed = False
        try:
            call = self._stub_factory().AppendStream(wait_for_ready=False)
            window = asyncio.Semaphore(self._max_in_flight)
            reader = asyncio.get_running_loop().create_task(self._read_acks(call, in_flight, window))

            def _reader_ended(_: object) -> None:
                # Unblock the sender wherever it waits, so a broken stream fails its waiters at once.
                self._wakeup.set()
                window.release()

            reader.add_done_callback(_reader_ended)
            try:
                while True:
                    if not self._queue:
                        self._wakeup.clear()
                        if not in_flight:
                            # Idle: keep the stream open a little for the next burst, then end it.
                            try:
                                await asyncio.wait_for(self._wakeup.wait(), 30.0)
                            except TimeoutError:
                                break
                        else:
                            await self._wakeup.wait()
                        if reader.done():
                            break
                        continue
                    await window.acquire()
                    if reader.done():
                        window.release()
                        break
                    batch = self._take_batch()
                    if not batch.waiters:
                        window.release()
                        continue
                    in_flight.append(batch)
                    request = accesslog_pb2.AppendStreamRequest(batch_id=batch.batch_id)
                    for pending in batch.waiters:
                        request.records.extend(pending.records)
                    await call.write(request)
                    self.stats.batches += 1
                    self.stats.records += batch.count
            finally:
                if not reader.done():
                    with contextlib.suppress(Exception):
                        await call.done_writing()
                    if not in_flight:
                        reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asyncio.wait_for(reader, self._ack_timeout)
                elif reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: everyone waiting fails, nothing is provided
            failed = True
            self.stats.failures += 1
            log.warning("access log stream failed: %s", exc)
        finally:
            for batch in in_flight:
                self._fail_all(batch.waiters, "the access log is unavailable; nothing was provided")
            if call is not None:
                call.cancel()
            if self._queue and not self._closed:
                if failed:
                    # Requests queued while the stream broke fail too; the next request opens a new one.
                    self._fail_all(self._queue, "the access log is unavailable; nothing was provided")
                    self._queue.clear()
                else:
                    # Requests that arrived while an idle stream was closing get a fresh stream.
                    self._task = asyncio.get_running_loop().create_task(self._run(), name="provision-log")

    async def _read_acks(
        self, call: grpc.aio.StreamStreamCall, in_flight: collections.deque[_Batch], window: asyncio.Semaphore
    ) -> None:
        while True:
            ack = await call.read()
            if ack is grpc.aio.EOF:
                if in_flight:
                    raise ConnectionError("the access log closed the stream with batches unacknowledged")
                self._wakeup.set()
                return
            if not in_flight or ack.batch_id != in_flight[0].batch_id:
                raise ConnectionError(f"unexpected acknowledgement {ack.batch_id!r}")
            batch = in_flight.popleft()
            if ack.count != batch.count:
                raise ConnectionError(f"access log stored {ack.count} of {batch.count} records")
            for pending in batch.waiters:
                if not pending.future.done():
                    pending.future.set_result(None)
            window.release()

    @staticmethod
    def _fail_all(waiters: Sequence[_Pending] | collections.deque[_Pending], message: str) -> None:
        for pending in waiters:
            if not pending.future.done():
                pending.future.set_exception(JukiError(Reason.ACCESS_LOG_UNAVAILABLE, message))
