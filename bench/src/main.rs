//! graft-bench: starts graftd in-process on loopback and measures it over gRPC, as a client
//! would see it. Numbers go to BENCHMARKS.md; nothing here asserts a speed.

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use futures::future::join_all;
use graft_bench::{pct, peak_rss_mib, result};
use graft_client::GenerateOptions;
use graft_server::{config::ServerConfig, server};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Measure graftd over gRPC")]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Tokens generated per stream in the decode measurements.
    #[arg(long, default_value_t = 64)]
    decode_tokens: u32,
    /// Concurrency levels for aggregate decode.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    streams: Vec<usize>,
    /// Prompt lengths for the prefill measurement.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    prefill_tokens: Vec<usize>,
    /// Prompt length of each aggregate-decode stream, in tokens (each stream's prompt its own
    /// text). Without it, a short prompt ("Story number i: Once upon a time").
    #[arg(long)]
    stream_prompt_tokens: Option<usize>,
    /// The decode rows' kernel (graftd's --decode-kernel).
    #[arg(long)]
    decode_kernel: Option<graft_server::model::packed::DecodeKernel>,
    /// How the KV cache stores keys and values (graftd's --kv-cache-dtype).
    #[arg(long)]
    kv_cache_dtype: Option<graft_server::model::KvDtype>,
}

/// A prompt of exactly `n` tokens for this model.
fn prompt_of(client_model: &graft_server::model::BaseModel, n: usize) -> String {
    let base = "The history of the city is long and full of surprising turns. ";
    let mut text = String::new();
    while client_model
        .tokenizer
        .encode(&text)
        .map(|v| v.len())
        .unwrap_or(0)
        < n
    {
        text.push_str(base);
    }
    let ids = client_model.tokenizer.encode(&text).expect("encode");
    client_model.tokenizer.decode(&ids[..n]).expect("decode")
}

/// As graftd: its process settings (`graft_server::process`), then the measurements.
fn main() -> anyhow::Result<()> {
    graft_server::process::run_main(run())?
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = std::env::temp_dir().join(format!("graft-bench-{}", std::process::id()));
    let mut cfg = ServerConfig::for_model(&args.model, &data);
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    cfg.engine.max_active_sequences = 64;
    if let Some(k) = args.decode_kernel {
        cfg.decode_kernel = k;
    }
    if let Some(d) = args.kv_cache_dtype {
        cfg.engine.kv_cache_dtype = d;
    }
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let model = srv.engine().expect("ready").model().clone();
    let client = graft_tests::connect_as(srv.grpc_addr, graft_tests::TENANT).await;
    println!(
        "machine: {} cores; model: {}; decode kernel: {:?}; KV cache: {:?}",
        std::thread::available_parallelism()?.get(),
        args.model.display(),
        model.llama.decode_kernel(),
        args.kv_cache_dtype.unwrap_or_default()
    );

    // Single-stream decode: rate after the first token.
    let req =
        GenerateOptions::greedy(args.decode_tokens).prompt("Count from 1 to 1000: 1, 2, 3, 4,");
    client.generate(req.clone()).await?; // warm
    let r = client.generate(req).await?;
    let t = r.timings.unwrap_or_default();
    let n = r.usage.unwrap_or_default().completion_tokens as f64;
    let single = (n - 1.0) / (t.total_seconds - t.time_to_first_token_seconds);
    println!("single-stream decode: {single:.1} tokens/s ({n} tokens)");
    result(
        "graft_single_stream",
        json!({ "new_tokens": n, "tok_s": single }),
    );

    // Prefill: one token out of a long prompt; the time to first token is the prefill.
    for &len in &args.prefill_tokens {
        let p = prompt_of(&model, len);
        let r = client
            .generate(GenerateOptions::greedy(1).prompt(p))
            .await?;
        let u = r.usage.unwrap_or_default();
        let t = r.timings.unwrap_or_default();
        let tps = u.prompt_tokens as f64 / t.time_to_first_token_seconds;
        println!(
            "prefill: {tps:.1} tokens/s ({} prompt tokens in {:.3}s)",
            u.prompt_tokens, t.time_to_first_token_seconds
        );
        result(
            "graft_prefill",
            json!({ "prompt_len": len, "prompt_tokens": u.prompt_tokens, "tok_s": tps }),
        );
    }

    // The text after each stream's "Story number i: ", made once, before any timing.
    let filler = match args.stream_prompt_tokens {
        Some(n) => prompt_of(&model, n.saturating_sub(6)),
        None => "Once upon a time".to_string(),
    };
    for &streams in &args.streams {
        // Every stream's tokens, timed as they arrive.
        let start = Instant::now();
        let results = join_all((0..streams).map(|i| {
            let c = client.clone();
            let text = format!("Story number {i}: {filler}");
            let req = GenerateOptions {
                max_new_tokens: Some(args.decode_tokens),
                temperature: Some(0.7),
                seed: Some(i as u64),
                ..Default::default()
            }
            .prompt(text);
            async move {
                let mut s = c.generate_stream(req).await?;
                let mut at = Vec::new();
                while let Some(m) = s.message().await? {
                    let now = Instant::now();
                    at.extend(std::iter::repeat_n(now, m.token_ids.len()));
                }
                Ok::<_, tonic::Status>(at)
            }
        }))
        .await;
        let mut arrivals = Vec::new();
        for r in results {
            arrivals.push(r?);
        }
        anyhow::ensure!(
            arrivals.iter().all(|a| !a.is_empty()),
            "a stream produced no token"
        );
        let end = arrivals
            .iter()
            .filter_map(|a| a.last())
            .max()
            .copied()
            .unwrap_or(start);
        let tokens: usize = arrivals.iter().map(Vec::len).sum();
        let wall = (end - start).as_secs_f64();
        let mut ttft: Vec<f64> = arrivals
            .iter()
            .map(|a| (a[0] - start).as_secs_f64())
            .collect();
        // The decode phase, as llama-batched-bench's S_TG counts it: from the moment every
        // stream has its first token (every prompt prefilled) to the last token, and the
        // tokens that arrived in between.
        let t0 = arrivals.iter().map(|a| a[0]).max().unwrap_or(start);
        let tg_tokens = arrivals.iter().flatten().filter(|&&t| t > t0).count();
        let tg = tg_tokens as f64 / (end - t0).as_secs_f64().max(1e-9);
        // The streams start decoding as their prompts are prefilled, so the first ones also
        // finish first, and the decode phase ends with fewer rows than `streams`. The
        // window in which every stream decodes (every one has its first token, none has its
        // last) is the state llama-batched-bench's S_TG measures: all rows every step.
        let t1 = arrivals.iter().filter_map(|a| a.last()).min().copied();
        let (all_tokens, all) = match t1 {
            Some(t1) if t1 > t0 => {
                let n = arrivals
                    .iter()
                    .flatten()
                    .filter(|&&t| t > t0 && t <= t1)
                    .count();
                (n, n as f64 / (t1 - t0).as_secs_f64())
            }
            _ => (0, 0.0),
        };
        let (p50, p99) = (pct(&mut ttft, 0.5), pct(&mut ttft, 0.99));
        println!(
            "{streams:>2} streams: aggregate {:.1} tokens/s (prompts included); decode phase {tg:.1} tokens/s ({tg_tokens} tokens after every stream's first); every stream decoding {all:.1} tokens/s ({all_tokens} tokens); TTFT p50 {p50:.3}s p99 {p99:.3}s (client-side)",
            tokens as f64 / wall,
        );
        result(
            "graft_streams",
            json!({ "streams": streams, "new_tokens": args.decode_tokens,
                "prompt_tokens": args.stream_prompt_tokens, "tok_s": tokens as f64 / wall,
                "tg_tok_s": tg, "all_decoding_tok_s": all, "ttft_p50_s": p50 }),
        );
    }
    println!("peak resident memory: {:.0} MiB", peak_rss_mib());
    result("graft_memory", json!({ "peak_rss_mib": peak_rss_mib() }));
    srv.drain().await?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
