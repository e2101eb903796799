from __future__ import annotations

import collections
import datetime as dt
import itertools

import pytest
from juki.domain import (
    ResidentKind,
    is_municipality,
    is_valid_resident_code,
    validate_notification,
)
from juki.seeding.population import DEFAULT_REFERENCE_DATE, Relationship, generate

SAMPLE = 20_000


@pytest.fixture(scope="module")
def sample() -> list[object]:
    return list(generate(SAMPLE, seed=7))


def test_same_seed_same_people() -> None:
    assert list(generate(1000, seed=11)) == list(generate(1000, seed=11))
    assert list(generate(1000, seed=11)) != list(generate(1000, seed=12))


def test_prefix_stable_and_exact_count() -> None:
    assert list(generate(10, seed=3)) == list(itertools.islice(generate(1000, seed=3), 10))
    assert sum(1 for _ in generate(1234, seed=3)) == 1234


def test_codes_are_valid_and_unique(sample: list) -> None:  # type: ignore[type-arg]
    codes = [p.resident_code for p in sample]
    assert all(is_valid_resident_code(code) for code in codes)
    assert len(set(codes)) == len(codes)
    assert all(is_municipality(p.address.municipality_code) for p in sample)


def test_foreign_share(sample: list) -> None:  # type: ignore[type-arg]
    foreign = [p for p in sample if p.resident_kind is ResidentKind.FOREIGN]
    assert 0.015 <= len(foreign) / len(sample) <= 0.04
    assert all(p.alphabetic_name and p.honseki is None and p.nationality for p in foreign)
    assert any(p.common_name for p in foreign)
    japanese = [p for p in sample if p.resident_kind is ResidentKind.JAPANESE]
    assert all(p.honseki and p.hittousha and p.kana and p.alphabetic_name is None for p in japanese)


def test_age_pyramid(sample: list) -> None:  # type: ignore[type-arg]
    # Japan's shape: few children, the bulk between 45 and 75, a long old tail.
    bands = collections.Counter(p.birth_date.age_on(DEFAULT_REFERENCE_DATE) // 15 for p in sample)
    share = {band * 15: count / len(sample) for band, count in bands.items()}
    assert 0.05 < share[0] < 0.16
    assert share[0] < share[45] / 1.5 and share[0] < share[60] / 1.5
    assert share[45] + share[60] > 0.35
    assert share[75] > share[0] / 2
    assert all(0 <= p.birth_date.age_on(DEFAULT_REFERENCE_DATE) <= 110 for p in sample)


def test_households(sample: list) -> None:  # type: ignore[type-arg]
    households = collections.defaultdict(list)
    for person in sample:
        households[person.household_id].append(person)
    sizes = collections.Counter(len(members) for members in households.values())
    assert set(sizes) <= {1, 2, 3, 4, 5}
    assert sizes[1] > sizes[5]
    for members in households.values():
        assert members[0].relationship is Relationship.HEAD
        assert len({m.address for m in members}) == 1
        assert sum(m.relationship is Relationship.HEAD for m in members) == 1


def test_people_make_valid_notifications(sample: list) -> None:  # type: ignore[type-arg]
    day = dt.date(2024, 4, 1)
    for index, person in enumerate(sample[:3000]):
        found = validate_notification(person.entry_notification(f"seed-{index}", index + 1, day), day)
        assert found == [], (person, found)


def test_street_shape(sample: list) -> None:  # type: ignore[type-arg]
    assert all("丁目" in p.address.street and p.address.street.endswith("号") for p in sample[:100])


def test_municipality_choice() -> None:
    people = list(generate(500, seed=1, municipalities=["131148"]))
    assert {p.address.municipality_code for p in people} == {"131148"}
    with pytest.raises(ValueError):
        list(generate(1, seed=1, municipalities=["130001"]))
