"""Seeding the municipal registers from the synthetic population."""

from __future__ import annotations

import os
from typing import Any

import pytest
from juki._gen.juki.municipal.v1 import municipal_pb2
from juki.seeding.registers import individual_number, load_registers


def test_individual_numbers_have_twelve_digits_and_a_check_digit() -> None:
    number = individual_number("24727059608")
    assert len(number) == 12 and number.isdigit()
    assert number == individual_number("24727059608")
    assert number != individual_number("24846016224")


async def test_load_registers_puts_each_share_in_its_municipality(database: Any) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    conn = await database.admin()
    try:
        before = {m: await conn.fetchval(f"SELECT count(*) FROM municipal_{m}.residents") for m in ("131148", "141003")}
        loaded = await load_registers(database.admin_url, ["131148", "141003"], 200, seed)
        assert sum(loaded.values()) == 200 and loaded["131148"] > 0 and loaded["141003"] > 0
        for code in ("131148", "141003"):
            after = await conn.fetchval(f"SELECT count(*) FROM municipal_{code}.residents")
            assert after - before[code] == loaded[code]
        rows = await conn.fetch("SELECT entry FROM municipal_141003.residents WHERE relationship <> '世帯主' LIMIT 20")
        assert rows
        for row in rows:
            entry = municipal_pb2.ResidentEntry.FromString(row["entry"])
            assert entry.address.municipality_code == "141003" and entry.address.municipality == "横浜市"
            assert entry.household_head and entry.household_id.startswith("141003-")
            assert len(entry.individual_number) == 12
            head = await conn.fetchval(
                "SELECT entry FROM municipal_141003.residents WHERE household_id = $1 AND relationship = '世帯主'",
                entry.household_id)
            if head is not None:
                head_entry = municipal_pb2.ResidentEntry.FromString(head)
                assert entry.household_head == f"{head_entry.name.family_name}　{head_entry.name.given_name}".strip("　")
    finally:
        await conn.close()


async def test_a_register_the_prefecture_lacks_is_found_for_resync(database: Any) -> None:
    import random

    from juki import domain
    from juki.seeding.registers import _not_at_prefecture

    code = domain.generate_resident_code(random.Random())
    conn = await database.admin()
    try:
        # Two Tokyo municipalities the shared test database holds nobody of yet (other tests load some).
        held = {r[0] for r in await conn.fetch("SELECT DISTINCT municipality_code FROM intake_p13.residents")}
        absent, present = [m.code for m in domain.municipalities()
                           if m.code.startswith("13") and not m.is_prefecture and m.code not in held][:2]
        await conn.execute(
            "INSERT INTO intake_p13.residents (resident_code, resident_kind, municipality_code, status)"
            " VALUES ($1, 1, $2, 1)", code, present)
    finally:
        await conn.close()
    assert await _not_at_prefecture(database.admin_url, [absent, present]) == [absent]


async def test_the_population_is_as_old_as_the_business_day(database: Any) -> None:
    import datetime as dt

    seed = int.from_bytes(os.urandom(4), "big")
    loaded = await load_registers(database.admin_url, ["141003"], 300, seed, dt.date(2010, 1, 4))
    assert loaded["141003"] == 300
    conn = await database.admin()
    try:
        rows = await conn.fetch("SELECT entry FROM municipal_141003.residents WHERE household_id LIKE $1",
                                f"141003-s{seed}-%")
    finally:
        await conn.close()
    assert len(rows) == 300
    for row in rows:
        entry = municipal_pb2.ResidentEntry.FromString(row["entry"])
        born = (entry.birth_date.year, entry.birth_date.month, entry.birth_date.day)
        assert born <= (2010, 1, 4)
        became = entry.became_resident_on
        assert (became.year, became.month, became.day) <= (2010, 1, 4)
        assert entry.resident_kind == 1  # no foreign residents' 住民票 before 2012-07-09


async def test_a_register_with_an_unfinished_resync_is_sent_again(database: Any) -> None:
    """The prefecture holds part of 中野区's register, and the CS still has the load in progress: seeding a
    mesh that is already seeded sends it again (the CS continues that load)."""
    import random

    from juki import domain
    from juki.seeding.registers import _not_at_prefecture

    conn = await database.admin()
    try:
        if not await conn.fetchval("SELECT 1 FROM information_schema.schemata WHERE schema_name = 'municipal_131148'"):
            pytest.skip("no CS schema of 131148 in this database")
        await conn.execute(
            "INSERT INTO intake_p13.residents (resident_code, resident_kind, municipality_code, status)"
            " VALUES ($1, 1, '131148', 1)", domain.generate_resident_code(random.Random()))
        await conn.execute("UPDATE municipal_131148.outbox_state SET resync_load_id = 'unfinished'")
        try:
            assert await _not_at_prefecture(database.admin_url, ["131148"]) == ["131148"]
            await conn.execute("UPDATE municipal_131148.outbox_state SET resync_load_id = ''")
            assert await _not_at_prefecture(database.admin_url, ["131148"]) == []
        finally:
            await conn.execute("UPDATE municipal_131148.outbox_state SET resync_load_id = ''")
    finally:
        await conn.close()
