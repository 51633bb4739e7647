//! Helpers the benchmark binaries share: percentiles, the process's resident memory, and N
//! concurrent generation streams over gRPC.

use std::time::Instant;

use futures::future::join_all;
use graft_client::{GenerateOptions, GraftClient};

/// The `p` quantile (0..=1) of `v` (sorted in place); NaN for no samples.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One machine-readable figure line, `RESULT {"bench": name, ...fields}`, beside the prose
/// lines: what `bench/peers/side_by_side.py` (`make bench-peers`) reads, in the peers' scripts' format.
pub fn result(bench: &str, fields: serde_json::Value) {
    let mut v = serde_json::json!({ "bench": bench });
    if let (Some(o), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    println!("RESULT {v}");
}

/// This process's resident set, MiB (NaN where /proc is unavailable).
pub fn rss_mib() -> f64 {
    status_kib("VmRSS:").map_or(f64::NAN, |kb| kb / 1024.0)
}

/// This process's peak resident set so far, MiB (NaN where /proc is unavailable).
pub fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:").map_or(f64::NAN, |kb| kb / 1024.0)
}

fn status_kib(field: &str) -> Option<f64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
}

/// One sampled stream per entry of `adapters` (the base model for `None`), `tokens` new
/// tokens each, all at once; the aggregate generated tokens per second.
pub async fn run_streams(
    client: &GraftClient,
    adapters: &[Option<String>],
    tokens: u32,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let results = join_all(adapters.iter().enumerate().map(|(i, a)| {
        let c = client.clone();
        let req = GenerateOptions {
            adapter: a.clone(),
            max_new_tokens: Some(tokens),
            temperature: Some(0.7),
            seed: Some(i as u64),
            ..Default::default()
        }
        .prompt(format!("Story number {i}: Once upon a time"));
        async move { c.generate(req).await }
    }))
    .await;
    let mut n = 0.0;
    for r in results {
        n += r?.usage.unwrap_or_default().completion_tokens as f64;
    }
    Ok(n / start.elapsed().as_secs_f64())
}
