-- The file name a dataset was uploaded under, where the client gave one (the OpenAI-compatible
-- front's POST /v1/files); NULL for datasets uploaded by name over gRPC.
ALTER TABLE datasets ADD COLUMN filename TEXT;
