//! Adapter benchmarks (BENCHMARKS.md, issue 3), over gRPC against graftd in-process:
//! 1. aggregate decode with N streams each on its own rank-R adapter (all seven modules), as
//!    a ratio to the same N streams on the bare base model, in one run;
//! 2. cold adapter load to first token (every request misses the cache), p50/p99;
//! 3. many registered adapters, a subset in flight: throughput and resident memory.

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use graft_bench::{pct, result, rss_mib, run_streams};
use graft_client::GenerateOptions;
use graft_server::{config::ServerConfig, server};
use graft_tests::random_peft;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value_t = 32)]
    streams: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 48)]
    tokens: u32,
    /// Registered adapters for the scale test (rank `scale_rank`).
    #[arg(long, default_value_t = 200)]
    registered: usize,
    #[arg(long, default_value_t = 50)]
    in_flight: usize,
    #[arg(long, default_value_t = 2)]
    scale_rank: usize,
    /// What graftd serves LoRA matrices in (`--lora-dtype`: f32, bf16 or f16).
    #[arg(long, default_value = "f32")]
    lora_dtype: graft_server::model::lora::LoraDtype,
    /// graftd's `--kv-cache-dtype` (f32 or f16).
    #[arg(long, default_value = "f32")]
    kv_cache_dtype: graft_server::model::KvDtype,
    /// Which measurements: `mixed`, `cold`, `scale` (all three by default).
    #[arg(long, value_delimiter = ',', default_value = "mixed,cold,scale")]
    parts: Vec<String>,
}

/// As graftd: its process settings (`graft_server::process`), then the measurements.
fn main() -> anyhow::Result<()> {
    graft_server::process::run_main(run())?
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = std::env::temp_dir().join(format!("graft-bench-adapters-{}", std::process::id()));
    let mut cfg = ServerConfig::for_model(&args.model, &data);
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    cfg.engine.max_active_sequences = 64;
    cfg.adapter_cache_bytes = 4 << 30;
    cfg.lora_dtype = args.lora_dtype;
    cfg.engine.kv_cache_dtype = args.kv_cache_dtype;
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let model = srv.engine().expect("ready").model().clone();
    let client = graft_tests::connect_as(srv.grpc_addr, graft_tests::TENANT).await;

    let part = |p: &str| args.parts.iter().any(|x| x == p);
    let kv_name = format!("{:?}", args.kv_cache_dtype).to_lowercase();

    // 1. Mixed adapters vs bare base.
    if part("mixed") {
        for i in 0..args.streams {
            let (c, w) = random_peft(&model, i as u64 + 1, args.rank);
            client
                .import_adapter("", &format!("r{i}"), c, w, false)
                .await?;
        }
        let bare: Vec<Option<String>> = vec![None; args.streams];
        let mixed: Vec<Option<String>> = (0..args.streams).map(|i| Some(format!("r{i}"))).collect();
        run_streams(&client, &bare[..4], 8).await?; // warm
        let base = run_streams(&client, &bare, args.tokens).await?;
        let with = run_streams(&client, &mixed, args.tokens).await?;
        let base2 = run_streams(&client, &bare, args.tokens).await?;
        let base = (base + base2) / 2.0;
        println!(
        "{} streams, each its own rank-{} adapter on 7 modules ({} LoRA, {} KV cache): {with:.1} tok/s; bare base {base:.1} tok/s; ratio {:.2}",
        args.streams,
        args.rank,
        args.lora_dtype.name(),
        kv_name,
        with / base
    );
        result(
            "graft_mixed_adapters",
            json!({ "streams": args.streams, "rank": args.rank, "lora_dtype": args.lora_dtype.name(),
            "kv_cache_dtype": kv_name, "tok_s": with, "bare_tok_s": base,
            "ratio": with / base }),
        );
    }
    srv.drain().await?;
    let _ = std::fs::remove_dir_all(&data);

    // 2. Cold loads: a cache too small to keep anything, so every request loads from disk.
    if part("cold") {
        let mut cfg = ServerConfig::for_model(&args.model, &data);
        cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
        cfg.adapter_cache_bytes = 1;
        cfg.lora_dtype = args.lora_dtype;
        cfg.engine.kv_cache_dtype = args.kv_cache_dtype;
        let srv = server::start(cfg).await?;
        srv.ready().await?;
        let client = graft_tests::connect_as(srv.grpc_addr, graft_tests::TENANT).await;
        for i in 0..20 {
            let (c, w) = random_peft(&model, 500 + i, args.rank);
            client
                .import_adapter("", &format!("c{i}"), c, w, false)
                .await?;
        }
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for i in 0..20 {
            for (a, out) in [(Some(format!("c{i}")), &mut cold), (None, &mut warm)] {
                let t = Instant::now();
                client
                    .generate(
                        GenerateOptions {
                            adapter: a,
                            ..GenerateOptions::greedy(1)
                        }
                        .prompt("Hello there"),
                    )
                    .await?;
                out.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (cold50, cold99, warm50) = (
            pct(&mut cold, 0.5),
            pct(&mut cold, 0.99),
            pct(&mut warm, 0.5),
        );
        println!(
        "cold rank-{} adapter to first token: p50 {cold50:.1} ms p99 {cold99:.1} ms (same request without adapter: p50 {warm50:.1} ms)",
        args.rank,
    );
        result(
            "graft_cold_adapter",
            json!({ "rank": args.rank, "lora_dtype": args.lora_dtype.name(), "first_token_p50_ms": cold50,
            "bare_first_token_p50_ms": warm50 }),
        );
        srv.drain().await?;
        let _ = std::fs::remove_dir_all(&data);
    }
    if !part("scale") {
        return Ok(());
    }

    // 3. Many registered, a subset in flight, budget bounded.
    let mut cfg = ServerConfig::for_model(&args.model, &data);
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    cfg.engine.max_active_sequences = 64;
    cfg.adapter_cache_bytes = 64 << 20;
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let client = graft_tests::connect_as(srv.grpc_addr, graft_tests::TENANT).await;
    let (c, w) = random_peft(&model, 7, args.scale_rank);
    for i in 0..args.registered {
        client
            .import_adapter("", &format!("s{i}"), c.clone(), w.clone(), false)
            .await?;
    }
    for round in 0..3 {
        let set: Vec<Option<String>> = (0..args.in_flight)
            .map(|i| Some(format!("s{}", (i * 7 + round * 31) % args.registered)))
            .collect();
        let tps = run_streams(&client, &set, 16).await?;
        let (n, bytes) = srv.adapters().expect("ready").resident();
        println!(
            "{} registered, {} in flight (round {round}): {tps:.1} tok/s; {n} resident ({:.1} MiB); process RSS {:.0} MiB",
            args.registered,
            args.in_flight,
            bytes as f64 / 1048576.0,
            rss_mib()
        );
    }
    srv.drain().await?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
