-- The resynchronisation (BulkLoad) in progress, kept so that a restarted CS or a repeated
-- ResyncToPrefecture continues the same load where the prefecture has it, instead of from the start:
-- its load id ('' when none) and the outbox sequence its first snapshot reflected.
ALTER TABLE outbox_state ADD COLUMN resync_load_id text NOT NULL DEFAULT '';
ALTER TABLE outbox_state ADD COLUMN resync_through bigint NOT NULL DEFAULT 0;
