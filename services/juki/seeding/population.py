"""A synthetic population, deterministic by seed, for seeding the mesh and for benchmarks.

Shaped like Japan's: real municipality codes, households of 1–5 (世帯主, 妻/夫, 子), an ageing age
pyramid (few children, a bulge at 45–75), about 2.5 % foreign residents with alphabetic names and
sometimes a 通称. Japanese residents carry 本籍 and 筆頭者.

Speed: Faker is only a source of name lists here (its ja_JP (kanji, kana, romaji) pairs keep a name and
its reading consistent); nothing calls Faker per person. Per-person work is a handful of
``random.Random`` draws, so a million people take seconds and ten million stream in constant memory.
Resident codes come from a seeded bijection of the person's index (no collisions up to 2**33 people),
not from independent draws, which would collide a few thousand times in ten million.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import enum
import itertools
import random
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from juki.domain.changes import ChangeKind
from juki.domain.codes import is_municipality, municipality, resident_code_from_body
from juki.domain.validation import Notification
from juki.domain.values import Address, PartialDate, ResidentKind, Sex

__all__ = [
    "DEFAULT_MUNICIPALITIES",
    "DEFAULT_REFERENCE_DATE",
    "FOREIGN_SHARE",
    "Person",
    "Relationship",
    "generate",
]

DEFAULT_MUNICIPALITIES: Mapping[str, float] = {
    "131148": 6.0,  # 東京都中野区
    "131130": 3.0,  # 東京都渋谷区
    "131016": 1.0,  # 東京都千代田区
    "132012": 2.0,  # 東京都八王子市
    "141003": 8.0,  # 神奈川県横浜市
    "271004": 6.0,  # 大阪府大阪市
    "011002": 4.0,  # 北海道札幌市
    "231002": 4.0,  # 愛知県名古屋市
    "401307": 3.0,  # 福岡県福岡市
    "261009": 2.0,  # 京都府京都市
    "472018": 1.0,  # 沖縄県那覇市
    "032026": 0.5,  # 岩手県宮古市
}
"""Default weights (not to scale): 中野区 prominent, as in the project's story."""

DEFAULT_REFERENCE_DATE = _dt.date(2024, 4, 1)
"""The date ages are computed against, unless one is given."""

FOREIGN_SHARE = 0.025
"""Share of households that are foreign residents (about 2.5 % of Japan's population)."""


class Relationship(enum.Enum):
    """続柄: the member's relation to the head of household."""

    HEAD = "世帯主"
    WIFE = "妻"
    HUSBAND = "夫"
    CHILD = "子"
    PARENT = "父母"


@dataclass(frozen=True, slots=True)
class Person:
    """One resident as the municipality's 住民票 holds them."""

    resident_code: str
    resident_kind: ResidentKind
    family_name: str
    given_name: str
    kana: str | None
    alphabetic_name: str | None
    common_name: str | None
    birth_date: PartialDate
    sex: Sex
    address: Address
    household_id: int
    relationship: Relationship
    nationality: str | None
    honseki: str | None
    """本籍 (Japanese only)."""
    hittousha: str | None
    """筆頭者 of the family register (Japanese only)."""

    def entry_notification(
        self, notification_id: str, sequence: int, occurred_on: _dt.date, notified_on: _dt.date | None = None
    ) -> Notification:
        """The person as a 職権記載 (EX_OFFICIO_ENTRY) notification, for seeding a registry."""
        return Notification(
            notification_id=notification_id,
            municipality_code=self.address.municipality_code,
            sequence=sequence,
            change_kind=ChangeKind.EX_OFFICIO_ENTRY,
            resident_code=self.resident_code,
            resident_kind=self.resident_kind,
            family_name=self.family_name,
            given_name=self.given_name,
            kana=self.kana,
            alphabetic_name=self.alphabetic_name,
            common_name=self.common_name,
            birth_date=self.birth_date,
            sex=self.sex,
            address=self.address,
            occurred_on=occurred_on,
            notified_on=notified_on or occurred_on,
        )


# Japan's population by five-year age band (millions, 2020 census, rounded): 0–4 ... 100–104.
_AGE_BANDS = (
    4.5,
    5.0,
    5.3,
    5.6,
    6.3,
    6.4,
    6.8,
    7.6,
    8.6,
    9.8,
    8.8,
    7.9,
    7.4,
    8.2,
    9.0,
    7.0,
    5.4,
    3.6,
    1.8,
    0.5,
    0.08,
)
# Household sizes 1..5 (share of households, roughly the 2020 census).
_HOUSEHOLD_SIZES = (0.38, 0.28, 0.17, 0.12, 0.05)

_EXTRA_FAMILY_NAMES = (
    ("中村", "ナカムラ"),
    ("小林", "コバヤシ"),
    ("加藤", "カトウ"),
    ("吉田", "ヨシダ"),
    ("山口", "ヤマグチ"),
    ("松本", "マツモト"),
    ("井上", "イノウエ"),
    ("木村", "キムラ"),
    ("林", "ハヤシ"),
    ("清水", "シミズ"),
    ("山崎", "ヤマザキ"),
    ("森", "モリ"),
    ("池田", "イケダ"),
    ("橋本", "ハシモト"),
    ("阿部", "アベ"),
    ("石川", "イシカワ"),
    ("山下", "ヤマシタ"),
    ("中島", "ナカジマ"),
    ("石井", "イシイ"),
    ("小川", "オガワ"),
    ("前田", "マエダ"),
    ("岡田", "オカダ"),
    ("長谷川", "ハセガワ"),
    ("藤田", "フジタ"),
    ("後藤", "ゴトウ"),
    ("近藤", "コンドウ"),
    ("村上", "ムラカミ"),
    ("遠藤", "エンドウ"),
    ("青木", "アオキ"),
    ("坂本", "サカモト"),
    ("斉藤", "サイトウ"),
    ("福田", "フクダ"),
    ("太田", "オオタ"),
    ("西村", "ニシムラ"),
    ("藤井", "フジイ"),
    ("金子", "カネコ"),
    ("岡本", "オカモト"),
    ("藤原", "フジワラ"),
    ("中野", "ナカノ"),
    ("三浦", "ミウラ"),
    ("原田", "ハラダ"),
    ("中川", "ナカガワ"),
    ("松田", "マツダ"),
    ("竹内", "タケウチ"),
    ("小野", "オノ"),
    ("田村", "タムラ"),
    ("中山", "ナカヤマ"),
    ("和田", "ワダ"),
    ("石田", "イシダ"),
    ("森田", "モリタ"),
    ("上田", "ウエダ"),
    ("原", "ハラ"),
    ("内田", "ウチダ"),
    ("柴田", "シバタ"),
    ("酒井", "サカイ"),
    ("宮崎", "ミヤザキ"),
    ("横山", "ヨコヤマ"),
    ("高木", "タカギ"),
    ("安藤", "アンドウ"),
    ("宮本", "ミヤモト"),
)
_EXTRA_MALE_NAMES = (
    ("大輔", "ダイスケ"),
    ("健太", "ケンタ"),
    ("翔太", "ショウタ"),
    ("拓也", "タクヤ"),
    ("浩", "ヒロシ"),
    ("誠", "マコト"),
    ("隆", "タカシ"),
    ("茂", "シゲル"),
    ("勇", "イサム"),
    ("清", "キヨシ"),
    ("博", "ヒロシ"),
    ("正人", "マサト"),
    ("和夫", "カズオ"),
    ("健一", "ケンイチ"),
    ("蓮", "レン"),
    ("悠真", "ユウマ"),
    ("湊", "ミナト"),
    ("大和", "ヤマト"),
    ("陽翔", "ハルト"),
    ("修", "オサム"),
)
_EXTRA_FEMALE_NAMES = (
    ("陽子", "ヨウコ"),
    ("恵子", "ケイコ"),
    ("幸子", "サチコ"),
    ("和子", "カズコ"),
    ("洋子", "ヨウコ"),
    ("裕子", "ユウコ"),
    ("美穂", "ミホ"),
    ("愛", "アイ"),
    ("彩", "アヤ"),
    ("葵", "アオイ"),
    ("結衣", "ユイ"),
    ("陽菜", "ヒナ"),
    ("さくら", "サクラ"),
    ("美咲", "ミサキ"),
    ("真由美", "マユミ"),
    ("久美子", "クミコ"),
    ("直美", "ナオミ"),
    ("智子", "トモコ"),
    ("由美", "ユミ"),
    ("芽依", "メイ"),
)
_TOWNS = (
    "中央",
    "本町",
    "栄町",
    "東町",
    "西町",
    "南町",
    "北町",
    "緑町",
    "旭町",
    "若葉",
    "桜台",
    "松が丘",
    "新町",
    "大和町",
    "宮前",
    "弥生町",
    "富士見町",
    "日の出町",
    "青葉台",
    "平和台",
    "泉町",
    "住吉町",
)
_NAKANO_TOWNS = (
    "中央",
    "中野",
    "東中野",
    "本町",
    "弥生町",
    "南台",
    "野方",
    "鷺宮",
    "上高田",
    "新井",
    "沼袋",
    "松が丘",
    "江古田",
    "江原町",
    "丸山",
    "若宮",
    "白鷺",
    "大和町",
    "上鷺宮",
)
_KANJI_NUMBERS = ("一", "二", "三", "四", "五", "六", "七", "八", "九")
# (nationality, weight, Faker person locale, uses 通称 sometimes)
_NATIONALITIES = (
    ("CN", 0.30, "zh_CN", True),
    ("VN", 0.18, "vi_VN", False),
    ("KR", 0.14, "ko_KR", True),
    ("PH", 0.10, "en_US", False),
    ("BR", 0.07, "pt_BR", False),
    ("NP", 0.05, "en_US", False),
    ("ID", 0.05, "id_ID", False),
    ("US", 0.04, "en_US", False),
    ("TH", 0.03, "en_US", False),
    ("GB", 0.04, "en_US", False),
)
_KOREAN_ROMANIZED_FAMILY = (
    "KIM",
    "LEE",
    "PARK",
    "CHOI",
    "JUNG",
    "KANG",
    "CHO",
    "YOON",
    "JANG",
    "LIM",
    "HAN",
    "SHIN",
)
_KOREAN_ROMANIZED_GIVEN = (
    "MINJUN",
    "SEOYEON",
    "JIHOON",
    "JIWOO",
    "HYUNWOO",
    "SUBIN",
    "YOUNGHO",
    "EUNJI",
    "SUNGMIN",
    "HAEUN",
)

_MASK = (1 << 33) - 1


def _cumulative(weights: Sequence[float]) -> list[float]:
    return list(itertools.accumulate(weights))


def _pick(rng: random.Random, cumulative: Sequence[float]) -> int:
    return bisect.bisect_right(cumulative, rng.random() * cumulative[-1])


def _mix(index: int, key: int) -> int:
    """A seeded bijection on 33-bit integers (odd multiplications and xorshifts are invertible)."""
    value = (index + key) & _MASK
    value = (value * 0x1_5A4E_35) & _MASK
    value ^= value >> 17
    value = (value * 0x9E37_79B1) & _MASK
    value ^= value >> 13
    value = (value * 0x27F4_A7C5) & _MASK
    value ^= value >> 16
    return value


def _ascii_upper(text: str) -> str:
    """Upper-case Latin without diacritics, as on a residence card (Nguyễn -> NGUYEN)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).upper()


@dataclass(frozen=True, slots=True)
class _Pools:
    family: tuple[tuple[str, str], ...]
    male: tuple[tuple[str, str], ...]
    female: tuple[tuple[str, str], ...]
    foreign: Mapping[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]]


def _build_pools(rng: random.Random) -> _Pools:
    from juki.extras import need

    need("faker", "seed", "the synthetic population")
    from faker.providers.person.en_US import Provider as English
    from faker.providers.person.id_ID import Provider as Indonesian
    from faker.providers.person.ja_JP import Provider as Japanese
    from faker.providers.person.pt_BR import Provider as Portuguese
    from faker.providers.person.vi_VN import Provider as Vietnamese
    from faker.providers.person.zh_CN import Provider as Chinese

    def unique(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        return tuple(dict.fromkeys(pairs))

    family = unique(
        [(kanji, kana) for kanji, kana, _ in Japanese.last_name_pairs] + list(_EXTRA_FAMILY_NAMES)
    )
    male = unique(
        [(kanji, kana) for kanji, kana, _ in Japanese.first_name_male_pairs] + list(_EXTRA_MALE_NAMES)
    )
    female = unique(
        [(kanji, kana) for kanji, kana, _ in Japanese.first_name_female_pairs] + list(_EXTRA_FEMALE_NAMES)
    )

    def names(values: object) -> tuple[str, ...]:
        listed = sorted({_ascii_upper(str(v)) for v in values})  # type: ignore[attr-defined]
        rng.shuffle(listed)
        return tuple(name for name in listed[:400] if name.replace(" ", "").replace("-", "").isalpha())

    foreign = {
        "zh_CN": (
            names(Chinese.last_romanized_names),
            names(Chinese.first_romanized_names),
            names(Chinese.first_romanized_names),
        ),
        "vi_VN": (
            names(Vietnamese.last_names),
            names(Vietnamese.first_names_male),
            names(Vietnamese.first_names_female),
        ),
        "ko_KR": (_KOREAN_ROMANIZED_FAMILY, _KOREAN_ROMANIZED_GIVEN, _KOREAN_ROMANIZED_GIVEN),
        "pt_BR": (
            names(Portuguese.last_names),
            names(Portuguese.first_names_male),
            names(Portuguese.first_names_female),
        ),
        "id_ID": (
            names(Indonesian.last_names),
            names(Indonesian.first_names_male),
            names(Indonesian.first_names_female),
        ),
        "en_US": (
            names(English.last_names),
            names(English.first_names_male),
            names(English.first_names_female),
        ),
    }
    return _Pools(family, male, female, foreign)


def _check_municipalities(
    municipalities: Mapping[str, float] | Sequence[str],
) -> tuple[list[str], list[float]]:
    if isinstance(municipalities, Mapping):
        codes, weights = list(municipalities.keys()), [float(w) for w in municipalities.values()]
    else:
        codes, weights = list(municipalities), [1.0] * len(municipalities)
    unknown = [code for code in codes if not is_municipality(code)]
    if unknown or not codes or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"municipalities must be listed JIS X 0402 city codes with positive weights: {unknown}"
        )
    return codes, weights


def _full_name(code: str) -> str:
    entry = municipality(code)
    if entry is None:  # pragma: no cover - _check_municipalities refuses unknown codes first
        raise ValueError(code)
    return entry.full_name


class _Generator:
    """State of one generation run: the seeded random stream, pools and running counters."""

    def __init__(
        self,
        seed: int,
        municipalities: Mapping[str, float] | Sequence[str],
        reference_date: _dt.date,
        foreign_share: float,
    ) -> None:
        self.rng = random.Random(seed)
        self.code_key = random.Random(f"resident-codes:{seed}").getrandbits(33)
        self.pools = _build_pools(random.Random(f"pools:{seed}"))
        codes, weights = _check_municipalities(municipalities)
        self.codes = codes
        self.code_weights = _cumulative(weights)
        self.names = {code: _full_name(code) for code in codes}
        self.towns = {code: _NAKANO_TOWNS if code == "131148" else _TOWNS for code in codes}
        self.reference_ordinal = reference_date.toordinal()
        self.foreign_share = foreign_share
        self.ages = _cumulative(_AGE_BANDS)
        # Heads of household are adults; heads with children at home are 25-69.
        # Weights tuned so that the people, not the heads, follow the pyramid: households without
        # children at home are mostly older (single elderly, couples whose children left).
        self.adult_ages = _cumulative(
            [w * (2.5 if band >= 12 else 1.0) for band, w in enumerate(_AGE_BANDS) if band >= 4]
        )
        self.parent_ages = _cumulative(
            [w * (0.8 if band >= 11 else 1.0) for band, w in enumerate(_AGE_BANDS) if 6 <= band <= 16]
        )
        self.sizes = _cumulative(_HOUSEHOLD_SIZES)
        self.nationalities = _cumulative([weight for _, weight, _, _ in _NATIONALITIES])
        self.index = 0
        self.household = 0

    def adult_age(self, with_children: bool) -> int:
        rng = self.rng
        if with_children:
            return 30 + _pick(rng, self.parent_ages) * 5 + rng.randrange(5)
        return 20 + _pick(rng, self.adult_ages) * 5 + rng.randrange(5)

    def birth_date(self, age: int, foreign: bool) -> PartialDate:
        rng = self.rng
        ordinal = self.reference_ordinal - int(age * 365.2425) - rng.randrange(1, 366)
        born = _dt.date.fromordinal(ordinal)
        if foreign and age >= 20 and rng.random() < 0.02:
            # 生年月日不詳: a few foreign residents have no known day, or no known month and day.
            return PartialDate(born.year, born.month) if rng.random() < 0.7 else PartialDate(born.year)
        return PartialDate(born.year, born.month, born.day)

    def resident_code(self) -> str:
        code = resident_code_from_body(1_000_000_000 + _mix(self.index, self.code_key))
        self.index += 1
        return code

    def street(self, code: str) -> tuple[str, str]:
        rng = self.rng
        town = rng.choice(self.towns[code])
        chome = _KANJI_NUMBERS[rng.randrange(5)]
        ban = rng.randrange(1, 31)
        return f"{town}{chome}丁目{ban}番{rng.randrange(1, 26)}号", f"{town}{chome}丁目{ban}番地"

    def household_members(self, size: int) -> list[tuple[Relationship, int, Sex]]:
        """(relationship, age, sex) of each member, head first."""
        rng = self.rng
        with_children = size >= 3 or (size == 2 and rng.random() < 0.3)
        head_age = self.adult_age(with_children)
        couple = size >= 2 and not (size == 2 and with_children) and rng.random() < 0.92
        if size == 1:
            head_sex = Sex.FEMALE if rng.random() < (0.6 if head_age >= 65 else 0.45) else Sex.MALE
        else:
            head_sex = Sex.MALE if rng.random() < (0.9 if couple else 0.5) else Sex.FEMALE
        members = [(Relationship.HEAD, head_age, head_sex)]
        if couple:
            spouse_age = max(18, head_age + rng.randint(-6, 3))
            spouse = Relationship.WIFE if head_sex is Sex.MALE else Relationship.HUSBAND
            members.append((spouse, spouse_age, Sex.FEMALE if head_sex is Sex.MALE else Sex.MALE))
        while len(members) < size:
            if size >= 3 and len(members) == size - 1 and rng.random() < 0.12 and head_age < 60:
                members.append(
                    (Relationship.PARENT, head_age + rng.randint(25, 35), rng.choice((Sex.MALE, Sex.FEMALE)))
                )
                continue
            child_age = head_age - rng.randint(22, 40)
            if child_age < 0:
                child_age = rng.randrange(max(1, head_age - 20))
            members.append((Relationship.CHILD, child_age, Sex.MALE if rng.random() < 0.512 else Sex.FEMALE))
        return members

    def households(self) -> Iterator[Person]:
        rng = self.rng
        pools = self.pools
        while True:
            self.household += 1
            household = self.household
            code = self.codes[_pick(rng, self.code_weights)]
            street, lot = self.street(code)
            address = Address(code, street)
            size = _pick(rng, self.sizes) + 1
            members = self.household_members(size)
            if rng.random() < self.foreign_share:
                yield from self.foreign_household(household, address, members)
                continue
            family, family_kana = rng.choice(pools.family)
            # 本籍: often where the family lives, otherwise another of the chosen municipalities.
            if rng.random() < 0.6:
                honseki = self.names[code] + lot
            else:
                elsewhere = self.codes[_pick(rng, self.code_weights)]
                honseki = self.names[elsewhere] + self.street(elsewhere)[1]
            given_names = [
                rng.choice(pools.male if sex is Sex.MALE else pools.female) for _, _, sex in members
            ]
            # 筆頭者: the husband of a married couple, otherwise the head (or, for a young single head,
            # a parent whose register they are still in).
            register_head = 0
            if len(members) > 1 and members[1][0] is Relationship.HUSBAND:
                register_head = 1
            register_head_name = given_names[register_head][0]
            if len(members) == 1 and members[0][1] < 35 and rng.random() < 0.6:
                register_head_name = rng.choice(pools.male)[0]
            for (relationship, age, sex), (given, given_kana) in zip(members, given_names, strict=True):
                own_register = relationship is Relationship.PARENT
                yield Person(
                    resident_code=self.resident_code(),
                    resident_kind=ResidentKind.JAPANESE,
                    family_name=family,
                    given_name=given,
                    kana=f"{family_kana}\u3000{given_kana}",
                    alphabetic_name=None,
                    common_name=None,
                    birth_date=self.birth_date(age, False),
                    sex=sex,
                    address=address,
                    household_id=household,
                    relationship=relationship,
                    nationality=None,
                    honseki=honseki,
                    hittousha=f"{family}\u3000{given if own_register else register_head_name}",
                )

    def foreign_household(
        self, household: int, address: Address, members: list[tuple[Relationship, int, Sex]]
    ) -> Iterator[Person]:
        rng = self.rng
        nationality, _, locale, uses_common_name = _NATIONALITIES[_pick(rng, self.nationalities)]
        families, males, females = self.pools.foreign[locale]
        family = rng.choice(families)
        common_family = rng.choice(self.pools.family)[0] if uses_common_name and rng.random() < 0.3 else None
        for relationship, age, sex in members:
            given = rng.choice(males if sex is Sex.MALE else females)
            common_name = None
            if common_family is not None:
                common_name = f"{common_family}\u3000{rng.choice(self.pools.male if sex is Sex.MALE else self.pools.female)[0]}"
            yield Person(
                resident_code=self.resident_code(),
                resident_kind=ResidentKind.FOREIGN,
                family_name=family,
                given_name=given,
                kana=None,
                alphabetic_name=f"{family} {given}",
                common_name=common_name,
                birth_date=self.birth_date(age, True),
                sex=sex,
                address=address,
                household_id=household,
                relationship=relationship,
                nationality=nationality,
                honseki=None,
                hittousha=None,
            )


def generate(
    n: int,
    seed: int = 0,
    municipalities: Mapping[str, float] | Sequence[str] | None = None,
    *,
    reference_date: _dt.date = DEFAULT_REFERENCE_DATE,
    foreign_share: float = FOREIGN_SHARE,
) -> Iterator[Person]:
    """Stream ``n`` synthetic residents, the same ones for the same arguments.

    ``municipalities`` is a list of JIS X 0402 city codes (equal weights) or a mapping code -> weight;
    by default :data:`DEFAULT_MUNICIPALITIES`. Ages are as of ``reference_date``. People come household
    by household (members share ``household_id`` and address); the last household may be cut short.
    Nothing is held in memory beyond the current household, so ``n`` may be tens of millions.
    """
    if n < 0:
        raise ValueError("n must not be negative")
    if not 0.0 <= foreign_share <= 1.0:
        raise ValueError("foreign_share is a fraction between 0 and 1")
    state = _Generator(
        seed,
        DEFAULT_MUNICIPALITIES if municipalities is None else municipalities,
        reference_date,
        foreign_share,
    )
    return itertools.islice(state.households(), n)
