//! Classification heads over gRPC: PEFT's SEQ_CLS fixture imported with its labels,
//! classified through the Classify RPC with transformers' logits and labels, the head shown
//! by GetAdapter and exported as SEQ_CLS; the wrong task for an adapter and wrong labels
//! refused naming the field, with nothing stored.

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
        .classify(pb::ClassifyRequest {
            adapter: "topic".into(),
            inputs: cases
                .iter()
                .map(|c| text_input(c["text"].as_str().expect("text")))
                .collect(),
            tenant: String::new(),
        })
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
        .classify(pb::ClassifyRequest {
            adapter: "plain".into(),
            inputs: vec![text_input("Rain later.")],
            tenant: String::new(),
        })
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
            .classify(pb::ClassifyRequest {
                adapter: "topic".into(),
                inputs,
                tenant: String::new(),
            })
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let err = t
        .client
        .classify(pb::ClassifyRequest {
            adapter: "nobody".into(),
            inputs: vec![text_input("ok")],
            tenant: String::new(),
        })
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
