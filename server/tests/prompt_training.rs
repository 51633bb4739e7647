//! Training the prompt family on the tiny model: every method's gradients match finite
//! differences, training lowers the loss, the exported adapter serves exactly what was
//! trained (the serving forward with the compiled prefix equals the training forward), and a
//! killed run resumes bit for bit.

mod common;

use common::{
    max_abs_diff, plain_last_logits, served_last_logits, tiny as model, toy_examples as data,
};
use graft_server::{
    adapters::formats,
    model::adapter::TensorAdapter,
    train::{
        dataset::Tokenized,
        methods::{Encoder, MethodSpec, PromptInit},
        optim, trainable,
        trainer::{self, Control, Outcome, TrainEvent, TrainSpec},
    },
};

fn methods() -> Vec<MethodSpec> {
    vec![
        MethodSpec::PromptTuning {
            num_virtual_tokens: 5,
            init: PromptInit::Random,
        },
        MethodSpec::PromptTuning {
            num_virtual_tokens: 5,
            init: PromptInit::Text {
                text: "answer briefly".into(),
            },
        },
        MethodSpec::PromptTuning {
            num_virtual_tokens: 5,
            init: PromptInit::Vocab,
        },
        MethodSpec::PTuning {
            num_virtual_tokens: 5,
            encoder: Encoder::Mlp,
            encoder_hidden_size: 16,
            encoder_num_layers: 2,
        },
        MethodSpec::PTuning {
            num_virtual_tokens: 5,
            encoder: Encoder::Lstm,
            encoder_hidden_size: 8,
            encoder_num_layers: 2,
        },
        MethodSpec::PrefixTuning {
            num_virtual_tokens: 5,
            encoder_hidden_size: 16,
        },
        MethodSpec::PTuningV2 {
            num_virtual_tokens: 5,
        },
    ]
}

fn spec(method: MethodSpec) -> TrainSpec {
    TrainSpec {
        method,
        rank: 0,
        alpha: 0.0,
        dropout: 0.0,
        targets: vec![],
        use_rslora: false,
        use_dora: false,
        epochs: 4,
        batch_size: 4,
        grad_accum: 1,
        learning_rate: 3e-2,
        schedule: graft_server::train::optim::Schedule::Constant,
        warmup_steps: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_seq_len: 64,
        seed: 5,
        eval_every: 0,
        patience: 0,
        checkpoint_every: 2,
        objective: Default::default(),
        train_lm_head: false,
    }
}

#[test]
fn prompt_method_gradients_match_finite_differences() {
    let m = model();
    let ex = data(&m);
    let batch: Vec<&Tokenized> = ex.iter().take(3).collect();
    for method in methods() {
        let vars = trainable::init(&m, &spec(method.clone())).expect("init");
        let names = vars.names();
        let all = vars.vars();
        let grads = {
            let l = trainer::plain_loss_tensor(&m, vars.as_ref(), &batch).expect("loss");
            optim::collect(&l.backward().expect("backward"), &all).expect("grads")
        };
        assert_eq!(all.len(), grads.len());
        for (vi, (v, g)) in all.iter().zip(&grads).enumerate() {
            let (gk, fd) = common::largest_gradient_vs_fd(v, g, || {
                trainer::plain_loss(&m, vars.as_ref(), &batch).expect("loss")
            });
            assert!(gk != 0.0, "{method:?}: {} has no gradient", names[vi]);
            let rel = (fd - gk).abs() / gk.abs().max(1e-3);
            assert!(
                rel < 0.05,
                "{method:?}: {}: autograd {gk} vs finite difference {fd}",
                names[vi]
            );
        }
    }
}

/// Trains, then serves the export: the serving forward (compiled KV prefix, paged cache)
/// gives the logits the training forward gives with the trained parameters.
#[test]
fn every_prompt_method_learns_and_its_export_serves_what_was_trained() {
    let m = model();
    let ex = data(&m);
    for method in methods() {
        let s = spec(method.clone());
        let dir = tempfile::tempdir().expect("dir");
        let mut losses = Vec::new();
        let out = trainer::train(
            &m,
            &s,
            &ex,
            &[],
            dir.path(),
            &Control::default(),
            &mut |e| {
                if let TrainEvent::Step { train_loss, .. } = e {
                    losses.push(train_loss)
                }
            },
        )
        .expect("train");
        let Outcome::Finished(vars) = out else {
            panic!("not finished")
        };
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < 0.8 * first, "{method:?}: loss {first} -> {last}");
        // The quota's sizes are what is stored and what is trained.
        let parsed = vars.export().expect("export");
        let stored: usize = parsed.prompt.as_ref().map_or(0, Vec::len)
            + parsed.adapter.prefix.as_ref().map_or(0, |p| p.bytes() / 4);
        assert_eq!(s.adapter_bytes(m.config()), 4 * stored as u64, "{method:?}");
        let trained: usize = vars.vars().iter().map(|v| v.elem_count() * 4).sum();
        assert_eq!(s.trainable_bytes(m.config()), trained as u64, "{method:?}");
        let (c, w) = formats::write(&parsed, m.config(), &m.name).expect("write");
        let back = formats::parse(
            &c,
            &w,
            m.config(),
            &m.name,
            &formats::ImportPolicy {
                max_rank: 8,
                max_virtual_tokens: 8,
                force: true,
                base_aliases: vec![],
            },
        )
        .expect("parse back");
        assert_eq!(back.details, parsed.details);
        let served = back.compile(&m.llama).expect("compile");
        let prompt = &ex[0].ids;
        let want = plain_last_logits(&m, prompt, Some(vars.as_ref() as &dyn TensorAdapter));
        assert!(served.prefix.is_some(), "{method:?}: a prefix");
        let got = served_last_logits(&m, &served, prompt);
        let d = max_abs_diff(&want, &got);
        assert!(
            d < 1e-3,
            "{method:?}: served logits differ from trained by {d}"
        );
    }
}

#[test]
fn a_killed_prompt_method_run_resumes_bit_for_bit() {
    let m = model();
    let ex = data(&m);
    for method in [methods()[4].clone(), methods()[5].clone()] {
        common::assert_resumes_bit_for_bit(&m, &spec(method.clone()), &ex, &format!("{method:?}"));
    }
}
