//! Operations: health transitions, graceful drain, reflection, metrics.

use std::time::Duration;

use graft_client::{proto, GenerateOptions};
use graft_server::{config::ServerConfig, server};
use graft_tests::{real_model_path, start_tiny, start_with, tiny_model_path};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(url.to_string())
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

async fn health(url: &str) -> ServingStatus {
    let mut c = HealthClient::new(channel(url).await);
    let r = c
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("check")
        .into_inner();
    ServingStatus::try_from(r.status).expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_loaded_then_serving() {
    let data = tempfile::tempdir().expect("data dir");
    let mut cfg = ServerConfig::for_model(real_model_path(), data.path());
    cfg.database_url = graft_tests::test_database(data.path()).await;
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    // Loading waits for this gate, so the loading phase is always observed.
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    cfg.load_gate = Some(gate.clone());
    let srv = server::start(cfg).await.expect("start");
    let url = format!("http://{}", srv.grpc_addr);
    assert_eq!(health(&url).await, ServingStatus::NotServing);
    // Keys work while the model loads; generation refuses politely.
    let c = graft_tests::connect_as(srv.grpc_addr, graft_tests::TENANT).await;
    assert!(srv.engine().is_none(), "still loading");
    let err = c
        .generate(GenerateOptions::greedy(2).prompt("hi"))
        .await
        .expect_err("loading");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(health(&url).await, ServingStatus::NotServing);
    gate.notify_one();
    srv.ready().await.expect("ready");
    assert_eq!(health(&url).await, ServingStatus::Serving);
    srv.drain().await.expect("drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_streams_and_refuses_new_ones() {
    let t = start_with(tiny_model_path(), |c| {
        c.drain_timeout = Duration::from_secs(30)
    })
    .await;
    let url = t.url();
    let mut stream = t
        .client
        .generate_stream(GenerateOptions::greedy(300).prompt("story"))
        .await
        .expect("stream");
    stream.message().await.expect("first").expect("some");
    let client = t.client.clone();
    let drain = tokio::spawn(t.server.drain());
    // NOT_SERVING and refusing while the stream still runs.
    let mut saw_not_serving = false;
    for _ in 0..100 {
        if health(&url).await == ServingStatus::NotServing {
            saw_not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(saw_not_serving);
    let err = client
        .generate(GenerateOptions::greedy(2).prompt("late"))
        .await
        .expect_err("draining");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let mut last = None;
    while let Some(m) = stream.message().await.expect("stream continues") {
        if m.finish_reason != 0 {
            last = Some(m.finish_reason);
        }
    }
    assert_eq!(last, Some(proto::FinishReason::Length as i32));
    drain.await.expect("join").expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_cancels_what_is_left() {
    let t = start_with(real_model_path(), |c| {
        c.drain_timeout = Duration::from_millis(300)
    })
    .await;
    let mut stream = t
        .client
        .generate_stream(GenerateOptions::greedy(4000).prompt("Count from 1 to 1000: 1, 2, 3,"))
        .await
        .expect("stream");
    stream.message().await.expect("first").expect("some");
    let drain = tokio::spawn(t.server.drain());
    let mut last = None;
    while let Some(m) = stream.message().await.expect("stream ends cleanly") {
        if m.finish_reason != 0 {
            last = Some(m.finish_reason);
        }
    }
    assert_eq!(last, Some(proto::FinishReason::Cancelled as i32));
    drain.await.expect("join").expect("drained");
}

/// Reflection answers in v1 and in v1alpha (which grpcurl before 1.8.8 and other older
/// tools still use); both list the graft services and health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    let t = start_tiny().await;
    macro_rules! list_services {
        ($v:ident) => {{
            use tonic_reflection::pb::$v::{
                server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let mut c = ServerReflectionClient::new(channel(&t.url()).await);
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut resp = c
                .server_reflection_info(futures::stream::iter(vec![req]))
                .await
                .expect("reflection")
                .into_inner();
            let msg = resp.message().await.expect("answer").expect("some");
            let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
                panic!("unexpected reflection answer {msg:?}");
            };
            list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }};
    }
    for names in [list_services!(v1), list_services!(v1alpha)] {
        for want in [
            "graft.v1.Generation",
            "graft.v1.Admin",
            "grpc.health.v1.Health",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    }
}

/// Small unary answers are not held back by Nagle's algorithm waiting for the client's
/// delayed ACK (about 40 ms a call on Linux before graftd set TCP_NODELAY on accepted
/// connections): on one connection, a GetAdapter answered from memory takes well under that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_unary_calls_are_not_delayed_by_nagle() {
    let t = start_tiny().await;
    let model = t.server.engine().expect("ready").model().clone();
    let (c, w) = graft_tests::random_peft(&model, 3, 4);
    t.client
        .import_adapter("", "quick", c, w, false)
        .await
        .expect("import");
    let mut ms: Vec<f64> = Vec::new();
    for _ in 0..30 {
        let started = std::time::Instant::now();
        t.client.get_adapter("", "quick").await.expect("get");
        ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    assert!(ms[15] < 20.0, "median {} ms: {ms:?}", ms[15]);
}
