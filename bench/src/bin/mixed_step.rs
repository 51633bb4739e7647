//! 32 streams decoding bare and each with its own random rank-16 LoRA on all seven
//! modules, in rounds that alternate, in process (no server, no gRPC): the mixed-adapter
//! ratio of the model's step alone (`adapters --parts mixed` measures it through the
//! server), for A/B comparisons and profilers; the median of the rounds' ratios.
//! `mixed_step [model.gguf] [f32|bf16|f16|int8] [rounds] [streams] [bare|adapters|lora|prompts]`:
//! the last argument runs only that kind of round (no ratio), for a profile of one side;
//! `lora` times a decode step's low-rank updates alone (every layer's modules, random
//! inputs, a row a stream), `prompts` a prefill's (32 rows a stream, each run of rows on
//! one adapter). Each bare or adapters round also prints its prompts' prefill (the
//! first step, every stream's prompt), which its tokens a second leave out.

use candle_core::Device;
use graft_server::{
    adapters::testing::random_lora,
    model::{
        adapter::low_rank_rows, kv_cache::blocks_for, lora::LoraDtype, Adapter, BaseModel, KvCache,
        KvPool, Module, SeqChunk,
    },
};

const STEPS: usize = 64;
/// Rows a stream in `prompts` rounds: a prompt's tokens.
const PROMPT: usize = 32;

fn main() -> anyhow::Result<()> {
    // The server's process settings (allocator, candle's workers), as graftd runs.
    graft_server::process::run_main(async { run() })?
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let m = BaseModel::load(std::path::Path::new(&path), &Device::Cpu)?;
    let dtype: LoraDtype = args
        .next()
        .unwrap_or("f32".into())
        .parse()
        .map_err(anyhow::Error::msg)?;
    let rounds: usize = args.next().unwrap_or("5".into()).parse()?;
    let streams: usize = args.next().unwrap_or("32".into()).parse()?;
    let only = args.next();
    if let Some(o) = only
        .as_deref()
        .filter(|o| !matches!(*o, "bare" | "adapters" | "lora" | "prompts"))
    {
        anyhow::bail!("{o:?}: expected bare, adapters, lora or prompts");
    }
    let mut converting = std::time::Duration::ZERO;
    let adapters = (0..streams)
        .map(|i| {
            let mut a = random_lora(&m, i as u64 + 1, 16, 0.02);
            let t = std::time::Instant::now();
            a.set_lora_dtype(dtype).map_err(anyhow::Error::msg)?;
            converting += t.elapsed();
            Ok(a)
        })
        .collect::<anyhow::Result<Vec<Adapter>>>()?;
    println!(
        "an adapter to {}: {:.2} ms",
        dtype.name(),
        converting.as_secs_f64() * 1e3 / streams as f64
    );
    let prompt = m.tokenizer.encode("Count from 1 to 1000: 1, 2, 3, 4,")?;
    // Tokens a second over STEPS decode steps of every stream, after its prompt, and the
    // prompts' prefill (one step) in ms.
    let rate = |with: bool| -> anyhow::Result<(f64, f64)> {
        let mut pool = KvPool::new(m.llama.kv_shape(), blocks_for(128 * streams))?;
        let mut caches: Vec<KvCache> = (0..streams).map(|_| KvCache::new()).collect();
        let mut next = vec![prompt.clone(); streams];
        let mut t = std::time::Instant::now();
        let mut prefill = 0.0;
        for i in 0..=STEPS {
            if i == 1 {
                prefill = t.elapsed().as_secs_f64() * 1e3;
                t = std::time::Instant::now();
            }
            let mut chunks: Vec<SeqChunk> = caches
                .iter_mut()
                .zip(&next)
                .zip(&adapters)
                .map(|((cache, tokens), a)| SeqChunk {
                    tokens,
                    cache,
                    want_logits: true,
                    decode: i > 0,
                    adapter: with.then_some(a),
                })
                .collect();
            let l = m.llama.forward_batch(&mut pool, &mut chunks)?;
            next = graft_bench::greedy_next(&l)?;
        }
        Ok((
            (STEPS * streams) as f64 / t.elapsed().as_secs_f64(),
            prefill,
        ))
    };
    if let Some(mode @ ("lora" | "prompts")) = only.as_deref() {
        // A decode step's rows, one a stream; or its prompts', PROMPT rows a stream.
        let per = if mode == "lora" { 1 } else { PROMPT };
        let rows: Vec<Option<&Adapter>> = adapters
            .iter()
            .flat_map(|a| std::iter::repeat_n(Some(a), per))
            .collect();
        let (n, iters) = (rows.len(), (STEPS / per).max(1));
        let cfg = &m.llama.cfg;
        let x: Vec<f32> = (0..n * cfg.intermediate_size.max(cfg.hidden_size))
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect();
        for r in 0..rounds {
            let t = std::time::Instant::now();
            // On a worker of the pool, as the model's step runs (`Llama`'s `on_worker`): each
            // call's parallel work then forks from that worker, not injected from outside.
            rayon::scope(|_| {
                for _ in 0..iters {
                    for li in 0..cfg.num_layers {
                        // The modules grouped by input, as the model's step groups them.
                        for group in [
                            &[Module::Q, Module::K, Module::V][..],
                            &[Module::O],
                            &[Module::Gate, Module::Up],
                            &[Module::Down],
                        ] {
                            let mods: Vec<(Module, &[f32], usize)> = group
                                .iter()
                                .map(|&md| {
                                    let (out, inp) = md.shape(cfg);
                                    (md, &x[..n * inp], out)
                                })
                                .collect();
                            std::hint::black_box(low_rank_rows(&rows, li, &mods));
                        }
                    }
                }
            });
            let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
            println!("round {r}: the {n} rows' low-rank updates {ms:.2} ms a step");
        }
        return Ok(());
    }
    // A first round warms the caches and the allocator; it is not counted.
    rate(false)?;
    if let Some(o) = only {
        for r in 0..rounds {
            let (tps, prefill) = rate(o == "adapters")?;
            println!("round {r}: {o} {tps:.1} tok/s, prefill {prefill:.1} ms");
        }
        return Ok(());
    }
    let mut ratios = Vec::new();
    for r in 0..rounds {
        let ((bare, bare_prefill), (with, with_prefill)) = (rate(false)?, rate(true)?);
        ratios.push(with / bare);
        println!(
            "round {r}: bare {bare:.1} tok/s, {} adapters {with:.1} tok/s, ratio {:.3}; \
             prefill {bare_prefill:.1} ms bare, {with_prefill:.1} ms with adapters",
            dtype.name(),
            with / bare
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "{} pairs, {streams} streams: median ratio {:.3}",
        dtype.name(),
        ratios[ratios.len() / 2]
    );
    Ok(())
}
