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

/// PostgreSQL stopped under a running graftd: calls that must write answer UNAVAILABLE
/// with a message that says so and store nothing; generation goes on, with an adapter
/// already resolved too (its versions are cached); once PostgreSQL is back, the same
/// writes succeed without restarting graftd.
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

    pg.stop();
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
