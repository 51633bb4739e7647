//! The trainer on a tiny random-weight model: LoRA gradients match finite differences, the
//! first step's loss equals the plain forward's loss, loss goes down, and a killed run
//! resumes from its checkpoint onto the same trajectory.

mod common;

use candle_core::{Device, Tensor};
use common::{lora_spec as spec, tiny as model, toy_examples as data};
use graft_server::train::{
    dataset::Tokenized,
    lora_vars::LoraVars,
    optim,
    trainable::Trainable,
    trainer::{self, Control, Outcome, TrainEvent, TrainSpec},
};

#[test]
fn lora_gradients_match_finite_differences() {
    let m = model();
    let ex = data(&m);
    let batch: Vec<&Tokenized> = ex.iter().take(3).collect();
    let s = spec();
    let vars = LoraVars::init(
        &Device::Cpu,
        m.config(),
        None,
        &s.modules(),
        4,
        8.0,
        false,
        0.0,
        1,
    )
    .expect("vars");
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

/// `Control::start_values` replaces the method's fresh draws (what the PEFT comparison in
/// `graft-bench methods --peft-start` relies on): the first step's loss is the plain
/// forward's with those values, not with the fresh ones; a name missing from the values is
/// an error naming it.
#[test]
fn a_run_starts_from_the_values_it_is_given() {
    let m = model();
    let ex = data(&m);
    let batch: Vec<&Tokenized> = ex.iter().collect();
    let mut s = spec();
    s.batch_size = ex.len();
    s.epochs = 1;
    let vars = |seed: u64| {
        LoraVars::init(
            &Device::Cpu,
            m.config(),
            None,
            &s.modules(),
            s.rank,
            s.alpha,
            false,
            0.0,
            seed,
        )
        .expect("vars")
    };
    // Other values than the run's own draws: B non-zero, so the adapter changes the loss.
    let given = vars(s.seed + 1);
    for v in given.vars() {
        let t = Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).expect("randn");
        v.set(&t).expect("set");
    }
    let expected = trainer::plain_loss(&m, &given, &batch).expect("loss");
    let base = trainer::plain_loss(&m, &vars(s.seed), &batch).expect("loss");
    assert!((expected - base).abs() > 1e-3, "{expected} vs {base}");
    let run = |values: std::collections::HashMap<String, Tensor>| {
        let ctl = Control {
            start_values: Some(std::sync::Arc::new(values)),
            ..Control::default()
        };
        let dir = tempfile::tempdir().expect("dir");
        let mut first = None;
        trainer::train(&m, &s, &ex, &[], dir.path(), &ctl, &mut |e| {
            if let TrainEvent::Step { train_loss, .. } = e {
                first.get_or_insert(train_loss);
            }
        })
        .map(|_| first)
    };
    let first = run(given.tensors()).expect("train").expect("a step");
    assert!(
        (first - expected).abs() < 1e-5,
        "first step {first} vs the given values' {expected}"
    );
    let mut partial = given.tensors();
    let missing = given.names()[0].clone();
    partial.remove(&missing);
    let err = run(partial).expect_err("refused").to_string();
    assert!(err.contains(&missing), "{err}");
}

#[test]
fn a_killed_run_resumes_onto_the_same_trajectory() {
    // With dropout too: its masks follow from (seed, step, micro-batch), so the resumed run
    // draws the masks the uninterrupted one drew.
    for dropout in [0.0, 0.1] {
        resumes_bit_for_bit(TrainSpec { dropout, ..spec() });
    }
}

fn resumes_bit_for_bit(s: TrainSpec) {
    let m = model();
    let ex = data(&m);
    let run = |dir: &std::path::Path, stop_after: Option<usize>| {
        let ctl = Control::default();
        let mut losses = Vec::new();
        let c = ctl.clone();
        let out = trainer::train(&m, &s, &ex, &[], dir, &ctl, &mut |e| {
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
        let weights = match out {
            Outcome::Finished(v) => Some(v.tensors()),
            Outcome::Cancelled => None,
        };
        (losses, weights)
    };
    let full_dir = tempfile::tempdir().expect("dir");
    let (full, full_w) = run(full_dir.path(), None);
    let dir = tempfile::tempdir().expect("dir");
    let (first, _) = run(dir.path(), Some(4));
    assert_eq!(first.last().map(|x| x.0), Some(4));
    let (rest, rest_w) = run(dir.path(), None);
    // Checkpoints every 2 steps: the resumed run continues from step 4, not from 0.
    assert_eq!(rest.first().map(|x| x.0), Some(5));
    assert_eq!(rest.len(), full.len() - 4);
    for (a, b) in rest.iter().zip(&full[4..]) {
        assert_eq!(a.0, b.0);
        assert_eq!(
            a.1.to_bits(),
            b.1.to_bits(),
            "dropout {}: step {}: {} vs {}",
            s.dropout,
            a.0,
            a.1,
            b.1
        );
    }
    let (full_w, rest_w) = (full_w.expect("finished"), rest_w.expect("finished"));
    for (name, t) in &full_w {
        let a: Vec<f32> = t.flatten_all().expect("flat").to_vec1().expect("vec");
        let b: Vec<f32> = rest_w[name]
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec");
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "dropout {}: {name} differs after resume",
            s.dropout
        );
    }
}

/// The base projections are frozen: backward computes no gradient of their weights (candle's
/// own matmul would compute `x^T g` for the transposed weight and store it, a whole matmul
/// per projection thrown away). No gradient in the store has a base weight's shape.
#[test]
fn backward_computes_no_gradient_for_the_frozen_base_weights() {
    let m = model();
    let s = spec();
    let vars = LoraVars::init(
        &Device::Cpu,
        m.config(),
        None,
        &s.modules(),
        4,
        8.0,
        false,
        0.0,
        1,
    )
    .expect("vars");
    for v in vars.vars() {
        let t = Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).expect("randn");
        v.set(&t).expect("set");
    }
    // Three rows: no activation is shaped like a weight.
    let ids = Tensor::from_vec(vec![5u32, 9, 11], (1, 3), &Device::Cpu).expect("ids");
    let h = m.llama.forward_hidden(&ids, Some(&vars)).expect("forward");
    let grads = h.sum_all().expect("sum").backward().expect("backward");
    let mut weight_shapes = std::collections::HashSet::new();
    for l in &m.llama.weights.layers {
        for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
            let (out, inp) = (lin.out_features(), lin.in_features());
            weight_shapes.insert(vec![inp, out]);
            weight_shapes.insert(vec![out, inp]);
        }
    }
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in &ids {
        let g = grads.get_id(*id).expect("grad");
        assert!(
            !weight_shapes.contains(g.dims()),
            "a gradient of shape {:?}: a base weight's",
            g.dims()
        );
    }
    for v in vars.vars() {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "the LoRA vars get theirs"
        );
    }
}

/// A run keeps only its newest checkpoints, each no larger than the quota holds for it.
#[test]
fn a_run_keeps_its_newest_checkpoints_only() {
    let m = model();
    let ex = data(&m);
    let s = TrainSpec {
        checkpoint_every: 1,
        ..spec()
    };
    let dir = tempfile::tempdir().expect("dir");
    let ctl = Control {
        keep_checkpoints: 2,
        ..Control::default()
    };
    let mut last = 0;
    trainer::train(&m, &s, &ex, &[], dir.path(), &ctl, &mut |e| {
        if let TrainEvent::Step { step, .. } = e {
            last = step;
        }
    })
    .expect("train");
    assert!(last >= 4, "{last} steps");
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    let mut want = vec![
        format!("checkpoint-{last}.safetensors"),
        format!("checkpoint-{}.safetensors", last - 1),
    ];
    want.sort();
    assert_eq!(files, want);
    let held = trainer::checkpoint_bytes(s.adapter_bytes(m.config()));
    for f in &files {
        let size = std::fs::metadata(dir.path().join(f)).expect("meta").len();
        assert!(size <= held, "{f}: {size} bytes, {held} held");
    }
}

/// A GGUF model holds its packed blocks, not f32 weights: serving (a prompt longer than the
/// packed-kernel short-prompt limit, then decode) leaves no f32 copy held; the training forward
/// keeps one while a job holds the weights in use, and the last holder's end drops it.
#[test]
fn f32_weights_are_made_for_training_only_and_dropped_after_it() {
    use graft_server::model::{
        tiny::{write_tiny_gguf, TinySpec},
        BaseModel, Module,
    };
    // Its own model: no other test moves what this one's weights hold.
    let dir = tempfile::tempdir().expect("dir");
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, &TinySpec::default()).expect("tiny");
    let m = BaseModel::load(&p, &Device::Cpu).expect("load");
    let w = &m.llama.weights;
    assert!(w.tied(), "the tiny model's head is its embedding");
    let dense: usize = std::iter::once(&w.embed)
        .chain(w.layers.iter().flat_map(|l| Module::ALL.map(|m| m.of(l))))
        .map(|l| l.out_features() * l.in_features() * 4)
        .sum();
    let served = w.resident_bytes();

    let vocab = m.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % vocab).collect();
    assert!(prompt.len() > graft_server::engine::PACKED_PROMPT_TOKENS);
    let (_, tokens) = common::greedy(&m, None, &prompt, 4);
    assert_eq!(tokens.len(), 4);
    assert_eq!(w.resident_bytes(), served, "serving left f32 weights held");

    let (a, b) = (w.dense_in_use(), w.dense_in_use());
    let ids = Tensor::from_slice(&prompt, (1, prompt.len()), &Device::Cpu).expect("ids");
    m.llama.forward_hidden(&ids, None).expect("forward");
    assert_eq!(
        w.resident_bytes(),
        served + dense,
        "the training forward keeps them"
    );
    drop(a);
    assert_eq!(w.resident_bytes(), served + dense, "one holder is left");
    drop(b);
    assert_eq!(
        w.resident_bytes(),
        served,
        "the last holder's end drops them"
    );
}
