//! Fair sharing between tenants (BENCHMARKS.md, issue 5): one tenant floods the engine with
//! 100 streams; another tenant sends one. Reports the single stream's time to first token
//! and total time, idle and under the flood, next to the flood's own queueing.

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use futures::future::join_all;
use graft_client::{proto as pb, GenerateOptions};
use graft_server::{config::ServerConfig, server};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value_t = 100)]
    flood: usize,
    #[arg(long, default_value_t = 32)]
    tokens: u32,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = tempfile::tempdir()?;
    let mut cfg = ServerConfig::for_model(&args.model, data.path());
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    let (max_active, per_tenant) = (
        cfg.engine.max_active_sequences,
        cfg.engine.max_active_per_tenant,
    );
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let flood = graft_tests::connect_as(srv.grpc_addr, "flood").await;
    let victim = graft_tests::connect_as(srv.grpc_addr, "victim").await;
    let admin = graft_tests::connect_as(srv.grpc_addr, "unused").await; // warms the path
    drop(admin);
    let admin_client = graft_client::GraftClient::connect_with(
        &format!("http://{}", srv.grpc_addr),
        &graft_client::ConnectOptions {
            api_key: Some(graft_tests::ADMIN_KEY.into()),
            ..Default::default()
        },
    )
    .await?;
    admin_client
        .admin()
        .set_quotas(pb::SetQuotasRequest {
            tenant: "flood".into(),
            quotas: Some(pb::Quotas {
                max_concurrent_streams: Some(args.flood as u32 + 10),
                ..Default::default()
            }),
            reset: false,
        })
        .await?;
    let req = GenerateOptions {
        stop: vec![],
        ..GenerateOptions::greedy(args.tokens)
    }
    .chat([(
        "user",
        "Write a long story about a lighthouse keeper and a storm.",
    )]);
    println!(
        "machine: {} cores; engine: {max_active} sequences, {per_tenant} per tenant; flood {} x {} tokens",
        std::thread::available_parallelism()?.get(),
        args.flood,
        args.tokens
    );
    let solo = |c: graft_client::GraftClient, r: pb::GenerateRequest| async move {
        let t0 = Instant::now();
        let out = c.generate(r).await?;
        anyhow::ensure!(
            out.token_ids.len() > 1,
            "the answer ended after one token: {out:?}"
        );
        let t = out.timings.unwrap_or_default();
        anyhow::Ok((t.time_to_first_token_seconds, t0.elapsed().as_secs_f64()))
    };
    victim.generate(req.clone()).await?; // warm
    let (idle_ttft, idle_total) = solo(victim.clone(), req.clone()).await?;
    let handles: Vec<_> = (0..args.flood)
        .map(|_| {
            let (c, r) = (flood.clone(), req.clone());
            tokio::spawn(async move { c.generate(r).await })
        })
        .collect();
    // Let the flood fill the batch and the queue first.
    while srv.engine().map_or(0, |e| e.queue_depth()) < args.flood.saturating_sub(max_active) / 2 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (busy_ttft, busy_total) = solo(victim.clone(), req.clone()).await?;
    let mut flood_ttft = Vec::new();
    for h in join_all(handles).await {
        flood_ttft.push(h??.timings.unwrap_or_default().time_to_first_token_seconds);
    }
    println!(
        "victim idle:        TTFT {:.3}s  total {:.2}s",
        idle_ttft, idle_total
    );
    println!(
        "victim under flood: TTFT {:.3}s  total {:.2}s",
        busy_ttft, busy_total
    );
    println!(
        "flood streams:      TTFT median {:.2}s  max {:.2}s",
        median(flood_ttft.clone()),
        flood_ttft.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "victim TTFT under flood / flood median TTFT: {:.3}",
        busy_ttft / median(flood_ttft)
    );
    srv.drain().await?;
    Ok(())
}
