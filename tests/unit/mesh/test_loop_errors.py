"""The services' loop exception handler: only asyncpg's own abandoned waiters of a lost connection are
downgraded; any task of ours with an uncollected error still reaches asyncio's handler."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest
from juki.mesh.server import _loop_exception_handler


async def _fail() -> None:
    raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")


async def test_an_abandoned_asyncpg_waiter_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    error = asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    waiter.set_exception(error)
    waiter.exception()  # retrieved here so that this test's own loop stays quiet
    with caplog.at_level(logging.WARNING):
        _loop_exception_handler(loop, {"message": "Future exception was never retrieved", "future": waiter,
                                       "exception": error})
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "lost connection" in caplog.records[0].getMessage()


async def test_a_task_of_ours_still_goes_to_asyncio(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    task = loop.create_task(_fail())
    await asyncio.wait([task])
    error = task.exception()
    with caplog.at_level(logging.WARNING):
        _loop_exception_handler(loop, {"message": "Task exception was never retrieved", "future": task,
                                       "exception": error})
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "Task exception was never retrieved" in caplog.records[0].getMessage()


async def test_other_errors_of_bare_futures_still_go_to_asyncio(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    error = RuntimeError("not an outage")
    waiter.set_exception(error)
    waiter.exception()
    with caplog.at_level(logging.WARNING):
        _loop_exception_handler(loop, {"message": "Future exception was never retrieved", "future": waiter,
                                       "exception": error})
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
