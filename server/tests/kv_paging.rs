//! The paged KV cache under the engine: a budget that can be exhausted, preemption that does
//! not change what a sequence generates, prefix sharing that is exact and stays within a
//! tenant, and requests that can never fit refused at once. Tiny random-weight model (its
//! layers mix Q8_0/Q4_0/Q4_1/F16, so decode rows take the packed kernels).

use std::{path::PathBuf, sync::Arc, sync::OnceLock};

use candle_core::Device;
use graft_server::{
    engine::{
        sampler::Sampler, EngineConfig, EngineHandle, GenerationRequest, SamplingParams,
        StreamEvent, SubmitError, Usage, PACKED_PROMPT_TOKENS,
    },
    model::{
        kv_cache::BLOCK_TOKENS,
        packed::DecodeKernel,
        tiny::{write_tiny_gguf, TinySpec},
        BaseModel, KvCache, SeqChunk,
    },
};

fn tiny_with(kernel: DecodeKernel) -> BaseModel {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let path = DIR.get_or_init(|| {
        let dir: PathBuf = std::env::temp_dir().join(format!("graft-kv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("tiny.gguf");
        write_tiny_gguf(&path, &TinySpec::default()).expect("tiny");
        path
    });
    let mut m = BaseModel::load(path, &Device::Cpu).expect("load");
    m.llama.set_decode_kernel(kernel);
    m
}

fn tiny() -> Arc<BaseModel> {
    static M: OnceLock<Arc<BaseModel>> = OnceLock::new();
    M.get_or_init(|| Arc::new(tiny_with(DecodeKernel::Exact)))
        .clone()
}

fn engine(blocks: usize) -> EngineHandle {
    engine_of(tiny(), blocks)
}

fn engine_of(m: Arc<BaseModel>, blocks: usize) -> EngineHandle {
    let cfg = EngineConfig {
        kv_cache_bytes: blocks * m.llama.kv_shape().bytes_per_block(),
        ..EngineConfig::default()
    };
    EngineHandle::start(m, cfg).expect("engine")
}

fn request(tenant: &str, prompt: Vec<u32>, max_new: u32, seed: u64) -> GenerationRequest {
    GenerationRequest {
        task: graft_server::engine::Task::Generate,
        prompt_ids: prompt,
        params: SamplingParams {
            max_new_tokens: max_new,
            temperature: if seed.is_multiple_of(2) { 0.0 } else { 0.8 },
            seed,
            logprobs: true,
            ..SamplingParams::default()
        },
        deadline: None,
        adapter: None,
        tenant: tenant.into(),
        constraint: None,
        background: false,
    }
}

/// Distinct prompts of byte tokens (ids 3..259), never a special token.
fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| 3 + ((i * 31 + j * 7 + j * j) % 256) as u32)
        .collect()
}

/// The tokens a request generated, with the bits of each one's log-probability: equal
/// tokens can hide different logits, equal bits cannot.
async fn run_exact(e: &EngineHandle, req: GenerationRequest) -> (Vec<(u32, u32)>, Usage) {
    let mut rx = e.submit(req).expect("submit");
    let mut out = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            StreamEvent::Tokens { ids, logprobs, .. } => {
                assert_eq!(ids.len(), logprobs.len());
                out.extend(ids.into_iter().zip(logprobs.iter().map(|l| l.to_bits())));
            }
            StreamEvent::Finished { usage, .. } => return (out, usage),
            other => panic!("unexpected event {other:?}"),
        }
    }
    panic!("stream ended without Finished");
}

async fn run(e: &EngineHandle, req: GenerationRequest) -> (Vec<(u32, u32)>, Usage) {
    run_exact(e, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_sequences_generate_exactly_what_they_would_alone() {
    let reqs: Vec<_> = (0..8)
        .map(|i| request("t", prompt(i, 20 + 9 * i), 70, i as u64))
        .collect();
    let roomy = engine(1024);
    let mut solo = Vec::new();
    for r in &reqs {
        solo.push(run(&roomy, r.clone()).await.0);
    }
    assert_eq!(roomy.preemptions(), 0);
    // 8 sequences of up to 20+63+70 tokens (up to 10 blocks each) in 14 blocks: they
    // cannot all hold their KV at once, so decode steps run out and preempt.
    let tight = engine(14);
    let together = futures::future::join_all(reqs.iter().map(|r| run(&tight, r.clone()))).await;
    assert!(
        tight.preemptions() > 0,
        "the budget was meant to force preemptions"
    );
    for (i, ((ids, usage), want)) in together.iter().zip(&solo).enumerate() {
        assert_eq!(
            ids, want,
            "request {i} changed by preemption (token, logprob bits)"
        );
        assert_eq!(usage.completion_tokens as usize, want.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_prefix_is_shared_within_a_tenant_only_and_changes_nothing() {
    let e = engine(256);
    let p = prompt(99, 3 * BLOCK_TOKENS + 5);
    let (first, u1) = run(&e, request("a", p.clone(), 12, 0)).await;
    assert_eq!(u1.cached_prompt_tokens, 0);
    let (again, u2) = run(&e, request("a", p.clone(), 12, 0)).await;
    assert_eq!(
        u2.cached_prompt_tokens as usize,
        3 * BLOCK_TOKENS,
        "every full prompt block came from the cache"
    );
    assert_eq!(again, first, "cached prefix, same tokens");
    let (other, u3) = run(&e, request("b", p.clone(), 12, 0)).await;
    assert_eq!(u3.cached_prompt_tokens, 0, "another tenant never hits");
    assert_eq!(other, first);
    // A prompt that only starts the same way shares the common full blocks.
    let mut longer = p[..2 * BLOCK_TOKENS + 3].to_vec();
    longer.extend(prompt(7, 40));
    let (_, u4) = run(&e, request("a", longer, 4, 0)).await;
    assert_eq!(u4.cached_prompt_tokens as usize, 2 * BLOCK_TOKENS);
    // A prompt of exactly whole blocks still runs its last block (for its logits).
    let whole = prompt(5, 2 * BLOCK_TOKENS);
    run(&e, request("a", whole.clone(), 4, 0)).await;
    let (_, u5) = run(&e, request("a", whole, 4, 0)).await;
    assert_eq!(u5.cached_prompt_tokens as usize, BLOCK_TOKENS);
}

/// The first token of `prompt`, greedy, with its log-probability's bits, from `m` run
/// directly: the prompt's rows through its decode kernel (`decode`) or the exact one.
fn first_token(m: &BaseModel, prompt: &[u32], decode: bool) -> (u32, u32) {
    let mut pool = m.llama.kv_pool(256).expect("KV pool");
    let mut cache = KvCache::new();
    let mut logits = m
        .llama
        .forward_step(
            &mut pool,
            &mut [SeqChunk {
                tokens: prompt,
                cache: &mut cache,
                want_logits: true,
                decode,
                adapter: None,
            }],
        )
        .expect("forward")
        .remove(0);
    let params = request("a", prompt.to_vec(), 1, 0).params;
    let s = Sampler::new(params, m.config().vocab_size, prompt)
        .sample(&mut logits)
        .expect("sample");
    (s.token, s.logprob.to_bits())
}

/// A prompt of at most PACKED_PROMPT_TOKENS is prefilled through the decode kernel, one
/// token longer through the exact packed kernel: under `int16` (fast for a few rows, slow
/// for many) the two differ, and the prefix cache never hands KV computed one way to a
/// prompt of the other kind. (Under the default `exact` they are one path.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_prompts_prefill_through_the_decode_kernel_and_keep_their_own_kv() {
    let m = Arc::new(tiny_with(DecodeKernel::Int16));
    let e = engine_of(m.clone(), 256);
    let first_token = |p: &[u32], decode: bool| first_token(&m, p, decode);
    let short = prompt(11, PACKED_PROMPT_TOKENS);
    let (int16, exact) = (first_token(&short, true), first_token(&short, false));
    assert_ne!(
        int16.1, exact.1,
        "the kernels round differently, so the engine's bits tell which one ran"
    );
    let (out, u) = run_exact(&e, request("a", short.clone(), 1, 0)).await;
    assert_eq!((out[0], u.cached_prompt_tokens), (int16, 0));
    let mut long = short.clone();
    long.push(42);
    let (out, u) = run_exact(&e, request("a", long.clone(), 1, 0)).await;
    assert_eq!(
        u.cached_prompt_tokens, 0,
        "the short prompt's full blocks (int16 KV) are not the long prompt's"
    );
    assert_eq!(out[0], first_token(&long, false));
    // Within a kind, blocks are shared as before.
    let (again, u) = run_exact(&e, request("a", long, 1, 0)).await;
    assert_eq!(u.cached_prompt_tokens as usize, 2 * BLOCK_TOKENS);
    assert_eq!(again, out);
    let mut other_short = short[..BLOCK_TOKENS].to_vec();
    other_short.extend(prompt(12, 5));
    let (out, u) = run_exact(&e, request("a", other_short.clone(), 1, 0)).await;
    assert_eq!(u.cached_prompt_tokens as usize, BLOCK_TOKENS);
    assert_eq!(out[0], first_token(&other_short, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_prefixes_are_evicted_when_running_sequences_need_the_blocks() {
    let e = engine(12);
    for i in 0..6 {
        // 4 full prompt blocks each: 24 published blocks through a 12-block pool.
        let (_, u) = run(&e, request("a", prompt(i, 4 * BLOCK_TOKENS + 1), 8, 0)).await;
        assert_eq!(u.cached_prompt_tokens, 0);
    }
    // The most recent prompt is still cached; the first was evicted.
    let (_, recent) = run(&e, request("a", prompt(5, 4 * BLOCK_TOKENS + 1), 8, 0)).await;
    assert_eq!(recent.cached_prompt_tokens as usize, 4 * BLOCK_TOKENS);
    let (_, old) = run(&e, request("a", prompt(0, 4 * BLOCK_TOKENS + 1), 8, 0)).await;
    assert_eq!(old.cached_prompt_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_whole_pool_is_refused_with_the_numbers() {
    let e = engine(8); // 128 tokens
    assert_eq!(e.kv_capacity_tokens(), 8 * BLOCK_TOKENS);
    let err = e
        .submit(request("a", prompt(1, 100), 40, 0))
        .expect_err("cannot fit");
    assert_eq!(
        err,
        SubmitError::NeverFits {
            needed_tokens: 140,
            prompt_tokens: 100,
            max_new_tokens: 40,
            capacity_tokens: 128,
        }
    );
    let msg = err.to_string();
    assert!(msg.contains("140") && msg.contains("128"), "{msg}");
    // Exactly the pool fits, and runs.
    let (ids, _) = run(&e, request("a", prompt(1, 100), 28, 0)).await;
    assert!(!ids.is_empty());
}
