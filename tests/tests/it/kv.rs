//! The KV budget and the prefix cache over gRPC, with the real model: a shared system prompt
//! is prefilled once per tenant and adapter version, never across tenants (a hit shows in
//! time to first token) or versions, and a request larger than the whole pool is refused.

use graft_client::GenerateOptions;
use graft_proto::v1::GenerateResponse;
use graft_tests::{fixture_adapter, real_model_path, start_real, start_with};
use tonic::Code;

/// A system prompt of about 1,000 tokens: a few-shot preamble as applications send.
fn long_system_prompt() -> String {
    let mut s = String::from("You are a terse assistant. Answer with one word. Examples:\n");
    for i in 0..60 {
        s.push_str(&format!("Q: What number comes after {i}? A: {}\n", i + 1));
    }
    s
}

fn ask(adapter: Option<&str>, question: &str) -> graft_proto::v1::GenerateRequest {
    GenerateOptions {
        adapter: adapter.map(str::to_string),
        ..GenerateOptions::greedy(4)
    }
    .chat([
        ("system", long_system_prompt()),
        ("user", question.to_string()),
    ])
}

fn cached(r: &GenerateResponse) -> u32 {
    r.usage.expect("usage").cached_prompt_tokens
}

fn ttft(r: &GenerateResponse) -> f64 {
    r.timings.expect("timings").time_to_first_token_seconds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_reused_by_its_tenant_and_never_by_another() {
    let t = start_real().await;
    let a = t.tenant("kv-a").await;
    let b = t.tenant("kv-b").await;
    let cold = a.generate(ask(None, "What is 2+2?")).await.expect("a cold");
    let prompt = cold.usage.expect("usage").prompt_tokens;
    assert!(prompt > 900, "the preamble is long ({prompt} tokens)");
    assert_eq!(cached(&cold), 0);
    let warm = a.generate(ask(None, "What is 3+3?")).await.expect("a warm");
    // Everything up to the last full block before the question differs.
    assert!(
        cached(&warm) + 48 >= prompt && cached(&warm).is_multiple_of(16),
        "cached {} of {prompt}",
        cached(&warm)
    );
    let other = b.generate(ask(None, "What is 2+2?")).await.expect("b");
    assert_eq!(cached(&other), 0, "another tenant's prompt never hits");
    assert_eq!(
        other.token_ids, cold.token_ids,
        "same prompt, same answer for b"
    );
    let again = a
        .generate(ask(None, "What is 2+2?"))
        .await
        .expect("a again");
    assert_eq!(again.token_ids, cold.token_ids, "a hit changes no token");
    // What the cache hides from b is visible in time: a's hit is several times faster
    // than its own cold prefill, and b's request is as slow as a cold one.
    let (t_cold, t_warm, t_other) = (ttft(&cold), ttft(&again), ttft(&other));
    assert!(
        t_warm * 3.0 < t_cold,
        "a hit is fast: {t_warm:.3}s vs cold {t_cold:.3}s"
    );
    assert!(
        t_other > 3.0 * t_warm,
        "b is not faster for a's prompt: {t_other:.3}s vs a's hit {t_warm:.3}s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_is_per_adapter_version() {
    let t = start_real().await;
    let (c, w) = fixture_adapter();
    t.client
        .import_adapter("", "kv-answers", c.clone(), w.clone(), false)
        .await
        .expect("v1");
    let v1 = t
        .client
        .generate(ask(Some("kv-answers"), "Hi?"))
        .await
        .expect("v1");
    assert_eq!(cached(&v1), 0);
    let v1b = t
        .client
        .generate(ask(Some("kv-answers"), "Hi?"))
        .await
        .expect("v1 again");
    assert!(cached(&v1b) > 0, "same version: hit");
    assert_eq!(v1b.token_ids, v1.token_ids);
    // The base model's KV for the same prompt is another salt.
    let base = t.client.generate(ask(None, "Hi?")).await.expect("base");
    assert_eq!(
        cached(&base),
        0,
        "the adapter's blocks never serve the base"
    );
    // A new version (other content) starts cold, and the old one is still cached.
    let mut cfg: serde_json::Value = serde_json::from_slice(&c).expect("config");
    cfg["lora_alpha"] = serde_json::json!(8);
    let v2 = t
        .client
        .import_adapter(
            "",
            "kv-answers",
            serde_json::to_vec(&cfg).expect("json"),
            w,
            false,
        )
        .await
        .expect("v2");
    assert_eq!(v2.version, 2);
    let on_v2 = t
        .client
        .generate(ask(Some("kv-answers"), "Hi?"))
        .await
        .expect("v2");
    assert_eq!(cached(&on_v2), 0, "never stale after a new version");
    let on_v1 = t
        .client
        .generate(ask(Some("kv-answers@1"), "Hi?"))
        .await
        .expect("v1 pinned");
    assert!(cached(&on_v1) > 0);
    assert_eq!(on_v1.token_ids, v1.token_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_kv_pool_is_refused_at_once() {
    // 8 blocks of 16 tokens.
    let t = start_with(real_model_path(), |c| {
        c.engine.kv_cache_bytes = 8 * 16 * 46_080
    })
    .await;
    let err = t
        .client
        .generate(GenerateOptions::greedy(200).prompt("Tell me a story."))
        .await
        .expect_err("cannot fit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("128") && err.message().contains("max_new_tokens 200"),
        "{}",
        err.message()
    );
    let ok = t
        .client
        .generate(GenerateOptions::greedy(8).prompt("Tell me a story."))
        .await
        .expect("fits");
    assert!(!ok.token_ids.is_empty());
}
