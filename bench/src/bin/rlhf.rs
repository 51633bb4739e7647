//! RLHF benchmarks (BENCHMARKS.md, issue 12), on SmolLM2 with LoRA r=8 on q/v:
//! 1. tokens/s of reward-model, DPO, GRPO and PPO steps (the trainer's own figure: tokens
//!    through forward and backward, rollouts' wall time included for the online ones);
//! 2. the rollout share of a GRPO and of a PPO step (time in the engine's sampling over the
//!    step's wall time);
//! 3. serving beside an RL job: inter-token latency p50/p99 of 4 greedy streams alone and
//!    while a GRPO job samples and trains (on `--job-threads`, default 1 as graftd's).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use candle_core::Device;
use clap::Parser;
use graft_bench::pct;
use graft_server::{
    engine::{EngineConfig, EngineHandle, GenerationRequest, SamplingParams, StreamEvent, Task},
    model::{Adapter, BaseModel, ChatMessage},
    train::{
        dataset::{parse_jsonl, tokenize, Overflow, Tokenized},
        graders::{self, GraderSpec},
        ppo::train_ppo,
        rl::{train_grpo, RlContext, RolloutParams, Rollouts},
        rollouts::EngineRollouts,
        trainer::{
            self, Advantage, Control, DpoLoss, DpoSettings, GrpoSettings, Objective, PpoSettings,
            TrainEvent, TrainSpec,
        },
    },
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Only part 3 (serving beside a GRPO job).
    #[arg(long)]
    serving_only: bool,
    /// Training threads of the GRPO job in part 3 (graftd's default `training_threads`
    /// is 1).
    #[arg(long, default_value_t = 1)]
    job_threads: usize,
}

/// The engine's sampling, timed.
struct Timed {
    inner: EngineRollouts,
    seconds: Mutex<f64>,
}

impl Rollouts for Timed {
    fn sample(
        &self,
        policy: Adapter,
        tag: &str,
        prompts: &[(Vec<u32>, u64)],
        params: &RolloutParams,
    ) -> Result<Vec<Vec<u32>>, String> {
        let t = Instant::now();
        let out = self.inner.sample(policy, tag, prompts, params);
        *self.seconds.lock().expect("lock") += t.elapsed().as_secs_f64();
        out
    }
}

fn spec(objective: Objective, batch: usize, steps: usize, n: usize) -> TrainSpec {
    TrainSpec {
        targets: ["q_proj", "v_proj"].map(String::from).to_vec(),
        batch_size: batch,
        // Enough epochs for `steps` steps; the run is cut there.
        epochs: (steps * batch).div_ceil(n).max(1),
        learning_rate: 1e-3,
        max_seq_len: 256,
        checkpoint_every: 1000,
        seed: 5,
        objective,
        ..TrainSpec::default()
    }
}

fn rows(m: &BaseModel, path: &std::path::Path) -> Vec<Tokenized> {
    let text = std::fs::read_to_string(path).expect("fixture");
    let render = |msgs: &[ChatMessage], g: bool| m.chat.render(msgs, g);
    let (ex, _) = parse_jsonl(&text, None, &render).expect("parse");
    tokenize(&ex, &m.tokenizer, 256, Overflow::Reject)
        .expect("tokenize")
        .0
}

/// (tokens/s, mean step seconds) of the first `steps` steps of a run; the run is cancelled
/// after them.
fn measure(
    steps: usize,
    run: impl FnOnce(&Control, &mut dyn FnMut(TrainEvent)) -> Result<(), trainer::TrainError>,
) -> (f64, f64) {
    let c = Control::default();
    let (mut tokens, mut secs, mut n) = (0usize, 0f64, 0usize);
    run(&c, &mut |e| {
        if let TrainEvent::Step {
            step_tokens,
            step_seconds,
            ..
        } = e
        {
            tokens += step_tokens;
            secs += step_seconds;
            n += 1;
            if n >= steps {
                c.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })
    .expect("train");
    (tokens as f64 / secs.max(1e-9), secs / n.max(1) as f64)
}

/// Inter-token latencies (ms) of 4 greedy streams of 64 tokens.
fn streams(engine: &EngineHandle, m: &BaseModel) -> Vec<f64> {
    let chat = m
        .chat
        .render(
            &[ChatMessage {
                role: "user".into(),
                content: "Tell me a long story about a lighthouse keeper.".into(),
            }],
            true,
        )
        .expect("chat");
    let prompt = m.tokenizer.encode(&chat).expect("ids");
    let rx: Vec<_> = (0..4)
        .map(|i| {
            engine
                .submit(GenerationRequest {
                    task: Task::Generate,
                    prompt_ids: prompt.clone(),
                    params: SamplingParams {
                        max_new_tokens: 64,
                        temperature: 0.0,
                        seed: i,
                        ..Default::default()
                    },
                    deadline: None,
                    adapter: None,
                    tenant: format!("user-{i}").into(),
                    constraint: None,
                    background: false,
                })
                .expect("submit")
        })
        .collect();
    let handles: Vec<_> = rx
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let mut last: Option<Instant> = None;
                let mut gaps = Vec::new();
                while let Some(e) = rx.blocking_recv() {
                    match e {
                        StreamEvent::Tokens { .. } => {
                            let now = Instant::now();
                            if let Some(l) = last {
                                gaps.push((now - l).as_secs_f64() * 1e3);
                            }
                            last = Some(now);
                        }
                        StreamEvent::Finished { .. } => break,
                        _ => panic!("stream failed"),
                    }
                }
                gaps
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("stream"))
        .collect()
}

fn main() {
    let a = Args::parse();
    let m = Arc::new(BaseModel::load(&a.model, &Device::Cpu).expect("model"));
    let engine = EngineHandle::start(m.clone(), EngineConfig::default()).expect("engine");
    let pairs = rows(&m, &a.fixtures.join("preference-pairs-brief.jsonl"));
    let prompts = rows(&m, &a.fixtures.join("rl-questions.jsonl"));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let dir = || tempfile::tempdir().expect("dir");
    println!(
        "model {}, LoRA r=8 on q/v, 2 training threads, {} steps each",
        m.name, a.steps
    );

    let offline = if a.serving_only {
        vec![]
    } else {
        vec![
            (
                "reward model",
                Objective::RewardModel {
                    center_rewards_coefficient: 0.0,
                },
            ),
            (
                "dpo",
                Objective::Dpo(DpoSettings {
                    beta: 0.1,
                    loss_type: DpoLoss::Sigmoid,
                    label_smoothing: 0.0,
                }),
            ),
        ]
    };
    for (name, objective) in offline {
        let s = spec(objective, 4, a.steps, pairs.len());
        let d = dir();
        let (tps, secs) = pool.install(|| {
            measure(a.steps, |c, emit| {
                trainer::train(&m, &s, &pairs, &[], d.path(), c, emit).map(|_| ())
            })
        });
        println!("{name}: {tps:.0} tokens/s, {secs:.1} s a step (4 pairs)");
    }

    let grader: GraderSpec = serde_json::from_value(serde_json::json!({
        "type": "weighted",
        "graders": [
            {"weight": 1, "grader": {"type": "string_match", "reference": "{{row.answer}}",
                                     "case_insensitive": true, "contains": true}},
            {"weight": 1, "grader": {"type": "length", "max": 6, "unit": "words"}},
        ]
    }))
    .expect("grader");
    let empty = serde_json::Map::new();
    let fields: Vec<_> = prompts
        .iter()
        .map(|r| r.fields.as_deref().unwrap_or(&empty))
        .collect();
    let compiled = graders::compile(
        &grader,
        "grader",
        &fields,
        &graders::Resources {
            grammars: &|| engine.grammars(),
            reward_models: &Default::default(),
        },
    )
    .expect("grader");
    let timed = Timed {
        inner: EngineRollouts {
            engine: engine.clone(),
            tenant: "rl-job".into(),
            name: "policy".into(),
        },
        seconds: Mutex::new(0.0),
    };
    let cx = RlContext {
        grader: &compiled,
        rollouts: &timed,
    };
    let grpo = GrpoSettings {
        num_generations: 4,
        beta: 0.0,
        epsilon: 0.2,
        num_iterations: 1,
        advantage: Advantage::Group,
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 24,
        grader: grader.clone(),
    };
    let ppo = PpoSettings {
        kl_coef: 0.05,
        target_kl: None,
        gamma: 1.0,
        lam: 0.95,
        cliprange: 0.2,
        cliprange_value: 0.2,
        vf_coef: 0.1,
        ppo_epochs: 4,
        num_mini_batches: 1,
        whiten_advantages: true,
        missing_eos_penalty: 0.0,
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 24,
        grader: grader.clone(),
    };
    let online = if a.serving_only {
        vec![]
    } else {
        vec![
            (
                "grpo (4 prompts x 4 completions)",
                Objective::Grpo(grpo.clone()),
                4,
            ),
            ("ppo (8 prompts, 4 epochs)", Objective::Ppo(ppo), 8),
        ]
    };
    for (name, objective, batch) in online {
        let s = spec(objective, batch, a.steps, prompts.len());
        let d = dir();
        *timed.seconds.lock().expect("lock") = 0.0;
        let t = Instant::now();
        let (tps, secs) = pool.install(|| {
            measure(a.steps, |c, emit| {
                match &s.objective {
                    Objective::Grpo(g) => {
                        train_grpo(&m, &s, g, &cx, &prompts, &[], d.path(), c, emit)
                    }
                    Objective::Ppo(p) => {
                        train_ppo(&m, &s, p, &cx, &prompts, &[], d.path(), c, emit)
                    }
                    _ => unreachable!(),
                }
                .map(|_| ())
            })
        });
        let wall = t.elapsed().as_secs_f64();
        let rollout = *timed.seconds.lock().expect("lock");
        println!(
            "{name}: {tps:.0} tokens/s, {secs:.1} s a step, rollouts {:.0}% of the run's wall time",
            100.0 * rollout / wall
        );
    }

    // Serving beside an RL job.
    let mut alone = Vec::new();
    for _ in 0..3 {
        alone.extend(streams(&engine, &m));
    }
    let s = spec(Objective::Grpo(grpo), 4, 1000, prompts.len());
    let d = dir();
    let stop = Control::default();
    let job_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(a.job_threads)
        .build()
        .expect("pool");
    let job = std::thread::scope(|scope| {
        let h = scope.spawn(|| {
            job_pool.install(|| {
                train_grpo(
                    &m,
                    &s,
                    match &s.objective {
                        Objective::Grpo(g) => g,
                        _ => unreachable!(),
                    },
                    &cx,
                    &prompts,
                    &[],
                    d.path(),
                    &stop,
                    &mut |_| {},
                )
            })
        });
        // Let the job reach its rollouts and training.
        std::thread::sleep(Duration::from_secs(5));
        let mut during = Vec::new();
        for _ in 0..3 {
            during.extend(streams(&engine, &m));
        }
        stop.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        h.join().expect("job").expect("train");
        during
    });
    let mut during = job;
    let (a50, a99) = (pct(&mut alone, 0.5), pct(&mut alone, 0.99));
    let (d50, d99) = (pct(&mut during, 0.5), pct(&mut during, 0.99));
    println!(
        "serving ITL alone: p50 {a50:.1} ms p99 {a99:.1} ms; beside a GRPO job on {} training threads: p50 {d50:.1} ms p99 {d99:.1} ms (x{:.2} p50, x{:.2} p99)",
        a.job_threads,
        d50 / a50,
        d99 / a99
    );
}
