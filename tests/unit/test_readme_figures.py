"""Figures typed into the README carry the day they were measured and the command that measures them.

A figure without a date reads as current long after the code has moved on; one without a command
cannot be checked. Every row of the README's tables of figures (measured figures, growth, faults and
recovery) has an ISO date under "as of" and a command (in backticks, or "same run" of the row above).
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
FIGURE_SECTIONS = ("## Measured figures", "## Faults, bad input and attacks")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _tables() -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every table in the sections that report figures."""
    text = README.read_text(encoding="utf-8")
    tables: list[tuple[list[str], list[list[str]]]] = []
    for heading in FIGURE_SECTIONS:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        block: list[str] = []
        for line in [*text[start:None if end < 0 else end].splitlines(), ""]:
            if line.startswith("|"):
                block.append(line)
                continue
            if block:
                tables.append((_cells(block[0]), [_cells(row) for row in block[2:]]))
                block = []
    return tables


def test_the_figure_tables_are_found() -> None:
    headers = [header[0] for header, _ in _tables()]
    assert headers == ["what", "residents", "suite", "fault"]


@pytest.mark.parametrize(("header", "rows"), _tables(), ids=lambda v: v[0] if isinstance(v[0], str) else "")
def test_every_figure_row_is_dated_and_names_its_command(header: list[str], rows: list[list[str]]) -> None:
    assert "as of" in header and header[-1] == "command", header
    when, command = header.index("as of"), header.index("command")
    for row in rows:
        assert len(row) == len(header), row[0]
        day = dt.date.fromisoformat(row[when])  # raises unless YYYY-MM-DD
        assert dt.date(2026, 1, 1) <= day <= dt.date.today(), row[0]
        assert row[command].startswith(("`", "same run", "the two rows above")), row[0]
