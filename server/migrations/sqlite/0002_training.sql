-- Datasets (JSONL files under <data>/datasets/), training jobs and their stored events.
CREATE TABLE datasets (
    id          TEXT    PRIMARY KEY,
    tenant      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    format      TEXT    NOT NULL,
    examples    INTEGER NOT NULL,
    tokens      INTEGER NOT NULL,
    truncated   INTEGER NOT NULL,
    size_bytes  INTEGER NOT NULL,
    sha256      TEXT    NOT NULL,
    file        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    deleted_at  INTEGER
);
CREATE UNIQUE INDEX datasets_live_name ON datasets (tenant, name) WHERE deleted_at IS NULL;

CREATE TABLE jobs (
    id              TEXT    PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    dataset         TEXT    NOT NULL, -- dataset id
    eval_dataset    TEXT,             -- dataset id
    adapter_name    TEXT    NOT NULL,
    spec            TEXT    NOT NULL, -- JSON JobSpec
    status          TEXT    NOT NULL, -- validating|queued|running|succeeded|failed|cancelled
    error           TEXT,
    adapter_version INTEGER,
    step            INTEGER NOT NULL DEFAULT 0,
    total_steps     INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX jobs_by_status ON jobs (status, created_at);

CREATE TABLE job_events (
    job_id  TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    at_ms   INTEGER NOT NULL,
    event   TEXT    NOT NULL, -- JSON JobEvent
    PRIMARY KEY (job_id, seq)
);
