"""SQL of the card service: cards, special moves, card events."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

import asyncpg

from juki.card import rules


@dataclass(frozen=True)
class StoredCard:
    card_number: str
    resident_code: str
    card_type: int
    resident_kind: int
    state: int
    state_before_suspension: int | None
    failed_pin_attempts: int
    pin_salt: bytes
    pin_hash: bytes
    issued_on: dt.date
    expires_on: dt.date
    issuing_municipality: str
    home_municipality: str
    revoked_reason: str
    state_changed_at: dt.datetime

    @property
    def facts(self) -> rules.CardFacts:
        return rules.CardFacts(self.state, self.expires_on)


_COLUMNS = (
    "card_number, resident_code, card_type, resident_kind, state, state_before_suspension, failed_pin_attempts,"
    " pin_salt, pin_hash, issued_on, expires_on, issuing_municipality, home_municipality, revoked_reason,"
    " state_changed_at"
)


def _card(row: asyncpg.Record) -> StoredCard:
    return StoredCard(**dict(row))


@dataclass(frozen=True)
class SpecialMove:
    move_id: int
    card_number: str
    resident_code: str
    from_municipality: str
    to_municipality: str
    planned_move_on: dt.date
    deadline: dt.date
    moved_out_notified: bool


def new_card_number() -> str:
    """16 random digits, as printed on the card."""
    return "".join(secrets.choice("0123456789") for _ in range(16))


async def get(conn: asyncpg.Connection, card_number: str, *, for_update: bool = False) -> StoredCard | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM cards WHERE card_number = $1" + (" FOR UPDATE" if for_update else ""), card_number
    )
    return None if row is None else _card(row)


async def of_resident(conn: asyncpg.Connection, resident_code: str, *, for_update: bool = False) -> list[StoredCard]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM cards WHERE resident_code = $1 ORDER BY issued_on"
        + (" FOR UPDATE" if for_update else ""),
        resident_code,
    )
    return [_card(r) for r in rows]


async def insert(conn: asyncpg.Connection, card: StoredCard, photo: bytes | None) -> None:
    await conn.execute(
        "INSERT INTO cards (card_number, resident_code, card_type, resident_kind, state, failed_pin_attempts,"
        " pin_salt, pin_hash, photo, issued_on, expires_on, issuing_municipality, home_municipality)"
        " VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8, $9, $10, $11, $12)",
        card.card_number, card.resident_code, card.card_type, card.resident_kind, card.state, card.pin_salt,
        card.pin_hash, photo, card.issued_on, card.expires_on, card.issuing_municipality, card.home_municipality,
    )


async def update(conn: asyncpg.Connection, card_number: str, **fields: object) -> StoredCard:
    """Set columns of one card (state changes also stamp state_changed_at); return the card after."""
    names = list(fields)
    assignments = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(names))
    if "state" in fields:
        assignments += ", state_changed_at = now()"
    row = await conn.fetchrow(
        f"UPDATE cards SET {assignments} WHERE card_number = $1 RETURNING {_COLUMNS}",
        card_number, *(fields[n] for n in names),
    )
    assert row is not None
    return _card(row)


async def event(conn: asyncpg.Connection, card_number: str, name: str, detail: str = "", operator_id: str = "",
                peer: str = "") -> None:
    await conn.execute(
        "INSERT INTO card_events (card_number, event, detail, operator_id, peer) VALUES ($1, $2, $3, $4, $5)",
        card_number, name, detail, operator_id, peer,
    )


async def open_move(conn: asyncpg.Connection, card_number: str, *, for_update: bool = False) -> SpecialMove | None:
    row = await conn.fetchrow(
        "SELECT move_id, card_number, resident_code, from_municipality, to_municipality, planned_move_on, deadline,"
        " moved_out_notified FROM special_moves WHERE card_number = $1 AND moved_in_on IS NULL"
        + (" FOR UPDATE" if for_update else ""),
        card_number,
    )
    return None if row is None else SpecialMove(**dict(row))


async def file_move(conn: asyncpg.Connection, card: StoredCard, destination: str, planned: dt.date,
                    deadline: dt.date, filed_on: dt.date) -> int:
    move_id = await conn.fetchval(
        "INSERT INTO special_moves (card_number, resident_code, from_municipality, to_municipality, planned_move_on,"
        " deadline, filed_on) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING move_id",
        card.card_number, card.resident_code, card.home_municipality, destination, planned, deadline, filed_on,
    )
    return int(move_id)
