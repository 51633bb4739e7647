//! Single-stream decode in a loop, for profilers (`perf record`): no server, no gRPC.

use candle_core::Device;
use graft_server::model::{packed::DecodeKernel, BaseModel, SeqChunk};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let mut m = BaseModel::load(std::path::Path::new(&path), &Device::Cpu)?;
    // The decode kernel: "exact" (default) or "int16".
    let kernel: DecodeKernel = std::env::args()
        .nth(2)
        .as_deref()
        .unwrap_or("exact")
        .parse()
        .map_err(anyhow::Error::msg)?;
    m.llama.set_decode_kernel(kernel);
    let prompt = m.tokenizer.encode("Count from 1 to 1000: 1, 2, 3, 4,")?;
    let mut pool = m.llama.kv_pool(8192);
    let mut cache = graft_server::model::KvCache::new();
    let mut next = prompt.clone();
    let t = std::time::Instant::now();
    let n = 200;
    for i in 0..n {
        let l = m.llama.forward_batch(
            &mut pool,
            &mut [SeqChunk {
                tokens: &next,
                cache: &mut cache,
                want_logits: true,
                decode: i > 0,
                adapter: None,
            }],
        )?;
        let row: Vec<f32> = l.squeeze(0)?.to_vec1()?;
        let best = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|x| x.0 as u32)
            .unwrap_or(0);
        next = vec![best];
    }
    println!(
        "{kernel:?}: {:.1} tokens/s",
        n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}
