"""Small value types shared by notifications, the national fold and the synthetic population."""

from __future__ import annotations

import calendar
import datetime as _dt
import enum
import re
from dataclasses import dataclass

__all__ = ["Address", "PartialDate", "ResidentKind", "Sex"]


class ResidentKind(enum.Enum):
    """Whose record it is: a Japanese national, or a foreign resident (外国人住民, since 2012-07-09)."""

    JAPANESE = "JAPANESE"
    FOREIGN = "FOREIGN"


class Sex(enum.Enum):
    """性別 as recorded on the 住民票; the values follow ISO/IEC 5218 (1 male, 2 female)."""

    MALE = 1
    FEMALE = 2

    @property
    def label(self) -> str:
        """男 or 女."""
        return "男" if self is Sex.MALE else "女"


@dataclass(frozen=True, slots=True)
class Address:
    """住所: the municipality by its JIS X 0402 code, and the rest (町名・番地) as text."""

    municipality_code: str
    street: str


_PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


@dataclass(frozen=True, slots=True, eq=True)
class PartialDate:
    """A date whose month, or day, may be unknown (生年月日不詳, some foreign residents).

    Decision: the year is always known; ``day`` may be unknown alone, or ``month`` and ``day``
    together, never the month alone (a known day of an unknown month says nothing). This mirrors how a
    residence card records an unknown birth date ("1980年 月 日" / "1980年5月 日").

    Ordering (``<``) is by the earliest possible date, and among equal earliest dates the less precise
    value first: 1980 < 1980-01 < 1980-01-01 < 1980-01-02. It is a total order consistent with ``==``,
    so partial dates sort deterministically. Rules that compare with a real date ask explicitly for
    :meth:`earliest` or :meth:`latest`.
    """

    year: int
    month: int | None = None
    day: int | None = None

    def __post_init__(self) -> None:
        if not 1800 <= self.year <= 9999:
            raise ValueError(f"year out of range: {self.year}")
        if self.month is None:
            if self.day is not None:
                raise ValueError("a day needs a month")
            return
        if not 1 <= self.month <= 12:
            raise ValueError(f"month out of range: {self.month}")
        if self.day is not None and not 1 <= self.day <= calendar.monthrange(self.year, self.month)[1]:
            raise ValueError(f"day out of range: {self.year}-{self.month:02d}-{self.day}")

    @classmethod
    def from_date(cls, day: _dt.date) -> PartialDate:
        """A fully known date."""
        return cls(day.year, day.month, day.day)

    @classmethod
    def parse(cls, text: str) -> PartialDate:
        """Read ``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``; ``00`` stands for unknown (``1980-05-00``)."""
        match = _PARTIAL_DATE.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"not a date like 1980, 1980-05 or 1980-05-17: {text!r}")
        month = int(match.group(2)) if match.group(2) and match.group(2) != "00" else None
        day = int(match.group(3)) if match.group(3) and match.group(3) != "00" else None
        return cls(int(match.group(1)), month, day)

    @property
    def is_complete(self) -> bool:
        """True when year, month and day are all known."""
        return self.day is not None

    def to_date(self) -> _dt.date:
        """The date itself; ``ValueError`` when a part is unknown."""
        if self.month is None or self.day is None:
            raise ValueError(f"incomplete date {self}")
        return _dt.date(self.year, self.month, self.day)

    def earliest(self) -> _dt.date:
        """The first day this value can stand for."""
        return _dt.date(self.year, self.month or 1, self.day or 1)

    def latest(self) -> _dt.date:
        """The last day this value can stand for."""
        month = self.month or 12
        return _dt.date(self.year, month, self.day or calendar.monthrange(self.year, month)[1])

    def age_on(self, day: _dt.date) -> int:
        """Age in whole years on ``day``; an unknown part counts as its latest value (never overstated)."""
        born = self.latest()
        return day.year - born.year - ((day.month, day.day) < (born.month, born.day))

    def sort_key(self) -> tuple[int, int, int]:
        """The key of the documented order (unknown parts as 0)."""
        return (self.year, self.month or 0, self.day or 0)

    def __lt__(self, other: PartialDate) -> bool:
        return self.sort_key() < other.sort_key()

    def __le__(self, other: PartialDate) -> bool:
        return self.sort_key() <= other.sort_key()

    def __gt__(self, other: PartialDate) -> bool:
        return self.sort_key() > other.sort_key()

    def __ge__(self, other: PartialDate) -> bool:
        return self.sort_key() >= other.sort_key()

    def __str__(self) -> str:
        if self.month is None:
            return f"{self.year:04d}"
        if self.day is None:
            return f"{self.year:04d}-{self.month:02d}"
        return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"
