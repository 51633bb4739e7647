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
        kv_cache::blocks_for,
        tiny::{write_tiny_gguf, TinySpec},
        Adapter, BaseModel, ChatMessage, KvCache, KvDtype, KvPool, SeqChunk,
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
    M.get_or_init(|| Arc::new(load_model())).clone()
}

/// The real SmolLM2, loaded anew.
pub fn load_model() -> BaseModel {
    let path = std::env::var_os("GRAFT_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    BaseModel::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("load {} (run `make model`): {e}", path.display()))
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

/// A KV pool of `m`'s shape holding `tokens` positions stored as `dtype`.
pub fn pool(m: &BaseModel, tokens: usize, dtype: KvDtype) -> KvPool {
    KvPool::new(m.llama.kv_shape().with_dtype(dtype), blocks_for(tokens)).expect("KV pool")
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
    greedy_in(m, KvDtype::F32, a, prompt, n)
}

/// [`greedy`] with the KV cache stored as `dtype`.
pub fn greedy_in(
    m: &BaseModel,
    dtype: KvDtype,
    a: Option<&Adapter>,
    prompt: &[u32],
    n: usize,
) -> (Vec<f32>, Vec<u32>) {
    let mut pool = pool(m, 8192, dtype);
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

/// Logits `got` agree with the reference `want` as the fixtures expect: the same top-1, at
/// least 19 of the top-20, and the top-20's log-probabilities within `tol`.
/// Returns the worst of those differences.
pub fn check_against(want: &[f32], got: &[f32], tol: f32, what: &str) -> f32 {
    let (lw, lg) = (log_softmax(want), log_softmax(got));
    let (tw, tg) = (top_k(want, 20), top_k(got, 20));
    assert_eq!(tg[0], tw[0], "{what}: top-1");
    assert!(
        tg.iter().filter(|t| tw.contains(t)).count() >= 19,
        "{what}: top-20"
    );
    let worst = tw
        .iter()
        .map(|&t| (lw[t as usize] - lg[t as usize]).abs())
        .fold(0f32, f32::max);
    eprintln!("{what}: worst top-20 logprob difference {worst}");
    assert!(worst <= tol, "{what}: {worst}");
    worst
}

/// Runs every (adapter, prompt) alone for `steps` greedy steps, then all together in one
/// batch per step, and asserts every row's logits equal its solo run's bit for bit.
/// (Through `forward_step`: rows without an output layer of their own get the LM head's
/// logits, as `forward_batch` gives them; a replaced LM head's rows get their own.)
pub fn assert_batch_equals_solo(
    m: &BaseModel,
    adapters: &[Option<Adapter>],
    prompts: &[Vec<u32>],
    steps: usize,
) {
    assert_batch_equals_solo_in(m, KvDtype::F32, adapters, prompts, steps)
}

/// [`assert_batch_equals_solo`] with every KV cache stored as `dtype`.
#[allow(clippy::needless_range_loop)] // `s` indexes the solo runs' steps and the batch's.
pub fn assert_batch_equals_solo_in(
    m: &BaseModel,
    dtype: KvDtype,
    adapters: &[Option<Adapter>],
    prompts: &[Vec<u32>],
    steps: usize,
) {
    let solo: Vec<Vec<Vec<u32>>> = (0..adapters.len())
        .map(|i| {
            let mut pool = pool(m, 2048, dtype);
            let a = adapters[i].as_ref();
            let mut cache = seeded(&mut pool, a);
            let mut next = prompts[i].clone();
            let mut bits = Vec::new();
            for s in 0..steps {
                let mut l = m
                    .llama
                    .forward_step(
                        &mut pool,
                        &mut [SeqChunk {
                            tokens: &next,
                            cache: &mut cache,
                            want_logits: true,
                            decode: s > 0,
                            adapter: a,
                        }],
                    )
                    .expect("solo");
                let row: Vec<f32> = l.remove(0);
                next = vec![top_k(&row, 1)[0]];
                bits.push(row.iter().map(|x| x.to_bits()).collect());
            }
            bits
        })
        .collect();
    let mut pool = pool(m, 8192, dtype);
    let mut caches: Vec<KvCache> = adapters
        .iter()
        .map(|a| seeded(&mut pool, a.as_ref()))
        .collect();
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    for s in 0..steps {
        let mut chunks: Vec<SeqChunk<'_>> = caches
            .iter_mut()
            .zip(&next)
            .zip(adapters)
            .map(|((cache, t), a)| SeqChunk {
                tokens: t,
                cache,
                want_logits: true,
                decode: s > 0,
                adapter: a.as_ref(),
            })
            .collect();
        let rows = m.llama.forward_step(&mut pool, &mut chunks).expect("batch");
        for (i, row) in rows.iter().enumerate() {
            let bits: Vec<u32> = row.iter().map(|x| x.to_bits()).collect();
            assert!(
                bits == solo[i][s],
                "row {i} differs from its solo run at step {s}"
            );
            next[i] = vec![top_k(row, 1)[0]];
        }
    }
}

/// Trains `spec` on `ex` to the end, then again stopped after step 4 and resumed from its
/// checkpoint: the resumed run's losses and final parameters equal the uninterrupted run's
/// bit for bit.
pub fn assert_resumes_bit_for_bit(
    m: &BaseModel,
    spec: &graft_server::train::trainer::TrainSpec,
    ex: &[Tokenized],
    what: &str,
) {
    use graft_server::train::trainer::{self, Control, Outcome, TrainEvent};
    let run = |dir: &std::path::Path, stop_after: Option<usize>| {
        let c = Control::default();
        let mut losses = Vec::new();
        let out = trainer::train(m, spec, ex, &[], dir, &c, &mut |e| {
            if let TrainEvent::Step {
                step, train_loss, ..
            } = e
            {
                losses.push((step, train_loss.to_bits()));
                if Some(step) == stop_after {
                    c.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .expect("train");
        let w = match out {
            Outcome::Finished(v) => Some(v.tensors()),
            Outcome::Cancelled => None,
        };
        (losses, w)
    };
    let full_dir = tempfile::tempdir().expect("dir");
    let (full, full_w) = run(full_dir.path(), None);
    let dir = tempfile::tempdir().expect("dir");
    run(dir.path(), Some(4));
    let (rest, rest_w) = run(dir.path(), None);
    assert_eq!(rest.first().map(|x| x.0), Some(5), "{what}");
    assert_eq!(rest, full[4..].to_vec(), "{what}");
    let (a, b) = (full_w.expect("done"), rest_w.expect("done"));
    for (name, t) in &a {
        let x: Vec<f32> = t.flatten_all().expect("f").to_vec1().expect("v");
        let y: Vec<f32> = b[name].flatten_all().expect("f").to_vec1().expect("v");
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}: {name}"
        );
    }
}

/// For a fixture folder (`reference.json`, `reference_logits.safetensors`): every prompt's
/// last-position logits and greedy tokens through the serving path, for the base model and
/// with adapter `a`, match the library's references (`check_against` with `tol`).
pub fn assert_matches_fixture(
    m: &BaseModel,
    folder: &std::path::Path,
    a: &Adapter,
    tol: f32,
    name: &str,
) {
    let r = json(folder.join("reference.json"));
    let refs =
        candle_core::safetensors::load(folder.join("reference_logits.safetensors"), &Device::Cpu)
            .expect("reference logits");
    for (i, p) in r["prompts"].as_array().expect("prompts").iter().enumerate() {
        let prompt = ids(&p["token_ids"]);
        for (which, adapter) in [("base", None), ("adapted", Some(a))] {
            let want: Vec<f32> = refs[&format!("prompt{i}.{which}")]
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            let want_ids = ids(&p[which]["greedy"]["ids"]);
            let (got, got_ids) = greedy(m, adapter, &prompt, want_ids.len());
            let what = format!("{name} prompt {i} {which}");
            check_against(&want, &got, tol, &what);
            assert_eq!(got_ids, want_ids, "{what}: greedy tokens");
        }
    }
}

/// The last position's output of `prompt` through the serving path's `forward_step` with
/// adapter `a` (its KV prefix seeded, if any): the LM logits, or its head's class logits.
pub fn served_last_logits(m: &BaseModel, a: &Adapter, prompt: &[u32]) -> Vec<f32> {
    let mut pool = m.llama.kv_pool(256).expect("KV pool");
    let mut cache = seeded(&mut pool, Some(a));
    m.llama
        .forward_step(
            &mut pool,
            &mut [SeqChunk {
                tokens: prompt,
                cache: &mut cache,
                want_logits: true,
                decode: false,
                adapter: Some(a),
            }],
        )
        .expect("serve")
        .remove(0)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// For variable `v` with gradient `g`: the autograd value of its largest-gradient entry and
/// the central finite difference (step 2e-3) of `loss` there; `v` is restored afterwards.
pub fn largest_gradient_vs_fd(
    v: &candle_core::Var,
    g: &candle_core::Tensor,
    loss: impl Fn() -> f64,
) -> (f32, f32) {
    let flat: Vec<f32> = g.flatten_all().expect("flat").to_vec1().expect("vec");
    let base: Vec<f32> = v.flatten_all().expect("flat").to_vec1().expect("vec");
    let (k, gk) = flat
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .map(|(k, g)| (k, *g))
        .expect("non-empty");
    let eps = 2e-3f32;
    let set = |x: Vec<f32>| {
        v.set(&candle_core::Tensor::from_vec(x, v.shape(), &Device::Cpu).expect("t"))
            .expect("set")
    };
    let at = |d: f32| {
        let mut x = base.clone();
        x[k] += d;
        set(x);
        loss()
    };
    let (lp, lm) = (at(eps), at(-eps));
    set(base.clone());
    (gk, ((lp - lm) / (2.0 * eps as f64)) as f32)
}

/// A safetensors file's tensors kept where `keep(name)`, then each of `set` (name, shape,
/// f32 values) put in: replacing the tensor of that name, or added.
pub fn safetensors_edit(
    w: &[u8],
    keep: impl Fn(&str) -> bool,
    set: &[(&str, Vec<usize>, Vec<f32>)],
) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(w).expect("st");
    let mut all: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec()))
        .collect();
    for (name, shape, v) in set {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        match all.iter_mut().find(|(n, _, _)| n == name) {
            Some(e) => (e.1, e.2) = (shape.clone(), bytes),
            None => all.push((name.to_string(), shape.clone(), bytes)),
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = all
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize(views, None).expect("serialize")
}

/// The HF names of all seven target modules, in the model's order.
pub fn all_targets() -> Vec<String> {
    graft_server::model::Module::ALL
        .map(|m| m.hf_name().to_string())
        .to_vec()
}

/// A small LoRA SFT run on the tiny model: rank 4 on all seven modules, 3 epochs of batch
/// 4, checkpoints every 2 steps.
pub fn lora_spec() -> graft_server::train::trainer::TrainSpec {
    use graft_server::train::trainer::TrainSpec;
    TrainSpec {
        method: Default::default(),
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: all_targets(),
        use_rslora: false,
        use_dora: false,
        epochs: 3,
        batch_size: 4,
        grad_accum: 1,
        learning_rate: 1e-2,
        schedule: graft_server::train::optim::Schedule::Linear,
        warmup_steps: 1,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_seq_len: 64,
        seed: 3,
        eval_every: 0,
        patience: 0,
        checkpoint_every: 2,
        objective: Default::default(),
        train_lm_head: false,
    }
}
