//! Decode in a loop, for profilers (`perf record`): no server, no gRPC.
//! `decode_profile [model.gguf] [exact|int16] [streams] [f32|f16] [prompt tokens]`:
//! `streams` sequences (1 by default) decode together, one token each per step, over a KV
//! cache of the given dtype (f32 by default), after a prompt of the given length (a short
//! one by default).

use candle_core::Device;
use graft_server::model::{
    kv_cache::blocks_for, packed::DecodeKernel, BaseModel, KvCache, KvDtype, KvPool, SeqChunk,
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let mut m = BaseModel::load(std::path::Path::new(&path), &Device::Cpu)?;
    let kernel: DecodeKernel = next_or(&mut args, "exact")?;
    let streams: usize = next_or(&mut args, "1")?;
    let dtype: KvDtype = next_or(&mut args, "f32")?;
    let prompt_tokens: Option<usize> = args.next().map(|n| n.parse()).transpose()?;
    m.llama.set_decode_kernel(kernel);
    let text = "Count from 1 to 1000: 1, 2, 3, 4,";
    let prompt = match prompt_tokens {
        None => m.tokenizer.encode(text)?,
        Some(n) => {
            let ids = m.tokenizer.encode(&text.repeat(n / 8 + 1))?;
            ids[..n.min(ids.len())].to_vec()
        }
    };
    let mut pool = KvPool::new(
        m.llama.kv_shape().with_dtype(dtype),
        blocks_for(8192 * streams),
    )?;
    let prompt_len = prompt.len();
    let mut caches: Vec<KvCache> = (0..streams).map(|_| KvCache::new()).collect();
    let mut next = vec![prompt; streams];
    let n = if streams == 1 { 200 } else { 64 };
    let mut t = std::time::Instant::now();
    for i in 0..=n {
        if i == 1 {
            // Timed from the first decode step: the prompts' prefill is not decode.
            t = std::time::Instant::now();
        }
        let mut chunks: Vec<SeqChunk> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, tokens)| SeqChunk {
                tokens,
                cache,
                want_logits: true,
                decode: i > 0,
                adapter: None,
            })
            .collect();
        let l = m.llama.forward_batch(&mut pool, &mut chunks)?;
        next = graft_bench::greedy_next(&l)?;
    }
    println!(
        "{kernel:?}, {dtype:?} KV, {streams} stream(s) after {} prompt tokens: {:.1} tokens/s",
        prompt_len,
        (n * streams) as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The next argument (or `default` where there is none), parsed.
fn next_or<T>(args: &mut impl Iterator<Item = String>, default: &str) -> anyhow::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let arg = args.next();
    let arg = arg.as_deref().unwrap_or(default);
    arg.parse()
        .map_err(|e| anyhow::anyhow!("argument {arg:?}: {e}"))
}
