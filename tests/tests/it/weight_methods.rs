//! IA3, DoRA and bottleneck adapters over gRPC: PEFT's IA3 and DoRA fixtures and
//! AdapterHub's Houlsby adapter imported (the last from its own file names), served with the
//! libraries' greedy tokens alone and all at once, exported as imported under the library's
//! file names; jobs of each method trained, registered with their details, served and
//! exported; bad settings refused naming the field.

use std::time::Duration;

use graft_client::{
    proto as pb,
    proto::{adapter_version::Details, create_job_request::MethodConfig},
    GenerateOptions,
};
use graft_tests::{fixtures, start_real, start_tiny};
use tonic::Code;

/// (fixture folder, adapter name, method)
const FIXTURES: [(&str, &str, &str); 3] = [
    ("peft-methods/ia3", "ia3", "ia3"),
    ("peft-methods/dora", "dora", "lora"),
    ("bottleneck-houlsby", "houlsby", "bottleneck"),
];

fn reference(folder: &str) -> serde_json::Value {
    let p = fixtures().join(folder).join("reference.json");
    serde_json::from_slice(&std::fs::read(p).expect("reference")).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_method_fixtures_serve_the_libraries_tokens_alone_and_together() {
    let t = start_real().await;
    let mut reqs = Vec::new();
    for (folder, name, method) in FIXTURES {
        let dir = fixtures().join(folder).join("adapter");
        let v = t
            .client
            .import_adapter_dir("", name, &dir, false)
            .await
            .expect("import");
        assert_eq!(v.method, method, "{name}");
        match (&v.details, name) {
            (Some(Details::Ia3(i)), "ia3") => {
                assert_eq!(i.feedforward_modules, ["down_proj"]);
                assert_eq!(i.target_modules.len(), 3);
            }
            (Some(Details::Lora(l)), "dora") => assert!(l.use_dora && l.rank == 8),
            (Some(Details::Bottleneck(b)), "houlsby") => {
                assert!(b.after_attention && b.after_ffn);
                assert_eq!(
                    (b.reduction_factor, b.non_linearity.as_str()),
                    (16.0, "swish")
                );
            }
            other => panic!("{name}: details {other:?}"),
        }
        let r = reference(folder);
        for p in r["prompts"].as_array().expect("prompts") {
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
            reqs.push((name, req, want));
        }
        // Exported as imported, under the library's file names.
        let (c, file, w) = t
            .client
            .export_adapter_files("", name)
            .await
            .expect("export");
        let weights = if method == "bottleneck" {
            "adapter.safetensors"
        } else {
            "adapter_model.safetensors"
        };
        assert_eq!(file, weights, "{name}");
        assert_eq!(w, std::fs::read(dir.join(weights)).expect("w"), "{name}");
        assert_eq!(
            c,
            std::fs::read(dir.join("adapter_config.json")).expect("c")
        );
    }
    let mut solo = Vec::new();
    for (name, req, want) in &reqs {
        let out = t.client.generate(req.clone()).await.expect("generate");
        // The libraries' greedy continuations ignore end-of-sequence; graft stops there.
        let n = out.token_ids.len();
        assert!(n > 3, "{name}: {:?}", out.text);
        assert_eq!(out.token_ids[..], want[..n], "{name}: {:?}", out.text);
        solo.push(out.token_ids);
    }
    // All six at once (concurrently submitted, so they may share engine steps; the
    // model-level test asserts bit-equality when they do) give their solo tokens.
    let together = futures::future::join_all(reqs.iter().map(|(_, req, _)| {
        let c = t.client.clone();
        let req = req.clone();
        async move { c.generate(req).await.expect("together").token_ids }
    }))
    .await;
    assert_eq!(together, solo);
}

async fn dataset(t: &graft_tests::TestServer) {
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
}

fn job(name: &str, method: &str, config: MethodConfig) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        dataset: "d".into(),
        adapter_name: name.into(),
        method: method.into(),
        method_config: Some(config),
        hyperparameters: Some(pb::Hyperparameters {
            epochs: Some(2),
            checkpoint_every: Some(2),
            max_seq_len: Some(64),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ia3_dora_and_bottleneck_jobs_train_register_serve_and_export() {
    let t = start_tiny().await;
    dataset(&t).await;
    let jobs = [
        job("ia3", "ia3", MethodConfig::Ia3(pb::Ia3Method::default())),
        job(
            "dora",
            "lora",
            MethodConfig::Lora(pb::LoraMethod {
                r: Some(4),
                use_dora: true,
                ..Default::default()
            }),
        ),
        job(
            "bn",
            "bottleneck",
            MethodConfig::Bottleneck(pb::BottleneckMethod {
                bottleneck_size: Some(8),
                non_linearity: "relu".into(),
                placement: "after_ffn".into(),
                ..Default::default()
            }),
        ),
    ];
    for req in jobs {
        let name = req.adapter_name.clone();
        let created = t.client.create_job(req).await.expect("create");
        let (_, done) = tokio::time::timeout(
            Duration::from_secs(300),
            t.client.follow_job("", &created.id),
        )
        .await
        .expect("in time")
        .expect("watch");
        assert_eq!(done.status, "succeeded", "{name}: {}", done.error);
        let v = t.client.get_adapter("", &name).await.expect("registered");
        let out = t
            .client
            .generate(
                GenerateOptions {
                    adapter: Some(name.clone()),
                    ..GenerateOptions::greedy(3)
                }
                .prompt("Q1"),
            )
            .await
            .expect("serves");
        assert!(!out.token_ids.is_empty(), "{name}");
        let (c, file, w) = t
            .client
            .export_adapter_files("", &name)
            .await
            .expect("export");
        let cfg: serde_json::Value = serde_json::from_slice(&c).expect("json");
        let st = safetensors::SafeTensors::deserialize(&w).expect("st");
        match name.as_str() {
            "ia3" => {
                assert_eq!(v.method, "ia3");
                assert_eq!(cfg["peft_type"], "IA3");
                assert_eq!(cfg["feedforward_modules"], serde_json::json!(["down_proj"]));
                assert!(st
                    .tensor("base_model.model.model.layers.0.mlp.down_proj.ia3_l")
                    .is_ok());
            }
            "dora" => {
                assert!(matches!(&v.details, Some(Details::Lora(l)) if l.use_dora));
                assert_eq!(cfg["use_dora"], true);
                assert!(st
                    .tensor(
                        "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
                    )
                    .is_ok());
            }
            _ => {
                assert_eq!(v.method, "bottleneck");
                assert_eq!(file, "adapter.safetensors");
                assert_eq!(cfg["config"]["non_linearity"], "relu");
                assert_eq!(cfg["config"]["mh_adapter"], false);
                assert_eq!(cfg["config"]["original_ln_before"], true);
                let t = st
                    .tensor("model.layers.1.output_adapters.adapters.graft.adapter_down.0.weight")
                    .expect("down");
                assert_eq!(t.shape(), [8, 64]);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_weight_method_job_settings_are_refused_naming_the_field() {
    let t = start_tiny().await;
    dataset(&t).await;
    for (req, field) in [
        (
            job(
                "x",
                "ia3",
                MethodConfig::Ia3(pb::Ia3Method {
                    target_modules: vec!["k_proj".into()],
                    feedforward_modules: vec!["down_proj".into()],
                }),
            ),
            "ia3.feedforward_modules",
        ),
        (
            job(
                "x",
                "ia3",
                MethodConfig::Ia3(pb::Ia3Method {
                    target_modules: vec!["lm_head".into()],
                    ..Default::default()
                }),
            ),
            "ia3.target_modules",
        ),
        (
            job(
                "x",
                "bottleneck",
                MethodConfig::Bottleneck(pb::BottleneckMethod {
                    non_linearity: "softsign".into(),
                    ..Default::default()
                }),
            ),
            "bottleneck.non_linearity",
        ),
        (
            job(
                "x",
                "bottleneck",
                MethodConfig::Bottleneck(pb::BottleneckMethod {
                    reduction_factor: Some(8.0),
                    bottleneck_size: Some(8),
                    ..Default::default()
                }),
            ),
            "bottleneck.bottleneck_size",
        ),
        (
            job(
                "x",
                "bottleneck",
                MethodConfig::Bottleneck(pb::BottleneckMethod {
                    placement: "before_attention".into(),
                    ..Default::default()
                }),
            ),
            "bottleneck.placement",
        ),
        (
            job(
                "x",
                "bottleneck",
                MethodConfig::Bottleneck(pb::BottleneckMethod {
                    reduction_factor: Some(1e-300),
                    ..Default::default()
                }),
            ),
            "bottleneck.reduction_factor",
        ),
        (
            job("x", "lora", MethodConfig::Ia3(pb::Ia3Method::default())),
            "ia3",
        ),
    ] {
        let e = t.client.create_job(req).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
}
