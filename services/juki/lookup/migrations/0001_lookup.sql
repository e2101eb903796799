-- The lookup service: a reader of the national identity store (as a read replica would be read) and
-- the owner of agencies' watch lists for the change feed and of operator-proof nonces.
-- Runs in schema {{schema}} as the administrative role; {{role}} is lookup's own role.

-- Read access to the national store (owned by intake-national): SELECT only, never a write.
GRANT USAGE ON SCHEMA {{national_schema}} TO {{role}};
GRANT SELECT ON {{national_schema}}.residents, {{national_schema}}.resident_changes,
    {{national_schema}}.municipalities TO {{role}};
ALTER DEFAULT PRIVILEGES IN SCHEMA {{national_schema}} GRANT SELECT ON TABLES TO {{role}};

-- Watch lists of the change feed: which codes an agency follows under which 事務 (purpose).
CREATE TABLE watches (
    recipient      text NOT NULL,            -- SPIFFE id of the agency
    purpose        text NOT NULL,            -- 事務 code from the 別表 policy
    resident_code  text NOT NULL,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (recipient, purpose, resident_code)
);
-- The feed joins changes to watches by code: this index serves "is this code watched by me?".
CREATE INDEX watches_code ON watches (resident_code, recipient, purpose);

-- Operator proofs seen (operator_id, nonce): a second use of a nonce is a replay and is refused.
CREATE TABLE operator_nonces (
    operator_id  text NOT NULL,
    nonce        bytea NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operator_id, nonce)
);
CREATE INDEX operator_nonces_seen ON operator_nonces (seen_at);

GRANT SELECT, INSERT ON watches TO {{role}};
GRANT SELECT, INSERT, DELETE ON operator_nonces TO {{role}};
