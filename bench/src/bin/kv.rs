//! KV memory (BENCHMARKS.md, issue 16): time to first token with a 1,000-token shared system
//! prompt with and without prefix sharing; how many 2,000-token sequences the default KV
//! budget holds; and two bounded load runs on loopback — 200 concurrent streams for 60 s with
//! mixed prompt lengths and adapters, then 20 clients sending 6,000-token prompts into a
//! budget smaller than their sum — reporting errors by code, TTFT, resident memory, and the
//! engine's preemptions.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use futures::future::join_all;
use graft_bench::{pct, rss_mib};
use graft_client::{proto as pb, GenerateOptions, GraftClient};
use graft_server::{config::ServerConfig, engine::default_kv_cache_bytes, server};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Seconds of the 200-stream soak.
    #[arg(long, default_value_t = 60)]
    soak_seconds: u64,
    #[arg(long, default_value_t = 200)]
    soak_streams: usize,
    /// KV budget of the long-prompt run, MiB (20 x 6,000 tokens need ~5.5 GB).
    #[arg(long, default_value_t = 1024)]
    long_kv_mb: usize,
    /// Seconds the long-prompt run lasts before the clients give up what is left.
    #[arg(long, default_value_t = 150)]
    long_seconds: u64,
    /// Which parts to run: prefix, soak, long.
    #[arg(long, value_delimiter = ',', default_value = "prefix,soak,long")]
    parts: Vec<String>,
}

fn system_prompt(variant: usize) -> String {
    let mut s = format!("Session {variant}. You are a terse assistant. Examples:\n");
    for i in 0..60 {
        s.push_str(&format!("Q: What number comes after {i}? A: {}\n", i + 1));
    }
    s
}

async fn tenant(admin: &GraftClient, addr: std::net::SocketAddr, name: &str) -> GraftClient {
    let c = graft_tests::connect_as(addr, name).await;
    admin
        .admin()
        .set_quotas(pb::SetQuotasRequest {
            tenant: name.into(),
            quotas: Some(pb::Quotas {
                max_concurrent_streams: Some(1000),
                max_tokens_per_minute: Some(100_000_000),
                ..Default::default()
            }),
            reset: false,
        })
        .await
        .expect("quotas");
    c
}

async fn admin_of(addr: std::net::SocketAddr) -> GraftClient {
    GraftClient::connect_with(
        &format!("http://{addr}"),
        &graft_client::ConnectOptions {
            api_key: Some(graft_tests::ADMIN_KEY.into()),
            ..Default::default()
        },
    )
    .await
    .expect("admin")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()?.get()
    );

    let run = |p: &str| args.parts.iter().any(|x| x == p);
    if run("prefix") {
        prefix(&args).await?;
    }
    if run("soak") {
        soak(&args).await?;
    }
    if run("long") {
        long(&args).await?;
    }
    Ok(())
}

/// Prefix sharing and capacity, default budget.
async fn prefix(args: &Args) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut cfg = ServerConfig::for_model(&args.model, data.path());
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let engine = srv.engine().expect("ready");
    let per_token = engine.model().llama.kv_shape().bytes_per_token();
    println!(
        "default KV budget: {:.0} MiB ({} tokens at {per_token} B/token): {} concurrent 2,000-token sequences",
        default_kv_cache_bytes() as f64 / 1048576.0,
        engine.kv_capacity_tokens(),
        engine.kv_capacity_tokens() / 2000
    );
    let c = graft_tests::connect_as(srv.grpc_addr, "bench").await;
    let ask = |system: String, q: usize| {
        GenerateOptions::greedy(1)
            .chat([("system", system), ("user", format!("What is {q} + {q}?"))])
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut cached = 0;
    c.generate(ask(system_prompt(999), 0)).await?; // warm the path
    for i in 0..5 {
        // A new session's preamble misses; the same preamble again hits.
        let r = c.generate(ask(system_prompt(i), i)).await?;
        cold.push(r.timings.unwrap_or_default().time_to_first_token_seconds);
        let r = c.generate(ask(system_prompt(i), i + 100)).await?;
        warm.push(r.timings.unwrap_or_default().time_to_first_token_seconds);
        cached = r.usage.unwrap_or_default().cached_prompt_tokens;
    }
    let (cold, warm) = (pct(&mut cold, 0.5), pct(&mut warm, 0.5));
    println!(
        "TTFT, ~1,000-token shared system prompt: without prefix sharing {cold:.3}s, with {warm:.3}s ({cached} prompt tokens cached): {:.1}x",
        cold / warm
    );
    srv.drain().await?;
    Ok(())
}

/// Soak: 200 concurrent streams, mixed prompts and adapters, bounded time.
async fn soak(args: &Args) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut cfg = ServerConfig::for_model(&args.model, data.path());
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    let kv_budget = cfg.engine.kv_cache_bytes;
    let queue = cfg.engine.max_queued_requests;
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let addr = srv.grpc_addr;
    let admin = admin_of(addr).await;
    let model = srv.engine().expect("ready").model().clone();
    let mut clients = Vec::new();
    for t in 0..4 {
        let c = tenant(&admin, addr, &format!("soak{t}")).await;
        let (cfg_json, weights) = graft_server::adapters::testing::random_peft(&model, t, 8);
        c.import_adapter("", "a", cfg_json, weights, false).await?;
        clients.push(c);
    }
    let rss_start = rss_mib();
    let end = Instant::now() + Duration::from_secs(args.soak_seconds);
    let workers = (0..args.soak_streams).map(|i| {
        let c = clients[i % clients.len()].clone();
        async move {
            let mut codes: BTreeMap<String, usize> = BTreeMap::new();
            let mut ttft = Vec::new();
            let mut n = 0usize;
            while Instant::now() < end {
                let words = [8, 60, 300][(i + n) % 3];
                let opts = GenerateOptions {
                    adapter: (i % 2 == 0).then(|| "a".to_string()),
                    ..GenerateOptions::greedy(16)
                };
                let req = opts.prompt(format!("{} tell me more.", "word ".repeat(words)));
                n += 1;
                match c.generate(req).await {
                    Ok(r) => {
                        ttft.push(r.timings.unwrap_or_default().time_to_first_token_seconds);
                        *codes.entry("OK".into()).or_default() += 1;
                    }
                    Err(s) => {
                        *codes.entry(format!("{:?}", s.code())).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            (codes, ttft)
        }
    });
    let mut rss_samples = Vec::new();
    let sampler = async {
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(5)).await;
            rss_samples.push(rss_mib());
        }
    };
    let (results, ()) = tokio::join!(join_all(workers), sampler);
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut ttft = Vec::new();
    for (c, t) in results {
        for (k, v) in c {
            *codes.entry(k).or_default() += v;
        }
        ttft.extend(t);
    }
    let engine = srv.engine().expect("ready");
    println!(
        "soak: {} streams x {}s (queue bound {queue}, KV budget {:.0} MiB): answers {codes:?}; TTFT p50 {:.2}s p99 {:.2}s; preemptions {}",
        args.soak_streams,
        args.soak_seconds,
        kv_budget as f64 / 1048576.0,
        pct(&mut ttft.clone(), 0.5),
        pct(&mut ttft, 0.99),
        engine.preemptions()
    );
    println!(
        "soak: resident memory {rss_start:.0} MiB after warm-up, then every 5 s: {:?} MiB",
        rss_samples
            .iter()
            .map(|r| r.round() as i64)
            .collect::<Vec<_>>()
    );
    srv.drain().await?;
    Ok(())
}

/// 20 clients with 6,000-token prompts into a smaller budget, for a bounded time.
async fn long(args: &Args) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let mut cfg = ServerConfig::for_model(&args.model, data.path());
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    cfg.engine.kv_cache_bytes = args.long_kv_mb << 20;
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let admin = admin_of(srv.grpc_addr).await;
    let c = tenant(&admin, srv.grpc_addr, "long").await;
    let long_prompt = |i: usize| format!("{i} {}", "alpha beta gamma delta ".repeat(1500));
    let t0 = Instant::now();
    let rss_before = rss_mib();
    let budget = Duration::from_secs(args.long_seconds);
    let results = join_all((0..20).map(|i| {
        let c = c.clone();
        async move {
            let req = GenerateOptions::greedy(8).prompt(long_prompt(i));
            tokio::time::timeout(budget, c.generate(req)).await
        }
    }));
    let mut rss_samples = Vec::new();
    let sampler = async {
        while t0.elapsed() < budget {
            tokio::time::sleep(Duration::from_secs(10)).await;
            rss_samples.push(rss_mib());
        }
    };
    let (results, ()) = tokio::join!(results, sampler);
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut prompt_tokens = 0;
    for r in &results {
        let k = match r {
            Ok(Ok(r)) => {
                prompt_tokens = r.usage.unwrap_or_default().prompt_tokens;
                "OK".to_string()
            }
            Ok(Err(s)) => format!("{:?}", s.code()),
            Err(_) => "still queued or prefilling at the end".to_string(),
        };
        *codes.entry(k).or_default() += 1;
    }
    let engine = srv.engine().expect("ready");
    println!(
        "long prompts: 20 x {prompt_tokens} tokens into a {} MiB KV pool ({} tokens) for {}s: {codes:?}; preemptions {}; resident {rss_before:.0} MiB before, every 10 s {:?} MiB",
        args.long_kv_mb,
        engine.kv_capacity_tokens(),
        args.long_seconds,
        engine.preemptions(),
        rss_samples.iter().map(|r| r.round() as i64).collect::<Vec<_>>()
    );
    if let Some(e) = srv.engine() {
        e.cancel_all();
    }
    let _ = srv.drain().await;
    Ok(())
}
