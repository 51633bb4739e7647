//! The prompt family over gRPC: PEFT's prompt-tuning and prefix-tuning fixtures imported,
//! served with PEFT's greedy tokens and `virtual_tokens` in usage, exported as PEFT wrote
//! them, refused when they cannot fit the context; a prompt-tuning job trained, registered
//! with its method and exported.

use std::time::Duration;

use graft_client::{proto as pb, proto::create_job_request::MethodConfig, GenerateOptions};
use graft_tests::{fixtures, start_real, start_tiny};
use tonic::Code;

fn method_files(method: &str) -> (Vec<u8>, Vec<u8>) {
    let d = fixtures().join("peft-methods").join(method).join("adapter");
    (
        std::fs::read(d.join("adapter_config.json")).expect("config"),
        std::fs::read(d.join("adapter_model.safetensors")).expect("weights"),
    )
}

fn reference(method: &str) -> serde_json::Value {
    let p = fixtures()
        .join("peft-methods")
        .join(method)
        .join("reference.json");
    serde_json::from_slice(&std::fs::read(p).expect("reference")).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_method_fixtures_serve_peft_tokens_and_export_unchanged() {
    let t = start_real().await;
    for (method, name, kind) in [
        ("prompt-tuning", "pt", "prompt_tuning"),
        ("prefix-tuning", "prefix", "prefix_tuning"),
    ] {
        let (c, w) = method_files(method);
        let v = t
            .client
            .import_adapter("", name, c, w.clone(), false)
            .await
            .expect("import");
        assert_eq!((v.method.as_str(), v.virtual_tokens), (kind, 8));
        let r = reference(method);
        let p = &r["prompts"][0];
        let question = p["messages"][0]["content"].as_str().expect("question");
        let want: Vec<u32> = p["adapted"]["greedy"]["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        let req = GenerateOptions {
            adapter: Some(name.into()),
            ..GenerateOptions::greedy(32)
        }
        .chat([("user", question)]);
        let out = t.client.generate(req).await.expect("generate");
        // PEFT's greedy continuation ignores end-of-sequence; graft stops there.
        let n = out.token_ids.len();
        assert!(n > 3, "{method}: {:?}", out.text);
        assert_eq!(out.token_ids[..], want[..n], "{method}: {:?}", out.text);
        let usage = out.usage.expect("usage");
        assert_eq!(usage.virtual_tokens, 8, "{method}");
        assert_eq!(
            usage.prompt_tokens as usize,
            p["token_ids"].as_array().expect("ids").len(),
            "{method}: prompt_tokens counts the real prompt only"
        );
        let (_, back) = t.client.export_adapter("", name).await.expect("export");
        assert_eq!(back, w, "{method}: exported as imported");
    }
    // Virtual tokens count against the context window: the error names both numbers.
    let long = "word ".repeat(8200);
    let e = t
        .client
        .generate(
            GenerateOptions {
                adapter: Some("pt".into()),
                ..GenerateOptions::greedy(4)
            }
            .prompt(&long),
        )
        .await
        .expect_err("too long");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("8 virtual tokens"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_tuning_job_trains_registers_and_exports() {
    let t = start_tiny().await;
    let lines: Vec<u8> = (0..16)
        .map(|i| {
            format!(
                "{{\"prompt\":\"Q{i}\",\"completion\":\" answer {}\"}}\n",
                i % 2
            )
        })
        .collect::<String>()
        .into_bytes();
    t.client
        .upload_dataset("", "d", "", lines)
        .await
        .expect("upload");
    let bad = t
        .client
        .create_job(pb::CreateJobRequest {
            dataset: "d".into(),
            adapter_name: "pt".into(),
            method: "prompt_tuning".into(),
            method_config: Some(MethodConfig::PromptTuning(pb::PromptTuningMethod {
                num_virtual_tokens: Some(500),
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .expect_err("over the cap");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("prompt_tuning.num_virtual_tokens"),
        "{}",
        bad.message()
    );
    let mismatch = t
        .client
        .create_job(pb::CreateJobRequest {
            dataset: "d".into(),
            adapter_name: "pt".into(),
            method: "lora".into(),
            method_config: Some(MethodConfig::PTuningV2(pb::PTuningV2Method::default())),
            ..Default::default()
        })
        .await
        .expect_err("settings of another method");
    assert_eq!(mismatch.code(), Code::InvalidArgument);
    let created = t
        .client
        .create_job(pb::CreateJobRequest {
            dataset: "d".into(),
            adapter_name: "pt".into(),
            method: "prompt_tuning".into(),
            method_config: Some(MethodConfig::PromptTuning(pb::PromptTuningMethod {
                num_virtual_tokens: Some(6),
                init: "text".into(),
                init_text: "answer".into(),
            })),
            hyperparameters: Some(pb::Hyperparameters {
                epochs: Some(2),
                checkpoint_every: Some(2),
                max_seq_len: Some(64),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create");
    let (_, done) = tokio::time::timeout(
        Duration::from_secs(300),
        t.client.follow_job("", &created.id),
    )
    .await
    .expect("in time")
    .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let v = t.client.get_adapter("", "pt").await.expect("registered");
    assert_eq!((v.method.as_str(), v.virtual_tokens), ("prompt_tuning", 6));
    let out = t
        .client
        .generate(
            GenerateOptions {
                adapter: Some("pt".into()),
                ..GenerateOptions::greedy(3)
            }
            .prompt("Q1"),
        )
        .await
        .expect("serves");
    assert_eq!(out.usage.expect("usage").virtual_tokens, 6);
    let (c, w) = t.client.export_adapter("", "pt").await.expect("export");
    let cfg: serde_json::Value = serde_json::from_slice(&c).expect("json");
    assert_eq!(cfg["peft_type"], "PROMPT_TUNING");
    assert_eq!(cfg["num_virtual_tokens"], 6);
    let st = safetensors::SafeTensors::deserialize(&w).expect("st");
    assert_eq!(st.tensor("prompt_embeddings").expect("t").shape()[0], 6);
}

/// Prompt-tuned sequences preempted for lack of KV blocks are re-seeded with their prefix on
/// readmission and generate exactly what they generate alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_prompt_tuned_sequences_generate_what_they_generate_alone() {
    // 14 blocks of 16 positions on the tiny model: six 85-position sequences cannot all fit.
    let t = graft_tests::start_with(graft_tests::tiny_model_path(), |c| {
        c.engine.kv_cache_bytes = 14 * 16 * 2 * 2 * 32 * 4;
    })
    .await;
    let model = t.server.engine().expect("ready").model().clone();
    let hidden = model.config().hidden_size;
    let mut s = 7u64;
    let emb: Vec<f32> = (0..20 * hidden)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let parsed = graft_server::adapters::formats::Parsed {
        details: graft_server::adapters::formats::Details::PromptTuning {
            num_virtual_tokens: 20,
        },
        adapter: Default::default(),
        prompt: Some(emb),
    };
    let (c, w) = graft_server::adapters::formats::write(&parsed, model.config(), &model.name)
        .expect("files");
    t.client
        .import_adapter("", "pt", c, w, true)
        .await
        .expect("import");
    let req = |i: usize| {
        GenerateOptions {
            adapter: Some("pt".into()),
            ..GenerateOptions::greedy(60)
        }
        .prompt(format!("q {i}"))
    };
    let mut solo = Vec::new();
    for i in 0..6 {
        solo.push(t.client.generate(req(i)).await.expect("solo").token_ids);
    }
    let before = t.server.engine().expect("ready").preemptions();
    let together = futures::future::join_all((0..6).map(|i| {
        let c = t.client.clone();
        async move { c.generate(req(i)).await.expect("together").token_ids }
    }))
    .await;
    assert!(
        t.server.engine().expect("ready").preemptions() > before,
        "the pool forced preemptions"
    );
    assert_eq!(together, solo);
}
