//! The `graftd` binary itself: it serves, on SIGTERM it drains an in-flight stream to its
//! end, then exits 0 — and no key it saw is in its log.

mod process;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use graft_client::{ConnectOptions, GraftClient};
use graft_proto::v1::{GenerateRequest, SamplingParameters};
use graft_server::model::tiny::{write_tiny_gguf, TinySpec};
use process::{free_port, spawn, ADMIN_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_stream_then_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).expect("tiny model");
    let port = free_port();
    let log_path = dir.path().join("graftd.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = spawn(&model, &dir.path().join("data"), port, Stdio::from(log));
    let deadline = Instant::now() + Duration::from_secs(30);
    let opts = ConnectOptions {
        api_key: Some(ADMIN_KEY.into()),
        ..Default::default()
    };
    let admin = loop {
        if let Ok(c) = GraftClient::connect_with(&format!("127.0.0.1:{port}"), &opts).await {
            if c.create_tenant("acme").await.is_ok() {
                break c;
            }
        }
        assert!(Instant::now() < deadline, "graftd did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let key = admin.create_key("acme", "signals").await.expect("key");
    let client = admin.with_api_key(Some(&key)).expect("ascii");
    // A wrong key is refused (and must not be logged either).
    // Another last character (a key ending in '0' made this the right key before).
    let last = if key.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &key[..key.len() - 1]);
    let e = admin
        .with_api_key(Some(&wrong))
        .expect("ascii")
        .list_adapters("")
        .await
        .expect_err("wrong key");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let req = GenerateRequest {
        prompt: "once".into(),
        parameters: Some(SamplingParameters {
            max_new_tokens: Some(400),
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = loop {
        match client.generation().generate_stream(req.clone()).await {
            Ok(s) => break s.into_inner(),
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("stream: {e:?}"),
        }
    };
    stream.message().await.expect("first").expect("some");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let mut tokens = 1;
    let mut finish = 0;
    while let Some(m) = stream.message().await.expect("stream survives the drain") {
        tokens += m.token_ids.len();
        if m.finish_reason != 0 {
            finish = m.finish_reason;
        }
    }
    assert_eq!(finish, 1, "finished by length");
    assert!(tokens >= 400);
    let status = child.wait();
    assert!(status.success(), "graftd exited with {status:?}");

    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(log.contains("drained"), "the log is the server's: {log}");
    let secret = key.rsplit('_').next().expect("secret part");
    for s in [ADMIN_KEY, secret, &wrong] {
        assert!(!log.contains(s), "a key leaked into the log");
    }
}
