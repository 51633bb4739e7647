//! The serving paths that trade exactness for speed, on the real model against every
//! fixture of the real Hugging Face stack:
//! - the integer-dot decode kernel (`--decode-kernel int16`): with each fixture's prompt
//!   fed through decode rows (so every position, not only the generated ones, runs the
//!   integer kernel);
//! - the f16 KV cache (`--kv-cache-dtype f16`), prompt prefilled then decoded;
//! - LoRA and DoRA pairs served in bf16 or f16 (`--lora-dtype`).
//!
//! For each, the last prompt position's logits keep the reference's top-1, at least 19 of
//! its top-20 and its top-20 log-probabilities within 0.05, and the greedy continuation is
//! the reference's token for token; a mixed batch of every method's rows equals their solo
//! runs bit for bit.

mod common;

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use candle_core::Device;
use common::{
    assert_batch_equals_solo, assert_batch_equals_solo_in, check_against, fixtures, greedy_in, ids,
    top_k,
};
use graft_server::{
    adapters::formats::{self, ImportPolicy},
    model::{lora::LoraDtype, packed::DecodeKernel, Adapter, BaseModel, KvDtype, SeqChunk},
};

/// The bound issue 17 sets for a fast path (llama.cpp's 8-bit activations are within ~0.5 of the
/// reference; graft's 8-bit experiment moved them by up to 0.58).
const LOGPROB_TOL: f32 = 0.05;

/// The real model with the integer kernel on decode rows, loaded once.
fn int16_model() -> Arc<BaseModel> {
    static M: OnceLock<Arc<BaseModel>> = OnceLock::new();
    M.get_or_init(|| {
        let mut m = common::load_model();
        m.llama.set_decode_kernel(DecodeKernel::Int16);
        Arc::new(m)
    })
    .clone()
}

/// (name, fixture folder, adapter folder inside it, weights file)
const FIXTURES: [(&str, &str, &str, &str); 8] = [
    ("lora", "peft-lora-smollm2", "", "adapter_model.safetensors"),
    (
        "prompt-tuning",
        "peft-methods/prompt-tuning",
        "adapter",
        "adapter_model.safetensors",
    ),
    (
        "p-tuning-mlp",
        "peft-methods/p-tuning-mlp",
        "adapter",
        "adapter_model.safetensors",
    ),
    (
        "prefix-tuning",
        "peft-methods/prefix-tuning",
        "adapter",
        "adapter_model.safetensors",
    ),
    (
        "p-tuning-v2",
        "peft-methods/p-tuning-v2",
        "adapter",
        "adapter_model.safetensors",
    ),
    (
        "ia3",
        "peft-methods/ia3",
        "adapter",
        "adapter_model.safetensors",
    ),
    (
        "dora",
        "peft-methods/dora",
        "adapter",
        "adapter_model.safetensors",
    ),
    (
        "bottleneck",
        "bottleneck-houlsby",
        "adapter",
        "adapter.safetensors",
    ),
];

fn adapter(m: &BaseModel, fx: (&str, &str, &str, &str)) -> Adapter {
    adapter_as(m, fx, LoraDtype::F32)
}

/// A fixture's adapter as the registry serves it with `--lora-dtype dtype`.
fn adapter_as(m: &BaseModel, fx: (&str, &str, &str, &str), dtype: LoraDtype) -> Adapter {
    parsed(m, fx)
        .into_served(&m.llama, dtype)
        .expect("compiles")
}

/// A fixture's files parsed.
fn parsed(m: &BaseModel, (_, folder, sub, weights): (&str, &str, &str, &str)) -> formats::Parsed {
    let d: PathBuf = fixtures().join(folder).join(sub);
    let policy = ImportPolicy {
        max_rank: 64,
        max_virtual_tokens: 128,
        force: false,
        base_aliases: vec!["HuggingFaceTB/SmolLM2-135M-Instruct".into()],
    };
    let c = std::fs::read(d.join("adapter_config.json")).expect("config");
    let w = std::fs::read(d.join(weights)).expect("weights");
    formats::parse(&c, &w, m.config(), &m.name, &policy).expect("fixture imports")
}

/// One case of a fixture: prompt ids, "base" | "adapted", reference logits, greedy ids.
type Case = (Vec<u32>, &'static str, Vec<f32>, Vec<u32>);

/// A fixture's cases. The LoRA fixture has one prompt at the top level; the others a
/// `prompts` list.
fn cases(folder: &str) -> Vec<Case> {
    let dir = fixtures().join(folder);
    let r = common::json(dir.join("reference.json"));
    let refs =
        candle_core::safetensors::load(dir.join("reference_logits.safetensors"), &Device::Cpu)
            .expect("reference logits");
    let logits = |key: &str| -> Vec<f32> {
        refs[key]
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("logits")
    };
    let mut out = Vec::new();
    for which in ["base", "adapted"] {
        match r["prompts"].as_array() {
            Some(prompts) => {
                for (i, p) in prompts.iter().enumerate() {
                    out.push((
                        ids(&p["token_ids"]),
                        which,
                        logits(&format!("prompt{i}.{which}")),
                        ids(&p[which]["greedy"]["ids"]),
                    ));
                }
            }
            None => out.push((
                ids(&r["prompt"]["token_ids"]),
                which,
                logits(which),
                ids(&r[which]["greedy"]["ids"]),
            )),
        }
    }
    out
}

/// Every token through decode rows, the prompt's included, one a step: the logits at the
/// last prompt position and `n` greedy tokens.
fn decode_all(
    m: &BaseModel,
    kv: KvDtype,
    a: Option<&Adapter>,
    prompt: &[u32],
    n: usize,
) -> (Vec<f32>, Vec<u32>) {
    let mut pool = common::pool(m, 4096, kv);
    let mut cache = common::seeded(&mut pool, a);
    let mut step = |t: u32| -> Vec<f32> {
        m.llama
            .forward_step(
                &mut pool,
                &mut [SeqChunk {
                    tokens: &[t],
                    cache: &mut cache,
                    want_logits: true,
                    decode: true,
                    adapter: a,
                }],
            )
            .expect("decode step")
            .remove(0)
    };
    let mut last = Vec::new();
    for &t in prompt {
        last = step(t);
    }
    let first = last.clone();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = top_k(&last, 1)[0];
        out.push(t);
        last = step(t);
    }
    (first, out)
}

/// Calls `check(fixture, "base" | "adapted", adapter, prompt, reference logits, reference
/// greedy ids)` for every fixture's cases, the base model's cases once per prompt (they
/// repeat across fixtures).
fn each_case(
    m: &BaseModel,
    mut check: impl FnMut(&str, &str, Option<&Adapter>, &[u32], &[f32], &[u32]),
) {
    let mut base_done: HashSet<Vec<u32>> = HashSet::new();
    for fx in FIXTURES {
        let a = adapter(m, fx);
        for (prompt, which, want, want_ids) in cases(fx.1) {
            let adapter = match which {
                "base" if !base_done.insert(prompt.clone()) => continue,
                "base" => None,
                _ => Some(&a),
            };
            check(fx.0, which, adapter, &prompt, &want, &want_ids);
        }
    }
}

/// Whether two logit rows differ in any bit.
fn differ(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).any(|(x, y)| x.to_bits() != y.to_bits())
}

/// No adapter, then every fixture's, LoRA and DoRA pairs in `dtype`.
fn every_method(m: &BaseModel, dtype: LoraDtype) -> Vec<Option<Adapter>> {
    std::iter::once(None)
        .chain(FIXTURES.iter().map(|&fx| Some(adapter_as(m, fx, dtype))))
        .collect()
}

/// `n` short prompts, each its own.
fn prompts(m: &BaseModel, n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            m.tokenizer
                .encode(&format!("Question {i}: what is {i} plus {i}?"))
                .expect("encode")
        })
        .collect()
}

#[test]
fn int16_decode_keeps_every_fixtures_greedy_tokens_and_top20_logprobs() {
    let m = int16_model();
    assert_eq!(m.llama.decode_kernel(), DecodeKernel::Int16);
    each_case(&m, |name, which, adapter, prompt, want, want_ids| {
        let (got, got_ids) = decode_all(&m, KvDtype::F32, adapter, prompt, want_ids.len());
        if adapter.is_none() {
            // The integer kernel ran: the exact kernel's logits differ in their bits.
            let (exact, _) = decode_all(&common::model(), KvDtype::F32, None, prompt, 0);
            assert_eq!(common::model().llama.decode_kernel(), DecodeKernel::Exact);
            assert!(
                differ(&exact, &got),
                "int16 {name}: the logits are the exact kernel's"
            );
        }
        let what = format!("int16 {name} {which}");
        check_against(want, &got, LOGPROB_TOL, &what);
        assert_eq!(got_ids, want_ids, "{what}: greedy tokens");
    });
}

/// How near two tokens' log-probabilities may be, on the exact path, for a path with both
/// approximations (the integer kernel and an f16 cache) to pick either.
const NEAR_TIE: f32 = 0.01;

/// The two options together: the integer decode kernel reading an f16 KV cache. The top-20
/// log-probabilities agree as each option's do. Their errors add up, and one fixture's
/// continuation meets a near-tie (p-tuning-mlp, adapted, step 9: 0.0017 apart on the exact
/// path) that the pair decides the other way: the greedy tokens are the reference's up to
/// the first step where they differ, and there the exact path puts the two tokens within
/// [`NEAR_TIE`] of each other. Each option alone keeps every continuation whole (above).
#[test]
fn int16_decode_over_an_f16_kv_cache_keeps_the_fixtures_top20_and_greedy_tokens_to_a_near_tie() {
    let m = int16_model();
    assert_eq!(m.llama.decode_kernel(), DecodeKernel::Int16);
    let mut ties = 0;
    each_case(&m, |name, which, adapter, prompt, want, want_ids| {
        let what = format!("int16, f16 KV {name} {which}");
        let (got, got_ids) = decode_all(&m, KvDtype::F16, adapter, prompt, want_ids.len());
        // The cache held f16: the logits differ in their bits from an f32 cache's.
        let (f32_kv, _) = decode_all(&m, KvDtype::F32, adapter, prompt, 0);
        assert!(
            differ(&f32_kv, &got),
            "{what}: the logits are the f32 cache's"
        );
        check_against(want, &got, LOGPROB_TOL, &what);
        let Some(k) = got_ids.iter().zip(want_ids).position(|(a, b)| a != b) else {
            return;
        };
        // The exact path's log-probabilities after the shared prefix.
        let mut seen = prompt.to_vec();
        seen.extend_from_slice(&want_ids[..k]);
        let (exact, _) = decode_all(&common::model(), KvDtype::F32, adapter, &seen, 0);
        let lp = common::log_softmax(&exact);
        let (w, g) = (lp[want_ids[k] as usize], lp[got_ids[k] as usize]);
        println!("{what}: step {k} is a near-tie on the exact path ({w:.4} against {g:.4})");
        assert!(
            (w - g).abs() <= NEAR_TIE,
            "{what}: greedy token {k} differs ({w} against {g} on the exact path)"
        );
        ties += 1;
    });
    assert!(ties <= 1, "{ties} continuations met a near-tie");
}

#[test]
fn int16_rows_of_every_method_over_an_f16_kv_cache_are_batch_invariant() {
    let m = int16_model();
    let adapters = every_method(&m, LoraDtype::F32);
    assert_batch_equals_solo_in(&m, KvDtype::F16, &adapters, &prompts(&m, adapters.len()), 5);
}

#[test]
fn int16_rows_of_every_method_are_batch_invariant() {
    let m = int16_model();
    let adapters = every_method(&m, LoraDtype::F32);
    assert_batch_equals_solo(&m, &adapters, &prompts(&m, adapters.len()), 5);
}

#[test]
fn an_f16_kv_cache_keeps_every_fixtures_greedy_tokens_and_top20_logprobs() {
    let m = common::model();
    assert_eq!(m.llama.decode_kernel(), DecodeKernel::Exact);
    each_case(&m, |name, which, adapter, prompt, want, want_ids| {
        let (got, got_ids) = greedy_in(&m, KvDtype::F16, adapter, prompt, want_ids.len());
        // The cache held f16: the logits differ in their bits from an f32 cache's.
        let (exact, _) = greedy_in(&m, KvDtype::F32, adapter, prompt, 1);
        let what = format!("f16 KV {name} {which}");
        assert!(
            differ(&exact, &got),
            "{what}: the logits are the f32 cache's"
        );
        check_against(want, &got, LOGPROB_TOL, &what);
        assert_eq!(got_ids, want_ids, "{what}: greedy tokens");
    });
}

#[test]
fn rows_of_every_method_over_an_f16_kv_cache_are_batch_invariant() {
    let m = common::model();
    let adapters = every_method(&m, LoraDtype::F32);
    assert_batch_equals_solo_in(&m, KvDtype::F16, &adapters, &prompts(&m, adapters.len()), 5);
}

#[test]
fn lora_and_dora_served_in_16_or_8_bits_keep_their_fixtures_greedy_tokens_and_top20_logprobs() {
    let m = common::model();
    for dtype in [LoraDtype::Bf16, LoraDtype::F16, LoraDtype::Int8] {
        for fx in FIXTURES
            .into_iter()
            .filter(|fx| matches!(fx.0, "lora" | "dora"))
        {
            let (exact, a) = (adapter(&m, fx), adapter_as(&m, fx, dtype));
            let what = format!("{} in {}", fx.0, dtype.name());
            // At most half the bytes resident (a DoRA module's magnitude and gains stay
            // f32); a LoRA adapter in int8, its scales included, under a third.
            let most = if dtype == LoraDtype::Int8 && fx.0 == "lora" {
                3
            } else {
                6
            };
            assert!(
                a.bytes() * 10 < exact.bytes() * most,
                "{what}: {} bytes",
                a.bytes()
            );
            for (prompt, _, want, want_ids) in cases(fx.1).into_iter().filter(|c| c.1 == "adapted")
            {
                let (got, got_ids) = greedy_in(&m, KvDtype::F32, Some(&a), &prompt, want_ids.len());
                let (f32s, _) = greedy_in(&m, KvDtype::F32, Some(&exact), &prompt, 1);
                assert!(differ(&f32s, &got), "{what}: the logits are the f32 pairs'");
                let (worst, exact_worst) = (
                    check_against(&want, &got, LOGPROB_TOL, &what),
                    check_against(&want, &f32s, LOGPROB_TOL, &what),
                );
                println!(
                    "{what}: top-20 within {worst:.5} of PEFT's (f32 pairs: {exact_worst:.5})"
                );
                assert_eq!(got_ids, want_ids, "{what}: greedy tokens");
            }
        }
    }
}

#[test]
fn rows_of_every_method_with_bf16_or_int8_lora_are_batch_invariant() {
    let m = common::model();
    for dtype in [LoraDtype::Bf16, LoraDtype::Int8] {
        let adapters = every_method(&m, dtype);
        assert_batch_equals_solo(&m, &adapters, &prompts(&m, adapters.len()), 5);
    }
}

/// A value f16 cannot hold is refused when the adapter is served in f16, naming the layer
/// and module; bf16 (f32's range) serves it.
#[test]
fn a_value_beyond_f16_is_refused_naming_its_module() {
    let m = common::model();
    let mut p = parsed(&m, FIXTURES[0]);
    let mut pair = p
        .adapter
        .get(3, graft_server::model::Module::Up)
        .expect("up_proj")
        .clone();
    let mut b = pair.b.to_f32().into_owned();
    b[5] = 7.0e4;
    pair.b = b.into();
    p.adapter.set(3, graft_server::model::Module::Up, pair);
    let e = p
        .clone()
        .into_served(&m.llama, LoraDtype::F16)
        .expect_err("70,000 is beyond f16");
    assert_eq!(e.field, "adapter_model.safetensors");
    assert!(
        e.reason
            .contains("layer 3 up_proj: lora_B: value 5 (70000) does not fit f16"),
        "{}",
        e.reason
    );
    p.into_served(&m.llama, LoraDtype::Bf16)
        .expect("bf16 holds it");
}
