//! Training over gRPC: a real SmolLM2 learns a fixed answer format and the result is served
//! by the next request; bad datasets and hyper-parameters are refused; cancellation, NaN
//! loss and an unwritable checkpoint directory end jobs cleanly.

use std::time::Duration;

use graft_client::{proto as pb, proto::create_job_request::MethodConfig, GenerateOptions};
use graft_tests::{fixtures, real_model_path, start_with, tiny_model_path};
use tonic::Code;

fn alpaca_jsonl() -> Vec<u8> {
    let path = fixtures().join("peft-lora-smollm2/train_dataset_alpaca.json");
    let v: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json");
    v.iter()
        .map(|x| format!("{x}\n"))
        .collect::<String>()
        .into_bytes()
}

fn job(dataset: &str, adapter: &str, h: pb::Hyperparameters) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        dataset: dataset.into(),
        adapter_name: adapter.into(),
        hyperparameters: Some(h),
        ..Default::default()
    }
}

fn statuses(events: &[pb::JobEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Status(s)) => Some(s.status.clone()),
            _ => None,
        })
        .collect()
}

fn steps(events: &[pb::JobEvent]) -> Vec<pb::StepEvent> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Step(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

const HELD_OUT: [&str; 3] = [
    "What is the capital of Germany?",
    "How many wheels does a bicycle have?",
    "What color is the sky on a clear day?",
];

/// The real model learns the `ANSWER: ... | CONFIDENCE: ...` format from 42 examples and the
/// very next Generate naming the adapter answers in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_teaches_the_answer_format_and_the_result_is_served() {
    let t = start_with(real_model_path(), |c| c.training_threads = 2).await;
    let ask = |q: &str, adapter: Option<&str>| {
        GenerateOptions {
            adapter: adapter.map(String::from),
            ..GenerateOptions::greedy(16)
        }
        .chat([("user", q.to_string())])
    };
    for q in HELD_OUT {
        let before = t.client.generate(ask(q, None)).await.expect("base");
        assert!(
            !before.text.starts_with("ANSWER:"),
            "{q}: {:?}",
            before.text
        );
    }
    let ds = t
        .client
        .upload_dataset("", "answers", "", alpaca_jsonl())
        .await
        .expect("upload");
    assert_eq!((ds.examples, ds.format.as_str()), (42, "alpaca"));
    assert!(ds.tokens > 1000);
    let created = t
        .client
        .create_job(pb::CreateJobRequest {
            validation_split: Some(0.1),
            method_config: Some(MethodConfig::Lora(pb::LoraMethod {
                r: Some(8),
                alpha: Some(16.0),
                ..Default::default()
            })),
            ..job(
                "answers",
                "answerer",
                pb::Hyperparameters {
                    epochs: Some(3),
                    batch_size: Some(4),
                    learning_rate: Some(2e-3),
                    warmup_steps: Some(2),
                    checkpoint_every: Some(5),
                    ..Default::default()
                },
            )
        })
        .await
        .expect("create");
    assert_eq!(created.status, "queued");
    let (events, done) = tokio::time::timeout(
        Duration::from_secs(600),
        t.client.follow_job("", &created.id),
    )
    .await
    .expect("job finishes in time")
    .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let ckpt = t.data.path().join("jobs").join(&created.id);
    assert!(
        graft_tests::eventually(Duration::from_secs(10), || !ckpt.exists()).await,
        "a succeeded job's checkpoints are removed"
    );
    assert_eq!(
        statuses(&events),
        ["validating", "queued", "running", "succeeded"]
    );
    let st = steps(&events);
    assert_eq!(st.len() as u64, done.total_steps);
    let first = st.first().expect("steps").train_loss;
    let last = st.last().expect("steps").train_loss;
    assert!(last < first / 2.0, "loss {first} -> {last}");
    assert!(st
        .iter()
        .all(|s| s.tokens_per_second > 0.0 && s.learning_rate > 0.0));
    assert!(events
        .iter()
        .any(|e| matches!(e.event, Some(pb::job_event::Event::Eval(_)))));
    // The job's events replay after the end, from any point.
    let mut replay = t
        .client
        .watch_job("", &created.id, 3)
        .await
        .expect("replay");
    let mut n = 0;
    while let Some(e) = replay.message().await.expect("event") {
        assert!(e.seq > 3);
        n += 1;
    }
    assert_eq!(n, events.len() - 3);
    // Served at once, without a restart.
    assert_eq!(done.adapter_version, 1);
    for q in HELD_OUT {
        let after = t
            .client
            .generate(ask(q, Some("answerer")))
            .await
            .expect("adapted");
        assert!(after.text.starts_with("ANSWER:"), "{q}: {:?}", after.text);
        assert!(
            after.text.contains("| CONFIDENCE:"),
            "{q}: {:?}",
            after.text
        );
    }
    // And exportable as PEFT like any other.
    let (c, w) = t
        .client
        .export_adapter("", "answerer")
        .await
        .expect("export");
    let cfg: serde_json::Value = serde_json::from_slice(&c).expect("config");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert!(w.len() > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_datasets_are_refused_with_line_numbers() {
    let t = start_with(tiny_model_path(), |_| {}).await;
    let cases: Vec<(&str, &str)> = vec![
        (
            "{\"prompt\":\"a\",\"completion\":\"b\"}\n{broken\n",
            "line 2: invalid JSON",
        ),
        ("{\"instruction\":\"q\"}\n", "line 1: missing field"),
        (
            "{\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}\n",
            "line 1: unknown role",
        ),
        (
            "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}\n",
            "line 1: no assistant turn",
        ),
        (
            "{\"instruction\":\"q\",\"output\":\"  \"}\n",
            "line 1: empty output",
        ),
        ("", "empty dataset"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let e = t
            .client
            .upload_dataset("", &format!("bad{i}"), "", text.as_bytes().to_vec())
            .await
            .expect_err(needle);
        assert_eq!(e.code(), Code::InvalidArgument, "{needle}");
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    let e = t
        .client
        .upload_dataset("", "utf", "", vec![b'{', 0xff, b'}'])
        .await
        .expect_err("utf8");
    assert_eq!(e.code(), Code::InvalidArgument);
    // Non-Latin text works end to end.
    let zh = "{\"prompt\":\"你好\",\"completion\":\"世界，你好！\"}\n".repeat(4);
    let d = t
        .client
        .upload_dataset("", "zh", "", zh.into_bytes())
        .await
        .expect("chinese");
    assert_eq!(d.examples, 4);
    let e = t
        .client
        .upload_dataset("", "zh", "", b"{\"text\":\"x\"}\n".to_vec())
        .await
        .expect_err("dup");
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(
        t.client
            .training()
            .list_datasets(pb::ListDatasetsRequest {
                tenant: String::new()
            })
            .await
            .expect("list")
            .into_inner()
            .datasets
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_are_refused_naming_the_field() {
    let t = start_with(tiny_model_path(), |_| {}).await;
    t.client
        .upload_dataset(
            "",
            "d",
            "",
            b"{\"prompt\":\"a b\",\"completion\":\"c d\"}\n".repeat(4),
        )
        .await
        .expect("upload");
    let h = pb::Hyperparameters::default;
    let lora = |l: pb::LoraMethod| pb::CreateJobRequest {
        method_config: Some(MethodConfig::Lora(l)),
        ..job("d", "x", h())
    };
    let cases: Vec<(pb::CreateJobRequest, &str)> = vec![
        (
            job(
                "d",
                "x",
                pb::Hyperparameters {
                    learning_rate: Some(-1.0),
                    ..h()
                },
            ),
            "hyperparameters.learning_rate",
        ),
        (
            job(
                "d",
                "x",
                pb::Hyperparameters {
                    batch_size: Some(0),
                    ..h()
                },
            ),
            "hyperparameters.batch_size",
        ),
        (
            job(
                "d",
                "x",
                pb::Hyperparameters {
                    epochs: Some(0),
                    ..h()
                },
            ),
            "hyperparameters.epochs",
        ),
        (
            job(
                "d",
                "x",
                pb::Hyperparameters {
                    lr_scheduler: "exp".into(),
                    ..h()
                },
            ),
            "hyperparameters.lr_scheduler",
        ),
        (
            job(
                "d",
                "x",
                pb::Hyperparameters {
                    max_grad_norm: Some(-1.0),
                    ..h()
                },
            ),
            "hyperparameters.max_grad_norm",
        ),
        (
            job(
                "d",
                "x",
                pb::Hyperparameters {
                    packing: true,
                    ..h()
                },
            ),
            "hyperparameters.packing",
        ),
        (
            lora(pb::LoraMethod {
                r: Some(0),
                ..Default::default()
            }),
            "lora.r",
        ),
        (
            lora(pb::LoraMethod {
                r: Some(100_000),
                ..Default::default()
            }),
            "lora.r",
        ),
        (
            lora(pb::LoraMethod {
                dropout: Some(1.0),
                ..Default::default()
            }),
            "lora.dropout",
        ),
        (
            lora(pb::LoraMethod {
                target_modules: vec!["lm_head".into()],
                ..Default::default()
            }),
            "lora.target_modules",
        ),
        (job("d", "../x", h()), "adapter_name"),
        (
            pb::CreateJobRequest {
                validation_split: Some(0.9),
                ..job("d", "x", h())
            },
            "validation_split",
        ),
    ];
    for (req, field) in cases {
        let e = t.client.create_job(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    assert_eq!(
        t.client
            .create_job(job("nope", "x", h()))
            .await
            .expect_err("missing")
            .code(),
        Code::NotFound
    );
    // Another tenant's dataset is as missing as a missing one.
    assert_eq!(
        t.tenant("other")
            .await
            .create_job(job("d", "x", h()))
            .await
            .expect_err("other tenant")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        t.client
            .get_job("", "job-nope")
            .await
            .expect_err("no job")
            .code(),
        Code::NotFound
    );
}

/// A job on dataset "d" that runs until cancelled (5,000 epochs), with `h`'s other settings.
fn long_job(adapter: &str, h: pb::Hyperparameters) -> pb::CreateJobRequest {
    job(
        "d",
        adapter,
        pb::Hyperparameters {
            epochs: Some(5000),
            ..h
        },
    )
}

/// A tiny-model server with a small prompt/completion dataset "d" uploaded.
async fn tiny_with_dataset() -> graft_tests::TestServer {
    let t = start_with(tiny_model_path(), |_| {}).await;
    graft_tests::upload_tiny_dataset(&t.client).await;
    t
}

async fn wait_for_step(t: &graft_tests::TestServer, id: &str) {
    let mut s = t.client.watch_job("", id, 0).await.expect("watch");
    while let Some(e) = s.message().await.expect("event") {
        if matches!(e.event, Some(pb::job_event::Event::Step(_))) {
            return;
        }
    }
    panic!("job ended before its first step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_and_keeps_its_checkpoint() {
    let t = tiny_with_dataset().await;
    let j = t
        .client
        .create_job(long_job(
            "x",
            pb::Hyperparameters {
                checkpoint_every: Some(1),
                ..Default::default()
            },
        ))
        .await
        .expect("create");
    wait_for_step(&t, &j.id).await;
    t.client.cancel_job("", &j.id).await.expect("cancel");
    let (events, done) =
        tokio::time::timeout(Duration::from_secs(30), t.client.follow_job("", &j.id))
            .await
            .expect("ends")
            .expect("watch");
    assert_eq!(done.status, "cancelled");
    assert_eq!(
        statuses(&events).last().map(String::as_str),
        Some("cancelled")
    );
    assert!(t
        .data
        .path()
        .join("jobs")
        .join(&j.id)
        .join("checkpoint.json")
        .exists());
    // The checkpoint is in the blob store too (another replica could resume from it).
    let stored = t.stored(&format!("jobs/{}", j.id)).await;
    assert!(
        stored.iter().any(|f| f == "checkpoint.json")
            && stored.iter().any(|f| f.starts_with("checkpoint-")),
        "{stored:?}"
    );
    // No adapter was registered.
    assert!(t.client.list_adapters("").await.expect("list").is_empty());
    // Ops see the job in the metrics.
    let m = t.scrape().await;
    assert!(
        graft_tests::metric_value(&m, "graft_training_tokens_total", &[]) > 0.0,
        "{m}"
    );
    assert!(
        graft_tests::metric_value(&m, "graft_training_jobs_total", &["status=\"cancelled\""])
            >= 1.0
    );
    assert!(m.contains("graft_training_step_seconds_bucket"));
    assert!(m.contains("graft_training_loss"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_loss_and_unwritable_checkpoints_fail_the_job_with_the_reason() {
    let t = tiny_with_dataset().await;
    let j = t
        .client
        .create_job(job(
            "d",
            "x",
            pb::Hyperparameters {
                learning_rate: Some(1e30),
                max_grad_norm: Some(0.0),
                epochs: Some(20),
                ..Default::default()
            },
        ))
        .await
        .expect("create");
    let (_, done) = t.client.follow_job("", &j.id).await.expect("watch");
    assert_eq!(done.status, "failed");
    assert!(
        done.error.contains("NaN") && done.error.contains("step"),
        "{}",
        done.error
    );
    // A file where the checkpoint directory should be.
    std::fs::write(t.data.path().join("jobs"), b"not a directory").expect("block jobs dir");
    let j = t
        .client
        .create_job(job(
            "d",
            "y",
            pb::Hyperparameters {
                epochs: Some(1),
                ..Default::default()
            },
        ))
        .await
        .expect("create");
    let (_, done) = t.client.follow_job("", &j.id).await.expect("watch");
    assert_eq!(done.status, "failed");
    assert!(done.error.contains("checkpoint"), "{}", done.error);
    // Nothing stored earlier was lost.
    assert!(t
        .client
        .training()
        .get_dataset(pb::GetDatasetRequest {
            tenant: String::new(),
            name: "d".into()
        })
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_computes_at_a_time_and_the_next_waits_in_the_queue() {
    let t = tiny_with_dataset().await;
    let long = t
        .client
        .create_job(long_job("long", pb::Hyperparameters::default()))
        .await
        .expect("long");
    let short = t
        .client
        .create_job(job(
            "d",
            "short",
            pb::Hyperparameters {
                epochs: Some(1),
                ..Default::default()
            },
        ))
        .await
        .expect("short");
    wait_for_step(&t, &long.id).await;
    assert_eq!(
        t.client.get_job("", &short.id).await.expect("get").status,
        "queued"
    );
    // Ops see one job running and one waiting. (Every test server in this process sets the
    // same process-wide gauges, so wait until this server's reading is the one shown.)
    let gauges_show_both = async {
        loop {
            let m = t.scrape().await;
            let now = |s: &str| graft_tests::metric_value(&m, "graft_training_jobs_current", &[s]);
            if now("status=\"running\"") >= 1.0 && now("status=\"queued\"") >= 1.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), gauges_show_both)
        .await
        .expect("graft_training_jobs_current shows the running and the queued job");
    t.client.cancel_job("", &long.id).await.expect("cancel");
    let (_, done) =
        tokio::time::timeout(Duration::from_secs(60), t.client.follow_job("", &short.id))
            .await
            .expect("runs next")
            .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    assert_eq!(
        t.client.get_job("", &long.id).await.expect("get").status,
        "cancelled"
    );
}

/// Deleting a dataset hides it at once, but the jobs created on it still run on it; its file
/// is removed as soon as no unfinished job needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_dataset_serves_its_jobs_then_its_file_is_removed() {
    let t = tiny_with_dataset().await;
    // Whether the dataset's file is in the server's blob store.
    let stored = |d: &pb::Dataset| {
        let name = format!("{}.jsonl", d.id);
        let t = &t;
        async move { t.stored("datasets").await.contains(&name) }
    };
    let lines = b"{\"prompt\":\"x y\",\"completion\":\"z\"}\n".repeat(8);
    let training = t.client.training();
    let delete = |name: &str| {
        let req = pb::DeleteDatasetRequest {
            name: name.into(),
            ..Default::default()
        };
        let mut tr = training.clone();
        async move { tr.delete_dataset(req).await }
    };
    // No job: the file goes with the dataset.
    let lonely = t
        .client
        .upload_dataset("", "lonely", "", lines.clone())
        .await
        .expect("upload");
    assert!(stored(&lonely).await);
    delete("lonely").await.expect("delete");
    assert!(!stored(&lonely).await, "an unneeded file is removed");
    // A queued job keeps its deleted dataset's file and trains on it.
    let e = t
        .client
        .upload_dataset("", "e", "", lines)
        .await
        .expect("upload");
    let long = t
        .client
        .create_job(long_job("long", pb::Hyperparameters::default()))
        .await
        .expect("long");
    wait_for_step(&t, &long.id).await;
    let queued = t
        .client
        .create_job(job("e", "on-e", pb::Hyperparameters::default()))
        .await
        .expect("queued");
    delete("e").await.expect("delete");
    let names: Vec<String> = t
        .client
        .training()
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .datasets
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["d"], "a deleted dataset is not listed");
    assert!(stored(&e).await, "a queued job still needs the file");
    let shown = t.client.get_job("", &queued.id).await.expect("job");
    assert_eq!(
        (shown.dataset.as_str(), shown.dataset_id.as_str()),
        ("e", e.id.as_str()),
        "a job names its dataset as given, deleted or not"
    );
    t.client.cancel_job("", &long.id).await.expect("cancel");
    let (_, done) =
        tokio::time::timeout(Duration::from_secs(60), t.client.follow_job("", &queued.id))
            .await
            .expect("runs")
            .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let gone = async {
        while stored(&e).await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("the file is removed once the job has ended");
}

/// A crash between storing a dataset's file and recording it leaves a file no row names;
/// a start removes it once it is older than the orphan grace (a younger one may be another
/// replica's upload in progress), keeps every recorded dataset, and removes this machine's
/// unfinished uploads at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_removes_orphaned_dataset_files_and_keeps_the_rest() {
    let t = tiny_with_dataset().await;
    t.blobs()
        .put("datasets/ds-orphan.jsonl", &b"{}\n"[..])
        .await
        .expect("stray blob");
    let uploads = t.data.path().join("uploads");
    std::fs::create_dir_all(&uploads).expect("uploads dir");
    std::fs::write(uploads.join(".ds-half.jsonl.tmp"), "{}\n").expect("stray upload");
    let data = t.data.clone();
    t.server.drain().await.expect("drain");
    // Within the grace (an hour by default) the stray stays; the half upload goes.
    let t = graft_tests::start_in(tiny_model_path(), data.clone(), |_| {}).await;
    assert_eq!(t.stored("datasets").await.len(), 2);
    assert!(!uploads.join(".ds-half.jsonl.tmp").exists());
    t.server.drain().await.expect("drain");
    // Past the grace, it goes.
    let t =
        graft_tests::start_in(tiny_model_path(), data, |c| c.orphan_grace = Duration::ZERO).await;
    let left = t.stored("datasets").await;
    let d = t
        .client
        .training()
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .datasets;
    assert_eq!(d.len(), 1);
    assert_eq!(left, [format!("{}.jsonl", d[0].id)]);
    t.client
        .create_job(job("d", "after-restart", pb::Hyperparameters::default()))
        .await
        .expect("the kept dataset still trains");
}
