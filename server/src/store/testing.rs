//! Real PostgreSQL for tests: a throw-away cluster (`tests/pg-cluster.sh`, Debian's
//! `postgresql` programs, a free loopback port) that stops when its handle drops, and fresh
//! databases in a cluster.

use std::path::PathBuf;

use sqlx::{any::AnyPoolOptions, AssertSqlSafe};

/// The repository's cluster script.
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/pg-cluster.sh")
}

/// A running PostgreSQL cluster of its own; stopped and removed on drop.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    url: String,
}

impl TestPostgres {
    /// Starts one (about a second). Panics, saying why, where PostgreSQL is not installed:
    /// the tests that need it must not pass without it.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("graft-pg")
            .tempdir()
            .expect("temporary folder");
        let url = run_script("start", dir.path());
        Self { dir, url }
    }

    /// Stops the server (immediate shutdown: connections drop); [`Self::resume`] starts it
    /// again with the same data on the same port.
    pub fn stop(&self) {
        run_script("stop", self.dir.path());
    }

    pub fn resume(&self) {
        let url = run_script("start", self.dir.path());
        assert_eq!(url, self.url, "the same port again");
    }

    /// The URL of the cluster's `postgres` database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new empty database in this cluster; its URL.
    pub async fn database(&self, name: &str) -> String {
        database(&self.url, name).await
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Runs `tests/pg-cluster.sh <what> <dir>`; what it printed.
fn run_script(what: &str, dir: &std::path::Path) -> String {
    let out = std::process::Command::new("bash")
        .arg(script())
        .arg(what)
        .arg(dir)
        .output()
        .expect("run tests/pg-cluster.sh");
    assert!(
        out.status.success(),
        "tests/pg-cluster.sh {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The URL of database `name` in the cluster that `admin_url` (any database of it) reaches,
/// created if it does not exist yet. `name` is lower-case letters, digits and `_`.
pub async fn database(admin_url: &str, name: &str) -> String {
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
        "database name {name:?}"
    );
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
        .expect("connect to the test cluster");
    match sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
    {
        Ok(_) => {}
        // duplicate_database: made by an earlier server on the same data directory.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
        Err(e) => panic!("create database {name}: {e}"),
    }
    pool.close().await;
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("a URL that names a database");
    format!("{base}/{name}")
}

/// A LoRA version row of `tenant`'s adapter `name` for tests of the database (its blobs are
/// not written: `dir` is only a name).
pub fn new_adapter(tenant: &str, name: &str) -> super::NewAdapter {
    super::NewAdapter {
        tenant: tenant.into(),
        name: name.into(),
        details: super::Details::Lora {
            rank: 8,
            alpha: 16.0,
            target_modules: vec!["q_proj".into()],
            use_rslora: false,
            use_dora: false,
        },
        head: None,
        lm_head: false,
        size_bytes: 10,
        sha256: "x".into(),
        base_fingerprint: "fp".into(),
        dir: format!("{tenant}-{name}"),
    }
}
