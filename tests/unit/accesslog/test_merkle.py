"""The Merkle tree module against published vectors and an independent, literal RFC 9162 reference."""

from __future__ import annotations

import base64
import functools
import hashlib

import pytest
from juki.accesslog import merkle

# The leaves of the RFC 6962 reference tests, over which the transparency-dev/merkle test vectors
# (testdata/inclusion/*/happy-path.json, testdata/consistency/*/happy-path.json) are computed.
LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f",
)]


def b64(text: str) -> bytes:
    return base64.b64decode(text)


# (leaf index, tree size, root, proof) from transparency-dev/merkle testdata/inclusion/{0,1,2,3,4}/happy-path.json
INCLUSION_VECTORS = [
    (0, 1, "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=", []),
    (0, 8, "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=", "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="]),
    (5, 8, "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     ["vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms=", "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
      "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
    (2, 3, "rra8/idLcKFPsGel5VeCZNsPqbUa9eC6FZFY8yngbnc=", ["+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU="]),
    (1, 5, "Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=",
     ["bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=", "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms="]),
]
# (size1, size2, root1, root2, proof) from testdata/consistency/{0,1,2,3,4}/happy-path.json
CONSISTENCY_VECTORS = [
    (1, 1, "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=", "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=", []),
    (1, 8, "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=", "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=", "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
      "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="]),
    (6, 8, "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=", "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=", "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
      "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
    (2, 5, "+sVCA+fMaWzw38tCySodnbr3CtnmIfS9jZhmLwDjwSU=", "Tju7H3tHjc/nH7YxYxUZo7yhLJrvyhYSv85ME6hiZNQ=",
     ["Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=", "vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms="]),
    (6, 7, "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=", "3bib5AOAnjJXUNPSY814kpwpQreUKjS3fhIslZSnTIw=",
     ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=", "sIaT7C5yFZcTBkHoIR5+7cy0wmQTlj7ubB4u0W/7Gl8=",
      "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="]),
]


# -- an independent reference: RFC 9162 §2.1.1, §2.1.3.1 and §2.1.4.1 written as literally as possible --

def ref_mth(leaves: tuple[bytes, ...]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: tuple[bytes, ...]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: tuple[bytes, ...], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [ref_mth(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, leaves[:k], b), ref_mth(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


def oracle(leaves: tuple[bytes, ...]) -> merkle.NodeOracle:
    @functools.cache
    def node(level: int, index: int) -> bytes:
        return ref_mth(leaves[index << level:(index + 1) << level])
    return node


DATA = tuple(f"record {i}".encode() for i in range(70))


def test_published_inclusion_vectors() -> None:
    for index, size, root, proof in INCLUSION_VECTORS:
        node = oracle(tuple(LEAVES[:size]))
        assert merkle.root(size, node) == b64(root)
        assert merkle.inclusion_proof(index, size, node) == [b64(p) for p in proof]
        assert merkle.verify_inclusion(merkle.leaf_hash(LEAVES[index]), index, size, [b64(p) for p in proof], b64(root))


def test_published_consistency_vectors() -> None:
    for first, second, root1, root2, proof in CONSISTENCY_VECTORS:
        node = oracle(tuple(LEAVES[:second]))
        assert merkle.root(first, node) == b64(root1) and merkle.root(second, node) == b64(root2)
        assert merkle.consistency_proof(first, second, node) == [b64(p) for p in proof]
        assert merkle.verify_consistency(first, second, b64(root1), b64(root2), [b64(p) for p in proof])


def test_roots_match_the_recursive_definition_for_every_size() -> None:
    frontier = merkle.Frontier()
    assert frontier.root() == merkle.EMPTY_ROOT == ref_mth(())
    for size in range(1, 71):
        frontier.append(merkle.leaf_hash(DATA[size - 1]))
        expected = ref_mth(DATA[:size])
        assert frontier.root() == expected == merkle.root(size, oracle(DATA))
        assert merkle.Frontier.load(size, oracle(DATA)).root() == expected


def _tampered(proof: list[bytes]) -> list[list[bytes]]:
    out = []
    for i in range(len(proof)):
        flipped = bytearray(proof[i])
        flipped[i % 32] ^= 0x01
        out.append([*proof[:i], bytes(flipped), *proof[i + 1:]])
    if proof:
        out += [proof[:-1], proof[1:], [*proof, proof[0]]]
    out.append([bytes(32), *proof])
    return out


def test_every_inclusion_proof_up_to_70_leaves() -> None:
    node = oracle(DATA)
    for size in range(1, 71):
        root = ref_mth(DATA[:size])
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, node)
            assert proof == ref_path(index, DATA[:size])
            leaf = merkle.leaf_hash(DATA[index])
            assert merkle.verify_inclusion(leaf, index, size, proof, root)
            assert not merkle.verify_inclusion(merkle.leaf_hash(b"forged"), index, size, proof, root)
            assert not merkle.verify_inclusion(leaf, index, size, proof, bytes(32))
            if index + 1 < size:
                assert not merkle.verify_inclusion(leaf, index + 1, size, proof, root)
            for bad in _tampered(proof):
                assert not merkle.verify_inclusion(leaf, index, size, bad, root), (index, size)


def test_every_consistency_proof_up_to_70_leaves() -> None:
    node = oracle(DATA)
    roots = [ref_mth(DATA[:size]) for size in range(71)]
    for second in range(1, 71):
        for first in range(1, second + 1):
            proof = merkle.consistency_proof(first, second, node)
            assert proof == ref_subproof(first, DATA[:second], True)
            assert merkle.verify_consistency(first, second, roots[first], roots[second], proof)
            assert not merkle.verify_consistency(first, second, roots[second], roots[first], proof) \
                or roots[first] == roots[second]
            if first < second:
                assert not merkle.verify_consistency(first, second, bytes(32), roots[second], proof)
                assert not merkle.verify_consistency(first, second, roots[first], bytes(32), proof)
                forked = ref_mth((*DATA[:first - 1], b"forked"))
                assert not merkle.verify_consistency(first, second, forked, roots[second], proof)
            for bad in _tampered(proof):
                assert not merkle.verify_consistency(first, second, roots[first], roots[second], bad), (first, second)


def test_bad_sizes_are_refused() -> None:
    node = oracle(DATA)
    for index, size in ((0, 0), (5, 5), (-1, 3), (6, 5)):
        with pytest.raises(merkle.ProofError):
            merkle.inclusion_proof(index, size, node)
        assert not merkle.verify_inclusion(bytes(32), index, size, [], bytes(32))
    for first, second in ((0, 5), (6, 5), (-1, 2)):
        with pytest.raises(merkle.ProofError):
            merkle.consistency_proof(first, second, node)
        assert not merkle.verify_consistency(first, second, bytes(32), bytes(32), [])


def test_frontier_reports_the_nodes_it_completes() -> None:
    seen: dict[tuple[int, int], bytes] = {}
    frontier = merkle.Frontier()
    for data in DATA[:64]:
        frontier.append(merkle.leaf_hash(data), lambda level, index, h: seen.__setitem__((level, index), h))
    node = oracle(DATA)
    assert seen[(6, 0)] == node(6, 0) == frontier.root()
    assert all(seen[key] == node(*key) for key in seen) and len(seen) == 127


def test_nodes_needed_is_logarithmic() -> None:
    needed = merkle.nodes_needed(lambda node: merkle.inclusion_proof(123_456, 10_000_000, node))
    assert len(needed) <= 2 * 24


def test_proofs_of_a_page_share_their_right_edge_and_equal_the_single_proofs() -> None:
    node = oracle(DATA)
    # Every (index, size) of up to 70 leaves, in one batch with a shared memo of the split ranges: the
    # ranges of different sizes overlap, so a wrong memo key would hand one size's hash to another.
    wanted = [(index, size) for size in range(1, 71) for index in range(size)]
    batch = merkle.inclusion_proofs(wanted, node)
    assert batch == [ref_path(index, DATA[:size]) for index, size in wanted]
    assert merkle.inclusion_proofs([], node) == []


def test_a_page_of_proofs_hashes_the_shared_right_edge_once() -> None:
    calls = {"count": 0}
    real = merkle.node_hash

    def counting(left: bytes, right: bytes) -> bytes:
        calls["count"] += 1
        return real(left, right)

    wanted = [(index, 10_000_000) for index in range(0, 1_000_000, 20_000)]  # 50 provisions
    node = lambda level, index: merkle.leaf_hash(f"{level}/{index}".encode())  # noqa: E731
    merkle.node_hash = counting  # type: ignore[assignment]
    try:
        one_by_one = [merkle.inclusion_proof(index, size, node) for index, size in wanted]
        separate, calls["count"] = calls["count"], 0
        together = merkle.inclusion_proofs(wanted, node)
        shared = calls["count"]
    finally:
        merkle.node_hash = real  # type: ignore[assignment]
    assert together == one_by_one
    # Each index is in the left 2**23 leaves; its sibling is the rest, 10,000,000 - 2**23, whose 7 set
    # bits are 7 perfect subtrees joined by 6 hashes: once per page instead of once per proof
    edge = bin(10_000_000 - 2**23).count("1") - 1
    assert edge == 6 and separate == 50 * edge and shared == edge
