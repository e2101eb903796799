from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from juki.domain import (
    InvalidText,
    address_key,
    match_key,
    names,
    normalise_alphabetic_name,
    normalise_kana,
    normalise_name,
    normalise_street,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("山田", "山田"),
        ("  山田  ", "山田"),
        ("山田 太郎", "山田\u3000太郎"),
        ("山田\u3000\u3000 太郎", "山田\u3000太郎"),
        ("ﾀﾛｳ", "タロウ"),
        ("ｶﾞｸ", "ガク"),
        ("Ken", "Ｋｅｎ"),
        ("か\u3099", "が"),  # NFC joins a combining voiced mark
    ],
)
def test_normalise_name(raw: str, expected: str) -> None:
    assert normalise_name(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", "   ", "\u3000", "山\x00田", "山田\n", "山\u200b田", "\ue000", "あ" * 101]
)
def test_normalise_name_refuses(raw: str) -> None:
    with pytest.raises(InvalidText):
        normalise_name(raw)


def test_name_length_bound_is_inclusive() -> None:
    assert len(normalise_name("あ" * 100)) == 100


def test_normalise_kana() -> None:
    assert normalise_kana("やまだ たろう") == "ヤマダ\u3000タロウ"
    assert normalise_kana("ﾔﾏﾀﾞ ﾀﾛｳ") == "ヤマダ\u3000タロウ"
    with pytest.raises(InvalidText):
        normalise_kana("山田")


def test_normalise_alphabetic_name() -> None:
    assert normalise_alphabetic_name("  john   smith ") == "JOHN SMITH"
    assert normalise_alphabetic_name("ｊｏｈｎ") == "JOHN"
    assert normalise_alphabetic_name("o'brien-nguyễn") == "O'BRIEN-NGUYỄN"
    with pytest.raises(InvalidText):
        normalise_alphabetic_name("王 小明")


def test_normalise_street() -> None:
    assert normalise_street(" 中央三丁目5番2号  ﾊｲﾂ101 ") == "中央三丁目5番2号\u3000ハイツ101"


@pytest.mark.parametrize(
    "variant",
    ["山田　太郎", "山田 太郎", "山田太郎", " 山田\u3000\u3000太郎 ", "髙田", "ﾔﾏﾀﾞﾀﾛｳ", "やまだ たろう"],
)
def test_match_key_variants(variant: str) -> None:
    groups = {
        "山田太郎": ["山田　太郎", "山田 太郎", "山田太郎", " 山田\u3000\u3000太郎 "],
        "高田": ["髙田"],
        "ヤマダタロウ": ["ﾔﾏﾀﾞﾀﾛｳ", "やまだ たろう"],
    }
    expected = next(key for key, members in groups.items() if variant in members)
    assert match_key(variant) == match_key(expected)


def test_match_key_keeps_distinct_names_apart() -> None:
    assert match_key("斉藤") != match_key("斎藤")
    assert match_key("山田太郎") != match_key("山田次郎")
    assert match_key("JOHN SMITH") == match_key("john smith") == match_key("ｊｏｈｎ　ｓｍｉｔｈ")


@pytest.mark.parametrize(
    "variant", ["中央3-5-2", "中央３丁目５番地の２", "中央 3‐5‐2", "中央三丁目五番二号", "中央3丁目5番2号"]
)
def test_address_key_variants(variant: str) -> None:
    assert address_key(variant) == address_key("中央三丁目5番2号")


def test_address_key_keeps_place_names() -> None:
    assert address_key("三鷹台一丁目") == "三鷹台1"
    assert address_key("松ヶ丘二十一丁目") == address_key("松が丘21丁目")
    assert address_key("中央3-5-2") != address_key("中央3-5-3")


# --- property: the fast paths (printable check, translation tables, memoising) change nothing -----

def _reference_forbidden(text: str) -> bool:
    return any(
        unicodedata.category(c) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"} and c not in " \u3000" for c in text
    )


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=12))
def test_fast_paths_match_the_per_character_rules(text: str) -> None:
    try:
        names._refuse_forbidden(text)
        refused = False
    except names.InvalidText:
        refused = True
    assert refused == _reference_forbidden(text)
    assert names._widen_ascii(text) == "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)
    assert names.hiragana_to_katakana(text) == "".join(
        chr(ord(c) + 0x60) if "\u3041" <= c <= "\u3096" or c in "\u309d\u309e" else c for c in text
    )
