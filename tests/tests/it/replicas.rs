//! Replicas: graftd processes of their own on one PostgreSQL (a throw-away cluster) and one
//! S3 bucket (a throw-away moto server), as a Kubernetes Deployment would run them.

use std::time::{Duration, Instant};

use graft_client::{proto as pb, GenerateOptions};
use graft_server::store::testing::TestPostgres;
use graft_tests::{
    process::{start_long_job, Graftd, GraftdOptions, S3Server},
    tiny_model_path, TENANT,
};

fn step_of(e: &pb::JobEvent) -> Option<u64> {
    match &e.event {
        Some(pb::job_event::Event::Step(s)) => Some(s.step),
        _ => None,
    }
}

/// Two replicas' world: PostgreSQL, an S3 server, replica A running job "d" -> `adapter`
/// (300 epochs, a checkpoint every `checkpoint_every` steps) past step `min_step` (with
/// `after_checkpoint`, past a checkpoint at `min_step` or later), and B started after A
/// claimed it. Drop order: the processes before their stores.
struct Pair {
    b: Graftd,
    a: Graftd,
    job: pb::Job,
    /// The step (or checkpoint) of A's that was waited for.
    reached: u64,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    _s3: S3Server,
    _pg: TestPostgres,
}

async fn pair(
    name: &str,
    lease_secs: u64,
    adapter: &str,
    checkpoint_every: u32,
    min_step: u64,
    after_checkpoint: bool,
) -> Pair {
    let pg = TestPostgres::start();
    let url = pg.database(name).await;
    let s3 = S3Server::start();
    let mut env = s3.env();
    env.push(("GRAFT_JOB_LEASE_SECS".into(), lease_secs.to_string()));
    let model = tiny_model_path();
    let dirs = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let opts = |data| GraftdOptions {
        model: &model,
        data,
        database_url: Some(url.clone()),
        blob_store: Some(format!("s3://graft-test/{name}")),
        env: env.clone(),
    };
    let a = Graftd::spawn(opts(dirs.0.path())).await;
    let ca = a.client(TENANT).await;
    let job = start_long_job(&ca, adapter, checkpoint_every).await;
    let mut w = ca.watch_job("", &job.id, 0).await.expect("watch");
    let mut reached = 0;
    while let Some(e) = w.message().await.expect("event") {
        let step = match &e.event {
            Some(pb::job_event::Event::Checkpoint(cp)) if after_checkpoint => cp.step,
            Some(pb::job_event::Event::Step(s)) if !after_checkpoint => s.step,
            _ => continue,
        };
        if step >= min_step {
            reached = step;
            break;
        }
    }
    assert!(reached >= min_step, "step {min_step} not reached");
    drop(w);
    let b = Graftd::spawn(opts(dirs.1.path())).await;
    Pair {
        b,
        a,
        job,
        reached,
        _dirs: dirs,
        _s3: s3,
        _pg: pg,
    }
}

/// A job running on replica A, whose process is SIGKILLed after a checkpoint: replica B
/// takes the job over once A's lease expires, downloads the checkpoint A stored in the
/// bucket, resumes from it (no step up to it runs twice) and succeeds; B then serves the
/// adapter. Prints the failover time (kill -> the first step on B) for BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_job_is_taken_over_and_resumed_from_its_stored_checkpoint() {
    // The stores live in `world` to the test's end (a temporary would drop them at once).
    let world = pair("failover", 2, "moved", 10, 20, true).await;
    let Pair {
        a,
        b,
        job,
        reached: checkpointed,
        ..
    } = world;
    // B started after A claimed the job; now A dies without a word.
    let killed = Instant::now();
    a.kill().await;
    let cb = b.client(TENANT).await;
    let mut w = cb.watch_job("", &job.id, 0).await.expect("watch on b");
    let mut events = Vec::new();
    let mut runs = 0;
    let mut failover = None;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(120), w.message())
        .await
        .expect("events keep coming")
        .expect("event")
    {
        if let Some(pb::job_event::Event::Status(s)) = &e.event {
            runs += usize::from(s.status == "running");
        }
        if runs == 2 && failover.is_none() && step_of(&e).is_some() {
            failover = Some(killed.elapsed());
        }
        events.push(e);
    }
    let done = cb.get_job("", &job.id).await.expect("get");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    assert_eq!(done.step, done.total_steps);
    assert_eq!(runs, 2, "one run on A, one on B");
    let steps: Vec<u64> = events.iter().filter_map(step_of).collect();
    for s in 1..=checkpointed {
        assert_eq!(
            steps.iter().filter(|x| **x == s).count(),
            1,
            "step {s} ran twice: B did not resume from A's checkpoint"
        );
    }
    let failover = failover.expect("B ran steps");
    eprintln!("failover: {failover:?} from SIGKILL to B's first step (lease 2 s)");
    // B waited for A's lease (renewed every 0.67 s, so at least 1.3 s of it was left), and
    // took the job at most a claim poll (1 s) after it expired.
    assert!(
        failover > Duration::from_secs(1) && failover < Duration::from_secs(10),
        "{failover:?}"
    );
    cb.generate(
        GenerateOptions {
            adapter: Some("moved".into()),
            ..GenerateOptions::greedy(4)
        }
        .prompt("a b"),
    )
    .await
    .expect("B serves the adapter it trained");
    b.kill().await;
}

/// SIGTERM on the replica running a job: it stops the job at its next micro-batch,
/// checkpoints the steps it completed (the job has no periodic checkpoint before its end),
/// gives the job back to the queue
/// and exits 0; the other replica resumes it at once (long before the 60 s lease could
/// expire) from that checkpoint, so no step runs twice, and it succeeds there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_hands_its_job_to_another_at_once() {
    // No periodic checkpoint before the job's end: one before the hand-over can only be
    // the drain's, and B could only skip A's steps by resuming from it.
    let world = pair("drain", 60, "handed", 1000, 10, false).await;
    let Pair { a, b, job, .. } = world;
    let started = Instant::now();
    let status = a.terminate().await;
    assert!(status.success(), "{status}");
    let cb = b.client(TENANT).await;
    let (events, done) = tokio::time::timeout(Duration::from_secs(120), cb.follow_job("", &job.id))
        .await
        .expect("ends")
        .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "waited for the lease: {:?}",
        started.elapsed()
    );
    let statuses: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Status(s)) => Some((s.status.clone(), s.message.clone())),
            _ => None,
        })
        .collect();
    assert!(
        statuses
            .iter()
            .any(|(s, m)| s == "queued" && m.contains("released by a stopping replica")),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|(s, _)| s == "running").count(),
        2,
        "{statuses:?}"
    );
    // The drain's checkpoint has A's last step: B starts right after it.
    let released = events
        .iter()
        .position(|e| {
            matches!(&e.event, Some(pb::job_event::Event::Status(s))
                if s.message.contains("released by a stopping replica"))
        })
        .expect("released");
    let last_on_a = events[..released]
        .iter()
        .filter_map(step_of)
        .max()
        .expect("A ran steps");
    let drained = events[..released]
        .iter()
        .rev()
        .find_map(|e| match &e.event {
            Some(pb::job_event::Event::Checkpoint(c)) => Some(c.step),
            _ => None,
        });
    assert_eq!(
        drained,
        Some(last_on_a),
        "the drain checkpointed A's last step"
    );
    let steps: Vec<u64> = events.iter().filter_map(step_of).collect();
    let expected: Vec<u64> = (1..=done.total_steps).collect();
    assert_eq!(steps, expected, "every step once, in order");
    b.kill().await;
}

/// Deletion of an adapter on replica A reaches replica B, which had the adapter's versions
/// cached, through PostgreSQL's NOTIFY: B answers NOT_FOUND for it soon after A's delete is
/// acknowledged, long before the 10 s poll. 40 rounds; prints p50 and the maximum for
/// BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_on_one_replica_is_seen_by_another_within_milliseconds() {
    let pg = TestPostgres::start();
    let url = pg.database("visibility").await;
    let blobs = tempfile::tempdir().expect("blobs");
    let dirs = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let model = tiny_model_path();
    let opts = |data| GraftdOptions {
        model: &model,
        data,
        database_url: Some(url.clone()),
        blob_store: Some(format!("file://{}", blobs.path().display())),
        env: vec![],
    };
    let a = Graftd::spawn(opts(dirs.0.path())).await;
    let b = Graftd::spawn(opts(dirs.1.path())).await;
    let (ca, cb) = (a.client(TENANT).await, b.client(TENANT).await);
    let m = graft_server::model::BaseModel::load(&model, &candle_core::Device::Cpu).expect("tiny");
    let (config, weights) = graft_tests::random_peft(&m, 9, 4);
    let req = |name: &str| {
        GenerateOptions {
            adapter: Some(name.into()),
            ..GenerateOptions::greedy(1)
        }
        .prompt("a")
    };
    let mut delays = Vec::new();
    for i in 0..40 {
        let name = format!("v{i}");
        ca.import_adapter("", &name, config.clone(), weights.clone(), false)
            .await
            .expect("import on A");
        // B resolves it (and caches its versions).
        cb.generate(req(&name)).await.expect("B serves A's import");
        ca.delete_adapter("", &name).await.expect("delete on A");
        let deleted = Instant::now();
        loop {
            match cb.generate(req(&name)).await {
                Ok(_) => assert!(deleted.elapsed() < Duration::from_secs(15), "never seen"),
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
                    break;
                }
            }
        }
        delays.push(deleted.elapsed());
    }
    delays.sort();
    let (p50, max) = (delays[delays.len() / 2], delays[delays.len() - 1]);
    eprintln!("delete visibility across replicas: p50 {p50:?}, max {max:?} of 40");
    // NOTIFY, not the 10 s poll.
    assert!(max < Duration::from_secs(2), "{delays:?}");
    a.kill().await;
    b.kill().await;
}
