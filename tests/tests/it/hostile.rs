//! Hostile inputs whose cost used to be unbounded, over gRPC with the tiny model: one huge
//! dataset line, duplicate keys, huge adapter configs and pattern tables, a full disk, and a
//! large dataset's CreateJob next to live Generate calls.

use std::time::{Duration, Instant};

use graft_client::{proto as pb, GenerateOptions};
use graft_server::{adapters::testing::random_peft, model::BaseModel};
use graft_tests::{start_in, start_tiny, tiny_model_path};
use tonic::Code;

fn tiny_model() -> BaseModel {
    BaseModel::load(&tiny_model_path(), &candle_core::Device::Cpu).expect("tiny")
}

async fn datasets(c: &graft_client::GraftClient) -> Vec<String> {
    c.training()
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect("datasets")
        .into_inner()
        .datasets
        .into_iter()
        .map(|d| d.name)
        .collect()
}

/// Files under the data directory's `sub` folder (none when it does not exist).
fn entries(dir: &std::path::Path, sub: &str) -> Vec<String> {
    std::fs::read_dir(dir.join(sub))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Stored dataset files and this machine's uploads in progress.
fn datasets_dir_entries(dir: &std::path::Path) -> Vec<String> {
    let mut all = entries(dir, "datasets");
    all.extend(entries(dir, "uploads"));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_huge_line_and_duplicate_keys_are_refused_by_line() {
    let t = start_tiny().await;
    let mut data = b"{\"text\":\"fine\"}\n{\"text\":\"".to_vec();
    data.extend(std::iter::repeat_n(b'x', 8 << 20));
    data.extend(b"\"}\n{\"text\":\"a\",\"text\":\"b\"}\n");
    let err = t
        .client
        .upload_dataset("", "huge", "", data)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let m = err.message();
    assert!(m.contains("line 2: line too long"), "{m}");
    assert!(
        m.contains("line 3: duplicate key: duplicate key \"text\""),
        "{m}"
    );
    assert!(
        datasets_dir_entries(t.data.path()).is_empty() && t.stored("datasets").await.is_empty(),
        "nothing stored"
    );
    assert!(datasets(&t.client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_configs_are_capped_and_patterns_compile_once() {
    let t = start_tiny().await;
    let m = tiny_model();
    let (c, w) = random_peft(&m, 1, 4);
    let mut cfg: serde_json::Value = serde_json::from_slice(&c).expect("config");
    // A valid config padded past the cap.
    cfg["padding"] = serde_json::json!("x".repeat(300 << 10));
    let err = t
        .client
        .import_adapter(
            "",
            "big",
            serde_json::to_vec(&cfg).expect("json"),
            w.clone(),
            false,
        )
        .await
        .expect_err("too big");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("adapter_config.json"),
        "{}",
        err.message()
    );
    // 1,000 pattern keys that match nothing: compiled once each, not once per module.
    let mut cfg: serde_json::Value = serde_json::from_slice(&c).expect("config");
    cfg.as_object_mut().expect("object").remove("padding");
    let keys: serde_json::Map<String, serde_json::Value> = (0..1000)
        .map(|i| (format!("nothing_{i}_(a|b)+"), serde_json::json!(4)))
        .collect();
    cfg["rank_pattern"] = serde_json::Value::Object(keys.clone());
    cfg["alpha_pattern"] = serde_json::Value::Object(keys);
    let started = Instant::now();
    t.client
        .import_adapter(
            "",
            "patterns",
            serde_json::to_vec(&cfg).expect("json"),
            w.clone(),
            false,
        )
        .await
        .expect("imported");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "import took {:?}",
        started.elapsed()
    );
    // More keys than the cap: refused, naming the field.
    let many: serde_json::Map<String, serde_json::Value> = (0..1025)
        .map(|i| (format!("k{i}"), serde_json::json!(4)))
        .collect();
    cfg["rank_pattern"] = serde_json::Value::Object(many);
    let err = t
        .client
        .import_adapter(
            "",
            "patterns",
            serde_json::to_vec(&cfg).expect("json"),
            w,
            false,
        )
        .await
        .expect_err("too many keys");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("rank_pattern"), "{}", err.message());
}

/// A tmpfs of `size` mounted at `dir` for the test's life.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("dir").keep();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount runs");
        assert!(
            ok.success(),
            "mounting a small tmpfs needs root (CI runs as root)"
        );
        Self { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_resource_exhausted_and_leaves_no_temporary_files() {
    let disk = SmallDisk::mount("6m");
    let dir = std::sync::Arc::new(tempfile::tempdir_in(&disk.dir).expect("data dir"));
    let data = dir.path().to_path_buf();
    // The database on the small disk too (SQLite in the data directory, also in the suite's
    // PostgreSQL pass): the test is of a disk that fills under both files and database.
    let t = start_in(tiny_model_path(), dir, |c| {
        c.database_url = None;
        c.blob_store = None;
    })
    .await;
    t.client
        .upload_dataset("", "small", "", b"{\"text\":\"kept\"}\n".to_vec())
        .await
        .expect("a small dataset fits");
    // 8 MB of valid lines onto a 6 MB disk.
    let line = format!("{{\"text\":\"{}\"}}\n", "y".repeat(1000));
    let big: Vec<u8> = line.repeat(8 << 10).into_bytes();
    let err = t
        .client
        .upload_dataset("", "big", "", big)
        .await
        .expect_err("disk full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("no space left"), "{}", err.message());
    assert!(
        !err.message().contains(&*disk.dir.to_string_lossy()),
        "no server path in {}",
        err.message()
    );
    // No temporary file of ours, nor a staged one of the store's (`name#n`).
    let files = datasets_dir_entries(&data);
    assert!(
        files
            .iter()
            .all(|f| !f.ends_with(".tmp") && !f.contains('#')),
        "temporaries left: {files:?}"
    );
    // An adapter import onto the full disk: the same, and no half-written directory.
    let filler = disk.dir.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 6 << 20]);
    let m = tiny_model();
    let (c, w) = random_peft(&m, 2, 4);
    let err = t
        .client
        .import_adapter("", "a", c, w, false)
        .await
        .expect_err("disk full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("no space left"), "{}", err.message());
    let adapters = entries(&data, "adapters");
    assert!(adapters.is_empty(), "{adapters:?}");
    // CreateJob with no byte free: the database cannot write either.
    let err = t
        .client
        .create_job(pb::CreateJobRequest {
            dataset: "small".into(),
            adapter_name: "j".into(),
            ..Default::default()
        })
        .await
        .expect_err("disk full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("no space left on the server's disk (the database could not write)"),
        "{}",
        err.message()
    );
    // What was stored before is still there, and serving still works.
    assert_eq!(datasets(&t.client).await, ["small"]);
    t.client
        .generate(GenerateOptions::greedy(3).prompt("hi"))
        .await
        .expect("serving goes on");
    drop(t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_large_datasets_create_job_does_not_stall_generation() {
    // One runtime worker: a CreateJob that read and tokenised its dataset on it would stall
    // every other call for as long as that takes.
    let t = start_tiny().await;
    let line = "{\"prompt\":\"What is the word of the day? \",\"completion\":\"Bounded.\"}\n";
    let data = line.repeat(200_000).into_bytes(); // ~14 MB
    t.client
        .upload_dataset("", "large", "", data)
        .await
        .expect("upload");
    let c = t.client.clone();
    let started = Instant::now();
    let create = tokio::spawn(async move {
        let r = c
            .create_job(pb::CreateJobRequest {
                dataset: "large".into(),
                adapter_name: "large-job".into(),
                hyperparameters: Some(pb::Hyperparameters {
                    max_seq_len: Some(128),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        (r, started.elapsed())
    });
    let mut latencies = Vec::new();
    while !create.is_finished() {
        let t0 = Instant::now();
        t.client
            .generate(GenerateOptions::greedy(2).prompt("hi"))
            .await
            .expect("generate");
        latencies.push(t0.elapsed());
    }
    let (job, took) = create.await.expect("join");
    let job = job.expect("job created");
    t.client.cancel_job("", &job.id).await.expect("cancel");
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    let max = latencies[latencies.len() - 1];
    assert!(
        took > Duration::from_millis(500),
        "CreateJob took {took:?}: too short to show anything"
    );
    assert!(
        latencies.len() >= 5,
        "only {} generations ran during a {took:?} CreateJob",
        latencies.len()
    );
    // The slowest call, not a percentile: one runtime worker blocked for the whole load
    // would show as a single slow call among thousands of fast ones.
    assert!(
        max < took / 2 && max < Duration::from_secs(1),
        "slowest generation {max:?} (p99 {p99:?}) during a {took:?} CreateJob"
    );
}
