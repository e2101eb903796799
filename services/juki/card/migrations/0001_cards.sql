-- Resident cards (住基カード), their PIN hashes, special moves and every card event.
-- Runs in schema {{schema}} as the administrative role; {{role}} is the card service's own role.

CREATE TABLE cards (
    card_number          text PRIMARY KEY,
    resident_code        text NOT NULL,
    card_type            smallint NOT NULL,            -- juki.card.v1.CardType
    resident_kind        smallint NOT NULL,            -- juki.common.v1.ResidentKind
    state                smallint NOT NULL,            -- ACTIVE, LOCKED, SUSPENDED or REVOKED (EXPIRED is evaluated)
    state_before_suspension smallint,                  -- restored on release
    failed_pin_attempts  integer NOT NULL DEFAULT 0,
    pin_salt             bytea NOT NULL,
    pin_hash             bytea NOT NULL,               -- scrypt; the PIN itself is never stored
    photo                bytea,                        -- type B only
    issued_on            date NOT NULL,
    expires_on           date NOT NULL,
    issuing_municipality text NOT NULL,
    home_municipality    text NOT NULL,                -- where the holder is registered now
    revoked_reason       text NOT NULL DEFAULT '',
    state_changed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cards_resident ON cards (resident_code);

-- 付記転出届 (special move-out) awaiting the 特例転入 at the destination.
CREATE TABLE special_moves (
    move_id              bigserial PRIMARY KEY,
    card_number          text NOT NULL REFERENCES cards (card_number),
    resident_code        text NOT NULL,
    from_municipality    text NOT NULL,
    to_municipality      text NOT NULL,
    planned_move_on      date NOT NULL,
    deadline             date NOT NULL,
    filed_on             date NOT NULL,
    moved_out_notified   boolean NOT NULL DEFAULT false,  -- MOVE_OUT recorded at the old CS
    moved_in_on          date,                            -- set when the 特例転入 is done
    new_resident_code    text
);
CREATE UNIQUE INDEX special_moves_open ON special_moves (card_number) WHERE moved_in_on IS NULL;

-- Every lifecycle event and use of a card, with the operator who acted.
CREATE TABLE card_events (
    event_id     bigserial PRIMARY KEY,
    card_number  text NOT NULL,
    event        text NOT NULL,
    detail       text NOT NULL DEFAULT '',
    operator_id  text NOT NULL DEFAULT '',
    peer         text NOT NULL DEFAULT '',
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX card_events_card ON card_events (card_number, event_id);

CREATE TABLE operator_nonces (
    operator_id  text NOT NULL,
    nonce        bytea NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operator_id, nonce)
);

GRANT SELECT, INSERT, UPDATE ON cards, special_moves TO {{role}};
GRANT SELECT, INSERT ON card_events TO {{role}};
GRANT SELECT, INSERT, DELETE ON operator_nonces TO {{role}};
GRANT USAGE ON SEQUENCE special_moves_move_id_seq, card_events_event_id_seq TO {{role}};
