-- The identity store of one intake tier (a prefecture's copy, or the national centre's).
-- Runs in schema {{schema}} as the administrative role; {{role}} is the intake instance's own role.
-- The national schema's tables are read by the lookup service (it grants itself SELECT in its own
-- migration, as a read replica would be read); the column layout of `residents`, `resident_changes`
-- and `municipalities` is therefore a contract between intake and lookup.

-- Every notification received, exactly once per notification_id (idempotency and history).
CREATE TABLE notifications (
    notification_id   text PRIMARY KEY,
    municipality_code text NOT NULL,
    sequence          bigint NOT NULL,
    resident_code     text NOT NULL,
    change_kind       smallint NOT NULL,       -- juki.common.v1.ChangeKind number
    occurred_on       date NOT NULL,           -- 異動年月日
    notified_on       date NOT NULL,           -- 届出年月日
    content_digest    bytea NOT NULL,          -- SHA-256 of the canonical content: same id, other content -> refused
    payload           bytea NOT NULL,          -- the serialized juki.intake.v1.Notification
    received_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (municipality_code, sequence)
);
CREATE INDEX notifications_resident ON notifications (resident_code);

-- Per-municipality sequence and connection state (中野区 was disconnected 2002-09-11 .. 2003-08-14).
CREATE TABLE municipalities (
    municipality_code   text PRIMARY KEY,
    last_sequence       bigint NOT NULL DEFAULT 0,  -- highest contiguous sequence acknowledged
    connected           boolean NOT NULL DEFAULT true,
    connection_changed  timestamptz NOT NULL DEFAULT now(),
    connection_reason   text NOT NULL DEFAULT '',
    as_of               timestamptz NOT NULL DEFAULT now()  -- when its data was last brought up to date
);

-- The current national view of each resident: a deterministic fold of its notifications.
CREATE TABLE residents (
    resident_code       text PRIMARY KEY,
    resident_kind       smallint NOT NULL,
    family_name         text NOT NULL DEFAULT '',
    given_name          text NOT NULL DEFAULT '',
    family_name_kana    text NOT NULL DEFAULT '',
    given_name_kana     text NOT NULL DEFAULT '',
    alphabetic_name     text NOT NULL DEFAULT '',
    common_name         text NOT NULL DEFAULT '',   -- 通称 (foreign residents only)
    former_family_name  text NOT NULL DEFAULT '',   -- 旧氏
    birth_year          smallint NOT NULL DEFAULT 0,
    birth_month         smallint NOT NULL DEFAULT 0, -- 0 = unknown (some foreign residents)
    birth_day           smallint NOT NULL DEFAULT 0,
    sex                 smallint NOT NULL DEFAULT 0,
    municipality_code   text NOT NULL,
    prefecture          text NOT NULL DEFAULT '',
    municipality        text NOT NULL DEFAULT '',
    street              text NOT NULL DEFAULT '',
    status              smallint NOT NULL,           -- juki.common.v1.ResidentStatus number
    last_change_kind    smallint NOT NULL DEFAULT 0,
    last_changed_on     date,
    last_notified_on    date,
    death_date          date,
    successor_code      text,                        -- set when the code was changed (old code retired)
    predecessor_code    text,
    version             bigint NOT NULL DEFAULT 1,
    name_key            text NOT NULL DEFAULT '',    -- normalised name for four-item search
    address_key         text NOT NULL DEFAULT '',
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX residents_four_items ON residents (name_key, birth_year, birth_month, birth_day, sex);

-- Every version of every record (history for disclosure), one row per applied fold result.
CREATE TABLE resident_versions (
    resident_code   text NOT NULL,
    version         bigint NOT NULL,
    notification_id text,
    change_kind     smallint NOT NULL,
    occurred_on     date,
    notified_on     date,
    record          bytea NOT NULL,                  -- serialized juki.common.v1.IdentityRecord
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (resident_code, version)
);

-- Retired codes are never reissued.
CREATE TABLE retired_codes (
    resident_code  text PRIMARY KEY,
    successor_code text NOT NULL,
    retired_on     date NOT NULL
);

-- The change feed: one row per change applied to `residents`, in commit order (change_id).
CREATE TABLE resident_changes (
    change_id      bigserial PRIMARY KEY,
    resident_code  text NOT NULL,
    change_kind    smallint NOT NULL,
    occurred_on    date,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX resident_changes_code ON resident_changes (resident_code, change_id);

-- Relay outbox (prefecture tier): notifications durable here, not yet acknowledged upstream.
CREATE TABLE outbox (
    outbox_id       bigserial PRIMARY KEY,
    notification_id text NOT NULL UNIQUE,
    payload         bytea NOT NULL,
    enqueued_at     timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE ON notifications, municipalities, residents, resident_versions,
    retired_codes, resident_changes TO {{role}};
GRANT SELECT, INSERT, DELETE ON outbox TO {{role}};
GRANT USAGE ON SEQUENCE resident_changes_change_id_seq, outbox_outbox_id_seq TO {{role}};
