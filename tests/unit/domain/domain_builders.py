"""Builders shared by the domain tests."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from juki.domain import Address, ChangeKind, Notification, PartialDate, ResidentKind, Sex

NAKANO = "131148"
SHIBUYA = "131130"
YOKOHAMA = "141003"
OSAKA = "271004"
CODE = "24727059608"
OTHER_CODE = "24846016224"
TODAY = dt.date(2024, 4, 1)


def notification(**changes: Any) -> Notification:
    """A valid 転居 notification of a Japanese resident of 中野区, with ``changes`` applied."""
    base = Notification(
        notification_id="n-1",
        municipality_code=NAKANO,
        sequence=1,
        change_kind=ChangeKind.ADDRESS_CHANGE,
        resident_code=CODE,
        resident_kind=ResidentKind.JAPANESE,
        family_name="山田",
        given_name="太郎",
        kana="ヤマダ　タロウ",
        birth_date=PartialDate(1970, 5, 17),
        sex=Sex.MALE,
        address=Address(NAKANO, "中央三丁目5番2号"),
        occurred_on=dt.date(2024, 3, 1),
        notified_on=dt.date(2024, 3, 5),
    )
    return dataclasses.replace(base, **changes)
