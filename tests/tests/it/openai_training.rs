//! OpenAI's files and fine-tuning API on graft's datasets and jobs, driven by `async-openai`:
//! a chat JSONL uploaded as a file trains a LoRA on the real model through
//! `client.fine_tuning().create(...)`, and the job's `fine_tuned_model` answers at once.

use std::{net::SocketAddr, time::Duration};

use async_openai::{
    config::OpenAIConfig,
    error::OpenAIError,
    types::{
        chat::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs},
        files::{CreateFileRequest, FileInput, FilePurpose},
        finetuning::{
            BatchSize, CreateFineTuningJobRequestArgs, FineTuneMethod,
            FineTuneSupervisedHyperparameters, FineTuneSupervisedMethod, FineTuningJobStatus,
            LearningRateMultiplier, NEpochs,
        },
    },
    Client,
};
use graft_tests::{fixtures, real_model_path, start_with, tiny_model_path, TestServer, TENANT};
use serde_json::{json, Value};

async fn start(model: std::path::PathBuf) -> (TestServer, Client<OpenAIConfig>, String) {
    let ts = start_with(model, |c| {
        c.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        c.training_threads = 2;
    })
    .await;
    let key = ts.admin.create_key(TENANT, "openai").await.expect("key");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let addr = ts.server.http_addr.expect("HTTP front");
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{addr}/v1"))
            .with_api_key(&key),
    );
    (ts, client, key)
}

/// The Alpaca fixture as OpenAI's supervised chat format.
fn chat_jsonl() -> Vec<u8> {
    let path = fixtures().join("peft-lora-smollm2/train_dataset_alpaca.json");
    let rows: Vec<Value> =
        serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json");
    rows.iter()
        .map(|r| {
            let mut user = r["instruction"].as_str().unwrap_or_default().to_string();
            if let Some(i) = r["input"].as_str().filter(|i| !i.is_empty()) {
                user = format!("{user}\n\n{i}");
            }
            let line = json!({"messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": r["output"], "weight": 1},
            ]});
            format!("{line}\n")
        })
        .collect::<String>()
        .into_bytes()
}

fn status_of(e: OpenAIError) -> (u16, Option<String>) {
    match e {
        OpenAIError::ApiError(r) => (r.status_code.as_u16(), r.api_error.param),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// `(status, body)` of a raw HTTP/1.1 GET.
async fn get(addr: SocketAddr, path: &str, key: &str) -> (u16, Value) {
    let (status, _, body) = graft_tests::http_json(addr, "GET", path, Some(key), None).await;
    (status, serde_json::from_str(&body).expect("json body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fine_tuning_job_from_an_uploaded_file_serves_its_model() {
    let (ts, oa, key) = start(real_model_path()).await;
    let base = ts.server.engine().expect("ready").model().name.clone();
    let bytes = chat_jsonl();
    let file = oa
        .files()
        .create(CreateFileRequest {
            file: FileInput::from_vec_u8("answers.jsonl".into(), bytes.clone()),
            purpose: FilePurpose::FineTune,
            expires_after: None,
        })
        .await
        .expect("upload");
    assert!(file.id.starts_with("file-"), "{}", file.id);
    assert_eq!(file.filename, "answers.jsonl");
    assert_eq!(file.bytes, Some(bytes.len() as u32));
    assert_eq!(
        oa.files().retrieve(&file.id).await.expect("get").id,
        file.id
    );
    assert!(oa
        .files()
        .list()
        .await
        .expect("list")
        .data
        .iter()
        .any(|f| f.id == file.id));
    assert_eq!(
        oa.files()
            .content(&file.id)
            .await
            .expect("content")
            .to_vec(),
        bytes
    );
    // The same object is a graft dataset: its chat rows were validated and counted.
    let ds = ts
        .client
        .training()
        .get_dataset(graft_client::proto::GetDatasetRequest {
            tenant: String::new(),
            name: file.id.clone(),
        })
        .await
        .expect("dataset")
        .into_inner();
    assert_eq!((ds.examples, ds.format.as_str()), (42, "chat"));
    assert_eq!(ds.filename, "answers.jsonl");

    let job = oa
        .fine_tuning()
        .create(
            CreateFineTuningJobRequestArgs::default()
                .model(&base)
                .training_file(&file.id)
                .suffix("answers")
                .seed(7u32)
                .method(FineTuneMethod::Supervised {
                    supervised: FineTuneSupervisedMethod {
                        hyperparameters: FineTuneSupervisedHyperparameters {
                            n_epochs: NEpochs::NEpochs(3),
                            batch_size: BatchSize::Auto,
                            learning_rate_multiplier:
                                LearningRateMultiplier::LearningRateMultiplier(10.0),
                        },
                    },
                })
                .build()
                .expect("request"),
        )
        .await
        .expect("create job");
    assert_eq!(job.object, "fine_tuning.job");
    assert_eq!(job.training_file, file.id);
    assert_eq!(job.seed, Some(7));
    assert!(job.fine_tuned_model.is_none());
    // "auto" comes back as graft's default; the multiplier as given.
    let h = job.hyperparameters.clone().expect("hyperparameters");
    assert_eq!(h.batch_size, BatchSize::BatchSize(4));
    assert_eq!(h.n_epochs, NEpochs::NEpochs(3));
    match h.learning_rate_multiplier {
        LearningRateMultiplier::LearningRateMultiplier(m) => assert!((m - 10.0).abs() < 1e-4),
        other => panic!("{other:?}"),
    }
    let done = tokio::time::timeout(Duration::from_secs(900), async {
        loop {
            let j = oa.fine_tuning().retrieve(&job.id).await.expect("retrieve");
            if matches!(
                j.status,
                FineTuningJobStatus::Succeeded
                    | FineTuningJobStatus::Failed
                    | FineTuningJobStatus::Cancelled
            ) {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .expect("the job ends in time");
    assert_eq!(
        done.status,
        FineTuningJobStatus::Succeeded,
        "{:?}",
        done.error
    );
    assert!(done.finished_at.is_some());
    let model = done.fine_tuned_model.clone().expect("fine_tuned_model");
    assert!(model.starts_with("ft-answers-"), "{model}");
    // Events, newest first: the end, step metrics with a falling loss, the start.
    let events = oa
        .fine_tuning()
        .list_events(&job.id)
        .await
        .expect("events")
        .data;
    assert!(events[0].message.contains("succeeded"), "{:?}", events[0]);
    let losses: Vec<f64> = events
        .iter()
        .rev()
        .filter_map(|e| e.data.as_ref()?.get("train_loss")?.as_f64())
        .collect();
    assert!(losses.len() >= 10, "{losses:?}");
    assert!(
        losses[losses.len() - 1] < losses[0] / 2.0,
        "the loss falls: {losses:?}"
    );
    let addr = ts.server.http_addr.expect("HTTP");
    let (s, ckpts) = get(
        addr,
        &format!("/v1/fine_tuning/jobs/{}/checkpoints", job.id),
        &key,
    )
    .await;
    assert_eq!(s, 200, "{ckpts}");
    assert_eq!(ckpts["object"], "list");
    let (s, page) = get(
        addr,
        &format!("/v1/fine_tuning/jobs/{}/events?limit=2", job.id),
        &key,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(page["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(page["has_more"], true);
    assert!(oa
        .fine_tuning()
        .list_paginated()
        .await
        .expect("jobs")
        .data
        .iter()
        .any(|j| j.id == job.id));
    // The new model answers in the trained form, named as OpenAI names it.
    let answer = oa
        .chat()
        .create(
            CreateChatCompletionRequestArgs::default()
                .model(&model)
                .messages(vec![ChatCompletionRequestUserMessageArgs::default()
                    .content("What is the capital of Germany?")
                    .build()
                    .expect("message")
                    .into()])
                .temperature(0.0)
                .max_tokens(16u32)
                .build()
                .expect("request"),
        )
        .await
        .expect("chat with the fine-tuned model");
    let text = answer.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    assert!(text.starts_with("ANSWER:"), "{text}");
    assert!(oa
        .models()
        .list()
        .await
        .expect("models")
        .data
        .iter()
        .any(|m| m.id == model));
    // Deleting the file leaves the job and its model.
    assert!(oa.files().delete(&file.id).await.expect("delete").deleted);
    assert_eq!(
        status_of(oa.files().retrieve(&file.id).await.expect_err("gone")).0,
        404
    );
    assert_eq!(
        oa.fine_tuning()
            .retrieve(&job.id)
            .await
            .expect("job stays")
            .status,
        FineTuningJobStatus::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_and_jobs_are_refused_naming_the_field_and_a_queued_job_cancels() {
    let (ts, oa, key) = start(tiny_model_path()).await;
    let addr = ts.server.http_addr.expect("HTTP");
    let base = ts.server.engine().expect("ready").model().name.clone();
    let upload = |name: &str, bytes: Vec<u8>, purpose: FilePurpose| CreateFileRequest {
        file: FileInput::from_vec_u8(name.into(), bytes),
        purpose,
        expires_after: None,
    };
    let e = oa
        .files()
        .create(upload("x.jsonl", chat_jsonl(), FilePurpose::Assistants))
        .await
        .expect_err("purpose");
    assert_eq!(status_of(e), (400, Some("purpose".into())));
    let e = oa
        .files()
        .create(upload(
            "bad.jsonl",
            b"{\"messages\": 3}\nnot json\n".to_vec(),
            FilePurpose::FineTune,
        ))
        .await
        .expect_err("bad rows");
    assert_eq!(status_of(e), (400, Some("file".into())));
    assert!(
        oa.files().list().await.expect("list").data.is_empty(),
        "nothing stored"
    );
    let file = oa
        .files()
        .create(upload("ok.jsonl", chat_jsonl(), FilePurpose::FineTune))
        .await
        .expect("upload");
    let create = |body: Value| {
        let oa = oa.clone();
        async move {
            let r: Result<Value, OpenAIError> = oa.fine_tuning().create_byot(body).await;
            r
        }
    };
    let base_job = |extra: Value| {
        let mut b = json!({"model": base, "training_file": file.id});
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    for (extra, status, param) in [
        (json!({"model": "gpt-4o-mini"}), 400, Some("model")),
        (
            json!({"method": {"type": "reinforcement", "reinforcement": {}}}),
            400,
            Some("method.type"),
        ),
        (
            json!({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}),
            400,
            Some("method.dpo.hyperparameters.beta"),
        ),
        // DPO trains on preference pairs; this file is a supervised one.
        (
            json!({"method": {"type": "dpo", "dpo": {}}}),
            400,
            Some("training_file"),
        ),
        (
            json!({"hyperparameters": {"n_epochs": 0}}),
            400,
            Some("hyperparameters.n_epochs"),
        ),
        (
            json!({"hyperparameters": {"batch_size": 0}}),
            400,
            Some("hyperparameters.batch_size"),
        ),
        (
            json!({"hyperparameters": {"learning_rate_multiplier": -1.0}}),
            400,
            Some("hyperparameters.learning_rate_multiplier"),
        ),
        (
            json!({"hyperparameters": {"n_epochs": "many"}}),
            400,
            Some("hyperparameters.n_epochs"),
        ),
        (json!({"suffix": "not a suffix!"}), 400, Some("suffix")),
        (
            json!({"integrations": [{"type": "wandb"}]}),
            400,
            Some("integrations"),
        ),
        (
            json!({"graft": {"method": "magic"}}),
            400,
            Some("graft.method"),
        ),
        (
            json!({"graft": {"lora": {"r": 0}}}),
            400,
            Some("graft.lora.r"),
        ),
        (
            json!({"graft": {"lr_scheduler": "sideways"}}),
            400,
            Some("graft.lr_scheduler"),
        ),
        (
            json!({"graft": {"no_such_setting": 1}}),
            400,
            Some("graft.no_such_setting"),
        ),
        (json!({"training_file": "file-missing"}), 404, None),
    ] {
        let e = create(base_job(extra.clone())).await.expect_err("refused");
        assert_eq!(status_of(e), (status, param.map(String::from)), "{extra}");
    }
    assert!(
        oa.fine_tuning()
            .list_paginated()
            .await
            .expect("jobs")
            .data
            .is_empty(),
        "no job was stored"
    );
    // A valid job, cancelled at once, ends cancelled.
    let job: Value = create(base_job(json!({"graft": {"max_seq_len": 256}})))
        .await
        .expect("created");
    let id = job["id"].as_str().expect("id").to_string();
    let cancelled = oa.fine_tuning().cancel(&id).await.expect("cancel");
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        let mut j = cancelled;
        while j.status != FineTuningJobStatus::Cancelled {
            tokio::time::sleep(Duration::from_millis(100)).await;
            j = oa.fine_tuning().retrieve(&id).await.expect("retrieve");
        }
        j
    })
    .await
    .expect("cancelled in time");
    assert!(end.fine_tuned_model.is_none());
    // Another tenant sees neither the file nor the job.
    let other = ts.admin.create_tenant("other").await.expect("tenant");
    let other_key = ts.admin.create_key(&other.name, "k").await.expect("key");
    let (s, _) = get(addr, &format!("/v1/files/{}", file.id), &other_key).await;
    assert_eq!(s, 404);
    let (s, _) = get(addr, &format!("/v1/fine_tuning/jobs/{id}"), &other_key).await;
    assert_eq!(s, 404);
    let (s, list) = get(addr, "/v1/fine_tuning/jobs", &other_key).await;
    assert_eq!((s, list["data"].as_array().map(Vec::len)), (200, Some(0)));
    let (s, _) = get(addr, "/v1/files", &key).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preference_files_are_accepted_in_both_shapes_train_dpo_and_are_refused_for_supervised_jobs(
) {
    let (ts, oa, _key) = start(tiny_model_path()).await;
    let base = ts.server.engine().expect("ready").model().name.clone();
    // OpenAI's DPO rows, as its docs write them.
    let openai: String = (0..6)
        .map(|i| {
            json!({
                "input": {"messages": [{"role": "user", "content": format!("What is {i} plus {i}?")}]},
                "preferred_output": [{"role": "assistant", "content": format!("{}", 2 * i)}],
                "non_preferred_output": [{"role": "assistant", "content": format!("Adding {i} to itself, we get {}.", 2 * i)}],
            })
            .to_string()
                + "\n"
        })
        .collect();
    let file = oa
        .files()
        .create(CreateFileRequest {
            file: FileInput::from_vec_u8("dpo.jsonl".into(), openai.into_bytes()),
            purpose: FilePurpose::FineTune,
            expires_after: None,
        })
        .await
        .expect("an OpenAI preference file is accepted");
    // TRL's rows (the fixture), over gRPC.
    let trl = std::fs::read(fixtures().join("preference-pairs-brief.jsonl")).expect("fixture");
    let ds = ts
        .client
        .upload_dataset("", "pairs", "", trl)
        .await
        .expect("a TRL preference dataset is accepted");
    assert_eq!((ds.examples, ds.format.as_str()), (40, "preference"));
    let d = ts
        .client
        .training()
        .get_dataset(graft_client::proto::GetDatasetRequest {
            tenant: String::new(),
            name: file.id.clone(),
        })
        .await
        .expect("dataset")
        .into_inner();
    assert_eq!((d.examples, d.format.as_str()), (6, "preference"));
    // Rows that are not preference pairs are named by line.
    let bad = "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"a\"}\n";
    let e = ts
        .client
        .upload_dataset("", "same", "", bad.as_bytes().to_vec())
        .await
        .expect_err("chosen == rejected");
    assert!(
        e.message().contains("line 1") && e.message().contains("same completions"),
        "{}",
        e.message()
    );
    // A DPO job trains on them, with OpenAI's method object and TRL's metrics in its
    // events.
    let job: Value = oa
        .fine_tuning()
        .create_byot(json!({
            "model": base, "training_file": file.id, "suffix": "pref",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1}}},
        }))
        .await
        .expect("a DPO job");
    assert_eq!(job["method"]["type"], "dpo", "{job}");
    assert_eq!(
        job["method"]["dpo"]["hyperparameters"]["beta"], 0.2,
        "{job}"
    );
    let id = job["id"].as_str().expect("id").to_string();
    let done = tokio::time::timeout(std::time::Duration::from_secs(300), async {
        loop {
            let j = oa.fine_tuning().retrieve(&id).await.expect("retrieve");
            if j.finished_at.is_some() {
                return j;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("in time");
    assert_eq!(
        done.status,
        FineTuningJobStatus::Succeeded,
        "{:?}",
        done.error
    );
    let events = oa
        .fine_tuning()
        .list_events(&id)
        .await
        .expect("events")
        .data;
    assert!(
        events.iter().any(|e| e
            .data
            .as_ref()
            .is_some_and(|d| d.get("rewards/margins").is_some())),
        "{events:?}"
    );
    // A supervised job cannot train on them.
    let e = oa
        .fine_tuning()
        .create_byot::<_, Value>(json!({"model": base, "training_file": file.id}))
        .await
        .expect_err("supervised on preference rows");
    assert_eq!(status_of(e), (400, Some("training_file".into())));
    let e = ts
        .client
        .create_job(graft_client::proto::CreateJobRequest {
            dataset: "pairs".into(),
            adapter_name: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("SFT on preference rows");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().starts_with("dataset:"), "{}", e.message());
}
