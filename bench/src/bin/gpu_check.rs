//! graft-gpu-check: the model on one device (`--device cuda:0` in a `cuda` build; `cpu`
//! for the dry run), checked and measured on the model directly (and with `--server`, the
//! whole server over gRPC), for `bench/gpu/check.py`, which runs PyTorch on the same random
//! weights beside it and compares (issue 15).
//!
//! Writes one JSON file (`--out`):
//! - `cases`: per prompt (token ids from `--prompts`), base and with the PEFT LoRA of
//!   `--lora`: the serving path's logits at the last prompt position and 32 greedy tokens;
//! - `batch_invariance`: prompt 0 decoded alone and as one of 32 sequences stepping
//!   together: the largest logit difference over 8 steps, and whether every bit agreed;
//! - `server` (`--server`): seconds until the in-process server said SERVING on the device,
//!   and one greedy generation over gRPC;
//! - `perf`: single-stream decode, aggregate decode at 32 and 256 streams, prefill of 512
//!   tokens, 32 streams with 32 distinct rank-16 LoRAs against the same streams bare, and
//!   LoRA SFT (rank 8, 7 modules, batch 4 x 128) in tokens/s.

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use graft_server::{
    adapters::{
        formats::{self, ImportPolicy},
        testing::random_lora,
    },
    engine::sampler::argmax,
    model::{Adapter, BaseModel, DeviceSpec, KvCache, KvPool, SeqChunk},
    train::methods::MethodSpec,
};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Check and measure graft's model on one device (bench/gpu/check.py runs it)")]
struct Args {
    /// An HF model directory (config.json, *.safetensors, tokenizer.json) or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// JSON `{"prompts": [[token ids], ...]}`.
    #[arg(long, required_unless_present = "write_meta")]
    prompts: Option<PathBuf>,
    /// A PEFT LoRA directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    lora: Option<PathBuf>,
    #[arg(long, required_unless_present = "write_meta")]
    out: Option<PathBuf>,
    /// Only write `--model`'s config.json, tokenizer.json and tokenizer_config.json into
    /// this directory (the kit check.py carries to the GPU machine), then stop.
    #[arg(long)]
    write_meta: Option<PathBuf>,
    /// Greedy tokens per case.
    #[arg(long, default_value_t = 32)]
    greedy: usize,
    /// Smaller measurements (the CPU dry run): streams 4 and 8, prefill 64, 2 training steps.
    #[arg(long)]
    quick: bool,
    /// Skip the measurements (correctness only).
    #[arg(long)]
    no_perf: bool,
    /// Also start the whole server in-process on the device (graftd's `server::start`, as
    /// `graftd --device` does) and generate over gRPC once it reports SERVING.
    #[arg(long)]
    server: bool,
}

/// graftd's server on `device`: seconds until health said SERVING (model placed and one
/// warm-up step run), then one greedy generation over gRPC.
fn check_server(model: &std::path::Path, device: DeviceSpec) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let data = tempfile::tempdir()?;
        let mut cfg = graft_server::config::ServerConfig::for_model(model, data.path());
        cfg.device = device;
        cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
        let t = Instant::now();
        let srv = graft_server::server::start(cfg).await?;
        srv.ready().await?;
        let ready_s = t.elapsed().as_secs_f64();
        let client = graft_tests::connect_as(srv.grpc_addr, graft_tests::TENANT).await;
        let r = client
            .generate(graft_client::GenerateOptions::greedy(16).prompt("The capital of France is"))
            .await?;
        let tokens = r.usage.unwrap_or_default().completion_tokens;
        srv.drain().await?;
        eprintln!("server on {device}: SERVING after {ready_s:.1}s; generated {tokens} tokens");
        Ok(json!({ "serving_after_s": ready_s, "generated_tokens": tokens, "text": r.text }))
    })
}

/// Runs `prompts` (one per sequence, each with its adapter) through prefill and then `steps`
/// greedy decode steps, all sequences in every step. Returns each step's logits per
/// sequence (step 0: the prefill's last position) and the seconds the decode steps took.
fn run(
    m: &BaseModel,
    pool: &mut KvPool,
    prompts: &[Vec<u32>],
    adapters: &[Option<&Adapter>],
    steps: usize,
) -> anyhow::Result<(Vec<Vec<Vec<f32>>>, f64)> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = Vec::new();
    let mut decode_secs = 0.0;
    for step in 0..=steps {
        let t = Instant::now();
        let mut chunks: Vec<SeqChunk<'_>> = caches
            .iter_mut()
            .zip(&next)
            .zip(adapters)
            .map(|((cache, tokens), a)| SeqChunk {
                tokens,
                cache,
                want_logits: true,
                decode: step > 0,
                adapter: *a,
            })
            .collect();
        let logits = m.llama.forward_step(pool, &mut chunks)?;
        drop(chunks);
        if step > 0 {
            decode_secs += t.elapsed().as_secs_f64();
        }
        next = logits.iter().map(|l| vec![argmax(l)]).collect();
        out.push(logits);
    }
    for c in &mut caches {
        pool.release(c);
    }
    Ok((out, decode_secs))
}

/// Aggregate decode tokens/s of `n` sequences of a 16-token prompt, 64 new tokens each.
fn streams_rate(
    m: &BaseModel,
    pool: &mut KvPool,
    n: usize,
    adapters: &[Option<&Adapter>],
    steps: usize,
) -> anyhow::Result<f64> {
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            (0..16)
                .map(|j| 200 + ((i * 37 + j * 11) % 5000) as u32)
                .collect()
        })
        .collect();
    let (_, secs) = run(m, pool, &prompts, adapters, steps)?;
    Ok((n * steps) as f64 / secs)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dev = args.device.open()?;
    let t0 = Instant::now();
    let m = BaseModel::load(&args.model, &dev)?;
    let load_s = t0.elapsed().as_secs_f64();
    eprintln!("loaded {} on {} in {load_s:.1}s", m.name, args.device);
    if let Some(dir) = &args.write_meta {
        std::fs::create_dir_all(dir)?;
        graft_server::model::save::write_hf_meta(&m, m.llama.weights.tied(), dir)?;
        return Ok(());
    }
    let (Some(prompts), Some(out)) = (&args.prompts, &args.out) else {
        anyhow::bail!("--prompts and --out are needed");
    };
    let prompts: Value = serde_json::from_slice(&std::fs::read(prompts)?)?;
    let prompts: Vec<Vec<u32>> = serde_json::from_value(prompts["prompts"].clone())?;
    let lora = match &args.lora {
        Some(d) => {
            let policy = ImportPolicy {
                max_rank: 256,
                force: true,
                base_aliases: vec![],
                max_virtual_tokens: 128,
            };
            let p = formats::parse(
                &std::fs::read(d.join("adapter_config.json"))?,
                &std::fs::read(d.join("adapter_model.safetensors"))?,
                m.config(),
                &m.name,
                &policy,
            )?;
            Some(p.adapter)
        }
        None => None,
    };
    let mut pool = m.llama.kv_pool(40_000).expect("KV pool");

    // Correctness: each case alone through the serving path.
    let mut cases = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for (name, a) in [("base", None), ("lora", lora.as_ref())] {
            if name == "lora" && a.is_none() {
                continue;
            }
            let (steps, _) = run(&m, &mut pool, std::slice::from_ref(p), &[a], args.greedy)?;
            let greedy: Vec<u32> = steps[..args.greedy].iter().map(|s| argmax(&s[0])).collect();
            cases.push(json!({
                "prompt": i, "adapter": name, "logits": steps[0][0], "greedy": greedy,
            }));
        }
    }

    // Batch invariance: prompt 0 alone, then as the first of 32 sequences.
    let (solo, _) = run(&m, &mut pool, &prompts[..1], &[None], 8)?;
    let many: Vec<Vec<u32>> = (0..32)
        .map(|i| {
            if i == 0 {
                prompts[0].clone()
            } else {
                (0..8 + i)
                    .map(|j| 300 + ((i * 53 + j * 17) % 9000) as u32)
                    .collect()
            }
        })
        .collect();
    let (batched, _) = run(&m, &mut pool, &many, &[None; 32], 8)?;
    let (mut worst, mut same_bits) = (0f32, true);
    for (s, b) in solo.iter().zip(&batched) {
        for (x, y) in s[0].iter().zip(&b[0]) {
            worst = worst.max((x - y).abs());
            same_bits &= x.to_bits() == y.to_bits();
        }
    }
    eprintln!("batch invariance: largest difference {worst}, bit for bit: {same_bits}");
    let mut report = json!({
        "device": args.device.to_string(),
        "model": m.name,
        "load_s": load_s,
        "cases": cases,
        "batch_invariance": { "max_abs_diff": worst, "bit_for_bit": same_bits, "steps": 8, "batch": 32 },
    });

    // Written after every section, so a failure later leaves what was measured before it;
    // a section's or a figure's error is recorded in its place.
    let save = |r: &Value| std::fs::write(out, serde_json::to_vec_pretty(r).expect("JSON"));
    save(&report)?;
    if args.server {
        report["server"] = check_server(&args.model, args.device)
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        save(&report)?;
    }
    if !args.no_perf {
        let (big, prefill_len, train_steps, decode) = if args.quick {
            (8, 64, 2, 8)
        } else {
            (256, 512, 6, 64)
        };
        let small = if args.quick { 4 } else { 32 };
        let single_steps = if args.quick { 8 } else { 128 };
        let bare = vec![None; big];
        let loras: Vec<Adapter> = (0..small)
            .map(|i| random_lora(&m, 1000 + i as u64, 16, 0.02))
            .collect();
        let with: Vec<Option<&Adapter>> = loras.iter().map(Some).collect();
        let long: Vec<u32> = (0..prefill_len)
            .map(|j| 100 + ((j * 29) % 30000) as u32)
            .collect();
        report["perf"] = json!({
            "mixed_lora_streams": small, "prefill_tokens": prefill_len,
            "streams": {},
        });
        let figure = |r: anyhow::Result<f64>| match r {
            Ok(v) => json!(v),
            Err(e) => json!({ "error": format!("{e:#}") }),
        };
        report["perf"]["single_stream_decode_tok_s"] =
            figure(streams_rate(&m, &mut pool, 1, &bare[..1], single_steps));
        report["perf"]["streams"][small.to_string()] =
            figure(streams_rate(&m, &mut pool, small, &bare[..small], decode));
        report["perf"]["streams"][big.to_string()] =
            figure(streams_rate(&m, &mut pool, big, &bare, decode));
        report["perf"]["mixed_lora_tok_s"] =
            figure(streams_rate(&m, &mut pool, small, &with, decode));
        if let (Some(x), Some(y)) = (
            report["perf"]["mixed_lora_tok_s"].as_f64(),
            report["perf"]["streams"][small.to_string()].as_f64(),
        ) {
            report["perf"]["mixed_over_bare"] = json!(x / y);
        }
        save(&report)?;
        report["perf"]["prefill_tok_s"] = figure((|| {
            run(&m, &mut pool, std::slice::from_ref(&long), &[None], 0)?; // warm
            let t = Instant::now();
            run(&m, &mut pool, std::slice::from_ref(&long), &[None], 0)?;
            Ok(prefill_len as f64 / t.elapsed().as_secs_f64())
        })());
        save(&report)?;
        report["perf"]["lora_sft_tok_s"] =
            figure(graft_bench::trainer_rate(&m, train_steps, MethodSpec::Lora));
        eprintln!("{}", report["perf"]);
        save(&report)?;
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}
