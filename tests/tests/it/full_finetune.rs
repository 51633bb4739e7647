//! Full fine-tuning over gRPC on the tiny model: a `full` job trains the model's own
//! weights; the result is registered under the job's name with method `full`, served by
//! Generate in its own engine (the tokens of the exported HF directory loaded on its own),
//! exported as that directory, unloaded when idle and loaded again; the memory check, bad
//! layers, a full model named where an adapter must be, and a hosted-model budget too small
//! each refused with the code and field, with nothing stored.

use std::time::Duration;

use graft_client::{proto as pb, GenerateOptions};
use graft_server::model::BaseModel;
use graft_tests::{start_with, tiny_model_path};
use tonic::Code;

fn dataset() -> Vec<u8> {
    (0..16)
        .map(|i| {
            format!(
                "{{\"prompt\":\"Q{i} says\",\"completion\":\" the answer is {}\"}}\n",
                i % 3
            )
        })
        .collect::<String>()
        .into_bytes()
}

fn full_job(layers: Vec<u32>) -> pb::CreateJobRequest {
    use pb::create_job_request::MethodConfig;
    pb::CreateJobRequest {
        dataset: "toy".into(),
        adapter_name: "tuned".into(),
        method: "full".into(),
        method_config: Some(MethodConfig::Full(pb::FullMethod {
            layers,
            embeddings: None,
            norms: None,
        })),
        hyperparameters: Some(pb::Hyperparameters {
            epochs: Some(3),
            batch_size: Some(4),
            learning_rate: Some(3e-3),
            lr_scheduler: "constant".into(),
            max_seq_len: Some(64),
            ..Default::default()
        }),
        ..Default::default()
    }
}

const PROMPT: &str = "Q5 says";

fn greedy(adapter: Option<&str>) -> pb::GenerateRequest {
    GenerateOptions {
        adapter: adapter.map(String::from),
        ..GenerateOptions::greedy(8)
    }
    .prompt(PROMPT)
}

/// The last prompt position's logits of a model loaded on its own (the plain forward).
fn last_logits(m: &BaseModel) -> Logits {
    let ids = m.tokenizer.encode(PROMPT).expect("encode");
    let l = m.llama.forward_reference(&ids).expect("forward");
    Logits(l.get(ids.len() - 1).expect("row").to_vec1().expect("v"))
}

struct Logits(Vec<f32>);

impl Logits {
    fn max_abs_diff(&self, o: &Logits) -> f32 {
        self.0
            .iter()
            .zip(&o.0)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }
}

/// Greedy tokens of a model loaded on its own, through its serving path.
fn local_greedy(m: &BaseModel, n: usize) -> Vec<u32> {
    use graft_server::model::SeqChunk;
    let mut pool = m.llama.kv_pool(1024).expect("KV pool");
    let mut cache = graft_server::model::KvCache::new();
    let mut next = m.tokenizer.encode(PROMPT).expect("encode");
    let mut out = Vec::new();
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
                    adapter: None,
                }],
            )
            .expect("forward");
        let row: Vec<f32> = l.squeeze(0).expect("row").to_vec1().expect("v");
        let t = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .expect("argmax");
        if m.tokenizer.eos_ids.contains(&t) {
            break;
        }
        out.push(t);
        next = vec![t];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_fine_tuning_job_yields_a_model_that_generate_serves_by_name() {
    let t = start_with(tiny_model_path(), |c| {
        c.hosted.idle = Duration::from_millis(300);
    })
    .await;
    t.client
        .upload_dataset("", "toy", "", dataset())
        .await
        .expect("upload");
    let created = t.client.create_job(full_job(vec![])).await.expect("create");
    assert_eq!(created.method, "full");
    let (_, done) = tokio::time::timeout(
        Duration::from_secs(300),
        t.client.follow_job("", &created.id),
    )
    .await
    .expect("in time")
    .expect("follow");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let v = t.client.get_adapter("", "tuned").await.expect("registered");
    assert_eq!(v.method, "full");
    let Some(pb::adapter_version::Details::Full(f)) = &v.details else {
        panic!("{v:?}")
    };
    assert!(f.embeddings && f.norms && f.layers.is_empty());
    let base_model = BaseModel::load(&tiny_model_path(), &candle_core::Device::Cpu).expect("base");
    let params: usize = base_model
        .llama
        .weights
        .hf_tensors(base_model.config())
        .expect("tensors")
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(f.trained_parameters as usize, params);
    assert!(v.size_bytes as usize > 4 * params);

    // Served by name, in its own engine, as the exported directory computes on its own.
    let hosted = t.server.hosted().expect("ready");
    assert_eq!(hosted.resident().await.0, 0, "loaded on first use only");
    let served = t
        .client
        .generate(greedy(Some("tuned")))
        .await
        .expect("generate");
    assert_eq!(hosted.resident().await.0, 1);
    let dir = tempfile::tempdir().expect("dir");
    let weights = t
        .client
        .export_adapter_dir("", "tuned", dir.path())
        .await
        .expect("export");
    assert_eq!(weights, "model.safetensors");
    for f in graft_server::model::save::HF_FILES {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    let exported = BaseModel::load(dir.path(), &candle_core::Device::Cpu).expect("loads");
    let want = local_greedy(&exported, 8);
    assert_eq!(served.token_ids, want);
    // As one GGUF file: in f32 it computes what the directory computes (same greedy
    // tokens, the same logits bit for bit), with the same tokenizer and chat template; in
    // q8_0 it loads and serves too, smaller, its logits near the directory's. Bad formats
    // are refused naming the field.
    let gguf = |q: &'static str| {
        let c = t.client.clone();
        async move {
            let d = tempfile::tempdir().expect("dir");
            let f = c
                .export_adapter_dir_as("", "tuned", d.path(), "gguf", q)
                .await
                .expect("gguf export");
            assert_eq!(f, format!("model-{q}.gguf"));
            let size = std::fs::metadata(d.path().join(&f)).expect("file").len();
            let m = BaseModel::load(&d.path().join(&f), &candle_core::Device::Cpu)
                .expect("the GGUF loads");
            (m, size)
        }
    };
    let (g32, size32) = gguf("f32").await;
    assert_eq!(local_greedy(&g32, 8), want);
    assert_eq!(
        last_logits(&g32).max_abs_diff(&last_logits(&exported)),
        0.0,
        "f32 GGUF logits"
    );
    let text = "<|im_start|>user\nQ5 says 12 things, the answer?<|im_end|>\n";
    assert_eq!(
        g32.tokenizer.encode(text).expect("encode"),
        exported.tokenizer.encode(text).expect("encode")
    );
    assert_eq!(g32.tokenizer.eos_ids, exported.tokenizer.eos_ids);
    assert_eq!(g32.chat.source(), exported.chat.source());
    let (g8, size8) = gguf("q8_0").await;
    assert!(size8 * 3 < size32, "q8_0 {size8} vs f32 {size32} bytes");
    assert_eq!(local_greedy(&g8, 8).len(), want.len());
    // Its matrices are the model's, quantised: near the directory's logits (0.10 of a
    // largest |logit| of 17 when written), not equal to them.
    let d8 = last_logits(&g8).max_abs_diff(&last_logits(&exported));
    assert!(
        d8 > 0.0 && d8 < 0.5,
        "q8_0 logits {d8} from the directory's"
    );
    for (format, quantization, field) in [
        ("gguf", "q3_k", "quantization"),
        ("", "q8_0", "quantization"),
        ("onnx", "", "format"),
    ] {
        let d = tempfile::tempdir().expect("dir");
        let err = t
            .client
            .export_adapter_dir_as("", "tuned", d.path(), format, quantization)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{}",
            err.message()
        );
    }
    let base = t.client.generate(greedy(None)).await.expect("base");
    assert_eq!(base.token_ids, local_greedy(&base_model, 8));
    assert_ne!(
        served.token_ids, base.token_ids,
        "training changed the model"
    );

    // Idle: unloaded; the next request loads it again and gets the same tokens.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while hosted.resident().await.0 > 0 {
        assert!(std::time::Instant::now() < until, "unloaded when idle");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = t
        .client
        .generate(greedy(Some("tuned")))
        .await
        .expect("again");
    assert_eq!(again.token_ids, want);

    // A model is not an adapter of the base: Classify refuses it naming the field.
    let err = t
        .client
        .classify(pb::ClassifyRequest {
            adapter: "tuned".into(),
            inputs: vec![pb::ClassifyInput {
                text: "hi".into(),
                messages: vec![],
            }],
            tenant: String::new(),
        })
        .await
        .expect_err("not a classifier");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("adapter:"), "{}", err.message());

    // Deleted: never served again.
    t.client.delete_adapter("", "tuned").await.expect("delete");
    let err = t
        .client
        .generate(greedy(Some("tuned")))
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_fine_tuning_beyond_the_limits_is_refused_with_nothing_stored() {
    let t = start_with(tiny_model_path(), |c| {
        c.max_training_memory_bytes = 1 << 20;
    })
    .await;
    t.client
        .upload_dataset("", "toy", "", dataset())
        .await
        .expect("upload");
    let err = t
        .client
        .create_job(full_job(vec![]))
        .await
        .expect_err("memory");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("MiB of memory") && err.message().contains("allows 1 MiB"),
        "{}",
        err.message()
    );
    let err = t
        .client
        .create_job(full_job(vec![7]))
        .await
        .expect_err("layer");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("full.layers:"),
        "{}",
        err.message()
    );
    let mut lm = full_job(vec![]);
    lm.train_lm_head = true;
    let err = t.client.create_job(lm).await.expect_err("lm head");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("method:"), "{}", err.message());
    let jobs = t
        .client
        .training()
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("jobs")
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{:?}", jobs.jobs);
    assert!(t.client.list_adapters("").await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_does_not_fit_the_hosted_budget_is_refused() {
    let t = start_with(tiny_model_path(), |c| {
        c.hosted.budget_bytes = 1 << 20;
        c.hosted.kv_cache_bytes = 1 << 20;
    })
    .await;
    t.client
        .upload_dataset("", "toy", "", dataset())
        .await
        .expect("upload");
    let mut job = full_job(vec![1]);
    job.hyperparameters
        .as_mut()
        .expect("hyperparameters")
        .epochs = Some(1);
    let created = t.client.create_job(job).await.expect("create");
    let (_, done) = t.client.follow_job("", &created.id).await.expect("follow");
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let err = t
        .client
        .generate(greedy(Some("tuned")))
        .await
        .expect_err("no room");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--hosted-models-mb"),
        "{}",
        err.message()
    );
    // The base serves as before.
    t.client.generate(greedy(None)).await.expect("base");
}
