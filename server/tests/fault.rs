//! Crash safety: graftd is killed with SIGKILL at random moments while adapters are imported,
//! datasets uploaded and jobs trained, then started again, many times over one data
//! directory. After every restart: the server comes up, every acknowledged write is there
//! byte for byte, nothing is listed twice, every listed adapter loads and serves, keys made
//! before still work; at the end every job finishes.
//!
//! `GRAFT_FAULT_ITERATIONS` (default 8) sets the number of kills; the seed is printed so
//! a failing run can be replayed with `GRAFT_FAULT_SEED`.

mod process;

use std::{
    collections::{HashMap, HashSet},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use graft_client::{proto as pb, GenerateOptions, GraftClient};
use graft_server::{
    adapters::testing::random_peft,
    model::{
        tiny::{write_tiny_gguf, TinySpec},
        BaseModel,
    },
};
use process::{free_port, spawn, tenant_client, ADMIN_KEY};
use rand::{Rng, SeedableRng};

const JSONL: &str = "{\"prompt\":\"a b\",\"completion\":\"c d e\"}\n";

/// What the server acknowledged so far.
#[derive(Default, Clone)]
struct Acked {
    /// (name, version) -> weights bytes
    adapters: HashMap<(String, u32), Vec<u8>>,
    /// name -> examples
    datasets: HashMap<String, u64>,
    jobs: HashSet<String>,
    /// keys made in earlier lives
    keys: Vec<String>,
}

async fn check(c: &GraftClient, acked: &Acked) {
    let listed = c.list_adapters("").await.expect("list adapters");
    let mut seen = HashSet::new();
    for v in &listed {
        assert!(
            seen.insert((v.name.clone(), v.version)),
            "listed twice: {}@{}",
            v.name,
            v.version
        );
    }
    for ((name, version), weights) in &acked.adapters {
        let r = format!("{name}@{version}");
        let (_, w) = c
            .export_adapter("", &r)
            .await
            .unwrap_or_else(|e| panic!("acknowledged {r} lost: {e:?}"));
        assert_eq!(&w, weights, "{r} changed");
    }
    // Whatever is visible is whole: it loads and serves.
    for v in &listed {
        let r = format!("{}@{}", v.name, v.version);
        let opts = GenerateOptions {
            adapter: Some(r.clone()),
            ..GenerateOptions::greedy(1)
        };
        c.generate(opts.prompt("a"))
            .await
            .unwrap_or_else(|e| panic!("{r} is visible but broken: {e:?}"));
    }
    let datasets = c
        .training()
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect("list datasets")
        .into_inner()
        .datasets;
    let mut names = HashSet::new();
    for d in &datasets {
        assert!(
            names.insert(d.name.clone()),
            "dataset {} listed twice",
            d.name
        );
    }
    for (name, examples) in &acked.datasets {
        let d = datasets
            .iter()
            .find(|d| &d.name == name)
            .unwrap_or_else(|| panic!("acknowledged dataset {name} lost"));
        assert_eq!(d.examples, *examples);
    }
    let jobs = c
        .training()
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("jobs")
        .into_inner()
        .jobs;
    for id in &acked.jobs {
        assert!(
            jobs.iter().any(|j| &j.id == id),
            "acknowledged job {id} lost"
        );
    }
    let mut ids = HashSet::new();
    for j in &jobs {
        assert!(ids.insert(j.id.clone()), "job {} listed twice", j.id);
    }
}

/// Imports, uploads and job creations until the process dies; acknowledged ones recorded.
async fn workload(c: GraftClient, model: Arc<BaseModel>, life: usize, acked: Arc<Mutex<Acked>>) {
    let imports = {
        let (c, acked, model) = (c.clone(), acked.clone(), model.clone());
        async move {
            for j in 0..40u64 {
                let name = format!("a{}", j % 7);
                let (cfg, w) = random_peft(&model, (life as u64) * 1000 + j, 2 + (j as usize % 3));
                match c.import_adapter("", &name, cfg, w.clone(), false).await {
                    Ok(v) => {
                        acked
                            .lock()
                            .expect("lock")
                            .adapters
                            .insert((v.name, v.version), w);
                    }
                    Err(_) => return,
                }
            }
        }
    };
    let uploads = {
        let (c, acked) = (c.clone(), acked.clone());
        async move {
            for j in 0..40usize {
                let name = format!("d{life}-{j}");
                let n = 4 + j % 5;
                match c
                    .upload_dataset("", &name, "", JSONL.repeat(n).into_bytes())
                    .await
                {
                    Ok(d) => {
                        acked
                            .lock()
                            .expect("lock")
                            .datasets
                            .insert(name.clone(), d.examples);
                        if j % 8 == 0 {
                            let req = pb::CreateJobRequest {
                                dataset: name,
                                adapter_name: format!("t{life}"),
                                hyperparameters: Some(pb::Hyperparameters {
                                    epochs: Some(2),
                                    checkpoint_every: Some(2),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            };
                            match c.create_job(req).await {
                                Ok(job) => {
                                    acked.lock().expect("lock").jobs.insert(job.id);
                                }
                                Err(_) => return,
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        }
    };
    futures::join!(imports, uploads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_write() {
    let iterations: usize = std::env::var("GRAFT_FAULT_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("GRAFT_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fault test: {iterations} kills, GRAFT_FAULT_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let model_path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model_path, &TinySpec::default()).expect("tiny");
    let model =
        Arc::new(BaseModel::load(&model_path, &candle_core::Device::Cpu).expect("load tiny"));
    let data = dir.path().join("data");
    let acked = Arc::new(Mutex::new(Acked::default()));
    for life in 0..=iterations {
        let port = free_port();
        let mut child = spawn(&model_path, &data, port, Stdio::null());
        let c = tenant_client(port, "acme").await;
        {
            let a = acked.lock().expect("lock").clone();
            for k in &a.keys {
                let old = c.with_api_key(Some(k)).expect("ascii");
                old.list_adapters("")
                    .await
                    .expect("a key from an earlier life still works");
            }
            check(&c, &a).await;
        }
        let key = c
            .with_api_key(Some(ADMIN_KEY))
            .expect("ascii")
            .create_key("acme", "fault")
            .await
            .expect("key");
        acked.lock().expect("lock").keys.push(key);
        if life == iterations {
            // Last life: let every job finish.
            let ids: Vec<String> = acked.lock().expect("lock").jobs.iter().cloned().collect();
            let deadline = Instant::now() + Duration::from_secs(180);
            for id in ids {
                loop {
                    let j = c.get_job("", &id).await.expect("job");
                    if ["succeeded", "failed", "cancelled"].contains(&j.status.as_str()) {
                        assert_eq!(j.status, "succeeded", "job {id}: {}", j.error);
                        let r = format!("{}@{}", j.adapter_name, j.adapter_version);
                        c.get_adapter("", &r)
                            .await
                            .unwrap_or_else(|e| panic!("{r} of job {id}: {e:?}"));
                        break;
                    }
                    assert!(Instant::now() < deadline, "job {id} never ended: {j:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            child.kill();
            break;
        }
        let work = tokio::spawn(workload(c.clone(), model.clone(), life, acked.clone()));
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..600))).await;
        child.kill();
        work.await.expect("workload task");
    }
    let a = acked.lock().expect("lock");
    eprintln!(
        "acknowledged: {} adapter versions, {} datasets, {} jobs, {} keys",
        a.adapters.len(),
        a.datasets.len(),
        a.jobs.len(),
        a.keys.len()
    );
    assert!(
        !a.adapters.is_empty() && !a.datasets.is_empty(),
        "the kills came too early to test anything"
    );
}
