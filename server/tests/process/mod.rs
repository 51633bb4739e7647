//! Helpers for the tests that run the real `graftd` binary as a child process: ports, the
//! spawn (with a known admin key), and a client holding a tenant's key.
#![allow(dead_code)]

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use graft_client::{ConnectOptions, GraftClient};

pub const ADMIN_KEY: &str = "process-test-admin-key-0123";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A graftd child process, killed when dropped (so a failing test leaves none behind, and
/// none holds the test's output pipe open).
pub struct Graftd(pub Child);

impl Graftd {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().expect("wait for graftd")
    }
}

impl Drop for Graftd {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Starts graftd on `port` (metrics on a free port) over `data`; its log (stdout) goes to
/// `log`.
pub fn spawn(model: &Path, data: &Path, port: u16, log: Stdio) -> Graftd {
    spawn_with_metrics(model, data, port, free_port(), log)
}

/// As [`spawn`], with /metrics on `metrics_port`.
pub fn spawn_with_metrics(
    model: &Path,
    data: &Path,
    port: u16,
    metrics_port: u16,
    log: Stdio,
) -> Graftd {
    spawn_with_args(model, data, port, metrics_port, log, &[])
}

/// As [`spawn_with_metrics`], with more flags.
pub fn spawn_with_args(
    model: &Path,
    data: &Path,
    port: u16,
    metrics_port: u16,
    log: Stdio,
    extra: &[&str],
) -> Graftd {
    Graftd(
        Command::new(env!("CARGO_BIN_EXE_graftd"))
            .args(extra)
            .args(["--model", model.to_str().expect("utf8")])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--data-dir", data.to_str().expect("utf8")])
            .env("GRAFT_ADMIN_KEY", ADMIN_KEY)
            .stdout(log)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn graftd"),
    )
}

/// Waits until graftd on `port` accepts admin calls, then returns a client with a fresh key
/// of `tenant` (created if missing).
pub async fn tenant_client(port: u16, tenant: &str) -> GraftClient {
    let deadline = Instant::now() + Duration::from_secs(60);
    let opts = ConnectOptions {
        api_key: Some(ADMIN_KEY.into()),
        ..Default::default()
    };
    loop {
        if let Ok(admin) = GraftClient::connect_with(&format!("127.0.0.1:{port}"), &opts).await {
            match admin.create_tenant(tenant).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::AlreadyExists => {}
                Err(s) if s.code() == tonic::Code::Unavailable => {}
                Err(s) => panic!("create tenant: {s:?}"),
            }
            if let Ok(key) = admin.create_key(tenant, "process test").await {
                return admin.with_api_key(Some(&key)).expect("ascii key");
            }
        }
        assert!(Instant::now() < deadline, "graftd did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
