//! Output layers over gRPC. Classification heads: PEFT's SEQ_CLS fixture imported with its
//! labels, classified through the Classify RPC with transformers' logits and labels, the
//! head shown by GetAdapter and exported as SEQ_CLS; the wrong task for an adapter and wrong
//! labels refused naming the field, with nothing stored; a classification job on the
//! fixture's data. A replaced LM head: imported, generating through it, exported.

use graft_client::{proto as pb, GenerateOptions, ImportOptions};
use graft_tests::{fixtures, start_real};
use tonic::Code;

const FOLDER: &str = "peft-methods/seq-cls";

fn reference() -> serde_json::Value {
    let p = fixtures().join(FOLDER).join("reference.json");
    serde_json::from_slice(&std::fs::read(p).expect("reference")).expect("json")
}

fn labels(r: &serde_json::Value) -> Vec<String> {
    r["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .map(|l| l.as_str().expect("label").to_string())
        .collect()
}

/// A Classify request of `adapter` over `inputs`, for the caller's own tenant.
fn request(adapter: &str, inputs: Vec<pb::ClassifyInput>) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        adapter: adapter.into(),
        inputs,
        tenant: String::new(),
    }
}

/// The fixture's six cases as inputs.
fn case_inputs(cases: &[serde_json::Value]) -> Vec<pb::ClassifyInput> {
    cases
        .iter()
        .map(|c| text_input(c["text"].as_str().expect("text")))
        .collect()
}

fn text_input(text: &str) -> pb::ClassifyInput {
    pb::ClassifyInput {
        text: text.into(),
        messages: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peft_sequence_classifier_classifies_as_transformers_does() {
    let t = start_real().await;
    let r = reference();
    let dir = fixtures().join(FOLDER).join("adapter");
    let opts = ImportOptions {
        force: false,
        labels: labels(&r),
    };
    let v = t
        .client
        .import_adapter_dir_with("", "topic", &dir, &opts)
        .await
        .expect("import");
    assert_eq!(v.method, "lora");
    assert_eq!(v.head.as_ref().expect("head").labels, labels(&r));
    let got = t.client.get_adapter("", "topic").await.expect("get");
    assert_eq!(got.head.expect("head").labels, labels(&r));

    let cases = r["cases"].as_array().expect("cases");
    let out = t
        .client
        .classify(request("topic", case_inputs(cases)))
        .await
        .expect("classify");
    assert_eq!(out.results.len(), cases.len());
    for (c, res) in cases.iter().zip(&out.results) {
        let text = c["text"].as_str().expect("text");
        assert_eq!(
            res.label,
            c["predicted"].as_str().expect("predicted"),
            "{text}"
        );
        assert_eq!(res.label, c["gold"].as_str().expect("gold"), "{text}");
        let want: Vec<f32> = c["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|x| x.as_f64().expect("logit") as f32)
            .collect();
        assert_eq!(res.scores.len(), want.len());
        for ((s, w), l) in res.scores.iter().zip(&want).zip(labels(&r)) {
            assert_eq!(s.label, l);
            assert!((s.logit - w).abs() < 1e-3, "{text}: {} vs {w}", s.logit);
        }
        let psum: f32 = res.scores.iter().map(|s| s.probability).sum();
        assert!((psum - 1.0).abs() < 1e-5, "{text}: {psum}");
        let usage = res.usage.as_ref().expect("usage");
        let ids = c["token_ids"].as_array().expect("ids").len() as u32;
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (ids, 0));
    }

    // A conversation is rendered with the chat template (no generation prompt) and classified.
    let chat = t
        .client
        .classify(pb::ClassifyRequest {
            adapter: "topic@1".into(),
            inputs: vec![pb::ClassifyInput {
                text: String::new(),
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: "Roast the carrots with honey and thyme.".into(),
                }],
            }],
            tenant: String::new(),
        })
        .await
        .expect("classify chat");
    assert_eq!(chat.results.len(), 1);
    assert_eq!(chat.results[0].scores.len(), 3);
    assert_eq!(chat.results[0].label, "food", "{:?}", chat.results[0]);

    // Exported as PEFT writes a sequence classifier.
    let (c, file, w) = t
        .client
        .export_adapter_files("", "topic")
        .await
        .expect("export");
    assert_eq!(file, "adapter_model.safetensors");
    let cfg: serde_json::Value = serde_json::from_slice(&c).expect("config");
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert!(cfg["modules_to_save"]
        .as_array()
        .expect("modules_to_save")
        .contains(&"score".into()));
    let st = safetensors::SafeTensors::deserialize(&w).expect("weights");
    assert_eq!(
        st.tensor("base_model.model.score.weight")
            .expect("score")
            .shape(),
        [3, 576]
    );
    let original = std::fs::read(dir.join("adapter_model.safetensors")).expect("w");
    let original = safetensors::SafeTensors::deserialize(&original).expect("original");
    assert_eq!(
        st.tensor("base_model.model.score.weight")
            .expect("score")
            .data(),
        original
            .tensor("base_model.model.score.weight")
            .expect("score")
            .data()
    );

    // The wrong task for each adapter, and bad inputs, name the field.
    let err = t
        .client
        .generate(
            GenerateOptions {
                adapter: Some("topic".into()),
                ..GenerateOptions::greedy(4)
            }
            .prompt("Hello"),
        )
        .await
        .expect_err("a classifier does not generate");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("adapter"), "{}", err.message());

    let (lc, lw) = graft_tests::fixture_adapter();
    t.client
        .import_adapter("", "plain", lc, lw, false)
        .await
        .expect("lora");
    let err = t
        .client
        .classify(request("plain", vec![text_input("Rain later.")]))
        .await
        .expect_err("no head");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("adapter"), "{}", err.message());

    for (inputs, field) in [
        (vec![], "inputs"),
        (vec![text_input("ok"), text_input("")], "inputs[1]"),
    ] {
        let err = t
            .client
            .classify(request("topic", inputs))
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let err = t
        .client
        .classify(request("nobody", vec![text_input("ok")]))
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_labels_are_refused_and_nothing_is_stored() {
    let t = start_real().await;
    let dir = fixtures().join(FOLDER).join("adapter");
    let two = vec!["food".to_string(), "sport".to_string()];
    let same = vec!["a".to_string(), "a".to_string(), "b".to_string()];
    for labels in [two, same] {
        let opts = ImportOptions {
            force: false,
            labels: labels.clone(),
        };
        let err = t
            .client
            .import_adapter_dir_with("", "topic", &dir, &opts)
            .await
            .expect_err("wrong labels");
        assert_eq!(err.code(), Code::InvalidArgument, "{labels:?}");
        assert!(err.message().contains("labels"), "{}", err.message());
    }
    // Labels for an adapter without a head.
    let (lc, lw) = graft_tests::fixture_adapter();
    let opts = ImportOptions {
        force: false,
        labels: vec!["x".into()],
    };
    let err = t
        .client
        .import_adapter_with("", "plain", lc, lw, &opts)
        .await
        .expect_err("labels without a head");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("labels"), "{}", err.message());
    assert!(t.client.list_adapters("").await.expect("list").is_empty());

    // Without labels the head's outputs are LABEL_i, as transformers names them.
    let v = t
        .client
        .import_adapter_dir("", "topic", &dir, false)
        .await
        .expect("import");
    assert_eq!(
        v.head.expect("head").labels,
        ["LABEL_0", "LABEL_1", "LABEL_2"]
    );
}

fn lines(rows: &[&str]) -> Vec<u8> {
    rows.iter()
        .map(|r| format!("{r}\n"))
        .collect::<String>()
        .into_bytes()
}

fn classification_job(objective: &str, labels: Option<Vec<String>>) -> pb::CreateJobRequest {
    use graft_client::proto::create_job_request::MethodConfig;
    pb::CreateJobRequest {
        dataset: "topics".into(),
        validation_dataset: "cases".into(),
        adapter_name: "trained".into(),
        method: "lora".into(),
        method_config: Some(MethodConfig::Lora(pb::LoraMethod {
            r: Some(8),
            alpha: Some(16.0),
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..Default::default()
        })),
        objective: objective.into(),
        classification: labels.map(|labels| pb::ClassificationObjective { labels }),
        hyperparameters: Some(pb::Hyperparameters {
            epochs: Some(5),
            batch_size: Some(4),
            learning_rate: Some(1e-3),
            lr_scheduler: "constant".into(),
            seed: Some(17),
            max_seq_len: Some(64),
            checkpoint_every: Some(100),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The fixture's dataset and recipe as a job: a classification dataset with its label
/// counts, a LoRA + head job evaluated on the six held-out cases with accuracy and
/// per-class F1, registered with its labels, classifying the cases right; and each wrong
/// pairing of data, objective and labels refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classification_job_trains_a_head_that_classify_serves() {
    let t = start_real().await;
    let text = std::fs::read_to_string(fixtures().join("classification-sentences.jsonl"))
        .expect("dataset");
    let rows: Vec<&str> = text.lines().collect();
    let d = t
        .client
        .upload_dataset("", "topics", "", lines(&rows[..36]))
        .await
        .expect("upload");
    assert_eq!(d.format, "classification");
    assert_eq!(
        d.label_counts
            .iter()
            .map(|c| (c.label.as_str(), c.count))
            .collect::<Vec<_>>(),
        [("food", 12), ("sport", 12), ("weather", 12)]
    );
    t.client
        .upload_dataset("", "cases", "", lines(&rows[36..]))
        .await
        .expect("upload cases");

    // Datasets a classifier cannot learn from.
    for (name, data, want) in [
        (
            "one",
            lines(&[r#"{"text":"a","label":"x"}"#, r#"{"text":"b","label":"x"}"#]),
            "one label",
        ),
        (
            "mixed",
            lines(&[r#"{"text":"a","label":"x"}"#, r#"{"text":"b"}"#]),
            "mixed formats",
        ),
        (
            "kinds",
            lines(&[r#"{"text":"a","label":"x"}"#, r#"{"text":"b","label":1}"#]),
            "mixed labels",
        ),
        (
            "bad",
            lines(&[r#"{"text":"a","label":[1]}"#]),
            "invalid label",
        ),
    ] {
        let err = t
            .client
            .upload_dataset("", name, "", data)
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}");
        assert!(
            err.message().contains("dataset") && err.message().contains(want),
            "{name}: {}",
            err.message()
        );
    }
    t.client
        .upload_dataset(
            "",
            "sft",
            "",
            lines(&[r#"{"prompt":"a","completion":"b"}"#; 4]),
        )
        .await
        .expect("sft data");

    // Wrong pairings, each naming its field; no job is created.
    let two = Some(vec!["food".to_string(), "sport".to_string()]);
    for (req, field, want) in [
        (
            classification_job("", None),
            "objective",
            "classification objective",
        ),
        (
            classification_job("reward", None),
            "objective",
            "expected sft",
        ),
        (
            classification_job("classification", two),
            "classification.labels",
            "\"weather\" is not one of food, sport",
        ),
        (
            pb::CreateJobRequest {
                dataset: "sft".into(),
                validation_dataset: String::new(),
                ..classification_job("classification", None)
            },
            "dataset",
            "classification dataset",
        ),
        (
            pb::CreateJobRequest {
                method: "head".into(),
                method_config: None,
                ..classification_job("sft", None)
            },
            "method",
            "needs the classification objective",
        ),
        (
            pb::CreateJobRequest {
                train_lm_head: true,
                ..classification_job("classification", None)
            },
            "train_lm_head",
            "sft objective",
        ),
    ] {
        let err = t.client.create_job(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().contains(field) && err.message().contains(want),
            "{field}: {}",
            err.message()
        );
    }
    let jobs = t
        .client
        .training()
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{:?}", jobs.jobs);

    let created = t
        .client
        .create_job(classification_job("classification", None))
        .await
        .expect("create");
    assert_eq!(
        (created.method.as_str(), created.objective.as_str()),
        ("lora", "classification")
    );
    assert_eq!(created.labels, ["food", "sport", "weather"]);
    let (events, done) = tokio::time::timeout(
        std::time::Duration::from_secs(900),
        t.client.follow_job("", &created.id),
    )
    .await
    .expect("in time")
    .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let evals: Vec<pb::EvalEvent> = events
        .into_iter()
        .filter_map(|e| match e.event {
            Some(pb::job_event::Event::Eval(ev)) => Some(ev),
            _ => None,
        })
        .collect();
    let last = evals.last().expect("evaluated");
    assert_eq!(last.token_accuracy, 1.0, "{last:?}");
    assert_eq!(last.macro_f1, 1.0, "{last:?}");
    assert_eq!(
        last.per_class
            .iter()
            .map(|c| (c.label.as_str(), c.support, c.f1))
            .collect::<Vec<_>>(),
        [("food", 2, 1.0), ("sport", 2, 1.0), ("weather", 2, 1.0)]
    );
    let v = t
        .client
        .get_adapter("", "trained")
        .await
        .expect("registered");
    assert_eq!(v.head.expect("head").labels, ["food", "sport", "weather"]);
    let r = reference();
    let cases = r["cases"].as_array().expect("cases");
    let out = t
        .client
        .classify(request("trained", case_inputs(cases)))
        .await
        .expect("classify");
    for (c, res) in cases.iter().zip(&out.results) {
        assert_eq!(res.label, c["gold"].as_str().expect("gold"), "{c}");
    }
}

/// A replaced LM head (`modules_to_save: ["lm_head"]`) over gRPC on the tiny model:
/// imported, shown by GetAdapter, generating through its own output layer (rows shifted by
/// one, so its first greedy token is the plain adapter's minus one), exported as uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_with_its_own_lm_head_generates_through_it() {
    let t = graft_tests::start_tiny().await;
    let m = graft_server::model::BaseModel::load(
        &graft_tests::tiny_model_path(),
        &candle_core::Device::Cpu,
    )
    .expect("tiny");
    let (c, w) = graft_server::adapters::testing::random_peft(&m, 4, 4);
    let (vocab, hidden) = (m.config().vocab_size, m.config().hidden_size);
    let head = m.llama.weights.lm_head.weight().expect("lm head");
    let base: Vec<Vec<f32>> = head.to_vec2().expect("base");
    // Row i is the base's row i + 1: every logit moves down one id.
    let shifted: Vec<f32> = (0..vocab)
        .flat_map(|i| base[(i + 1) % vocab].clone())
        .collect();
    let mut cfg: serde_json::Value = serde_json::from_slice(&c).expect("config");
    cfg["modules_to_save"] = serde_json::json!(["lm_head"]);
    let own_c = serde_json::to_vec(&cfg).expect("json");
    let own_w = {
        let st = safetensors::SafeTensors::deserialize(&w).expect("st");
        let bytes: Vec<u8> = shifted.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut all = st.tensors();
        all.push((
            "base_model.model.lm_head.weight".into(),
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![vocab, hidden],
                &bytes,
            )
            .expect("view"),
        ));
        safetensors::serialize(all, None).expect("serialize")
    };
    t.client
        .import_adapter("", "plain", c, w, true)
        .await
        .expect("plain");
    let v = t
        .client
        .import_adapter("", "own", own_c, own_w.clone(), true)
        .await
        .expect("own");
    assert!(v.lm_head && v.head.is_none());
    assert!(
        !t.client
            .get_adapter("", "plain")
            .await
            .expect("get")
            .lm_head
    );
    let first = |adapter: &str| {
        let c = t.client.clone();
        let req = GenerateOptions {
            adapter: Some(adapter.into()),
            ..GenerateOptions::greedy(1)
        }
        .prompt("Hello there");
        async move { c.generate(req).await.expect("generate").token_ids[0] }
    };
    let (p, o) = (first("plain").await, first("own").await);
    assert_eq!(o as usize, (p as usize + vocab - 1) % vocab, "{p} {o}");
    let (_, file, w) = t
        .client
        .export_adapter_files("", "own")
        .await
        .expect("export");
    assert_eq!(file, "adapter_model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&w).expect("st");
    let exported: Vec<f32> = st
        .tensor("base_model.model.lm_head.weight")
        .expect("lm_head")
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(exported == shifted);
    let err = t
        .client
        .classify(request("own", vec![text_input("x")]))
        .await
        .expect_err("no classification head");
    assert_eq!(err.code(), Code::InvalidArgument);
}
