//! A training job whose server is killed with SIGKILL resumes from its last checkpoint when
//! the server starts again: no step before the checkpoint runs twice, and the job finishes;
//! for SFT, GRPO and PPO.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod process;

use graft_client::Transport;
use graft_proto::v1::{self as pb, training_client::TrainingClient, upload_dataset_request::Part};
use graft_server::model::tiny::{write_tiny_gguf, TinySpec};
use process::{free_port, spawn, tenant_client};

async fn connect(port: u16) -> TrainingClient<Transport> {
    let c = tenant_client(port, "acme").await.training();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Ready once the service answers something other than UNAVAILABLE.
        match c.clone().list_jobs(pb::ListJobsRequest::default()).await {
            Ok(_) => return c,
            Err(e) if e.code() != tonic::Code::Unavailable => return c,
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "graftd did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn step_of(e: &pb::JobEvent) -> Option<u64> {
    match &e.event {
        Some(pb::job_event::Event::Step(s)) => Some(s.step),
        _ => None,
    }
}

/// Uploads `jsonl` as dataset "d", creates `job` on it, kills graftd with SIGKILL once a
/// checkpoint at step `kill_after` or later is written, starts it again and follows the job
/// to its end: no step up to that checkpoint runs twice, and the job succeeds.
async fn killed_job_resumes(
    jsonl: String,
    format: &str,
    job: pb::CreateJobRequest,
    kill_after: u64,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).expect("tiny");
    let data = dir.path().join("data");
    let port = free_port();
    let mut child = spawn(&model, &data, port, Stdio::null());
    let mut c = connect(port).await;
    let msgs = vec![
        pb::UploadDatasetRequest {
            part: Some(Part::Header(pb::DatasetHeader {
                name: "d".into(),
                format: format.into(),
                ..Default::default()
            })),
        },
        pb::UploadDatasetRequest {
            part: Some(Part::Chunk(jsonl.into_bytes())),
        },
    ];
    c.upload_dataset(futures::stream::iter(msgs))
        .await
        .expect("upload");
    let job = c
        .create_job(pb::CreateJobRequest {
            dataset: "d".into(),
            adapter_name: "resumed".into(),
            ..job
        })
        .await
        .expect("create")
        .into_inner();
    // Wait for a checkpoint at `kill_after` or later, then kill -9.
    let mut w = c
        .watch_job(pb::WatchJobRequest {
            id: job.id.clone(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut checkpointed = 0;
    while let Some(e) = w.message().await.expect("event") {
        if let Some(pb::job_event::Event::Checkpoint(cp)) = &e.event {
            if cp.step >= kill_after {
                checkpointed = cp.step;
                break;
            }
        }
    }
    assert!(checkpointed >= kill_after, "no checkpoint seen");
    drop(w);
    child.kill();
    let mut child = spawn(&model, &data, port, Stdio::null());
    let mut c = connect(port).await;
    let mut w = c
        .watch_job(pb::WatchJobRequest {
            id: job.id.clone(),
            ..Default::default()
        })
        .await
        .expect("watch after restart")
        .into_inner();
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(e) = tokio::time::timeout(Duration::from_secs(60), w.message())
        .await
        .expect("events keep coming")
        .expect("event")
    {
        events.push(e);
        assert!(Instant::now() < deadline);
    }
    let done = c
        .get_job(pb::GetJobRequest {
            id: job.id.clone(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(done.status, "succeeded", "{}", done.error);
    assert_eq!(done.step, done.total_steps);
    let steps: Vec<u64> = events.iter().filter_map(step_of).collect();
    // Step 1 ran once: the job continued rather than restarting...
    assert_eq!(steps.iter().filter(|s| **s == 1).count(), 1);
    // ...and steps up to the checkpoint never ran twice; only those after it may have.
    for s in 1..=checkpointed {
        assert_eq!(steps.iter().filter(|x| **x == s).count(), 1, "step {s}");
    }
    let statuses: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Status(s)) => Some(s.status.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| *s == "running").count(),
        2,
        "{statuses:?}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_job_resumes_from_its_checkpoint() {
    let job = pb::CreateJobRequest {
        hyperparameters: Some(pb::Hyperparameters {
            epochs: Some(300),
            checkpoint_every: Some(10),
            ..Default::default()
        }),
        ..Default::default()
    };
    let jsonl = "{\"prompt\":\"a b\",\"completion\":\"c d e\"}\n".repeat(8);
    killed_job_resumes(jsonl, "", job, 20).await;
}

fn contains_answer() -> pb::Grader {
    pb::Grader {
        kind: Some(pb::grader::Kind::StringMatch(pb::StringMatchGrader {
            reference: "{{row.answer}}".into(),
            case_insensitive: true,
            contains: true,
        })),
    }
}

fn prompts() -> String {
    (0..8)
        .map(|i| format!("{{\"prompt\": \"Say {i}.\", \"answer\": \"{i}\"}}\n"))
        .collect()
}

fn online(objective: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        objective: objective.into(),
        hyperparameters: Some(pb::Hyperparameters {
            epochs: Some(40),
            batch_size: Some(4),
            checkpoint_every: Some(5),
            max_seq_len: Some(64),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// GRPO and PPO (with its adaptive KL coefficient) after SIGKILL: the policy, value head,
/// optimizer and controller come back from the checkpoint and the rollouts go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_rl_jobs_resume_from_their_checkpoints() {
    let grpo = pb::CreateJobRequest {
        grpo: Some(pb::GrpoObjective {
            num_generations: Some(2),
            max_new_tokens: Some(4),
            grader: Some(contains_answer()),
            ..Default::default()
        }),
        ..online("grpo")
    };
    killed_job_resumes(prompts(), "prompts", grpo, 10).await;
    let ppo = pb::CreateJobRequest {
        ppo: Some(pb::PpoObjective {
            target_kl: Some(0.5),
            ppo_epochs: Some(2),
            max_new_tokens: Some(4),
            grader: Some(contains_answer()),
            ..Default::default()
        }),
        ..online("ppo")
    };
    killed_job_resumes(prompts(), "prompts", ppo, 10).await;
}
