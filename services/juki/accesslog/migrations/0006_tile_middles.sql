-- The middle of each level-0 tile: the 16 hashes of tree level 4 under it (node 16I + k is the root of
-- leaves 256I + 16k .. 256I + 16k + 15). A proof that crosses a level-0 tile needs its siblings at tree
-- levels 1..7, the roots of 2..128 of its hashes: 247 hashes computed from the tile alone, but 22 when
-- the middle is at hand (7 from the leaf's own 16 hashes, 7 from the middle, 8 read as they are). Stored
-- by the writer in the same transaction as the tile, as fragments like the tiles' (end_width 1..16).
-- 512 bytes per 256 records: 6 % of the tiles. Only proofs served to readers use them; an audit
-- recomputes them from the records and names any that differ. A log written before this migration has
-- none for its older tiles, whose proofs are computed from the tile as before.
CREATE TABLE tile_middles (
    tile_index  bigint NOT NULL CHECK (tile_index >= 0),
    end_width   smallint NOT NULL CHECK (end_width BETWEEN 1 AND 16),
    hashes      bytea NOT NULL CHECK (length(hashes) % 32 = 0 AND length(hashes) BETWEEN 32 AND 32 * end_width),
    PRIMARY KEY (tile_index, end_width)
);

GRANT SELECT, INSERT ON tile_middles TO {{role}};
