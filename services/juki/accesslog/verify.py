"""Verification of a stored access log: recompute the chain and the Merkle tree, check every checkpoint.

Used by the service (VerifyLog, with its own read-only role) and by ``juki audit verify`` straight
against the database (with the administrative URL), so an auditor does not have to trust the service.

The tree is checked with the chain, record by record: each record's leaf hash and every tile hash the
stored tree completes must equal what the records give, and every signed tree checkpoint's root must
equal the recomputed root at its size; two signed roots for one size are a fork. A verification can
resume from a :class:`TreeState` an earlier one reached (the frontier of the tree at that size, checked
against its root): only the newer records are hashed, the stored tree at that size must still have the
same root, and the consistency proof the tiles give from it to the latest checkpoint must verify.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from juki.accesslog import chain, merkle, notes, tiles

DEFAULT_ORIGIN = "juki.local/accesslog"

_ROWS_SQL = (
    "SELECT sequence, subject, (EXTRACT(EPOCH FROM provided_at) * 1000000)::bigint AS provided_us,"
    " (EXTRACT(EPOCH FROM recorded_at) * 1000000)::bigint AS recorded_us, outcome, payload, chain_hash"
    " FROM {table} WHERE sequence > $1 ORDER BY sequence LIMIT $2"
)


def record_bytes(row: asyncpg.Record) -> bytes:
    """The canonical bytes of a stored record (a row of ``_ROWS_SQL``): what its chain and leaf hash cover."""
    return chain.canonical_bytes(int(row["sequence"]), int(row["provided_us"]), int(row["recorded_us"]),
                                 int(row["outcome"]), bytes(row["subject"]), bytes(row["payload"]))


@dataclass(frozen=True)
class TreeState:
    """What a verification reached: records 1..size verified, the tree's frontier and root at that
    size, and the chain hash of record ``size`` (to continue the chain)."""

    size: int
    root: bytes
    frontier: tuple[bytes, ...]
    chain_hash: bytes

    def to_json(self) -> dict[str, object]:
        return {"tree_size": self.size, "root": self.root.hex(), "frontier": [h.hex() for h in self.frontier],
                "chain_hash": self.chain_hash.hex()}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> TreeState:
        frontier = data["frontier"]
        assert isinstance(frontier, list)
        state = cls(int(str(data["tree_size"])), bytes.fromhex(str(data["root"])),
                    tuple(bytes.fromhex(str(h)) for h in frontier), bytes.fromhex(str(data["chain_hash"])))
        if merkle.Frontier(state.size, state.frontier).root() != state.root:
            raise ValueError("the saved frontier does not hash to the saved root")
        return state


@dataclass(frozen=True)
class StoredTreeCheckpoint:
    tree_size: int
    root_hash: bytes
    note: str


@dataclass
class TreeProgress:
    """The tree side of a verification's result."""

    checkpoints_checked: int = 0
    latest: StoredTreeCheckpoint | None = None
    records_hashed: int = 0  # leaves hashed in this run (the rest were verified before)
    at_latest: TreeState | None = None  # state at the latest signed tree checkpoint, to resume from
    at_head: TreeState | None = None  # state at the last record verified
    resumed_from: int = 0
    consistency_checked: bool = False
    roots: dict[int, bytes] = field(default_factory=dict)
    cosignatures_checked: int = 0


def _checkpoints_table(schema: str | None) -> str:
    return f'"{schema}".checkpoints' if schema else "checkpoints"


async def load_tree_checkpoints(
    conn: asyncpg.Connection, schema: str | None = None, from_size: int = 0
) -> list[StoredTreeCheckpoint]:
    """Signed tree checkpoints of size ``from_size`` or more (all by default), by size."""
    table = f'"{schema}".tree_checkpoints' if schema else "tree_checkpoints"
    rows = await conn.fetch(f"SELECT tree_size, root_hash, note FROM {table} WHERE tree_size >= $1"
                            " ORDER BY tree_size, signed_at_ns", from_size)
    return [StoredTreeCheckpoint(int(r["tree_size"]), bytes(r["root_hash"]), r["note"]) for r in rows]


async def load_checkpoints(
    conn: asyncpg.Connection, schema: str | None = None, from_sequence: int = 0
) -> list[chain.StoredCheckpoint]:
    """Chain checkpoints at ``from_sequence`` or later (all by default), the latest one in any case, and every
    purge anchor, by sequence."""
    table = _checkpoints_table(schema)
    columns = "sequence, chain_hash, signed_at_ns, signature, key_id, kind"
    if from_sequence > 0:  # but never past the latest ordinary checkpoint (index reads, like all of these)
        latest = await conn.fetchval(f"SELECT max(sequence) FROM {table} WHERE kind <> 'purge'")
        from_sequence = min(from_sequence, int(latest)) if latest is not None else from_sequence
    rows = [*await conn.fetch(f"SELECT {columns} FROM {table} WHERE kind = 'purge' AND sequence < $1", from_sequence),
            *await conn.fetch(f"SELECT {columns} FROM {table} WHERE sequence >= $1", from_sequence)]
    rows.sort(key=lambda r: (int(r["sequence"]), int(r["signed_at_ns"])))
    return [
        chain.StoredCheckpoint(int(r["sequence"]), bytes(r["chain_hash"]), int(r["signed_at_ns"]),
                               bytes(r["signature"]), r["key_id"], r["kind"])
        for r in rows
    ]


async def verify_log(
    conn: asyncpg.Connection,
    verifier: chain.CheckpointVerifier,
    *,
    schema: str | None = None,
    chunk: int = 20_000,
    progress: Callable[[int, int], None] | None = None,
    resume: TreeState | None = None,
    origin: str = DEFAULT_ORIGIN,
) -> chain.VerifyResult:
    """Recompute every record's chain hash and leaf hash from its stored columns and check the checkpoints.

    The first problem found is reported with its sequence number: a record whose hash does not match
    (altered), a missing sequence (deleted), an unexpected one (inserted or reordered), a checkpoint
    whose signature, chain hash or root does not match, a stored tile hash that differs from the
    records, two signed roots for one tree size, or records a checkpoint covers that are gone.

    ``resume``: what an earlier verification reached; only the records after it are recomputed.
    ``result.tree`` tells where this one got to, to resume from next time.
    """
    result = chain.VerifyResult()
    tree = TreeProgress()
    result.tree = tree
    records_table = f'"{schema}".records' if schema else "records"
    note_verifier = verifier.note_verifier(origin)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        bounds = await conn.fetchrow(f"SELECT min(sequence) AS first, max(sequence) AS last FROM {records_table}")
        first = int(bounds["first"]) if bounds["first"] is not None else 0
        last = int(bounds["last"]) if bounds["last"] is not None else 0
        result.first_sequence, result.last_sequence = first, last
        # A resumed verification reads only the checkpoints from its state on (and every purge anchor):
        # a log signs one every few seconds, millions over the years, which an earlier run checked. It
        # resumes only while the log still starts right after its latest purge anchor (or at 1), so that
        # a deleted first record, or a purge past the state, is caught by a run from the anchor.
        if resume is not None:
            anchor_at = await conn.fetchval(
                f"SELECT coalesce(max(sequence), 0) FROM {_checkpoints_table(schema)} WHERE kind = 'purge'")
            if not (resume.size >= anchor_at and first == anchor_at + 1):
                resume = None
        from_size = resume.size if resume is not None else 0
        checkpoints = await load_checkpoints(conn, schema, from_size)
        tree_checkpoints = await load_tree_checkpoints(conn, schema, from_size)
        stored_size = await tiles.tree_size(conn, schema)

        # Signatures first: a forged checkpoint is a problem whatever the records say.
        by_sequence: dict[int, list[chain.StoredCheckpoint]] = {}
        purge_anchor: chain.StoredCheckpoint | None = None
        for cp in checkpoints:
            purge = cp.kind == "purge"
            if not verifier.verify(cp.sequence, cp.chain_hash, cp.signed_at_ns, cp.signature, cp.key_id, purge=purge):
                result.fail(cp.sequence, f"checkpoint at sequence {cp.sequence} ({cp.kind}): signature does not verify")
                return result
            result.checkpoints_checked += 1
            if purge:
                if purge_anchor is None or cp.sequence > purge_anchor.sequence:
                    purge_anchor = cp
            else:
                result.latest_checkpoint = cp
            by_sequence.setdefault(cp.sequence, []).append(cp)
        # Tree checkpoints: each a note signed by the log's key whose body is its stored size and root;
        # two roots for one size are a fork. Those a resumed verification already covered are skipped.
        roots = tree.roots
        for tcp in tree_checkpoints:
            try:
                signed = note_verifier.verify_checkpoint(tcp.note)
            except notes.NoteError as exc:
                result.fail(tcp.tree_size, f"tree checkpoint of size {tcp.tree_size}: {exc}")
                return result
            if (signed.tree_size, signed.root_hash) != (tcp.tree_size, tcp.root_hash):
                result.fail(tcp.tree_size, f"tree checkpoint of size {tcp.tree_size}: the stored size or root"
                                           " is not the one signed")
                return result
            if roots.setdefault(tcp.tree_size, tcp.root_hash) != tcp.root_hash:
                result.fail(tcp.tree_size, f"two signed tree roots for size {tcp.tree_size}: the log forked")
                return result
            tree.checkpoints_checked += 1
            tree.latest = tcp
        # Witness cosignatures: each by the key the CA certified for its witness, over a root the log signed.
        problem = await _check_cosignatures(conn, schema, origin, getattr(verifier, "ca_pem", b""), roots,
                                            resume.size if resume is not None else 0, tree)
        if problem:
            result.fail(*problem)
            return result
        if resume is not None and roots.get(resume.size, resume.root) != resume.root:
            result.fail(resume.size, f"the log signed another root for size {resume.size} than the one verified"
                                     " before: the log forked")
            return result

        # Where the chain starts: genesis, or the signed anchor of the latest purge.
        previous = chain.GENESIS
        expected = 1
        if purge_anchor is not None:
            previous, expected = purge_anchor.chain_hash, purge_anchor.sequence + 1
        frontier: merkle.Frontier | None = None
        # Resumed only while the log still starts right after its purge anchor (or at 1): a deleted first
        # record is caught without a full run.
        if resume is not None and resume.size >= expected - 1 and first == expected:
            # The stored tree must still have, at that size, the root verified then (a rewritten tile
            # on the right edge of the old tree, or a forked history, changes it).
            stored_root = await tiles.root_at(conn, resume.size, schema) if stored_size >= resume.size else b""
            if stored_root != resume.root:
                result.fail(resume.size, f"the stored tree no longer has, at size {resume.size}, the root verified"
                                         " before (tiles rewritten or the log forked)")
                return result
            previous, expected = resume.chain_hash, resume.size + 1
            result.records_checked = resume.size - first + 1
            first = expected
            result.last_hash = previous
            frontier = merkle.Frontier(resume.size, resume.frontier)
            tree.resumed_from = resume.size
        if first == 0:
            covered = max((cp.sequence for cp in checkpoints), default=0)
            covered = max(covered, max(roots, default=0))
            if covered >= expected:
                result.fail(expected, f"records {expected}..{covered} are covered by a checkpoint but missing")
            return result
        if first != expected:
            if first < expected:
                result.fail(first, f"record {first} precedes the purge anchor at {expected - 1}")
            else:
                result.fail(expected, f"record {expected} is missing (the log starts at {first} without a purge anchor)")
            return result
        if frontier is None:
            # From the start, or from a purge anchor: the purged leaves are gone, their tiles stay.
            frontier = await tiles.load_frontier(conn, expected - 1, schema)
            for size, root in roots.items():
                if size < expected and await tiles.root_at(conn, size, schema) != root:
                    result.fail(size, f"the stored tree's root at size {size} is not the signed one")
                    return result

        next_hash = chain.next_hash
        leaf_hash = merkle.leaf_hash
        cursor_after = expected - 1
        completed: list[tuple[int, int, bytes]] = []  # nodes of tile levels (and middles) the chunk completed

        def keep(level: int, index: int, value: bytes) -> None:
            if level % tiles.HEIGHT == 0 or level == tiles.MIDDLE:
                completed.append((level, index, value))

        while True:
            rows = await conn.fetch(_ROWS_SQL.format(table=records_table), cursor_after, chunk)
            if not rows:
                break
            completed.clear()
            for row in rows:
                sequence = int(row["sequence"])
                if sequence != expected:
                    result.fail(expected, f"record {expected} is missing or out of order (found {sequence} next)")
                    return result
                canonical = record_bytes(row)
                computed = next_hash(previous, canonical)
                if computed != bytes(row["chain_hash"]):
                    result.fail(sequence, f"record {sequence} does not match its chain hash (altered, inserted or moved)")
                    return result
                for cp in by_sequence.get(sequence, ()):
                    if cp.chain_hash != computed:
                        result.fail(sequence, f"checkpoint at sequence {sequence} does not match the recomputed chain")
                        return result
                frontier.append(leaf_hash(canonical), keep)
                signed_root = roots.get(sequence)
                if signed_root is not None and frontier.root() != signed_root:
                    result.fail(sequence, f"the signed tree checkpoint of size {sequence} does not match the"
                                          " recomputed tree")
                    return result
                previous = computed
                expected += 1
                result.records_checked += 1
                tree.records_hashed += 1
                result.last_hash = computed
                if tree.latest is not None and sequence == tree.latest.tree_size:
                    tree.at_latest = TreeState(sequence, frontier.root(), tuple(frontier.hashes), computed)
            problem = await _compare_tiles(conn, completed, schema)
            if problem:
                result.fail(*problem)
                return result
            cursor_after = int(rows[-1]["sequence"])
            if progress is not None:
                progress(result.records_checked, last - first + 1)
        covered = max((cp.sequence for cp in checkpoints), default=0)
        covered = max(covered, max(roots, default=0))
        if covered >= expected:
            result.fail(expected, f"records {expected}..{covered} are covered by a checkpoint but missing")
            return result
        tree.at_head = TreeState(frontier.size, frontier.root(), tuple(frontier.hashes), previous)
        if tree.at_latest is None and resume is not None and tree.latest is not None \
                and tree.latest.tree_size == resume.size:
            tree.at_latest = resume
        # What a witness or client does: the proof the stored tiles give, from what was verified before
        # to the latest signed checkpoint, must verify against both signed roots.
        if resume is not None and tree.latest is not None and tree.latest.tree_size > resume.size:
            old, new, old_root, new_root = resume.size, tree.latest.tree_size, resume.root, tree.latest.root_hash
            proof = await tiles.compute(conn, lambda node: merkle.consistency_proof(old, new, node), schema)
            if not merkle.verify_consistency(old, new, old_root, new_root, proof):
                result.fail(new, f"the consistency proof from size {old} to the checkpoint of size {new} does not"
                                 " verify")
                return result
            tree.consistency_checked = True
    return result


@dataclass(frozen=True)
class RangeCheck:
    """What :func:`verify_range` found: the first problem (sequence, what), records hashed, last chain hash."""

    problem: tuple[int, str] | None
    records_hashed: int
    chain_hash: bytes


async def verify_range(
    conn: asyncpg.Connection, schema: str | None, after: int, previous: bytes, through: int, *, chunk: int = 20_000
) -> RangeCheck:
    """Records ``after + 1 .. through``: each present, chaining from ``previous`` (the chain hash of record
    ``after``), and each leaf equal to the stored tree's level-0 tile hash. O(records in the range): what a
    purge checks of the records it drops when an earlier verification already covered them (so that a
    record altered since is caught before its evidence goes), and of the first record it keeps."""
    table = f'"{schema}".records' if schema else "records"
    expected, hashed = after + 1, 0
    while expected <= through:
        rows = await conn.fetch(_ROWS_SQL.format(table=table), expected - 1, min(chunk, through - expected + 1))
        if not rows:
            return RangeCheck((expected, f"record {expected} is missing"), hashed, previous)
        leaves: list[tuple[int, int, bytes]] = []
        for row in rows:
            sequence = int(row["sequence"])
            if sequence != expected:
                return RangeCheck((expected, f"record {expected} is missing or out of order (found {sequence}"
                                             " next)"), hashed, previous)
            canonical = record_bytes(row)
            computed = chain.next_hash(previous, canonical)
            if computed != bytes(row["chain_hash"]):
                return RangeCheck((sequence, f"record {sequence} does not match its chain hash (altered,"
                                             " inserted or moved)"), hashed, previous)
            leaves.append((0, sequence - 1, merkle.leaf_hash(canonical)))
            previous, expected, hashed = computed, expected + 1, hashed + 1
        problem = await _compare_tiles(conn, leaves, schema)
        if problem:
            return RangeCheck(problem, hashed, previous)
    return RangeCheck(None, hashed, previous)


async def _compare_tiles(
    conn: asyncpg.Connection, completed: list[tuple[int, int, bytes]], schema: str | None
) -> tuple[int, str] | None:
    """The first stored tile hash that differs from the recomputed node: (sequence, problem). A level-0
    tile's middle must match where it is stored (a log written before middles has none for its older
    tiles, and proofs then compute from the tile)."""
    if not completed:
        return None
    try:
        stored = await tiles.read_tiles(conn, {(level // tiles.HEIGHT, index >> tiles.HEIGHT)
                                               for level, index, _ in completed if level != tiles.MIDDLE}, schema)
    except tiles.TileError as exc:  # fragments with a gap or overlap, or a whole tile that differs from them
        return exc.first_sequence, f"the stored tiles are damaged: {exc}"
    middles = await tiles.read_middle_fragments(conn, {index >> tiles.MIDDLE for level, index, _ in completed
                                                       if level == tiles.MIDDLE}, schema)
    size = merkle.HASH_SIZE
    for level, index, value in completed:
        if level == tiles.MIDDLE:
            # Every stored copy of the node: its fragment, and the middle stored whole when completed.
            position = index & (tiles.MIDDLE_WIDTH - 1)
            for end_width, data in middles.get(index >> tiles.MIDDLE, ()):
                at = (position - (end_width - len(data) // size)) * size
                if 0 <= at < len(data) and data[at:at + size] != value:
                    last_sequence = (index + 1) << level
                    return last_sequence, (f"the stored middle hash of tree node {level}/{index} (records up to"
                                           f" {last_sequence}) does not match the records")
            continue
        hashes = stored.get((level // tiles.HEIGHT, index >> tiles.HEIGHT), [])
        position = index & (tiles.WIDTH - 1)
        found = hashes[position] if position < len(hashes) else None
        if found != value:
            last_sequence = (index + 1) << level  # the node's last leaf is the record with this sequence
            what = "missing" if found is None else "does not match the records"
            if level == 0:
                return last_sequence, f"the stored tile hash of record {last_sequence} {what}"
            return last_sequence, (f"the stored tile hash of tree node {level}/{index} (records up to"
                                   f" {last_sequence}) {what}")
    return None


async def _check_cosignatures(
    conn: asyncpg.Connection, schema: str | None, origin: str, ca_pem: bytes, roots: dict[int, bytes],
    from_size: int, tree: TreeProgress,
) -> tuple[int, str] | None:
    """The first stored cosignature that does not verify: (tree size, problem)."""
    from juki.accesslog import witness

    table = f'"{schema}".cosignatures' if schema else "cosignatures"
    rows = await conn.fetch(f"SELECT tree_size, root_hash, witness, line, certificate FROM {table}"
                            " WHERE tree_size >= $1 ORDER BY tree_size, witness", from_size)
    for row in rows:
        size, name = int(row["tree_size"]), str(row["witness"])
        if roots.get(size) != bytes(row["root_hash"]):
            return size, f"the cosignature of witness {name} at tree size {size} is over a root the log did not sign"
        try:
            certified = witness.certified_witness(str(row["certificate"]).encode(), ca_pem)
            if certified.name != name:
                raise ValueError(f"its certificate is for witness {certified.name}")
            body = notes.Checkpoint(origin, size, bytes(row["root_hash"])).body()
            certified.verifier().verify(body + "\n" + str(row["line"]))
        except (ValueError, notes.NoteError) as exc:
            return size, f"the cosignature of witness {name} at tree size {size} does not verify: {exc}"
        tree.cosignatures_checked += 1
    return None
