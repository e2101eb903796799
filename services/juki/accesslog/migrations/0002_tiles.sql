-- The Merkle tree of the access log (RFC 9162), stored as tlog-tiles: tiles of height 8, each holding up
-- to 256 hashes of one tree level that is a multiple of 8 (tile level L holds the nodes of tree level 8L;
-- the levels in between are recomputed from a tile's hashes). Leaf n (0-based, the record with sequence
-- n + 1) has hash SHA-256(0x00 || canonical bytes of the record), see juki.accesslog.merkle and .tiles.
--
-- The log's role may only INSERT, so a tile is never rewritten as it grows: each group commit inserts,
-- for each tile it extends, one fragment with the hashes it appended; a fragment ending at `end_width`
-- and the fragments before it, concatenated, are the (partial) tile of that width. Written in the same
-- transaction as the records, so the tree always covers exactly the committed records. Any proof reads
-- at most two tiles per tile level: O(log n) rows, never a scan of the records.
CREATE TABLE tiles (
    level       smallint NOT NULL CHECK (level >= 0),
    tile_index  bigint NOT NULL CHECK (tile_index >= 0),
    end_width   smallint NOT NULL CHECK (end_width BETWEEN 1 AND 256),
    hashes      bytea NOT NULL CHECK (length(hashes) % 32 = 0 AND length(hashes) BETWEEN 32 AND 32 * end_width),
    PRIMARY KEY (level, tile_index, end_width)
);

-- Signed checkpoints of the tree: C2SP tlog-checkpoint notes (origin, tree size, base64 root hash),
-- signed per C2SP signed-note with the access log's Ed25519 key. `note` is the whole signed note as
-- served; tree_size and root_hash repeat its body for queries. Two notes with one size and different
-- roots would be a fork, which verification reports.
CREATE TABLE tree_checkpoints (
    tree_size     bigint NOT NULL CHECK (tree_size > 0),
    root_hash     bytea NOT NULL CHECK (length(root_hash) = 32),
    signed_at_ns  bigint NOT NULL,
    note          text NOT NULL,
    PRIMARY KEY (tree_size, signed_at_ns)
);

GRANT SELECT, INSERT ON tiles, tree_checkpoints TO {{role}};
