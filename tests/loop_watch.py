"""What reaches the event loop's exception handler during a block: uncollected task exceptions, tasks
destroyed while pending, errors closing asynchronous generators.

Tests share one event loop, so garbage that other tests left behind can be collected during any block.
It is collected before the handler is installed; what grpc's own client machinery leaves behind (its
request-iterator tasks, ``grpc/aio/_call.py``) is not the code under test and is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

_FOREIGN = ("grpc/aio/_call.py",)


@contextlib.asynccontextmanager
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Everything reported to the running loop's exception handler meanwhile, garbage included.

    An uncollected task exception is reported when the task is garbage-collected, so the block ends with
    a collection; earlier garbage is collected, and the loop given a few turns to finish what that
    collection scheduled (asynchronous generators are closed in tasks of their own), before the handler
    is installed.
    """
    loop = asyncio.get_running_loop()
    gc.collect()
    for _ in range(3):
        await asyncio.sleep(0)
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()

    def handler(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not any(marker in repr(context) for marker in _FOREIGN):
            seen.append(context)

    loop.set_exception_handler(handler)
    try:
        yield seen
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
