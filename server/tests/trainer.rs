//! The trainer on a tiny random-weight model: LoRA gradients match finite differences, the
//! first step's loss equals the plain forward's loss, loss goes down, and a killed run
//! resumes from its checkpoint onto the same trajectory.

use std::sync::{Arc, OnceLock};

use candle_core::{Device, Tensor};
use graft_server::{
    model::{
        tiny::{write_tiny_gguf, TinySpec},
        BaseModel,
    },
    train::{
        dataset::{parse_jsonl, tokenize, Overflow, Tokenized},
        lora_vars::LoraVars,
        optim,
        trainer::{self, Control, Outcome, TrainEvent, TrainSpec},
    },
};

fn model() -> Arc<BaseModel> {
    static M: OnceLock<Arc<BaseModel>> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("graft-trainer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("tiny.gguf");
        write_tiny_gguf(&p, &TinySpec::default()).expect("tiny");
        Arc::new(BaseModel::load(&p, &Device::Cpu).expect("load"))
    })
    .clone()
}

fn data(m: &BaseModel) -> Vec<Tokenized> {
    let lines: String = (0..12)
        .map(|i| {
            format!(
                "{{\"prompt\":\"Q{i} says\",\"completion\":\" the answer is {}\"}}\n",
                i % 3
            )
        })
        .collect();
    let render = |msgs: &[graft_server::model::ChatMessage], g: bool| m.chat.render(msgs, g);
    let (ex, _) = parse_jsonl(&lines, None, &render).expect("parse");
    tokenize(&ex, &m.tokenizer, 64, Overflow::Reject)
        .expect("tokenize")
        .0
}

fn spec() -> TrainSpec {
    TrainSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
        use_rslora: false,
        epochs: 3,
        batch_size: 4,
        grad_accum: 1,
        learning_rate: 1e-2,
        schedule: "linear".into(),
        warmup_steps: 1,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_seq_len: 64,
        seed: 3,
        eval_every: 0,
        patience: 0,
        checkpoint_every: 2,
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let m = model();
    let ex = data(&m);
    let batch: Vec<&Tokenized> = ex.iter().take(3).collect();
    let s = spec();
    let vars = LoraVars::init(m.config(), &s.modules(), 4, 8.0, false, 0.0, 1).expect("vars");
    // B starts at zero (so A gets no gradient); make both non-zero for the check.
    for v in vars.vars() {
        let t = Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).expect("randn");
        v.set(&t).expect("set");
    }
    let loss_of = |vars: &LoraVars| trainer::plain_loss(&m, vars, &batch).expect("loss");
    // Autograd.
    let names = vars.names();
    let all = vars.vars();
    let grads = {
        let l = trainer::plain_loss_tensor(&m, &vars, &batch).expect("loss tensor");
        optim::collect(&l.backward().expect("backward"), &all).expect("grads")
    };
    let mut checked = 0;
    for (vi, (v, g)) in all.iter().zip(&grads).enumerate().step_by(3) {
        let flat: Vec<f32> = g.flatten_all().expect("flat").to_vec1().expect("vec");
        let base: Vec<f32> = v.flatten_all().expect("flat").to_vec1().expect("vec");
        let (k, gk) = flat
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(k, g)| (k, *g))
            .expect("non-empty");
        let eps = 2e-3f32;
        let mut plus = base.clone();
        plus[k] += eps;
        v.set(&Tensor::from_vec(plus, v.shape(), &Device::Cpu).expect("t"))
            .expect("set");
        let lp = loss_of(&vars);
        let mut minus = base.clone();
        minus[k] -= eps;
        v.set(&Tensor::from_vec(minus, v.shape(), &Device::Cpu).expect("t"))
            .expect("set");
        let lm = loss_of(&vars);
        v.set(&Tensor::from_vec(base, v.shape(), &Device::Cpu).expect("t"))
            .expect("set");
        let fd = ((lp - lm) / (2.0 * eps as f64)) as f32;
        let rel = (fd - gk).abs() / gk.abs().max(1e-3);
        assert!(
            rel < 0.05,
            "{}: autograd {gk} vs finite difference {fd}",
            names[vi]
        );
        checked += 1;
    }
    assert!(checked >= 8);
}

#[test]
fn first_step_loss_is_the_plain_forward_loss_and_loss_goes_down() {
    let m = model();
    let ex = data(&m);
    let mut s = spec();
    s.batch_size = ex.len();
    s.epochs = 30;
    s.learning_rate = 3e-2;
    let dir = tempfile::tempdir().expect("dir");
    let mut events = Vec::new();
    let out = trainer::train(
        &m,
        &s,
        &ex,
        &[],
        dir.path(),
        &Control::default(),
        &mut |e| events.push(e),
    )
    .expect("train");
    let Outcome::Finished(vars) = out else {
        panic!("not finished")
    };
    // The size CreateJob charges to the storage quota is the trained tensors' size.
    let trained: usize = vars.vars().iter().map(|v| v.elem_count() * 4).sum();
    assert_eq!(s.adapter_bytes(m.config()), trained as u64);
    let losses: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { train_loss, .. } => Some(*train_loss),
            _ => None,
        })
        .collect();
    // The first step's loss (B = 0: the base model) equals the plain forward's, computed
    // independently from forward_reference logits.
    let mut plain = 0f64;
    let mut n = 0usize;
    for e in &ex {
        let logits = m.llama.forward_reference(&e.ids).expect("ref");
        for i in 1..e.ids.len() {
            if e.mask[i] {
                let row: Vec<f32> = logits.get(i - 1).expect("row").to_vec1().expect("vec");
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = row.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
                plain += (lse - row[e.ids[i] as usize]) as f64;
                n += 1;
            }
        }
    }
    plain /= n as f64;
    assert!(
        (losses[0] - plain).abs() < 1e-4,
        "first step {} vs plain {plain}",
        losses[0]
    );
    let last = *losses.last().expect("steps");
    assert!(last < losses[0] * 0.5, "loss {} -> {last}", losses[0]);
}

#[test]
fn a_killed_run_resumes_onto_the_same_trajectory() {
    let m = model();
    let ex = data(&m);
    let s = spec();
    let run = |dir: &std::path::Path, stop_after: Option<usize>| {
        let ctl = Control::default();
        let mut losses = Vec::new();
        let c = ctl.clone();
        let _ = trainer::train(&m, &s, &ex, &[], dir, &ctl, &mut |e| {
            if let TrainEvent::Step {
                step, train_loss, ..
            } = e
            {
                losses.push((step, train_loss));
                if Some(step) == stop_after {
                    c.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .expect("train");
        losses
    };
    let full_dir = tempfile::tempdir().expect("dir");
    let full = run(full_dir.path(), None);
    let dir = tempfile::tempdir().expect("dir");
    let first = run(dir.path(), Some(4));
    assert_eq!(first.last().map(|x| x.0), Some(4));
    let rest = run(dir.path(), None);
    // Checkpoints every 2 steps: the resumed run continues from step 4, not from 0.
    assert_eq!(rest.first().map(|x| x.0), Some(5));
    for (a, b) in rest.iter().zip(&full[4..]) {
        assert_eq!(a.0, b.0);
        assert!((a.1 - b.1).abs() < 1e-5, "step {}: {} vs {}", a.0, a.1, b.1);
    }
}
