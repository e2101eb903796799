-- Intake's own additions to the identity store (0001 stays the contract with lookup).

-- A 住民票コード変更 concerns its old code (resident_code) and its new one: the fold of the new code
-- needs the change notification too.
ALTER TABLE notifications ADD COLUMN new_resident_code text;
CREATE INDEX notifications_new_resident ON notifications (new_resident_code) WHERE new_resident_code IS NOT NULL;

-- The first result of each notification (returned again for a duplicate).
ALTER TABLE notifications ADD COLUMN acknowledged_at timestamptz NOT NULL DEFAULT now();

-- Sequence bookkeeping beyond the contiguous prefix: the highest sequence received, the floor a bulk
-- load set (sequences up to it count as applied) and when the last notification was accepted.
ALTER TABLE municipalities ADD COLUMN highest_sequence bigint NOT NULL DEFAULT 0;
ALTER TABLE municipalities ADD COLUMN loaded_through bigint NOT NULL DEFAULT 0;
ALTER TABLE municipalities ADD COLUMN last_accepted_at timestamptz;

-- Municipality of each outbox row, for the per-municipality backlog and relay lag.
ALTER TABLE outbox ADD COLUMN municipality_code text NOT NULL DEFAULT '';
CREATE INDEX outbox_municipality ON outbox (municipality_code, enqueued_at);

-- Relay acknowledgements: how long each relayed notification waited (enqueued -> upstream ack).
-- Kept as a short rolling window per batch, for the relay-lag metric.
CREATE TABLE relay_acks (
    acked_at        timestamptz NOT NULL DEFAULT now(),
    notifications   integer NOT NULL,
    max_lag_ms      double precision NOT NULL,
    mean_lag_ms     double precision NOT NULL
);
CREATE INDEX relay_acks_at ON relay_acks (acked_at);

-- Bulk loads already applied (a load id applied again changes nothing).
CREATE TABLE bulk_loads (
    load_id           text PRIMARY KEY,
    municipality_code text NOT NULL,
    through_sequence  bigint NOT NULL,
    records_applied   bigint NOT NULL,
    finished_at       timestamptz NOT NULL DEFAULT now()
);

-- Operator proof nonces (see juki.mesh.operator).
CREATE TABLE operator_nonces (
    operator_id text NOT NULL,
    nonce       bytea NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operator_id, nonce)
);

GRANT SELECT, INSERT, DELETE ON relay_acks, operator_nonces TO {{role}};
GRANT SELECT, INSERT, UPDATE ON bulk_loads TO {{role}};
