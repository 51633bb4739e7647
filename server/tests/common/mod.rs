//! Helpers shared by the model-level test binaries: paths, the real model (loaded once per
//! binary), fixture readers and small logit utilities.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use candle_core::Device;
use graft_server::{
    model::{
        adapter::TensorAdapter,
        tiny::{write_tiny_gguf, TinySpec},
        Adapter, BaseModel, ChatMessage, KvCache, KvPool, SeqChunk,
    },
    train::dataset::{parse_jsonl, tokenize, Overflow, Tokenized},
};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The fixtures copied into the repository (`tests/fixtures/`, see its README).
pub fn fixtures() -> PathBuf {
    std::env::var_os("GRAFT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/fixtures"))
}

/// The real SmolLM2 (`make model`), loaded once per test binary.
pub fn model() -> Arc<BaseModel> {
    static M: OnceLock<Arc<BaseModel>> = OnceLock::new();
    M.get_or_init(|| {
        let path = std::env::var_os("GRAFT_TEST_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
        Arc::new(
            BaseModel::load(&path, &Device::Cpu)
                .unwrap_or_else(|e| panic!("load {} (run `make model`): {e}", path.display())),
        )
    })
    .clone()
}

pub fn json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = x.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
    x.iter().map(|v| v - lse).collect()
}

pub fn top_k(x: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    idx.sort_by(|a, b| x[*b as usize].total_cmp(&x[*a as usize]));
    idx.truncate(k);
    idx
}

/// A fresh block table seeded with the adapter's KV prefix, as the engine admits a
/// sequence.
pub fn seeded(pool: &mut KvPool, a: Option<&Adapter>) -> KvCache {
    let mut cache = KvCache::new();
    if let Some(p) = a.and_then(|a| a.prefix.as_deref()) {
        pool.grow(&mut cache, p.len).expect("room");
        pool.seed_prefix(&mut cache, p);
    }
    cache
}

/// Greedy decoding through the serving path with adapter `a` (if any); returns the logits
/// at the last prompt position and the `n` tokens.
pub fn greedy(
    m: &BaseModel,
    a: Option<&Adapter>,
    prompt: &[u32],
    n: usize,
) -> (Vec<f32>, Vec<u32>) {
    let mut pool = m.llama.kv_pool(8192);
    let mut cache = seeded(&mut pool, a);
    let mut next = prompt.to_vec();
    let (mut first, mut out) = (None, Vec::new());
    for _ in 0..n {
        let l = m
            .llama
            .forward_batch(
                &mut pool,
                &mut [SeqChunk {
                    tokens: &next,
                    cache: &mut cache,
                    want_logits: true,
                    decode: !out.is_empty(),
                    adapter: a,
                }],
            )
            .expect("forward");
        let row: Vec<f32> = l.squeeze(0).expect("row").to_vec1().expect("vec");
        let t = top_k(&row, 1)[0];
        first.get_or_insert(row);
        out.push(t);
        next = vec![t];
    }
    (first.expect("logits"), out)
}

/// The tiny random-weight model (`TinySpec::default()`), written and loaded once per binary.
pub fn tiny() -> Arc<BaseModel> {
    static M: OnceLock<Arc<BaseModel>> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("graft-tiny-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("tiny.gguf");
        write_tiny_gguf(&p, &TinySpec::default()).expect("tiny");
        Arc::new(BaseModel::load(&p, &Device::Cpu).expect("load"))
    })
    .clone()
}

/// Twelve tokenised prompt/completion examples ("Qi says" -> " the answer is i % 3").
pub fn toy_examples(m: &BaseModel) -> Vec<Tokenized> {
    let lines: String = (0..12)
        .map(|i| {
            format!(
                "{{\"prompt\":\"Q{i} says\",\"completion\":\" the answer is {}\"}}\n",
                i % 3
            )
        })
        .collect();
    let render = |msgs: &[ChatMessage], g: bool| m.chat.render(msgs, g);
    let (ex, _) = parse_jsonl(&lines, None, &render).expect("parse");
    tokenize(&ex, &m.tokenizer, 64, Overflow::Reject)
        .expect("tokenize")
        .0
}

/// The plain (differentiable) forward's logits at the last position of `prompt` with
/// adapter `a`.
pub fn plain_last_logits(m: &BaseModel, prompt: &[u32], a: Option<&dyn TensorAdapter>) -> Vec<f32> {
    let ids =
        candle_core::Tensor::from_slice(prompt, (1, prompt.len()), &Device::Cpu).expect("ids");
    let h = m.llama.forward_hidden(&ids, a).expect("plain forward");
    let last = h
        .narrow(1, prompt.len() - 1, 1)
        .expect("last")
        .reshape((1, m.config().hidden_size))
        .expect("2d");
    m.llama
        .weights
        .lm_head
        .forward(&last)
        .expect("head")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec")
}
