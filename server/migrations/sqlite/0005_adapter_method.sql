-- Adapters of every method: a version records its `method` and a JSON `details` object of
-- that method's settings (LoRA's rank/alpha/target modules move there). LoRA-only columns
-- go; existing rows become method 'lora' with their settings as details. SQLite cannot drop
-- NOT NULL columns in place, so the table is rebuilt (ids kept).
CREATE TABLE adapter_versions_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant           TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    method           TEXT    NOT NULL,
    details          TEXT    NOT NULL, -- JSON object, tagged by "method"
    size_bytes       INTEGER NOT NULL,
    sha256           TEXT    NOT NULL,
    base_fingerprint TEXT    NOT NULL,
    dir              TEXT    NOT NULL, -- relative to <data>/adapters
    created_at       INTEGER NOT NULL, -- unix seconds
    deleted_at       INTEGER,
    UNIQUE (tenant, name, version)
);
INSERT INTO adapter_versions_new
    (id, tenant, name, version, method, details, size_bytes, sha256, base_fingerprint, dir, created_at, deleted_at)
SELECT id, tenant, name, version, 'lora',
       json_object('method', 'lora', 'rank', rank, 'alpha', alpha,
                   'target_modules', json(target_modules), 'use_rslora', json('false')),
       size_bytes, sha256, base_fingerprint, dir, created_at, deleted_at
FROM adapter_versions;
DROP TABLE adapter_versions;
ALTER TABLE adapter_versions_new RENAME TO adapter_versions;
CREATE INDEX adapter_versions_live ON adapter_versions (tenant, name) WHERE deleted_at IS NULL;
