"""The business clock: what "today" is in Japan, settable for tests and demos.

Every date rule (notification cut-offs, card expiry, the end of card issuance on 2015-12-22) asks a
:class:`BusinessClock` instead of the wall clock, so a demo can run "on 2003-08-25" and a test can step
over a cut-off day by day. Japan has had no daylight saving time since 1951, so a fixed +09:00 offset is
exact and needs no tz database.
"""

from __future__ import annotations

import datetime as _dt
import threading
from typing import Protocol, runtime_checkable

__all__ = ["JAPAN_TIME", "BusinessClock", "FixedClock", "SystemClock", "parse_clock"]

JAPAN_TIME = _dt.timezone(_dt.timedelta(hours=9), "JST")
"""Japan Standard Time (Asia/Tokyo), UTC+09:00 all year."""


@runtime_checkable
class BusinessClock(Protocol):
    """Source of the current business date and time, always in Japan time."""

    def today(self) -> _dt.date:
        """The current calendar date in Japan."""
        ...

    def now(self) -> _dt.datetime:
        """The current instant as an aware datetime in Japan time."""
        ...


class SystemClock:
    """The real clock, read in Japan time."""

    def now(self) -> _dt.datetime:
        """The current instant in Japan time."""
        return _dt.datetime.now(JAPAN_TIME)

    def today(self) -> _dt.date:
        """Today's date in Japan (which may differ from the host's local date)."""
        return self.now().date()

    def __repr__(self) -> str:
        return "SystemClock()"


class FixedClock:
    """A clock that stands still until told otherwise; thread-safe to set and advance.

    Built from a date (the time is then 09:00 JST, opening hours at a counter) or an aware datetime
    (naive datetimes are taken as Japan time).
    """

    def __init__(self, moment: _dt.date | _dt.datetime) -> None:
        self._lock = threading.Lock()
        self._moment = self._coerce(moment)

    @staticmethod
    def _coerce(moment: _dt.date | _dt.datetime) -> _dt.datetime:
        if isinstance(moment, _dt.datetime):
            if moment.tzinfo is None:
                return moment.replace(tzinfo=JAPAN_TIME)
            return moment.astimezone(JAPAN_TIME)
        return _dt.datetime(moment.year, moment.month, moment.day, 9, 0, tzinfo=JAPAN_TIME)

    def now(self) -> _dt.datetime:
        """The fixed instant."""
        with self._lock:
            return self._moment

    def today(self) -> _dt.date:
        """The fixed date."""
        return self.now().date()

    def set(self, moment: _dt.date | _dt.datetime) -> None:
        """Move the clock to ``moment`` (backwards is allowed: tests replay history)."""
        coerced = self._coerce(moment)
        with self._lock:
            self._moment = coerced

    def advance(self, delta: _dt.timedelta | None = None, *, days: int = 0) -> None:
        """Move the clock forward by ``delta`` and/or a number of days."""
        step = (delta or _dt.timedelta()) + _dt.timedelta(days=days)
        with self._lock:
            self._moment = self._moment + step

    def __repr__(self) -> str:
        return f"FixedClock({self.now().isoformat()!r})"


def parse_clock(setting: str | None) -> BusinessClock:
    """Build a clock from a setting such as ``JUKI_CLOCK``.

    ``None``, ``""`` and ``"system"`` give the real clock; ``"2003-08-25"`` or an ISO datetime
    (``"2003-08-25T10:30:00+09:00"``) give a :class:`FixedClock`. Anything else raises ``ValueError``
    with a message fit for a start-up error.
    """
    text = (setting or "").strip()
    if text == "" or text.lower() == "system":
        return SystemClock()
    try:
        if len(text) == 10:
            return FixedClock(_dt.date.fromisoformat(text))
        return FixedClock(_dt.datetime.fromisoformat(text))
    except ValueError:
        raise ValueError(
            f"business clock must be 'system', a date like 2003-08-25 or an ISO datetime, got {setting!r}"
        ) from None
