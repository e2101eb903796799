"""The access log's pure parts: pseudonyms, canonical bytes, chain hashes, checkpoint payloads, check digits."""

from __future__ import annotations

import hashlib
import hmac
import random

from hypothesis import given
from hypothesis import strategies as st
from juki.accesslog import chain
from juki.accesslog.service import valid_code
from juki.domain import is_valid_resident_code


@given(st.binary(min_size=1, max_size=200), st.text(alphabet="0123456789", min_size=1, max_size=20))
def test_pseudonymiser_is_hmac_sha256(key: bytes, code: str) -> None:
    assert chain.Pseudonymiser(key)(code) == hmac.digest(key, code.encode(), "sha256") == chain.pseudonym(key, code)


def test_no_code_no_pseudonym() -> None:
    assert chain.Pseudonymiser(b"k" * 32)("") == b"" == chain.pseudonym(b"k" * 32, "")


def test_chain_hash_follows_the_proto_definition() -> None:
    canonical = chain.canonical_bytes(1, 2, 3, 1, b"s" * 32, b"payload")
    assert canonical[:8] == (1).to_bytes(8, "big") and canonical[-7:] == b"payload"
    expected = hashlib.sha256(bytes(32) + hashlib.sha256(canonical).digest()).digest()
    assert chain.next_hash(chain.GENESIS, canonical) == expected


def test_every_stored_column_changes_the_canonical_bytes() -> None:
    base = (5, 1_700_000_000_000_000, 1_700_000_000_000_001, 1, b"a" * 32, b"payload")
    variants = [
        (6, *base[1:]), (base[0], base[1] + 1, *base[2:]), (*base[:2], base[2] + 1, *base[3:]),
        (*base[:3], 2, *base[4:]), (*base[:4], b"b" * 32, base[5]), (*base[:5], b"payloaD"),
        (*base[:4], b"", b"a" * 32 + b"payload"),  # a subject cannot slide into the payload
    ]
    assert len({chain.canonical_bytes(*v) for v in [base, *variants]}) == len(variants) + 1  # type: ignore[arg-type]


def test_checkpoint_payload_is_the_documented_text() -> None:
    digest = bytes(range(32))
    payload = chain.checkpoint_payload(42, digest, 1_700_000_000_000_000_123)
    assert payload == f"juki-accesslog-checkpoint-v1\n42\n{digest.hex()}\n1700000000.000000123\n".encode()
    assert chain.checkpoint_payload(42, digest, 5, purge=True).startswith(b"juki-accesslog-purge-v1\n42\n")


def test_fast_check_digit_agrees_with_the_domain() -> None:
    rng = random.Random(5)
    samples = ["24727059608", "24846016224", "25208017643", "2472705960", "247270596080", "２４７２７０５９６０８",
               "2472705960a", ""]
    samples += ["".join(rng.choice("0123456789") for _ in range(11)) for _ in range(20_000)]
    for code in samples:
        assert valid_code(code) == is_valid_resident_code(code), code
