//! A replaced LM head (PEFT's `modules_to_save: ["lm_head"]`, the whole output layer saved
//! beside a LoRA adapter) on the tiny model: written and read back as PEFT's files bit for
//! bit, served through its own output layer with the logits the plain path gives, counted
//! at its real size, and in one step beside base, LoRA and classification rows each equal
//! to its solo run; bad tensors refused naming the file.

mod common;

use std::sync::Arc;

use common::{assert_batch_equals_solo, max_abs_diff, served_last_logits, tiny};
use graft_server::{
    adapters::{
        formats::{self, Details, ImportPolicy, Parsed},
        testing::random_lora,
    },
    model::{head::LmHead, Adapter, BaseModel, ClassHead},
};

fn policy() -> ImportPolicy {
    ImportPolicy {
        max_rank: 64,
        max_virtual_tokens: 128,
        force: true,
        base_aliases: vec![],
    }
}

fn lora_details() -> Details {
    Details::Lora {
        rank: 4,
        alpha: 8.0,
        target_modules: common::all_targets(),
        use_rslora: false,
        use_dora: false,
    }
}

/// The base's (tied, dequantised) LM head moved by a deterministic pattern.
fn moved_lm_head(m: &BaseModel) -> LmHead {
    let head = m.llama.weights.lm_head.weight().expect("lm head");
    let w: Vec<Vec<f32>> = head.to_vec2().expect("lm head");
    let hidden = m.config().hidden_size;
    let weight = w
        .concat()
        .iter()
        .enumerate()
        .map(|(i, x)| x + 0.2 * ((i * 7919 % 113) as f32 / 113.0 - 0.5))
        .collect();
    LmHead { weight, hidden }
}

fn with_lm_head(m: &BaseModel) -> Adapter {
    Adapter {
        lm_head: Some(Arc::new(moved_lm_head(m))),
        ..random_lora(m, 3, 4, 0.05)
    }
}

#[test]
fn a_replaced_lm_head_round_trips_and_serves_its_own_logits() {
    let m = tiny();
    let a = with_lm_head(&m);
    let parsed = Parsed {
        details: lora_details(),
        adapter: a.clone(),
        prompt: None,
    };
    let (config, weights) = formats::write(&parsed, m.config(), &m.name).expect("write");
    let cfg: serde_json::Value = serde_json::from_slice(&config).expect("json");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["lm_head"]));
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    let st = safetensors::SafeTensors::deserialize(&weights).expect("st");
    let t = st
        .tensor("base_model.model.lm_head.weight")
        .expect("lm_head");
    assert_eq!(t.shape(), [m.config().vocab_size, m.config().hidden_size]);
    let back = formats::parse(&config, &weights, m.config(), &m.name, &policy())
        .expect("parses")
        .compile(&m.llama)
        .expect("compiles");
    assert_eq!(back.lm_head, a.lm_head, "bit for bit");
    assert!(back.head.is_none());
    // Counted at its real size.
    let lora_only = random_lora(&m, 3, 4, 0.05);
    assert_eq!(
        back.bytes() - lora_only.bytes(),
        m.config().vocab_size * m.config().hidden_size * 4
    );
    // Served through its own output layer: the plain path's logits, not the LoRA's alone.
    let prompt: Vec<u32> = vec![5, 17, 42, 9, 3];
    let served = served_last_logits(&m, &back, &prompt);
    let plain = m.llama.output_reference(&prompt, &back).expect("plain");
    assert_eq!(served.len(), m.config().vocab_size);
    assert!(max_abs_diff(&served, &plain) < 1e-3);
    let without = served_last_logits(&m, &lora_only, &prompt);
    assert!(max_abs_diff(&served, &without) > 0.05);
}

#[test]
fn replaced_lm_head_rows_share_a_step_with_others_and_equal_their_solo_runs() {
    let m = tiny();
    let hidden = m.config().hidden_size;
    let classifier = Adapter {
        head: Some(Arc::new(ClassHead::new(
            (0..3 * hidden).map(|i| (i % 7) as f32 * 0.01).collect(),
            hidden,
        ))),
        ..random_lora(&m, 9, 2, 0.05)
    };
    let adapters = vec![
        None,
        Some(random_lora(&m, 1, 4, 0.05)),
        Some(with_lm_head(&m)),
        Some(with_lm_head(&m)),
    ];
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9], vec![3, 3]];
    assert_batch_equals_solo(&m, &adapters, &prompts, 4);
    // And one step with a classification row too (prefill only): every row equal to its
    // solo step.
    let mut pool = m.llama.kv_pool(4096).expect("KV pool");
    let all: Vec<Option<&Adapter>> = adapters
        .iter()
        .map(Option::as_ref)
        .chain([Some(&classifier)])
        .collect();
    let mut ps = prompts.clone();
    ps.push(vec![2, 4, 6]);
    let mut caches: Vec<_> = all.iter().map(|a| common::seeded(&mut pool, *a)).collect();
    let mut chunks: Vec<_> = caches
        .iter_mut()
        .zip(&ps)
        .zip(&all)
        .map(|((cache, t), a)| graft_server::model::SeqChunk {
            tokens: t,
            cache,
            want_logits: true,
            decode: false,
            adapter: *a,
        })
        .collect();
    let together = m.llama.forward_step(&mut pool, &mut chunks).expect("step");
    assert_eq!(together[4].len(), 3);
    for (i, (a, p)) in all.iter().zip(&ps).enumerate() {
        let solo = match a {
            Some(a) => served_last_logits(&m, a, p),
            None => served_last_logits(&m, &Adapter::new(m.config().num_layers), p),
        };
        let same = together[i]
            .iter()
            .zip(&solo)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "row {i}");
    }
}

#[test]
fn bad_lm_heads_are_refused_naming_the_file() {
    let m = tiny();
    let parsed = Parsed {
        details: lora_details(),
        adapter: with_lm_head(&m),
        prompt: None,
    };
    let (config, weights) = formats::write(&parsed, m.config(), &m.name).expect("write");
    let (v, h) = (m.config().vocab_size, m.config().hidden_size);
    let check = |c: &[u8], w: &[u8], field: &str, want: &str| {
        let e = formats::parse(c, w, m.config(), &m.name, &policy()).expect_err(want);
        assert_eq!(e.field, field, "{e}");
        assert!(e.to_string().contains(want), "{e}");
    };
    let short = common::safetensors_edit(
        &weights,
        |_| true,
        &[(
            "base_model.model.lm_head.weight",
            vec![v - 1, h],
            vec![0.0; (v - 1) * h],
        )],
    );
    check(&config, &short, "adapter_model.safetensors", "LM head is");
    let nan = common::safetensors_edit(
        &weights,
        |_| true,
        &[(
            "base_model.model.lm_head.weight",
            vec![v, h],
            vec![f32::NAN; v * h],
        )],
    );
    check(&config, &nan, "adapter_model.safetensors", "non-finite");
    let missing = common::safetensors_edit(&weights, |n| !n.contains("lm_head"), &[]);
    check(&config, &missing, "adapter_model.safetensors", "holds no");
    let bias = common::safetensors_edit(
        &weights,
        |_| true,
        &[("base_model.model.lm_head.bias", vec![v], vec![0.0; v])],
    );
    check(&config, &bias, "adapter_model.safetensors", "no bias");
    let mut both: serde_json::Value = serde_json::from_slice(&config).expect("json");
    both["modules_to_save"] = serde_json::json!(["lm_head", "score"]);
    check(
        &serde_json::to_vec(&both).expect("json"),
        &weights,
        "adapter_config.json.modules_to_save",
        "one output layer",
    );
}

/// `train_lm_head`: the LM head starts as the base's, its gradient matches finite
/// differences, the run learns, the quota's size is what is stored, and the export parses
/// back and serves the trained logits.
#[test]
fn a_replaced_lm_head_trains_beside_lora_and_serves_what_was_trained() {
    use graft_server::train::{
        methods::MethodSpec,
        optim, trainable,
        trainer::{self, Control, Outcome, TrainSpec},
    };
    let m = tiny();
    let ex = common::toy_examples(&m);
    let s = TrainSpec {
        method: MethodSpec::Lora,
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ["q_proj", "v_proj"].map(String::from).to_vec(),
        use_rslora: false,
        use_dora: false,
        epochs: 3,
        batch_size: 4,
        grad_accum: 1,
        learning_rate: 1e-2,
        schedule: graft_server::train::optim::Schedule::Constant,
        warmup_steps: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        max_seq_len: 64,
        seed: 5,
        eval_every: 0,
        patience: 0,
        checkpoint_every: 100,
        objective: Default::default(),
        train_lm_head: true,
    };
    let vars = trainable::init(&m, &s).expect("init");
    let names = vars.names();
    assert_eq!(names.last().map(String::as_str), Some("lm_head.weight"));
    let all = vars.vars();
    let head = m.llama.weights.lm_head.weight().expect("lm head");
    let base: Vec<Vec<f32>> = head.to_vec2().expect("base");
    let start: Vec<Vec<f32>> = all.last().expect("lm head").to_vec2().expect("start");
    assert_eq!(start, base, "starts as the base's");
    let batch: Vec<_> = ex.iter().take(3).collect();
    let l = trainer::plain_loss_tensor(&m, vars.as_ref(), &batch).expect("loss");
    let grads = optim::collect(&l.backward().expect("backward"), &all).expect("grads");
    let (gk, fd) =
        common::largest_gradient_vs_fd(all.last().expect("lm"), grads.last().expect("g"), || {
            trainer::plain_loss(&m, vars.as_ref(), &batch).expect("loss")
        });
    assert!(gk != 0.0);
    assert!((gk - fd).abs() / gk.abs().max(1e-3) < 0.05, "{gk} vs {fd}");
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
            if let trainer::TrainEvent::Step { train_loss, .. } = e {
                losses.push(train_loss)
            }
        },
    )
    .expect("train");
    let Outcome::Finished(vars) = out else {
        panic!("cancelled")
    };
    assert!(losses.last() < losses.first(), "{losses:?}");
    let parsed = vars.export().expect("export");
    let (config, weights) = formats::write(&parsed, m.config(), &m.name).expect("write");
    let st = safetensors::SafeTensors::deserialize(&weights).expect("st");
    let stored: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
    assert_eq!(stored as u64, s.adapter_bytes(m.config()));
    let back = formats::parse(&config, &weights, m.config(), &m.name, &policy())
        .expect("parses")
        .compile(&m.llama)
        .expect("compiles");
    assert!(back.lm_head.is_some());
    for e in ex.iter().take(3) {
        let trained = m
            .llama
            .output_reference(&e.ids, vars.as_ref())
            .expect("plain");
        let served = served_last_logits(&m, &back, &e.ids);
        assert!(max_abs_diff(&served, &trained) < 1e-3);
    }
}
