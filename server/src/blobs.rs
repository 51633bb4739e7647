//! Blobs: adapters' files, datasets and checkpoints, behind the `object_store` crate. One
//! interface over a local directory (the default: the data directory, with `fsync` of every
//! written file and its directories before a write returns) or an S3-compatible bucket
//! (`s3://bucket/prefix`, configured by the usual `AWS_*` variables).
//!
//! Invariants: a write returns only once the blob is durable in the store, so a row written
//! after it never points at a missing blob; keys are relative paths (`adapters/<dir>/<file>`,
//! `datasets/<file>`, `jobs/<id>/<file>`) that the local store keeps exactly where earlier
//! versions of graftd wrote them. Code that needs files on disk (a fully fine-tuned model's
//! HF directory, a dataset the trainer reads, a checkpoint to resume) asks for a local copy:
//! the file itself for a local store, a cached download for a remote one.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{
    aws::{AmazonS3Builder, AmazonS3ConfigKey},
    buffered::BufWriter,
    local::LocalFileSystem,
    path::Path as Key,
    prefix::PrefixStore,
    ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

/// Why a blob operation failed. Messages name keys, never server paths.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlobError {
    /// The local disk is full: nothing was stored.
    #[error("no space left on the server's disk ({0})")]
    NoSpace(String),
    /// The remote store did not answer (or answered with a server error) within the retries.
    #[error("the blob store is unavailable ({0})")]
    Unavailable(String),
    #[error("{0} is missing from the blob store")]
    NotFound(String),
    #[error("blob store: {0}")]
    Failed(String),
}

/// The configured store and where remote blobs are cached on this machine.
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    /// The root directory when the store is local: local copies are the stored files.
    local: Option<PathBuf>,
    /// Downloads of remote blobs (`<data>/blob-cache/<key>`).
    cache: PathBuf,
    shown: String,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Remote requests give up after this long in all, so a write during an outage fails with
/// UNAVAILABLE in seconds rather than hanging on the client library's default 3 minutes.
const REMOTE_RETRY: Duration = Duration::from_secs(10);

impl Blobs {
    /// The store `url` names (`s3://bucket[/prefix]` or `file:///dir`), or the data directory
    /// itself when `url` is None.
    pub fn open(url: Option<&str>, data_dir: &Path) -> Result<Self, String> {
        Self::open_with(url, data_dir, &[])
    }

    /// [`Self::open`], with S3 settings given as `object_store`'s config keys (`aws_endpoint`,
    /// `aws_allow_http`, ...) taking precedence over the environment's.
    pub fn open_with(
        url: Option<&str>,
        data_dir: &Path,
        s3_options: &[(String, String)],
    ) -> Result<Self, String> {
        let cache = data_dir.join("blob-cache");
        let Some(url) = url else {
            return Self::local(data_dir, cache);
        };
        if let Some(dir) = url.strip_prefix("file://") {
            return Self::local(Path::new(dir), cache);
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(format!(
                "blob store {url:?}: expected s3://bucket[/prefix] or file:///directory"
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("blob store {url:?}: the bucket name is empty"));
        }
        let retry = RetryConfig {
            max_retries: 3,
            retry_timeout: REMOTE_RETRY,
            ..Default::default()
        };
        // HTTPS with the process's rustls provider: ring, as tonic's TLS uses (a no-op when
        // one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s3 = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(retry)
            // Through the config keys, so the client settings of the environment
            // (`AWS_ALLOW_HTTP`, proxies) stay.
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                "3s",
            )
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "60s");
        let s3 = s3_options
            .iter()
            .try_fold(s3, |b, (k, v)| {
                let key: AmazonS3ConfigKey = k.parse().map_err(|e| format!("{k}: {e}"))?;
                Ok::<_, String>(b.with_config(key, v))
            })?
            .build()
            .map_err(|e| format!("blob store {url:?}: {e}"))?;
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        Ok(Self {
            store,
            local: None,
            cache,
            shown: format!("s3://{bucket}/{prefix}"),
        })
    }

    fn local(dir: &Path, cache: PathBuf) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        Ok(Self {
            store: Arc::new(store),
            local: Some(dir.to_path_buf()),
            cache,
            shown: format!("file://{}", dir.display()),
        })
    }

    /// True when blobs are files under a local directory.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Writes `bytes` under `key`; returns once they are durable (a local store writes a
    /// temporary file, syncs it, renames it into place and syncs the directories).
    pub async fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), BlobError> {
        let bytes: Bytes = bytes.into();
        self.store
            .put(&Key::from(key), PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.error(key, "writing", e))
    }

    /// Stores a file that is on this machine under `key`, streamed: never whole in memory
    /// (past 10 MiB a multipart upload on S3; staged, synced and renamed locally). A failure
    /// leaves nothing under `key`.
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<(), BlobError> {
        use tokio::io::AsyncWriteExt as _;
        let mut src = tokio::fs::File::open(file)
            .await
            .map_err(|e| io_error(key, "reading", e))?;
        let mut dst = BufWriter::new(self.store.clone(), Key::from(key));
        let written = match tokio::io::copy(&mut src, &mut dst).await {
            Ok(_) => dst.shutdown().await,
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = dst.abort().await;
                Err(self.written_error(key, e))
            }
        }
    }

    /// A streamed write's error: the store's own where the writer wrapped one (so an
    /// unreachable S3 is `Unavailable`), else the local file's.
    fn written_error(&self, key: &str, e: std::io::Error) -> BlobError {
        let kind = e.kind();
        match e
            .into_inner()
            .map(|inner| inner.downcast::<object_store::Error>())
        {
            Some(Ok(store)) => self.error(key, "writing", *store),
            Some(Err(other)) => io_error(key, "writing", std::io::Error::new(kind, other)),
            None => io_error(key, "writing", kind.into()),
        }
    }

    /// Stores every file of a local directory under `prefix/`.
    pub async fn put_dir(&self, prefix: &str, dir: &Path) -> Result<(), BlobError> {
        for (name, _) in plain_files(prefix, dir).await? {
            self.put_file(&format!("{prefix}/{name}"), &dir.join(&name))
                .await?;
        }
        Ok(())
    }

    /// [`Self::get`] for a blob that is never rewritten once stored (an adapter version's
    /// files: every version has its own directory). From a local store the file is mapped
    /// into memory rather than copied, so a cold adapter load reads the page cache once,
    /// while parsing it.
    pub async fn get_immutable(&self, key: &str) -> Result<Bytes, BlobError> {
        let Some(root) = &self.local else {
            return self.get(key).await;
        };
        let (path, k) = (root.join(key), key.to_string());
        tokio::task::spawn_blocking(move || map_file(&path, &k))
            .await
            .map_err(|e| BlobError::Failed(format!("reading {key}: {e}")))?
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let got = self
            .store
            .get(&Key::from(key))
            .await
            .map_err(|e| self.error(key, "reading", e))?;
        got.bytes().await.map_err(|e| self.error(key, "reading", e))
    }

    /// Every blob's key under `dir/`.
    async fn keys(&self, dir: &Key) -> Result<Vec<Key>, BlobError> {
        self.store
            .list(Some(dir))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| self.error(dir.as_ref(), "listing", e))
    }

    /// Removes every blob under `prefix/` (and, for a remote store, this machine's copies).
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), BlobError> {
        let dir = Key::from(prefix);
        let keys = self.keys(&dir).await?;
        for key in keys {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.error(prefix, "deleting", e)),
            }
        }
        match &self.local {
            // What listing does not show (a write's staged file cut short by a full disk)
            // and the directory itself.
            Some(root) => {
                let _ = tokio::fs::remove_dir_all(root.join(prefix)).await;
            }
            None => {
                let _ = tokio::fs::remove_dir_all(self.cache.join(prefix)).await;
            }
        }
        Ok(())
    }

    /// The directories this machine has downloaded under `dir/` (`adapters`: fully
    /// fine-tuned models' HF directories); none for a local store, whose files are the blobs.
    pub async fn cached_names(&self, dir: &str) -> Vec<String> {
        if self.local.is_some() {
            return Vec::new();
        }
        let Ok(mut entries) = tokio::fs::read_dir(self.cache.join(dir)).await else {
            return Vec::new();
        };
        let mut names = Vec::new();
        while let Ok(Some(e)) = entries.next_entry().await {
            if e.file_type().await.is_ok_and(|t| t.is_dir()) {
                names.extend(e.file_name().to_str().map(str::to_string));
            }
        }
        names.sort();
        names
    }

    /// Forgets this machine's download of `prefix/` (the blobs stay; the next
    /// [`Self::local_dir`] downloads them again).
    pub async fn drop_cached(&self, prefix: &str) {
        if self.local.is_none() {
            let _ = tokio::fs::remove_dir_all(self.cache.join(prefix)).await;
        }
    }

    /// Removes one blob (a missing one is not an error).
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self.store.delete(&Key::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.error(key, "deleting", e)),
        }
        if self.local.is_none() {
            let _ = tokio::fs::remove_file(self.cache.join(key)).await;
        }
        Ok(())
    }

    /// The names directly under `prefix/` (directories or files) whose newest blob is older
    /// than `age`: what an orphan sweep may consider. Anything younger may be another
    /// process's upload in progress.
    pub async fn entries_older_than(
        &self,
        prefix: &str,
        age: Duration,
    ) -> Result<Vec<String>, BlobError> {
        let dir = Key::from(prefix);
        let mut newest: std::collections::HashMap<String, chrono::DateTime<chrono::Utc>> =
            Default::default();
        let mut listed = self.store.list(Some(&dir));
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(|e| self.error(prefix, "listing", e))?;
            let Some(first) = meta.location.prefix_match(&dir).and_then(|mut p| p.next()) else {
                continue;
            };
            let name = first.as_ref().to_string();
            let t = newest.entry(name).or_insert(meta.last_modified);
            *t = (*t).max(meta.last_modified);
        }
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(age).unwrap_or_default();
        let mut old: Vec<String> = newest
            .into_iter()
            .filter(|(_, t)| *t < cutoff)
            .map(|(n, _)| n)
            .collect();
        old.sort();
        Ok(old)
    }

    /// The names directly under `prefix/` (files, or the first part of deeper keys).
    pub async fn names(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let listed = self
            .store
            .list_with_delimiter(Some(&Key::from(prefix)))
            .await
            .map_err(|e| self.error(prefix, "listing", e))?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .chain(listed.objects.iter().map(|o| &o.location))
            .filter_map(|k| k.filename().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// A file on this machine with the blob's content: the stored file itself for a local
    /// store, a download into the cache (kept for later calls) for a remote one.
    pub async fn local_file(&self, key: &str) -> Result<PathBuf, BlobError> {
        if let Some(root) = &self.local {
            let path = root.join(key);
            return match tokio::fs::try_exists(&path).await {
                Ok(true) => Ok(path),
                _ => Err(BlobError::NotFound(key.into())),
            };
        }
        let path = self.cache.join(key);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let bytes = self.get(key).await?;
        let parent = path.parent().unwrap_or(&self.cache).to_path_buf();
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&parent)?;
            crate::store::atomic_write(&p, &bytes)
        })
        .await
        .map_err(|e| BlobError::Failed(e.to_string()))?
        .map_err(|e| io_error(key, "caching", e))?;
        Ok(path)
    }

    /// A directory on this machine with every blob under `prefix/` (see [`Self::local_file`]).
    /// A remote download is complete when it returns; a partial one is never returned.
    pub async fn local_dir(&self, prefix: &str) -> Result<PathBuf, BlobError> {
        if let Some(root) = &self.local {
            return Ok(root.join(prefix));
        }
        let dir = self.cache.join(prefix);
        let done = dir.join(".complete");
        if tokio::fs::try_exists(&done).await.unwrap_or(false) {
            return Ok(dir);
        }
        if !self.fetch_dir(prefix, &dir).await? {
            return Err(BlobError::NotFound(prefix.into()));
        }
        tokio::fs::write(&done, b"")
            .await
            .map_err(|e| io_error(prefix, "caching", e))?;
        Ok(dir)
    }

    /// True when `dir` on this machine is where the store itself keeps `prefix/`.
    pub fn in_place(&self, prefix: &str, dir: &Path) -> bool {
        self.local
            .as_ref()
            .is_some_and(|root| root.join(prefix) == dir)
    }

    /// Downloads every blob under `prefix/` into `dest` (each file written atomically);
    /// false when there is none.
    pub async fn fetch_dir(&self, prefix: &str, dest: &Path) -> Result<bool, BlobError> {
        let dir = Key::from(prefix);
        let keys = self.keys(&dir).await?;
        for key in &keys {
            let Some(rel) = key.prefix_match(&dir) else {
                continue;
            };
            let rel: Vec<String> = rel.map(|p| p.as_ref().to_string()).collect();
            let path = rel.iter().fold(dest.to_path_buf(), |p, part| p.join(part));
            let bytes = self.get(key.as_ref()).await?;
            let parent = path.parent().unwrap_or(dest).to_path_buf();
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&parent)?;
                crate::store::atomic_write(&path, &bytes)
            })
            .await
            .map_err(|e| BlobError::Failed(e.to_string()))?
            .map_err(|e| io_error(key.as_ref(), "caching", e))?;
        }
        Ok(!keys.is_empty())
    }

    /// Makes `prefix/` hold what the local directory `dir` holds (its plain files, not
    /// `*.tmp`): new or changed files first, then `last` (the file naming the others, so the
    /// store never has it pointing at a missing one), then blobs `dir` no longer has go.
    /// Nothing to do when `dir` is the store's own directory.
    pub async fn mirror_dir(&self, prefix: &str, dir: &Path, last: &str) -> Result<(), BlobError> {
        if self.in_place(prefix, dir) {
            return Ok(());
        }
        let stored: std::collections::HashMap<String, u64> = self
            .store
            .list(Some(&Key::from(prefix)))
            .map_ok(|m| {
                (
                    m.location.filename().unwrap_or_default().to_string(),
                    m.size,
                )
            })
            .try_collect()
            .await
            .map_err(|e| self.error(prefix, "listing", e))?;
        let mut local = plain_files(prefix, dir).await?;
        local.retain(|(name, _)| !name.ends_with(".tmp"));
        local.sort_by_key(|(n, _)| n == last);
        for (name, len) in &local {
            if stored.get(name) == Some(len) && name != last {
                continue;
            }
            match tokio::fs::read(dir.join(name)).await {
                Ok(bytes) => self.put(&format!("{prefix}/{name}"), bytes).await?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(prefix, "reading", e)),
            }
        }
        for name in stored.keys() {
            if !local.iter().any(|(n, _)| n == name) {
                self.delete(&format!("{prefix}/{name}")).await?;
            }
        }
        Ok(())
    }

    /// Drops this machine's cached copies under `prefix/` (a no-op for a local store).
    pub async fn forget_local(&self, prefix: &str) {
        if self.local.is_none() {
            let _ = tokio::fs::remove_dir_all(self.cache.join(prefix)).await;
        }
    }

    fn error(&self, key: &str, doing: &str, e: object_store::Error) -> BlobError {
        if let object_store::Error::NotFound { .. } = e {
            return BlobError::NotFound(key.into());
        }
        if let Some(io) = io_source(&e) {
            if io.kind() == std::io::ErrorKind::StorageFull {
                return BlobError::NoSpace(format!("{doing} {key}"));
            }
        }
        tracing::error!(store = %self.shown, key, error = ?e, "blob store: {doing}");
        if self.local.is_some() {
            BlobError::Failed(format!("{doing} {key} failed"))
        } else {
            BlobError::Unavailable(format!("{doing} {key} failed; retry later"))
        }
    }
}

/// The plain files of a local directory, with their sizes (`prefix` names it in errors; a
/// file removed while listing, such as an older checkpoint, is left out).
async fn plain_files(prefix: &str, dir: &Path) -> Result<Vec<(String, u64)>, BlobError> {
    let mut files = Vec::new();
    let mut entries = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| io_error(prefix, "listing", e))?;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| io_error(prefix, "listing", e))?
    {
        let Ok(meta) = entry.metadata().await else {
            continue;
        };
        if meta.is_file() {
            files.push((entry.file_name().to_string_lossy().into_owned(), meta.len()));
        }
    }
    Ok(files)
}

/// The `std::io::Error` behind an object store error, if there is one.
fn io_source(e: &object_store::Error) -> Option<&std::io::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = s.source();
    }
    None
}

fn io_error(key: &str, doing: &str, e: std::io::Error) -> BlobError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        BlobError::NoSpace(format!("{doing} {key}"))
    } else {
        tracing::error!(key, error = %e, "blob store: {doing}");
        BlobError::Failed(format!("{doing} {key} failed: {}", e.kind()))
    }
}

/// A stored file mapped read-only into memory.
#[allow(unsafe_code)]
fn map_file(path: &Path, key: &str) -> Result<Bytes, BlobError> {
    let failed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => BlobError::NotFound(key.into()),
        _ => BlobError::Failed(format!("reading {key}: {e}")),
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    if file.metadata().map_err(failed)?.len() == 0 {
        // An empty file cannot be mapped.
        return Ok(Bytes::new());
    }
    // Populated at once: one call faults the pages in, not one fault per page on first use.
    // SAFETY: only blobs that are never written in place are mapped (`get_immutable`): the
    // local store writes a staged file and renames it over the key, and a delete unlinks
    // it, so the mapped pages stay this file's bytes for as long as the map lives.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(failed)?;
    Ok(Bytes::from_owner(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_store_keeps_files_where_they_were_and_sweeps_only_old_entries() {
        let dir = tempfile::tempdir().expect("tmp");
        let blobs = Blobs::open(None, dir.path()).expect("open");
        blobs
            .put("adapters/a1/x.json", &b"{}"[..])
            .await
            .expect("put");
        blobs
            .put("adapters/a1/w.bin", vec![1u8; 10])
            .await
            .expect("put");
        blobs
            .put("adapters/b2/x.json", &b"[]"[..])
            .await
            .expect("put");
        // The layout on disk is the key.
        let on_disk = std::fs::read(dir.path().join("adapters/a1/w.bin")).expect("read");
        assert_eq!(on_disk, vec![1u8; 10]);
        assert_eq!(
            &blobs.get("adapters/b2/x.json").await.expect("get")[..],
            b"[]"
        );
        assert!(matches!(
            blobs.get("adapters/zz/x.json").await,
            Err(BlobError::NotFound(_))
        ));
        // Nothing is older than an hour; everything is older than a zero age.
        let young = blobs
            .entries_older_than("adapters", Duration::from_secs(3600))
            .await
            .expect("list");
        assert!(young.is_empty(), "{young:?}");
        let old = blobs
            .entries_older_than("adapters", Duration::ZERO)
            .await
            .expect("list");
        assert_eq!(old, vec!["a1".to_string(), "b2".to_string()]);
        blobs.delete_prefix("adapters/a1").await.expect("delete");
        assert!(!dir.path().join("adapters/a1").exists());
        assert!(dir.path().join("adapters/b2/x.json").exists());
        assert_eq!(
            blobs.local_dir("adapters/b2").await.expect("dir"),
            dir.path().join("adapters/b2")
        );
    }

    #[test]
    fn urls_other_than_s3_and_file_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        for bad in ["http://x/y", "s3://", "gs://bucket"] {
            let e = Blobs::open(Some(bad), dir.path()).expect_err(bad);
            assert!(e.contains("blob store"), "{e}");
        }
    }
}
