from __future__ import annotations

import datetime as dt

import pytest
from juki.domain import JAPAN_TIME, BusinessClock, FixedClock, SystemClock, parse_clock


def test_parse_system() -> None:
    for setting in (None, "", "system", " SYSTEM "):
        assert isinstance(parse_clock(setting), SystemClock)


def test_parse_fixed_date() -> None:
    clock = parse_clock("2003-08-25")
    assert isinstance(clock, BusinessClock)
    assert clock.today() == dt.date(2003, 8, 25)
    assert clock.now().utcoffset() == dt.timedelta(hours=9)


def test_parse_fixed_datetime_converts_to_japan_time() -> None:
    clock = parse_clock("2003-08-24T20:00:00+00:00")
    assert clock.today() == dt.date(2003, 8, 25)


def test_parse_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="business clock"):
        parse_clock("tomorrow")


def test_fixed_clock_can_be_set_and_advanced() -> None:
    clock = FixedClock(dt.date(2015, 12, 22))
    clock.advance(days=1)
    assert clock.today() == dt.date(2015, 12, 23)
    clock.set(dt.date(2002, 8, 5))
    assert clock.today() == dt.date(2002, 8, 5)


def test_system_clock_is_japan_time() -> None:
    now = SystemClock().now()
    assert now.tzinfo is JAPAN_TIME
    assert SystemClock().today() == dt.datetime.now(dt.UTC).astimezone(JAPAN_TIME).date()
