-- Records (and batch ids) partitioned by month of recorded_at, so that retention detaches and drops whole
-- partitions instead of deleting rows (juki.accesslog.retention), and so that a national log (about 10^8
-- records a year, kept 7 years) stays a set of month-sized tables. Works on an existing log: the tables
-- are renamed, their rows copied into the monthly partitions, the old tables dropped.
--
-- The primary key of a partitioned table must hold the partition key: (sequence, recorded_at). Sequences
-- are still assigned once, by the writer under its advisory lock, and verification names any duplicate or
-- gap. Rows whose month has no partition land in the DEFAULT partition (never dropped by retention);
-- ensure_partitions() makes them ahead of time: the service calls it at start and every few hours (it runs
-- as the schema's owner: the service's role may still only INSERT and SELECT).

ALTER TABLE records RENAME TO records_v1;
ALTER INDEX records_pkey RENAME TO records_v1_pkey;
ALTER INDEX records_subject RENAME TO records_v1_subject;
ALTER TABLE batches RENAME TO batches_v1;
ALTER INDEX batches_pkey RENAME TO batches_v1_pkey;

CREATE TABLE records (
    sequence      bigint NOT NULL,
    subject       bytea NOT NULL,
    provided_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL,
    outcome       smallint NOT NULL,
    payload       bytea NOT NULL,
    chain_hash    bytea NOT NULL,
    PRIMARY KEY (sequence, recorded_at)
) PARTITION BY RANGE (recorded_at);
CREATE INDEX records_subject ON records (subject, provided_at, sequence);
CREATE TABLE records_default PARTITION OF records DEFAULT;

CREATE TABLE batches (
    batch_id        text NOT NULL,
    first_sequence  bigint NOT NULL,
    count           integer NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, recorded_at)
) PARTITION BY RANGE (recorded_at);
CREATE TABLE batches_default PARTITION OF batches DEFAULT;

-- Monthly partitions (UTC months) of records and batches from the month of first_at through that of
-- last_at, each named <table>_YYYYMM; existing ones are kept. A month whose rows already sit in the
-- DEFAULT partition is skipped (its rows stay there). Returns the number of partitions made.
CREATE FUNCTION ensure_partitions(first_at timestamptz, last_at timestamptz) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = "{{schema}}", pg_temp AS $$
DECLARE
    month_start timestamp := date_trunc('month', first_at AT TIME ZONE 'UTC');
    last_start timestamp := date_trunc('month', last_at AT TIME ZONE 'UTC');
    month_end timestamp;
    parent text;
    child text;
    crowded boolean;
    made integer := 0;
BEGIN
    IF last_start - month_start > interval '30 years' THEN
        RAISE EXCEPTION 'ensure_partitions: at most 30 years of monthly partitions at once';
    END IF;
    WHILE month_start <= last_start LOOP
        month_end := month_start + interval '1 month';
        FOREACH parent IN ARRAY ARRAY['records', 'batches'] LOOP
            child := parent || '_' || to_char(month_start, 'YYYYMM');
            IF to_regclass(format('%I.%I', '{{schema}}', child)) IS NULL THEN
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE recorded_at >= $1 AND recorded_at < $2)',
                               parent || '_default')
                    INTO crowded USING month_start AT TIME ZONE 'UTC', month_end AT TIME ZONE 'UTC';
                IF NOT crowded THEN
                    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)', child, parent,
                                   month_start AT TIME ZONE 'UTC', month_end AT TIME ZONE 'UTC');
                    made := made + 1;
                END IF;
            END IF;
        END LOOP;
        month_start := month_end;
    END LOOP;
    RETURN made;
END
$$;
REVOKE ALL ON FUNCTION ensure_partitions(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ensure_partitions(timestamptz, timestamptz) TO {{role}};

SELECT ensure_partitions(
    least(now(), (SELECT min(recorded_at) FROM records_v1), (SELECT min(recorded_at) FROM batches_v1)),
    now() + interval '2 months');
INSERT INTO records (sequence, subject, provided_at, recorded_at, outcome, payload, chain_hash)
    SELECT sequence, subject, provided_at, recorded_at, outcome, payload, chain_hash FROM records_v1;
INSERT INTO batches (batch_id, first_sequence, count, recorded_at)
    SELECT batch_id, first_sequence, count, recorded_at FROM batches_v1;
DROP TABLE records_v1;
DROP TABLE batches_v1;

GRANT SELECT, INSERT ON records, batches TO {{role}};
