//! A grader as the evaluation of an offline job (`eval_grader`), over gRPC on the tiny
//! model: an SFT job whose eval events grade the adapter's greedy answers to a prompts
//! dataset (the same answers `Generate` gives the finished adapter), and the requests that
//! cannot be graded refused naming the field, no job created.

use graft_client::{
    proto::{self as pb, create_job_request::MethodConfig},
    GenerateOptions,
};
use graft_tests::start_tiny;
use tonic::Code;

const MAX_NEW: u32 = 6;

/// Reward 1 for an answer with a lowercase ASCII letter: a figure the test recomputes
/// from the texts `Generate` gives.
const LOWERCASE: &str = "[a-z]";

fn has_lowercase() -> pb::Grader {
    pb::Grader {
        kind: Some(pb::grader::Kind::Regex(pb::RegexGrader {
            pattern: LOWERCASE.into(),
        })),
    }
}

fn sft(grader: Option<pb::EvalGrader>) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        dataset: "answers".into(),
        validation_dataset: "held-prompts".into(),
        adapter_name: "graded".into(),
        method: "lora".into(),
        method_config: Some(MethodConfig::Lora(pb::LoraMethod {
            r: Some(4),
            alpha: Some(8.0),
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..Default::default()
        })),
        hyperparameters: Some(pb::Hyperparameters {
            epochs: Some(1),
            batch_size: Some(4),
            learning_rate: Some(5e-3),
            seed: Some(5),
            eval_every: Some(1),
            max_seq_len: Some(128),
            ..Default::default()
        }),
        eval_grader: grader,
        ..Default::default()
    }
}

fn graded(grader: pb::Grader) -> Option<pb::EvalGrader> {
    Some(pb::EvalGrader {
        grader: Some(grader),
        temperature: None,
        max_new_tokens: Some(MAX_NEW),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sft_job_is_evaluated_by_grading_its_answers_to_held_prompts() {
    let t = start_tiny().await;
    let answers: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"Say {i}.\", \"completion\": \" {i}\"}}\n"))
        .collect();
    t.client
        .upload_dataset("", "answers", "", answers.into_bytes())
        .await
        .expect("upload answers");
    let held = ["Say 10.", "Say 11.", "Name a colour.", "Count to 3."];
    let prompts: String = held
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{{\"prompt\": \"{p}\", \"answer\": \"{i}\"}}\n"))
        .collect();
    let d = t
        .client
        .upload_dataset("", "held-prompts", "", prompts.into_bytes())
        .await
        .expect("upload prompts");
    assert_eq!(d.format, "prompts");

    let missing = pb::Grader {
        kind: Some(pb::grader::Kind::StringMatch(pb::StringMatchGrader {
            reference: "{{row.solution}}".into(),
            ..Default::default()
        })),
    };
    let bad = [
        (
            sft(graded(missing)),
            "eval_grader.grader.reference",
            "no field \"solution\"",
        ),
        (
            sft(Some(pb::EvalGrader {
                grader: Some(has_lowercase()),
                temperature: Some(3.0),
                max_new_tokens: None,
            })),
            "eval_grader.temperature",
            "outside [0, 2]",
        ),
        (
            sft(Some(pb::EvalGrader {
                grader: Some(has_lowercase()),
                temperature: None,
                max_new_tokens: Some(0),
            })),
            "eval_grader.max_new_tokens",
            "give 1 to 1024",
        ),
        (
            sft(Some(pb::EvalGrader::default())),
            "eval_grader.grader",
            "",
        ),
        (
            pb::CreateJobRequest {
                validation_dataset: String::new(),
                ..sft(graded(has_lowercase()))
            },
            "validation_dataset",
            "name one",
        ),
        (
            pb::CreateJobRequest {
                validation_dataset: "answers".into(),
                ..sft(graded(has_lowercase()))
            },
            "validation_dataset",
            "eval_grader grades answers to a prompts dataset",
        ),
        (
            pb::CreateJobRequest {
                objective: "classification".into(),
                ..sft(graded(has_lowercase()))
            },
            "eval_grader",
            "does not generate",
        ),
        (
            pb::CreateJobRequest {
                objective: "grpo".into(),
                grpo: Some(pb::GrpoObjective {
                    grader: Some(has_lowercase()),
                    ..Default::default()
                }),
                ..sft(graded(has_lowercase()))
            },
            "eval_grader",
            "grpo.grader",
        ),
    ];
    for (req, field, want) in bad {
        let e = t.client.create_job(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {}", e.message());
        assert!(
            e.message().starts_with(&format!("{field}:")) && e.message().contains(want),
            "{field}: {}",
            e.message()
        );
    }
    let jobs = t
        .client
        .training()
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{:?}", jobs.jobs);

    let created = t
        .client
        .create_job(sft(graded(has_lowercase())))
        .await
        .expect("create");
    let (events, done) = tokio::time::timeout(
        std::time::Duration::from_secs(600),
        t.client.follow_job("", &created.id),
    )
    .await
    .expect("in time")
    .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let evals: Vec<pb::EvalEvent> = events
        .into_iter()
        .filter_map(|e| match e.event {
            Some(pb::job_event::Event::Eval(e)) => Some(e),
            _ => None,
        })
        .collect();
    // 8 rows, 4 a step, evaluated after each.
    assert_eq!(evals.len(), 2, "{evals:?}");
    for e in &evals {
        let reward = e.metrics["reward"];
        assert!((0.0..=1.0).contains(&reward), "{e:?}");
        assert_eq!(e.eval_loss, 1.0 - reward);
        assert_eq!(e.token_accuracy, reward);
    }

    // The last evaluation graded the finished adapter's greedy answers: the same answers
    // Generate gives now (a string prompt is a user message, as in the dataset).
    let mut answers = Vec::new();
    for p in held {
        let out = t
            .client
            .generate(
                GenerateOptions {
                    adapter: Some("graded".into()),
                    ..GenerateOptions::greedy(MAX_NEW)
                }
                .chat([("user", p)]),
            )
            .await
            .expect("the adapter serves");
        answers.push((out.text, out.token_ids.len()));
    }
    let last = evals.last().expect("evaluated");
    eprintln!("evals {evals:?}; Generate's answers {answers:?}");
    let n = answers.len() as f64;
    let mean_len = answers.iter().map(|a| a.1).sum::<usize>() as f64 / n;
    let lower = regex::Regex::new(LOWERCASE).expect("regex");
    let matching = answers.iter().filter(|a| lower.is_match(&a.0)).count() as f64 / n;
    assert!(
        (last.metrics["completion_length"] - mean_len).abs() < 1e-9,
        "eval {:?} vs Generate {answers:?}",
        last.metrics
    );
    assert!(
        (last.metrics["reward"] - matching).abs() < 1e-9,
        "eval {:?} vs Generate {answers:?}",
        last.metrics
    );
}
