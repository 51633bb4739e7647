//! The adapter methods' benchmarks (BENCHMARKS.md, issues 10 and 11), on the real SmolLM2:
//! 1. `learning`: each PEFT/AdapterHub fixture's training run repeated by graft with the same
//!    hyper-parameters (steps, batch 4, learning rate, AdamW torch defaults, the fixture's
//!    dataset): graft's loss per step beside the library's (`reference.json`), the mean of
//!    the last 10 steps, training tokens/s, and the trained adapter's answer to the
//!    fixtures' held-out questions beside the library's;
//! 2. `ttft`: a prompt-tuned request's time to first token with the virtual tokens' KV taken
//!    from the per-version prefix (what graft does) vs computed for the request;
//! 3. `mixed`: 32 streams, a quarter bare and three quarters under one adapter kind (own
//!    rank-16 LoRAs; prompt tuning and prefix tuning; IA3, DoRA and a bottleneck; all of
//!    them), each set against the same 32 streams bare, over gRPC;
//! 4. `classify`: the seq-cls fixture's classifier over gRPC: Classify requests per second
//!    (one short text each, `--streams` callers at once) alone, generation tokens/s of the
//!    same number of streams alone, and both at once (they share engine steps).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use candle_core::{Device, Tensor};
use clap::Parser;
use graft_bench::{pct, run_streams};

use graft_server::{
    adapters::formats,
    config::ServerConfig,
    model::{Adapter, BaseModel, ChatMessage, KvCache, SeqChunk},
    server,
    train::{
        dataset::{parse_jsonl, tokenize, Overflow, Tokenized},
        methods::{Encoder, MethodSpec, PromptInit},
        optim::Schedule,
        trainer::{self, Control, Outcome, TrainEvent, TrainSpec},
    },
};
use graft_tests::{fixtures, random_peft};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Comma-separated: learning, ttft, mixed, classify.
    #[arg(long, default_value = "learning,ttft,mixed,classify")]
    parts: String,
    #[arg(long, default_value_t = 32)]
    streams: usize,
    #[arg(long, default_value_t = 48)]
    tokens: u32,
    /// Added to each fixture's seed (another init and data order, for the spread).
    #[arg(long, default_value_t = 0)]
    seed_offset: u64,
    /// Only these fixtures (comma-separated folder names); default all.
    #[arg(long)]
    only: Option<String>,
    /// `bench/peers/peft_learning.py --dump`'s folder: where it holds `<method>-<seed>/`
    /// (PEFT's starting parameters and batches for that seed), graft's run starts from the
    /// same parameters and takes the same batches in the same order, and its losses are set
    /// beside that PEFT run's step by step.
    #[arg(long)]
    peft_start: Option<PathBuf>,
}

/// (folder under tests/fixtures, method name)
const FIXTURES: [(&str, &str); 8] = [
    // No recorded losses: its row gives LoRA's training speed beside the others'.
    ("peft-lora-smollm2", "lora"),
    ("peft-methods/prompt-tuning", "prompt_tuning"),
    ("peft-methods/p-tuning-mlp", "p_tuning"),
    ("peft-methods/prefix-tuning", "prefix_tuning"),
    ("peft-methods/p-tuning-v2", "p_tuning_v2"),
    ("peft-methods/ia3", "ia3"),
    ("peft-methods/dora", "dora"),
    ("bottleneck-houlsby", "bottleneck"),
];

fn json(p: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json")
}

/// The fixture's method with its config's settings, as a job spec (LoRA's fields set for
/// DoRA).
fn spec_of(dir: &str, cfg: &graft_server::model::LlamaConfig) -> TrainSpec {
    // The LoRA fixture keeps its files at the top of its folder.
    let adapter = fixtures().join(dir).join("adapter");
    let adapter = if adapter.is_dir() {
        adapter
    } else {
        fixtures().join(dir)
    };
    let c = json(adapter.join("adapter_config.json"));
    let n = c["num_virtual_tokens"].as_u64().unwrap_or(0) as usize;
    let e = c["encoder_hidden_size"].as_u64().unwrap_or(0) as usize;
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut spec = TrainSpec {
        method: MethodSpec::Lora,
        rank: 0,
        alpha: 0.0,
        dropout: 0.0,
        targets: vec![],
        use_rslora: false,
        use_dora: false,
        epochs: 1,
        batch_size: 4,
        grad_accum: 1,
        learning_rate: 1e-3,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        // torch.optim.AdamW's defaults: weight decay 0.01, no clipping.
        weight_decay: 0.01,
        max_grad_norm: 0.0,
        max_seq_len: 512,
        seed: 0,
        eval_every: 0,
        patience: 0,
        checkpoint_every: 1_000_000,
        objective: Default::default(),
        train_lm_head: false,
    };
    spec.method = match dir.rsplit('/').next().unwrap_or(dir) {
        "prompt-tuning" => MethodSpec::PromptTuning {
            num_virtual_tokens: n,
            init: PromptInit::Random,
        },
        "p-tuning-mlp" => MethodSpec::PTuning {
            num_virtual_tokens: n,
            encoder: Encoder::Mlp,
            encoder_hidden_size: e,
            encoder_num_layers: 2,
        },
        "prefix-tuning" => MethodSpec::PrefixTuning {
            num_virtual_tokens: n,
            encoder_hidden_size: e,
        },
        "p-tuning-v2" => MethodSpec::PTuningV2 {
            num_virtual_tokens: n,
        },
        "ia3" => MethodSpec::Ia3 {
            target_modules: names(&c["target_modules"]),
            feedforward_modules: names(&c["feedforward_modules"]),
        },
        "dora" | "peft-lora-smollm2" => {
            spec.rank = c["r"].as_u64().expect("r") as usize;
            spec.alpha = c["lora_alpha"].as_f64().expect("alpha");
            spec.targets = names(&c["target_modules"]);
            spec.use_dora = c["use_dora"].as_bool().unwrap_or(false);
            MethodSpec::Lora
        }
        _ => {
            let d = fixtures().join(dir).join("adapter");
            let p = formats::parse(
                &std::fs::read(d.join("adapter_config.json")).expect("c"),
                &std::fs::read(d.join("adapter.safetensors")).expect("w"),
                cfg,
                "",
                &policy(),
            );
            match p.map(|p| p.details) {
                Ok(formats::Details::Bottleneck(settings)) => MethodSpec::Bottleneck {
                    settings,
                    bottleneck_size: None,
                },
                other => panic!("{dir}: {other:?}"),
            }
        }
    };
    spec
}

fn policy() -> formats::ImportPolicy {
    formats::ImportPolicy {
        max_rank: 64,
        max_virtual_tokens: 128,
        force: true,
        base_aliases: vec![],
    }
}

/// Greedy continuation through the serving path.
fn greedy(m: &BaseModel, a: &Adapter, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut pool = m.llama.kv_pool(2048).expect("KV pool");
    let mut cache = KvCache::new();
    if let Some(p) = a.prefix.as_deref() {
        pool.grow(&mut cache, p.len).expect("room");
        pool.seed_prefix(&mut cache, p);
    }
    let (mut next, mut out) = (prompt.to_vec(), Vec::new());
    for _ in 0..n {
        let l = m
            .llama
            .forward_batch(
                &mut pool,
                &mut [SeqChunk {
                    tokens: &next,
                    cache: &mut cache,
                    want_logits: true,
                    decode: !out.is_empty(),
                    adapter: Some(a),
                }],
            )
            .expect("forward");
        let row: Vec<f32> = l.flatten_all().expect("f").to_vec1().expect("v");
        let t = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .expect("argmax");
        out.push(t);
        next = vec![t];
        if m.tokenizer.is_eos(t) {
            break;
        }
    }
    out
}

fn learning(m: &BaseModel, args: &Args) {
    let rows: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(fixtures().join("peft-lora-smollm2/train_dataset_alpaca.json"))
            .expect("dataset"),
    )
    .expect("json");
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let render = |msgs: &[ChatMessage], g: bool| m.chat.render(msgs, g);
    let (ex, _) = parse_jsonl(&text, None, &render).expect("parse");
    let (data, _) = tokenize(&ex, &m.tokenizer, 512, Overflow::Truncate).expect("tokenize");
    println!("| method | steps | lr | library last-10 mean | graft last-10 mean | ratio | graft train tok/s |");
    println!("|---|---|---|---|---|---|---|");
    let mut curves = Vec::new();
    let mut answers = Vec::new();
    for (dir, name) in FIXTURES {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|x| dir.ends_with(x)))
        {
            continue;
        }
        let r = json(fixtures().join(dir).join("reference.json"));
        let t = &r["training"];
        let steps = t["steps"].as_u64().unwrap_or(40) as usize;
        let batch = t["batch"].as_u64().unwrap_or(4) as usize;
        let lr = t["lr"].as_f64().unwrap_or(2e-4);
        let peft: Vec<f64> = t["losses"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_f64().expect("loss")).collect())
            .unwrap_or_default();
        // Whole epochs (the fixtures' 40 steps are 5 epochs of 8 batches); the table
        // compares the first `steps` steps.
        let per_epoch = data.len().div_ceil(batch);
        let seed = t["seed"].as_u64().unwrap_or(0) + args.seed_offset;
        let start = args.peft_start.as_ref().and_then(|d| {
            let d = d.join(format!("{}-{seed}", dir.rsplit('/').next().unwrap_or(dir)));
            d.is_dir().then(|| peft_start(&d, &data, seed))
        });
        let (epochs, train_set, peft) = match &start {
            // One epoch of PEFT's batches, in its order.
            Some(s) => (1, s.rows.clone(), s.losses.clone()),
            None => (steps.div_ceil(per_epoch), data.clone(), peft),
        };
        let spec = TrainSpec {
            epochs,
            batch_size: batch,
            learning_rate: lr,
            seed,
            ..spec_of(dir, m.config())
        };
        let dir_tmp = tempfile::tempdir().expect("tmp");
        let ctl = Control {
            start_values: start.map(|s| Arc::new(s.values)),
            ..Control::default()
        };
        let (mut losses, mut toks, mut secs) = (Vec::new(), 0usize, 0f64);
        let out = trainer::train(m, &spec, &train_set, &[], dir_tmp.path(), &ctl, &mut |e| {
            if let TrainEvent::Step {
                step,
                train_loss,
                step_tokens,
                step_seconds,
                ..
            } = e
            {
                if step <= steps {
                    losses.push(train_loss);
                    toks += step_tokens;
                    secs += step_seconds;
                }
            }
        })
        .expect("train");
        let last10 = |v: &[f64]| {
            v[v.len().saturating_sub(10)..].iter().sum::<f64>() / 10f64.min(v.len() as f64)
        };
        let (p, g) = (last10(&peft), last10(&losses));
        if peft.is_empty() {
            println!(
                "| {name} | {steps} | {lr} | - | {g:.3} | - | {:.0} |",
                toks as f64 / secs
            );
        } else {
            println!(
                "| {name} | {steps} | {lr} | {p:.4} | {g:.4} | {:.2} | {:.0} |",
                g / p,
                toks as f64 / secs
            );
        }
        curves.push((name, peft, losses));
        let Outcome::Finished(vars) = out else {
            unreachable!("nothing cancels the run")
        };
        let adapter = vars
            .export()
            .expect("export")
            .compile(&m.llama)
            .expect("compile");
        for p in r["prompts"].as_array().into_iter().flatten() {
            let ids: Vec<u32> = p["token_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect();
            let got = greedy(m, &adapter, &ids, 24);
            answers.push((
                name,
                p["messages"][0]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                m.tokenizer.decode(&got).unwrap_or_default(),
                p["adapted"]["greedy"]["text"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            ));
        }
    }
    println!();
    for (name, peft, ours) in &curves {
        let f = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!("{name} PEFT : {}", f(peft));
        println!("{name} graft: {}", f(ours));
    }
    println!();
    for (name, q, ours, peft) in answers {
        println!("{name} | {q} | graft: {ours:?} | PEFT: {peft:?}");
    }
}

/// A PEFT run's start (`peft_learning.py --dump`): its parameters' starting values under
/// graft's names, the training rows arranged so that graft's shuffle for `seed` hands them
/// out in PEFT's batches and order, and that run's own losses.
struct PeftStart {
    values: HashMap<String, Tensor>,
    rows: Vec<Tokenized>,
    losses: Vec<f64>,
}

fn peft_start(dir: &Path, data: &[Tokenized], seed: u64) -> PeftStart {
    let values = candle_core::safetensors::load(dir.join("start.safetensors"), &Device::Cpu)
        .expect("start.safetensors");
    let o = json(dir.join("order.json"));
    let wanted: Vec<usize> = o["batches"]
        .as_array()
        .expect("batches")
        .iter()
        .flat_map(|b| b.as_array().expect("batch").iter())
        .map(|i| i.as_u64().expect("row") as usize)
        .collect();
    let rows = trainer::in_epoch_order(data, &wanted, seed);
    let losses = o["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|x| x.as_f64().expect("loss"))
        .collect();
    PeftStart {
        values,
        rows,
        losses,
    }
}

fn ttft(m: &BaseModel) {
    let p = formats::parse(
        &std::fs::read(fixtures().join("peft-methods/prompt-tuning/adapter/adapter_config.json"))
            .expect("c"),
        &std::fs::read(
            fixtures().join("peft-methods/prompt-tuning/adapter/adapter_model.safetensors"),
        )
        .expect("w"),
        m.config(),
        &m.name,
        &formats::ImportPolicy {
            max_rank: 64,
            max_virtual_tokens: 128,
            force: true,
            base_aliases: vec![],
        },
    )
    .expect("fixture");
    let hidden = m.config().hidden_size;
    let prompt: Vec<u32> = m
        .tokenizer
        .encode("<|im_start|>user\nWhat is the capital of Australia?<|im_end|>\n<|im_start|>assistant\n")
        .expect("ids");
    for n_virtual in [8usize, 20, 64] {
        // The fixture's embeddings, cycled to `n_virtual` tokens.
        let emb: Vec<f32> = p
            .prompt
            .as_ref()
            .expect("embeddings")
            .chunks_exact(hidden)
            .cycle()
            .take(n_virtual)
            .flatten()
            .copied()
            .collect();
        let emb_t = Tensor::from_vec(emb, (n_virtual, hidden), &Device::Cpu).expect("t");
        let first = |prefix: &graft_server::model::KvPrefix, adapter: &Adapter| {
            let mut pool = m.llama.kv_pool(1024).expect("KV pool");
            let mut cache = KvCache::new();
            pool.grow(&mut cache, prefix.len).expect("room");
            pool.seed_prefix(&mut cache, prefix);
            m.llama
                .forward_batch(
                    &mut pool,
                    &mut [SeqChunk {
                        tokens: &prompt,
                        cache: &mut cache,
                        want_logits: true,
                        decode: false,
                        adapter: Some(adapter),
                    }],
                )
                .expect("forward");
        };
        let prefix = m.llama.prefix_from_embeddings(&emb_t).expect("prefix");
        let adapter = Adapter::with_prefix(prefix.clone());
        let (mut cached, mut computed, mut compile) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..7 {
            let t = Instant::now();
            first(&prefix, &adapter);
            cached.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let fresh = m.llama.prefix_from_embeddings(&emb_t).expect("prefix");
            compile.push(t.elapsed().as_secs_f64() * 1e3);
            first(&fresh, &adapter);
            computed.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "{n_virtual} virtual tokens, {}-token prompt: first token {:.1} ms with the version's KV prefix; {:.1} ms computing it for the request ({:.1} ms of that is the prefix)",
            prompt.len(),
            pct(&mut cached, 0.5),
            pct(&mut computed, 0.5),
            pct(&mut compile, 0.5)
        );
    }
}

async fn mixed(args: &Args) -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("graft-bench-prompt-{}", std::process::id()));
    let mut cfg = ServerConfig::for_model(&args.model, &data);
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    cfg.engine.max_active_sequences = 64;
    cfg.adapter_cache_bytes = 4 << 30;
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let model: Arc<BaseModel> = srv.engine().expect("ready").model().clone();
    let client = graft_tests::connect_as(srv.grpc_addr, graft_tests::TENANT).await;
    let quarter = args.streams / 4;
    println!(
        "{} streams, {} new tokens each; three quarters under the adapters, a quarter bare",
        args.streams, args.tokens
    );
    println!("| adapters | with (tok/s) | bare (tok/s; before, after) | ratio |");
    println!("|---|---|---|---|");
    for i in 0..quarter {
        let (c, w) = random_peft(&model, i as u64 + 1, 16);
        client
            .import_adapter("", &format!("r{i}"), c, w, false)
            .await?;
    }
    for (dir, name, weights) in [
        (
            "peft-methods/prompt-tuning",
            "pt",
            "adapter_model.safetensors",
        ),
        (
            "peft-methods/prefix-tuning",
            "prefix",
            "adapter_model.safetensors",
        ),
        ("peft-methods/ia3", "ia3", "adapter_model.safetensors"),
        ("peft-methods/dora", "dora", "adapter_model.safetensors"),
        ("bottleneck-houlsby", "houlsby", "adapter.safetensors"),
    ] {
        let d = fixtures().join(dir).join("adapter");
        client
            .import_adapter(
                "",
                name,
                std::fs::read(d.join("adapter_config.json"))?,
                std::fs::read(d.join(weights))?,
                true,
            )
            .await?;
    }
    let bare: Vec<Option<String>> = vec![None; args.streams];
    // Each set: a quarter of the streams bare, the rest cycling through its adapters.
    let mut sets: Vec<(&str, Vec<String>)> = vec![
        (
            "own rank-16 LoRAs on 7 modules",
            (0..quarter * 3)
                .map(|i| format!("r{}", i % quarter))
                .collect(),
        ),
        (
            "prompt tuning and prefix tuning (8 virtual tokens)",
            vec!["pt".into(), "prefix".into()],
        ),
        ("IA3", vec!["ia3".into()]),
        ("DoRA r=8 on q,k,v,o", vec!["dora".into()]),
        (
            "Houlsby bottleneck (36 wide, both sublayers)",
            vec!["houlsby".into()],
        ),
    ];
    sets.push((
        "all of them",
        vec![
            "r0".into(),
            "pt".into(),
            "ia3".into(),
            "dora".into(),
            "houlsby".into(),
            "prefix".into(),
        ],
    ));
    run_streams(&client, &bare[..4], 8).await?;
    for (what, names) in sets {
        let mix: Vec<Option<String>> = (0..args.streams)
            .map(|i| (i % 4 != 0).then(|| names[(i - i / 4 - 1) % names.len()].clone()))
            .collect();
        let b1 = run_streams(&client, &bare, args.tokens).await?;
        let with = run_streams(&client, &mix, args.tokens).await?;
        let b2 = run_streams(&client, &bare, args.tokens).await?;
        let base = (b1 + b2) / 2.0;
        println!(
            "| {what} | {with:.1} | {base:.1} ({b1:.1}, {b2:.1}) | {:.2} |",
            with / base
        );
    }
    srv.drain().await?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let parts: Vec<&str> = args.parts.split(',').collect();
    if parts.contains(&"learning") || parts.contains(&"ttft") {
        let m = BaseModel::load(&args.model, &Device::Cpu)?;
        if parts.contains(&"ttft") {
            ttft(&m);
        }
        if parts.contains(&"learning") {
            learning(&m, &args);
        }
    }
    if parts.contains(&"mixed") {
        mixed(&args).await?;
    }
    if parts.contains(&"classify") {
        classify(&args).await?;
    }
    Ok(())
}

/// `callers` concurrent callers each sending `per_caller` one-text Classify requests in turn;
/// requests per second.
async fn classify_load(
    client: &graft_client::GraftClient,
    texts: &[String],
    callers: usize,
    per_caller: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let results = futures::future::join_all((0..callers).map(|i| {
        let c = client.clone();
        let texts = texts.to_vec();
        async move {
            for k in 0..per_caller {
                let text = texts[(i + k) % texts.len()].clone();
                c.classify(graft_client::proto::ClassifyRequest {
                    adapter: "topic".into(),
                    inputs: vec![graft_client::proto::ClassifyInput {
                        text,
                        messages: Vec::new(),
                    }],
                    tenant: String::new(),
                })
                .await?;
            }
            Ok::<_, tonic::Status>(())
        }
    }))
    .await;
    for r in results {
        r?;
    }
    Ok((callers * per_caller) as f64 / start.elapsed().as_secs_f64())
}

async fn classify(args: &Args) -> anyhow::Result<()> {
    let data = std::env::temp_dir().join(format!("graft-bench-classify-{}", std::process::id()));
    let mut cfg = ServerConfig::for_model(&args.model, &data);
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    cfg.engine.max_active_sequences = 64;
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let client = graft_tests::connect_as(srv.grpc_addr, graft_tests::TENANT).await;
    let opts = graft_client::ImportOptions {
        force: true,
        labels: ["food", "sport", "weather"].map(String::from).to_vec(),
    };
    client
        .import_adapter_dir_with(
            "",
            "topic",
            &fixtures().join("peft-methods/seq-cls/adapter"),
            &opts,
        )
        .await?;
    let r = json(fixtures().join("peft-methods/seq-cls/reference.json"));
    let texts: Vec<String> = r["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["text"].as_str().expect("text").to_string())
        .collect();
    let n = args.streams;
    let per = 8;
    classify_load(&client, &texts, n, 2).await?; // warm-up
    let alone = classify_load(&client, &texts, n, per).await?;
    let bare: Vec<Option<String>> = vec![None; n];
    let gen_alone = run_streams(&client, &bare, args.tokens).await?;
    let (gen_with, cls_with) = tokio::join!(
        run_streams(&client, &bare, args.tokens),
        classify_load(&client, &texts, n, per)
    );
    println!(
        "{n} callers; Classify: one 8-14 token text per request, {per} requests per caller; Generate: {} new tokens per stream",
        args.tokens
    );
    println!("| load | Classify (req/s) | Generate (tok/s) |");
    println!("|---|---|---|");
    println!("| Classify alone | {alone:.1} | |");
    println!("| Generate alone | | {gen_alone:.1} |");
    println!("| both at once | {:.1} | {:.1} |", cls_with?, gen_with?);
    srv.drain().await?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
