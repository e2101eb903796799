-- The resident register (住民基本台帳) of one municipality and its outbox to the prefecture.
-- Runs in schema {{schema}} as the administrative role; {{role}} is the municipal CS's own role.

-- One row per resident code ever registered here. `entry` is the serialized juki.municipal.v1.ResidentEntry
-- (the 住民票 as the counter sees it: four items, household, 本籍/筆頭者, 個人番号); the columns beside
-- it are what queries select on.
CREATE TABLE residents (
    resident_code  text PRIMARY KEY,
    household_id   text NOT NULL,
    relationship   text NOT NULL DEFAULT '',       -- 続柄; '世帯主' for the head
    status         smallint NOT NULL,              -- juki.common.v1.ResidentStatus number
    entry          bytea NOT NULL,
    version        bigint NOT NULL DEFAULT 1,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX residents_household ON residents (household_id) WHERE status = 1;

-- Notifications to the prefecture, numbered per municipality from 1 without gaps, written in the same
-- transaction as the register change they report. Rows stay after acknowledgement (sent history).
CREATE TABLE outbox (
    sequence         bigint PRIMARY KEY,
    notification_id  uuid NOT NULL UNIQUE,
    resident_code    text NOT NULL,
    payload          bytea NOT NULL,               -- serialized juki.intake.v1.Notification
    queued_at        timestamptz NOT NULL DEFAULT now(),
    acknowledged_at  timestamptz,
    rejected         text                          -- the prefecture's reasons when it refused the notification
);
CREATE INDEX outbox_pending ON outbox (sequence) WHERE acknowledged_at IS NULL;

-- Singleton state: the last sequence issued, the connection as last seen, the last resync.
CREATE TABLE outbox_state (
    singleton            boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_sequence        bigint NOT NULL DEFAULT 0,
    connected            boolean NOT NULL DEFAULT true,
    connection_changed   timestamptz NOT NULL DEFAULT now(),
    last_resync_load_id  text NOT NULL DEFAULT ''
);
INSERT INTO outbox_state DEFAULT VALUES;

-- Operator proof nonces seen (a replayed proof is refused).
CREATE TABLE operator_nonces (
    operator_id  text NOT NULL,
    nonce        bytea NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operator_id, nonce)
);

-- Every operator action at this CS (who, what, which resident).
CREATE TABLE operator_actions (
    action_id      bigserial PRIMARY KEY,
    operator_id    text NOT NULL,
    peer           text NOT NULL,
    method         text NOT NULL,
    resident_code  text NOT NULL DEFAULT '',
    at             timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE ON residents, outbox, outbox_state TO {{role}};
GRANT SELECT, INSERT, DELETE ON operator_nonces TO {{role}};
GRANT SELECT, INSERT ON operator_actions TO {{role}};
GRANT USAGE ON SEQUENCE operator_actions_action_id_seq TO {{role}};
