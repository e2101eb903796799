-- Resumable bulk loads: each load's progress, written in the same transaction as each of its batches.
-- A row now exists from a load's first batch on; finished_at is set when the load is complete (a row
-- with it is answered from its summary, as before).
ALTER TABLE bulk_loads ALTER COLUMN finished_at DROP NOT NULL;
ALTER TABLE bulk_loads ALTER COLUMN finished_at DROP DEFAULT;
-- The highest resident code applied, while the load arrives in ascending code order (in_order); every
-- record up to it is applied, so a resumed load skips them. A load sent out of order is not resumable
-- (last_resident_code stays empty: resent from the start, which changes nothing twice).
ALTER TABLE bulk_loads ADD COLUMN last_resident_code text NOT NULL DEFAULT '';
ALTER TABLE bulk_loads ADD COLUMN in_order boolean NOT NULL DEFAULT true;
ALTER TABLE bulk_loads ADD COLUMN records_received bigint NOT NULL DEFAULT 0;
ALTER TABLE bulk_loads ADD COLUMN records_unchanged bigint NOT NULL DEFAULT 0;
ALTER TABLE bulk_loads ADD COLUMN records_rejected bigint NOT NULL DEFAULT 0;
ALTER TABLE bulk_loads ADD COLUMN started_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE bulk_loads ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
