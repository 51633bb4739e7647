//! The metadata database's cost per request (BENCHMARKS.md, issue 14): the same calls
//! against graftd in-process on SQLite and on PostgreSQL (a throw-away cluster,
//! `tests/pg-cluster.sh`), in one run:
//! 1. generation with an adapter whose versions are cached (the hot path: admission and the
//!    adapter lookup read memory, not the database);
//! 2. `GetAdapter` (answered from the cached versions) and `ListAdapters` (one query of the
//!    database per call);
//! 3. an import (rows written in a transaction; blobs on the local disk both times).

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use graft_bench::pct;
use graft_client::{GenerateOptions, GraftClient};
use graft_server::{model::BaseModel, store::testing::TestPostgres};
use graft_tests::{random_peft, start_with};

#[derive(Parser)]
struct Args {
    /// The model (default: the tiny random one, so the database's share shows).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    requests: usize,
    #[arg(long, default_value_t = 30)]
    imports: usize,
}

/// p50 and p99 in ms of `n` runs of `call`.
async fn time<F, Fut>(n: usize, mut call: F) -> (f64, f64)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        call(i).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (pct(&mut ms, 0.5), pct(&mut ms, 0.99))
}

async fn measure(client: &GraftClient, model: &BaseModel, args: &Args) -> [(f64, f64); 4] {
    let (c, w) = random_peft(model, 1, 8);
    client
        .import_adapter("", "hot", c.clone(), w.clone(), false)
        .await
        .expect("import");
    let req = GenerateOptions {
        adapter: Some("hot".into()),
        ..GenerateOptions::greedy(1)
    }
    .prompt("hello");
    // Warm: the adapter is loaded and its versions cached.
    client.generate(req.clone()).await.expect("generate");
    let generate = time(args.requests, |_| {
        let r = req.clone();
        async move {
            client.generate(r).await.expect("generate");
        }
    })
    .await;
    let get = time(args.requests, |_| async {
        client.get_adapter("", "hot").await.expect("get");
    })
    .await;
    let list = time(args.requests, |_| async {
        client.list_adapters("").await.expect("list");
    })
    .await;
    let import = time(args.imports, |i| {
        let (c, w) = (c.clone(), w.clone());
        async move {
            client
                .import_adapter("", &format!("i{i}"), c, w, false)
                .await
                .expect("import");
        }
    })
    .await;
    [generate, get, list, import]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = args
        .model
        .clone()
        .unwrap_or_else(graft_tests::tiny_model_path);
    let model = BaseModel::load(&path, &candle_core::Device::Cpu)?;
    // Blobs on the local disk both times: only the database differs.
    let sqlite = start_with(path.clone(), |c| {
        c.database_url = None;
        c.blob_store = None;
    })
    .await;
    let on_sqlite = measure(&sqlite.client, &model, &args).await;
    drop(sqlite);
    let pg = TestPostgres::start();
    let url = pg.database("bench").await;
    let postgres = start_with(path, |c| {
        c.database_url = Some(url.clone());
        c.blob_store = None;
    })
    .await;
    let on_pg = measure(&postgres.client, &model, &args).await;
    drop(postgres);
    println!(
        "| call | SQLite p50 / p99 ms | PostgreSQL p50 / p99 ms | PostgreSQL / SQLite (p50) |"
    );
    println!("|---|---|---|---|");
    for (name, (s, p)) in [
        "generate, 1 token, cached adapter",
        "GetAdapter (versions cached)",
        "ListAdapters (one database query)",
        "ImportAdapter (rows + blobs)",
    ]
    .iter()
    .zip(on_sqlite.iter().zip(on_pg.iter()))
    {
        println!(
            "| {name} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} |",
            s.0,
            s.1,
            p.0,
            p.1,
            p.0 / s.0
        );
    }
    Ok(())
}
