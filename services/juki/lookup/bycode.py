"""Lookups by code that share their work: one store read and one access-log append for many calls.

A busy lookup process answers many ``LookupByCode`` calls at once, each of which used to read the store
on its own (a pool acquire, a bind and execute, a release) and wait on its own for the access log's
acknowledgement. Here a call hands over its code and its provision record and awaits one future; calls
that arrive while a read is under way are taken together by the next one: one ``= ANY($1)`` query for
all their codes, then one append of the provision records of the residents found, and every call is
answered once that append is durable. The order of a call is unchanged: the record leaves only after its
provision is in the access log; a code the store does not know is answered "not found" and logs nothing.

At most ``MAX_RUNNING`` groups are under way at a time (by default one, ``JUKI_LOOKUP_READ_GROUPS``);
calls arriving meanwhile wait for the next group, which is what makes groups larger under load. A call
abandoned before its group starts (its deadline passed) is left out of the group, so its provision is
not logged; one abandoned later may be logged and not answered, as before (the log errs on the side of
recording). A store read is bounded (``STORE_TIMEOUT_SECONDS``) and fails its group as retryable. A call
that finds nothing under way (an idle service) does not wait for a group: it reads and logs on its own,
in its own task, and the calls arriving meanwhile form the next group.

Calls whose span is recorded (a sampled trace) do not come here: they read and log on their own, inside
their own spans (``identity_store.read``, ``access_log.provision_durable``), so that a sampled trace
shows where its time went; the group's work has no caller's span to belong to.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
from collections.abc import Mapping
from typing import Any

import asyncpg

from juki.lookup.provisions import ProvisionLog
from juki.mesh.errors import JukiError, Reason

# Groups under way at once; calls arriving meanwhile wait for the next group (one makes the largest groups:
# on a busy machine the fewest store reads and log appends per call, measured with `juki bench lookup`).
MAX_RUNNING = 1
# Codes per store query; a larger backlog is split into several groups.
MAX_GROUP = 512
# A store read that takes longer fails its group (retryable), so that a stalled connection cannot hold
# back the calls queued behind it.
STORE_TIMEOUT_SECONDS = 5.0

_Waiter = tuple[str, bytes, "asyncio.Future[Mapping[str, Any] | None]"]


class CodeReads:
    """Group reads of the store by resident code, with their provision records, across concurrent calls."""

    def __init__(self, pool: asyncpg.Pool, query: str, provisions: ProvisionLog, *, query_one: str | None = None,
                 max_running: int = MAX_RUNNING, max_group: int = MAX_GROUP,
                 store_timeout: float = STORE_TIMEOUT_SECONDS) -> None:
        self._pool = pool
        self._query = query  # SELECT ... WHERE r.resident_code = ANY($1::text[]), rows with resident_code
        # SELECT ... WHERE r.resident_code = $1, for a call reading on its own (the plain index probe).
        self._query_one = query_one
        self._provisions = provisions
        self._max_running = max_running
        self._max_group = max_group
        self._store_timeout = store_timeout
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._running: set[asyncio.Task[None]] = set()
        self._starting = False  # a group's task is created and has not taken its calls yet
        self._alone = False  # a call found nothing under way and reads on its own
        self._closed = False
        # Groups run in a context of their own: not the first caller's (its span, peer and method).
        self._context = contextvars.Context()
        self.groups = 0  # how many groups were read (for tests and benchmarks)

    async def read(self, code: str, provision: bytes) -> Mapping[str, Any] | None:
        """The store row of ``code`` once ``provision`` is durable in the access log; None if the store has
        no such resident (then nothing is logged). Raises what the read or the log raised."""
        if self._closed:
            raise JukiError(Reason.ACCESS_LOG_UNAVAILABLE, "the lookup service is stopping")
        if not self._alone and not self._running and not self._starting and not self._waiting:
            # Nothing under way: this call reads and logs on its own, in its own task, without waiting a turn
            # of the loop for a group's task; calls arriving meanwhile queue for the next group.
            self._alone = True
            try:
                return await self._read_alone(code, provision)
            finally:
                self._alone = False
                self._start_if_due()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Mapping[str, Any] | None] = loop.create_future()
        self._waiting.append((code, provision, future))
        self._start_if_due()
        return await future

    async def _read_alone(self, code: str, provision: bytes) -> Mapping[str, Any] | None:
        self.groups += 1
        fetched = await self._fetch([code])
        if not fetched:
            return None
        await self._provisions.record([provision])
        return fetched[0]

    async def _fetch(self, codes: list[str]) -> list[Mapping[str, Any]]:
        try:
            if len(codes) == 1 and self._query_one is not None:
                row: Mapping[str, Any] | None = await self._pool.fetchrow(
                    self._query_one, codes[0], timeout=self._store_timeout)
                return [] if row is None else [row]
            rows: list[Mapping[str, Any]] = await self._pool.fetch(self._query, codes, timeout=self._store_timeout)
            return rows
        except TimeoutError:
            raise JukiError(Reason.DEPENDENCY_UNAVAILABLE,
                            f"the identity store did not answer within {self._store_timeout:g} s",
                            retry_after_seconds=1.0) from None

    def _start_if_due(self) -> None:
        busy = len(self._running) + (1 if self._alone else 0)
        if self._waiting and not self._closed and not self._starting and busy < self._max_running:
            self._start()

    def _start(self) -> None:
        # The group is taken when its task first runs, on the next turn of the loop: the calls arriving in
        # this turn join it. Its task runs in a context of its own (not this caller's span, peer or method).
        self._starting = True
        task = asyncio.get_running_loop().create_task(self._serve(), context=self._context)
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _take(self) -> list[_Waiter]:
        self._starting = False
        group: list[_Waiter] = []
        while self._waiting and len(group) < self._max_group:
            waiter = self._waiting.popleft()
            if not waiter[2].done():  # its caller gave up: neither read nor logged
                group.append(waiter)
        return group

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # _serve hands every failure to its callers; nothing is left to retrieve
        self._start_if_due()

    async def _serve(self) -> None:
        group = self._take()
        if not group:
            return
        self.groups += 1
        try:
            codes = list({code for code, _, _ in group})
            rows = {row["resident_code"]: row for row in await self._fetch(codes)}
            found: list[_Waiter] = []
            for waiter in group:
                if waiter[2].done():
                    continue
                if waiter[0] in rows:
                    found.append(waiter)
                else:
                    waiter[2].set_result(None)
            if found:
                await self._provisions.record([provision for _, provision, _ in found])
            for code, _, future in found:
                if not future.done():
                    future.set_result(rows[code])
        except asyncio.CancelledError:
            _fail(group, JukiError(Reason.ACCESS_LOG_UNAVAILABLE, "the lookup service is stopping"))
            raise
        except Exception as error:  # the store or the log failed: every call of the group fails with it
            _fail(group, error)

    async def close(self) -> None:
        self._closed = True
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        _fail(list(self._waiting), JukiError(Reason.ACCESS_LOG_UNAVAILABLE, "the lookup service is stopping"))
        self._waiting.clear()


def _fail(group: list[_Waiter], error: BaseException) -> None:
    for _, _, future in group:
        if not future.done():
            future.set_exception(error)
