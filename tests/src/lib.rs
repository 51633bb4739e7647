//! Harness for the integration tests: starts a real graftd (the same `server::start` the
//! binary uses) on 127.0.0.1:0 and connects the real client to it.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

use graft_client::GraftClient;
use graft_server::{
    config::ServerConfig,
    model::tiny::{write_tiny_gguf, TinySpec},
    server::{self, RunningServer},
};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real SmolLM2 file (`make model` puts it there); `GRAFT_TEST_MODEL` overrides.
pub fn real_model_path() -> PathBuf {
    std::env::var_os("GRAFT_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// A tiny random-weight model written once per test process.
pub fn tiny_model_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("graft-tiny-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("tiny.gguf");
        write_tiny_gguf(&path, &TinySpec::default()).expect("write tiny model");
        path
    })
    .clone()
}

pub mod process;

/// The admin key every test server starts with.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
/// The tenant `TestServer::client` acts for.
pub const TENANT: &str = "default";

/// A running server and a client connected to it (and its data directory, removed on drop).
pub struct TestServer {
    pub server: RunningServer,
    /// Calls with a key of tenant [`TENANT`].
    pub client: GraftClient,
    /// Calls with the admin key.
    pub admin: GraftClient,
    pub data: std::sync::Arc<tempfile::TempDir>,
}

impl TestServer {
    /// A client with a fresh key of `tenant`, creating the tenant if needed.
    pub async fn tenant(&self, tenant: &str) -> GraftClient {
        tenant_client(&self.admin, tenant).await
    }

    /// A client on the same connection without any key.
    pub fn anonymous(&self) -> GraftClient {
        self.admin.with_api_key(None).expect("no key")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.grpc_addr)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.server.metrics_addr)
    }

    /// Reads `/metrics` over plain HTTP/1.1.
    pub async fn scrape(&self) -> String {
        scrape(self.server.metrics_addr).await
    }
}

/// Reads `/metrics` of the metrics listener at `addr` over plain HTTP/1.1.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(
        out.starts_with("HTTP/1.1 200"),
        "metrics answered {out:.80}"
    );
    out
}

/// Starts a server for `model`, lets `tweak` adjust the config, waits until it is ready.
pub async fn start_with(model: PathBuf, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let data = std::sync::Arc::new(tempfile::tempdir().expect("data dir"));
    start_in(model, data, tweak).await
}

/// Like [`start_with`], in an existing data directory (restart tests).
pub async fn start_in(
    model: PathBuf,
    data: std::sync::Arc<tempfile::TempDir>,
    tweak: impl FnOnce(&mut ServerConfig),
) -> TestServer {
    let mut cfg = ServerConfig::for_model(model, data.path());
    cfg.database_url = test_database(data.path()).await;
    cfg.blob_store = test_blob_store(data.path());
    cfg.tenancy.admin_key = Some(ADMIN_KEY.into());
    tweak(&mut cfg);
    let server = server::start(cfg).await.expect("server starts");
    server.ready().await.expect("model loads");
    let admin = GraftClient::connect_with(
        &format!("http://{}", server.grpc_addr),
        &graft_client::ConnectOptions {
            api_key: Some(ADMIN_KEY.into()),
            ..Default::default()
        },
    )
    .await
    .expect("client connects");
    let client = tenant_client(&admin, TENANT).await;
    TestServer {
        server,
        client,
        admin,
        data,
    }
}

/// With `GRAFT_TEST_DATABASE_URL` set (`tests/pg-cluster.sh run`, as `make test` does for
/// one pass of this suite), every test server keeps its metadata in PostgreSQL: a database of
/// that cluster of its own, named after its data directory, so a server restarted on the
/// same directory finds its rows again. Without it, SQLite in the data directory.
pub async fn test_database(data: &Path) -> Option<String> {
    let admin = std::env::var("GRAFT_TEST_DATABASE_URL").ok()?;
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    let name = format!("it_{:016x}", h.finish());
    Some(graft_server::store::testing::database(&admin, &name).await)
}

/// With `GRAFT_TEST_BLOB_STORE` set (an `s3://bucket` of `tests/s3-server.sh run`, as
/// `make test` does for the PostgreSQL pass of this suite), every test server keeps its blobs
/// in that bucket under a prefix of its own, named after its data directory (so a restart on
/// the same directory finds them). Without it, the data directory itself.
pub fn test_blob_store(data: &Path) -> Option<String> {
    let base = std::env::var("GRAFT_TEST_BLOB_STORE").ok()?;
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    Some(format!(
        "{}/it_{:016x}",
        base.trim_end_matches('/'),
        h.finish()
    ))
}

impl TestServer {
    /// The server's blob store, as the server opens it.
    pub fn blobs(&self) -> graft_server::blobs::Blobs {
        let cfg = self.server.config();
        graft_server::blobs::Blobs::open(cfg.blob_store.as_deref(), self.data.path())
            .expect("blob store")
    }

    /// The names the server has stored directly under `prefix` (`adapters`, `datasets`,
    /// `jobs/<id>`), wherever its blob store is.
    pub async fn stored(&self, prefix: &str) -> Vec<String> {
        self.blobs().names(prefix).await.expect("list blobs")
    }
}

/// A client with a fresh key of `tenant` (created if missing), over `admin`'s connection.
pub async fn tenant_client(admin: &GraftClient, tenant: &str) -> GraftClient {
    match admin.create_tenant(tenant).await {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => panic!("create tenant {tenant}: {s:?}"),
    }
    let key = admin.create_key(tenant, "test").await.expect("create key");
    admin.with_api_key(Some(&key)).expect("key is ascii")
}

pub async fn start_real() -> TestServer {
    start_with(real_model_path(), |_| {}).await
}

pub async fn start_tiny() -> TestServer {
    start_with(tiny_model_path(), |_| {}).await
}

/// Value of a counter/gauge line `name{labels} value` summed over matching lines.
pub fn metric_value(text: &str, name: &str, label_filter: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        // `name{labels} value`: label values may hold spaces (an HTTP route), so the
        // value is what follows the last space.
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(key, _)| {
            (*key == name || key.starts_with(&format!("{name}{{")))
                && label_filter.iter().all(|f| key.contains(f))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// Uploads dataset "d": 8 copies of one short prompt/completion pair (the tiny model
/// trains on it in milliseconds a step).
pub async fn upload_tiny_dataset(client: &GraftClient) {
    client
        .upload_dataset(
            "",
            "d",
            "",
            b"{\"prompt\":\"a b\",\"completion\":\"c d e\"}\n".repeat(8),
        )
        .await
        .expect("upload");
}

/// Polls `f` until true or `timeout`.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// The fixtures copied into the repository (`tests/fixtures/`, see its README).
pub fn fixtures() -> PathBuf {
    std::env::var_os("GRAFT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/fixtures"))
}

/// The PEFT fixture adapter's two files.
pub fn fixture_adapter() -> (Vec<u8>, Vec<u8>) {
    let dir = fixtures().join("peft-lora-smollm2");
    (
        std::fs::read(dir.join("adapter_config.json")).expect("fixture config"),
        std::fs::read(dir.join("adapter_model.safetensors")).expect("fixture weights"),
    )
}

pub use graft_server::adapters::testing::random_peft;

/// A client of a server started with [`ADMIN_KEY`], holding a fresh key of `tenant`.
pub async fn connect_as(addr: std::net::SocketAddr, tenant: &str) -> GraftClient {
    let admin = GraftClient::connect_with(
        &format!("http://{addr}"),
        &graft_client::ConnectOptions {
            api_key: Some(ADMIN_KEY.into()),
            ..Default::default()
        },
    )
    .await
    .expect("client connects");
    tenant_client(&admin, tenant).await
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), with `key` as the bearer
/// key and `body` as JSON: `(status, head, body)`, a chunked body de-chunked.
pub async fn http_json(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, String, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    http_raw(addr, head.as_bytes(), body.as_bytes()).await
}

/// Sends `head` then `body` and reads the whole answer: `(status, head, body)`.
pub async fn http_raw(
    addr: std::net::SocketAddr,
    head: &[u8],
    body: &[u8],
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head).await.expect("write");
    s.write_all(body).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, head.to_string(), body)
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}
