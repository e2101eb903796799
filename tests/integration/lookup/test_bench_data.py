"""The benchmark's synthetic store: codes generated inside PostgreSQL carry valid check digits and are
the codes the client derives for the same index."""

from __future__ import annotations

import pytest
from juki.bench.lookup import code_sql, resident_code
from juki.domain.codes import is_valid_resident_code

from tests.conftest import Database

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="session")]


async def test_codes_generated_in_sql_match_python_and_are_valid(database: Database) -> None:
    conn = await database.admin()
    try:
        indexes = [0, 1, 2, 3, 17, 999, 123_456, 9_999_999, 50_000_000]
        rows = await conn.fetch(f"SELECT i, {code_sql('i')} AS code FROM unnest($1::bigint[]) AS i", indexes)
    finally:
        await conn.close()
    for row in rows:
        assert row["code"] == resident_code(row["i"])
        assert is_valid_resident_code(row["code"])
    assert len({row["code"] for row in rows}) == len(indexes)
