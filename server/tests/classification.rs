//! Classification heads against the real ecosystem: PEFT's `SEQ_CLS` LoRA fixture (a `score`
//! head saved through `modules_to_save`, 3 labels) served by graft gives the class logits
//! transformers' `LlamaForSequenceClassification` recorded, on the serving path (the output
//! hook of `forward_step`) and the plain path; classification rows share a step with
//! generation rows of every other method and each equals its solo run bit for bit; the head
//! round-trips through PEFT's files; bad heads are refused naming the field.

mod common;

use common::{fixtures, json, model, seeded, top_k};
use graft_server::{
    adapters::{
        formats::{self, ImportPolicy},
        testing::random_lora,
    },
    model::{Adapter, BaseModel, SeqChunk},
};

const TOL: f32 = 1e-3;

fn policy() -> ImportPolicy {
    ImportPolicy {
        max_rank: 64,
        max_virtual_tokens: 128,
        force: false,
        base_aliases: vec!["HuggingFaceTB/SmolLM2-135M-Instruct".into()],
    }
}

fn files(folder: &str, weights: &str) -> (Vec<u8>, Vec<u8>) {
    let d = fixtures().join(folder).join("adapter");
    (
        std::fs::read(d.join("adapter_config.json")).expect("config"),
        std::fs::read(d.join(weights)).expect("weights"),
    )
}

fn parse(m: &BaseModel, c: &[u8], w: &[u8]) -> Result<formats::Parsed, formats::ImportError> {
    formats::parse(c, w, m.config(), &m.name, &policy())
}

fn served(m: &BaseModel, folder: &str, weights: &str) -> Adapter {
    let (c, w) = files(folder, weights);
    parse(m, &c, &w)
        .expect("fixture imports")
        .compile(&m.llama)
        .expect("compiles")
}

#[test]
fn the_seq_cls_fixture_reproduces_the_class_logits_of_transformers_on_both_paths() {
    let m = model();
    let a = served(&m, "peft-methods/seq-cls", "adapter_model.safetensors");
    let head = a.head.as_ref().expect("a head");
    assert_eq!(head.num_labels(), 3);
    assert_eq!(head.labels, ["LABEL_0", "LABEL_1", "LABEL_2"]);
    let r = json(fixtures().join("peft-methods/seq-cls/reference.json"));
    let labels: Vec<&str> = r["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .map(|l| l.as_str().expect("label"))
        .collect();
    for (i, case) in r["cases"].as_array().expect("cases").iter().enumerate() {
        let want_ids = common::ids(&case["token_ids"]);
        let text = case["text"].as_str().expect("text");
        assert_eq!(m.tokenizer.encode(text).expect("ids"), want_ids, "case {i}");
        let want: Vec<f32> = case["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|x| x.as_f64().expect("f") as f32)
            .collect();
        let got = common::served_last_logits(&m, &a, &want_ids);
        let d = common::max_abs_diff(&want, &got);
        eprintln!("case {i}: served class logits within {d} of transformers'");
        assert!(d <= TOL, "case {i} served: {got:?} vs {want:?}");
        let plain = m.llama.output_reference(&want_ids, &a).expect("plain");
        let d = common::max_abs_diff(&want, &plain);
        assert!(d <= TOL, "case {i} plain: {plain:?} vs {want:?}");
        let best = top_k(&got, 1)[0] as usize;
        assert_eq!(
            labels[best],
            case["predicted"].as_str().expect("p"),
            "case {i}"
        );
    }
}

#[test]
#[allow(clippy::needless_range_loop)] // `s` indexes the solo runs' steps and the batch's.
fn classification_rows_share_a_step_with_generation_rows_of_every_method_and_equal_their_solo_runs()
{
    let m = model();
    let classifier = served(&m, "peft-methods/seq-cls", "adapter_model.safetensors");
    let generators: Vec<Option<Adapter>> = vec![
        None,
        Some(random_lora(&m, 7, 8, 0.05)),
        Some(served(
            &m,
            "peft-methods/prompt-tuning",
            "adapter_model.safetensors",
        )),
        Some(served(&m, "peft-methods/ia3", "adapter_model.safetensors")),
        Some(served(&m, "peft-methods/dora", "adapter_model.safetensors")),
        Some(served(&m, "bottleneck-houlsby", "adapter.safetensors")),
    ];
    let prompt = |i: usize| {
        m.tokenizer
            .encode(&format!(
                "Question {i}: what is warm in winter{}?",
                "?".repeat(i)
            ))
            .expect("ids")
    };
    let texts: Vec<Vec<u32>> = ["The curry was too spicy.", "Snow is falling on the pitch."]
        .iter()
        .map(|t| m.tokenizer.encode(t).expect("ids"))
        .collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    // Solo: each generation row greedy for 3 steps, each text classified alone.
    let solo: Vec<Vec<Vec<u32>>> = generators
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut pool = m.llama.kv_pool(1024).expect("KV pool");
            let mut cache = seeded(&mut pool, a.as_ref());
            let mut next = prompt(i);
            (0..3)
                .map(|s| {
                    let row = m
                        .llama
                        .forward_step(
                            &mut pool,
                            &mut [SeqChunk {
                                tokens: &next,
                                cache: &mut cache,
                                want_logits: true,
                                decode: s > 0,
                                adapter: a.as_ref(),
                            }],
                        )
                        .expect("solo")
                        .remove(0);
                    next = vec![top_k(&row, 1)[0]];
                    bits(&row)
                })
                .collect()
        })
        .collect();
    let solo_classes: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| bits(&common::served_last_logits(&m, &classifier, t)))
        .collect();
    // Together: generation prompts prefill at step 0; at step 1 the texts are classified
    // beside the decode rows; step 2 decodes only.
    let mut pool = m.llama.kv_pool(8192).expect("KV pool");
    let mut caches: Vec<_> = generators
        .iter()
        .map(|a| seeded(&mut pool, a.as_ref()))
        .collect();
    let mut text_caches: Vec<_> = texts.iter().map(|_| seeded(&mut pool, None)).collect();
    let mut next: Vec<Vec<u32>> = (0..generators.len()).map(prompt).collect();
    for s in 0..3 {
        let mut chunks: Vec<SeqChunk<'_>> = caches
            .iter_mut()
            .zip(&next)
            .zip(&generators)
            .map(|((cache, t), a)| SeqChunk {
                tokens: t,
                cache,
                want_logits: true,
                decode: s > 0,
                adapter: a.as_ref(),
            })
            .collect();
        if s == 1 {
            // Classification rows first: the order in the step must not matter either.
            let rows: Vec<SeqChunk<'_>> = text_caches
                .iter_mut()
                .zip(&texts)
                .map(|(cache, t)| SeqChunk {
                    tokens: t,
                    cache,
                    want_logits: true,
                    decode: false,
                    adapter: Some(&classifier),
                })
                .collect();
            chunks.splice(0..0, rows);
        }
        let mut out = m.llama.forward_step(&mut pool, &mut chunks).expect("step");
        if s == 1 {
            for (i, row) in out.drain(..texts.len()).enumerate() {
                assert_eq!(row.len(), 3, "text {i}: one logit per label");
                assert!(
                    bits(&row) == solo_classes[i],
                    "text {i} differs from its solo run"
                );
            }
        }
        for (i, row) in out.iter().enumerate() {
            assert_eq!(row.len(), m.config().vocab_size);
            assert!(
                bits(row) == solo[i][s],
                "generation row {i} differs from its solo run at step {s}"
            );
            next[i] = vec![top_k(row, 1)[0]];
        }
    }
}

#[test]
fn a_head_round_trips_through_peft_files_and_rides_on_any_peft_method() {
    let m = model();
    let (c, w) = files("peft-methods/seq-cls", "adapter_model.safetensors");
    let p = parse(&m, &c, &w).expect("parse");
    let (c2, w2) =
        formats::write(&p, m.config(), "HuggingFaceTB/SmolLM2-135M-Instruct").expect("write");
    let cfg: serde_json::Value = serde_json::from_slice(&c2).expect("json");
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert!(cfg["modules_to_save"]
        .as_array()
        .expect("list")
        .contains(&serde_json::json!("score")));
    let st = safetensors::SafeTensors::deserialize(&w2).expect("st");
    assert_eq!(
        st.tensor("base_model.model.score.weight")
            .expect("head")
            .shape(),
        [3, 576]
    );
    let q = parse(&m, &c2, &w2).expect("re-parse");
    assert_eq!(q.adapter, p.adapter);
    // The same head on IA3's files: the head is its own part, beside any method.
    let (ic, iw) = files("peft-methods/ia3", "adapter_model.safetensors");
    let mut ia3 = parse(&m, &ic, &iw).expect("ia3");
    ia3.adapter.head = p.adapter.head.clone();
    let (c3, w3) = formats::write(&ia3, m.config(), "HuggingFaceTB/SmolLM2-135M-Instruct")
        .expect("write ia3 + head");
    let back = parse(&m, &c3, &w3).expect("parse ia3 + head");
    assert_eq!(back.adapter, ia3.adapter);
    assert_eq!(back.details.method(), "ia3");
}

#[test]
fn bad_heads_are_refused_naming_the_field() {
    let m = model();
    let (c, w) = files("peft-methods/seq-cls", "adapter_model.safetensors");
    let cfg: serde_json::Value = serde_json::from_slice(&c).expect("json");
    let check = |c: &serde_json::Value, w: &[u8], field: &str, says: &str| {
        let e = parse(&m, &serde_json::to_vec(c).expect("json"), w).expect_err("refused");
        assert_eq!(e.field, field, "{e}");
        assert!(e.reason.contains(says), "{e}");
    };
    let mut other = cfg.clone();
    other["modules_to_save"] = serde_json::json!(["embed_tokens"]);
    check(
        &other,
        &w,
        "adapter_config.json.modules_to_save",
        "\"embed_tokens\" is not supported",
    );
    other["modules_to_save"] = serde_json::json!("score");
    check(&other, &w, "adapter_config.json.modules_to_save", "a list");
    // A head whose width is not the model's hidden size.
    let rebuilt = |drop_head: bool, extra: Option<(&str, Vec<usize>)>| {
        let set: Vec<(&str, Vec<usize>, Vec<f32>)> = extra
            .into_iter()
            .map(|(n, shape)| {
                let len = shape.iter().product();
                (n, shape, vec![0.0; len])
            })
            .collect();
        common::safetensors_edit(&w, |n| !(drop_head && n.contains("score")), &set)
    };
    let narrow = rebuilt(true, Some(("base_model.model.score.weight", vec![3, 100])));
    check(&cfg, &narrow, "adapter_model.safetensors", "[num_labels");
    let none = rebuilt(true, None);
    check(&cfg, &none, "adapter_model.safetensors", "holds no");
    let bias = rebuilt(false, Some(("base_model.model.score.bias", vec![3])));
    check(&cfg, &bias, "adapter_model.safetensors", "bias");
    // A head tensor without modules_to_save is not LoRA's either.
    let mut bare = cfg.clone();
    bare["modules_to_save"] = serde_json::Value::Null;
    let e = parse(&m, &serde_json::to_vec(&bare).expect("json"), &w).expect_err("refused");
    assert_eq!(e.field, "adapter_model.safetensors", "{e}");
}
