//! The prompt family against the real ecosystem: PEFT's prompt tuning, P-tuning (MLP),
//! prefix tuning (with projection) and P-tuning v2 adapters in `tests/fixtures/peft-methods`
//! served by graft give the logits and greedy continuations transformers + PEFT recorded;
//! the serving forward equals the plain forward at the KV-prefix hook; files round-trip;
//! one batch of base, LoRA and prompt-method rows equals their solo runs bit for bit; bad
//! files are refused naming the field.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::{assert_batch_equals_solo, fixtures, greedy, model};
use graft_server::{
    adapters::{
        formats::{self, ImportPolicy},
        testing::random_lora,
    },
    model::{adapter::TensorAdapter, Adapter, BaseModel},
};

const METHODS: [&str; 4] = [
    "prompt-tuning",
    "p-tuning-mlp",
    "prefix-tuning",
    "p-tuning-v2",
];

/// Same tolerance as the LoRA fixture's: same dequantised weights as the reference, only
/// float order differs.
const LOGPROB_TOL: f32 = 1e-3;

fn dir(method: &str) -> PathBuf {
    fixtures().join("peft-methods").join(method)
}

fn policy() -> ImportPolicy {
    ImportPolicy {
        max_rank: 64,
        max_virtual_tokens: 128,
        force: false,
        base_aliases: vec!["HuggingFaceTB/SmolLM2-135M-Instruct".into()],
    }
}

fn files(method: &str) -> (Vec<u8>, Vec<u8>) {
    let d = dir(method).join("adapter");
    (
        std::fs::read(d.join("adapter_config.json")).expect("config"),
        std::fs::read(d.join("adapter_model.safetensors")).expect("weights"),
    )
}

fn parsed(m: &BaseModel, method: &str) -> formats::Parsed {
    let (c, w) = files(method);
    formats::parse(&c, &w, m.config(), &m.name, &policy()).expect("fixture imports")
}

fn served(m: &BaseModel, method: &str) -> Adapter {
    parsed(m, method).compile(&m.llama).expect("compiles")
}

#[test]
fn every_prompt_method_fixture_reproduces_peft_logits_and_greedy_tokens() {
    let m = model();
    for method in METHODS {
        let a = served(&m, method);
        assert_eq!(a.virtual_tokens(), 8, "{method}");
        common::assert_matches_fixture(&m, &dir(method), &a, LOGPROB_TOL, method);
    }
}

/// The KV-prefix hook (and, for prompt tuning, the embedding hook it is compiled from):
/// the serving forward with the adapter equals the plain forward with the same adapter as
/// constant tensors.
#[test]
fn serving_forward_equals_plain_forward_at_the_kv_prefix_and_embedding_hooks() {
    let m = model();
    let prompt: Vec<u32> = m.tokenizer.encode("The capital of France is").expect("ids");
    for method in METHODS {
        let p = parsed(&m, method);
        let a = p.compile(&m.llama).expect("compiles");
        let ids_t = Tensor::from_slice(&prompt, (1, prompt.len()), &Device::Cpu).expect("ids");
        // Plain path, with the prefix as constant tensors.
        let h = m
            .llama
            .forward_hidden(&ids_t, Some(&a as &dyn TensorAdapter))
            .expect("plain");
        let last = h
            .narrow(1, prompt.len() - 1, 1)
            .expect("last")
            .reshape((1, m.config().hidden_size))
            .expect("2d");
        let plain: Vec<f32> = m
            .llama
            .weights
            .lm_head
            .forward(&last)
            .expect("head")
            .squeeze(0)
            .expect("row")
            .to_vec1()
            .expect("vec");
        let (served_logits, _) = greedy(&m, Some(&a), &prompt, 1);
        let d = plain
            .iter()
            .zip(&served_logits)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 2e-3, "{method}: kv prefix hook differs by {d}");
        if let Some(emb) = &p.prompt {
            // The embedding hook: virtual inputs through the plain forward.
            struct Embeds(Tensor);
            impl TensorAdapter for Embeds {
                fn prompt(&self) -> candle_core::Result<Option<Tensor>> {
                    Ok(Some(self.0.clone()))
                }
            }
            let e = Tensor::from_slice(
                emb,
                (emb.len() / m.config().hidden_size, m.config().hidden_size),
                &Device::Cpu,
            )
            .expect("embeds");
            let h2 = m
                .llama
                .forward_hidden(&ids_t, Some(&Embeds(e)))
                .expect("plain");
            let d2 = (h2 - &h)
                .expect("sub")
                .abs()
                .expect("abs")
                .max_all()
                .expect("max")
                .to_scalar::<f32>()
                .expect("scalar");
            assert!(d2 < 1e-3, "{method}: embedding hook differs by {d2}");
        }
    }
}

#[test]
fn exported_files_parse_back_to_the_same_adapter_with_what_peft_needs() {
    let m = model();
    for method in METHODS {
        let a = parsed(&m, method);
        let (c, w) =
            formats::write(&a, m.config(), "HuggingFaceTB/SmolLM2-135M-Instruct").expect("write");
        let b = formats::parse(&c, &w, m.config(), &m.name, &policy()).expect("parse back");
        assert_eq!(a.details, b.details, "{method}");
        assert_eq!(a.prompt, b.prompt, "{method}");
        assert_eq!(a.adapter, b.adapter, "{method}");
        // The tensor comes back bit for bit as PEFT wrote it.
        let (_, orig) = files(method);
        let t0 = safetensors::SafeTensors::deserialize(&orig).expect("st");
        let t1 = safetensors::SafeTensors::deserialize(&w).expect("st");
        let (x, y) = (
            t0.tensor("prompt_embeddings").expect("t"),
            t1.tensor("prompt_embeddings").expect("t"),
        );
        assert_eq!((x.shape(), x.data()), (y.shape(), y.data()), "{method}");
        let ours: serde_json::Value = serde_json::from_slice(&c).expect("json");
        let theirs = common::json(dir(method).join("adapter/adapter_config.json"));
        for k in [
            "peft_type",
            "task_type",
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "inference_mode",
            "prefix_projection",
            "encoder_reparameterization_type",
            "encoder_hidden_size",
        ] {
            if let Some(v) = theirs.get(k) {
                assert_eq!(ours.get(k), Some(v), "{method}: {k}");
            }
        }
    }
}

#[test]
fn one_batch_of_base_lora_and_prompt_method_rows_equals_their_solo_runs() {
    let m = model();
    let lora = random_lora(&m, 7, 8, 0.05);
    let mut adapters: Vec<Option<Adapter>> = vec![None, Some(lora)];
    for method in METHODS {
        adapters.push(Some(served(&m, method)));
    }
    let prompts: Vec<Vec<u32>> = (0..adapters.len())
        .map(|i| {
            m.tokenizer
                .encode(&format!("Question {i}: name a colour of the sky at dusk."))
                .expect("ids")
        })
        .collect();
    assert_batch_equals_solo(&m, &adapters, &prompts, 5);
}

#[test]
fn bad_prompt_method_files_are_refused_naming_the_field() {
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
    for method in METHODS {
        let (c, w) = files(method);
        let c: serde_json::Value = serde_json::from_slice(&c).expect("json");
        let mut bad = c.clone();
        bad["task_type"] = "SEQ_CLS".into();
        check(&bad, &w, "task_type", "CAUSAL_LM");
        for n in [0, 129] {
            let mut bad = c.clone();
            bad["num_virtual_tokens"] = n.into();
            check(&bad, &w, "num_virtual_tokens", "1 to 128");
        }
        // A tensor of the wrong width (one column short).
        let st = safetensors::SafeTensors::deserialize(&w).expect("st");
        let t = st.tensor("prompt_embeddings").expect("t");
        let (p, width) = (t.shape()[0], t.shape()[1]);
        let floats: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let narrow: Vec<f32> = floats
            .chunks_exact(width)
            .flat_map(|r| r[..width - 1].to_vec())
            .collect();
        let write = |shape: Vec<usize>, v: &[f32]| -> Vec<u8> {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
                .expect("view");
            safetensors::serialize([("prompt_embeddings", view)], None).expect("st")
        };
        let what = if method.starts_with("prefix") || method == "p-tuning-v2" {
            "layers 30 x 2 x KV heads 3 x head_dim 64"
        } else {
            "hidden size"
        };
        check(
            &c,
            &write(vec![p, width - 1], &narrow),
            "adapter_model.safetensors",
            what,
        );
        let mut nan = floats.clone();
        nan[5] = f32::NAN;
        check(
            &c,
            &write(vec![p, width], &nan),
            "adapter_model.safetensors",
            "NaN",
        );
    }
    // The KV heads of a prefix must be the model's (GQA: 3, not the 9 query heads).
    let (c, w) = files("prefix-tuning");
    let mut bad: serde_json::Value = serde_json::from_slice(&c).expect("json");
    bad["num_attention_heads"] = 9.into();
    check(&bad, &w, "num_attention_heads", "KV heads");
}
