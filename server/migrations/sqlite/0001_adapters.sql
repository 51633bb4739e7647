-- Adapter versions: immutable once written; deletion is a tombstone so version numbers are
-- never reused.
CREATE TABLE adapter_versions (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant           TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    kind             TEXT    NOT NULL,
    rank             INTEGER NOT NULL,
    alpha            REAL    NOT NULL,
    target_modules   TEXT    NOT NULL, -- JSON array of module names
    size_bytes       INTEGER NOT NULL,
    sha256           TEXT    NOT NULL,
    base_fingerprint TEXT    NOT NULL,
    dir              TEXT    NOT NULL, -- relative to <data>/adapters
    created_at       INTEGER NOT NULL, -- unix seconds
    deleted_at       INTEGER,
    UNIQUE (tenant, name, version)
);
CREATE INDEX adapter_versions_live ON adapter_versions (tenant, name) WHERE deleted_at IS NULL;
