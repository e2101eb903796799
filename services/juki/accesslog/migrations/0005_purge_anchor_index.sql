-- Purge anchors are a handful among the periodic checkpoints (one every few seconds: millions over the
-- years). Verification, resumed or not, and every purge read them; this index lets them do so without
-- scanning the rest, so that an incremental audit reads only the checkpoints since its state.
CREATE INDEX checkpoints_purge ON checkpoints (sequence) WHERE kind = 'purge';
