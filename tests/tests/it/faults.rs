//! Replicas killed without a word (SIGKILL) in the middle of writes and of training, 20
//! times each, with another replica running throughout, on one PostgreSQL and one S3
//! bucket: afterwards no replica shows a half-written adapter or dataset, every
//! acknowledged write is there whole, and a job killed under again and again succeeds.

use std::time::{Duration, Instant};

use graft_client::{proto as pb, GenerateOptions, GraftClient};
use graft_server::{blobs::Blobs, model::BaseModel, store::testing::TestPostgres};
use graft_tests::{
    metric_value,
    process::{start_long_job, Graftd, GraftdOptions, S3Server},
    random_peft, tiny_model_path, TENANT,
};

const KILLS: usize = 20;

/// PostgreSQL, an S3 server, and graftd processes on both, each on a data directory of its
/// own (a replacement pod starts with an empty disk).
struct World {
    name: String,
    url: String,
    env: Vec<(String, String)>,
    dirs: Vec<tempfile::TempDir>,
    s3: S3Server,
    _pg: TestPostgres,
}

impl World {
    async fn new(name: &str, env: Vec<(String, String)>) -> Self {
        let pg = TestPostgres::start();
        let url = pg.database(name).await;
        let s3 = S3Server::start();
        let mut all = s3.env();
        all.extend(env);
        Self {
            name: name.into(),
            url,
            env: all,
            dirs: Vec::new(),
            s3,
            _pg: pg,
        }
    }

    fn blob_store(&self) -> String {
        format!("s3://graft-test/{}", self.name)
    }

    async fn spawn(&mut self) -> Graftd {
        self.dirs.push(tempfile::tempdir().expect("data"));
        let model = tiny_model_path();
        Graftd::spawn(GraftdOptions {
            model: &model,
            data: self.dirs.last().expect("dir").path(),
            database_url: Some(self.url.clone()),
            blob_store: Some(self.blob_store()),
            env: self.env.clone(),
        })
        .await
    }

    /// The bucket as the test reads it.
    fn blobs(&self) -> Blobs {
        let dir = self.dirs.first().expect("a replica ran").path();
        Blobs::open_with(Some(&self.blob_store()), dir, &self.s3.options()).expect("blobs")
    }
}

/// Times one `write` (named "probe", index 0) on a replica of its own, then runs it
/// `KILLS` times (named `<prefix><i>`, index i), each on a fresh replica SIGKILLed from
/// before the write reaches the server to well after it is done (0 to 3 times the probe's
/// time, evenly: one write on a loaded machine can take much longer than the probe did).
/// The names acknowledged before their kill; asserts the kills landed both before and after
/// a write's end.
async fn writes_killed<T, F>(world: &mut World, what: &str, prefix: &str, write: F) -> Vec<String>
where
    T: Send + 'static,
    F: Fn(GraftClient, String, usize) -> tokio::task::JoinHandle<Result<T, tonic::Status>>,
{
    let probe = world.spawn().await;
    let client = probe.client(TENANT).await;
    let started = Instant::now();
    write(client, "probe".into(), 0)
        .await
        .expect("task")
        .unwrap_or_else(|e| panic!("the probe {what}: {e:?}"));
    let typical = started.elapsed();
    probe.kill().await;

    let mut acked = Vec::new();
    for i in 0..KILLS {
        let delay = typical.mul_f64(3.0 * i as f64 / (KILLS - 1) as f64);
        let name = format!("{prefix}{i}");
        let victim = world.spawn().await;
        let task = write(victim.client(TENANT).await, name.clone(), i);
        tokio::time::sleep(delay).await;
        victim.kill().await;
        if task.await.expect("task").is_ok() {
            acked.push(name);
        }
    }
    eprintln!(
        "{what}s killed: {} of {KILLS} acknowledged before the kill (one takes {typical:?})",
        acked.len()
    );
    assert!(acked.len() < KILLS, "no kill landed before an {what}'s end");
    assert!(
        !acked.is_empty(),
        "no {what} was acknowledged before its kill"
    );
    acked
}

fn greedy(adapter: &str) -> pb::GenerateRequest {
    GenerateOptions {
        adapter: Some(adapter.into()),
        ..GenerateOptions::greedy(2)
    }
    .prompt("a b")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_during_imports_leave_no_half_adapter_and_lose_no_acknowledged_one() {
    let mut world = World::new("kill_import", vec![]).await;
    let survivor = world.spawn().await;
    let cs = survivor.client(TENANT).await;
    let m = BaseModel::load(&tiny_model_path(), &candle_core::Device::Cpu).expect("tiny");
    let files: Vec<(Vec<u8>, Vec<u8>)> = (0..KILLS)
        .map(|i| random_peft(&m, 40 + i as u64, 64))
        .collect();
    let acked = writes_killed(&mut world, "import", "k", |client, name, i| {
        let (c, w) = files[i].clone();
        tokio::spawn(async move { client.import_adapter("", &name, c, w, false).await })
    })
    .await;

    // A replica started afterwards and the one that ran throughout agree, and every version
    // either of them lists is whole: it exports the files imported and it serves.
    let fresh = world.spawn().await;
    let cf = fresh.client(TENANT).await;
    for client in [&cs, &cf] {
        let listed: Vec<String> = client
            .list_adapters("")
            .await
            .expect("list")
            .into_iter()
            .map(|v| v.name)
            .collect();
        for name in &acked {
            assert!(listed.contains(name), "acknowledged {name} is missing");
        }
        for name in listed.iter().filter(|n| *n != "probe") {
            let i: usize = name[1..].parse().expect("k<i>");
            let (_, w) = client.export_adapter("", name).await.expect("export");
            assert_eq!(w, files[i].1, "{name}'s weights are whole");
            client
                .generate(greedy(name))
                .await
                .unwrap_or_else(|e| panic!("{name} serves: {e:?}"));
        }
    }
    fresh.kill().await;
    survivor.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_during_dataset_uploads_leave_no_half_dataset() {
    let mut world = World::new("kill_upload", vec![]).await;
    let survivor = world.spawn().await;
    let cs = survivor.client(TENANT).await;
    // About 2 MB: two upload chunks, a validation pass, one blob.
    let line = b"{\"prompt\":\"the quick brown fox jumps\",\"completion\":\"over the lazy dog\"}\n";
    let jsonl: Vec<u8> = line.repeat(2 * 1024 * 1024 / line.len());
    let acked = writes_killed(&mut world, "upload", "d", |client, name, _| {
        let body = jsonl.clone();
        tokio::spawn(async move { client.upload_dataset("", &name, "", body).await })
    })
    .await;

    let listed = cs
        .training()
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .datasets;
    let names: Vec<&str> = listed.iter().map(|d| d.name.as_str()).collect();
    for name in &acked {
        assert!(
            names.contains(&name.as_str()),
            "acknowledged {name} is missing"
        );
    }
    // Every listed dataset's file is in the bucket, whole.
    let blobs = world.blobs();
    for d in &listed {
        let stored = blobs
            .get(&format!("datasets/{}.jsonl", d.id))
            .await
            .unwrap_or_else(|e| panic!("{}'s file: {e}", d.name));
        assert_eq!(stored.as_ref(), jsonl.as_slice(), "{} is whole", d.name);
        assert_eq!(d.size_bytes, jsonl.len() as u64);
    }
    survivor.kill().await;
}

/// The replica running the job, of two: the one with a run of it started and not ended
/// (runs started minus runs ended, from its own counters; a run that lost its lease to the
/// other replica ends as cancelled there). None while neither or, for a moment, both do.
async fn runner(rs: &[Option<Graftd>; 2]) -> Option<usize> {
    let mut running = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        let r = r.as_ref().expect("both run between kills");
        let text = r.scrape().await;
        let count = |s: &str| {
            metric_value(
                &text,
                "graft_training_jobs_total",
                &[&format!("status=\"{s}\"")],
            )
        };
        let ended = count("succeeded") + count("failed") + count("cancelled");
        if count("running") > ended {
            running.push(i);
        }
    }
    match running[..] {
        [one] => Some(one),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_replica_is_killed_20_times_mid_step_still_succeeds() {
    let mut world = World::new(
        "kill_train",
        vec![("GRAFT_JOB_LEASE_SECS".into(), "2".into())],
    )
    .await;
    let mut rs = [Some(world.spawn().await), Some(world.spawn().await)];
    let mut clients = [
        rs[0].as_ref().expect("r0").client(TENANT).await,
        rs[1].as_ref().expect("r1").client(TENANT).await,
    ];
    let job = start_long_job(&clients[0], "survivor", 5).await;
    let mut last_step = 0;
    for kill in 0..KILLS {
        // Wait for the job to make progress on one replica, then kill that replica at once
        // (a step takes milliseconds: the kill lands mid-step or between two).
        let end = Instant::now() + Duration::from_secs(60);
        let (victim, step) = loop {
            assert!(
                Instant::now() < end,
                "kill {kill}: the job made no progress"
            );
            let j = clients[0].get_job("", &job.id).await.expect("get");
            assert_ne!(j.status, "failed", "{}", j.error);
            assert_ne!(
                j.status, "succeeded",
                "finished before kill {kill}: make it longer"
            );
            if j.step > last_step {
                if let Some(i) = runner(&rs).await {
                    break (i, j.step);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        last_step = step;
        // Killed first (no step more runs there), then replaced by a fresh process.
        rs[victim].take().expect("running").kill().await;
        let fresh = world.spawn().await;
        clients[victim] = fresh.client(TENANT).await;
        rs[victim] = Some(fresh);
    }
    let c = clients[0].clone();
    let (_, done) = tokio::time::timeout(Duration::from_secs(180), c.follow_job("", &job.id))
        .await
        .expect("the job ends")
        .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    assert_eq!(done.step, done.total_steps);
    eprintln!(
        "training: {KILLS} kills mid-run, last seen at step {last_step} of {}",
        done.total_steps
    );
    c.generate(greedy("survivor"))
        .await
        .expect("the trained adapter serves");
    for r in rs.into_iter().flatten() {
        r.kill().await;
    }
}
