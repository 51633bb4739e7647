//! Adapters over gRPC: the PEFT fixture served by graft, export round trip, refusals that
//! store nothing, hot-swap, delete while in use, eviction under a budget, restart
//! persistence, and mixed-adapter batches.

use std::time::Duration;

use futures::future::join_all;
use graft_client::GenerateOptions;
use graft_tests::{
    fixture_adapter, metric_value, random_peft, real_model_path, start_in, start_real, start_tiny,
    start_with, tiny_model_path,
};
use tonic::Code;

fn australia(adapter: Option<&str>) -> graft_proto::v1::GenerateRequest {
    GenerateOptions {
        adapter: adapter.map(str::to_string),
        ..GenerateOptions::greedy(12)
    }
    .chat([("user", "What is the capital of Australia?")])
}

/// Adapter directories the server has stored (in its data directory or its bucket).
async fn adapter_files(t: &graft_tests::TestServer) -> usize {
    t.stored("adapters").await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The deprecated LoRA fields stay filled for one release: this checks they are.
#[allow(deprecated)]
async fn the_peft_fixture_is_served_and_exported_unchanged() {
    let t = start_real().await;
    let (c, w) = fixture_adapter();
    let v = t
        .client
        .import_adapter("", "answers", c.clone(), w.clone(), false)
        .await
        .expect("import");
    assert_eq!((v.version, v.rank, v.kind.as_str()), (1, 8, "lora"));
    assert_eq!(v.target_modules.len(), 7);
    let with = t
        .client
        .generate(australia(Some("answers")))
        .await
        .expect("adapted");
    assert!(with.text.starts_with("ANSWER: Canberra"), "{:?}", with.text);
    let without = t.client.generate(australia(None)).await.expect("base");
    assert!(!without.text.starts_with("ANSWER"), "{:?}", without.text);
    let (ec, ew) = t
        .client
        .export_adapter("", "answers@1")
        .await
        .expect("export");
    assert_eq!((ec, ew), (c, w));
    let got = t.client.get_adapter("", "answers").await.expect("get");
    assert_eq!(got.sha256, v.sha256);
}

/// `--lora-dtype bf16`: the fixture is served from half the bytes and still answers as
/// PEFT's does, its stored files export unchanged, and a training job's starting point
/// (`AdapterRegistry::exact`) has the stored f32 values, not the rounded ones. The cache
/// keeps one adapter at most, so the lease below is a cold load of the stored files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_served_in_bf16_keeps_the_stored_values() {
    use graft_server::model::lora::{LoraDtype, Values};
    let t = start_with(real_model_path(), |c| {
        c.lora_dtype = LoraDtype::Bf16;
        c.adapter_cache_bytes = 1;
    })
    .await;
    let (c, w) = fixture_adapter();
    t.client
        .import_adapter("", "answers", c.clone(), w.clone(), false)
        .await
        .expect("import");
    let with = t
        .client
        .generate(australia(Some("answers")))
        .await
        .expect("adapted");
    assert!(with.text.starts_with("ANSWER: Canberra"), "{:?}", with.text);
    let reg = t.server.adapters().expect("ready");
    let r = "answers".parse().expect("ref");
    // Another version takes the cache's one place.
    t.client
        .import_adapter("", "other", c.clone(), w.clone(), false)
        .await
        .expect("import");
    let before = t.scrape().await;
    let served = reg.lease(graft_tests::TENANT, &r).await.expect("lease");
    let misses = |text: &str| metric_value(text, "graft_adapter_cache_misses_total", &[]);
    assert_eq!(
        misses(&t.scrape().await) - misses(&before),
        1.0,
        "a cold load"
    );
    let exact = reg.exact(graft_tests::TENANT, &r).await.expect("exact");
    let (s, e) = (
        served
            .adapter()
            .get(0, graft_server::model::Module::Q)
            .expect("q"),
        exact.get(0, graft_server::model::Module::Q).expect("q"),
    );
    assert!(matches!((&s.a, &e.a), (Values::Bf16(_), Values::F32(_))));
    assert_eq!(s.a, e.a.to_dtype(LoraDtype::Bf16).expect("rounds"));
    assert_ne!(s.a.to_f32(), e.a.to_f32(), "the served values are rounded");
    assert_eq!(served.adapter().bytes() * 2, exact.bytes());
    assert_eq!(reg.resident().1, served.adapter().bytes());
    let (ec, ew) = t
        .client
        .export_adapter("", "answers@1")
        .await
        .expect("export");
    assert_eq!((ec, ew), (c, w));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_imports_store_nothing() {
    let t = start_real().await;
    let (c, w) = fixture_adapter();
    let cfg: serde_json::Value = serde_json::from_slice(&c).expect("json");
    let bad = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut x = cfg.clone();
        f(&mut x);
        serde_json::to_vec(&x).expect("ser")
    };
    let mut nan = w.clone();
    // Corrupt one f32 of the first tensor's data into a NaN.
    let header_len = u64::from_le_bytes(nan[..8].try_into().expect("8")) as usize;
    let at = 8 + header_len;
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
        (bad(&|x| x["use_dora"] = true.into()), w.clone(), "use_dora"),
        (
            bad(&|x| x["target_modules"] = serde_json::json!(["wte"])),
            w.clone(),
            "target_modules",
        ),
        (bad(&|x| x["r"] = 128.into()), w.clone(), "r"),
        (
            bad(&|x| x["modules_to_save"] = serde_json::json!(["embed_tokens"])),
            w.clone(),
            "modules_to_save",
        ),
        (
            bad(&|x| x["base_model_name_or_path"] = "mistralai/Mistral-7B-v0.1".into()),
            w.clone(),
            "base_model_name_or_path",
        ),
        (
            c.clone(),
            w[..w.len() - 100].to_vec(),
            "adapter_model.safetensors",
        ),
        (c.clone(), nan, "adapter_model.safetensors"),
        (b"{not json".to_vec(), w.clone(), "adapter_config.json"),
    ];
    for (cc, ww, field) in cases {
        let e = t
            .client
            .import_adapter("", "x", cc, ww, false)
            .await
            .expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    for name in ["../evil", "a/b", "", "x\0y"] {
        let e = t
            .client
            .import_adapter("", name, c.clone(), w.clone(), false)
            .await
            .expect_err(name);
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    assert!(t.client.list_adapters("").await.expect("list").is_empty());
    assert_eq!(adapter_files(&t).await, 0, "a refused import left files");
    // The upload cap.
    let small = start_with(real_model_path(), |c| c.max_adapter_upload_bytes = 1000).await;
    let e = small
        .client
        .import_adapter("", "big", c, w, false)
        .await
        .expect_err("too big");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("cap"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_keeps_running_streams_on_their_version() {
    let t = start_real().await;
    let model = t.server.engine().expect("ready").model().clone();
    let (c1, w1) = random_peft(&model, 1, 4);
    let (c2, w2) = random_peft(&model, 2, 4);
    t.client
        .import_adapter("", "bot", c1, w1, false)
        .await
        .expect("v1");
    let opts = GenerateOptions {
        adapter: Some("bot".into()),
        ..GenerateOptions::greedy(24)
    };
    let req = opts.prompt("The history of the city");
    let solo_v1 = t
        .client
        .generate(req.clone())
        .await
        .expect("v1 solo")
        .token_ids;
    let mut stream = t.client.generate_stream(req.clone()).await.expect("stream");
    let mut ids = stream
        .message()
        .await
        .expect("first")
        .expect("some")
        .token_ids;
    let v2 = t
        .client
        .import_adapter("", "bot", c2, w2, false)
        .await
        .expect("v2");
    assert_eq!(v2.version, 2);
    // The very next request uses v2...
    let next = t.client.generate(req.clone()).await.expect("v2").token_ids;
    let pinned_v2 = t
        .client
        .generate(
            GenerateOptions {
                adapter: Some("bot@2".into()),
                ..GenerateOptions::greedy(24)
            }
            .prompt("The history of the city"),
        )
        .await
        .expect("v2 pinned")
        .token_ids;
    assert_eq!(next, pinned_v2);
    assert_ne!(next, solo_v1);
    // ...while the stream that started on v1 finishes on v1.
    while let Some(m) = stream.message().await.expect("stream") {
        ids.extend(m.token_ids);
    }
    assert_eq!(ids, solo_v1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_while_in_use_finishes_the_stream_then_removes_files() {
    let t = start_real().await;
    let model = t.server.engine().expect("ready").model().clone();
    let (c, w) = random_peft(&model, 3, 4);
    t.client
        .import_adapter("", "temp", c, w, false)
        .await
        .expect("import");
    assert_eq!(adapter_files(&t).await, 1);
    let opts = GenerateOptions {
        adapter: Some("temp@1".into()),
        ..GenerateOptions::greedy(40)
    };
    let mut stream = t
        .client
        .generate_stream(opts.prompt("Once"))
        .await
        .expect("stream");
    stream.message().await.expect("first").expect("some");
    assert_eq!(
        t.client.delete_adapter("", "temp@1").await.expect("delete"),
        vec![1]
    );
    let e = t
        .client
        .generate(opts.prompt("Again"))
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(
        t.client
            .get_adapter("", "temp")
            .await
            .expect_err("gone")
            .code(),
        Code::NotFound
    );
    let mut last = 0;
    while let Some(m) = stream.message().await.expect("stream survives the delete") {
        last = m.finish_reason;
    }
    assert_ne!(last, 0);
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while adapter_files(&t).await > 0 && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(adapter_files(&t).await, 0, "files outlived the last lease");
    assert_eq!(
        t.client
            .delete_adapter("", "temp")
            .await
            .expect_err("twice")
            .code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_adapters_cycle_through_a_small_budget() {
    let probe = start_tiny().await;
    let model = probe.server.engine().expect("ready").model().clone();
    let files: Vec<_> = (0..50).map(|i| random_peft(&model, 100 + i, 2)).collect();
    let one = {
        let p = graft_server::adapters::peft::parse(
            &files[0].0,
            &files[0].1,
            model.config(),
            &model.name,
            &graft_server::adapters::peft::ImportPolicy {
                max_rank: 64,
                max_virtual_tokens: 128,
                force: true,
                base_aliases: vec![],
            },
        )
        .expect("parse");
        p.adapter.bytes()
    };
    let budget = one * 5 + one / 2;
    let t = start_with(tiny_model_path(), |c| c.adapter_cache_bytes = budget).await;
    for (i, (c, w)) in files.iter().enumerate() {
        t.client
            .import_adapter("", &format!("a{i}"), c.clone(), w.clone(), false)
            .await
            .expect("import");
    }
    let before = t.scrape().await;
    for round in 0..2 {
        for i in 0..50 {
            let opts = GenerateOptions {
                adapter: Some(format!("a{i}")),
                ..GenerateOptions::greedy(2)
            };
            t.client
                .generate(opts.prompt("hi"))
                .await
                .unwrap_or_else(|e| panic!("round {round} a{i}: {e:?}"));
            let (_, bytes) = t.server.adapters().expect("ready").resident();
            assert!(bytes <= budget, "resident {bytes} > budget {budget}");
        }
    }
    let after = t.scrape().await;
    let d = |n: &str| metric_value(&after, n, &[]) - metric_value(&before, n, &[]);
    assert!(d("graft_adapter_cache_evictions_total") >= 50.0, "{after}");
    assert!(d("graft_adapter_cache_misses_total") >= 50.0);
    assert!(after.contains("graft_adapter_load_seconds_bucket"));
    assert!(metric_value(&after, "graft_adapters_resident", &[]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_survive_a_restart() {
    let t = start_tiny().await;
    let model = t.server.engine().expect("ready").model().clone();
    let (c, w) = random_peft(&model, 9, 2);
    let acme = t.tenant("acme").await;
    acme.import_adapter("", "keep", c.clone(), w.clone(), false)
        .await
        .expect("v1");
    acme.import_adapter("", "keep", c.clone(), w.clone(), false)
        .await
        .expect("v2");
    acme.delete_adapter("", "keep@1").await.expect("delete v1");
    let opts = GenerateOptions {
        adapter: Some("keep".into()),
        ..GenerateOptions::greedy(6)
    };
    let before = acme
        .generate(opts.prompt("abc"))
        .await
        .expect("gen")
        .token_ids;
    let data = t.data.clone();
    t.server.drain().await.expect("drain");
    let t = start_in(tiny_model_path(), data, |_| {}).await;
    let acme = t.tenant("acme").await;
    let listed = acme.list_adapters("").await.expect("list");
    assert_eq!(
        listed.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(
        acme.generate(opts.prompt("abc"))
            .await
            .expect("gen")
            .token_ids,
        before
    );
    assert_eq!(
        acme.export_adapter("", "keep@2").await.expect("export"),
        (c.clone(), w)
    );
    // Versions are never reused.
    let v3 = acme
        .import_adapter("", "keep", c, fixture_like(&model), false)
        .await
        .expect("v3");
    assert_eq!(v3.version, 3);
    // Other tenants see nothing.
    assert!(t.client.list_adapters("").await.expect("list").is_empty());
}

/// A stored adapter that a restarted server cannot serve in its `--lora-dtype` (a value
/// beyond f16's range, stored by a server serving f32) is FAILED_PRECONDITION naming the
/// dtype and the module, not DATA_LOSS: its files are intact, listed and exported as they
/// were, and another adapter is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_beyond_the_served_dtype_after_a_restart_is_a_precondition() {
    use graft_server::{
        adapters::testing::{peft_files, random_lora},
        model::{lora::LoraDtype, Module},
    };
    let t = start_tiny().await;
    let model = t.server.engine().expect("ready").model().clone();
    let mut adapter = random_lora(&model, 11, 2, 0.2);
    let mut pair = adapter.get(1, Module::Up).expect("up_proj").clone();
    let mut b = pair.b.to_f32().into_owned();
    b[3] = 7.0e4;
    pair.b = b.into();
    adapter.set(1, Module::Up, pair);
    let (c, w) = peft_files(&model, adapter, 2);
    t.client
        .import_adapter("", "wide", c.clone(), w.clone(), false)
        .await
        .expect("f32 holds 70,000");
    let (oc, ow) = random_peft(&model, 12, 2);
    t.client
        .import_adapter("", "plain", oc, ow, false)
        .await
        .expect("import");
    let gen = |name: &str| GenerateOptions {
        adapter: Some(name.into()),
        ..GenerateOptions::greedy(3)
    };
    t.client
        .generate(gen("wide").prompt("abc"))
        .await
        .expect("served in f32");
    let data = t.data.clone();
    t.server.drain().await.expect("drain");
    let t = start_in(tiny_model_path(), data, |c| c.lora_dtype = LoraDtype::F16).await;
    let e = t
        .client
        .generate(gen("wide").prompt("abc"))
        .await
        .expect_err("70,000 is beyond f16");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for part in ["--lora-dtype f16", "layer 1 up_proj", "does not fit f16"] {
        assert!(e.message().contains(part), "{part}: {}", e.message());
    }
    t.client
        .generate(gen("plain").prompt("abc"))
        .await
        .expect("another adapter is served");
    let listed = t.client.list_adapters("").await.expect("list");
    assert_eq!(listed.len(), 2);
    assert_eq!(
        t.client.export_adapter("", "wide").await.expect("export"),
        (c, w),
        "the stored files are unchanged"
    );
}

fn fixture_like(model: &graft_server::model::BaseModel) -> Vec<u8> {
    random_peft(model, 10, 2).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_adapters_in_one_batch_match_their_solo_runs() {
    let t = start_real().await;
    let model = t.server.engine().expect("ready").model().clone();
    for i in 0..8 {
        let (c, w) = random_peft(&model, 20 + i, 4 + i as usize);
        t.client
            .import_adapter("", &format!("m{i}"), c, w, false)
            .await
            .expect("import");
    }
    let reqs: Vec<_> = (0..9)
        .map(|i| {
            GenerateOptions {
                adapter: (i < 8).then(|| format!("m{i}")),
                max_new_tokens: Some(8),
                temperature: Some(if i % 2 == 0 { 0.0 } else { 0.8 }),
                seed: Some(i),
                ..Default::default()
            }
            .prompt(format!("Note {i}: remember to"))
        })
        .collect();
    let mut solo = Vec::new();
    for r in &reqs {
        solo.push(t.client.generate(r.clone()).await.expect("solo").token_ids);
    }
    let together = join_all(reqs.iter().map(|r| {
        let c = t.client.clone();
        let r = r.clone();
        async move { c.generate(r).await.expect("together").token_ids }
    }))
    .await;
    assert_eq!(solo, together);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_exports_report_their_bytes() {
    let t = graft_tests::start_tiny().await;
    let model = t.server.engine().expect("ready").model().clone();
    let (c, w) = random_peft(&model, 3, 2);
    let total = (c.len() + w.len()) as u64;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let client = t.client.with_progress(std::sync::Arc::new(move |n| {
        s2.lock().expect("lock").push(n)
    }));
    client
        .import_adapter("", "p", c, w, false)
        .await
        .expect("import");
    let up = std::mem::take(&mut *seen.lock().expect("lock"));
    assert_eq!(up.last().copied(), Some(total), "{up:?}");
    assert!(up.windows(2).all(|p| p[0] <= p[1]));
    client.export_adapter("", "p").await.expect("export");
    let down = seen.lock().expect("lock").clone();
    assert_eq!(down.last().copied(), Some(total), "{down:?}");
}

/// A stored adapter whose weights file is damaged or gone on the server answers DATA_LOSS
/// naming the adapter on every load (the cache holds one adapter at most, and each request
/// for the other evicts it, so every request reads the store), and an intact adapter beside
/// it serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_whose_stored_weights_are_damaged_or_missing_answers_data_loss() {
    let t = start_with(tiny_model_path(), |c| c.adapter_cache_bytes = 1).await;
    let model = t.server.engine().expect("ready").model().clone();
    for (i, name) in ["kept", "hurt"].iter().enumerate() {
        let (c, w) = random_peft(&model, 90 + i as u64, 4);
        t.client
            .import_adapter("", name, c, w, false)
            .await
            .expect("import");
    }
    let generate = |name: &str| {
        t.client.generate(
            GenerateOptions {
                adapter: Some(name.into()),
                ..GenerateOptions::greedy(2)
            }
            .prompt("hi"),
        )
    };
    generate("hurt").await.expect("intact before");
    let dir = t
        .server
        .adapters()
        .expect("ready")
        .find(graft_tests::TENANT, &"hurt".parse().expect("ref"))
        .await
        .expect("row")
        .dir;
    let key = format!("adapters/{dir}/adapter_model.safetensors");
    let blobs = t.blobs();
    blobs
        .put(&key, b"not a safetensors file".to_vec())
        .await
        .expect("damage");
    generate("kept").await.expect("evicts hurt");
    let e = generate("hurt").await.expect_err("damaged weights");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(
        e.message().contains("hurt") && e.message().contains("damaged"),
        "{e:?}"
    );
    blobs.delete(&key).await.expect("remove");
    generate("kept").await.expect("evicts hurt");
    let e = generate("hurt").await.expect_err("missing weights");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(
        e.message().contains("adapter_model.safetensors is missing"),
        "{e:?}"
    );
    generate("kept")
        .await
        .expect("the intact adapter serves on");
}
