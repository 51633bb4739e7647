//! The preference objectives: a reward model (a scalar head, TRL's pairwise loss) and DPO
//! (against the base as the reference). Their losses match the closed forms and their
//! gradients finite differences on the tiny model; DPO's references are the base's and
//! are stored once, so a policy at its start has a margin of 0 and the loss ln 2; a resumed
//! run is bit for bit the uninterrupted one. On the real SmolLM2 with the public pairs
//! (30 to train, 10 held out), a reward model ranks the held-out pairs right and serves
//! those rewards from its PEFT files, and DPO ranks them right by its implicit reward and
//! answers held-out prompts more briefly than the base.

mod common;

use candle_core::{Device, Tensor};
use common::{
    assert_resumes_bit_for_bit, fixtures, largest_gradient_vs_fd, max_abs_diff, model as real,
    served_last_logits, tiny,
};
use graft_server::{
    adapters::formats::{self, ImportPolicy},
    model::{BaseModel, ChatMessage},
    train::{
        dataset::{parse_jsonl, tokenize, Overflow, Tokenized},
        methods::MethodSpec,
        optim,
        pairs::{self, dpo_losses, log_sigmoid, pair_batch, pair_loss, References},
        trainable::{self, Trainable},
        trainer::{self, Control, DpoLoss, DpoSettings, Objective, Outcome, TrainEvent, TrainSpec},
    },
};

fn dpo(beta: f64, loss_type: DpoLoss, label_smoothing: f64) -> Objective {
    Objective::Dpo(DpoSettings {
        beta,
        loss_type,
        label_smoothing,
    })
}

fn reward(center: f64) -> Objective {
    Objective::RewardModel {
        center_rewards_coefficient: center,
    }
}

fn spec(objective: Objective, epochs: usize, lr: f64) -> TrainSpec {
    TrainSpec {
        method: MethodSpec::Lora,
        rank: 8,
        alpha: 16.0,
        targets: ["q_proj", "v_proj"].map(String::from).to_vec(),
        epochs,
        batch_size: 4,
        learning_rate: lr,
        max_seq_len: 512,
        seed: 7,
        objective,
        ..TrainSpec::default()
    }
}

/// The public pairs tokenised: (the first 30, the last 10).
fn pairs_of(m: &BaseModel) -> (Vec<Tokenized>, Vec<Tokenized>) {
    let text =
        std::fs::read_to_string(fixtures().join("preference-pairs-brief.jsonl")).expect("dataset");
    let render = |msgs: &[ChatMessage], g: bool| m.chat.render(msgs, g);
    let (ex, format) = parse_jsonl(&text, None, &render).expect("parse");
    assert_eq!(format.name(), "preference");
    let (mut tok, _) = tokenize(&ex, &m.tokenizer, 512, Overflow::Reject).expect("tokenize");
    assert_eq!(tok.len(), 40);
    assert!(tok.iter().all(|t| t.rejected.is_some()));
    let held = tok.split_off(30);
    (tok, held)
}

/// Moves every variable off its start (LoRA's B is 0 there) so no gradient vanishes.
fn jiggle(vars: &dyn Trainable) {
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
}

#[test]
fn losses_match_their_closed_forms() {
    let h = [-3.0f32, -0.2, 0.0, 0.7, 4.0];
    let ht = Tensor::new(&h[..], &Device::Cpu).expect("h");
    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }
    /// (h, β, ε) -> the loss.
    type Closed = fn(f64, f64, f64) -> f64;
    let cases: [(DpoLoss, f64, f64, Closed); 4] = [
        (DpoLoss::Sigmoid, 0.1, 0.0, |h, b, _| -(sig(b * h)).ln()),
        (DpoLoss::Sigmoid, 0.5, 0.2, |h, b, e| {
            -(1.0 - e) * sig(b * h).ln() - e * sig(-b * h).ln()
        }),
        (DpoLoss::Ipo, 0.25, 0.0, |h, b, _| {
            (h - 1.0 / (2.0 * b)).powi(2)
        }),
        (DpoLoss::Hinge, 0.3, 0.0, |h, b, _| (1.0 - b * h).max(0.0)),
    ];
    for (loss_type, beta, eps, want) in cases {
        let s = DpoSettings {
            beta,
            loss_type,
            label_smoothing: eps,
        };
        let got: Vec<f32> = dpo_losses(&ht, &s).expect("loss").to_vec1().expect("v");
        for (&x, g) in h.iter().zip(got) {
            let w = want(x as f64, beta, eps);
            assert!(
                (g as f64 - w).abs() < 1e-5,
                "{loss_type:?} h={x}: {g} vs {w}"
            );
        }
    }
    // log σ is finite and right far out on both sides.
    let x = Tensor::new(&[-200f32, -30.0, 0.0, 30.0, 200.0][..], &Device::Cpu).expect("x");
    let ls: Vec<f32> = log_sigmoid(&x).expect("ls").to_vec1().expect("v");
    let want = [-200.0f32, -30.0, -std::f32::consts::LN_2, -9.4e-14, 0.0];
    for (g, w) in ls.iter().zip(want) {
        assert!(g.is_finite() && (g - w).abs() < 1e-5, "{ls:?}");
    }
}

#[test]
fn reward_and_dpo_gradients_match_finite_differences() {
    let m = tiny();
    let (train, _) = pairs_of(&m);
    let rows: Vec<&Tokenized> = train.iter().take(3).collect();
    let b = pair_batch(&rows, 0).expect("batch");
    let refs = [[-40.0f32, -90.0], [-35.0, -80.0], [-30.0, -95.0]];
    for objective in [
        reward(0.05),
        dpo(0.1, DpoLoss::Sigmoid, 0.1),
        dpo(0.5, DpoLoss::Ipo, 0.0),
    ] {
        let vars = trainable::init(&m, &spec(objective.clone(), 1, 1e-3)).expect("init");
        jiggle(vars.as_ref());
        let loss = || {
            pair_loss(&m, vars.as_ref(), &objective, &b, &refs)
                .expect("loss")
                .loss
        };
        let l = loss();
        let (names, all) = (vars.names(), vars.vars());
        let grads = optim::collect(&l.backward().expect("backward"), &all).expect("grads");
        let mut checked = 0;
        for (vi, (v, g)) in all.iter().zip(&grads).enumerate() {
            if !(names[vi] == "score.weight" || names[vi].starts_with("0.")) {
                continue;
            }
            let (gk, fd) =
                largest_gradient_vs_fd(v, g, || loss().to_scalar::<f32>().expect("scalar") as f64);
            assert!(gk != 0.0, "{objective:?}: {} has no gradient", names[vi]);
            assert!(
                (gk - fd).abs() <= 2e-3 + 0.05 * gk.abs(),
                "{objective:?} {}: autograd {gk} vs finite difference {fd}",
                names[vi]
            );
            checked += 1;
        }
        assert!(checked >= 2, "{objective:?}: checked {checked}");
    }
}

/// LoRA starts with B = 0, so the policy is the reference: every log-ratio is 0, the
/// sigmoid loss ln 2 and the implicit rewards 0. The references are written once and read
/// back unchanged.
#[test]
fn dpo_starts_at_the_reference_and_stores_it_once() {
    let m = tiny();
    let (train, held) = pairs_of(&m);
    let dir = tempfile::tempdir().expect("dir");
    let refs =
        References::load_or_compute(&m, None, &train, &held, 4, 0, dir.path()).expect("refs");
    assert_eq!((refs.train.len(), refs.eval.len()), (30, 10));
    assert!(refs.train.iter().all(|r| r[0] < 0.0 && r[1] < 0.0));
    let again =
        References::load_or_compute(&m, None, &train, &held, 4, 0, dir.path()).expect("read");
    assert_eq!(again.train, refs.train);
    assert_eq!(again.eval, refs.eval);
    let objective = dpo(0.1, DpoLoss::Sigmoid, 0.0);
    let vars = trainable::init(&m, &spec(objective.clone(), 1, 1e-3)).expect("init");
    let rows: Vec<&Tokenized> = train.iter().take(4).collect();
    let b = pair_batch(&rows, 0).expect("batch");
    let out = pair_loss(&m, vars.as_ref(), &objective, &b, &refs.train[..4]).expect("loss");
    let l = out.loss.to_scalar::<f32>().expect("scalar");
    assert!((l - std::f32::consts::LN_2).abs() < 1e-4, "{l}");
    assert!(out.sums["rewards/margins"].abs() < 1e-3, "{:?}", out.sums);
    assert!(
        (out.sums["logps/chosen"] - refs.train[..4].iter().map(|r| r[0] as f64).sum::<f64>()).abs()
            < 1e-2
    );
}

#[test]
fn preference_runs_resume_bit_for_bit() {
    let m = tiny();
    let (train, _) = pairs_of(&m);
    let ex = &train[..24];
    for (objective, what) in [
        (reward(0.01), "reward model"),
        (dpo(0.1, DpoLoss::Sigmoid, 0.0), "dpo"),
    ] {
        let s = TrainSpec {
            checkpoint_every: 2,
            ..spec(objective, 2, 1e-3)
        };
        assert_resumes_bit_for_bit(&m, &s, ex, what);
    }
}

/// Trains `s` on the real model; the per-step losses and the last evaluation's (loss,
/// pairwise accuracy, metrics).
fn run(
    m: &BaseModel,
    s: &TrainSpec,
    train: &[Tokenized],
    held: &[Tokenized],
) -> (Box<dyn Trainable>, Vec<f64>, (f64, f64, pairs::Metrics)) {
    let dir = tempfile::tempdir().expect("dir");
    let (mut losses, mut eval) = (Vec::new(), None);
    let t = std::time::Instant::now();
    let out = trainer::train(
        m,
        s,
        train,
        held,
        dir.path(),
        &Control::default(),
        &mut |e| match e {
            TrainEvent::Step { train_loss, .. } => losses.push(train_loss),
            TrainEvent::Eval {
                eval_loss,
                token_accuracy,
                metrics,
                ..
            } => eval = Some((eval_loss, token_accuracy, metrics)),
            TrainEvent::Checkpoint { .. } => {}
        },
    )
    .expect("train");
    eprintln!(
        "{}: {} steps in {:.1} s; losses {losses:?}",
        s.objective.name(),
        losses.len(),
        t.elapsed().as_secs_f64()
    );
    let Outcome::Finished(vars) = out else {
        panic!("cancelled")
    };
    (vars, losses, eval.expect("evaluated"))
}

/// A reward model (LoRA on q/v plus the scalar head) on 30 pairs ranks at least 9 of the
/// 10 held-out pairs right; its PEFT files (SEQ_CLS, one output) parse back as a reward
/// model and serve the rewards it trained.
#[test]
fn a_reward_model_learns_to_prefer_the_brief_answers_and_serves_from_its_peft_files() {
    let m = real();
    let (train, held) = pairs_of(&m);
    let (vars, losses, (loss, acc, metrics)) = run(&m, &spec(reward(0.0), 1, 1e-3), &train, &held);
    eprintln!("reward model: held-out loss {loss:.4} accuracy {acc} {metrics:?}");
    assert!(acc >= 0.9, "held-out pairwise accuracy {acc}");
    assert!(metrics["rewards/margins"] > 0.0, "{metrics:?}");
    assert!(losses.last() < losses.first(), "{losses:?}");
    let parsed = vars.export().expect("export");
    let (config, weights) = formats::write(&parsed, m.config(), &m.name).expect("write");
    let cfg: serde_json::Value = serde_json::from_slice(&config).expect("json");
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let saved = cfg["modules_to_save"].as_array().expect("modules_to_save");
    assert!(saved.contains(&serde_json::json!("score")), "{saved:?}");
    let policy = ImportPolicy {
        max_rank: 64,
        max_virtual_tokens: 128,
        force: false,
        base_aliases: vec![],
    };
    let back = formats::parse(&config, &weights, m.config(), &m.name, &policy)
        .expect("parses")
        .compile(&m.llama)
        .expect("compiles");
    assert!(back.head.as_ref().expect("head").is_reward());
    for p in &held {
        let rejected = &p.rejected.as_ref().expect("pair").ids;
        let trained = m
            .llama
            .output_reference(&p.ids, vars.as_ref())
            .expect("plain");
        let served = served_last_logits(&m, &back, &p.ids);
        assert_eq!(served.len(), 1);
        assert!(
            max_abs_diff(&served, &trained) < 1e-3,
            "{served:?} vs {trained:?}"
        );
        let other = served_last_logits(&m, &back, rejected);
        eprintln!(
            "served rewards: chosen {:.3} rejected {:.3}",
            served[0], other[0]
        );
    }
}

/// Tokens the serving path generates greedily before EOS (at most `n`).
fn answer_len(m: &BaseModel, a: Option<&graft_server::model::Adapter>, prompt: &[u32]) -> usize {
    let (_, out) = common::greedy(m, a, prompt, 64);
    out.iter()
        .position(|t| m.tokenizer.eos_ids.contains(t))
        .unwrap_or(out.len())
}

/// DPO (LoRA on q/v, β 0.1) on 30 pairs: at least 8 of the 10 held-out pairs ranked right
/// by the implicit reward, and greedy answers to the held-out prompts shorter than the
/// base's.
#[test]
fn dpo_learns_to_prefer_the_brief_answers_and_answers_more_briefly() {
    let m = real();
    let (train, held) = pairs_of(&m);
    let (vars, _, (loss, acc, metrics)) = run(
        &m,
        &spec(dpo(0.1, DpoLoss::Sigmoid, 0.0), 1, 1e-3),
        &train,
        &held,
    );
    eprintln!("dpo: held-out loss {loss:.4} accuracy {acc} {metrics:?}");
    assert!(acc >= 0.8, "held-out implicit-reward accuracy {acc}");
    let adapter = vars
        .export()
        .expect("export")
        .compile(&m.llama)
        .expect("compiles");
    let (mut base, mut tuned) = (0, 0);
    for p in &held {
        // The prompt: the tokens before the chosen completion's first trained one.
        let k = p.mask.iter().position(|&t| t).expect("completion");
        base += answer_len(&m, None, &p.ids[..k]);
        tuned += answer_len(&m, Some(&adapter), &p.ids[..k]);
    }
    eprintln!("dpo: greedy answer tokens over 10 held-out prompts: base {base}, dpo {tuned}");
    assert!(tuned < base, "base {base} vs dpo {tuned}");
}
