//! The form the GPU build holds the weights in (`--device cuda:N`: every linear layer as
//! bf16 on the device, [`Weights::placed`]), run here on the CPU: the very code the GPU
//! runs (rows sent to the weight's device, cast to bf16 for the matmul and back), with only
//! the device different. The serving path over those weights must agree with the plain path
//! over them, with and without a LoRA, and with the f32 model within bf16's rounding.

mod common;

use std::{path::PathBuf, sync::OnceLock};

use candle_core::{DType, Device};
use graft_server::{
    adapters::{
        formats::{self, ImportPolicy},
        testing::random_lora,
    },
    model::{adapter::TensorAdapter, Adapter, BaseModel, Llama, Module},
    train::{
        methods::MethodSpec,
        spec::Objective,
        trainer::{self, Control, Outcome, TrainEvent, TrainSpec},
    },
};

use common::{greedy, log_softmax, max_abs_diff, plain_last_logits, tiny, top_k};

/// The tiny model with its weights placed as the GPU build places them, in bf16.
fn tiny_bf16() -> BaseModel {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("graft-device-{}.gguf", std::process::id()));
        graft_server::model::tiny::write_tiny_gguf(&p, &Default::default()).expect("tiny");
        p
    });
    bf16(BaseModel::load(path, &Device::Cpu).expect("load"))
}

/// `m` with its weights placed as the GPU build places them (bf16), on the CPU.
fn bf16(mut m: BaseModel) -> BaseModel {
    let placed = m
        .llama
        .weights
        .placed(&Device::Cpu, DType::BF16)
        .expect("placed");
    m.llama = Llama::new(m.llama.cfg.clone(), placed, Device::Cpu).expect("llama");
    // Every test here runs this form: fail loudly if placing left the f32 or packed one.
    let q = m.llama.weights.layers[0].q.weight().expect("q");
    assert_eq!(q.dtype(), DType::BF16, "weights placed as bf16");
    m
}

#[test]
fn placed_weights_are_bf16_tensors_and_a_tied_head_stays_tied() {
    let f32m = tiny();
    let m = tiny_bf16();
    let (w, w0) = (&m.llama.weights, &f32m.llama.weights);
    assert_eq!(w.tied(), w0.tied());
    for l in &w.layers {
        for module in Module::ALL {
            let t = module.of(l).weight().expect("weight");
            assert_eq!(t.dtype(), DType::BF16, "{module:?}");
        }
        assert_eq!(l.attn_norm.dtype(), DType::F32);
    }
    assert_eq!(w.embed.weight().expect("embed").dtype(), DType::BF16);
    // The same values, rounded to bf16.
    let a = w.layers[0]
        .q
        .weight()
        .expect("q")
        .to_dtype(DType::F32)
        .expect("f32");
    let b = w0.layers[0].q.weight().expect("q");
    let d = (a - &b)
        .expect("sub")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max");
    let scale = b.abs().expect("abs").max_all().expect("max");
    let (d, scale) = (
        d.to_scalar::<f32>().expect("d"),
        scale.to_scalar::<f32>().expect("s"),
    );
    assert!(d > 0.0 && d <= scale / 128.0, "rounding {d} of {scale}");
}

/// Greedy tokens through the plain path, one full forward a step (as the GPU check's
/// PyTorch side runs them).
fn plain_greedy(
    m: &BaseModel,
    a: Option<&dyn TensorAdapter>,
    prompt: &[u32],
    n: usize,
) -> (Vec<f32>, Vec<u32>) {
    let mut ids = prompt.to_vec();
    let mut first = None;
    for _ in 0..n {
        let row = plain_last_logits(m, &ids, a);
        ids.push(top_k(&row, 1)[0]);
        first.get_or_insert(row);
    }
    (first.expect("logits"), ids[prompt.len()..].to_vec())
}

#[test]
fn the_serving_path_on_bf16_weights_matches_the_plain_path_with_and_without_a_lora() {
    let m = tiny_bf16();
    let lora: Adapter = random_lora(&m, 5, 8, 0.3);
    let prompts: [Vec<u32>; 2] = [vec![3, 17, 42, 99, 7], (10..40).collect()];
    for prompt in &prompts {
        for (name, a) in [("base", None), ("lora", Some(&lora))] {
            let (served, served_ids) = greedy(&m, a, prompt, 12);
            let (plain, plain_ids) =
                plain_greedy(&m, a.map(|a| a as &dyn TensorAdapter), prompt, 12);
            let d = max_abs_diff(&log_softmax(&served), &log_softmax(&plain));
            eprintln!("{name}, {} tokens: served vs plain {d}", prompt.len());
            // Every projection's output is rounded to bf16 (8 bits) on both paths, but the
            // serving path pads prompts to whole 16-row tiles, so the GEMM may sum in
            // another order: one bf16 step apart here and there.
            assert!(d < 0.15, "{name}: {d}");
            assert_eq!(served_ids, plain_ids, "{name}: greedy tokens");
        }
    }
}

#[test]
fn bf16_weights_give_the_f32_models_logits_within_rounding() {
    let (f32m, m) = (tiny(), tiny_bf16());
    let prompt: Vec<u32> = (20..52).collect();
    let (want, _) = greedy(&f32m, None, &prompt, 1);
    let (got, _) = greedy(&m, None, &prompt, 1);
    let d = max_abs_diff(&log_softmax(&want), &log_softmax(&got));
    let range = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    eprintln!("bf16 vs f32: {d} (largest logit {range})");
    // Not the same numbers (the weights and every projection's output were rounded to
    // bf16's 8 bits), but the same ranking at the top and close values: on this random
    // model, 0.31 of logits up to 9.9.
    assert_eq!(top_k(&want, 3), top_k(&got, 3));
    assert!(d > 0.0 && d < 0.05 * range, "{d} of {range}");
}

/// LoRA SFT of the whole toy set per step (`batch_size` examples), 30 epochs at 3e-2.
fn lora_sft(batch_size: usize) -> TrainSpec {
    TrainSpec {
        epochs: 30,
        batch_size,
        learning_rate: 3e-2,
        checkpoint_every: 0,
        ..common::lora_spec()
    }
}

/// LoRA SFT over the bf16 weights, as a GPU trains it (f32 adapter and optimizer, the
/// frozen base in bf16; the cast matmul's backward): the first step's loss is the plain
/// forward's over those weights and the loss falls.
#[test]
fn lora_trains_over_bf16_weights() {
    let m = tiny_bf16();
    let ex = common::toy_examples(&m);
    let spec = lora_sft(ex.len());
    let dir = tempfile::tempdir().expect("dir");
    let mut losses = Vec::new();
    let out = trainer::train(
        &m,
        &spec,
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
    assert!(vars.vars().iter().all(|v| v.dtype() == DType::F32));
    let all: Vec<&_> = ex.iter().collect();
    let base = graft_server::train::trainable::init(&m, &spec).expect("fresh vars");
    let plain = trainer::plain_loss(&m, base.as_ref(), &all).expect("plain");
    assert!(
        (losses[0] - plain).abs() < 1e-4,
        "first step {} vs plain {plain}",
        losses[0]
    );
    let last = *losses.last().expect("steps");
    assert!(last < losses[0] * 0.5, "loss {} -> {last}", losses[0]);
}

/// What a GPU does not train yet is named (CreateJob on `--device cuda:N` fails with it).
#[test]
fn the_spec_says_what_trains_on_the_cpu_only() {
    let lora = lora_sft(4);
    assert_eq!(lora.cpu_only(), None);
    let dora = TrainSpec {
        use_dora: true,
        ..lora_sft(4)
    };
    assert_eq!(dora.cpu_only(), None);
    let head = TrainSpec {
        train_lm_head: true,
        ..lora_sft(4)
    };
    assert_refused(&head, "train_lm_head", "a trained LM head");
    let ia3 = TrainSpec {
        method: MethodSpec::Ia3 {
            target_modules: vec!["k_proj".into()],
            feedforward_modules: vec![],
        },
        ..lora_sft(4)
    };
    assert_refused(&ia3, "method", "this method");
    let cls = TrainSpec {
        objective: Objective::Classification {
            labels: vec!["a".into(), "b".into()],
        },
        ..lora_sft(4)
    };
    assert_refused(&cls, "objective", "this objective");
}

fn assert_refused(spec: &TrainSpec, field: &str, what: &str) {
    let (f, refusal) = spec.cpu_only().expect("refused on a GPU");
    assert_eq!(f, field);
    assert_eq!(
        refusal,
        format!("{what} trains on the CPU only; on a GPU graftd trains LoRA (and DoRA) with the SFT objective")
    );
}

/// Every adapter method's fixture served over the real model's weights placed as bf16 (as
/// `--device cuda:N` holds them; the row hooks, KV prefixes and DoRA's norms are the CPU's
/// code there too): the libraries' top-1 everywhere, and their top-20 log-probabilities
/// within bf16's rounding. (Measured: 0.12-0.39; the f32 path is within 1e-3. Every
/// projection's input and output is rounded to bf16's 8 bits, and the base's weights too,
/// which PyTorch in bf16 does as well, and more.)
#[test]
fn every_method_fixture_serves_over_bf16_weights() {
    let m = bf16(common::load_model());
    let policy = ImportPolicy {
        max_rank: 64,
        max_virtual_tokens: 128,
        force: false,
        base_aliases: vec!["HuggingFaceTB/SmolLM2-135M-Instruct".into()],
    };
    let mut worst_all = 0f32;
    for (folder, weights) in [
        ("peft-methods/prompt-tuning", "adapter_model.safetensors"),
        ("peft-methods/prefix-tuning", "adapter_model.safetensors"),
        ("peft-methods/p-tuning-v2", "adapter_model.safetensors"),
        ("peft-methods/ia3", "adapter_model.safetensors"),
        ("peft-methods/dora", "adapter_model.safetensors"),
        ("bottleneck-houlsby", "adapter.safetensors"),
    ] {
        let dir = common::fixtures().join(folder);
        let a = dir.join("adapter");
        let c = std::fs::read(a.join("adapter_config.json")).expect("config");
        let w = std::fs::read(a.join(weights)).expect("weights");
        let adapter = formats::parse(&c, &w, m.config(), &m.name, &policy)
            .expect("parse")
            .compile(&m.llama)
            .expect("compile");
        let r = common::json(dir.join("reference.json"));
        let refs =
            candle_core::safetensors::load(dir.join("reference_logits.safetensors"), &Device::Cpu)
                .expect("reference logits");
        for (i, p) in r["prompts"].as_array().expect("prompts").iter().enumerate() {
            let prompt = common::ids(&p["token_ids"]);
            let want: Vec<f32> = refs[&format!("prompt{i}.adapted")]
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .expect("reference");
            let (got, _) = greedy(&m, Some(&adapter), &prompt, 1);
            let what = format!("{folder} prompt {i}");
            let worst = common::check_against(&want, &got, 0.5, &what);
            worst_all = worst_all.max(worst);
        }
    }
    assert!(worst_all > 1e-3 && worst_all < 0.5, "{worst_all}");
}
