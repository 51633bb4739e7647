-- The bytes a job's trained adapter will store, known at CreateJob from the model and the
-- LoRA settings. An unfinished job holds them against the tenant's stored-bytes quota, so
-- queued jobs cannot together promise more storage than the quota allows.
ALTER TABLE jobs ADD COLUMN adapter_bytes INTEGER NOT NULL DEFAULT 0;
