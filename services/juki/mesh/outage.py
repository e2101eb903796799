"""Expected outages of a dependency logged as state changes, not as a traceback per failed attempt.

A background loop that talks to a database or another service (an outbox sender, a relay) fails on every
attempt while that dependency is down. Logging each attempt floods the log with the same traceback and
hides when the outage began and ended. :class:`Outage` logs "lost X" once, at WARNING, then "X back after
N s with M attempts" when a call succeeds again, and counts outages and failed attempts as metrics.
"""

from __future__ import annotations

import logging
import time

from juki.mesh import metrics

log = logging.getLogger(__name__)


class Outage:
    """The up/down state of one dependency as seen by one loop."""

    def __init__(self, dependency: str, logger: logging.Logger | None = None) -> None:
        self.dependency = dependency
        self._log = logger or log
        self._since: float | None = None
        self._attempts = 0
        meter = metrics.meter("juki.mesh")
        self._outages = meter.create_counter(
            "juki.dependency.outages", description="times a dependency was lost by a background loop")
        self._failures = meter.create_counter(
            "juki.dependency.failed_attempts", description="attempts that failed while a dependency was lost")

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException | str) -> None:
        """One attempt failed: the first failure of an outage is logged, the rest only counted."""
        self._attempts += 1
        self._failures.add(1, {"dependency": self.dependency})
        if self._since is None:
            self._since = time.monotonic()
            self._outages.add(1, {"dependency": self.dependency})
            self._log.warning("lost %s: %s", self.dependency, _describe(error))

    def succeeded(self) -> None:
        """An attempt succeeded: ends an outage (logged with its length and the attempts it took)."""
        if self._since is None:
            return
        took = time.monotonic() - self._since
        self._log.warning("%s back after %.1f s with %d attempts", self.dependency, took, self._attempts + 1)
        self._since = None
        self._attempts = 0


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    details = getattr(error, "details", None)
    if callable(details):  # a gRPC error: its status and message, not a traceback
        code = error.code().name if hasattr(error, "code") else ""
        return f"{code} {details() or ''}".strip()
    return f"{type(error).__name__}: {error}".rstrip(": ")
