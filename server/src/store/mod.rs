//! The metadata database (sqlx; embedded SQLite by default). Only this module writes SQL.
//! Blobs (adapter files) live in files under the data directory; rows point at them.
//! SQL strings are constants; the few built with `format!` only splice in the constant
//! column list (`AssertSqlSafe`), never a value: values are always bound.
//! Invariant: a row is written only after its files are durable, so a row never points at
//! half a file; files without a row are orphans that `startup` removes.

pub mod tenancy;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod training;

use std::{path::Path, time::Duration};

pub use crate::adapters::formats::{Details, HeadInfo};

use sqlx::{
    any::{AnyPoolOptions, AnyRow},
    AnyPool, AssertSqlSafe, Executor, Row,
};

/// Database errors, with the operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("database: {op}: {source}")]
pub struct DbError {
    op: &'static str,
    #[source]
    source: sqlx::Error,
}

impl DbError {
    /// The database could not write because the disk is full (SQLITE_FULL, PostgreSQL's
    /// `disk_full`, or an I/O error saying so).
    pub fn is_disk_full(&self) -> bool {
        match &self.source {
            sqlx::Error::Database(d) => matches!(d.code().as_deref(), Some("13" | "53100")),
            sqlx::Error::Io(e) => e.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }

    /// The database cannot be reached (a server down, a connection lost, no connection
    /// free in time): the caller may retry later; nothing was written.
    pub fn is_unavailable(&self) -> bool {
        match &self.source {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // PostgreSQL's class 08 (connection exception) and 57P (operator intervention:
            // shutting down, cannot connect now).
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        }
    }

    fn is_unique_violation(&self) -> bool {
        matches!(&self.source, sqlx::Error::Database(d) if d.is_unique_violation())
    }
}

fn db_err(op: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError { op, source }
}

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One embedded file: one process (the default, and what `make run` uses).
    Sqlite,
    /// A server that several replicas share.
    Postgres,
}

/// One stored adapter version.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRow {
    pub id: i64,
    pub tenant: String,
    pub name: String,
    pub version: u32,
    /// The method's settings (its `method()` is the row's method).
    pub details: Details,
    /// The adapter's classification head, if it has one (its labels).
    pub head: Option<HeadInfo>,
    /// Whether it replaces the LM head (PEFT's `modules_to_save: ["lm_head"]`).
    pub lm_head: bool,
    pub size_bytes: u64,
    pub sha256: String,
    pub base_fingerprint: String,
    pub dir: String,
    pub created_at: i64,
}

/// What a new adapter version is made of (the version number is assigned on insert).
#[derive(Debug, Clone)]
pub struct NewAdapter {
    pub tenant: String,
    pub name: String,
    pub details: Details,
    pub head: Option<HeadInfo>,
    pub lm_head: bool,
    pub size_bytes: u64,
    pub sha256: String,
    pub base_fingerprint: String,
    pub dir: String,
}

/// The metadata database: one pool, SQLite or PostgreSQL behind sqlx's `Any` driver, with
/// the same queries for both (`$n` parameters, which SQLite reads as positions too).
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// PostgreSQL's URL, for the change listener's own connection (may hold a password:
    /// never printed).
    url: std::sync::Arc<str>,
    /// This process's mark on its announcements (random at connect; clones share it), so
    /// its followers skip what it announced itself and already applied.
    instance: u64,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend)
            .finish()
    }
}

/// The PostgreSQL channel on which processes sharing a database announce changes.
const CHANGES_CHANNEL: &str = "graft_changes";

/// Announcements of changes made by any process on the database ([`Db::changes`]).
struct Changes(sqlx::postgres::PgListener);

impl Changes {
    /// The next announcement's text; `None` when the listening connection was lost (it is
    /// made again on the next call): announcements made meanwhile are lost, so the caller
    /// re-reads what it follows.
    async fn next(&mut self) -> Result<Option<String>, DbError> {
        let n = self.0.try_recv().await.map_err(db_err("listen"))?;
        Ok(n.map(|n| n.payload().to_string()))
    }
}

const COLUMNS: &str = "id, tenant, name, version, method, details, size_bytes, sha256, base_fingerprint, dir, created_at";

/// The `details` column: the method's settings, and beside them the head's (`head`, absent
/// when there is none; rows written before heads existed have none) and whether the LM head
/// is replaced (`lm_head`, absent when not).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredDetails {
    #[serde(flatten)]
    details: Details,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head: Option<HeadInfo>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    lm_head: bool,
}

fn row_to_adapter(r: &AnyRow) -> Result<AdapterRow, DbError> {
    let details: String = r.get("details");
    let stored: StoredDetails = serde_json::from_str(&details).map_err(|e| DbError {
        op: "read adapter details",
        source: sqlx::Error::Decode(Box::new(e)),
    })?;
    Ok(AdapterRow {
        id: r.get("id"),
        tenant: r.get("tenant"),
        name: r.get("name"),
        version: r.get::<i64, _>("version") as u32,
        details: stored.details,
        head: stored.head,
        lm_head: stored.lm_head,
        size_bytes: r.get::<i64, _>("size_bytes") as u64,
        sha256: r.get("sha256"),
        base_fingerprint: r.get("base_fingerprint"),
        dir: r.get("dir"),
        created_at: r.get("created_at"),
    })
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A 64-bit advisory-lock key for `name` in `space`: the first 8 bytes of a SHA-256 (any two
/// replicas compute the same key; a collision only makes two tenants wait for each other).
fn lock_key(space: &str, name: &str) -> i64 {
    use sha2::Digest;
    let h = sha2::Sha256::new()
        .chain_update(space)
        .chain_update([0])
        .chain_update(name)
        .finalize();
    i64::from_be_bytes(h[..8].try_into().unwrap_or_default())
}

/// A tenant's write lock on the database ([`Db::tenant_write_lock`]); released on drop.
#[must_use = "the lock is released when the guard drops"]
pub struct TenantWriteLock(#[allow(dead_code)] Option<sqlx::Transaction<'static, sqlx::Any>>);

impl Db {
    /// Opens (creating if needed) the SQLite file `path` and runs the migrations.
    pub async fn open(path: &Path) -> Result<Self, DbError> {
        Self::connect(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// Connects to `url` (`sqlite://FILE` or `postgres://...`) and runs that database's
    /// migrations (each replica runs them at start; sqlx serialises concurrent runs on
    /// PostgreSQL with an advisory lock).
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError {
                op: "parse url",
                source: sqlx::Error::Configuration(
                    "the database URL must start with sqlite:// or postgres://".into(),
                ),
            });
        };
        let pool = match backend {
            // WAL with full fsync: a committed row survives a crash; writers wait for the
            // lock up to 5 s instead of failing at once.
            Backend::Sqlite => AnyPoolOptions::new()
                .max_connections(4)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
                        )
                        .await
                        .map(|_| ())
                    })
                }),
            // Connections are made when needed: a server that is down fails the requests
            // that write (UNAVAILABLE), not the process.
            Backend::Postgres => AnyPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5)),
        }
        .connect(url)
        .await
        .map_err(db_err("connect"))?;
        let migrated = match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await,
        };
        migrated.map_err(|e| DbError {
            op: "migrate",
            source: e.into(),
        })?;
        Ok(Self {
            pool,
            backend,
            url: url.into(),
            instance: rand::random(),
        })
    }

    /// This process's name on the database: its announcements and the job leases it holds.
    pub fn instance(&self) -> String {
        format!("{:016x}", self.instance)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Tells the other processes on this database that `what` changed: PostgreSQL's
    /// `NOTIFY`, marked with this process's instance; nothing on SQLite, which one process
    /// owns.
    pub async fn announce(&self, what: &str) -> Result<(), DbError> {
        if self.backend == Backend::Sqlite {
            return Ok(());
        }
        sqlx::query("SELECT COUNT(*) FROM (SELECT pg_notify($1, $2)) AS n")
            .bind(CHANGES_CHANNEL)
            .bind(format!("{:016x} {what}", self.instance))
            .fetch_one(&self.pool)
            .await
            .map_err(db_err("announce"))?;
        Ok(())
    }

    /// Listens for [`announce`](Self::announce)ments on a connection of its own; `None` on
    /// SQLite.
    async fn changes(&self) -> Result<Option<Changes>, DbError> {
        if self.backend == Backend::Sqlite {
            return Ok(None);
        }
        let mut l = sqlx::postgres::PgListener::connect(&self.url)
            .await
            .map_err(db_err("listen"))?;
        l.listen(CHANGES_CHANNEL).await.map_err(db_err("listen"))?;
        Ok(Some(Changes(l)))
    }

    /// Follows other processes' announcements for as long as the process runs: `heard`
    /// gets each one (`Some`; this process's own are skipped: it applied them when it made
    /// them), or `None` when some may have been missed (the listening
    /// connection was lost and is made again, or could not be made) and at least every
    /// `poll`, so a follower that refreshes everything on `None` is never more than `poll`
    /// behind. Returns at once on SQLite, which one process owns. `what` names the follower
    /// in logs.
    pub async fn follow<F, Fut>(&self, what: &'static str, poll: Duration, mut heard: F)
    where
        F: FnMut(Option<String>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut changes = match self.changes().await {
            Ok(None) => return,
            Ok(Some(c)) => Some(c),
            Err(e) => {
                tracing::warn!(follower = what, error = %e, "cannot listen for changes; polling only");
                None
            }
        };
        loop {
            let news = match changes.as_mut() {
                Some(c) => match tokio::time::timeout(poll, c.next()).await {
                    Ok(Ok(Some(news))) => {
                        let (from, what) = news.split_once(' ').unwrap_or_default();
                        if from == format!("{:016x}", self.instance) {
                            continue;
                        }
                        Some(what.to_string())
                    }
                    Ok(Ok(None)) => None,
                    Err(_) => None,
                    Ok(Err(e)) => {
                        tracing::warn!(follower = what, error = %e, "listening for changes");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        None
                    }
                },
                None => {
                    tokio::time::sleep(poll).await;
                    None
                }
            };
            heard(news).await;
        }
    }

    /// Holds `tenant`'s write lock across every process on this database until the guard
    /// drops: a quota check and the write it allows cannot interleave with another
    /// replica's. On PostgreSQL a transaction-scoped advisory lock keyed by the tenant
    /// (released when the guard's transaction rolls back); on SQLite, whose file one process
    /// owns, nothing (the caller's in-process lock is the whole story).
    pub async fn tenant_write_lock(&self, tenant: &str) -> Result<TenantWriteLock, DbError> {
        self.advisory_lock("tenant", tenant).await
    }

    /// A transaction-scoped advisory lock on `(space, key)` across every process on a
    /// PostgreSQL database (nothing on SQLite); released when the guard drops.
    pub(crate) async fn advisory_lock(
        &self,
        space: &str,
        key: &str,
    ) -> Result<TenantWriteLock, DbError> {
        if self.backend == Backend::Sqlite {
            return Ok(TenantWriteLock(None));
        }
        let mut tx = self.pool.begin().await.map_err(db_err("begin"))?;
        sqlx::query("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock($1)) AS l")
            .bind(lock_key(space, key))
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err("tenant lock"))?;
        Ok(TenantWriteLock(Some(tx)))
    }

    /// Inserts the next version of `(tenant, name)`; returns the stored row.
    /// One statement computes the version and inserts: a read-then-write transaction would
    /// fail with SQLITE_BUSY (not wait) when another writer commits in between. On
    /// PostgreSQL two replicas may compute the same number at once; the unique constraint
    /// refuses the second, which numbers again (no duplicate, no gap).
    pub async fn insert_adapter(&self, a: &NewAdapter) -> Result<AdapterRow, DbError> {
        let mut tries = 0;
        loop {
            match self.try_insert_adapter(a).await {
                Err(e) if e.is_unique_violation() && tries < 20 => tries += 1,
                r => return r,
            }
        }
    }

    async fn try_insert_adapter(&self, a: &NewAdapter) -> Result<AdapterRow, DbError> {
        let details = serde_json::to_string(&StoredDetails {
            details: a.details.clone(),
            head: a.head.clone(),
            lm_head: a.lm_head,
        })
        .unwrap_or_else(|_| "{}".into());
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO adapter_versions (tenant, name, version, method, details, size_bytes, sha256, base_fingerprint, dir, created_at)
             SELECT $1, $2, COALESCE(MAX(version), 0) + 1, $3, $4, $5, $6, $7, $8, $9
             FROM adapter_versions WHERE tenant = $1 AND name = $2
             RETURNING {COLUMNS}"
        )))
        .bind(&a.tenant)
        .bind(&a.name)
        .bind(a.details.method())
        .bind(details)
        .bind(a.size_bytes as i64)
        .bind(&a.sha256)
        .bind(&a.base_fingerprint)
        .bind(&a.dir)
        .bind(now_unix())
        .fetch_one(&self.pool)
        .await
        .map_err(db_err("insert adapter"))?;
        row_to_adapter(&row)
    }

    /// Every live version of `tenant`'s `name`, ascending.
    pub async fn adapter_versions(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Vec<AdapterRow>, DbError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM adapter_versions WHERE tenant = $1 AND name = $2 AND deleted_at IS NULL ORDER BY version"
        )))
        .bind(tenant)
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("adapter versions"))?;
        rows.iter().map(row_to_adapter).collect()
    }

    /// Live versions of a tenant, ordered by (name, version), after the `after` id cursor.
    pub async fn list_adapters(
        &self,
        tenant: &str,
        name: Option<&str>,
        after: Option<(String, u32)>,
        limit: u32,
    ) -> Result<Vec<AdapterRow>, DbError> {
        let (an, av) = after.unwrap_or_default();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM adapter_versions
             WHERE tenant = $1 AND deleted_at IS NULL AND ($2 IS NULL OR name = $2) AND (name > $3 OR (name = $3 AND version > $4))
             ORDER BY name, version LIMIT $5"
        )))
        .bind(tenant)
        .bind(name)
        .bind(&an)
        .bind(av as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("list adapters"))?;
        rows.iter().map(row_to_adapter).collect()
    }

    /// Tombstones one version (or every live version when `version` is `None`); returns the
    /// rows it deleted.
    pub async fn delete_adapter(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<Vec<AdapterRow>, DbError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE adapter_versions SET deleted_at = $1
             WHERE tenant = $2 AND name = $3 AND ($4 IS NULL OR version = $4) AND deleted_at IS NULL
             RETURNING {COLUMNS}"
        )))
        .bind(now_unix())
        .bind(tenant)
        .bind(name)
        .bind(version.map(|v| v as i64))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err("delete adapter"))?;
        rows.iter().map(row_to_adapter).collect()
    }

    /// Directories of every live adapter version (for orphan cleanup at start-up).
    pub async fn live_adapter_dirs(&self) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query("SELECT dir FROM adapter_versions WHERE deleted_at IS NULL")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err("list dirs"))?;
        Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
    }

    /// Number of live adapter versions.
    pub async fn count_adapters(&self) -> Result<u64, DbError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM adapter_versions WHERE deleted_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(db_err("count"))?
            .get(0);
        Ok(n as u64)
    }
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // A full disk (or any other failure) leaves no temporary file behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows stored before adapters had a method become LoRA rows with their settings as
    /// details (the migrations run one by one on a database holding such a row).
    #[tokio::test]
    async fn lora_rows_of_the_old_schema_migrate_to_method_and_details() {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .expect("memory db");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("migrations")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in &files {
            if f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("0005"))
            {
                sqlx::query(
                    "INSERT INTO adapter_versions (tenant, name, version, kind, rank, alpha, target_modules, size_bytes, sha256, base_fingerprint, dir, created_at)
                     VALUES ('t', 'a', 1, 'lora', 8, 16.0, '[\"q_proj\",\"v_proj\"]', 10, 'x', 'fp', 'd', 0)",
                )
                .execute(&pool)
                .await
                .expect("old row");
            }
            let sql = std::fs::read_to_string(f).expect("read");
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .expect("migration");
        }
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM adapter_versions"
        )))
        .fetch_one(&pool)
        .await
        .expect("row");
        let a = row_to_adapter(&row).expect("decodes");
        assert_eq!(
            a.details,
            Details::Lora {
                rank: 8,
                alpha: 16.0,
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                use_rslora: false,
                use_dora: false
            }
        );
        assert_eq!((a.version, a.details.method()), (1, "lora"));
    }

    /// Versions count up per (tenant, name), survive a reopen and are never reused after a
    /// delete; `open` opens the same database each time.
    async fn versions_count_up<F, Fut>(open: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Db>,
    {
        let db = open().await;
        assert_eq!(
            db.insert_adapter(&testing::new_adapter("t", "a"))
                .await
                .expect("1")
                .version,
            1
        );
        assert_eq!(
            db.insert_adapter(&testing::new_adapter("t", "a"))
                .await
                .expect("2")
                .version,
            2
        );
        assert_eq!(
            db.insert_adapter(&testing::new_adapter("u", "a"))
                .await
                .expect("u1")
                .version,
            1
        );
        assert_eq!(
            db.delete_adapter("t", "a", Some(2))
                .await
                .expect("del")
                .len(),
            1
        );
        // The deleted version is no longer live: the newest live one is 1 again.
        let live = db.adapter_versions("t", "a").await.expect("versions");
        assert_eq!(live.iter().map(|r| r.version).collect::<Vec<_>>(), [1]);
        assert_eq!(
            db.insert_adapter(&testing::new_adapter("t", "a"))
                .await
                .expect("3")
                .version,
            3
        );
        let listed = db.list_adapters("t", None, None, 10).await.expect("list");
        assert_eq!(
            listed.iter().map(|r| r.version).collect::<Vec<_>>(),
            vec![1, 3]
        );
        let after = db
            .list_adapters("t", Some("a"), Some(("a".into(), 1)), 10)
            .await
            .expect("list after");
        assert_eq!(after.iter().map(|r| r.version).collect::<Vec<_>>(), [3]);
        assert_eq!(
            db.delete_adapter("u", "a", None).await.expect("all").len(),
            1
        );
        drop(db);
        let db = open().await;
        assert_eq!(db.count_adapters().await.expect("count"), 2);
        assert_eq!(db.live_adapter_dirs().await.expect("dirs").len(), 2);
    }

    #[tokio::test]
    async fn versions_count_up_and_are_never_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.db");
        versions_count_up(|| async { Db::open(&path).await.expect("open") }).await;
    }

    #[tokio::test]
    async fn versions_count_up_and_are_never_reused_on_postgres() {
        let pg = testing::TestPostgres::start();
        let url = pg.database("versions").await;
        versions_count_up(|| async {
            let db = Db::connect(&url).await.expect("connect");
            assert_eq!(db.backend(), Backend::Postgres);
            db
        })
        .await;
    }

    /// Two replicas (two pools on one PostgreSQL) store versions of one adapter at once:
    /// every insert gets its own number, 1..=40, none twice and none skipped.
    #[tokio::test]
    async fn two_replicas_storing_at_once_never_share_a_version_on_postgres() {
        let pg = testing::TestPostgres::start();
        let url = pg.database("race").await;
        let a = Db::connect(&url).await.expect("replica a");
        let b = Db::connect(&url).await.expect("replica b");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let db = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.spawn(async move { db.insert_adapter(&testing::new_adapter("t", "hot")).await });
        }
        let mut versions = Vec::new();
        while let Some(r) = tasks.join_next().await {
            versions.push(r.expect("task").expect("insert").version);
        }
        versions.sort_unstable();
        assert_eq!(versions, (1..=40).collect::<Vec<u32>>());
    }

    #[tokio::test]
    async fn a_url_of_another_database_is_refused_by_name() {
        let e = Db::connect("mysql://x/y").await.expect_err("refused");
        assert!(e.to_string().contains("postgres://"), "{e}");
    }

    /// A PostgreSQL server that is not there: an error that says the database is
    /// unreachable (answered UNAVAILABLE), not a hang or a panic.
    #[tokio::test]
    async fn an_unreachable_postgres_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let e = Db::connect(&format!("postgres://graft@127.0.0.1:{port}/x"))
            .await
            .expect_err("nothing listens");
        assert!(e.is_unavailable(), "{e:?}");
    }
}
