//! The preference objectives over gRPC, on the tiny model: a reward_model job on the public
//! pairs whose held-out accuracy (its eval event) is the ranking the Score RPC gives the
//! same pairs; the reward model exported as PEFT SEQ_CLS and imported back as a reward
//! model; a DPO job with TRL's metrics whose adapter generates at once; the wrong task for
//! an adapter, bad settings and the wrong data refused naming the field, no job created.

use graft_client::{
    proto::{self as pb, create_job_request::MethodConfig},
    GenerateOptions,
};
use graft_tests::{fixtures, start_tiny};
use tonic::Code;

/// The fixture's pairs: (prompt, chosen, rejected) of every line.
fn pairs() -> (Vec<u8>, Vec<(String, String, String)>) {
    let bytes = std::fs::read(fixtures().join("preference-pairs-brief.jsonl")).expect("fixture");
    let rows = String::from_utf8(bytes.clone())
        .expect("utf-8")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            let s = |k: &str| v[k].as_str().expect("string").to_string();
            (s("prompt"), s("chosen"), s("rejected"))
        })
        .collect();
    (bytes, rows)
}

fn lines(all: &[u8], range: std::ops::Range<usize>) -> Vec<u8> {
    let text = std::str::from_utf8(all).expect("utf-8");
    text.lines()
        .skip(range.start)
        .take(range.len())
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .into_bytes()
}

fn job(objective: &str, adapter: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        dataset: "pairs".into(),
        validation_dataset: "held".into(),
        adapter_name: adapter.into(),
        method: "lora".into(),
        method_config: Some(MethodConfig::Lora(pb::LoraMethod {
            r: Some(4),
            alpha: Some(8.0),
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..Default::default()
        })),
        objective: objective.into(),
        hyperparameters: Some(pb::Hyperparameters {
            epochs: Some(1),
            batch_size: Some(4),
            learning_rate: Some(5e-3),
            seed: Some(3),
            max_seq_len: Some(512),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn score_input(prompt: &str, completion: &str) -> pb::ScoreInput {
    pb::ScoreInput {
        prompt: prompt.into(),
        messages: Vec::new(),
        completion: completion.into(),
    }
}

/// The last eval event of a finished job.
async fn last_eval(t: &graft_tests::TestServer, id: &str) -> (Vec<pb::StepEvent>, pb::EvalEvent) {
    let (events, done) = tokio::time::timeout(
        std::time::Duration::from_secs(600),
        t.client.follow_job("", id),
    )
    .await
    .expect("in time")
    .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let mut steps = Vec::new();
    let mut eval = None;
    for e in events {
        match e.event {
            Some(pb::job_event::Event::Step(s)) => steps.push(s),
            Some(pb::job_event::Event::Eval(e)) => eval = Some(e),
            _ => {}
        }
    }
    (steps, eval.expect("evaluated"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reward_model_job_scores_what_it_evaluated_and_round_trips_as_peft() {
    let t = start_tiny().await;
    let (bytes, rows) = pairs();
    let d = t
        .client
        .upload_dataset("", "pairs", "", lines(&bytes, 0..30))
        .await
        .expect("upload");
    assert_eq!(d.format, "preference");
    t.client
        .upload_dataset("", "held", "", lines(&bytes, 30..40))
        .await
        .expect("upload held");
    let created = t
        .client
        .create_job(pb::CreateJobRequest {
            reward_model: Some(pb::RewardModelObjective {
                center_rewards_coefficient: Some(0.01),
            }),
            ..job("reward_model", "rm")
        })
        .await
        .expect("create");
    assert_eq!(created.objective, "reward_model");
    let (steps, eval) = last_eval(&t, &created.id).await;
    assert_eq!(steps.len(), 8);
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    ] {
        assert!(
            steps[0].metrics.contains_key(k),
            "{k}: {:?}",
            steps[0].metrics
        );
        assert!(eval.metrics.contains_key(k), "{k}: {:?}", eval.metrics);
    }
    assert_eq!(eval.token_accuracy, eval.metrics["rewards/accuracies"]);

    let v = t.client.get_adapter("", "rm").await.expect("registered");
    let head = v.head.expect("head");
    assert!(head.reward_model, "{head:?}");
    // Score ranks the held-out pairs as the job's evaluation did, with its mean margin.
    let held = &rows[30..];
    let mut inputs = Vec::new();
    for (p, c, r) in held {
        inputs.push(score_input(p, c));
        inputs.push(score_input(p, r));
    }
    let out = t
        .client
        .score(pb::ScoreRequest {
            adapter: "rm".into(),
            inputs: inputs.clone(),
            tenant: String::new(),
        })
        .await
        .expect("score");
    assert_eq!(out.results.len(), 20);
    let r: Vec<f32> = out.results.iter().map(|s| s.reward).collect();
    let right = r.chunks(2).filter(|p| p[0] > p[1]).count() as f64 / 10.0;
    let margin = r.chunks(2).map(|p| (p[0] - p[1]) as f64).sum::<f64>() / 10.0;
    assert!(
        (right - eval.token_accuracy).abs() < 1e-9,
        "{right} vs {eval:?}"
    );
    assert!(
        (margin - eval.metrics["rewards/margins"]).abs() < 1e-3 * (1.0 + margin.abs()),
        "{margin} vs {eval:?}"
    );
    assert!(out.results[0].usage.as_ref().expect("usage").prompt_tokens > 0);

    // Exported as PEFT SEQ_CLS with one output, imported back: the same rewards.
    let (config, weights) = t.client.export_adapter("", "rm").await.expect("export");
    let cfg: serde_json::Value = serde_json::from_slice(&config).expect("json");
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let back = t
        .client
        .import_adapter("", "rm-back", config, weights, false)
        .await
        .expect("import");
    assert!(back.head.expect("head").reward_model);
    let again = t
        .client
        .score(pb::ScoreRequest {
            adapter: "rm-back".into(),
            inputs: inputs[..2].to_vec(),
            tenant: String::new(),
        })
        .await
        .expect("score imported");
    assert_eq!(again.results[0].reward, out.results[0].reward);
    assert_eq!(again.results[1].reward, out.results[1].reward);

    // A reward model does not classify; Score needs a reward model and a completion.
    let e = t
        .client
        .classify(pb::ClassifyRequest {
            adapter: "rm".into(),
            inputs: vec![pb::ClassifyInput {
                text: "x".into(),
                messages: vec![],
            }],
            tenant: String::new(),
        })
        .await
        .expect_err("classify a reward model");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("reward model"), "{}", e.message());
    for (req, field) in [
        (
            pb::ScoreRequest {
                adapter: "rm".into(),
                inputs: vec![score_input("q", " ")],
                tenant: String::new(),
            },
            "inputs[0].completion",
        ),
        (
            pb::ScoreRequest {
                adapter: "rm".into(),
                inputs: vec![score_input("", "a")],
                tenant: String::new(),
            },
            "inputs[0].prompt",
        ),
        (
            pb::ScoreRequest {
                adapter: "rm".into(),
                inputs: vec![],
                tenant: String::new(),
            },
            "inputs",
        ),
    ] {
        let e = t.client.score(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let e = t
        .client
        .score(pb::ScoreRequest {
            adapter: "nobody".into(),
            inputs: vec![score_input("q", "a")],
            tenant: String::new(),
        })
        .await
        .expect_err("missing adapter");
    assert_eq!(e.code(), Code::NotFound);

    // The reward model as a GRPO grader: σ(reward) through the engine. A missing or
    // another tenant's adapter is NOT_FOUND, one that is not a reward model is refused.
    let rows: String = (0..4)
        .map(|i| format!("{{\"prompt\": \"{}\"}}\n", rows[i].0))
        .collect();
    let model = t.server.engine().expect("ready").model().clone();
    let (cfg, w) = graft_tests::random_peft(&model, 1, 2);
    t.client
        .import_adapter("", "plain", cfg, w, false)
        .await
        .expect("a plain adapter");
    let other = t.tenant("other").await;
    for c in [&t.client, &other] {
        c.upload_dataset("", "questions", "", rows.clone().into_bytes())
            .await
            .expect("prompts");
    }
    let by_rm = |name: &str| {
        let mut j = grpo_job(
            pb::Grader {
                kind: Some(pb::grader::Kind::RewardModel(pb::RewardModelGrader {
                    adapter: name.into(),
                })),
            },
            2,
        );
        j.validation_dataset = String::new();
        j.adapter_name = "rl-rm".into();
        j
    };
    let e = other
        .create_job(by_rm("rm"))
        .await
        .expect_err("another tenant's");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let e = t
        .client
        .create_job(by_rm("nobody"))
        .await
        .expect_err("missing");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let e = t
        .client
        .create_job(by_rm("plain"))
        .await
        .expect_err("not a reward model");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("grpo.grader:") && e.message().contains("not a reward model"),
        "{}",
        e.message()
    );
    let created = t.client.create_job(by_rm("rm")).await.expect("create");
    let (events, done) = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        t.client.follow_job("", &created.id),
    )
    .await
    .expect("in time")
    .expect("watch");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let rewards: Vec<f64> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::job_event::Event::Step(s)) => s.metrics.get("reward").copied(),
            _ => None,
        })
        .collect();
    assert!(!rewards.is_empty());
    // σ of real-valued rewards: strictly between 0 and 1, and not a rule's 0, 0.5 or 1.
    assert!(
        rewards.iter().all(|&r| r > 0.0 && r < 1.0 && r != 0.5),
        "{rewards:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpo_job_reports_trls_metrics_and_its_adapter_generates() {
    let t = start_tiny().await;
    let (bytes, _) = pairs();
    t.client
        .upload_dataset("", "pairs", "", lines(&bytes, 0..12))
        .await
        .expect("upload");
    t.client
        .upload_dataset("", "held", "", lines(&bytes, 30..34))
        .await
        .expect("upload held");
    t.client
        .upload_dataset(
            "",
            "sft",
            "",
            b"{\"prompt\":\"a\",\"completion\":\"b\"}\n".to_vec(),
        )
        .await
        .expect("sft data");

    // Wrong settings and data, each naming its field; no job is created.
    let with = |dpo: pb::DpoObjective| pb::CreateJobRequest {
        dpo: Some(dpo),
        ..job("dpo", "policy")
    };
    for (req, field, want) in [
        (
            with(pb::DpoObjective {
                beta: Some(0.0),
                ..Default::default()
            }),
            "dpo.beta",
            "outside",
        ),
        (
            with(pb::DpoObjective {
                loss_type: "kto".into(),
                ..Default::default()
            }),
            "dpo.loss_type",
            "expected sigmoid",
        ),
        (
            with(pb::DpoObjective {
                loss_type: "ipo".into(),
                label_smoothing: Some(0.1),
                ..Default::default()
            }),
            "dpo.label_smoothing",
            "sigmoid loss only",
        ),
        (
            pb::CreateJobRequest {
                dpo: Some(pb::DpoObjective::default()),
                ..job("sft", "policy")
            },
            "dpo",
            "objective is sft",
        ),
        (
            pb::CreateJobRequest {
                dataset: "sft".into(),
                ..job("dpo", "policy")
            },
            "dataset",
            "trains on a preference dataset",
        ),
        (
            job("sft", "policy"),
            "dataset",
            "the sft objective trains on completions",
        ),
        (
            pb::CreateJobRequest {
                method: "head".into(),
                method_config: None,
                ..job("dpo", "policy")
            },
            "method",
            "head trains only a head",
        ),
    ] {
        let e = t.client.create_job(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
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
        .create_job(with(pb::DpoObjective {
            beta: Some(0.2),
            ..Default::default()
        }))
        .await
        .expect("create");
    assert_eq!(created.objective, "dpo");
    let (steps, eval) = last_eval(&t, &created.id).await;
    assert_eq!(steps.len(), 3);
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(
            steps[0].metrics.contains_key(k),
            "{k}: {:?}",
            steps[0].metrics
        );
        assert!(eval.metrics.contains_key(k), "{k}: {:?}", eval.metrics);
    }
    // The policy starts as the reference: the first step's loss is ln 2, its margin 0.
    assert!(
        (steps[0].train_loss - std::f64::consts::LN_2).abs() < 1e-4,
        "{:?}",
        steps[0]
    );
    assert!(steps[0].metrics["rewards/margins"].abs() < 1e-4);
    let base_first_logps = steps[0].metrics["logps/chosen"];
    // The result is an ordinary adapter: it generates at once, with no head.
    let v = t
        .client
        .get_adapter("", "policy")
        .await
        .expect("registered");
    assert!(v.head.is_none());
    let out = t
        .client
        .generate(
            GenerateOptions {
                adapter: Some("policy".into()),
                ..GenerateOptions::greedy(4)
            }
            .prompt("hello"),
        )
        .await
        .expect("generate");
    assert!(!out.token_ids.is_empty());
    // DPO continuing an SFT adapter: its reference is that adapter, frozen, so the first
    // step is at ln 2 again although the policy is not the base.
    let sft = t
        .client
        .create_job(pb::CreateJobRequest {
            dataset: "sft".into(),
            validation_dataset: String::new(),
            hyperparameters: Some(pb::Hyperparameters {
                epochs: Some(4),
                learning_rate: Some(5e-2),
                ..job("sft", "sft-base").hyperparameters.expect("h")
            }),
            ..job("sft", "sft-base")
        })
        .await
        .expect("sft job");
    let (_, done) = t.client.follow_job("", &sft.id).await.expect("sft");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    // A PEFT LoRA with another alpha on q_proj: one rank and alpha cannot continue it.
    let tiny = graft_server::model::BaseModel::load(
        &graft_tests::tiny_model_path(),
        &candle_core::Device::Cpu,
    )
    .expect("tiny");
    let (c, w) = graft_server::adapters::testing::random_peft(&tiny, 7, 4);
    let mut cfg: serde_json::Value = serde_json::from_slice(&c).expect("config");
    cfg["alpha_pattern"] = serde_json::json!({"q_proj": 3.0});
    t.client
        .import_adapter(
            "",
            "patterned",
            serde_json::to_vec(&cfg).expect("json"),
            w,
            false,
        )
        .await
        .expect("import");
    for (req, code, want) in [
        (
            pb::CreateJobRequest {
                init_adapter: "patterned".into(),
                ..job("dpo", "cont")
            },
            Code::InvalidArgument,
            "rank_pattern or alpha_pattern",
        ),
        (
            pb::CreateJobRequest {
                init_adapter: "nobody".into(),
                ..job("dpo", "cont")
            },
            Code::NotFound,
            "init_adapter nobody",
        ),
        (
            pb::CreateJobRequest {
                init_adapter: "sft-base".into(),
                method: "ia3".into(),
                method_config: None,
                ..job("dpo", "cont")
            },
            Code::InvalidArgument,
            "init_adapter:",
        ),
    ] {
        let e = t.client.create_job(req).await.expect_err(want);
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(want), "{}", e.message());
    }
    let created = t
        .client
        .create_job(pb::CreateJobRequest {
            init_adapter: "sft-base".into(),
            ..job("dpo", "cont")
        })
        .await
        .expect("dpo from sft");
    let (steps, _) = last_eval(&t, &created.id).await;
    assert!(
        (steps[0].train_loss - std::f64::consts::LN_2).abs() < 1e-4,
        "{:?}",
        steps[0]
    );
    // The policy is the SFT adapter, not the base: its log-probabilities differ from those
    // of the job that started from the base.
    assert!(
        (steps[0].metrics["logps/chosen"] - base_first_logps).abs() > 1e-3,
        "{} vs {base_first_logps}",
        steps[0].metrics["logps/chosen"]
    );

    // It has no head to score with.
    let e = t
        .client
        .score(pb::ScoreRequest {
            adapter: "policy".into(),
            inputs: vec![score_input("q", "a")],
            tenant: String::new(),
        })
        .await
        .expect_err("score without a head");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("not a reward model"),
        "{}",
        e.message()
    );
}

fn grpo_job(grader: pb::Grader, num_generations: u32) -> pb::CreateJobRequest {
    let base = job("grpo", "rl");
    pb::CreateJobRequest {
        hyperparameters: Some(pb::Hyperparameters {
            max_seq_len: Some(128),
            ..base.hyperparameters.clone().expect("hyperparameters")
        }),
        dataset: "questions".into(),
        validation_dataset: "held-questions".into(),
        objective: "grpo".into(),
        grpo: Some(pb::GrpoObjective {
            num_generations: Some(num_generations),
            beta: Some(0.04),
            max_new_tokens: Some(8),
            grader: Some(grader),
            ..Default::default()
        }),
        ..base
    }
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

/// GRPO over gRPC on the tiny model: prompt rows with an extra field for the grader, the
/// rollouts sampled by the engine, TRL's GRPO metrics in the events, the policy served at
/// once; bad settings, graders and data refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpo_job_samples_with_the_engine_grades_and_serves_its_policy() {
    let t = start_tiny().await;
    let rows: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"Say {i}.\", \"answer\": \"{i}\"}}\n"))
        .collect();
    let d = t
        .client
        .upload_dataset("", "questions", "", rows.into_bytes())
        .await
        .expect("upload prompts");
    assert_eq!((d.format.as_str(), d.examples), ("prompts", 8));
    t.client
        .upload_dataset(
            "",
            "held-questions",
            "",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"Say 9.\"}], \"answer\": \"9\"}\n"
                .to_vec(),
        )
        .await
        .expect_err("messages-only rows need the prompts format named");
    let held = t
        .client
        .upload_dataset(
            "",
            "held-questions",
            "prompts",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"Say 9.\"}], \"answer\": \"9\"}\n"
                .to_vec(),
        )
        .await
        .expect("upload held prompts");
    assert_eq!(held.format, "prompts");
    let (bytes, _) = pairs();
    t.client
        .upload_dataset("", "pairs", "", lines(&bytes, 0..4))
        .await
        .expect("pairs");

    let missing = pb::Grader {
        kind: Some(pb::grader::Kind::StringMatch(pb::StringMatchGrader {
            reference: "{{row.solution}}".into(),
            ..Default::default()
        })),
    };
    for (req, field, want) in [
        (
            grpo_job(contains_answer(), 1),
            "grpo.num_generations",
            "give 2 to 64",
        ),
        (
            grpo_job(missing, 4),
            "grpo.grader.reference",
            "no field \"solution\"",
        ),
        (
            grpo_job(pb::Grader { kind: None }, 4),
            "grpo.grader",
            "give one of",
        ),
        (
            pb::CreateJobRequest {
                grpo: Some(pb::GrpoObjective {
                    advantage: "ppo".into(),
                    ..grpo_job(contains_answer(), 4).grpo.expect("grpo")
                }),
                ..grpo_job(contains_answer(), 4)
            },
            "grpo.advantage",
            "expected group or rloo",
        ),
        (
            pb::CreateJobRequest {
                dataset: "pairs".into(),
                validation_dataset: String::new(),
                ..grpo_job(contains_answer(), 4)
            },
            "dataset",
            "trains on a prompts dataset",
        ),
        (
            pb::CreateJobRequest {
                dataset: "questions".into(),
                validation_dataset: String::new(),
                ..job("sft", "x")
            },
            "dataset",
            "is a prompts dataset",
        ),
    ] {
        let e = t.client.create_job(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(
            e.message().starts_with(&format!("{field}:")) && e.message().contains(want),
            "{field}: {}",
            e.message()
        );
    }

    let created = t
        .client
        .create_job(grpo_job(contains_answer(), 4))
        .await
        .expect("create");
    assert_eq!(created.objective, "grpo");
    let (steps, eval) = last_eval(&t, &created.id).await;
    // 8 prompts, 4 a step.
    assert_eq!(steps.len(), 2);
    for k in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "completion_length",
        "entropy",
        "clip_ratio",
        "kl",
    ] {
        assert!(
            steps[0].metrics.contains_key(k),
            "{k}: {:?}",
            steps[0].metrics
        );
    }
    let len = steps[0].metrics["completion_length"];
    assert!(len > 0.0 && len <= 8.0, "{len}");
    assert!(eval.metrics.contains_key("reward"), "{eval:?}");
    assert_eq!(eval.eval_loss, 1.0 - eval.metrics["reward"]);
    let out = t
        .client
        .generate(
            GenerateOptions {
                adapter: Some("rl".into()),
                ..GenerateOptions::greedy(4)
            }
            .prompt("Say 3."),
        )
        .await
        .expect("the policy serves");
    assert!(!out.token_ids.is_empty());

    // PPO on the same rows: its metrics, a value head that is not part of the result.
    let ppo = |ppo: pb::PpoObjective| pb::CreateJobRequest {
        objective: "ppo".into(),
        grpo: None,
        adapter_name: "ppo".into(),
        ppo: Some(ppo),
        ..grpo_job(contains_answer(), 4)
    };
    for (req, field) in [
        (
            ppo(pb::PpoObjective {
                grader: Some(contains_answer()),
                gamma: Some(1.5),
                ..Default::default()
            }),
            "ppo.gamma",
        ),
        (
            ppo(pb::PpoObjective {
                grader: Some(contains_answer()),
                cliprange: Some(0.0),
                ..Default::default()
            }),
            "ppo.cliprange",
        ),
        (ppo(pb::PpoObjective::default()), "ppo.grader"),
    ] {
        let e = t.client.create_job(req).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(
            e.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            e.message()
        );
    }
    let created = t
        .client
        .create_job(ppo(pb::PpoObjective {
            grader: Some(contains_answer()),
            target_kl: Some(0.1),
            max_new_tokens: Some(8),
            ..Default::default()
        }))
        .await
        .expect("create ppo");
    assert_eq!(created.objective, "ppo");
    let (steps, _) = last_eval(&t, &created.id).await;
    assert_eq!(steps.len(), 2);
    for k in [
        "reward",
        "kl",
        "kl_coef",
        "policy_loss",
        "value_loss",
        "clip_ratio",
        "entropy",
        "completion_length",
    ] {
        assert!(
            steps[0].metrics.contains_key(k),
            "{k}: {:?}",
            steps[0].metrics
        );
    }
    let v = t.client.get_adapter("", "ppo").await.expect("registered");
    assert!(v.head.is_none(), "the value head is not exported: {v:?}");
    let (_, weights) = t.client.export_adapter("", "ppo").await.expect("export");
    let names = safetensors::SafeTensors::deserialize(&weights)
        .expect("safetensors")
        .names()
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    assert!(names.iter().all(|n| n.contains("lora_")), "{names:?}");
}
