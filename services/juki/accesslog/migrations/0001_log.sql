-- The access log (提供状況の記録): an append-only, hash-chained record of every provision and every
-- refused attempt, and the signed checkpoints over it.
-- Runs in schema {{schema}} as the administrative role; {{role}} is the access log's own role, which
-- may INSERT and SELECT, never UPDATE or DELETE. Purging old records (retention) is a privileged
-- operation run with the administrative role (`juki audit purge`), see juki.accesslog.retention.

-- One row per record. `payload` is the juki.accesslog.v1.ProvisionRecord with resident_code cleared,
-- serialised deterministically; `subject` is HMAC-SHA256(pseudonym key, 住民票コード), never the code.
-- chain_hash = SHA-256(previous chain_hash || SHA-256(canonical bytes)), see juki.accesslog.chain.
CREATE TABLE records (
    sequence      bigint PRIMARY KEY,
    subject       bytea NOT NULL,
    provided_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL,
    outcome       smallint NOT NULL,
    payload       bytea NOT NULL,
    chain_hash    bytea NOT NULL
);
-- Disclosure lists one resident's records newest first, by date range, with keyset pagination
-- (scanned backwards; a row comparison on (provided_at, sequence) bounds the scan).
CREATE INDEX records_subject ON records (subject, provided_at, sequence);

-- Idempotency of Append/AppendStream: a batch_id seen before returns its first acknowledgement.
CREATE TABLE batches (
    batch_id        text PRIMARY KEY,
    first_sequence  bigint NOT NULL,
    count           integer NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);

-- Signed checkpoints. kind 'periodic' and 'shutdown' sign (sequence, chain_hash) with the payload of
-- juki.accesslog.v1.Checkpoint; kind 'purge' anchors the chain after records up to `sequence` were
-- purged, with its own payload prefix so that no ordinary checkpoint can stand in for it.
CREATE TABLE checkpoints (
    sequence      bigint NOT NULL,
    chain_hash    bytea NOT NULL,
    signed_at_ns  bigint NOT NULL,              -- nanoseconds since the epoch, as signed
    signature     bytea NOT NULL,
    key_id        text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('periodic', 'shutdown', 'purge')),
    PRIMARY KEY (sequence, signed_at_ns, kind)
);

GRANT SELECT, INSERT ON records, batches, checkpoints TO {{role}};
