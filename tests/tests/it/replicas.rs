//! Replicas: graftd processes of their own on one PostgreSQL (a throw-away cluster) and one
//! S3 bucket (a throw-away moto server), as a Kubernetes Deployment would run them.

use std::time::{Duration, Instant};

use graft_client::{proto as pb, GenerateOptions};
use graft_server::store::testing::TestPostgres;
use graft_tests::{
    process::{Graftd, GraftdOptions, S3Server},
    tiny_model_path, TENANT,
};

fn step_of(e: &pb::JobEvent) -> Option<u64> {
    match &e.event {
        Some(pb::job_event::Event::Step(s)) => Some(s.step),
        _ => None,
    }
}

/// A job running on replica A, whose process is SIGKILLed after a checkpoint: replica B
/// takes the job over once A's lease expires, downloads the checkpoint A stored in the
/// bucket, resumes from it (no step up to it runs twice) and succeeds; B then serves the
/// adapter. Prints the failover time (kill -> the first step on B) for BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_job_is_taken_over_and_resumed_from_its_stored_checkpoint() {
    let pg = TestPostgres::start();
    let url = pg.database("failover").await;
    let s3 = S3Server::start();
    let mut env = s3.env();
    env.push(("GRAFT_JOB_LEASE_SECS".into(), "2".into()));
    let model = tiny_model_path();
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let opts = |data| GraftdOptions {
        model: &model,
        data,
        database_url: Some(url.clone()),
        blob_store: Some("s3://graft-test/failover".into()),
        env: env.clone(),
    };
    let a = Graftd::spawn(opts(da.path())).await;
    let ca = a.client(TENANT).await;
    ca.upload_dataset(
        "",
        "d",
        "",
        b"{\"prompt\":\"a b\",\"completion\":\"c d e\"}\n".repeat(8),
    )
    .await
    .expect("upload");
    let job = ca
        .create_job(pb::CreateJobRequest {
            dataset: "d".into(),
            adapter_name: "moved".into(),
            hyperparameters: Some(pb::Hyperparameters {
                epochs: Some(300),
                checkpoint_every: Some(10),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create");
    let mut w = ca.watch_job("", &job.id, 0).await.expect("watch");
    let mut checkpointed = 0;
    while let Some(e) = w.message().await.expect("event") {
        if let Some(pb::job_event::Event::Checkpoint(cp)) = &e.event {
            if cp.step >= 20 {
                checkpointed = cp.step;
                break;
            }
        }
    }
    assert!(checkpointed >= 20, "no checkpoint seen");
    drop(w);
    // B starts after A claimed the job; then A dies without a word.
    let b = Graftd::spawn(opts(db.path())).await;
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

/// SIGTERM on the replica running a job: it stops the job at its next step, gives it back
/// to the queue and exits 0; the other replica resumes it at once (long before the 60 s
/// lease could expire) from the stored checkpoint, and it succeeds there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_hands_its_job_to_another_at_once() {
    let pg = TestPostgres::start();
    let url = pg.database("drain").await;
    let s3 = S3Server::start();
    let mut env = s3.env();
    env.push(("GRAFT_JOB_LEASE_SECS".into(), "60".into()));
    let model = tiny_model_path();
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let opts = |data| GraftdOptions {
        model: &model,
        data,
        database_url: Some(url.clone()),
        blob_store: Some("s3://graft-test/drain".into()),
        env: env.clone(),
    };
    let a = Graftd::spawn(opts(da.path())).await;
    let ca = a.client(TENANT).await;
    ca.upload_dataset(
        "",
        "d",
        "",
        b"{\"prompt\":\"a b\",\"completion\":\"c d e\"}\n".repeat(8),
    )
    .await
    .expect("upload");
    let job = ca
        .create_job(pb::CreateJobRequest {
            dataset: "d".into(),
            adapter_name: "handed".into(),
            hyperparameters: Some(pb::Hyperparameters {
                epochs: Some(300),
                checkpoint_every: Some(10),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create");
    let mut w = ca.watch_job("", &job.id, 0).await.expect("watch");
    while let Some(e) = w.message().await.expect("event") {
        if matches!(&e.event, Some(pb::job_event::Event::Checkpoint(cp)) if cp.step >= 10) {
            break;
        }
    }
    drop(w);
    let b = Graftd::spawn(opts(db.path())).await;
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
    b.kill().await;
}
