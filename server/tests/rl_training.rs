//! Online RL. GRPO: advantages against a hand-computed example, the k3 KL estimator
//! against the closed form, the surrogate's gradient against finite differences on the
//! tiny model, a run resumed from its checkpoint equal to the uninterrupted one (rollouts
//! sampled by the real engine), and on the real SmolLM2 a rule grader's reward rising as
//! the policy learns to answer briefly and right. PPO: GAE against a hand computation, the
//! surrogate and value losses' gradients (policy and value head) against finite
//! differences, the adaptive KL controller, and a resumed run (with its adaptive KL
//! coefficient) equal to the uninterrupted one.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{largest_gradient_vs_fd, model as real, tiny, toy_examples};
use graft_server::{
    engine::{EngineConfig, EngineHandle},
    model::{BaseModel, ChatMessage},
    train::{
        dataset::{parse_jsonl, tokenize, Format, Overflow, Tokenized},
        graders::{self, GraderSpec},
        methods::MethodSpec,
        optim,
        ppo::{adapt_kl, gae, ppo_loss, train_ppo, WithValue},
        rl::{group_advantages, grpo_loss, kl_k3, train_grpo, RlContext},
        rollouts::EngineRollouts,
        sequences::{token_logps, SeqBatch},
        trainable,
        trainer::{
            Advantage, Control, GrpoSettings, Objective, Outcome, PpoSettings, TrainEvent,
            TrainSpec,
        },
    },
};

fn settings(grader: GraderSpec, g: usize, max_new_tokens: u32) -> GrpoSettings {
    GrpoSettings {
        num_generations: g,
        beta: 0.04,
        epsilon: 0.2,
        num_iterations: 1,
        advantage: Advantage::Group,
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens,
        grader,
    }
}

fn spec(s: GrpoSettings, prompts_per_step: usize, epochs: usize, lr: f64) -> TrainSpec {
    TrainSpec {
        method: MethodSpec::Lora,
        rank: 8,
        alpha: 16.0,
        targets: ["q_proj", "v_proj"].map(String::from).to_vec(),
        epochs,
        batch_size: prompts_per_step,
        learning_rate: lr,
        max_seq_len: 128,
        seed: 11,
        checkpoint_every: 2,
        objective: Objective::Grpo(s),
        ..TrainSpec::default()
    }
}

/// Prompt rows (`{"prompt", "answer"}` lines) tokenised as a job loads them.
fn prompts(m: &BaseModel, lines: &str) -> Vec<Tokenized> {
    let render = |msgs: &[ChatMessage], g: bool| m.chat.render(msgs, g);
    let (ex, format) = parse_jsonl(lines, None, &render).expect("parse");
    assert_eq!(format, Format::Prompts);
    tokenize(&ex, &m.tokenizer, 128, Overflow::Reject)
        .expect("tokenize")
        .0
}

fn engine(m: Arc<BaseModel>) -> EngineHandle {
    EngineHandle::start(m, EngineConfig::default()).expect("engine")
}

#[test]
fn advantages_and_the_kl_estimator_match_hand_and_closed_forms() {
    // Group 1: rewards 1 0 0 1, mean 0.5, unbiased std sqrt(1/3); group 2: all equal.
    let rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5];
    let a = group_advantages(&rewards, 4, Advantage::Group);
    let want = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
    for (got, w) in a.iter().zip([want, -want, -want, want, 0.0, 0.0, 0.0, 0.0]) {
        assert!((got - w).abs() < 1e-12, "{a:?}");
    }
    // RLOO: 1 − mean(0, 0, 1) = 2/3; 0 − mean(1, 0, 1) = −2/3; equal rewards give 0.
    let a = group_advantages(&rewards, 4, Advantage::Rloo);
    let w = 2.0 / 3.0;
    for (got, w) in a.iter().zip([w, -w, -w, w, 0.0, 0.0, 0.0, 0.0]) {
        assert!((got - w).abs() < 1e-12, "{a:?}");
    }
    let a = group_advantages(&[0.9, 0.3, 0.0], 3, Advantage::Rloo);
    for (got, w) in a.iter().zip([0.9 - 0.15, 0.3 - 0.45, 0.0 - 0.6]) {
        assert!((got - w).abs() < 1e-12, "{a:?}");
    }
    // Under samples from p, k3's expectation is KL(p || q) exactly:
    // Σ p (q/p − log(q/p) − 1) = Σ q − 1 + Σ p log(p/q).
    let p = [0.5f32, 0.3, 0.15, 0.05];
    let q = [0.25f32, 0.25, 0.25, 0.25];
    let lp = Tensor::new(&p.map(f32::ln)[..], &Device::Cpu).expect("lp");
    let lq = Tensor::new(&q.map(f32::ln)[..], &Device::Cpu).expect("lq");
    let k3: Vec<f32> = kl_k3(&lp, &lq).expect("k3").to_vec1().expect("v");
    let expect: f32 = p.iter().zip(&k3).map(|(p, k)| p * k).sum();
    let closed: f32 = p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum();
    assert!((expect - closed).abs() < 1e-6, "{expect} vs {closed}");
    assert!(k3.iter().all(|&k| k >= 0.0), "{k3:?}");
}

#[test]
fn the_surrogate_gradient_matches_finite_differences() {
    let m = tiny();
    let ex = toy_examples(&m);
    let rows: Vec<(&[u32], &[bool])> = ex
        .iter()
        .take(3)
        .map(|e| (&e.ids[..], &e.mask[..]))
        .collect();
    let b = SeqBatch::new(&rows, 0).expect("batch");
    let s = settings(
        GraderSpec::Regex {
            pattern: "x".into(),
        },
        3,
        8,
    );
    let vars = trainable::init(&m, &spec(s.clone(), 1, 1, 1e-3)).expect("init");
    for v in vars.vars() {
        let x: Vec<f32> = v.flatten_all().expect("f").to_vec1().expect("v");
        let j: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, x)| x + 0.05 * ((i * 7919 % 97) as f32 / 97.0 - 0.5))
            .collect();
        v.set(&Tensor::from_vec(j, v.shape(), &Device::Cpu).expect("t"))
            .expect("set");
    }
    // Old log-probabilities a little off the current ones (ratios inside the clip range),
    // a reference further off, advantages of both signs.
    let (lp0, _) = token_logps(&m, Some(vars.as_ref()), &b, false).expect("lp");
    let n = lp0.dim(0).expect("n");
    let old = (lp0.detach() - 0.05).expect("old");
    let reference = (lp0.detach() - 0.3).expect("ref");
    let adv: Vec<f32> = b
        .counts
        .iter()
        .zip([1.2f32, -0.7, 0.4])
        .flat_map(|(&c, a)| std::iter::repeat_n(a, c))
        .collect();
    assert_eq!(adv.len(), n);
    let adv = Tensor::from_vec(adv, n, &Device::Cpu).expect("adv");
    let loss = || {
        let (lp, _) = token_logps(&m, Some(vars.as_ref()), &b, false).expect("lp");
        grpo_loss(&lp, &old, Some(&reference), &adv, &b.rows, &b.counts, &s)
            .expect("loss")
            .0
    };
    let (names, all) = (vars.names(), vars.vars());
    let grads = optim::collect(&loss().backward().expect("backward"), &all).expect("grads");
    let mut checked = 0;
    for (vi, (v, g)) in all.iter().zip(&grads).enumerate() {
        if !names[vi].starts_with("0.") {
            continue;
        }
        let (gk, fd) =
            largest_gradient_vs_fd(v, g, || loss().to_scalar::<f32>().expect("scalar") as f64);
        assert!(gk != 0.0, "{} has no gradient", names[vi]);
        assert!(
            (gk - fd).abs() <= 2e-3 + 0.05 * gk.abs(),
            "{}: autograd {gk} vs finite difference {fd}",
            names[vi]
        );
        checked += 1;
    }
    assert!(checked >= 2, "checked {checked}");
}

/// Trains `s` with rollouts from `eng`; stops after step `stop` when given. The step
/// losses (bits), rewards and KLs to the reference (where the objective has one: GRPO's a
/// token, PPO's a completion), and the final parameters.
#[allow(clippy::type_complexity)]
fn run(
    m: &BaseModel,
    eng: &EngineHandle,
    s: &TrainSpec,
    rows: &[Tokenized],
    dir: &std::path::Path,
    stop: Option<usize>,
) -> (
    Vec<(usize, u32, f64, Option<f64>)>,
    Option<Vec<(String, Vec<f32>)>>,
) {
    let (spec_g, _) = s.objective.grader().expect("online");
    let empty = serde_json::Map::new();
    let fields: Vec<&serde_json::Map<String, serde_json::Value>> = rows
        .iter()
        .map(|r| r.fields.as_deref().unwrap_or(&empty))
        .collect();
    let grader = graders::compile(
        spec_g,
        "grader",
        &fields,
        &graders::Resources {
            grammars: &|| eng.grammars(),
            reward_models: &Default::default(),
        },
    )
    .expect("grader");
    let rollouts = EngineRollouts {
        engine: eng.clone(),
        tenant: "t".into(),
        name: "policy".into(),
    };
    let cx = RlContext {
        grader: &grader,
        rollouts: &rollouts,
    };
    let c = Control::default();
    let mut steps = Vec::new();
    let mut emit = |e| {
        if let TrainEvent::Step {
            step,
            train_loss,
            metrics,
            ..
        } = e
        {
            steps.push((
                step,
                (train_loss as f32).to_bits(),
                metrics["reward"],
                metrics.get("kl").copied(),
            ));
            if Some(step) == stop {
                c.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    };
    let out = match &s.objective {
        Objective::Grpo(g) => train_grpo(m, s, g, &cx, rows, &[], dir, &c, &mut emit),
        Objective::Ppo(p) => train_ppo(m, s, p, &cx, rows, &[], dir, &c, &mut emit),
        _ => panic!("online"),
    }
    .expect("train");
    let w = match out {
        Outcome::Finished(v) => {
            let mut t: Vec<(String, Vec<f32>)> = v
                .tensors()
                .into_iter()
                .map(|(k, t)| (k, t.flatten_all().expect("f").to_vec1().expect("v")))
                .collect();
            t.sort_by(|a, b| a.0.cmp(&b.0));
            Some(t)
        }
        Outcome::Cancelled => None,
    };
    (steps, w)
}

#[test]
fn a_grpo_run_resumes_bit_for_bit() {
    let m = tiny();
    let eng = engine(m.clone());
    let lines: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"n{i}\", \"answer\": \"{}\"}}\n", i % 3))
        .collect();
    let rows = prompts(&m, &lines);
    let grader = GraderSpec::StringMatch {
        reference: "{{row.answer}}".into(),
        case_insensitive: false,
        contains: true,
    };
    let s = spec(settings(grader, 4, 6), 2, 2, 5e-3);
    let full_dir = tempfile::tempdir().expect("dir");
    let (full, full_w) = run(&m, &eng, &s, &rows, full_dir.path(), None);
    assert_eq!(full.len(), 8);
    let dir = tempfile::tempdir().expect("dir");
    run(&m, &eng, &s, &rows, dir.path(), Some(4));
    let (rest, rest_w) = run(&m, &eng, &s, &rows, dir.path(), None);
    assert_eq!(rest.first().map(|x| x.0), Some(5));
    assert_eq!(rest, full[4..].to_vec());
    assert_eq!(rest_w.expect("done"), full_w.expect("done"));
}

/// Sixteen questions with one-word answers (`tests/fixtures/rl-questions.jsonl`; the
/// grader reads `answer`).
fn questions(m: &BaseModel) -> Vec<Tokenized> {
    let text =
        std::fs::read_to_string(common::fixtures().join("rl-questions.jsonl")).expect("fixture");
    prompts(m, &text)
}

/// The rule grader ("at most 6 words and contains the row's answer", each half
/// worth 0.5) on the real model: the mean reward of the last 4 of 12 steps clearly above
/// the first 4's, with rollouts from the serving engine, and the KL to the reference (the
/// base, β 0.04 as TRL's default) bounded all along. (At β 0.2 the penalty held the policy
/// so close to the base that the rise was within the noise of 16 samples a step: +0.118,
/// +0.078, -0.05 and +0.07 in four runs of differing bits and settings; at 0.04, +0.26.)
#[test]
fn grpo_raises_a_rule_graders_reward_on_the_real_model() {
    let m = real();
    let eng = engine(m.clone());
    let rows = questions(&m);
    let grader = rule_grader();
    let s = spec(
        GrpoSettings {
            beta: 0.04,
            ..settings(grader, 4, 24)
        },
        4,
        3,
        2e-3,
    );
    let dir = tempfile::tempdir().expect("dir");
    let t = std::time::Instant::now();
    let (steps, _) = run(&m, &eng, &s, &rows, dir.path(), None);
    reward_rose("grpo", &steps, t);
    // k3 a token, β 0.04: at most 1.99 seen.
    kl_bounded("grpo", &steps, 4.0);
}

/// The rule grader: "contains the row's answer" (0.5) + "at most 6 words" (0.5).
fn rule_grader() -> GraderSpec {
    serde_json::from_value(serde_json::json!({
        "type": "weighted",
        "graders": [
            {"weight": 1, "grader": {"type": "string_match", "reference": "{{row.answer}}",
                                     "case_insensitive": true, "contains": true}},
            {"weight": 1, "grader": {"type": "length", "max": 6, "unit": "words"}},
        ]
    }))
    .expect("grader")
}

/// The mean reward of the last 4 steps clearly (by more than 0.1) above the first 4's.
fn reward_rose(what: &str, steps: &[(usize, u32, f64, Option<f64>)], t: std::time::Instant) {
    let rewards: Vec<f64> = steps.iter().map(|s| s.2).collect();
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (first, last) = (mean(&rewards[..4]), mean(&rewards[rewards.len() - 4..]));
    eprintln!(
        "{what}: {} steps in {:.1} s; rewards {rewards:?}; first 4 {first:.3}, last 4 {last:.3}",
        steps.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(last > first + 0.1, "first {first} last {last}: {rewards:?}");
}

/// The KL to the reference at every step: ~0 at the first (the policy starts as the
/// reference), positive later (it moved), below `bound` nats throughout (it stayed near).
fn kl_bounded(what: &str, steps: &[(usize, u32, f64, Option<f64>)], bound: f64) {
    let kl: Vec<f64> = steps
        .iter()
        .map(|s| s.3.expect("the step reports its KL"))
        .collect();
    eprintln!("{what}: KL to the reference by step {kl:?}");
    assert!(kl[0].abs() < 1e-3, "{kl:?}");
    assert!(
        kl.iter().any(|&k| k > 0.0),
        "the policy never moved: {kl:?}"
    );
    assert!(
        kl.iter()
            .all(|&k| k.is_finite() && (0.0..bound).contains(&k)),
        "{kl:?}"
    );
}

fn ppo(grader: GraderSpec, max_new_tokens: u32) -> PpoSettings {
    PpoSettings {
        kl_coef: 0.05,
        target_kl: Some(0.5),
        gamma: 1.0,
        lam: 0.95,
        cliprange: 0.2,
        cliprange_value: 0.2,
        vf_coef: 0.1,
        ppo_epochs: 2,
        num_mini_batches: 2,
        whiten_advantages: true,
        missing_eos_penalty: 0.1,
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens,
        grader,
    }
}

#[test]
fn gae_and_the_kl_controller_match_hand_computations() {
    let (r, v) = ([0.0f32, -0.1, 1.0], [0.5f32, 0.4, 0.2]);
    let (gamma, lam) = (0.9f64, 0.8f64);
    // δ2 = 1 − 0.2; δ1 = −0.1 + 0.9·0.2 − 0.4; δ0 = 0 + 0.9·0.4 − 0.5.
    let d = [0.9 * 0.4 - 0.5, -0.1 + 0.9 * 0.2 - 0.4, 1.0 - 0.2];
    let a2 = d[2];
    let a1 = d[1] + gamma * lam * a2;
    let a0 = d[0] + gamma * lam * a1;
    let (adv, ret) = gae(&r, &v, gamma, lam);
    for (got, want) in adv.iter().zip([a0, a1, a2]) {
        assert!((*got as f64 - want).abs() < 1e-6, "{adv:?}");
    }
    for ((r, a), v) in ret.iter().zip(&adv).zip(&v) {
        assert!((r - (a + v)).abs() < 1e-6);
    }
    // Above the target the coefficient grows, below it shrinks, by at most 20% of n/10 000.
    assert!((adapt_kl(0.1, 2.0, 1.0, 100) - 0.1 * (1.0 + 0.2 * 0.01)).abs() < 1e-12);
    assert!((adapt_kl(0.1, 0.9, 1.0, 100) - 0.1 * (1.0 - 0.1 * 0.01)).abs() < 1e-12);
}

#[test]
fn the_ppo_losses_gradients_match_finite_differences() {
    let m = tiny();
    let ex = toy_examples(&m);
    let rows: Vec<(&[u32], &[bool])> = ex
        .iter()
        .take(3)
        .map(|e| (&e.ids[..], &e.mask[..]))
        .collect();
    let b = SeqBatch::new(&rows, 0).expect("batch");
    let s = ppo(
        GraderSpec::Regex {
            pattern: "x".into(),
        },
        8,
    );
    let inner = trainable::init(
        &m,
        &spec(
            settings(
                GraderSpec::Regex {
                    pattern: "x".into(),
                },
                2,
                8,
            ),
            1,
            1,
            1e-3,
        ),
    )
    .expect("init");
    let vars = WithValue::init(inner, m.config().hidden_size, 3).expect("value head");
    use graft_server::train::trainable::Trainable;
    for v in vars.vars() {
        let x: Vec<f32> = v.flatten_all().expect("f").to_vec1().expect("v");
        let j: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, x)| x + 0.05 * ((i * 7919 % 97) as f32 / 97.0 - 0.5))
            .collect();
        v.set(&Tensor::from_vec(j, v.shape(), &Device::Cpu).expect("t"))
            .expect("set");
    }
    let (lp0, _, h0) =
        graft_server::train::sequences::token_outputs(&m, Some(&vars), &b, false).expect("outputs");
    let n = lp0.dim(0).expect("n");
    let old_lp = (lp0.detach() - 0.05).expect("old");
    let old_v = (vars.values(&h0.detach()).expect("v") + 0.03).expect("old v");
    let pattern = |k: usize, scale: f32| -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|i| scale * (((i * 37 + k) % 11) as f32 / 11.0 - 0.4))
            .collect();
        Tensor::from_vec(v, n, &Device::Cpu).expect("t")
    };
    let (adv, ret) = (pattern(1, 2.0), pattern(5, 1.0));
    let loss = || {
        let (lp, _, h) = graft_server::train::sequences::token_outputs(&m, Some(&vars), &b, false)
            .expect("outputs");
        let values = vars.values(&h).expect("values");
        ppo_loss(&lp, &old_lp, &values, &old_v, &adv, &ret, &s)
            .expect("loss")
            .0
    };
    let (names, all) = (vars.names(), vars.vars());
    let grads = optim::collect(&loss().backward().expect("backward"), &all).expect("grads");
    let mut checked = 0;
    for (vi, (v, g)) in all.iter().zip(&grads).enumerate() {
        if !(names[vi].starts_with("0.") || names[vi] == "v_head.weight") {
            continue;
        }
        let (gk, fd) =
            largest_gradient_vs_fd(v, g, || loss().to_scalar::<f32>().expect("scalar") as f64);
        assert!(gk != 0.0, "{} has no gradient", names[vi]);
        assert!(
            (gk - fd).abs() <= 2e-3 + 0.05 * gk.abs(),
            "{}: autograd {gk} vs finite difference {fd}",
            names[vi]
        );
        checked += 1;
    }
    assert!(checked >= 3, "checked {checked}");
}

#[test]
fn a_ppo_run_with_an_adaptive_kl_resumes_bit_for_bit() {
    let m = tiny();
    let eng = engine(m.clone());
    let lines: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"n{i}\", \"answer\": \"{}\"}}\n", i % 3))
        .collect();
    let rows = prompts(&m, &lines);
    let grader = GraderSpec::StringMatch {
        reference: "{{row.answer}}".into(),
        case_insensitive: false,
        contains: true,
    };
    let s = TrainSpec {
        objective: Objective::Ppo(ppo(grader, 6)),
        ..spec(
            settings(
                GraderSpec::Regex {
                    pattern: "x".into(),
                },
                2,
                6,
            ),
            4,
            2,
            5e-3,
        )
    };
    let full_dir = tempfile::tempdir().expect("dir");
    let (full, full_w) = run(&m, &eng, &s, &rows, full_dir.path(), None);
    assert_eq!(full.len(), 4);
    let dir = tempfile::tempdir().expect("dir");
    run(&m, &eng, &s, &rows, dir.path(), Some(2));
    let (rest, rest_w) = run(&m, &eng, &s, &rows, dir.path(), None);
    assert_eq!(rest.first().map(|x| x.0), Some(3));
    assert_eq!(rest, full[2..].to_vec());
    let (a, b) = (full_w.expect("done"), rest_w.expect("done"));
    // The value head trained and is checkpointed; the exported policy leaves it out.
    assert!(a.iter().any(|(n, _)| n == "v_head.weight"));
    assert_eq!(a, b);
}

/// PPO with the same rule grader on the real model: one completion per prompt, 8 prompts a
/// step, 12 steps; the mean reward of the last 4 steps clearly above the first 4's, and the
/// KL to the reference (kl_coef 0.05) bounded all along.
#[test]
fn ppo_raises_a_rule_graders_reward_on_the_real_model() {
    let m = real();
    let eng = engine(m.clone());
    let rows = questions(&m);
    let grader = rule_grader();
    let s = TrainSpec {
        objective: Objective::Ppo(PpoSettings {
            target_kl: None,
            missing_eos_penalty: 0.0,
            num_mini_batches: 1,
            ..ppo(grader.clone(), 24)
        }),
        ..spec(settings(grader, 2, 24), 8, 6, 2e-3)
    };
    let dir = tempfile::tempdir().expect("dir");
    let t = std::time::Instant::now();
    let (steps, _) = run(&m, &eng, &s, &rows, dir.path(), None);
    reward_rose("ppo", &steps, t);
    // Summed over a completion of at most 24 tokens, kl_coef 0.05: at most 7.3 seen.
    kl_bounded("ppo", &steps, 12.0);
}
