-- Agency quotas shared by every lookup replica: one token bucket per recipient, refilled at the 別表
-- row's rate. Replicas lease tokens from it in small chunks (lookup/quota.py), so N replicas grant what
-- one would, not N times as much.
CREATE TABLE quota_buckets (
    recipient   text PRIMARY KEY,              -- SPIFFE id of the agency
    tokens      double precision NOT NULL,     -- tokens left at updated_at
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

GRANT SELECT, INSERT, UPDATE ON quota_buckets TO {{role}};
