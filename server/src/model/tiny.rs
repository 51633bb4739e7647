//! A tiny random-weight Llama written as a real GGUF file, for fast tests and benchmarks of
//! everything around the model (the engine, the API) without the 135M-parameter download.
//! It goes through the same loader as the real model; only its size and weights differ.

use std::path::Path;

use candle_core::{
    quantized::{gguf_file, GgmlDType, QTensor},
    Device, Tensor,
};

use super::ModelError;

/// Shape of the tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            ffn: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context: 512,
            seed: 7,
        }
    }
}

/// Special tokens of the tiny vocabulary, in id order.
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte -> printable character map (byte-level BPE).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap_or(' ');
    }
    out
}

/// Writes a tiny model (byte-level vocabulary: 3 specials + 256 bytes + a few merges,
/// ChatML template) to `path`.
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> Result<(), ModelError> {
    use gguf_file::Value as V;
    let chars = byte_chars();
    let mut tokens: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(chars.iter().map(|c| c.to_string()));
    // A handful of merges so BPE does real work: "th", "he", "in", "Ġt".
    let merges = ["t h", "h e", "i n", "Ġ t"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![V::I32(3); TINY_SPECIALS.len()];
    types.extend(std::iter::repeat_n(
        V::I32(1),
        tokens.len() - TINY_SPECIALS.len(),
    ));
    let vocab = tokens.len();

    let dev = Device::Cpu;
    let mut rng_state = spec.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut randn = |shape: &[usize], std: f32| -> Result<Tensor, ModelError> {
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            // xorshift; a sum of 4 uniforms is close enough to a normal for test weights.
            let mut s = 0f32;
            for _ in 0..4 {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                s += (rng_state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            v.push(s * std * 1.7);
        }
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let (h, f, kv) = (
        spec.hidden,
        spec.ffn,
        spec.hidden / spec.heads * spec.kv_heads,
    );
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut push = |name: String, t: Tensor, q: GgmlDType| -> Result<(), ModelError> {
        tensors.push((name, QTensor::quantize(&t, q)?));
        Ok(())
    };
    push(
        "token_embd.weight".into(),
        randn(&[vocab, h], 0.5)?,
        GgmlDType::F32,
    )?;
    let ones = Tensor::ones(h, candle_core::DType::F32, &dev)?;
    for i in 0..spec.layers {
        let p = |s: &str| format!("blk.{i}.{s}.weight");
        // Alternate tensor types so every loader path runs: F32, F16, Q8_0, Q4_0, Q4_1.
        let q = [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::F16,
        ][i % 4];
        push(p("attn_norm"), ones.clone(), GgmlDType::F32)?;
        push(p("attn_q"), randn(&[h, h], 0.2)?, q)?;
        push(p("attn_k"), randn(&[kv, h], 0.2)?, q)?;
        push(p("attn_v"), randn(&[kv, h], 0.2)?, q)?;
        push(p("attn_output"), randn(&[h, h], 0.2)?, q)?;
        push(p("ffn_norm"), ones.clone(), GgmlDType::F32)?;
        push(p("ffn_gate"), randn(&[f, h], 0.2)?, q)?;
        push(p("ffn_up"), randn(&[f, h], 0.2)?, q)?;
        push(p("ffn_down"), randn(&[h, f], 0.2)?, GgmlDType::F32)?;
    }
    push("output_norm.weight".into(), ones, GgmlDType::F32)?;

    let s = |x: &str| V::String(x.to_string());
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("graft-tiny")),
        ("llama.block_count", V::U32(spec.layers as u32)),
        ("llama.context_length", V::U32(spec.context as u32)),
        ("llama.embedding_length", V::U32(h as u32)),
        ("llama.feed_forward_length", V::U32(f as u32)),
        ("llama.attention.head_count", V::U32(spec.heads as u32)),
        (
            "llama.attention.head_count_kv",
            V::U32(spec.kv_heads as u32),
        ),
        ("llama.rope.freq_base", V::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            V::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type", V::Array(types)),
        (
            "tokenizer.ggml.merges",
            V::Array(merges.iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
        ("tokenizer.chat_template", s(super::chat::CHATML_TEMPLATE)),
    ];
    let tmp = path.with_extension("gguf.tmp");
    let mut file = std::fs::File::create(&tmp)
        .map_err(|e| ModelError::Io(format!("{}: {e}", tmp.display())))?;
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    file.sync_all()
        .map_err(|e| ModelError::Io(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
    Ok(())
}
