//! Tenants, API keys and what each tenant stores (for quotas).

use sqlx::Row;

use super::{db_err, now_unix, Db, DbError};

#[derive(Debug, Clone, PartialEq)]
pub struct TenantRow {
    pub name: String,
    /// JSON object of quota overrides.
    pub quotas: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    pub id: String,
    pub tenant: String,
    pub salt: String,
    pub hash: String,
    pub description: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// What a tenant has stored and running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredUsage {
    /// Distinct live adapter names.
    pub adapters: u64,
    /// Bytes of live adapter versions and datasets, and those unfinished jobs' adapters
    /// will store.
    pub stored_bytes: u64,
    pub datasets: u64,
    pub running_jobs: u32,
    /// Validating, queued or running.
    pub unfinished_jobs: u32,
}

fn tenant(r: &sqlx::any::AnyRow) -> TenantRow {
    TenantRow {
        name: r.get("name"),
        quotas: r.get("quotas"),
        created_at: r.get("created_at"),
    }
}

fn key(r: &sqlx::any::AnyRow) -> KeyRow {
    KeyRow {
        id: r.get("id"),
        tenant: r.get("tenant"),
        salt: r.get("salt"),
        hash: r.get("hash"),
        description: r.get("description"),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
        revoked_at: r.get("revoked_at"),
    }
}

impl Db {
    /// Inserts a tenant; false when the name is taken.
    pub async fn insert_tenant(&self, name: &str, quotas: &str) -> Result<bool, DbError> {
        let r = sqlx::query(
            "INSERT INTO tenants (name, quotas, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(quotas)
        .bind(now_unix())
        .execute(&self.pool)
        .await
        .map_err(db_err("insert tenant"))?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn tenants(&self) -> Result<Vec<TenantRow>, DbError> {
        let rows = sqlx::query("SELECT name, quotas, created_at FROM tenants ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("list tenants"))?;
        Ok(rows.iter().map(tenant).collect())
    }

    pub async fn set_tenant_quotas(&self, name: &str, quotas: &str) -> Result<bool, DbError> {
        let r = sqlx::query("UPDATE tenants SET quotas = $1 WHERE name = $2")
            .bind(quotas)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(db_err("set quotas"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Deletes a tenant and its keys, in one transaction; false when it does not exist.
    pub async fn delete_tenant(&self, name: &str) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        sqlx::query("DELETE FROM api_keys WHERE tenant = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete keys"))?;
        let r = sqlx::query("DELETE FROM tenants WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db_err("delete tenant"))?;
        tx.commit().await.map_err(db_err("commit"))?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn insert_key(&self, k: &KeyRow) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO api_keys (id, tenant, salt, hash, description, created_at, expires_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&k.id)
        .bind(&k.tenant)
        .bind(&k.salt)
        .bind(&k.hash)
        .bind(&k.description)
        .bind(k.created_at)
        .bind(k.expires_at)
        .bind(k.revoked_at)
        .execute(&self.pool)
        .await
        .map_err(db_err("insert key"))?;
        Ok(())
    }

    pub async fn keys(&self) -> Result<Vec<KeyRow>, DbError> {
        let rows = sqlx::query(
            "SELECT id, tenant, salt, hash, description, created_at, expires_at, revoked_at
             FROM api_keys ORDER BY tenant, created_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("list keys"))?;
        Ok(rows.iter().map(key).collect())
    }

    /// Marks a key revoked (once); the stored row, or None when there is no such key.
    pub async fn revoke_key(&self, id: &str) -> Result<Option<KeyRow>, DbError> {
        let r = sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2
             RETURNING id, tenant, salt, hash, description, created_at, expires_at, revoked_at",
        )
        .bind(now_unix())
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err("revoke key"))?;
        Ok(r.as_ref().map(key))
    }

    /// What `tenant` stores and runs now.
    pub async fn stored_usage(&self, tenant: &str) -> Result<StoredUsage, DbError> {
        let r = sqlx::query(
            "SELECT
               (SELECT COUNT(DISTINCT name) FROM adapter_versions WHERE tenant = $1 AND deleted_at IS NULL),
               CAST((SELECT COALESCE(SUM(size_bytes), 0) FROM adapter_versions WHERE tenant = $1 AND deleted_at IS NULL)
                 + (SELECT COALESCE(SUM(size_bytes), 0) FROM datasets WHERE tenant = $1 AND deleted_at IS NULL)
                 + (SELECT COALESCE(SUM(adapter_bytes), 0) FROM jobs WHERE tenant = $1 AND status IN ('validating', 'queued', 'running')) AS BIGINT),
               (SELECT COUNT(*) FROM datasets WHERE tenant = $1 AND deleted_at IS NULL),
               (SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND status = 'running'),
               (SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND status IN ('validating', 'queued', 'running'))",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err("usage"))?;
        Ok(StoredUsage {
            adapters: r.get::<i64, _>(0) as u64,
            stored_bytes: r.get::<i64, _>(1) as u64,
            datasets: r.get::<i64, _>(2) as u64,
            running_jobs: r.get::<i64, _>(3) as u32,
            unfinished_jobs: r.get::<i64, _>(4) as u32,
        })
    }

    /// Whether a live adapter `(tenant, name)` exists (a new version adds no adapter).
    pub async fn adapter_name_exists(&self, tenant: &str, name: &str) -> Result<bool, DbError> {
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) FROM adapter_versions WHERE tenant = $1 AND name = $2 AND deleted_at IS NULL",
        )
        .bind(tenant)
        .bind(name)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err("adapter exists"))?
        .get(0);
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn tenants_and_keys_round_trip<F, Fut>(open: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Db>,
    {
        let db = open().await;
        assert!(db.insert_tenant("acme", "{}").await.expect("insert"));
        assert!(!db.insert_tenant("acme", "{}").await.expect("dup"));
        let k = KeyRow {
            id: "abc".into(),
            tenant: "acme".into(),
            salt: "00".into(),
            hash: "11".into(),
            description: "ci".into(),
            created_at: 1,
            expires_at: Some(99),
            revoked_at: None,
        };
        db.insert_key(&k).await.expect("key");
        assert_eq!(db.keys().await.expect("keys"), vec![k.clone()]);
        let revoked = db.revoke_key("abc").await.expect("revoke").expect("some");
        assert!(revoked.revoked_at.is_some());
        assert!(db.revoke_key("nope").await.expect("revoke").is_none());
        assert!(db
            .set_tenant_quotas("acme", "{\"max_datasets\":3}")
            .await
            .expect("q"));
        drop(db);
        let db = open().await;
        assert_eq!(
            db.tenants().await.expect("t")[0].quotas,
            "{\"max_datasets\":3}"
        );
        assert_eq!(
            db.stored_usage("acme").await.expect("u"),
            StoredUsage::default()
        );
        assert!(db.delete_tenant("acme").await.expect("delete"));
        assert!(db.keys().await.expect("keys").is_empty());
        assert!(!db.delete_tenant("acme").await.expect("again"));
    }

    #[tokio::test]
    async fn tenants_and_keys_round_trip_and_delete_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.db");
        tenants_and_keys_round_trip(|| async { Db::open(&path).await.expect("open") }).await;
    }

    #[tokio::test]
    async fn tenants_and_keys_round_trip_and_delete_together_on_postgres() {
        let pg = crate::store::testing::TestPostgres::start();
        let url = pg.database("tenants").await;
        tenants_and_keys_round_trip(|| async { Db::connect(&url).await.expect("connect") }).await;
    }
}
