//! /metrics moves with this test's traffic and nothing else's: the server is a `graftd`
//! child process, so its recorder is its own (the in-process test servers share one
//! process-wide recorder, where a counter another test moved would look like ours). The
//! figures are checked exactly against what the responses report.

mod process;

use std::{
    io::{Read, Write},
    process::Stdio,
};

use graft_client::GenerateOptions;
use graft_server::model::tiny::{write_tiny_gguf, TinySpec};
use process::{free_port, spawn_with_args, tenant_client};

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

/// The value of `name` whose labels include every one of `labels` (0 when absent).
fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        // `name{labels} value`: label values may hold spaces (an HTTP route), so the
        // value is what follows the last space.
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(key, _)| {
            (*key == name || key.starts_with(&format!("{name}{{")))
                && labels.iter().all(|f| key.contains(f))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_this_servers_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).expect("tiny model");
    let (port, mport, hport) = (free_port(), free_port(), free_port());
    let http = format!("127.0.0.1:{hport}");
    let _graftd = spawn_with_args(
        &model,
        &dir.path().join("data"),
        port,
        mport,
        Stdio::null(),
        &["--http-listen", &http],
    );
    let client = tenant_client(port, "metrics").await;
    // Serving (the warm-up generation has run) before the first snapshot.
    while client.health().await.ok().as_deref() != Some("SERVING") {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before = scrape(mport);
    let ok = client
        .generate(GenerateOptions::greedy(5).prompt("count"))
        .await
        .expect("generate");
    let usage = ok.usage.expect("usage");
    client
        .generate(GenerateOptions::greedy(0).prompt("count"))
        .await
        .expect_err("invalid");
    let after = scrape(mport);
    let delta =
        |name: &str, labels: &[&str]| value(&after, name, labels) - value(&before, name, labels);
    assert_eq!(
        delta("graft_requests_total", &["rpc=\"Generate\"", "code=\"OK\""]),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta(
            "graft_requests_total",
            &["rpc=\"Generate\"", "code=\"INVALID_ARGUMENT\""]
        ),
        1.0
    );
    assert_eq!(
        delta("graft_generated_tokens_total", &[]),
        f64::from(usage.completion_tokens)
    );
    assert_eq!(
        delta("graft_prompt_tokens_total", &[]),
        f64::from(usage.prompt_tokens)
    );
    assert_eq!(delta("graft_time_to_first_token_seconds_count", &[]), 1.0);
    assert_eq!(
        delta(
            "graft_request_duration_seconds_count",
            &["rpc=\"Generate\""]
        ),
        2.0
    );
    // A stream the client drops half-way is recorded too, as CANCELLED.
    let mut stream = client
        .generate_stream(GenerateOptions::greedy(200).prompt("a long story"))
        .await
        .expect("stream");
    stream.message().await.expect("first").expect("some");
    drop(stream);
    let mut later = scrape(mport);
    let cancelled = |text: &str| {
        value(
            text,
            "graft_requests_total",
            &["rpc=\"GenerateStream\"", "code=\"CANCELLED\""],
        ) - value(
            &after,
            "graft_requests_total",
            &["rpc=\"GenerateStream\"", "code=\"CANCELLED\""],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cancelled(&later) < 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        later = scrape(mport);
    }
    assert_eq!(cancelled(&later), 1.0, "{later}");
    // The engine drops the cancelled sequence at its next step; until then it may
    // still generate a token, which must not land in the HTTP deltas below.
    while value(&later, "graft_active_sequences", &[]) > 0.0 && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        later = scrape(mport);
    }
    assert_eq!(value(&later, "graft_active_sequences", &[]), 0.0, "{later}");
    // The OpenAI front's routes are counted under their route, with gRPC's code names.
    let chat = |body: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", hport)).expect("connect HTTP");
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\nX-Graft-Tenant: metrics\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            process::ADMIN_KEY,
            body.len()
        );
        s.write_all(req.as_bytes()).expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out
    };
    let model_name = "graft-tiny";
    let before = scrape(mport);
    let ok = chat(&format!(
        r#"{{"model": "{model_name}", "max_tokens": 4, "temperature": 0, "messages": [{{"role": "user", "content": "hi"}}]}}"#
    ));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let body: serde_json::Value =
        serde_json::from_str(ok.split_once("\r\n\r\n").expect("body").1).expect("json");
    let bad = chat(&format!(
        r#"{{"model": "{model_name}", "temperature": -1, "messages": [{{"role": "user", "content": "hi"}}]}}"#
    ));
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let after_http = scrape(mport);
    let delta = |name: &str, labels: &[&str]| {
        value(&after_http, name, labels) - value(&before, name, labels)
    };
    let route = "rpc=\"POST /v1/chat/completions\"";
    assert_eq!(
        delta("graft_requests_total", &[route, "code=\"OK\""]),
        1.0,
        "{after_http}"
    );
    assert_eq!(
        delta(
            "graft_requests_total",
            &[route, "code=\"INVALID_ARGUMENT\""]
        ),
        1.0
    );
    assert_eq!(
        delta("graft_generated_tokens_total", &[]),
        body["usage"]["completion_tokens"].as_f64().expect("usage")
    );
    for name in [
        "graft_inter_token_latency_seconds_bucket",
        "graft_batch_size_bucket",
        "graft_queue_depth",
        "graft_active_sequences",
        "graft_kv_blocks_total",
        "graft_kv_blocks_used",
    ] {
        assert!(after.contains(name), "{name} missing from /metrics");
    }
}
