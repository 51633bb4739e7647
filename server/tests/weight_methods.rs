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
use common::{assert_batch_equals_solo, fixtures, greedy, model};
use graft_server::{
    adapters::{
        formats::{self, ImportPolicy},
        testing::random_lora,
    },
    model::{adapter::TensorAdapter, Adapter, BaseModel, Llama},
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

#[test]
fn every_weight_method_fixture_reproduces_the_libraries_logits_and_greedy_tokens() {
    let m = model();
    for method in METHODS {
        let (name, folder, _) = method;
        let a = served(&m, method);
        common::assert_matches_fixture(&m, &dir(folder), &a, LOGPROB_TOL, name);
        let refs = candle_core::safetensors::load(
            dir(folder).join("reference_logits.safetensors"),
            &Device::Cpu,
        )
        .expect("reference logits");
        for i in 0..2 {
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

/// Last-position logits of `prompt` through the plain (tensor) forward with `a`'s hooks as
/// constants.
fn plain_logits(llama: &Llama, a: Option<&dyn TensorAdapter>, prompt: &[u32]) -> Vec<f32> {
    let ids_t = Tensor::from_slice(prompt, (1, prompt.len()), &Device::Cpu).expect("ids");
    let h = llama.forward_hidden(&ids_t, a).expect("plain");
    let last = h
        .narrow(1, prompt.len() - 1, 1)
        .expect("last")
        .reshape((1, llama.cfg.hidden_size))
        .expect("2d");
    llama
        .weights
        .lm_head
        .forward(&last)
        .expect("head")
        .squeeze(0)
        .expect("row")
        .to_vec1()
        .expect("vec")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The `pre_linear`/`post_linear` hooks (IA3 on k, v and down's input; DoRA's gain) and the
/// `after_sublayer` hook (the Houlsby bottlenecks): the serving forward with the adapter
/// equals the plain forward with the same adapter as constant tensors, and for the linear
/// methods the base with the adapter merged into its weights.
#[test]
fn serving_forward_equals_plain_forward_and_merged_weights_at_every_hook() {
    let m = model();
    let prompt: Vec<u32> = m.tokenizer.encode("The capital of France is").expect("ids");
    let base = plain_logits(&m.llama, None, &prompt);
    for method in METHODS {
        let a = served(&m, method);
        let (served_logits, _) = greedy(&m, Some(&a), &prompt, 1);
        let plain = plain_logits(&m.llama, Some(&a as &dyn TensorAdapter), &prompt);
        let d = max_diff(&plain, &served_logits);
        let moved = max_diff(&plain, &base);
        eprintln!(
            "{}: serving vs plain {d}, adapter moves logits by {moved}",
            method.0
        );
        assert!(
            moved > 0.5,
            "{}: adapter moves logits by only {moved}",
            method.0
        );
        assert!(d < 2e-3, "{}: hooks differ by {d}", method.0);
        if method.0 != "bottleneck" {
            let merged = Llama::new(
                m.config().clone(),
                a.merged_into(&m.llama.weights).expect("merge"),
                Device::Cpu,
            )
            .expect("model");
            let r = plain_logits(&merged, None, &prompt);
            let d = max_diff(&r, &served_logits);
            assert!(d < 2e-3, "{}: merged reference differs by {d}", method.0);
        }
    }
}

#[test]
fn exported_files_parse_back_to_the_same_adapter_with_the_librarys_names_and_config() {
    let m = model();
    for method in METHODS {
        let (name, folder, weights) = method;
        let a = parsed(&m, method);
        let (c, w) =
            formats::write(&a, m.config(), "HuggingFaceTB/SmolLM2-135M-Instruct").expect("write");
        assert_eq!(a.details.weights_file(), weights, "{name}");
        let b = formats::parse(&c, &w, m.config(), &m.name, &policy()).expect("parse back");
        assert_eq!(a.details, b.details, "{name}");
        assert_eq!(a.adapter, b.adapter, "{name}");
        // Every tensor comes back under the library's name, bit for bit.
        let (_, orig) = files(folder, weights);
        let t0 = safetensors::SafeTensors::deserialize(&orig).expect("st");
        let t1 = safetensors::SafeTensors::deserialize(&w).expect("st");
        let mut n0 = t0.names();
        let mut n1 = t1.names();
        n0.sort();
        n1.sort();
        assert_eq!(n0, n1, "{name}: tensor names");
        for n in n0 {
            let (x, y) = (t0.tensor(n).expect("t"), t1.tensor(n).expect("t"));
            assert_eq!((x.shape(), x.data()), (y.shape(), y.data()), "{name}: {n}");
        }
        let ours: serde_json::Value = serde_json::from_slice(&c).expect("json");
        let theirs = common::json(dir(folder).join("adapter/adapter_config.json"));
        if name == "bottleneck" {
            assert_eq!(ours["config"], theirs["config"], "{name}: the whole config");
            for k in ["name", "model_type", "hidden_size", "model_class"] {
                assert_eq!(ours[k], theirs[k], "{name}: {k}");
            }
        } else {
            for k in [
                "peft_type",
                "task_type",
                "r",
                "lora_alpha",
                "use_dora",
                "use_rslora",
                "fan_in_fan_out",
            ] {
                if let Some(v) = theirs.get(k) {
                    // 16 and 16.0 are the same number to PEFT.
                    match (v.as_f64(), ours.get(k).and_then(|o| o.as_f64())) {
                        (Some(x), Some(y)) => assert_eq!(x, y, "{name}: {k}"),
                        _ => assert_eq!(ours.get(k), Some(v), "{name}: {k}"),
                    }
                }
            }
            let set = |v: &serde_json::Value| {
                let mut s: Vec<String> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                s.sort();
                s
            };
            for k in ["target_modules", "feedforward_modules"] {
                assert_eq!(set(&ours[k]), set(&theirs[k]), "{name}: {k}");
            }
        }
    }
}

#[test]
fn one_batch_of_base_lora_prompt_ia3_dora_and_bottleneck_rows_equals_their_solo_runs() {
    let m = model();
    let lora = random_lora(&m, 7, 8, 0.05);
    let prompt_tuned = {
        let d = fixtures().join("peft-methods/prompt-tuning/adapter");
        let c = std::fs::read(d.join("adapter_config.json")).expect("config");
        let w = std::fs::read(d.join("adapter_model.safetensors")).expect("weights");
        formats::parse(&c, &w, m.config(), &m.name, &policy())
            .expect("parse")
            .compile(&m.llama)
            .expect("compile")
    };
    let mut adapters: Vec<Option<Adapter>> = vec![None, Some(lora), Some(prompt_tuned)];
    for method in METHODS {
        adapters.push(Some(served(&m, method)));
    }
    // Two rows of the same bottleneck adapter, one in prefill while another decodes.
    adapters.push(Some(served(&m, METHODS[2])));
    let prompts: Vec<Vec<u32>> = (0..adapters.len())
        .map(|i| {
            m.tokenizer
                .encode(&format!(
                    "Question {i}: name a colour of the sky at dusk{}.",
                    "!".repeat(i)
                ))
                .expect("ids")
        })
        .collect();
    assert_batch_equals_solo(&m, &adapters, &prompts, 5);
}

fn floats(t: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Safetensors bytes of `w` with tensor `name` replaced by `v` of shape `shape`.
fn replace(w: &[u8], name: &str, shape: Vec<usize>, v: Vec<f32>) -> Vec<u8> {
    common::safetensors_edit(w, |_| true, &[(name, shape, v)])
}

#[test]
fn bad_weight_method_files_are_refused_naming_the_field() {
    let m = model();
    let check = |c: &serde_json::Value, w: &[u8], field: &str, says: &str| {
        let e = formats::parse(
            &serde_json::to_vec(c).expect("json"),
            w,
            m.config(),
            &m.name,
            &policy(),
        )
        .expect_err("refused");
        assert!(e.field.contains(field), "{field}: {e}");
        assert!(e.reason.contains(says), "{says}: {e}");
    };
    let json = |b: &[u8]| -> serde_json::Value { serde_json::from_slice(b).expect("json") };

    // IA3: a vector of the wrong length; feedforward_modules outside target_modules.
    let (c, w) = files("peft-methods/ia3", "adapter_model.safetensors");
    let c = json(&c);
    let k = "base_model.model.model.layers.3.self_attn.k_proj.ia3_l";
    let bad = replace(&w, k, vec![191, 1], vec![1.0; 191]);
    check(
        &c,
        &bad,
        "model.layers.3.self_attn.k_proj.ia3_l",
        "[192, 1]",
    );
    let d = "base_model.model.model.layers.0.mlp.down_proj.ia3_l";
    let bad = replace(&w, d, vec![1536, 1], vec![1.0; 1536]);
    check(&c, &bad, "down_proj.ia3_l", "feed-forward");
    let mut bad = c.clone();
    bad["feedforward_modules"] = serde_json::json!(["down_proj", "up_proj"]);
    check(&bad, &w, "feedforward_modules", "subset");

    // DoRA: a magnitude of the wrong length, a missing one.
    let (c, w) = files("peft-methods/dora", "adapter_model.safetensors");
    let c = json(&c);
    let mname = "base_model.model.model.layers.2.self_attn.v_proj.lora_magnitude_vector";
    let bad = replace(&w, mname, vec![190], vec![1.0; 190]);
    check(&c, &bad, "v_proj.lora_magnitude_vector", "[192]");
    let mut no_dora = c.clone();
    no_dora["use_dora"] = false.into();
    check(
        &no_dora,
        &w,
        "adapter_model.safetensors",
        "use_dora is false",
    );

    // AdapterHub: an unknown architecture, an unknown non-linearity, parallel adapters,
    // a bottleneck of the wrong width.
    let (c, w) = files("bottleneck-houlsby", "adapter.safetensors");
    let c = json(&c);
    let mut bad = c.clone();
    bad["config"]["architecture"] = "union".into();
    check(&bad, &w, "config.architecture", "not supported");
    let mut bad = c.clone();
    bad["config"]["non_linearity"] = "softsign".into();
    check(&bad, &w, "config.non_linearity", "softsign");
    let mut bad = c.clone();
    bad["config"]["is_parallel"] = true.into();
    check(&bad, &w, "config.is_parallel", "parallel");
    let mut bad = c.clone();
    bad["config"]["reduction_factor"] = 8.into();
    check(&bad, &w, "adapter_down.0.weight", "[72, 576]");
    let mut bad = c.clone();
    bad["model_type"] = "gpt2".into();
    check(&bad, &w, "model_type", "gpt2");
    // A weight of the config's adapter that is not in the file.
    let st = safetensors::SafeTensors::deserialize(&w).expect("st");
    let up = "model.layers.5.output_adapters.adapters.houlsby.adapter_up.bias";
    let t = st.tensor(up).expect("t");
    let bad = replace(&w, up, vec![575], floats(&t)[..575].to_vec());
    check(&c, &bad, up, "[576]");
}
