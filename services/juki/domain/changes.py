"""Change kinds (異動事由) and the key dates of the network, kept in one place.

The grouping into 記載 (entry), 消除 (deletion) and 修正 (correction) is inferred (DOMAIN.md); so is the
13th kind, :attr:`ChangeKind.NATIONALITY_CHANGE`, which covers 帰化・国籍取得 and 国籍喪失 — the only way a
resident's kind (Japanese / foreign) changes without a new entry.
"""

from __future__ import annotations

import datetime as _dt
import enum

__all__ = [
    "CARD_ISSUANCE_ENDS",
    "CARD_VALIDITY_YEARS",
    "CONTINUED_CARD_USE_AFTER_MOVE",
    "FOREIGN_RESIDENTS_JOIN",
    "FOREIGN_RESIDENTS_REGISTERED",
    "LAST_CARD_EXPIRY",
    "NETWORK_START",
    "SECOND_PHASE",
    "SPECIAL_MOVE_IN_AFTER_PLANNED_DAYS",
    "SPECIAL_MOVE_IN_DAYS",
    "ChangeGroup",
    "ChangeKind",
]

NETWORK_START = _dt.date(2002, 8, 5)
"""First phase: municipalities start sending 本人確認情報; no notification can be dated earlier."""

SECOND_PHASE = _dt.date(2003, 8, 25)
"""Second phase: 住基カード, 住民票の写しの広域交付 and 転入転出の特例 begin."""

FOREIGN_RESIDENTS_REGISTERED = _dt.date(2012, 7, 9)
"""Foreign residents get a 住民票 (revised 住基法 in force)."""

FOREIGN_RESIDENTS_JOIN = _dt.date(2013, 7, 8)
"""Foreign residents' 本人確認情報 join the network; earlier notifications about them are refused."""

CONTINUED_CARD_USE_AFTER_MOVE = _dt.date(2012, 7, 9)
"""From this date a 住基カード stays usable after its holder moves to another municipality."""

CARD_ISSUANCE_ENDS = _dt.date(2015, 12, 22)
"""Last day of new 住基カード issuance and renewal; nothing is issued after it."""

LAST_CARD_EXPIRY = _dt.date(2025, 12, 28)
"""The last 住基カード expire by this date (10-year validity from the last issuance)."""

CARD_VALIDITY_YEARS = 10
"""Validity of a 住基カード (foreign residents: until the end of their period of stay, if earlier)."""

SPECIAL_MOVE_IN_DAYS = 14
"""特例転入 must be made within this many days of the actual move-in (法 24条の2); a 付記転出届 is accepted
from this many days before its planned move date, or within this many days after an actual move."""

SPECIAL_MOVE_IN_AFTER_PLANNED_DAYS = 30
"""特例転入 must also be made no later than this many days after the planned move date of the 付記転出届."""


class ChangeGroup(enum.Enum):
    """The three families of change (inferred grouping)."""

    ENTRY = "記載"
    DELETION = "消除"
    CORRECTION = "修正"

    @property
    def label(self) -> str:
        """The Japanese name of the group."""
        return self.value


class ChangeKind(enum.Enum):
    """A 異動事由: why the 本人確認情報 changed. Values are stable wire names."""

    MOVE_IN = "MOVE_IN"
    SPECIAL_MOVE_IN = "SPECIAL_MOVE_IN"
    BIRTH = "BIRTH"
    EX_OFFICIO_ENTRY = "EX_OFFICIO_ENTRY"
    MOVE_OUT = "MOVE_OUT"
    DEATH = "DEATH"
    EX_OFFICIO_DELETION = "EX_OFFICIO_DELETION"
    ADDRESS_CHANGE = "ADDRESS_CHANGE"
    NAME_CHANGE = "NAME_CHANGE"
    COMMON_NAME_CHANGE = "COMMON_NAME_CHANGE"
    RESIDENT_CODE_CHANGE = "RESIDENT_CODE_CHANGE"
    EX_OFFICIO_CORRECTION = "EX_OFFICIO_CORRECTION"
    NATIONALITY_CHANGE = "NATIONALITY_CHANGE"

    @property
    def group(self) -> ChangeGroup:
        """Whether this change enters, deletes or corrects a record."""
        return _GROUPS[self]

    @property
    def label(self) -> str:
        """The Japanese name, as printed on a disclosure (e.g. 転入)."""
        return _LABELS[self]

    @property
    def is_move(self) -> bool:
        """True for changes that involve a second municipality (転入, 特例転入, 転出)."""
        return self in (ChangeKind.MOVE_IN, ChangeKind.SPECIAL_MOVE_IN, ChangeKind.MOVE_OUT)


_LABELS: dict[ChangeKind, str] = {
    ChangeKind.MOVE_IN: "転入",
    ChangeKind.SPECIAL_MOVE_IN: "特例転入",
    ChangeKind.BIRTH: "出生",
    ChangeKind.EX_OFFICIO_ENTRY: "職権記載",
    ChangeKind.MOVE_OUT: "転出",
    ChangeKind.DEATH: "死亡",
    ChangeKind.EX_OFFICIO_DELETION: "職権消除",
    ChangeKind.ADDRESS_CHANGE: "転居",
    ChangeKind.NAME_CHANGE: "氏名変更",
    ChangeKind.COMMON_NAME_CHANGE: "通称の記載・削除",
    ChangeKind.RESIDENT_CODE_CHANGE: "住民票コード変更",
    ChangeKind.EX_OFFICIO_CORRECTION: "職権修正",
    ChangeKind.NATIONALITY_CHANGE: "国籍等の変更",
}

_GROUPS: dict[ChangeKind, ChangeGroup] = {
    ChangeKind.MOVE_IN: ChangeGroup.ENTRY,
    ChangeKind.SPECIAL_MOVE_IN: ChangeGroup.ENTRY,
    ChangeKind.BIRTH: ChangeGroup.ENTRY,
    ChangeKind.EX_OFFICIO_ENTRY: ChangeGroup.ENTRY,
    ChangeKind.MOVE_OUT: ChangeGroup.DELETION,
    ChangeKind.DEATH: ChangeGroup.DELETION,
    ChangeKind.EX_OFFICIO_DELETION: ChangeGroup.DELETION,
    ChangeKind.ADDRESS_CHANGE: ChangeGroup.CORRECTION,
    ChangeKind.NAME_CHANGE: ChangeGroup.CORRECTION,
    ChangeKind.COMMON_NAME_CHANGE: ChangeGroup.CORRECTION,
    ChangeKind.RESIDENT_CODE_CHANGE: ChangeGroup.CORRECTION,
    ChangeKind.EX_OFFICIO_CORRECTION: ChangeGroup.CORRECTION,
    ChangeKind.NATIONALITY_CHANGE: ChangeGroup.CORRECTION,
}
