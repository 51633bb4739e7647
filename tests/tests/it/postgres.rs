//! graftd on a real PostgreSQL server (a throw-away cluster of its own, in both passes of the
//! suite) when that server goes away and comes back.

use std::time::{Duration, Instant};

use graft_client::{proto as pb, GenerateOptions};
use graft_server::{
    adapters::testing::random_peft, model::BaseModel, store::testing::TestPostgres,
};
use graft_tests::{start_with, tiny_model_path};
use tonic::Code;

fn with_adapter(adapter: Option<&str>) -> pb::GenerateRequest {
    GenerateOptions {
        adapter: adapter.map(str::to_string),
        ..GenerateOptions::greedy(4)
    }
    .prompt("hello")
}

/// PostgreSQL stopped for 10 s under a running graftd: a stream admitted before is
/// delivered to its end; calls that must write answer UNAVAILABLE with a message that says so and store
/// nothing; generation goes on, with an adapter already resolved too (its versions are
/// cached); once PostgreSQL is back, the same writes succeed without restarting graftd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_postgres_fails_writes_with_unavailable_and_serving_goes_on() {
    let pg = TestPostgres::start();
    let url = pg.database("outage").await;
    let t = start_with(tiny_model_path(), |c| c.database_url = Some(url.clone())).await;
    let m = BaseModel::load(&tiny_model_path(), &candle_core::Device::Cpu).expect("tiny");
    let (c, w) = random_peft(&m, 2, 4);
    t.client
        .import_adapter("", "hot", c.clone(), w.clone(), false)
        .await
        .expect("import");
    let hot = t
        .client
        .generate(with_adapter(Some("hot")))
        .await
        .expect("adapted")
        .text;

    // A stream admitted before the outage and read during it (on the tiny model its
    // generation may end before the stop completes; the engine never reads the database).
    let mut long = t
        .client
        .generate_stream(
            GenerateOptions {
                adapter: Some("hot".into()),
                ..GenerateOptions::greedy(300)
            }
            .prompt("hello"),
        )
        .await
        .expect("stream");
    let first = long.message().await.expect("first").expect("a message");
    pg.stop();
    let stopped = Instant::now();
    let err = t
        .client
        .import_adapter("", "cold", c.clone(), w.clone(), false)
        .await
        .expect_err("no database");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("database cannot be reached"),
        "{}",
        err.message()
    );
    let err = t
        .client
        .upload_dataset("", "d", "", b"{\"text\":\"x\"}\n".to_vec())
        .await
        .expect_err("no database");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // Serving: the base, and the adapter resolved before the outage, with the same tokens.
    t.client
        .generate(with_adapter(None))
        .await
        .expect("the base serves");
    let during = t
        .client
        .generate(with_adapter(Some("hot")))
        .await
        .expect("a resolved adapter serves")
        .text;
    assert_eq!(during, hot);
    // That request found the database unreachable; the next ones do not wait for it again.
    let started = Instant::now();
    t.client
        .generate(with_adapter(Some("hot")))
        .await
        .expect("a resolved adapter serves");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );

    // The outage lasts 10 s; the admitted stream is delivered whole within it.
    let mut tokens = first.token_ids.len() as u32;
    let mut last = first;
    while let Some(m) = long.message().await.expect("the stream goes on") {
        tokens += m.token_ids.len() as u32;
        last = m;
    }
    assert!(
        matches!(
            last.finish_reason(),
            pb::FinishReason::Length | pb::FinishReason::Eos
        ),
        "{last:?}"
    );
    assert_eq!(
        Some(tokens),
        last.usage.map(|u| u.completion_tokens),
        "every token arrived"
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;
    t.client
        .generate(with_adapter(Some("hot")))
        .await
        .expect("still serving after 10 s without PostgreSQL");

    pg.resume();
    let started = Instant::now();
    let v = loop {
        match t
            .client
            .import_adapter("", "cold", c.clone(), w.clone(), false)
            .await
        {
            Ok(v) => break v,
            Err(e)
                if e.code() == Code::Unavailable && started.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("after PostgreSQL came back: {e:?}"),
        }
    };
    // Nothing of the failed attempt was stored: the first stored version is 1.
    assert_eq!(v.version, 1);
    t.client
        .generate(with_adapter(Some("cold")))
        .await
        .expect("the new adapter serves");
    t.client
        .upload_dataset("", "d", "", b"{\"text\":\"x\"}\n".to_vec())
        .await
        .expect("upload after the outage");
}
