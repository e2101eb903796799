-- Safe retries of RecordChange (AIP-155): the caller's request id of each recorded change, and a digest of
-- the request it came with, so that a retry is answered from the first answer and a reused id for a
-- different change is refused. Rows without a request id are changes whose caller chose none.
ALTER TABLE outbox ADD COLUMN request_id uuid;
ALTER TABLE outbox ADD COLUMN request_digest bytea;
CREATE UNIQUE INDEX outbox_request_id ON outbox (request_id) WHERE request_id IS NOT NULL;
