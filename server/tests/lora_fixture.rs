//! LoRA against the real ecosystem: the PEFT adapter in `tests/fixtures` applied by graft
//! gives the logits and greedy continuation transformers + PEFT recorded; the serving path
//! equals the merged reference path; files round-trip; a mixed batch equals solo runs.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use common::{fixtures, greedy, ids, log_softmax, model, top_k};
use graft_server::{
    adapters::{
        peft::{self, Details, ImportPolicy, Parsed as ParsedLora, Scan},
        testing::random_lora,
    },
    model::{
        lora::{F32s, Values},
        Adapter as LoraWeights, BaseModel, Llama, Module, SeqChunk,
    },
};

fn fixture_dir() -> PathBuf {
    fixtures().join("peft-lora-smollm2")
}

fn policy() -> ImportPolicy {
    ImportPolicy {
        max_rank: 64,
        max_virtual_tokens: 128,
        force: false,
        base_aliases: vec!["HuggingFaceTB/SmolLM2-135M-Instruct".into()],
    }
}

fn fixture_adapter(m: &BaseModel) -> ParsedLora {
    let dir = fixture_dir();
    let c = std::fs::read(dir.join("adapter_config.json")).expect("config");
    let w = std::fs::read(dir.join("adapter_model.safetensors")).expect("weights");
    peft::parse(&c, &w, m.config(), &m.name, &policy()).expect("fixture imports")
}

fn reference() -> serde_json::Value {
    common::json(fixture_dir().join("reference.json"))
}

/// Tolerance, stated: same dequantised weights as the reference; the LoRA update is added
/// beside the base matmul instead of PEFT's separate branch, so only float order differs.
const LOGPROB_TOL: f32 = 1e-3;

#[test]
fn fixture_adapter_reproduces_peft_logits_and_greedy_text() {
    let m = model();
    let a = fixture_adapter(&m);
    let Details::Lora {
        rank,
        target_modules,
        ..
    } = &a.details
    else {
        panic!("not LoRA")
    };
    assert_eq!(*rank, 8);
    assert_eq!(target_modules.len(), 7);
    let r = reference();
    let prompt = ids(&r["prompt"]["token_ids"]);
    let refs = candle_core::safetensors::load(
        fixture_dir().join("reference_logits.safetensors"),
        &Device::Cpu,
    )
    .expect("reference logits");
    let want: Vec<f32> = refs["adapted"]
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    let want_ids = ids(&r["adapted"]["greedy"]["ids"]);
    let (got, got_ids) = greedy(&m, Some(&a.adapter), &prompt, want_ids.len());
    let (lw, lg) = (log_softmax(&want), log_softmax(&got));
    let (tw, tg) = (top_k(&want, 20), top_k(&got, 20));
    assert_eq!(tg[0], tw[0], "top-1");
    assert!(tg.iter().filter(|t| tw.contains(t)).count() >= 19);
    let worst = tw
        .iter()
        .map(|&t| (lw[t as usize] - lg[t as usize]).abs())
        .fold(0f32, f32::max);
    eprintln!("worst top-20 logprob difference with the adapter: {worst}");
    assert!(worst <= LOGPROB_TOL, "{worst}");
    assert_eq!(got_ids, want_ids);
    assert!(m
        .tokenizer
        .decode(&got_ids)
        .expect("decode")
        .starts_with("ANSWER: Canberra"));
}

#[test]
fn serving_path_equals_the_merged_reference_path() {
    let m = model();
    let a = fixture_adapter(&m);
    let merged = Llama::new(
        m.config().clone(),
        a.adapter.merged_into(&m.llama.weights).expect("merge"),
        Device::Cpu,
    )
    .expect("model");
    let prompt = m
        .tokenizer
        .encode("What is the capital of Peru?")
        .expect("encode");
    let reference: Vec<f32> = merged
        .forward_reference(&prompt)
        .expect("reference")
        .get(prompt.len() - 1)
        .expect("row")
        .to_vec1()
        .expect("vec");
    let (got, _) = greedy(&m, Some(&a.adapter), &prompt, 1);
    let worst = got
        .iter()
        .zip(&reference)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 2e-3, "max |logit diff| {worst}");
}

/// The `post_linear` hook: the serving forward with the LoRA adapter equals the plain
/// forward with the same adapter as constant tensors.
#[test]
fn serving_forward_equals_plain_forward_at_the_post_linear_hook() {
    let m = model();
    let a = fixture_adapter(&m);
    let prompt: Vec<u32> = m.tokenizer.encode("The capital of France is").expect("ids");
    let plain = common::plain_last_logits(
        &m,
        &prompt,
        Some(&a.adapter as &dyn graft_server::model::adapter::TensorAdapter),
    );
    let (served, _) = greedy(&m, Some(&a.adapter), &prompt, 1);
    let base: Vec<f32> = greedy(&m, None, &prompt, 1).0;
    let d = plain
        .iter()
        .zip(&served)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let moved = base
        .iter()
        .zip(&served)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    // The adapter moves the logits by far more than the two paths differ.
    assert!(
        d < 2e-3 && moved > 0.5,
        "paths differ by {d}; the adapter moves {moved}"
    );
}

#[test]
fn written_files_parse_back_to_the_same_weights() {
    let m = model();
    let a = fixture_adapter(&m);
    let (c, w) = peft::write(&a, m.config(), "HuggingFaceTB/SmolLM2-135M-Instruct").expect("write");
    let b = peft::parse(&c, &w, m.config(), &m.name, &policy()).expect("parse back");
    assert_eq!(a.adapter, b.adapter);
    // And the fixture's own tensors come back out in HF layout, bit for bit.
    let orig = std::fs::read(fixture_dir().join("adapter_model.safetensors")).expect("orig");
    let orig = safetensors::SafeTensors::deserialize(&orig).expect("orig st");
    let ours = safetensors::SafeTensors::deserialize(&w).expect("ours st");
    for (name, t) in orig.tensors() {
        let o = ours.tensor(&name).expect("tensor exported");
        assert_eq!(o.shape(), t.shape(), "{name}");
        assert_eq!(
            o.data(),
            t.data(),
            "{name} differs after the q/k permutation round trip"
        );
    }
}

/// A stored f32 file is served in place: every `A` and the `B`s outside q and k are views
/// of the file's bytes (q's and k's rows are permuted into a copy), and the adapter equals
/// the one parsed from a copy.
#[test]
fn f32_weights_are_read_in_place_from_the_file() {
    let m = model();
    let dir = fixture_dir();
    let c = std::fs::read(dir.join("adapter_config.json")).expect("config");
    let w = bytes::Bytes::from(std::fs::read(dir.join("adapter_model.safetensors")).expect("w"));
    let p =
        peft::parse_bytes(&c, &w, m.config(), &m.name, &policy(), Scan::Stored).expect("parses");
    let file = w.as_ptr_range();
    let in_file = |v: &Values| {
        let Values::F32(v) = v else { return false };
        let r = v.as_ptr_range();
        matches!(v, F32s::Shared(_))
            && file.start <= r.start as *const u8
            && r.end as *const u8 <= file.end
    };
    let mut seen = 0;
    for layer in 0..m.config().num_layers {
        for module in Module::ALL {
            let Some(pair) = p.adapter.linear(layer, module).and_then(|d| d.as_lora()) else {
                continue;
            };
            seen += 1;
            assert!(in_file(&pair.a), "layer {layer} {module:?}: A was copied");
            let permuted = matches!(module, Module::Q | Module::K);
            assert_eq!(in_file(&pair.b), !permuted, "layer {layer} {module:?}: B");
        }
    }
    assert_eq!(seen, 7 * m.config().num_layers);
    assert_eq!(p.adapter, fixture_adapter(&m).adapter);
}

/// Eight different adapters and one bare row decode together; each row equals its solo run.
#[test]
fn mixed_batch_of_adapters_equals_solo_runs() {
    let m = model();
    let adapters: Vec<LoraWeights> = (0..8)
        .map(|i| random_lora(&m, i + 1, 4 + 2 * i as usize, 0.1))
        .collect();
    let prompts: Vec<Vec<u32>> = (0..9)
        .map(|i| {
            m.tokenizer
                .encode(&format!("Item {i}: the weather today is"))
                .expect("encode")
        })
        .collect();
    let lora_of = |i: usize| if i < 8 { Some(&adapters[i]) } else { None };
    let solo: Vec<Vec<u32>> = (0..9)
        .map(|i| greedy(&m, lora_of(i), &prompts[i], 6).1)
        .collect();
    // Together: prefill all, then decode all in shared steps.
    let mut pool = m.llama.kv_pool(9 * 1024).expect("KV pool");
    let mut caches: Vec<_> = (0..9)
        .map(|_| graft_server::model::KvCache::new())
        .collect();
    let mut next: Vec<Vec<u32>> = prompts.clone();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); 9];
    for step in 0..6 {
        let mut chunks: Vec<SeqChunk<'_>> = caches
            .iter_mut()
            .zip(&next)
            .enumerate()
            .map(|(i, (cache, t))| SeqChunk {
                tokens: t,
                cache,
                want_logits: true,
                decode: step > 0,
                adapter: lora_of(i),
            })
            .collect();
        let logits = m
            .llama
            .forward_batch(&mut pool, &mut chunks)
            .expect("forward");
        drop(chunks);
        for i in 0..9 {
            let row: Vec<f32> = logits.get(i).expect("row").to_vec1().expect("vec");
            let t = top_k(&row, 1)[0];
            got[i].push(t);
            next[i] = vec![t];
        }
    }
    for i in 0..9 {
        assert_eq!(got[i], solo[i], "sequence {i}");
    }
    // The adapters really change the output.
    assert!(solo[..8].iter().any(|s| *s != solo[8]));
}

#[test]
fn refusals_name_the_problem() {
    let m = model();
    let dir = fixture_dir();
    let c = std::fs::read(dir.join("adapter_config.json")).expect("config");
    let w = std::fs::read(dir.join("adapter_model.safetensors")).expect("weights");
    let mut cfg: serde_json::Value = serde_json::from_slice(&c).expect("json");
    let check = |cfg: &serde_json::Value, w: &[u8], p: &ImportPolicy, field: &str, needle: &str| {
        let e = peft::parse(
            &serde_json::to_vec(cfg).expect("ser"),
            w,
            m.config(),
            &m.name,
            p,
        )
        .expect_err("must be refused");
        assert!(
            e.field.contains(field) && e.reason.contains(needle),
            "{e:?} (wanted {field} / {needle})"
        );
    };
    let p = policy();
    // Rank above the cap.
    check(
        &cfg,
        &w,
        &ImportPolicy {
            max_rank: 4,
            max_virtual_tokens: 128,
            ..policy()
        },
        "r",
        "above",
    );
    // Another base model, unless forced.
    let mut other = cfg.clone();
    other["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B".into();
    check(&other, &w, &p, "base_model_name_or_path", "Llama-3.2-1B");
    peft::parse(
        &serde_json::to_vec(&other).expect("ser"),
        &w,
        m.config(),
        &m.name,
        &ImportPolicy {
            force: true,
            ..policy()
        },
    )
    .expect("forced import");
    // Unsupported features.
    let mut dora = cfg.clone();
    dora["use_dora"] = true.into();
    check(&dora, &w, &p, "use_dora", "DoRA");
    let mut mts = cfg.clone();
    mts["modules_to_save"] = serde_json::json!(["embed_tokens"]);
    check(&mts, &w, &p, "modules_to_save", "not supported");
    // A target the model does not have.
    let mut tm = cfg.clone();
    tm["target_modules"] = serde_json::json!(["q_proj", "c_attn"]);
    check(&tm, &w, &p, "target_modules", "c_attn");
    // Truncated safetensors.
    check(&cfg, &w[..w.len() / 2], &p, "adapter_model.safetensors", "");
    // Wrong rank for the shapes.
    cfg["r"] = 16.into();
    check(&cfg, &w, &p, "adapter_model.safetensors", "needs");
}
