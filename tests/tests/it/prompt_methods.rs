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
