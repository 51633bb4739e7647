//! The adapter registry: names -> immutable numbered versions (rows in the database, blobs
//! under `adapters/<dir>/` in the blob store), a memory-budgeted LRU of loaded adapters, and
//! leases.
//! Invariants:
//! - a version is immutable; `name` resolves to the newest live version at lease time, and a
//!   lease pins that version for the whole request;
//! - an adapter in use (a lease exists) is never evicted; eviction drops only the cache's own
//!   reference;
//! - a deleted version is invisible to new requests at once; its files go when its last lease
//!   ends (`Loaded::drop`);
//! - an import that fails stores nothing visible: blobs are durable before the row is
//!   written; blobs no row names are orphans, removed by [`AdapterRegistry::sweep_orphans`]
//!   once older than the grace period (younger ones may be another replica's upload).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use super::formats::{self as peft, Details, ImportError, ImportPolicy, Parsed, Scan};
use crate::{
    blobs::{BlobError, Blobs},
    metrics as m,
    model::{lora::LoraDtype, save, weights::Weights, Adapter, BaseModel},
    store::{AdapterRow, Db, DbError, NewAdapter},
    tenancy::{NewObject, Tenancy, TenancyError},
};

/// Registry settings.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Where fine-tuned models are written before they are stored.
    pub data_dir: PathBuf,
    /// Blobs no row names are removed once older than this.
    pub orphan_grace: Duration,
    /// Bytes of adapter weights kept resident at most (in-use adapters may exceed it).
    pub cache_bytes: usize,
    pub max_rank: usize,
    pub max_virtual_tokens: usize,
    /// What LoRA and DoRA pairs are served in (`--lora-dtype`); stored files keep theirs.
    pub lora_dtype: LoraDtype,
    pub max_upload_bytes: usize,
    pub base_aliases: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(#[from] ImportError),
    #[error("adapter {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Storage(String),
    /// The disk is full: nothing was stored.
    #[error("no space left on the server's disk ({0})")]
    NoSpace(String),
    /// A stored version's files no longer parse (logged with their path).
    #[error("{0}")]
    Damaged(String),
    /// A stored version this server cannot serve as it is configured (e.g. a value beyond
    /// f16 under `--lora-dtype f16`); its files are intact.
    #[error("{0}")]
    Unservable(String),
    #[error(transparent)]
    Quota(#[from] TenancyError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

/// `name` or `name@version`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRef {
    pub name: String,
    pub version: Option<u32>,
}

impl std::fmt::Display for AdapterRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@{v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Checks an adapter name (the rule is [`crate::names::validate`]).
pub fn validate_name(name: &str) -> Result<(), String> {
    crate::names::validate(name, "adapter name")
}

impl std::str::FromStr for AdapterRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, version) = match s.rsplit_once('@') {
            Some((n, v)) => {
                let v: u32 = v.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                    let shown: String = s.chars().take(80).collect();
                    format!("{shown:?}: the version after @ must be a positive integer")
                })?;
                (n, Some(v))
            }
            None => (s, None),
        };
        validate_name(name)?;
        Ok(Self {
            name: name.to_string(),
            version,
        })
    }
}

/// What a name refers to.
pub enum Resolved {
    Adapter(AdapterLease),
    /// A fully fine-tuned model: its row and HF directory.
    Model {
        row: AdapterRow,
        dir: PathBuf,
    },
}

/// An adapter version loaded in memory. Its blobs are removed on drop once deleted.
#[derive(Debug)]
pub struct Loaded {
    pub adapter: Adapter,
    /// The blobs' prefix (`adapters/<dir>`) and the runtime that removes them once deleted
    /// (the last lease may end on the engine's thread); None for a transient adapter.
    files: Option<(Arc<Blobs>, String, tokio::runtime::Handle)>,
    delete_files: AtomicBool,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if !self.delete_files.load(Ordering::SeqCst) {
            return;
        }
        if let Some((blobs, prefix, rt)) = self.files.take() {
            rt.spawn(remove_blobs(blobs, prefix));
        }
    }
}

/// Removes a deleted version's blobs (a failure leaves them to the orphan sweep).
async fn remove_blobs(blobs: Arc<Blobs>, prefix: String) {
    if let Err(e) = blobs.delete_prefix(&prefix).await {
        tracing::warn!(prefix, error = %e, "could not remove adapter files");
    }
}

pub(super) fn prefix_of(dir: &str) -> String {
    format!("adapters/{dir}")
}

/// A request's hold on one adapter version: the version cannot be evicted or have its files
/// removed while a lease exists.
#[derive(Debug, Clone)]
pub struct AdapterLease {
    pub row: AdapterRow,
    pub loaded: Arc<Loaded>,
}

impl AdapterLease {
    pub fn adapter(&self) -> &Adapter {
        &self.loaded.adapter
    }

    /// A lease on an adapter no version row stands for (an RL job's policy snapshot): it
    /// serves `tenant`'s requests under `name`, with `tag` as its content identity (the
    /// prefix cache never shares blocks across tags), and owns no files.
    pub fn transient(tenant: &str, name: &str, tag: &str, adapter: Adapter) -> Self {
        Self {
            row: AdapterRow {
                id: 0,
                tenant: tenant.into(),
                name: name.into(),
                version: 0,
                // Only the row's shape matters: the adapter itself is in memory.
                details: Details::Lora {
                    rank: 0,
                    alpha: 0.0,
                    target_modules: Vec::new(),
                    use_rslora: false,
                    use_dora: false,
                },
                head: None,
                lm_head: adapter.lm_head.is_some(),
                size_bytes: 0,
                sha256: format!("transient:{tag}"),
                base_fingerprint: String::new(),
                dir: String::new(),
                created_at: 0,
            },
            loaded: Arc::new(Loaded {
                adapter,
                files: None,
                delete_files: AtomicBool::new(false),
            }),
        }
    }
}

struct Entry {
    loaded: Arc<Loaded>,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<i64, Entry>,
    bytes: usize,
    tick: u64,
}

impl Cache {
    fn touch(&mut self, id: i64) -> Option<Arc<Loaded>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&id).map(|e| {
            e.last_used = tick;
            e.loaded.clone()
        })
    }

    /// Inserts, then evicts least-recently-used entries nobody leases until within budget.
    fn insert(&mut self, id: i64, loaded: Arc<Loaded>, budget: usize) -> Arc<Loaded> {
        if let Some(existing) = self.touch(id) {
            return existing;
        }
        self.tick += 1;
        let bytes = loaded.adapter.bytes();
        self.entries.insert(
            id,
            Entry {
                loaded: loaded.clone(),
                bytes,
                last_used: self.tick,
            },
        );
        self.bytes += bytes;
        while self.bytes > budget {
            let victim = self
                .entries
                .iter()
                .filter(|(k, e)| **k != id && Arc::strong_count(&e.loaded) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k);
            let Some(v) = victim else { break };
            if let Some(e) = self.entries.remove(&v) {
                self.bytes -= e.bytes;
                metrics::counter!(m::ADAPTER_CACHE_EVICTIONS_TOTAL).increment(1);
            }
        }
        self.publish();
        loaded
    }

    fn remove(&mut self, id: i64) -> Option<Arc<Loaded>> {
        let e = self.entries.remove(&id)?;
        self.bytes -= e.bytes;
        self.publish();
        Some(e.loaded)
    }

    fn publish(&self) {
        metrics::gauge!(m::ADAPTERS_RESIDENT).set(self.entries.len() as f64);
        metrics::gauge!(m::ADAPTERS_RESIDENT_BYTES).set(self.bytes as f64);
    }
}

/// The registry. Cheap to share behind an `Arc`; the cache lock is never held across I/O.
pub struct AdapterRegistry {
    db: Db,
    tenancy: Arc<Tenancy>,
    model: Arc<BaseModel>,
    cfg: RegistryConfig,
    cache: Mutex<Cache>,
    versions: super::versions::Versions,
    pub(super) blobs: Arc<Blobs>,
}

impl AdapterRegistry {
    /// Opens the registry and sweeps orphaned blobs (see [`Self::sweep_orphans`]).
    pub async fn open(
        db: Db,
        tenancy: Arc<Tenancy>,
        model: Arc<BaseModel>,
        blobs: Arc<Blobs>,
        cfg: RegistryConfig,
    ) -> Result<Self, RegistryError> {
        let reg = Self {
            db,
            tenancy,
            model,
            cfg,
            cache: Mutex::default(),
            versions: Default::default(),
            blobs,
        };
        reg.sweep_orphans().await?;
        Ok(reg)
    }

    /// Removes the blobs of adapter directories no live version names and that are older
    /// than the grace period; returns how many directories went. The listing comes before
    /// the query, so a row written meanwhile protects its blobs.
    pub async fn sweep_orphans(&self) -> Result<usize, RegistryError> {
        let old = self
            .blobs
            .entries_older_than("adapters", self.cfg.orphan_grace)
            .await?;
        // Downloads of fully fine-tuned models, listed before the rows are read: a copy is
        // made only of a version that was live, so one whose row is gone now was deleted
        // (by this process or another) and its download goes.
        let cached = self.blobs.cached_names("adapters").await;
        if old.is_empty() && cached.is_empty() {
            return Ok(0);
        }
        let live: std::collections::HashSet<String> =
            self.db.live_adapter_dirs().await?.into_iter().collect();
        let mut removed = 0;
        for dir in old.into_iter().filter(|d| !live.contains(d)) {
            tracing::info!(dir, "removing adapter files no live version references");
            self.blobs.delete_prefix(&prefix_of(&dir)).await?;
            removed += 1;
        }
        for dir in cached.into_iter().filter(|d| !live.contains(d)) {
            tracing::info!(dir, "removing the download of a deleted model");
            self.blobs.drop_cached(&prefix_of(&dir)).await;
        }
        Ok(removed)
    }

    /// Sweeps orphans every `every` (errors are logged: the next round tries again).
    pub async fn sweep_forever(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.sweep_orphans().await {
                tracing::warn!(error = %e, "sweeping orphaned adapter files");
            }
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    fn policy(&self, force: bool) -> ImportPolicy {
        ImportPolicy {
            max_rank: self.cfg.max_rank,
            max_virtual_tokens: self.cfg.max_virtual_tokens,
            force,
            base_aliases: self.cfg.base_aliases.clone(),
        }
    }

    /// The upload size cap, checked as an upload's bytes arrive (`total` so far).
    pub fn check_upload_size(&self, total: usize) -> Result<(), RegistryError> {
        let cap = self.cfg.max_upload_bytes;
        if total > cap {
            return Err(RegistryError::Invalid(ImportError {
                field: "chunk".into(),
                reason: format!("the upload exceeds the {cap}-byte cap for adapters"),
            }));
        }
        Ok(())
    }

    /// Validates a PEFT adapter and stores it as the next version of `name`, within the
    /// tenant's storage quotas (checked and written under the tenant's storage lock).
    pub async fn import(
        &self,
        tenant: &str,
        name: &str,
        config_json: Vec<u8>,
        weights: Vec<u8>,
        force: bool,
        labels: Vec<String>,
    ) -> Result<AdapterRow, RegistryError> {
        validate_name(name).map_err(|e| ImportError {
            field: "name".into(),
            reason: e,
        })?;
        for (file, bytes) in [
            (peft::CONFIG_FILE, &config_json),
            (peft::WEIGHTS_FILE, &weights),
        ] {
            if bytes.is_empty() {
                return Err(RegistryError::Invalid(ImportError {
                    field: file.into(),
                    reason: "missing from the upload".into(),
                }));
            }
        }
        self.check_upload_size(config_json.len() + weights.len())?;
        let model = self.model.clone();
        let policy = self.policy(force);
        let dtype = self.cfg.lora_dtype;
        // The served adapter may read its weights in place from these bytes.
        let weights = bytes::Bytes::from(weights);
        let (parsed, adapter, config_json, weights) = tokio::task::spawn_blocking(move || {
            let mut p = peft::parse_bytes(
                &config_json,
                &weights,
                model.config(),
                &model.name,
                &policy,
                Scan::Values,
            )?;
            name_labels(&mut p.adapter, labels)?;
            let a = p.clone().into_served(&model.llama, dtype)?;
            Ok::<_, ImportError>((p, a, config_json, weights))
        })
        .await
        .map_err(|e| RegistryError::Storage(e.to_string()))??;
        let _storage = self.tenancy.storage_guard(tenant).await?;
        let bytes = (config_json.len() + weights.len()) as u64;
        self.tenancy
            .check_storage(tenant, NewObject::AdapterVersion(name), bytes)
            .await?;
        self.store(tenant, name, &parsed, adapter, config_json, weights)
            .await
    }

    /// Stores already-validated weights (e.g. a trained adapter) as the next version.
    pub async fn store_parsed(
        &self,
        tenant: &str,
        name: &str,
        parsed: &Parsed,
    ) -> Result<AdapterRow, RegistryError> {
        validate_name(name).map_err(|e| ImportError {
            field: "name".into(),
            reason: e,
        })?;
        let base = self
            .cfg
            .base_aliases
            .first()
            .cloned()
            .unwrap_or_else(|| self.model.name.clone());
        let (config, weights) = peft::write(parsed, self.model.config(), &base)?;
        // Compiling runs prompt methods' virtual tokens through the base: not on an async
        // worker.
        let (model, p, dtype) = (self.model.clone(), parsed.clone(), self.cfg.lora_dtype);
        let adapter = tokio::task::spawn_blocking(move || p.into_served(&model.llama, dtype))
            .await
            .map_err(|e| RegistryError::Storage(e.to_string()))??;
        self.store(tenant, name, parsed, adapter, config, weights)
            .await
    }

    async fn store(
        &self,
        tenant: &str,
        name: &str,
        parsed: &Parsed,
        adapter: Adapter,
        config_json: Vec<u8>,
        weights: impl Into<bytes::Bytes>,
    ) -> Result<AdapterRow, RegistryError> {
        let weights: bytes::Bytes = weights.into();
        let mut h = Sha256::new();
        h.update(&config_json);
        h.update(&weights);
        let sha = format!("{:x}", h.finalize());
        let dir_name = format!("{}-{}", &sha[..16], unique_suffix());
        let prefix = prefix_of(&dir_name);
        let size = (config_json.len() + weights.len()) as u64;
        let written = async {
            let blobs = &self.blobs;
            blobs
                .put(&format!("{prefix}/{}", peft::WEIGHTS_FILE), weights)
                .await?;
            blobs
                .put(&format!("{prefix}/{}", peft::CONFIG_FILE), config_json)
                .await
        }
        .await;
        if let Err(e) = written {
            // Nothing half-written stays behind (a full disk included); what cannot be
            // removed now (the store is down) is an orphan the sweep removes later.
            let _ = self.blobs.delete_prefix(&prefix).await;
            return Err(e.into());
        }
        let row = self
            .db
            .insert_adapter(&NewAdapter {
                tenant: tenant.into(),
                name: name.into(),
                details: parsed.details.clone(),
                head: peft::HeadInfo::of(&parsed.adapter),
                lm_head: parsed.adapter.lm_head.is_some(),
                size_bytes: size,
                sha256: sha,
                base_fingerprint: self.model.fingerprint.clone(),
                dir: dir_name,
            })
            .await;
        if row.is_ok() {
            self.changed(tenant, name).await;
        }
        match row {
            Ok(row) => {
                // The new version is resident at once: the next request uses it without a load.
                let loaded = self.loaded(adapter, prefix);
                self.lock().insert(row.id, loaded, self.cfg.cache_bytes);
                Ok(row)
            }
            Err(e) => {
                let _ = self.blobs.delete_prefix(&prefix).await;
                Err(e.into())
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live row for a reference, or `NotFound` (from the cached versions of the name:
    /// no database query while they are current).
    pub async fn find(&self, tenant: &str, r: &AdapterRef) -> Result<AdapterRow, RegistryError> {
        self.versions
            .find(&self.db, tenant, &r.name, r.version)
            .await?
            .ok_or_else(|| RegistryError::NotFound(r.to_string()))
    }

    /// After this process stored or deleted versions of `name`: forgets its cached
    /// versions, and tells other processes on a shared database to do the same.
    async fn changed(&self, tenant: &str, name: &str) {
        self.versions.invalidate(tenant, name);
        let what = super::versions::announcement(tenant, name);
        if let Err(e) = self.db.announce(&what).await {
            tracing::warn!(error = %e, "announcing an adapter change");
        }
    }

    /// Keeps the cached versions in step with other processes on a shared database
    /// (PostgreSQL `LISTEN`, [`Db::follow`]): an announced name is forgotten; when some
    /// announcements may have been missed, and every `poll`, every name is read again on its
    /// next use. Returns at once on SQLite, which one process owns.
    pub async fn follow_changes(self: Arc<Self>, poll: Duration) {
        self.db
            .follow("adapters", poll, |news| {
                match news {
                    Some(what) => {
                        self.versions.announced(&what);
                    }
                    None => self.versions.all_stale(),
                }
                std::future::ready(())
            })
            .await;
    }

    /// Resolves a reference to a lease on one adapter version, loading it from disk if
    /// needed. A fully fine-tuned model is not an adapter: see [`Self::resolve`].
    pub async fn lease(&self, tenant: &str, r: &AdapterRef) -> Result<AdapterLease, RegistryError> {
        match self.resolve(tenant, r).await? {
            Resolved::Adapter(lease) => Ok(lease),
            Resolved::Model { .. } => Err(not_an_adapter(r)),
        }
    }

    /// What a reference names: a lease on an adapter version, or a fully fine-tuned
    /// model's row and directory (served by its own engine).
    pub async fn resolve(&self, tenant: &str, r: &AdapterRef) -> Result<Resolved, RegistryError> {
        let row = self.find(tenant, r).await?;
        if matches!(row.details, Details::Full { .. }) {
            let dir = self.blobs.local_dir(&prefix_of(&row.dir)).await?;
            return Ok(Resolved::Model { row, dir });
        }
        self.lease_row(tenant, r, row).await.map(Resolved::Adapter)
    }

    pub(super) async fn lease_row(
        &self,
        tenant: &str,
        r: &AdapterRef,
        row: AdapterRow,
    ) -> Result<AdapterLease, RegistryError> {
        if let Some(loaded) = self.lock().touch(row.id) {
            metrics::counter!(m::ADAPTER_CACHE_HITS_TOTAL).increment(1);
            return Ok(AdapterLease { row, loaded });
        }
        metrics::counter!(m::ADAPTER_CACHE_MISSES_TOTAL).increment(1);
        let started = Instant::now();
        let prefix = prefix_of(&row.dir);
        let adapter = self.parse_stored(&row, r, self.cfg.lora_dtype).await?;
        metrics::histogram!(m::ADAPTER_LOAD_SECONDS).record(started.elapsed().as_secs_f64());
        let loaded = self.loaded(adapter, prefix);
        // A delete may have raced the load: check the row is still live before caching.
        if self
            .versions
            .find(&self.db, tenant, &row.name, Some(row.version))
            .await?
            .is_none()
        {
            return Err(RegistryError::NotFound(r.to_string()));
        }
        let loaded = self.lock().insert(row.id, loaded, self.cfg.cache_bytes);
        Ok(AdapterLease { row, loaded })
    }

    /// A served adapter whose stored files are under `prefix`.
    fn loaded(&self, adapter: Adapter, prefix: String) -> Arc<Loaded> {
        Arc::new(Loaded {
            adapter,
            files: Some((
                self.blobs.clone(),
                prefix,
                tokio::runtime::Handle::current(),
            )),
            delete_files: AtomicBool::new(false),
        })
    }

    /// A stored version's files parsed and compiled, its LoRA and DoRA pairs in `dtype`.
    async fn parse_stored(
        &self,
        row: &AdapterRow,
        r: &AdapterRef,
        dtype: LoraDtype,
    ) -> Result<Adapter, RegistryError> {
        let prefix = prefix_of(&row.dir);
        let config = self.blob(&prefix, peft::CONFIG_FILE, r).await?;
        let weights = self.blob_immutable(&prefix, peft::WEIGHTS_FILE, r).await?;
        let model = self.model.clone();
        let policy = self.policy(true);
        let what = r.to_string();
        let labels = row
            .head
            .as_ref()
            .map(|h| h.labels.clone())
            .unwrap_or_default();
        tokio::task::spawn_blocking(move || -> Result<Adapter, RegistryError> {
            let (c, w) = (config, weights);
            // These files were checked at import: failing now means they were damaged on
            // disk, which is the server's loss, not the caller's bad argument.
            let p = peft::parse_bytes(&c, &w, model.config(), &model.name, &policy, Scan::Stored)
                .and_then(|mut p| {
                    name_labels(&mut p.adapter, labels)?;
                    Ok(p)
                })
                .map_err(|e| {
                    tracing::error!(prefix, error = %e, "a stored adapter no longer parses");
                    RegistryError::Damaged(format!("adapter {what} is damaged on the server: {e}"))
                })?;
            // Files that parse but do not fit what this server serves in (stored under
            // another `--lora-dtype`) are not damaged: they stay as they are.
            p.into_served(&model.llama, dtype).map_err(|e| {
                RegistryError::Unservable(format!(
                    "adapter {what} cannot be served by this server: {} (its stored files \
                     are unchanged)",
                    e.reason
                ))
            })
        })
        .await
        .map_err(|e| RegistryError::Storage(e.to_string()))?
    }

    /// Version `r`'s adapter with its stored values exactly (LoRA pairs in `f32`, whatever
    /// `--lora-dtype` serves): what a training job starts from. Not cached.
    pub async fn exact(&self, tenant: &str, r: &AdapterRef) -> Result<Adapter, RegistryError> {
        if self.cfg.lora_dtype == LoraDtype::F32 {
            return Ok(self.lease(tenant, r).await?.adapter().clone());
        }
        // Not through the cache: a lease would first load and round the version too.
        let row = self.find(tenant, r).await?;
        if matches!(row.details, Details::Full { .. }) {
            return Err(not_an_adapter(r));
        }
        self.parse_stored(&row, r, LoraDtype::F32).await
    }

    /// One stored blob of version `r`: a blob its row names but the store lacks is data loss.
    pub(super) async fn blob(
        &self,
        prefix: &str,
        file: &str,
        r: &AdapterRef,
    ) -> Result<bytes::Bytes, RegistryError> {
        let got = self.blobs.get(&format!("{prefix}/{file}")).await;
        Self::damaged_if_missing(got, file, r)
    }

    /// [`Self::blob`] mapped rather than copied from a local store: a version's files are
    /// never rewritten (each version has its own directory).
    async fn blob_immutable(
        &self,
        prefix: &str,
        file: &str,
        r: &AdapterRef,
    ) -> Result<bytes::Bytes, RegistryError> {
        let got = self.blobs.get_immutable(&format!("{prefix}/{file}")).await;
        Self::damaged_if_missing(got, file, r)
    }

    fn damaged_if_missing(
        got: Result<bytes::Bytes, BlobError>,
        file: &str,
        r: &AdapterRef,
    ) -> Result<bytes::Bytes, RegistryError> {
        got.map_err(|e| match e {
            BlobError::NotFound(key) => {
                tracing::error!(key, "a stored adapter's file is missing");
                RegistryError::Damaged(format!(
                    "adapter {r} is damaged on the server: {file} is missing"
                ))
            }
            e => e.into(),
        })
    }

    /// Writes a fully fine-tuned model (`weights` of the base's architecture, with the
    /// base's tokenizer and chat template) as an HF directory and registers it as the next
    /// version of `name`, with method `full`. The row is written after the files are
    /// durable; a failure removes them.
    pub async fn store_model(
        &self,
        tenant: &str,
        name: &str,
        weights: Weights,
        details: Details,
    ) -> Result<AdapterRow, RegistryError> {
        validate_name(name).map_err(|e| ImportError {
            field: "name".into(),
            reason: e,
        })?;
        let dir_name = format!("model-{}", unique_suffix());
        let prefix = prefix_of(&dir_name);
        // Written where a local store keeps it, or into a staging directory a remote store
        // uploads from (then kept as this machine's cached copy).
        let dir = match self.blobs.is_local() {
            true => self.blobs.local_dir(&prefix).await?,
            false => self.cfg.data_dir.join("staging").join(&dir_name),
        };
        let (model, d) = (self.model.clone(), dir.clone());
        let written = tokio::task::spawn_blocking(move || -> Result<(u64, String), String> {
            let e = |e: &dyn std::fmt::Display| e.to_string();
            std::fs::create_dir_all(&d).map_err(|x| e(&x))?;
            let size = save::write_hf_dir(&model, &weights, &d).map_err(|x| e(&x))?;
            let files: Vec<PathBuf> = save::HF_FILES.iter().map(|f| d.join(f)).collect();
            for f in files.iter().chain([&d]) {
                std::fs::File::open(f)
                    .and_then(|f| f.sync_all())
                    .map_err(|x| e(&x))?;
            }
            let sha = crate::model::sha256_files(&files).map_err(|x| e(&x))?;
            Ok((size, sha))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let (size, sha) = match written {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                tracing::error!(dir = %dir.display(), error = %e, "writing a fine-tuned model");
                return Err(RegistryError::Storage(format!(
                    "writing the model files: {e}"
                )));
            }
        };
        if !self.blobs.is_local() {
            let uploaded = self.blobs.put_dir(&prefix, &dir).await;
            let _ = tokio::fs::remove_dir_all(&dir).await;
            if let Err(e) = uploaded {
                let _ = self.blobs.delete_prefix(&prefix).await;
                return Err(e.into());
            }
        }
        let row = self
            .db
            .insert_adapter(&NewAdapter {
                tenant: tenant.into(),
                name: name.into(),
                details,
                head: None,
                lm_head: false,
                size_bytes: size,
                sha256: sha,
                base_fingerprint: self.model.fingerprint.clone(),
                dir: dir_name,
            })
            .await;
        if row.is_ok() {
            self.changed(tenant, name).await;
        }
        match row {
            Ok(row) => Ok(row),
            Err(e) => {
                let _ = self.blobs.delete_prefix(&prefix).await;
                Err(e.into())
            }
        }
    }

    pub async fn list(
        &self,
        tenant: &str,
        name: Option<&str>,
        after: Option<(String, u32)>,
        limit: u32,
    ) -> Result<Vec<AdapterRow>, RegistryError> {
        Ok(self.db.list_adapters(tenant, name, after, limit).await?)
    }

    /// Deletes one version (`name@v`) or every version (`name`). New requests get NOT_FOUND
    /// at once; running ones keep their lease and the files go when the last lease ends.
    pub async fn delete(
        &self,
        tenant: &str,
        r: &AdapterRef,
    ) -> Result<Vec<AdapterRow>, RegistryError> {
        let rows = self.db.delete_adapter(tenant, &r.name, r.version).await;
        // Whatever the answer, what this process knows of the name may be out of date.
        self.changed(tenant, &r.name).await;
        let rows = rows?;
        if rows.is_empty() {
            return Err(RegistryError::NotFound(r.to_string()));
        }
        for row in &rows {
            let cached = self.lock().remove(row.id);
            match cached {
                // Removed with the last reference (now, or when the last lease drops).
                Some(loaded) => loaded.delete_files.store(true, Ordering::SeqCst),
                None => remove_blobs(self.blobs.clone(), prefix_of(&row.dir)).await,
            }
        }
        Ok(rows)
    }

    /// The blob store the registry (and the training service) keep files in.
    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// Resident adapters and their bytes.
    pub fn resident(&self) -> (usize, usize) {
        let c = self.lock();
        (c.entries.len(), c.bytes)
    }
}

/// What naming a fully fine-tuned model where an adapter is wanted gets.
fn not_an_adapter(r: &AdapterRef) -> RegistryError {
    RegistryError::Invalid(ImportError {
        field: "adapter".into(),
        reason: format!(
            "{r} is a fully fine-tuned model, not an adapter of the base: Generate serves it by name"
        ),
    })
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}{:04x}", rand::random::<u16>())
}

/// Names a head's outputs: `labels` (none given: the head keeps `LABEL_i`). Labels for an
/// adapter without a head are refused.
fn name_labels(adapter: &mut Adapter, labels: Vec<String>) -> Result<(), ImportError> {
    if labels.is_empty() {
        return Ok(());
    }
    let Some(head) = adapter.head.take() else {
        return Err(ImportError {
            field: "labels".into(),
            reason: "the adapter has no classification head to name the labels of".into(),
        });
    };
    let head = (*head)
        .clone()
        .with_labels(labels)
        .map_err(|reason| ImportError {
            field: "labels".into(),
            reason,
        })?;
    adapter.head = Some(Arc::new(head));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_bad_names_are_refused() {
        assert_eq!(
            "bot@2".parse::<AdapterRef>(),
            Ok(AdapterRef {
                name: "bot".into(),
                version: Some(2)
            })
        );
        assert_eq!("a.b-c_d".parse::<AdapterRef>().map(|r| r.version), Ok(None));
        for bad in [
            "",
            "../x",
            "/etc/passwd",
            "a/b",
            "x@0",
            "x@-1",
            "x@v",
            "..",
            "a\0b",
            &"n".repeat(65),
            ".hidden",
        ] {
            assert!(bad.parse::<AdapterRef>().is_err(), "{bad:?} accepted");
        }
    }
}
