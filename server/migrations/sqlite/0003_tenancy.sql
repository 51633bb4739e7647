-- Tenants, their API keys (salted SHA-256 of the secret, never the secret) and quota
-- overrides (JSON object of the fields set; absent fields take the server's defaults).
CREATE TABLE tenants (
    name        TEXT    PRIMARY KEY,
    quotas      TEXT    NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT    PRIMARY KEY, -- public part, also in the secret: graft_<id>_<secret>
    tenant      TEXT    NOT NULL REFERENCES tenants (name),
    salt        TEXT    NOT NULL,    -- hex
    hash        TEXT    NOT NULL,    -- hex SHA-256(salt || secret)
    description TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant);

-- Data stored before tenancy existed keeps an owner an admin can give keys to.
INSERT INTO tenants (name, created_at)
SELECT tenant, CAST(strftime('%s', 'now') AS INTEGER) FROM adapter_versions
UNION SELECT tenant, CAST(strftime('%s', 'now') AS INTEGER) FROM datasets
UNION SELECT tenant, CAST(strftime('%s', 'now') AS INTEGER) FROM jobs;
