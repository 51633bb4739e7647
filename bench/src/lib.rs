//! Helpers the benchmark binaries share: percentiles, the process's resident memory, N
//! concurrent generation streams over gRPC, and the trainer's throughput run.

use std::time::Instant;

use futures::future::join_all;
use graft_client::{GenerateOptions, GraftClient};
use graft_server::{
    model::{BaseModel, Module},
    train::{
        dataset::Tokenized,
        methods::MethodSpec,
        trainer::{self, Control, TrainEvent, TrainSpec},
    },
};

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

/// The trainer benchmark's run: `method` (LoRA: rank 8, alpha 16, all seven modules) on
/// four 128-token examples, batch 4, `steps` steps, forward + backward + AdamW.
pub fn trainer_spec(steps: usize, method: MethodSpec) -> TrainSpec {
    TrainSpec {
        method,
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: Module::ALL.map(|m| m.hf_name().to_string()).to_vec(),
        use_rslora: false,
        use_dora: false,
        epochs: steps,
        batch_size: 4,
        grad_accum: 1,
        learning_rate: 1e-4,
        schedule: graft_server::train::optim::Schedule::Constant,
        warmup_steps: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_seq_len: 128,
        seed: 1,
        eval_every: 0,
        patience: 0,
        checkpoint_every: 1_000_000,
        objective: Default::default(),
        train_lm_head: false,
    }
}

/// Training tokens/s of [`trainer_spec`] on `model` (its own device), on the calling
/// thread's pool; the first step (warm-up: allocations, a GPU's kernels) not counted.
pub fn trainer_rate(model: &BaseModel, steps: usize, method: MethodSpec) -> anyhow::Result<f64> {
    let ex: Vec<Tokenized> = (0..4)
        .map(|i| Tokenized {
            ids: (0..128)
                .map(|j| 100 + ((i * 131 + j * 7) % 20000) as u32)
                .collect(),
            mask: (0..128).map(|j| j > 0).collect(),
            label: None,
            rejected: None,
            fields: None,
        })
        .collect();
    let dir = tempfile::tempdir()?;
    let mut times = Vec::new();
    let mut last = Instant::now();
    trainer::train(
        model,
        &trainer_spec(steps, method),
        &ex,
        &[],
        dir.path(),
        &Control::default(),
        &mut |e| {
            if let TrainEvent::Step { .. } = e {
                times.push(last.elapsed().as_secs_f64());
                last = Instant::now();
            }
        },
    )?;
    anyhow::ensure!(
        times.len() >= 2,
        "{} steps: nothing timed after the first",
        times.len()
    );
    let t: f64 = times[1..].iter().sum();
    Ok(512.0 * (times.len() - 1) as f64 / t)
}

/// Each row's most likely token of `logits: (rows, vocab)`, as the next one-token chunk of
/// that row's sequence (greedy decoding, for the in-process loops).
pub fn greedy_next(logits: &candle_core::Tensor) -> anyhow::Result<Vec<Vec<u32>>> {
    Ok(logits
        .to_vec2::<f32>()?
        .iter()
        .map(|row| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |x| x.0 as u32);
            vec![best]
        })
        .collect())
}
