//! Learning like PEFT, step by step, on the real model: started from the parameters PEFT
//! drew for a fixture's training run and fed that run's batches in its order
//! (`tests/fixtures/library-start/<method>/`, written by `bench/peers/peft_learning.py
//! --dump`), graft's training losses are the fixture's recorded PEFT losses
//! (`reference.json`) over the first 4-5 steps, to a few thousandths: the same loss, the same
//! gradients and the same AdamW update, not merely the same forward (a learning rate 10 %
//! off already misses at step 2). Later steps drift apart as two PEFT runs of the same
//! recipe do under another float order; BENCHMARKS.md has the whole curves.

mod common;

use std::sync::Arc;

use candle_core::Device;
use common::{fixtures, json, model};
use graft_server::{
    model::ChatMessage,
    train::{
        dataset::{parse_jsonl, tokenize, Overflow},
        methods::{MethodSpec, PromptInit},
        trainer::{self, Control, TrainEvent, TrainSpec},
    },
};

/// Runs the fixture's recipe from PEFT's start for `steps` steps and compares each step's
/// loss with PEFT's.
fn like_peft(method: &str, spec: MethodSpec, steps: usize, tol: f64) {
    let m = model();
    let start = fixtures().join("library-start").join(method);
    let r = json(
        fixtures()
            .join("peft-methods")
            .join(method)
            .join("reference.json"),
    );
    let t = &r["training"];
    let peft: Vec<f64> = t["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|x| x.as_f64().expect("loss"))
        .collect();
    let seed = t["seed"].as_u64().expect("seed");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(fixtures().join("peft-lora-smollm2/train_dataset_alpaca.json"))
            .expect("dataset"),
    )
    .expect("json");
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let render = |msgs: &[ChatMessage], g: bool| m.chat.render(msgs, g);
    let (ex, _) = parse_jsonl(&text, None, &render).expect("parse");
    let (data, _) = tokenize(&ex, &m.tokenizer, 512, Overflow::Truncate).expect("tokenize");
    let batches = json(start.join("batches.json"));
    let wanted: Vec<usize> = batches
        .as_array()
        .expect("batches")
        .iter()
        .take(steps)
        .flat_map(|b| b.as_array().expect("batch").iter())
        .map(|i| i.as_u64().expect("row") as usize)
        .collect();
    let values = candle_core::safetensors::load(start.join("start.safetensors"), &Device::Cpu)
        .expect("start");
    let spec = TrainSpec {
        method: spec,
        epochs: 1,
        batch_size: t["batch"].as_u64().expect("batch") as usize,
        learning_rate: t["lr"].as_f64().expect("lr"),
        schedule: graft_server::train::optim::Schedule::Constant,
        warmup_steps: 0,
        // torch.optim.AdamW's defaults: weight decay 0.01, no clipping.
        weight_decay: 0.01,
        max_grad_norm: 0.0,
        seed,
        checkpoint_every: 1_000_000,
        ..TrainSpec::default()
    };
    let ctl = Control {
        start_values: Some(Arc::new(values)),
        ..Control::default()
    };
    let dir = tempfile::tempdir().expect("dir");
    let mut losses = Vec::new();
    trainer::train(
        &m,
        &spec,
        &trainer::in_epoch_order(&data, &wanted, seed),
        &[],
        dir.path(),
        &ctl,
        &mut |e| {
            if let TrainEvent::Step { train_loss, .. } = e {
                losses.push(train_loss);
            }
        },
    )
    .expect("train");
    assert_eq!(losses.len(), steps);
    for (i, (g, p)) in losses.iter().zip(&peft).enumerate() {
        assert!(
            (g - p).abs() < tol,
            "{method} step {}: graft {g:.4}, PEFT {p:.4} (graft {losses:.3?}, PEFT {:.3?})",
            i + 1,
            &peft[..steps]
        );
    }
}

#[test]
fn prompt_tuning_learns_as_peft_does() {
    let spec = MethodSpec::PromptTuning {
        num_virtual_tokens: 8,
        init: PromptInit::Random,
    };
    like_peft("prompt-tuning", spec, 5, 3e-3);
}

/// The prefix's keys are trained in the model's head layout, PEFT's in HF's: the same
/// start (permuted) gives the same steps.
#[test]
fn p_tuning_v2_learns_as_peft_does() {
    let spec = MethodSpec::PTuningV2 {
        num_virtual_tokens: 8,
    };
    like_peft("p-tuning-v2", spec, 4, 6e-3);
}

#[test]
fn ia3_learns_as_peft_does() {
    let spec = MethodSpec::Ia3 {
        target_modules: vec!["k_proj".into(), "v_proj".into(), "down_proj".into()],
        feedforward_modules: vec!["down_proj".into()],
    };
    like_peft("ia3", spec, 4, 3e-3);
}
