//! Training IA3, DoRA and bottleneck adapters on the tiny model: every variable's gradient
//! matches finite differences (DoRA with and without dropout, bottlenecks in every
//! placement and with their own layer norms), training lowers the loss, the quota's sizes
//! are what is stored and trained, the exported files serve exactly what was trained, and a
//! killed run resumes bit for bit.

mod common;

use candle_core::{Device, Tensor};
use common::{
    max_abs_diff, plain_last_logits, served_last_logits, tiny as model, toy_examples as data,
};
use graft_server::{
    adapters::formats::{self, BnSettings},
    model::{adapter::TensorAdapter, Module},
    train::{
        dataset::Tokenized,
        methods::MethodSpec,
        optim, trainable,
        trainer::{self, Control, Outcome, TrainEvent, TrainSpec},
    },
};

/// [`common::lora_spec`] for `method`, 4 epochs at a constant rate, seed 5; rsLoRA with
/// DoRA and dropout.
fn spec(method: MethodSpec, use_dora: bool, dropout: f32) -> TrainSpec {
    TrainSpec {
        method,
        dropout,
        use_rslora: use_dora && dropout > 0.0,
        use_dora,
        epochs: 4,
        schedule: graft_server::train::optim::Schedule::Constant,
        warmup_steps: 0,
        seed: 5,
        ..common::lora_spec()
    }
}

fn bottleneck(f: impl FnOnce(&mut BnSettings)) -> MethodSpec {
    let mut s = BnSettings::houlsby("graft");
    s.reduction_factor = 8.0;
    f(&mut s);
    MethodSpec::Bottleneck {
        settings: s,
        bottleneck_size: None,
    }
}

fn specs() -> Vec<(&'static str, TrainSpec)> {
    let ia3 = |t: &[&str], f: &[&str]| MethodSpec::Ia3 {
        target_modules: t.iter().map(|s| s.to_string()).collect(),
        feedforward_modules: f.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        (
            "ia3",
            spec(
                ia3(&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
                false,
                0.0,
            ),
        ),
        (
            "ia3 all modules",
            spec(
                ia3(
                    &[
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ],
                    &["up_proj", "down_proj"],
                ),
                false,
                0.0,
            ),
        ),
        ("dora", spec(MethodSpec::Lora, true, 0.0)),
        ("dora rslora dropout", spec(MethodSpec::Lora, true, 0.1)),
        ("houlsby", spec(bottleneck(|_| {}), false, 0.0)),
        (
            "pfeiffer relu",
            spec(
                bottleneck(|s| {
                    s.after_attention = false;
                    s.original_ln_before = true;
                    s.non_linearity = "relu".into();
                }),
                false,
                0.0,
            ),
        ),
        (
            "per-layer width, a layer left out",
            spec(
                bottleneck(|s| {
                    s.layer_reduction.insert("0".into(), 4.0);
                    s.leave_out = vec![1];
                    s.after_attention = false;
                }),
                false,
                0.0,
            ),
        ),
        (
            "own layer norms gelu",
            spec(
                bottleneck(|s| {
                    s.ln_before = true;
                    s.ln_after = true;
                    s.adapter_residual_before_ln = true;
                    s.non_linearity = "gelu".into();
                    s.scaling = 0.5;
                }),
                false,
                0.0,
            ),
        ),
    ]
}

#[test]
fn weight_method_gradients_match_finite_differences() {
    let m = model();
    let ex = data(&m);
    let batch: Vec<&Tokenized> = ex.iter().take(3).collect();
    for (what, s) in specs() {
        let mut vars = trainable::init(&m, &s).expect("init");
        vars.set_train(true);
        vars.set_dropout_seed(11);
        // Move every variable off its initial value first, so no gradient is zero by
        // symmetry (B = 0 at init, IA3 at one...).
        for v in vars.vars() {
            let n = v.elem_count();
            let x: Vec<f32> = v.flatten_all().expect("f").to_vec1().expect("v");
            let jitter: Vec<f32> = x
                .iter()
                .enumerate()
                .map(|(i, x)| x + 0.05 * ((i * 7919 % 97) as f32 / 97.0 - 0.5))
                .collect();
            assert_eq!(jitter.len(), n);
            v.set(&Tensor::from_vec(jitter, v.shape(), &Device::Cpu).expect("t"))
                .expect("set");
        }
        let names = vars.names();
        let all = vars.vars();
        let grads = {
            let l = trainer::plain_loss_tensor(&m, vars.as_ref(), &batch).expect("loss");
            optim::collect(&l.backward().expect("backward"), &all).expect("grads")
        };
        assert_eq!(all.len(), grads.len());
        // Every kind of variable (the name's last part) in the first and last layer.
        let mut checked = std::collections::BTreeSet::new();
        for (vi, (v, g)) in all.iter().zip(&grads).enumerate() {
            let kind = names[vi].rsplit_once('.').map_or("", |x| x.1).to_string();
            if !names[vi].starts_with("0.") && !names[vi].starts_with("1.") {
                continue;
            }
            let flat: Vec<f32> = g.flatten_all().expect("flat").to_vec1().expect("vec");
            let base: Vec<f32> = v.flatten_all().expect("flat").to_vec1().expect("vec");
            let (k, gk) = flat
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .map(|(k, g)| (k, *g))
                .expect("non-empty");
            assert!(gk != 0.0, "{what}: {} has no gradient", names[vi]);
            let eps = 2e-3f32;
            // DoRA's norm ||W + sBA|| is detached from the graph (as PEFT and the paper do):
            // the function autograd differentiates in A and B holds the gain m / norm fixed,
            // so the finite difference rescales m to keep it.
            let dora = (s.use_dora && (kind == "a" || kind == "b")).then(|| {
                let (a, b, mag) = if kind == "a" {
                    (vi, vi + 1, vi + 2)
                } else {
                    (vi - 1, vi, vi + 1)
                };
                let mut parts = names[vi].split('.');
                let li: usize = parts.next().expect("layer").parse().expect("layer");
                let module = Module::from_hf_name(parts.next().expect("module")).expect("module");
                let w = module
                    .of(&m.llama.weights.layers[li])
                    .weight()
                    .expect("weight");
                let scale = if s.use_rslora {
                    s.alpha / (s.rank as f64).sqrt()
                } else {
                    s.alpha / s.rank as f64
                };
                (a, b, mag, w, scale)
            });
            let norm = |(a, b, _, w, scale): &(usize, usize, usize, Tensor, f64)| {
                let ba = (all[*b].matmul(&all[*a]).expect("ba") * *scale).expect("s");
                (w + ba)
                    .expect("w")
                    .sqr()
                    .expect("sq")
                    .sum(1)
                    .expect("sum")
                    .sqrt()
                    .expect("sqrt")
            };
            let n0 = dora.as_ref().map(norm);
            let m0 = dora
                .as_ref()
                .map(|d| all[d.2].as_tensor().copy().expect("copy"));
            let at = |d: f32| {
                let mut x = base.clone();
                x[k] += d;
                v.set(&Tensor::from_vec(x, v.shape(), &Device::Cpu).expect("t"))
                    .expect("set");
                if let (Some(dv), Some(n0), Some(m0)) = (&dora, &n0, &m0) {
                    let kept = ((m0 * norm(dv)).expect("mul") / n0).expect("div");
                    all[dv.2].set(&kept).expect("set magnitude");
                }
                trainer::plain_loss(&m, vars.as_ref(), &batch).expect("loss")
            };
            let (lp, lm) = (at(eps), at(-eps));
            at(0.0);
            let fd = ((lp - lm) / (2.0 * eps as f64)) as f32;
            // The f32 loss bounds the finite difference's precision to about 1e-4 here.
            let rel = (fd - gk).abs() / gk.abs().max(1e-2);
            assert!(
                rel < 0.05,
                "{what}: {}: autograd {gk} vs finite difference {fd}",
                names[vi]
            );
            checked.insert(kind);
        }
        eprintln!("{what}: checked {checked:?}");
        assert!(
            checked.len() >= 2 || what.starts_with("ia3"),
            "{what}: {checked:?}"
        );
    }
}

/// Trains, then serves the export: the serving forward (per-row hooks, paged cache) gives
/// the logits the training forward gives with the trained parameters.
#[test]
fn every_weight_method_learns_and_its_export_serves_what_was_trained() {
    let m = model();
    let ex = data(&m);
    for (what, s) in specs() {
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
        let Outcome::Finished(mut vars) = out else {
            panic!("not finished")
        };
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        assert!(last < 0.9 * first, "{what}: loss {first} -> {last}");
        let parsed = vars.export().expect("export");
        let (c, w) = formats::write(&parsed, m.config(), &m.name).expect("write");
        let tensor_bytes: usize = safetensors::SafeTensors::deserialize(&w)
            .expect("st")
            .tensors()
            .iter()
            .map(|(_, t)| t.data().len())
            .sum();
        assert_eq!(s.adapter_bytes(m.config()), tensor_bytes as u64, "{what}");
        let trained: usize = vars.vars().iter().map(|v| v.elem_count() * 4).sum();
        assert_eq!(s.trainable_bytes(m.config()), trained as u64, "{what}");
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
        assert_eq!(back.details, parsed.details, "{what}");
        let served = back.compile(&m.llama).expect("compile");
        let prompt = &ex[0].ids;
        vars.set_train(false);
        let want = plain_last_logits(&m, prompt, Some(vars.as_ref() as &dyn TensorAdapter));
        let base = plain_last_logits(&m, prompt, None);
        let got = served_last_logits(&m, &served, prompt);
        let d = max_abs_diff(&want, &got);
        assert!(d < 1e-3, "{what}: served logits differ from trained by {d}");
        assert!(
            max_abs_diff(&want, &base) > 1e-2,
            "{what}: training changed nothing"
        );
    }
}

#[test]
fn a_killed_weight_method_run_resumes_bit_for_bit() {
    let m = model();
    let ex = data(&m);
    let all = specs();
    for (what, s) in [&all[0], &all[3], &all[4]] {
        common::assert_resumes_bit_for_bit(&m, s, &ex, what);
    }
}
