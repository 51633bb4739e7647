//! Full fine-tuning on the tiny model: the gradient of every kind of weight (embeddings
//! tied and untied, projections, norms) matches finite differences; a subset trains only
//! what it names; training lowers the loss and leaves the shared base untouched; the model
//! exported as an HF directory loads back (`BaseModel::load`, what `graftd --model` runs)
//! and computes exactly what was trained, with the same tokenizer and chat template; a
//! killed run resumes bit for bit.

mod common;

use common::{largest_gradient_vs_fd, max_abs_diff, tiny as model, toy_examples as data};
use graft_server::{
    model::{save, weights::Linear, BaseModel, ChatMessage, Llama},
    train::{
        dataset::Tokenized,
        full_vars::FullVars,
        methods::{FullSelection, MethodSpec},
        optim,
        trainable::{self, Trainable},
        trainer::{self, Control, Outcome, TrainEvent, TrainSpec},
    },
};

fn all() -> FullSelection {
    FullSelection {
        layers: vec![],
        embeddings: true,
        norms: true,
        tied: true,
    }
}

fn spec(sel: FullSelection) -> TrainSpec {
    TrainSpec {
        method: MethodSpec::Full(sel),
        epochs: 4,
        batch_size: 4,
        learning_rate: 3e-3,
        max_grad_norm: 1.0,
        checkpoint_every: 2,
        seed: 5,
        ..TrainSpec::default()
    }
}

/// The tiny model with its LM head untied (a copy of the embeddings).
fn untied(base: &Llama) -> Llama {
    let mut w = base.weights.clone();
    w.lm_head = Linear::new(w.embed.weight().expect("embed").copy().expect("copy"));
    assert!(!w.tied());
    Llama::new(base.cfg.clone(), w, base.device().clone()).expect("model")
}

fn check_gradients(m: &BaseModel, vars: &dyn Trainable, batch: &[&Tokenized], what: &str) {
    let all = vars.vars();
    let l = trainer::plain_loss_tensor(m, vars, batch).expect("loss");
    let grads = optim::collect(&l.backward().expect("backward"), &all).expect("grads");
    for ((v, g), name) in all.iter().zip(&grads).zip(vars.names()) {
        let (gk, fd) =
            largest_gradient_vs_fd(v, g, || trainer::plain_loss(m, vars, batch).expect("loss"));
        assert!(gk != 0.0, "{what}: {name} has no gradient");
        // The f32 loss bounds the finite difference's precision to about 1e-4 here.
        let rel = (fd - gk).abs() / gk.abs().max(1e-2);
        assert!(
            rel < 0.05,
            "{what}: {name}: autograd {gk} vs finite difference {fd}"
        );
    }
}

#[test]
fn every_kind_of_weight_gets_its_true_gradient() {
    let m = model();
    let ex = data(&m);
    let batch: Vec<&Tokenized> = ex.iter().take(3).collect();
    let layers = m.config().num_layers;
    let vars = trainable::init(&m, &spec(all())).expect("init");
    // Tied: one matrix for the embeddings and the LM head; 7 projections and 2 norms per
    // layer; the final norm.
    assert_eq!(vars.names().len(), 1 + layers * 9 + 1);
    assert!(vars.model().expect("a model").weights.tied());
    check_gradients(&m, vars.as_ref(), &batch, "tied");

    let untied = untied(&m.llama);
    let vars = FullVars::init(&untied, &all()).expect("init");
    let names = vars.names();
    assert_eq!(names.len(), 2 + layers * 9 + 1);
    assert!(names.contains(&"lm_head.weight".to_string()));
    check_gradients(&m, &vars, &batch, "untied");
}

#[test]
fn a_subset_trains_only_what_it_names() {
    let m = model();
    let sel = FullSelection {
        layers: vec![1],
        embeddings: false,
        norms: false,
        tied: true,
    };
    let cfg = m.config();
    let vars = trainable::init(&m, &spec(sel.clone())).expect("init");
    let names = vars.names();
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("model.layers.1.")));
    let floats: usize = vars.vars().iter().map(|v| v.elem_count()).sum();
    assert_eq!(floats, sel.trained_floats(cfg));
    // What the quota and the memory check count is the model's and the subset's real size.
    let model_floats: usize = m
        .llama
        .weights
        .hf_tensors(cfg)
        .expect("tensors")
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(model_floats, sel.model_floats(cfg));
    assert_eq!(
        all().trained_floats(cfg),
        model_floats,
        "everything trains by default"
    );
    // Frozen weights are the base's own layers, not copies.
    let own = vars.model().expect("model");
    assert!(own.weights.embed.same_as(&m.llama.weights.embed));
    assert!(own.weights.layers[0]
        .q
        .same_as(&m.llama.weights.layers[0].q));
    assert!(!own.weights.layers[1]
        .q
        .same_as(&m.llama.weights.layers[1].q));
}

fn train(m: &BaseModel, s: &TrainSpec, ex: &[Tokenized]) -> (Vec<f64>, Box<dyn Trainable>) {
    let dir = tempfile::tempdir().expect("dir");
    let mut losses = Vec::new();
    let out = trainer::train(m, s, ex, &[], dir.path(), &Control::default(), &mut |e| {
        if let TrainEvent::Step { train_loss, .. } = e {
            losses.push(train_loss);
        }
    })
    .expect("train");
    match out {
        Outcome::Finished(v) => (losses, v),
        Outcome::Cancelled => panic!("cancelled"),
    }
}

#[test]
fn full_fine_tuning_learns_and_its_hf_directory_serves_what_was_trained() {
    let m = model();
    let ex = data(&m);
    let prompt = m.tokenizer.encode("Q4 says").expect("encode");
    let before = m.llama.forward_reference(&prompt).expect("base");
    let (losses, vars) = train(&m, &spec(all()), &ex);
    let (first, last) = (losses[0], *losses.last().expect("steps"));
    assert!(last < first * 0.7, "loss {first} -> {last}");
    // The shared base is untouched.
    let after = m.llama.forward_reference(&prompt).expect("base");
    assert_eq!(
        before
            .flatten_all()
            .expect("f")
            .to_vec1::<f32>()
            .expect("v"),
        after.flatten_all().expect("f").to_vec1::<f32>().expect("v"),
    );
    let trained = vars.model().expect("model");
    let want: Vec<f32> = trained
        .forward_reference(&prompt)
        .expect("trained")
        .flatten_all()
        .expect("f")
        .to_vec1()
        .expect("v");
    assert!(
        max_abs_diff(
            &want,
            &before.flatten_all().expect("f").to_vec1().expect("v")
        ) > 1e-2,
        "training moved the logits"
    );

    let dir = tempfile::tempdir().expect("dir");
    let bytes = save::write_hf_dir(&m, &trained.weights, dir.path()).expect("write");
    for f in save::HF_FILES {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    let weights_bytes = std::fs::metadata(dir.path().join("model.safetensors"))
        .expect("meta")
        .len();
    assert!(weights_bytes > 4 * all().model_floats(m.config()) as u64);
    assert!(bytes > weights_bytes);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["tie_word_embeddings"], true);
    let loaded = BaseModel::load(dir.path(), &candle_core::Device::Cpu).expect("load");
    assert_eq!(loaded.config(), m.config());
    assert!(loaded.llama.weights.tied());
    // The same computation: the weights round-trip exactly through the HF layout.
    let got: Vec<f32> = loaded
        .llama
        .forward_reference(&prompt)
        .expect("loaded")
        .flatten_all()
        .expect("f")
        .to_vec1()
        .expect("v");
    assert_eq!(max_abs_diff(&want, &got), 0.0);
    // The serving path of the loaded model agrees with its plain path.
    let (served, _) = common::greedy(&loaded, None, &prompt, 1);
    let last = &want[want.len() - m.config().vocab_size..];
    assert!(max_abs_diff(last, &served) < 1e-3);
    // Tokenizer and chat template came along.
    let text = "Q7 says <|im_start|>hi";
    assert_eq!(
        loaded.tokenizer.encode(text).expect("encode"),
        m.tokenizer.encode(text).expect("encode")
    );
    assert_eq!(loaded.tokenizer.eos_ids, m.tokenizer.eos_ids);
    let msgs = [ChatMessage {
        role: "user".into(),
        content: "hello".into(),
    }];
    assert_eq!(
        loaded.chat.render(&msgs, true).expect("render"),
        m.chat.render(&msgs, true).expect("render")
    );
}

#[test]
fn a_killed_full_fine_tuning_run_resumes_bit_for_bit() {
    let m = model();
    let ex = data(&m);
    common::assert_resumes_bit_for_bit(&m, &spec(all()), &ex, "full");
}
