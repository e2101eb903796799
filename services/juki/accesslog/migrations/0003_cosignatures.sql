-- Witness cosignatures of the tree checkpoints (C2SP tlog-cosignature, cosignature/v1). A witness
-- (spiffe://juki.local/witness/NAME) checks that a checkpoint extends the one it cosigned before and adds
-- its signature line; the log keeps the line and the mesh CA's certificate of the witness's key, so that
-- disclosures can prove provisions into a checkpoint a witness vouched for. Never updated: a later
-- cosignature of the same witness is a new row.
CREATE TABLE cosignatures (
    tree_size     bigint NOT NULL CHECK (tree_size > 0),
    root_hash     bytea NOT NULL CHECK (length(root_hash) = 32),
    witness       text NOT NULL,               -- NAME of spiffe://juki.local/witness/NAME
    key_id        bytea NOT NULL CHECK (length(key_id) = 4),
    cosigned_at   bigint NOT NULL,             -- the cosignature's timestamp (POSIX seconds)
    line          text NOT NULL,               -- the signature line, as appended to the note
    certificate   text NOT NULL,               -- PEM of the witness's cosigning certificate
    PRIMARY KEY (tree_size, witness, cosigned_at)
);

GRANT SELECT, INSERT ON cosignatures TO {{role}};
