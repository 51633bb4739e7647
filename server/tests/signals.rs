//! The `graftd` binary itself: it serves, and on SIGTERM it drains an in-flight stream to
//! its end, then exits 0.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use graft_proto::v1::{generation_client::GenerationClient, GenerateRequest, SamplingParameters};
use graft_server::model::tiny::{write_tiny_gguf, TinySpec};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_stream_then_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).expect("tiny model");
    let (port, mport) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_graftd"))
        .args(["--model", model.to_str().expect("utf8")])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{mport}")])
        .args([
            "--data-dir",
            dir.path().join("data").to_str().expect("utf8"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn graftd");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        if let Ok(c) = GenerationClient::connect(url.clone()).await {
            break c;
        }
        assert!(Instant::now() < deadline, "graftd did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
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
        match client.generate_stream(req.clone()).await {
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
    let status = child.wait().expect("wait");
    assert!(status.success(), "graftd exited with {status:?}");
}
