//! graftd as a process of its own (the real binary, `target/<profile>/graftd`), and the
//! throw-away S3 server of `tests/s3-server.sh`: for tests that stop, kill or isolate them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use graft_client::GraftClient;

use crate::{repo_root, ADMIN_KEY};

/// A port free on loopback now (another process could take it before it is used; the
/// tests that need fixed ports accept that small chance).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The graftd binary beside the test executable (`cargo build --bin graftd`; make test does).
pub fn graftd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("graftd");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bin graftd` (make test does)",
        bin.display()
    );
    bin
}

/// A running graftd process; killed (SIGKILL) on drop.
pub struct Graftd {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub data: PathBuf,
}

/// How to start one: the model, its data directory, the stores, extra environment.
pub struct GraftdOptions<'a> {
    pub model: &'a Path,
    pub data: &'a Path,
    pub database_url: Option<String>,
    pub blob_store: Option<String>,
    pub env: Vec<(String, String)>,
}

impl Graftd {
    /// Starts graftd and waits until its health says SERVING (at most 60 s).
    pub async fn spawn(o: GraftdOptions<'_>) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut cmd = tokio::process::Command::new(graftd_bin());
        cmd.arg("--model")
            .arg(o.model)
            .arg("--data-dir")
            .arg(o.data)
            .args(["--listen", &addr.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .env("GRAFT_ADMIN_KEY", ADMIN_KEY)
            .env("RUST_LOG", "warn")
            .envs(o.env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true);
        if let Some(url) = o.database_url {
            cmd.args(["--database-url", &url]);
        }
        if let Some(url) = o.blob_store {
            cmd.args(["--blob-store", &url]);
        }
        let mut child = cmd.spawn().expect("spawn graftd");
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("graftd exited at start: {status}");
            }
            if serving(addr).await {
                break;
            }
            assert!(Instant::now() < end, "graftd did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            addr,
            metrics,
            data: o.data.to_path_buf(),
        }
    }

    /// A client with a fresh key of `tenant` (created if missing).
    pub async fn client(&self, tenant: &str) -> GraftClient {
        crate::connect_as(self.addr, tenant).await
    }

    /// Its `/metrics` text.
    pub async fn scrape(&self) -> String {
        crate::scrape(self.metrics).await
    }

    /// SIGTERM (a drain), and the exit status once the process has ended.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        self.child.wait().await.expect("wait")
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

async fn serving(addr: SocketAddr) -> bool {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
    else {
        return false;
    };
    let mut h = HealthClient::new(channel);
    h.check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status == 1)
        .unwrap_or(false)
}

/// A throw-away S3 server (moto) of this test's own, with bucket `graft-test`; stopped and
/// removed on drop. Its endpoint goes to a graftd process through [`S3Server::env`].
pub struct S3Server {
    dir: tempfile::TempDir,
    pub endpoint: String,
}

impl S3Server {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let endpoint = script("start", dir.path());
        Self { dir, endpoint }
    }

    /// Stops the server process (its objects are in its memory: they are gone with it).
    pub fn stop(&self) {
        script("stop", self.dir.path());
    }

    /// Starts it again on the same port.
    pub fn resume(&self) {
        script("start", self.dir.path());
    }

    /// Its settings as `object_store`'s S3 config keys ([`graft_server::blobs::Blobs::open_with`]).
    pub fn options(&self) -> Vec<(String, String)> {
        self.env()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect()
    }

    /// The `AWS_*` variables graftd reads to reach it.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        script("stop", self.dir.path());
    }
}

fn script(what: &str, dir: &Path) -> String {
    let moto = repo_root().join("target/moto/bin/moto_server");
    let out = std::process::Command::new(repo_root().join("tests/s3-server.sh"))
        .args([what, &dir.to_string_lossy()])
        .env(
            "GRAFT_MOTO_SERVER",
            std::env::var_os("GRAFT_MOTO_SERVER").unwrap_or(moto.into_os_string()),
        )
        .output()
        .expect("run tests/s3-server.sh");
    assert!(
        out.status.success(),
        "s3-server.sh {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Uploads dataset "d" ([`crate::upload_tiny_dataset`]) and starts a job of 300 epochs on it (600 steps
/// of milliseconds each on the tiny model) training `adapter`, checkpointing every
/// `checkpoint_every` steps: a job that runs long enough to be killed, drained or taken over.
pub async fn start_long_job(
    client: &GraftClient,
    adapter: &str,
    checkpoint_every: u32,
) -> graft_client::proto::Job {
    use graft_client::proto as pb;
    crate::upload_tiny_dataset(client).await;
    client
        .create_job(pb::CreateJobRequest {
            dataset: "d".into(),
            adapter_name: adapter.into(),
            hyperparameters: Some(pb::Hyperparameters {
                epochs: Some(300),
                checkpoint_every: Some(checkpoint_every),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create")
}
