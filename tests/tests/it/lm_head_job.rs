//! A job that trains a replaced LM head (`train_lm_head`) beside LoRA, over gRPC on the
//! tiny model: the version says it replaces the head, its PEFT export carries the trained
//! head in `modules_to_save` (moved from the base's), and those files imported back serve the
//! same tokens.

use graft_client::{
    proto::{self as pb, create_job_request::MethodConfig},
    GenerateOptions,
};
use graft_tests::{start_tiny, tiny_model_path};

const HEAD: &str = "base_model.model.lm_head.weight";

fn greedy(adapter: &str, prompt: &str) -> pb::GenerateRequest {
    GenerateOptions {
        adapter: Some(adapter.into()),
        ..GenerateOptions::greedy(8)
    }
    .chat([("user", prompt)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_a_replaced_lm_head_that_exports_and_serves() {
    let t = start_tiny().await;
    let rows: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"Say {i}.\", \"completion\": \" ok {i}\"}}\n"))
        .collect();
    t.client
        .upload_dataset("", "answers", "", rows.into_bytes())
        .await
        .expect("upload");
    let created = t
        .client
        .create_job(pb::CreateJobRequest {
            dataset: "answers".into(),
            adapter_name: "own-head".into(),
            method: "lora".into(),
            method_config: Some(MethodConfig::Lora(pb::LoraMethod {
                r: Some(4),
                alpha: Some(8.0),
                target_modules: vec!["q_proj".into(), "v_proj".into()],
                ..Default::default()
            })),
            train_lm_head: true,
            hyperparameters: Some(pb::Hyperparameters {
                epochs: Some(2),
                batch_size: Some(4),
                learning_rate: Some(1e-2),
                seed: Some(9),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create");
    let (_, done) = t.client.follow_job("", &created.id).await.expect("follow");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let v = t.client.get_adapter("", "own-head").await.expect("version");
    assert!(v.lm_head, "{v:?}");
    assert!(v.head.is_none());

    // The export: PEFT's modules_to_save with the whole trained head, not the base's.
    let (config, weights) = t
        .client
        .export_adapter("", "own-head")
        .await
        .expect("export");
    let cfg: serde_json::Value = serde_json::from_slice(&config).expect("config");
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["lm_head"]),
        "{cfg}"
    );
    let st = safetensors::SafeTensors::deserialize(&weights).expect("safetensors");
    let head = st.tensor(HEAD).expect("the trained head");
    let m = graft_server::model::BaseModel::load(&tiny_model_path(), &candle_core::Device::Cpu)
        .expect("tiny");
    let (vocab, hidden) = (m.config().vocab_size, m.config().hidden_size);
    assert_eq!(head.shape(), [vocab, hidden]);
    assert_eq!(head.dtype(), safetensors::Dtype::F32);
    let trained: Vec<f32> = head
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let base: Vec<f32> = m
        .llama
        .weights
        .lm_head
        .weight()
        .expect("lm head")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("base");
    let moved = trained
        .iter()
        .zip(&base)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-4, "the head did not train: max change {moved}");

    // Imported back, the files serve what the trained version serves.
    t.client
        .import_adapter("", "reimported", config, weights, false)
        .await
        .expect("import");
    for prompt in ["Say 3.", "Say 12."] {
        let a = t
            .client
            .generate(greedy("own-head", prompt))
            .await
            .expect("trained");
        let b = t
            .client
            .generate(greedy("reimported", prompt))
            .await
            .expect("reimported");
        assert!(!a.token_ids.is_empty());
        assert_eq!(a.token_ids, b.token_ids, "{prompt}");
    }
}
