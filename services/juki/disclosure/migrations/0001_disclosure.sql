-- The disclosure service (本人開示) keeps no resident data of its own: it reads the national store,
-- the card service and the access log over gRPC. It only remembers the nonces of counter operators'
-- proofs, so that a replayed proof is refused.
-- Runs in schema {{schema}} as the administrative role; {{role}} is the disclosure service's role.
CREATE TABLE operator_nonces (
    operator_id  text NOT NULL,
    nonce        bytea NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operator_id, nonce)
);
CREATE INDEX operator_nonces_seen ON operator_nonces (seen_at);

GRANT SELECT, INSERT, DELETE ON operator_nonces TO {{role}};
