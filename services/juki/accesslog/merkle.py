"""The access log's Merkle tree (RFC 9162 §2.1): hashes, roots, inclusion and consistency proofs.

Pure functions, no I/O. The tree is never held whole: every algorithm asks a ``node(level, index)``
oracle for the hash of a perfect subtree (the 2**level leaves from ``index * 2**level``), which the
service answers from stored tiles (juki.accesslog.tiles) and tests from a list of leaves. Proofs need
O(log n) such hashes; :func:`nodes_needed` lists them first so that a caller can fetch them in one read.

Leaf hash = SHA-256(0x00 || leaf bytes), interior node = SHA-256(0x01 || left || right); the hash of the
empty tree is SHA-256 of nothing. Indices are 0-based leaf positions (leaf index = record sequence - 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

# hash of the perfect subtree at (level, index)
NodeOracle = Callable[[int, int], bytes]
# hashes of ranges (start, end) that are not perfect subtrees, shared by computations on one tree
RangeMemo = dict[tuple[int, int], bytes]


class ProofError(ValueError):
    """A proof was asked for sizes or an index that do not fit (the caller's mistake, not the tree's)."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(size: int) -> int:
    """The largest power of two smaller than ``size`` (size > 1): where RFC 9162 splits a tree."""
    return 1 << ((size - 1).bit_length() - 1)


def subtree_hash(start: int, end: int, node: NodeOracle, memo: RangeMemo | None = None) -> bytes:
    """MTH(D[start:end]) for a range on the right edge of an aligned subtree (as proofs need them).

    A perfect aligned range is one node; otherwise it splits at the largest power of two, whose left
    part is perfect and aligned because ``start`` is a multiple of that power (true of every range the
    RFC 9162 recursions produce). ``memo`` keeps the hashes of such split ranges for later calls on the
    same tree: every proof into one tree size crosses the same right edge.
    """
    size = end - start
    if size <= 0:
        raise ProofError(f"empty range {start}..{end}")
    if size & (size - 1) == 0:
        level = size.bit_length() - 1
        if start % size:
            raise ProofError(f"range {start}..{end} is not aligned")
        return node(level, start >> level)
    if memo is not None and (found := memo.get((start, end))) is not None:
        return found
    k = _split(size)
    value = node_hash(subtree_hash(start, start + k, node, memo), subtree_hash(start + k, end, node, memo))
    if memo is not None:
        memo[(start, end)] = value
    return value


def root(size: int, node: NodeOracle) -> bytes:
    return EMPTY_ROOT if size == 0 else subtree_hash(0, size, node)


def inclusion_proof(index: int, size: int, node: NodeOracle, memo: RangeMemo | None = None) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 §2.1.3.1, nearest sibling first."""
    if size <= 0 or not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    proof: list[bytes] = []
    start, end = 0, size
    # Walk down from the root; the siblings are collected top-down and returned bottom-up.
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            proof.append(subtree_hash(start + k, end, node, memo))
            end = start + k
        else:
            proof.append(subtree_hash(start, start + k, node))
            start += k
    proof.reverse()
    return proof


def inclusion_proofs(wanted: Sequence[tuple[int, int]], node: NodeOracle) -> list[list[bytes]]:
    """The inclusion proofs of many (index, size) pairs, as :func:`inclusion_proof` one by one, with the
    right-edge ranges they share hashed once (a page of disclosed provisions, all proven into one tree)."""
    memo: RangeMemo = {}
    return [inclusion_proof(index, size, node, memo) for index, size in wanted]


def consistency_proof(first: int, second: int, node: NodeOracle) -> list[bytes]:
    """PROOF(first, D[0:second]) of RFC 9162 §2.1.4.1; empty when the sizes are equal."""
    if not 0 < first <= second:
        raise ProofError(f"no consistency proof from size {first} to size {second}")
    proof: list[bytes] = []
    start, end, m, complete = 0, second, first, True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            proof.append(subtree_hash(start + k, end, node))
            end = start + k
        else:
            proof.append(subtree_hash(start, start + k, node))
            start, m, complete = start + k, m - k, False
    if not complete:
        proof.append(subtree_hash(start, end, node))
    proof.reverse()
    return proof


def nodes_needed(compute: Callable[[NodeOracle], object]) -> list[tuple[int, int]]:
    """The (level, index) nodes a computation asks for: its shape never depends on the hash values,
    so a dry run with placeholder hashes tells a store which tiles to read, all in one query."""
    asked: dict[tuple[int, int], None] = {}

    def record(level: int, index: int) -> bytes:
        asked[(level, index)] = None
        return bytes(HASH_SIZE)

    compute(record)
    return list(asked)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` place the leaf hash ``leaf`` at ``index`` of the tree with that root?"""
    if not 0 <= index < size or any(len(p) != HASH_SIZE for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: is the tree of size ``second`` an append-only extension of the one of size ``first``?"""
    if not 0 < first <= second or any(len(p) != HASH_SIZE for p in proof):
        return False
    if first == second:
        return not proof and first_root == second_root
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


class Frontier:
    """The right edge of a growing tree: one perfect-subtree hash per set bit of its size (O(log n)).

    Enough to append leaves and compute the root without the rest of the tree. ``append`` reports each
    node it completes, so that the writer can store the ones that belong in tiles.
    """

    __slots__ = ("hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"a frontier of size {size} holds {bin(size).count('1')} hashes, not {len(hashes)}")
        self.size = size
        self.hashes = list(hashes)

    @staticmethod
    def nodes(size: int) -> list[tuple[int, int]]:
        """(level, index) of the frontier's subtrees, largest (leftmost) first."""
        out = []
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                out.append((level, (size >> (level + 1)) << 1))
        return out

    @classmethod
    def load(cls, size: int, node: NodeOracle) -> Frontier:
        return cls(size, [node(level, index) for level, index in cls.nodes(size)])

    def copy(self) -> Frontier:
        return Frontier(self.size, self.hashes)

    def append(self, leaf: bytes, completed: Callable[[int, int, bytes], None] | None = None) -> None:
        index, level, current = self.size, 0, leaf
        if completed is not None:
            completed(0, index, current)
        hashes = self.hashes
        while index & 1:
            current = node_hash(hashes.pop(), current)
            index >>= 1
            level += 1
            if completed is not None:
                completed(level, index, current)
        hashes.append(current)
        self.size += 1

    def extend(self, leaves: Sequence[bytes],
               completed: Callable[[int, int, Sequence[bytes]], None] | None = None) -> None:
        """Append many leaves at once: the same tree as :meth:`append` one by one, built a level at a time.

        ``completed(level, first_index, nodes)`` is called once per level with the nodes the leaves
        complete there, in index order (``append``'s callback node by node). A group commit appends
        thousands of leaves; pairing a whole level in one comprehension costs a fraction of a Python loop
        step (and a callback) per node.
        """
        if not leaves:
            return
        size = self.size
        # The frontier's subtrees by level: bit k of the size is a pending left node at level k.
        pending = dict(zip([level for level, _ in self.nodes(size)], self.hashes, strict=True))
        level, start, nodes = 0, size, list(leaves)
        while nodes:
            if completed is not None:
                completed(level, start, nodes)
            left = pending.pop(level, None)
            if left is not None:  # the level's last old node is the left sibling of the first new one
                nodes.insert(0, left)
                start -= 1
            if len(nodes) & 1:
                pending[level] = nodes.pop()
            pairs = iter(nodes)
            nodes = [node_hash(a, b) for a, b in zip(pairs, pairs, strict=True)]
            start >>= 1
            level += 1
        self.size = size + len(leaves)
        self.hashes = [pending[level] for level in sorted(pending, reverse=True)]
        if len(self.hashes) != bin(self.size).count("1"):  # pragma: no cover - an invariant, not an input
            raise AssertionError("frontier out of step with its size")

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        result = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            result = node_hash(left, result)
        return result
