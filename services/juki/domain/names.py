"""Normalisation of names and addresses, and tolerant keys for four-item (基本4情報) matching.

Municipal systems send the same name in many spellings: half-width katakana from old terminals,
ideographic spaces (U+3000) or none between family and given name, hiragana readings, ASCII letters in
Japanese names. Two functions families keep this in one place:

* ``normalise_*`` produce the one stored spelling (what the registry keeps and returns) and refuse text
  that cannot be a name (control characters, empty, too long). They raise :class:`InvalidText`.
* :func:`match_key` and :func:`address_key` are lossy comparison keys, used only to find candidates
  ("山田　太郎", "山田 太郎" and "ﾔﾏﾀﾞ ﾀﾛｳ" vs "やまだたろう" compare equal); never stored or shown.
"""

from __future__ import annotations

import functools
import re
import unicodedata

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_STREET_LENGTH",
    "InvalidText",
    "address_key",
    "hiragana_to_katakana",
    "match_key",
    "normalise_alphabetic_name",
    "normalise_kana",
    "normalise_name",
    "normalise_street",
]

MAX_NAME_LENGTH = 100
"""Upper bound, in characters after normalisation, of one name part (family name, given name, ...)."""

MAX_STREET_LENGTH = 200
"""Upper bound of the street part of an address (the municipality is a separate code)."""

IDEOGRAPHIC_SPACE = "\u3000"

_CACHE_SIZE = 1 << 16
"""Normalisers are pure and names repeat (common family names, one municipality's streets): they are
memoised per text (refusals, which raise, are not)."""

# Control, format, surrogate, private-use and unassigned code points, and line/paragraph separators.
# Private use (外字) is refused rather than guessed at: a registry must not store glyphs only one
# vendor's font can show.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_HALF_WIDTH_KATAKANA = re.compile("[\uff61-\uff9f]+")
_WHITESPACE = re.compile(r"\s+")
_KATAKANA_NAME = re.compile("[\u30a1-\u30fa\u30fc\u30fd\u30fe\u30fb\u3000]+")
_ALPHABETIC_NAME = re.compile(r"[A-Z\u00c0-\u024f\u1e00-\u1eff][A-Z\u00c0-\u024f\u1e00-\u1eff .,'\-]*")

# Glyph variants of one character that appear in the same person's records (髙/高, 﨑/崎); the list is
# deliberately short: 斉藤 and 斎藤 are different names and must not match.
_GLYPH_VARIANTS = str.maketrans({"髙": "高", "﨑": "崎", "濵": "浜", "德": "徳", "栁": "柳", "邉": "邊"})


class InvalidText(ValueError):
    """Text that cannot be stored as a name or address; ``description`` is fit for a FieldViolation."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


def _refuse_forbidden(text: str) -> None:
    if text.isprintable():
        # Every forbidden category is non-printable for str.isprintable (same Unicode database), so
        # printable text needs no per-character look-up.
        return
    for character in text:
        if unicodedata.category(character) in _FORBIDDEN_CATEGORIES and character not in " \u3000":
            raise InvalidText(f"contains a control or unassigned character U+{ord(character):04X}")


def _bound(text: str, maximum: int) -> str:
    if not text:
        raise InvalidText("must not be empty")
    if len(text) > maximum:
        raise InvalidText(f"is {len(text)} characters long, at most {maximum} are allowed")
    return text


def _widen_half_width_katakana(text: str) -> str:
    # NFKC on the half-width runs only: it joins ｶﾞ into ガ, while leaving the rest of the text (kanji
    # compatibility forms, full-width digits) exactly as written.
    return _HALF_WIDTH_KATAKANA.sub(lambda match: unicodedata.normalize("NFKC", match.group()), text)


_WIDE_ASCII = {code: code + 0xFEE0 for code in range(ord("!"), ord("~") + 1)}
_HIRAGANA_TO_KATAKANA = {code: code + 0x60 for code in (*range(0x3041, 0x3097), 0x309D, 0x309E)}


def _widen_ascii(text: str) -> str:
    return text.translate(_WIDE_ASCII)


def hiragana_to_katakana(text: str) -> str:
    """Map hiragana (ぁ-ゖ, ゝゞ) to the corresponding katakana; everything else is kept."""
    return text.translate(_HIRAGANA_TO_KATAKANA)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def normalise_name(text: str, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """Normalise a Japanese-script name part (氏, 名, 旧氏, 通称) to its stored spelling.

    NFC; half-width katakana become full-width; ASCII letters and digits become full-width, as in the
    registry's character set; runs of spaces (ASCII or U+3000) become one U+3000; ends are trimmed.
    """
    _refuse_forbidden(text)
    normal = unicodedata.normalize("NFC", text)
    normal = _widen_half_width_katakana(normal)
    normal = _WHITESPACE.sub(IDEOGRAPHIC_SPACE, normal.strip())
    normal = _widen_ascii(normal)
    return _bound(normal, max_length)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def normalise_kana(text: str, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """Normalise a reading (フリガナ) to full-width katakana with U+3000 between words.

    Hiragana is accepted and converted; anything but katakana, ー, ・ and spaces is refused.
    """
    normal = hiragana_to_katakana(normalise_name(text, max_length=max_length))
    if not _KATAKANA_NAME.fullmatch(normal):
        raise InvalidText("must be written in katakana")
    return normal


@functools.lru_cache(maxsize=_CACHE_SIZE)
def normalise_alphabetic_name(text: str, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """Normalise a foreign resident's alphabetic name as on the residence card: upper case, ASCII spaces.

    NFKC (full-width letters become ASCII), one space between words, upper case; Latin letters
    (accented ones included), space, hyphen, apostrophe, comma and full stop only.
    """
    _refuse_forbidden(text)
    normal = unicodedata.normalize("NFKC", text)
    normal = _WHITESPACE.sub(" ", normal.strip()).upper()
    normal = _bound(normal, max_length)
    if not _ALPHABETIC_NAME.fullmatch(normal):
        raise InvalidText("must be written in Latin letters")
    return normal


@functools.lru_cache(maxsize=_CACHE_SIZE)
def normalise_street(text: str, *, max_length: int = MAX_STREET_LENGTH) -> str:
    """Normalise the street part of an address (町名・番地): NFC, full-width kana, single U+3000 spaces."""
    _refuse_forbidden(text)
    normal = unicodedata.normalize("NFC", text)
    normal = _widen_half_width_katakana(normal)
    normal = _WHITESPACE.sub(IDEOGRAPHIC_SPACE, normal.strip())
    return _bound(normal, max_length)


def match_key(text: str) -> str:
    """A lossy key under which spellings of one name compare equal.

    NFKC (half-width/full-width folded), case folded, every space and ・ removed, hiragana read as
    katakana, a few glyph variants unified. Used for candidate search only, never stored.
    """
    key = unicodedata.normalize("NFKC", text).casefold()
    key = "".join(c for c in key if not c.isspace() and c not in "・･·")
    return hiragana_to_katakana(key).translate(_GLYPH_VARIANTS)


_KANJI_DIGITS = {
    "〇": 0,
    "零": 0,
    "一": 1,
    "二": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
}
_KANJI_UNITS = {"十": 10, "百": 100, "千": 1000}
_KANJI_NUMBER_BEFORE_BLOCK = re.compile("([〇零一二三四五六七八九十百千]+)(?=丁目|番地|番|号)")
_BLOCK_SEPARATORS = re.compile("(?<=[0-9])(?:丁目|番地の?|番|号|の|之|ノ|[-‐‑‒–—―−－ーｰ])")
_KE = re.compile("(?<=[\u4e00-\u9fff])[ヶケがガヵ](?=[\u4e00-\u9fff])")


def _kanji_to_int(numeral: str) -> int:
    """Read a kanji numeral (三, 十二, 二十五, 一〇五, 千二百) as an integer."""
    if all(c in _KANJI_DIGITS for c in numeral):
        return int("".join(str(_KANJI_DIGITS[c]) for c in numeral))
    total = 0
    pending = 0
    for character in numeral:
        if character in _KANJI_DIGITS:
            pending = _KANJI_DIGITS[character]
        else:
            total += (pending or 1) * _KANJI_UNITS[character]
            pending = 0
    return total + pending


def address_key(text: str) -> str:
    """A lossy key under which spellings of one street address compare equal.

    "中央三丁目5番2号", "中央3-5-2", "中央３丁目５番地の２" and "中央 3‐5‐2" give one key: NFKC, spaces
    removed, kanji numerals before 丁目/番/号 read as digits, block separators turned into "-",
    ヶ/ケ/が between kanji unified. Kanji numerals elsewhere (三鷹, 八王子) are part of names and kept.
    """
    key = unicodedata.normalize("NFKC", text).casefold()
    key = "".join(c for c in key if not c.isspace())
    key = _KANJI_NUMBER_BEFORE_BLOCK.sub(lambda match: str(_kanji_to_int(match.group(1))), key)
    key = _BLOCK_SEPARATORS.sub("-", key)
    key = re.sub("-+", "-", key).rstrip("-")
    return hiragana_to_katakana(_KE.sub("ケ", key)).translate(_GLYPH_VARIANTS)
