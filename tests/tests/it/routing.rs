//! Adapter-affine routing (`graft_client::Replicas`) over three graftd processes on one
//! PostgreSQL and one blob store: how often a request pays a cold adapter load with the
//! routing and without it (round-robin), the same requests over 30 adapters each way.

use graft_client::{GenerateOptions, GraftClient, Replicas};
use graft_server::{
    adapters::{peft, testing::random_peft},
    model::BaseModel,
    store::testing::TestPostgres,
};
use graft_tests::{
    metric_value,
    process::{Graftd, GraftdOptions},
    tiny_model_path, TENANT,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const REPLICAS: usize = 3;
const ADAPTERS: usize = 30;
const REQUESTS: usize = 300;
const RANK: usize = 24;
const CACHE_MB: usize = 3;

async fn misses(r: &Graftd) -> f64 {
    metric_value(&r.scrape().await, "graft_adapter_cache_misses_total", &[])
}

async fn total_misses(rs: &[Graftd]) -> f64 {
    let mut n = 0.0;
    for r in rs {
        n += misses(r).await;
    }
    n
}

/// `REQUESTS` greedy requests, each for a uniformly drawn adapter of `names` (the same draw
/// every run), sent through `replicas` routed by adapter or round-robin.
async fn requests(replicas: &Replicas, names: &[String], routed: bool) {
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..REQUESTS {
        let name = &names[rng.random_range(0..names.len())];
        let req = GenerateOptions {
            adapter: Some(name.clone()),
            ..GenerateOptions::greedy(2)
        }
        .prompt("hello");
        let r = if routed {
            replicas.generate(req).await
        } else {
            replicas.pick(None).expect("replicas").generate(req).await
        };
        r.unwrap_or_else(|e| panic!("request {i} for {name}: {e:?}"));
    }
}

/// Three replicas whose adapter caches each hold about half of 30 adapters. Routed by
/// adapter, every adapter is loaded once, on its replica, and stays hot there: 30 cold
/// loads in 300 requests. Round-robin, every replica meets every adapter and its cache
/// thrashes: several times as many. Prints both rates for BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_by_adapter_loads_each_adapter_once_where_round_robin_loads_it_everywhere() {
    let pg = TestPostgres::start();
    let url = pg.database("routing").await;
    let blobs = tempfile::tempdir().expect("blobs");
    let dirs: Vec<_> = (0..=REPLICAS)
        .map(|_| tempfile::tempdir().expect("data"))
        .collect();
    let model = tiny_model_path();
    let opts = |i: usize| GraftdOptions {
        model: &model,
        data: dirs[i].path(),
        database_url: Some(url.clone()),
        blob_store: Some(format!("file://{}", blobs.path().display())),
        env: vec![("GRAFT_ADAPTER_CACHE_MB".into(), CACHE_MB.to_string())],
    };

    // Two sets of 30 adapters, imported by a process of their own that then goes, so every
    // replica starts with a cold cache (an import leaves its adapter hot where it ran).
    let m = BaseModel::load(&model, &candle_core::Device::Cpu).expect("tiny");
    let files: Vec<_> = (0..2 * ADAPTERS)
        .map(|i| random_peft(&m, 500 + i as u64, RANK))
        .collect();
    let one = peft::parse(
        &files[0].0,
        &files[0].1,
        m.config(),
        &m.name,
        &peft::ImportPolicy {
            max_rank: 64,
            max_virtual_tokens: 128,
            force: true,
            base_aliases: vec![],
        },
    )
    .expect("parse")
    .adapter
    .bytes();
    let capacity = (CACHE_MB << 20) / one;
    assert!(
        (ADAPTERS / REPLICAS..ADAPTERS * 2 / 3).contains(&capacity),
        "a cache of {CACHE_MB} MiB holds {capacity} adapters of {one} bytes: resize the test"
    );
    let importer = Graftd::spawn(opts(REPLICAS)).await;
    let c = importer.client(TENANT).await;
    for (i, (config, weights)) in files.iter().enumerate() {
        c.import_adapter("", &format!("a{i}"), config.clone(), weights.clone(), false)
            .await
            .expect("import");
    }
    importer.kill().await;

    let mut rs = Vec::new();
    for i in 0..REPLICAS {
        rs.push(Graftd::spawn(opts(i)).await);
    }
    let mut clients: Vec<(String, GraftClient)> = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        clients.push((format!("replica-{i}"), r.client(TENANT).await));
    }
    let replicas = Replicas::new(clients);
    let (routed_set, rr_set): (Vec<String>, Vec<String>) = (
        (0..ADAPTERS).map(|i| format!("a{i}")).collect(),
        (ADAPTERS..2 * ADAPTERS).map(|i| format!("a{i}")).collect(),
    );
    // The routed adapters' shares fit each replica's cache (the premise of the claim).
    let mut share = std::collections::HashMap::<String, usize>::new();
    for a in &routed_set {
        *share
            .entry(replicas.candidates(Some(a))[0].0.to_string())
            .or_default() += 1;
    }
    assert!(
        share.values().all(|n| *n <= capacity),
        "{share:?} vs {capacity}"
    );

    let before = total_misses(&rs).await;
    requests(&replicas, &routed_set, true).await;
    let routed = total_misses(&rs).await - before;
    let before = total_misses(&rs).await;
    requests(&replicas, &rr_set, false).await;
    let round_robin = total_misses(&rs).await - before;
    eprintln!(
        "cold loads in {REQUESTS} requests over {ADAPTERS} adapters, {REPLICAS} replicas \
         caching {capacity} each: routed by adapter {routed} ({:.1}%), round-robin \
         {round_robin} ({:.1}%); shares {share:?}",
        100.0 * routed / REQUESTS as f64,
        100.0 * round_robin / REQUESTS as f64
    );
    // Routed: each adapter drawn was loaded exactly once, on its own replica.
    assert_eq!(routed, ADAPTERS as f64, "routed cold loads");
    // Round-robin: at least each replica's first meeting with most adapters, and more.
    assert!(
        round_robin >= 3.0 * routed,
        "round-robin {round_robin} vs routed {routed}"
    );
    // A replica gone: its adapters' calls go to their second choice, the others' stay.
    let mut rs = rs.into_iter();
    rs.next().expect("replica-0").kill().await;
    for a in &routed_set {
        replicas
            .generate(
                GenerateOptions {
                    adapter: Some(a.clone()),
                    ..GenerateOptions::greedy(1)
                }
                .prompt("hello"),
            )
            .await
            .unwrap_or_else(|e| panic!("{a} with replica-0 gone: {e:?}"));
    }
    for r in rs {
        r.kill().await;
    }
}
