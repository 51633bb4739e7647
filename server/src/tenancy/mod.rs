//! Tenants, who is calling, and what each tenant may still do.
//! - [`Tenancy`] owns the tenants and API keys (rows in the database, mirrored in memory so
//!   that authenticating a call needs no I/O) and the live meters of each tenant (streams
//!   in flight, tokens-per-minute bucket).
//! - [`Who`] is what a request's bearer key resolved to; [`Tenancy::acting`] turns it and a
//!   request's `tenant` field into the one tenant the request acts for.
//! - Storage quotas are checked under a per-tenant lock ([`Tenancy::storage_guard`]) held
//!   across check and write, so two concurrent uploads cannot both squeeze under a limit.
//!
//! Invariant: every write goes to the database first and to memory after, so memory never
//! claims what a restart would not find. Secrets are never stored or logged.

pub mod keys;
pub mod quotas;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

pub use quotas::{Limits, Quotas, TokenBucket};

use crate::store::{
    tenancy::{KeyRow, StoredUsage},
    Db, DbError,
};

/// Settings of tenancy.
#[derive(Clone, Default)]
pub struct TenancyConfig {
    /// The admin key; `None` disables the Admin service (tenant keys still work).
    pub admin_key: Option<String>,
    pub defaults: Limits,
}

impl std::fmt::Debug for TenancyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenancyConfig")
            .field("admin_key", &self.admin_key.as_ref().map(|_| "<set>"))
            .field("defaults", &self.defaults)
            .finish()
    }
}

/// Who a request's key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Admin,
    Tenant(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("quota {quota} exceeded: {detail}")]
    Quota {
        quota: &'static str,
        detail: String,
        retry_after: Option<Duration>,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

fn invalid(field: &str, reason: impl Into<String>) -> TenancyError {
    TenancyError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What a storage write adds besides bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewObject<'a> {
    /// A version of this adapter name (a new name counts against `max_adapters`).
    AdapterVersion(&'a str),
    Dataset,
}

/// A tenant as the Admin service shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantInfo {
    pub name: String,
    pub limits: Limits,
    pub usage: StoredUsage,
    pub streams: u32,
    pub created_at: i64,
}

/// A key as listed: never its secret.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyInfo {
    pub id: String,
    pub tenant: String,
    pub description: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl From<&KeyRow> for KeyInfo {
    fn from(k: &KeyRow) -> Self {
        Self {
            id: k.id.clone(),
            tenant: k.tenant.clone(),
            description: k.description.clone(),
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
        }
    }
}

#[derive(Debug, Clone)]
struct TenantEntry {
    quotas: Quotas,
    created_at: i64,
}

#[derive(Default)]
struct Directory {
    tenants: HashMap<String, TenantEntry>,
    keys: HashMap<String, KeyRow>,
}

/// Live per-tenant meters.
struct Meter {
    streams: u32,
    bucket: TokenBucket,
}

pub struct Tenancy {
    db: Db,
    admin: Option<[u8; 32]>,
    defaults: Limits,
    directory: RwLock<Directory>,
    /// Serialises the directory's writers (database then memory).
    writer: tokio::sync::Mutex<()>,
    meters: Arc<Mutex<HashMap<String, Meter>>>,
    storage_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What [`Tenancy`] announces when tenants or keys change.
const TENANTS_CHANGED: &str = "tenants";

async fn load_directory(db: &Db) -> Result<Directory, TenancyError> {
    let mut dir = Directory::default();
    for t in db.tenants().await? {
        let quotas = serde_json::from_str(&t.quotas).unwrap_or_else(|e| {
            tracing::error!(tenant = %t.name, error = %e, "unreadable quota overrides; using defaults");
            Quotas::default()
        });
        dir.tenants.insert(
            t.name,
            TenantEntry {
                quotas,
                created_at: t.created_at,
            },
        );
    }
    for k in db.keys().await? {
        dir.keys.insert(k.id.clone(), k);
    }
    Ok(dir)
}

fn tenant_name(field: &str, name: &str) -> Result<(), TenancyError> {
    crate::names::validate(name, "tenant name").map_err(|e| invalid(field, e))
}

impl Tenancy {
    /// Loads tenants and keys from the database.
    pub async fn open(db: Db, cfg: TenancyConfig) -> Result<Arc<Self>, TenancyError> {
        let dir = load_directory(&db).await?;
        Ok(Arc::new(Self {
            db,
            admin: cfg.admin_key.as_deref().map(keys::digest),
            defaults: cfg.defaults,
            directory: RwLock::new(dir),
            writer: tokio::sync::Mutex::new(()),
            meters: Arc::default(),
            storage_locks: Mutex::default(),
        }))
    }

    /// Reads tenants and keys from the database again (what other processes on a shared
    /// database wrote).
    pub async fn reload(&self) -> Result<(), TenancyError> {
        let _w = self.writer.lock().await;
        let dir = load_directory(&self.db).await?;
        *self.write() = dir;
        Ok(())
    }

    /// Keeps the directory in step with other processes on a shared database: reloads on
    /// each announcement of a change to tenants or keys (PostgreSQL `LISTEN`), when some may
    /// have been missed, and every `poll` in any case ([`Db::follow`]). Returns at once on
    /// SQLite, which one process owns.
    pub async fn follow_changes(self: Arc<Self>, poll: Duration) {
        let db = self.db.clone();
        db.follow("tenants", poll, |news| {
            let me = self.clone();
            async move {
                if news.as_deref().is_none_or(|w| w == TENANTS_CHANGED) {
                    if let Err(e) = me.reload().await {
                        tracing::warn!(error = %e, "reloading tenants and keys");
                    }
                }
            }
        })
        .await;
    }

    /// Announces a change of tenants or keys to the other processes (a failure is logged:
    /// their poll will find the change).
    async fn announce(&self) {
        if let Err(e) = self.db.announce(TENANTS_CHANGED).await {
            tracing::warn!(error = %e, "announcing a tenant change");
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Directory> {
        self.directory.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Directory> {
        self.directory.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves an `authorization` header value. The same answer for an unknown key id and
    /// a wrong secret; revoked and expired only once the secret matched.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Who, TenancyError> {
        let header = header.ok_or(TenancyError::Unauthenticated(
            "missing `authorization: Bearer <API key>` metadata",
        ))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(TenancyError::Unauthenticated(
                "the authorization metadata must read `Bearer <API key>`",
            ))?;
        if let Some(admin) = &self.admin {
            if keys::same(&keys::digest(token), admin) {
                return Ok(Who::Admin);
            }
        }
        const BAD: TenancyError = TenancyError::Unauthenticated("invalid API key");
        let (id, secret) = keys::parse(token).ok_or(BAD)?;
        let dir = self.read();
        let key = dir.keys.get(id).ok_or(BAD)?;
        if !keys::verify(&key.salt, &key.hash, secret) {
            return Err(BAD);
        }
        if key.revoked_at.is_some() {
            return Err(TenancyError::Unauthenticated("this API key was revoked"));
        }
        if key.expires_at.is_some_and(|e| e <= now_unix()) {
            return Err(TenancyError::Unauthenticated("this API key has expired"));
        }
        Ok(Who::Tenant(key.tenant.clone()))
    }

    /// The tenant a request acts for: a tenant key acts for its own tenant (the request's
    /// `tenant` field may only repeat it); the admin key for the tenant the field names.
    pub fn acting(&self, who: &Who, requested: &str) -> Result<String, TenancyError> {
        match who {
            Who::Tenant(t) if requested.is_empty() || requested == t => Ok(t.clone()),
            Who::Tenant(_) => Err(TenancyError::PermissionDenied(
                "tenant: a tenant's key acts only for its own tenant; leave `tenant` empty".into(),
            )),
            Who::Admin if requested.is_empty() => Err(invalid(
                "tenant",
                "the admin key acts for a tenant only when `tenant` names it",
            )),
            Who::Admin => {
                tenant_name("tenant", requested)?;
                if self.read().tenants.contains_key(requested) {
                    Ok(requested.to_string())
                } else {
                    Err(TenancyError::NotFound(format!("tenant {requested}")))
                }
            }
        }
    }

    pub fn require_admin(&self, who: &Who) -> Result<(), TenancyError> {
        if self.admin.is_none() {
            return Err(TenancyError::PermissionDenied(
                "the Admin service is disabled: no admin key was configured".into(),
            ));
        }
        match who {
            Who::Admin => Ok(()),
            Who::Tenant(_) => Err(TenancyError::PermissionDenied(
                "the Admin service needs the admin key".into(),
            )),
        }
    }

    /// A tenant's effective limits (defaults for an unknown name).
    pub fn limits(&self, tenant: &str) -> Limits {
        self.read()
            .tenants
            .get(tenant)
            .map(|t| t.quotas.over(&self.defaults))
            .unwrap_or(self.defaults)
    }

    /// Running-job limits of every tenant (for the job runner).
    pub fn running_job_limits(&self) -> (u32, HashMap<String, u32>) {
        let dir = self.read();
        let per = dir
            .tenants
            .iter()
            .map(|(n, t)| (n.clone(), t.quotas.over(&self.defaults).max_running_jobs))
            .collect();
        (self.defaults.max_running_jobs, per)
    }

    pub async fn create_tenant(
        &self,
        name: &str,
        quotas: Quotas,
    ) -> Result<TenantInfo, TenancyError> {
        tenant_name("name", name)?;
        let _w = self.writer.lock().await;
        let json = serde_json::to_string(&quotas).unwrap_or_else(|_| "{}".into());
        if !self.db.insert_tenant(name, &json).await? {
            return Err(TenancyError::AlreadyExists(format!("tenant {name}")));
        }
        self.write().tenants.insert(
            name.into(),
            TenantEntry {
                quotas,
                created_at: now_unix(),
            },
        );
        self.announce().await;
        drop(_w);
        self.tenant(name).await
    }

    pub async fn tenant(&self, name: &str) -> Result<TenantInfo, TenancyError> {
        tenant_name("name", name)?;
        let entry = self
            .read()
            .tenants
            .get(name)
            .cloned()
            .ok_or_else(|| TenancyError::NotFound(format!("tenant {name}")))?;
        let usage = self.db.stored_usage(name).await?;
        let streams = self
            .meters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map_or(0, |m| m.streams);
        Ok(TenantInfo {
            name: name.into(),
            limits: entry.quotas.over(&self.defaults),
            usage,
            streams,
            created_at: entry.created_at,
        })
    }

    pub async fn tenants(&self) -> Result<Vec<TenantInfo>, TenancyError> {
        let mut names: Vec<String> = self.read().tenants.keys().cloned().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            out.push(self.tenant(&n).await?);
        }
        Ok(out)
    }

    /// Deletes an empty tenant and its keys.
    pub async fn delete_tenant(&self, name: &str) -> Result<(), TenancyError> {
        let info = self.tenant(name).await?;
        let _storage = self.storage_guard(name).await?;
        let u = self.db.stored_usage(name).await?;
        if u.adapters > 0 || u.datasets > 0 || u.unfinished_jobs > 0 {
            return Err(TenancyError::FailedPrecondition(format!(
                "tenant {} still owns {} adapters, {} datasets and {} unfinished jobs; delete them first",
                info.name, u.adapters, u.datasets, u.unfinished_jobs
            )));
        }
        let _w = self.writer.lock().await;
        self.db.delete_tenant(name).await?;
        {
            let mut dir = self.write();
            dir.tenants.remove(name);
            dir.keys.retain(|_, k| k.tenant != name);
        }
        self.announce().await;
        Ok(())
    }

    /// A new key; its secret is returned once.
    pub async fn create_key(
        &self,
        tenant: &str,
        description: &str,
        ttl: Option<Duration>,
    ) -> Result<(KeyInfo, String), TenancyError> {
        tenant_name("tenant", tenant)?;
        if description.len() > 256 || description.contains('\0') {
            return Err(invalid(
                "description",
                "at most 256 bytes, no NUL characters",
            ));
        }
        let _w = self.writer.lock().await;
        if !self.read().tenants.contains_key(tenant) {
            return Err(TenancyError::NotFound(format!("tenant {tenant}")));
        }
        let minted = keys::mint();
        let now = now_unix();
        let row = KeyRow {
            id: minted.id.clone(),
            tenant: tenant.into(),
            salt: minted.salt,
            hash: minted.hash,
            description: description.into(),
            created_at: now,
            expires_at: ttl.map(|t| now.saturating_add(t.as_secs().min(i64::MAX as u64) as i64)),
            revoked_at: None,
        };
        self.db.insert_key(&row).await?;
        let info = KeyInfo::from(&row);
        self.write().keys.insert(row.id.clone(), row);
        self.announce().await;
        Ok((info, minted.token))
    }

    pub fn keys_of(&self, tenant: &str) -> Result<Vec<KeyInfo>, TenancyError> {
        tenant_name("tenant", tenant)?;
        let dir = self.read();
        if !dir.tenants.contains_key(tenant) {
            return Err(TenancyError::NotFound(format!("tenant {tenant}")));
        }
        let mut out: Vec<KeyInfo> = dir
            .keys
            .values()
            .filter(|k| k.tenant == tenant)
            .map(KeyInfo::from)
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    pub async fn revoke_key(&self, id: &str) -> Result<KeyInfo, TenancyError> {
        if id.is_empty() || id.len() > 64 {
            return Err(invalid("id", "a key id (from CreateKey or ListKeys)"));
        }
        let _w = self.writer.lock().await;
        let row = self
            .db
            .revoke_key(id)
            .await?
            .ok_or_else(|| TenancyError::NotFound(format!("key {id}")))?;
        let info = KeyInfo::from(&row);
        self.write().keys.insert(row.id.clone(), row);
        self.announce().await;
        Ok(info)
    }

    pub async fn set_quotas(
        &self,
        tenant: &str,
        quotas: Quotas,
        reset: bool,
    ) -> Result<TenantInfo, TenancyError> {
        tenant_name("tenant", tenant)?;
        let _w = self.writer.lock().await;
        let old = self
            .read()
            .tenants
            .get(tenant)
            .map(|t| t.quotas)
            .ok_or_else(|| TenancyError::NotFound(format!("tenant {tenant}")))?;
        let new = if reset { quotas } else { old.merged(&quotas) };
        let json = serde_json::to_string(&new).unwrap_or_else(|_| "{}".into());
        self.db.set_tenant_quotas(tenant, &json).await?;
        if let Some(t) = self.write().tenants.get_mut(tenant) {
            t.quotas = new;
        }
        self.announce().await;
        drop(_w);
        self.tenant(tenant).await
    }

    /// Holds the tenant's storage lock: check a storage quota and write under it. The lock
    /// is this process's (per tenant) and, on a database that several replicas share, the
    /// database's ([`Db::tenant_write_lock`]), so no two replicas overdraw a quota together.
    pub async fn storage_guard(&self, tenant: &str) -> Result<StorageGuard, TenancyError> {
        let lock = self
            .storage_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_string())
            .or_default()
            .clone();
        let local = lock.lock_owned().await;
        let shared = self.db.tenant_write_lock(tenant).await?;
        Ok(StorageGuard {
            _shared: shared,
            _local: local,
        })
    }

    /// Refuses a write that would take `tenant` over a storage quota: one that stores
    /// `bytes` and adds `new`. Call it under [`storage_guard`](Self::storage_guard).
    pub async fn check_storage(
        &self,
        tenant: &str,
        new: NewObject<'_>,
        bytes: u64,
    ) -> Result<(), TenancyError> {
        let l = self.limits(tenant);
        let u = self.db.stored_usage(tenant).await?;
        let quota = |quota, used: u64, add: u64, limit: u64| {
            if used.saturating_add(add) <= limit {
                return Ok(());
            }
            Err(TenancyError::Quota {
                quota,
                detail: format!(
                    "the tenant uses {used} of {limit} and this would add {add}; delete something or ask for a larger quota"
                ),
                retry_after: None,
            })
        };
        match new {
            NewObject::AdapterVersion(name) => {
                if !self.db.adapter_name_exists(tenant, name).await? {
                    quota("max_adapters", u.adapters, 1, l.max_adapters)?;
                }
            }
            NewObject::Dataset => quota("max_datasets", u.datasets, 1, l.max_datasets)?,
        }
        quota(
            "max_stored_bytes",
            u.stored_bytes,
            bytes,
            l.max_stored_bytes,
        )
    }

    /// Refuses a new training job beyond the tenant's unfinished-jobs quota.
    pub async fn check_new_job(&self, tenant: &str) -> Result<(), TenancyError> {
        let l = self.limits(tenant);
        let u = self.db.stored_usage(tenant).await?;
        if u.unfinished_jobs >= l.max_queued_jobs {
            return Err(TenancyError::Quota {
                quota: "max_queued_jobs",
                detail: format!(
                    "the tenant has {} unfinished jobs (limit {}); wait for one to end or cancel one",
                    u.unfinished_jobs, l.max_queued_jobs
                ),
                retry_after: Some(Duration::from_secs(30)),
            });
        }
        Ok(())
    }

    /// Admits one generation stream that may generate up to `max_tokens`: within the
    /// tenant's concurrent-stream quota, and with `max_tokens` taken from its per-minute
    /// bucket. The permit gives the slot and the unused tokens back on drop.
    pub fn begin_stream(
        &self,
        tenant: &str,
        max_tokens: u64,
    ) -> Result<StreamPermit, TenancyError> {
        let l = self.limits(tenant);
        let per_minute = l.max_tokens_per_minute;
        if max_tokens > per_minute {
            return Err(TenancyError::Quota {
                quota: "max_tokens_per_minute",
                detail: format!(
                    "the request may generate {max_tokens} tokens (max_new_tokens) but the tenant may generate {per_minute} a minute; ask for fewer"
                ),
                retry_after: None,
            });
        }
        let now = Instant::now();
        let mut meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        let m = meters.entry(tenant.to_string()).or_insert_with(|| Meter {
            streams: 0,
            bucket: TokenBucket::full(per_minute, now),
        });
        if m.streams >= l.max_concurrent_streams {
            return Err(TenancyError::Quota {
                quota: "max_concurrent_streams",
                detail: format!(
                    "{} generation streams in flight (limit {})",
                    m.streams, l.max_concurrent_streams
                ),
                retry_after: Some(Duration::from_secs(1)),
            });
        }
        if let Err(wait) = m.bucket.take(max_tokens, per_minute, now) {
            return Err(TenancyError::Quota {
                quota: "max_tokens_per_minute",
                detail: format!(
                    "the request may generate {max_tokens} tokens and the tenant's {per_minute} a minute are spent or held by running streams"
                ),
                retry_after: Some(wait),
            });
        }
        m.streams += 1;
        Ok(StreamPermit {
            meters: self.meters.clone(),
            tenant: tenant.to_string(),
            per_minute,
            reserved: max_tokens,
            used: AtomicU64::new(0),
        })
    }
}

/// One admitted generation stream of a tenant. It holds `max_new_tokens` of the tenant's
/// per-minute budget from admission (as OpenAI counts `max_tokens`), so the budget is never
/// overdrawn; what the stream did not generate goes back, and its slot is freed, on drop.
pub struct StreamPermit {
    meters: Arc<Mutex<HashMap<String, Meter>>>,
    tenant: String,
    per_minute: u64,
    reserved: u64,
    used: AtomicU64,
}

impl StreamPermit {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Counts `tokens` generated by this stream (already held at admission).
    pub fn charge(&self, tokens: usize) {
        self.used.fetch_add(tokens as u64, Ordering::Relaxed);
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let unused = self.reserved.saturating_sub(*self.used.get_mut());
        let mut meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = meters.get_mut(&self.tenant) {
            m.streams = m.streams.saturating_sub(1);
            m.bucket.give_back(unused, self.per_minute, Instant::now());
        }
    }
}

/// A tenant's storage lock ([`Tenancy::storage_guard`]), released on drop (the database's
/// first, then this process's).
pub struct StorageGuard {
    _shared: crate::store::TenantWriteLock,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open(admin: Option<&str>) -> (tempfile::TempDir, Arc<Tenancy>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&dir.path().join("g.db")).await.expect("db");
        let t = Tenancy::open(
            db,
            TenancyConfig {
                admin_key: admin.map(Into::into),
                defaults: Limits::default(),
            },
        )
        .await
        .expect("open");
        (dir, t)
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[tokio::test]
    async fn keys_authenticate_until_revoked_and_survive_reopen() {
        let (dir, t) = open(Some("admin-secret-0123456789")).await;
        t.create_tenant("acme", Quotas::default())
            .await
            .expect("tenant");
        let (info, token) = t.create_key("acme", "ci", None).await.expect("key");
        assert_eq!(
            t.authenticate(Some(&bearer(&token))).expect("ok"),
            Who::Tenant("acme".into())
        );
        assert_eq!(
            t.authenticate(Some("Bearer admin-secret-0123456789"))
                .expect("admin"),
            Who::Admin
        );
        for bad in [
            None,
            Some("Basic x"),
            Some("Bearer "),
            Some("Bearer graft_00_11"),
        ] {
            assert!(matches!(
                t.authenticate(bad),
                Err(TenancyError::Unauthenticated(_))
            ));
        }
        // Reopen: the key still works (from the database), the secret is nowhere in it.
        drop(t);
        let db = Db::open(&dir.path().join("g.db")).await.expect("db");
        let rows = db.keys().await.expect("keys");
        assert!(rows
            .iter()
            .all(|r| !token.contains(&r.hash) && !r.hash.is_empty()));
        let t = Tenancy::open(db, TenancyConfig::default())
            .await
            .expect("reopen");
        assert!(t.authenticate(Some(&bearer(&token))).is_ok());
        t.revoke_key(&info.id).await.expect("revoke");
        assert!(t.authenticate(Some(&bearer(&token))).is_err());
        // No admin key configured: the admin service is off, an admin-looking key is just bad.
        assert!(t
            .authenticate(Some("Bearer admin-secret-0123456789"))
            .is_err());
    }

    #[tokio::test]
    async fn expired_keys_fail() {
        let (_d, t) = open(None).await;
        t.create_tenant("acme", Quotas::default())
            .await
            .expect("tenant");
        let (_, token) = t
            .create_key("acme", "", Some(Duration::ZERO))
            .await
            .expect("key");
        assert!(t.authenticate(Some(&bearer(&token))).is_err());
    }

    #[tokio::test]
    async fn acting_tenant_rules() {
        let (_d, t) = open(Some("admin-secret-0123456789")).await;
        t.create_tenant("acme", Quotas::default())
            .await
            .expect("tenant");
        let acme = Who::Tenant("acme".into());
        assert_eq!(t.acting(&acme, "").expect("own"), "acme");
        assert_eq!(t.acting(&acme, "acme").expect("own"), "acme");
        assert!(matches!(
            t.acting(&acme, "globex"),
            Err(TenancyError::PermissionDenied(_))
        ));
        assert!(matches!(
            t.acting(&Who::Admin, ""),
            Err(TenancyError::Invalid { .. })
        ));
        assert_eq!(t.acting(&Who::Admin, "acme").expect("named"), "acme");
        assert!(matches!(
            t.acting(&Who::Admin, "globex"),
            Err(TenancyError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn stream_quota_counts_permits_and_frees_them_on_drop() {
        let (_d, t) = open(None).await;
        t.create_tenant(
            "acme",
            Quotas {
                max_concurrent_streams: Some(2),
                max_tokens_per_minute: Some(100),
                ..Default::default()
            },
        )
        .await
        .expect("tenant");
        let a = t.begin_stream("acme", 30).expect("1");
        let b = t.begin_stream("acme", 30).expect("2");
        assert!(matches!(
            t.begin_stream("acme", 10),
            Err(TenancyError::Quota {
                quota: "max_concurrent_streams",
                ..
            })
        ));
        assert!(
            t.begin_stream("other", 10).is_ok(),
            "other tenants are not affected"
        );
        // Admission holds max_new_tokens; what a stream did not generate comes back.
        a.charge(30);
        drop(a);
        b.charge(5);
        drop(b); // 100 - 30 - 5 = 65 left (plus a trickle of refill)
        match t.begin_stream("acme", 70) {
            Err(TenancyError::Quota {
                quota: "max_tokens_per_minute",
                retry_after: Some(w),
                ..
            }) => assert!(w <= Duration::from_secs(3), "{w:?}"),
            other => panic!("expected the token quota, got {:?}", other.err()),
        }
        let c = t
            .begin_stream("acme", 60)
            .expect("the unused tokens came back");
        drop(c);
        // A request larger than a whole minute can never run: no retry hint.
        assert!(matches!(
            t.begin_stream("acme", 101),
            Err(TenancyError::Quota {
                quota: "max_tokens_per_minute",
                retry_after: None,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn only_empty_tenants_are_deleted() {
        let (_d, t) = open(None).await;
        t.create_tenant("acme", Quotas::default())
            .await
            .expect("tenant");
        assert!(matches!(
            t.create_tenant("acme", Quotas::default()).await,
            Err(TenancyError::AlreadyExists(_))
        ));
        let (_, token) = t.create_key("acme", "", None).await.expect("key");
        t.delete_tenant("acme").await.expect("empty tenant deletes");
        assert!(t.authenticate(Some(&bearer(&token))).is_err());
        assert!(matches!(
            t.tenant("acme").await,
            Err(TenancyError::NotFound(_))
        ));
    }

    /// Two replicas (two `Tenancy` over two pools on one PostgreSQL) take uploads of one
    /// tenant at once, each checking the quota and then writing after a pause: the
    /// database's tenant lock lets exactly `max_datasets` through, not one per replica.
    #[tokio::test]
    async fn a_storage_quota_holds_across_replicas_on_postgres() {
        let pg = crate::store::testing::TestPostgres::start();
        let url = pg.database("quota").await;
        let cfg = TenancyConfig {
            admin_key: None,
            defaults: Limits {
                max_datasets: 3,
                ..Limits::default()
            },
        };
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let db = Db::connect(&url).await.expect("connect");
            replicas.push((
                db.clone(),
                Tenancy::open(db, cfg.clone()).await.expect("open"),
            ));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..12 {
            let (db, t) = replicas[i % 2].clone();
            tasks.spawn(async move {
                let _guard = t.storage_guard("acme").await.expect("lock");
                if t.check_storage("acme", NewObject::Dataset, 10)
                    .await
                    .is_err()
                {
                    return false;
                }
                // What an upload does between its check and its row (writing the file).
                tokio::time::sleep(Duration::from_millis(20)).await;
                let row = crate::store::training::DatasetRow {
                    id: format!("d{i}"),
                    tenant: "acme".into(),
                    name: format!("set{i}"),
                    format: "chat".into(),
                    examples: 1,
                    tokens: 1,
                    truncated: 0,
                    size_bytes: 10,
                    sha256: "x".into(),
                    file: format!("d{i}.jsonl"),
                    created_at: 0,
                    label_counts: Default::default(),
                    filename: None,
                };
                db.insert_dataset(&row).await.expect("insert").is_some()
            });
        }
        let mut admitted = 0;
        while let Some(ok) = tasks.join_next().await {
            admitted += usize::from(ok.expect("task"));
        }
        assert_eq!(admitted, 3);
        let stored = replicas[0].0.stored_usage("acme").await.expect("usage");
        assert_eq!(stored.datasets, 3);
    }

    /// Keys made or revoked on one replica work or stop working on another through
    /// PostgreSQL's LISTEN/NOTIFY, well before the poll (set to a minute here) would notice.
    #[tokio::test]
    async fn keys_reach_another_replica_by_notification_on_postgres() {
        let pg = crate::store::testing::TestPostgres::start();
        let url = pg.database("follow").await;
        let open = || async {
            Tenancy::open(
                Db::connect(&url).await.expect("connect"),
                TenancyConfig::default(),
            )
            .await
            .expect("open")
        };
        let (a, b) = (open().await, open().await);
        tokio::spawn(b.clone().follow_changes(Duration::from_secs(60)));
        // b listens once an announcement reaches it (its listener connects in the
        // background): announce until one does.
        a.create_tenant("warmup", Quotas::default())
            .await
            .expect("tenant");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.read().tenants.contains_key("warmup") {
            assert!(Instant::now() < deadline, "no notification reached b");
            a.announce().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.create_tenant("acme", Quotas::default())
            .await
            .expect("tenant");
        let (info, token) = a.create_key("acme", "ci", None).await.expect("key");
        let started = Instant::now();
        while b.authenticate(Some(&bearer(&token))).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "b never saw the key"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let visible = started.elapsed();
        a.revoke_key(&info.id).await.expect("revoke");
        let started = Instant::now();
        while b.authenticate(Some(&bearer(&token))).is_ok() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "b still takes the key"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        eprintln!(
            "key visible on b after {visible:?}, revocation after {:?}",
            started.elapsed()
        );
    }
}
