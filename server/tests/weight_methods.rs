//! IA3, DoRA and bottleneck adapters against the real ecosystem: PEFT's IA3 and DoRA
//! adapters and AdapterHub's Houlsby adapter in `tests/fixtures` served by graft give the
//! logits and greedy continuations transformers (+ PEFT / adapters) recorded; the serving
//! forward equals the plain forward at the `pre_linear`, `post_linear` and `after_sublayer`
//! hooks, and the merged-weight reference; files round-trip; one batch of base, LoRA, a
//! prompt method, IA3, DoRA and bottleneck rows equals their solo runs bit for bit; bad files
//! are refused naming the field.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::{fixtures, greedy, ids, log_softmax, model, seeded, top_k};
use graft_server::{
    adapters::{
        formats::{self, ImportPolicy},
        testing::random_lora,
    },
    model::{adapter::TensorAdapter, Adapter, BaseModel, KvCache, Llama, SeqChunk},
};

/// (name, folder under tests/fixtures, weights file)
const METHODS: [(&str, &str, &str); 3] = [
    ("ia3", "peft-methods/ia3", "adapter_model.safetensors"),
    ("dora", "peft-methods/dora", "adapter_model.safetensors"),
    ("bottleneck", "bottleneck-houlsby", "adapter.safetensors"),
];

const LOGPROB_TOL: f32 = 1e-3;

fn dir(folder: &str) -> PathBuf {
    fixtures().join(folder)
}

fn policy() -> ImportPolicy {
    ImportPolicy {
        max_rank: 64,
        max_virtual_tokens: 128,
        force: false,
        base_aliases: vec!["HuggingFaceTB/SmolLM2-135M-Instruct".into()],
    }
}

fn files(folder: &str, weights: &str) -> (Vec<u8>, Vec<u8>) {
    let d = dir(folder).join("adapter");
    (
        std::fs::read(d.join("adapter_config.json")).expect("config"),
        std::fs::read(d.join(weights)).expect("weights"),
    )
}

fn parsed(m: &BaseModel, (_, folder, weights): (&str, &str, &str)) -> formats::Parsed {
    let (c, w) = files(folder, weights);
    formats::parse(&c, &w, m.config(), &m.name, &policy()).expect("fixture imports")
}

fn served(m: &BaseModel, method: (&str, &str, &str)) -> Adapter {
    parsed(m, method).compile(&m.llama).expect("compiles")
}

fn check_against(want: &[f32], got: &[f32], what: &str) {
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
    assert!(worst <= LOGPROB_TOL, "{what}: {worst}");
}

#[test]
fn every_weight_method_fixture_reproduces_the_libraries_logits_and_greedy_tokens() {
    let m = model();
    for method in METHODS {
        let (name, folder, _) = method;
        let a = served(&m, method);
        let r = common::json(dir(folder).join("reference.json"));
        let refs = candle_core::safetensors::load(
            dir(folder).join("reference_logits.safetensors"),
            &Device::Cpu,
        )
        .expect("reference logits");
        for (i, p) in r["prompts"].as_array().expect("prompts").iter().enumerate() {
            let prompt = ids(&p["token_ids"]);
            for (which, adapter) in [("base", None), ("adapted", Some(&a))] {
                let want: Vec<f32> = refs[&format!("prompt{i}.{which}")]
                    .flatten_all()
                    .expect("flat")
                    .to_vec1()
                    .expect("vec");
                let want_ids = ids(&p[which]["greedy"]["ids"]);
                let (got, got_ids) = greedy(&m, adapter, &prompt, want_ids.len());
                let what = format!("{name} prompt {i} {which}");
                check_against(&want, &got, &what);
                assert_eq!(got_ids, want_ids, "{what}: greedy tokens");
            }
            // The adapter changes the answer: the check above is not the base's.
            let base = refs[&format!("prompt{i}.base")].flatten_all().expect("f");
            let adapted = refs[&format!("prompt{i}.adapted")]
                .flatten_all()
                .expect("f");
            let moved = (base - adapted)
                .expect("sub")
                .abs()
                .expect("abs")
                .max_all()
                .expect("max")
                .to_scalar::<f32>()
                .expect("s");
            assert!(
                moved > 0.5,
                "{name}: the fixture barely moves logits ({moved})"
            );
        }
    }
}
