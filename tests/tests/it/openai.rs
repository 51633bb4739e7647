//! The OpenAI-compatible HTTP front, driven by a maintained OpenAI client (`async-openai`)
//! and, where a status line or header matters, by raw HTTP/1.1. What it answers is held to
//! what gRPC answers for the same request on the same server.

use std::{net::SocketAddr, time::Duration};

use async_openai::{
    config::OpenAIConfig,
    error::OpenAIError,
    types::chat::{
        ChatCompletionRequestMessage, ChatCompletionRequestSystemMessageArgs,
        ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
        CreateChatCompletionRequest, CreateChatCompletionRequestArgs, FinishReason,
    },
    types::completions::CreateCompletionRequestArgs,
    Client,
};
use futures::StreamExt;
use graft_client::GenerateOptions;
use graft_proto::v1 as pb;
use graft_tests::{fixture_adapter, real_model_path, start_with, TestServer, TENANT};
use serde_json::Value;

/// A real-model server with the HTTP front on, and a fresh key of [`TENANT`].
async fn start() -> (TestServer, String) {
    let ts = start_with(real_model_path(), |c| {
        c.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)))
    })
    .await;
    let key = ts.admin.create_key(TENANT, "openai").await.expect("key");
    (ts, key)
}

fn http_addr(ts: &TestServer) -> SocketAddr {
    ts.server.http_addr.expect("the HTTP front is on")
}

fn client(ts: &TestServer, key: &str) -> Client<OpenAIConfig> {
    // reqwest's rustls without a provider of its own: ring, as the rest of the tree.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{}/v1", http_addr(ts)))
            .with_api_key(key),
    )
}

/// `(status, headers, body)` of one raw HTTP/1.1 request.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, String, String) {
    graft_tests::http_json(addr, method, path, key, body.as_ref()).await
}

/// The error object of an answer: `(type, param)`.
fn error_of(body: &str) -> (String, Option<String>) {
    let v: Value = serde_json::from_str(body).expect("json error body");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    (
        e["type"].as_str().unwrap_or_default().to_string(),
        e["param"].as_str().map(str::to_string),
    )
}

fn api_error(e: OpenAIError) -> (u16, Option<String>) {
    match e {
        OpenAIError::ApiError(r) => (r.status_code.as_u16(), r.api_error.param),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default()
        .content(text)
        .build()
        .expect("message")
        .into()
}

const QUESTION: &str = "What is the capital of Australia?";

fn greedy_chat(model: &str, max: u32) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages(vec![
            ChatCompletionRequestSystemMessageArgs::default()
                .content("You are a helpful assistant.")
                .build()
                .expect("system")
                .into(),
            user(QUESTION),
        ])
        .temperature(0.0)
        .max_completion_tokens(max)
        .build()
        .expect("request")
}

/// The same chat over gRPC.
async fn grpc_chat(
    ts: &TestServer,
    adapter: Option<&str>,
    opts: GenerateOptions,
) -> pb::GenerateResponse {
    let opts = GenerateOptions {
        adapter: adapter.map(str::to_string),
        ..opts
    };
    ts.client
        .generate(opts.chat([
            ("system", "You are a helpful assistant."),
            ("user", QUESTION),
        ]))
        .await
        .expect("gRPC generate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_answer_as_grpc_does_for_the_base_and_an_adapter() {
    let (ts, key) = start().await;
    let (cfg, w) = fixture_adapter();
    ts.client
        .import_adapter("", "answers", cfg, w, false)
        .await
        .expect("import");
    let oa = client(&ts, &key);
    let base_name = ts.server.engine().expect("ready").model().name.clone();
    for (model, adapter) in [(base_name.as_str(), None), ("answers", Some("answers"))] {
        let resp = oa
            .chat()
            .create(greedy_chat(model, 24))
            .await
            .expect("chat completion");
        let want = grpc_chat(&ts, adapter, GenerateOptions::greedy(24)).await;
        assert_eq!(resp.object, "chat.completion");
        assert_eq!(resp.model, model);
        assert_eq!(resp.choices.len(), 1);
        let choice = &resp.choices[0];
        assert_eq!(choice.message.content.as_deref(), Some(want.text.as_str()));
        let usage = resp.usage.expect("usage");
        let wu = want.usage.expect("gRPC usage");
        assert_eq!(usage.prompt_tokens, wu.prompt_tokens);
        assert_eq!(usage.completion_tokens, wu.completion_tokens);
        assert_eq!(usage.total_tokens, wu.prompt_tokens + wu.completion_tokens);
        let reason = if want.finish_reason == pb::FinishReason::Length as i32 {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        assert_eq!(choice.finish_reason, Some(reason));
    }
    // The adapter really is what answered: its answer is in the fixture's trained form.
    let adapted = oa
        .chat()
        .create(greedy_chat("answers", 24))
        .await
        .expect("adapter");
    let text = adapted.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    assert!(text.starts_with("ANSWER:"), "{text}");
    // name@version names the same version.
    let pinned = oa
        .chat()
        .create(greedy_chat("answers@1", 24))
        .await
        .expect("pinned");
    assert_eq!(
        pinned.choices[0].message.content.as_deref(),
        Some(text.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_is_the_unary_answer_in_chunks_with_usage_and_done() {
    let (ts, key) = start().await;
    let oa = client(&ts, &key);
    let base = ts.server.engine().expect("ready").model().name.clone();
    let unary = oa
        .chat()
        .create(greedy_chat(&base, 32))
        .await
        .expect("unary");
    let mut req = greedy_chat(&base, 32);
    // Set by hand: with async-openai's `byot` feature (the training tests use it) the
    // client does not set it.
    req.stream = Some(true);
    req.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    let mut stream = oa.chat().create_stream(req).await.expect("stream");
    let (mut text, mut roles, mut finish, mut usage, mut chunks) =
        (String::new(), 0, None, None, 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        chunks += 1;
        assert_eq!(chunk.object, "chat.completion.chunk");
        assert_eq!(chunk.id, chunk.id.clone());
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty(), "the usage chunk has no choices");
            usage = Some(u);
        }
        for c in chunk.choices {
            roles += usize::from(c.delta.role.is_some());
            text.push_str(c.delta.content.as_deref().unwrap_or(""));
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
    }
    assert!(chunks > 3, "streamed in pieces: {chunks} chunks");
    assert_eq!(roles, 1, "the role comes once, first");
    assert_eq!(
        Some(text.as_str()),
        unary.choices[0].message.content.as_deref()
    );
    assert_eq!(finish, unary.choices[0].finish_reason);
    let (u, uu) = (usage.expect("usage chunk"), unary.usage.expect("usage"));
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens),
        (uu.prompt_tokens, uu.completion_tokens)
    );
    // On the wire: `data: [DONE]` ends it.
    let (status, head, body) = raw(
        http_addr(&ts),
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(serde_json::json!({
            "model": base, "stream": true, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}],
        })),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("text/event-stream"),
        "{head}"
    );
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_separate_seeded_sequences_and_logprobs_match_grpc() {
    let (ts, key) = start().await;
    let oa = client(&ts, &key);
    let base = ts.server.engine().expect("ready").model().name.clone();
    let req = CreateChatCompletionRequestArgs::default()
        .model(&base)
        .messages(vec![user("Write a short poem about the sea.")])
        .temperature(1.0)
        .seed(41)
        .n(3)
        .max_tokens(12u32)
        .logprobs(true)
        .top_logprobs(3)
        .build()
        .expect("request");
    let resp = oa.chat().create(req).await.expect("n = 3");
    assert_eq!(resp.choices.len(), 3);
    let mut texts = Vec::new();
    for (i, c) in resp.choices.iter().enumerate() {
        assert_eq!(c.index as usize, i);
        // Choice i is the request with seed 41 + i.
        let want = ts
            .client
            .generate(
                GenerateOptions {
                    max_new_tokens: Some(12),
                    temperature: Some(1.0),
                    seed: Some(41 + i as u64),
                    logprobs: true,
                    top_logprobs: 3,
                    ..Default::default()
                }
                .chat([("user", "Write a short poem about the sea.")]),
            )
            .await
            .expect("gRPC");
        let text = c.message.content.clone().unwrap_or_default();
        assert_eq!(text, want.text, "choice {i}");
        let lp = c
            .logprobs
            .as_ref()
            .expect("logprobs")
            .content
            .as_ref()
            .expect("content");
        assert_eq!(lp.len(), want.logprobs.len(), "one entry per token");
        for (j, (entry, want_lp)) in lp.iter().zip(&want.logprobs).enumerate() {
            assert_eq!(entry.logprob, *want_lp, "choice {i} token {j}");
            assert_eq!(entry.top_logprobs.len(), 3);
            assert!(entry.top_logprobs[0].logprob >= entry.top_logprobs[2].logprob);
            assert!(entry.logprob <= entry.top_logprobs[0].logprob);
        }
        let joined: String = lp.iter().map(|e| e.token.as_str()).collect();
        assert_eq!(joined, text, "tokens spell the text");
        texts.push(text);
    }
    texts.dedup();
    assert!(
        texts.len() > 1,
        "different seeds, different choices: {texts:?}"
    );
    let usage = resp.usage.expect("usage");
    let one = ts
        .client
        .generate(GenerateOptions::greedy(1).chat([("user", "Write a short poem about the sea.")]))
        .await
        .expect("prompt size");
    assert_eq!(
        usage.prompt_tokens,
        one.usage.expect("usage").prompt_tokens,
        "the prompt is counted once"
    );
    assert_eq!(usage.completion_tokens, 36);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_take_a_raw_prompt_with_legacy_logprobs_and_stream() {
    let (ts, key) = start().await;
    let oa = client(&ts, &key);
    let base = ts.server.engine().expect("ready").model().name.clone();
    let prompt = "The three primary colours are";
    let req = CreateCompletionRequestArgs::default()
        .model(&base)
        .prompt(prompt)
        .max_tokens(10u32)
        .temperature(0.0)
        .logprobs(2u8)
        .build()
        .expect("request");
    let resp = oa
        .completions()
        .create(req.clone())
        .await
        .expect("completion");
    let want = ts
        .client
        .generate(
            GenerateOptions {
                logprobs: true,
                ..GenerateOptions::greedy(10)
            }
            .prompt(prompt),
        )
        .await
        .expect("gRPC");
    assert_eq!(resp.object, "text_completion");
    assert_eq!(resp.choices[0].text, want.text);
    let lp = resp.choices[0].logprobs.as_ref().expect("logprobs");
    let tokens = lp.tokens.clone();
    assert_eq!(tokens.concat(), want.text);
    let token_logprobs: Vec<f32> = lp
        .token_logprobs
        .iter()
        .map(|x| x.expect("a logprob"))
        .collect();
    assert_eq!(token_logprobs, want.logprobs);
    let tops = lp.top_logprobs.clone();
    assert!(
        tops.iter()
            .all(|t| t.as_object().is_some_and(|m| m.len() <= 2 && !m.is_empty())),
        "{tops:?}"
    );
    let offsets = lp.text_offset.clone();
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[1] as usize, tokens[0].len());
    // Streamed: the same text.
    let mut req = req;
    req.stream = Some(true);
    let mut s = oa.completions().create_stream(req).await.expect("stream");
    let mut text = String::new();
    while let Some(c) = s.next().await {
        for ch in c.expect("chunk").choices {
            text.push_str(&ch.text);
        }
    }
    assert_eq!(text, want.text);
    // A list of prompts: one choice each, in order.
    let two = oa
        .completions()
        .create(
            CreateCompletionRequestArgs::default()
                .model(&base)
                .prompt(vec![prompt, "Once upon a time"])
                .max_tokens(4u32)
                .temperature(0.0)
                .build()
                .expect("request"),
        )
        .await
        .expect("two prompts");
    assert_eq!(two.choices.len(), 2);
    assert!(
        want.text.starts_with(&two.choices[0].text) && !two.choices[0].text.is_empty(),
        "the first prompt's greedy start: {:?} vs {:?}",
        two.choices[0].text,
        want.text
    );
    assert_ne!(two.choices[0].text, two.choices[1].text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_and_presence_penalties_cut_repetition() {
    let (ts, key) = start().await;
    let oa = client(&ts, &key);
    let base = ts.server.engine().expect("ready").model().name.clone();
    // A prompt the base continues by counting on, greedily: a comma every few tokens.
    let ask = |penalty: Option<(f32, f32)>| {
        let mut r = CreateCompletionRequestArgs::default();
        r.model(&base)
            .prompt("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,")
            .temperature(0.0)
            .max_tokens(32u32)
            .logprobs(0u8);
        if let Some((f, p)) = penalty {
            r.frequency_penalty(f).presence_penalty(p);
        }
        r.build().expect("request")
    };
    // The most often generated token of an answer, and how often.
    let most_repeated = |r: &async_openai::types::completions::CreateCompletionResponse| {
        let mut counts = std::collections::HashMap::new();
        for t in &r.choices[0].logprobs.as_ref().expect("logprobs").tokens {
            *counts.entry(t.clone()).or_insert(0) += 1;
        }
        counts.into_values().max().unwrap_or(0)
    };
    let plain = oa.completions().create(ask(None)).await.expect("plain");
    let penalised = oa
        .completions()
        .create(ask(Some((1.5, 1.0))))
        .await
        .expect("penalised");
    let (a, b) = (most_repeated(&plain), most_repeated(&penalised));
    assert!(
        a >= 8,
        "the plain answer repeats: {a} ({:?})",
        plain.choices[0].text
    );
    assert!(
        b * 2 < a,
        "penalties cut repetition: {b} vs {a} ({:?})",
        penalised.choices[0].text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_the_base_and_only_the_callers_adapters() {
    let (ts, key) = start().await;
    let (cfg, w) = fixture_adapter();
    ts.client
        .import_adapter("", "mine", cfg.clone(), w.clone(), false)
        .await
        .expect("import");
    ts.client
        .import_adapter("", "mine", cfg.clone(), w.clone(), false)
        .await
        .expect("second version");
    let other = ts.tenant("other").await;
    other
        .import_adapter("", "theirs", cfg, w, false)
        .await
        .expect("import");
    let oa = client(&ts, &key);
    let list = oa.models().list().await.expect("models");
    let ids: Vec<&str> = list.data.iter().map(|m| m.id.as_str()).collect();
    let base = ts.server.engine().expect("ready").model().name.clone();
    assert_eq!(
        ids,
        vec![base.as_str(), "mine"],
        "each name once, never another tenant's"
    );
    assert_eq!(oa.models().retrieve("mine").await.expect("mine").id, "mine");
    assert_eq!(
        oa.models().retrieve("mine@2").await.expect("mine@2").id,
        "mine@2"
    );
    for missing in ["theirs", "nothing", "mine@3"] {
        let e = oa.models().retrieve(missing).await.expect_err("not ours");
        assert_eq!(api_error(e).0, 404, "{missing}");
        // A foreign model is answered as a missing one, in chat too.
        let e = oa
            .chat()
            .create(greedy_chat(missing, 4))
            .await
            .expect_err("foreign model");
        assert_eq!(api_error(e).0, 404, "{missing}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let (ts, key) = start().await;
    let addr = http_addr(&ts);
    let base = ts.server.engine().expect("ready").model().name.clone();
    let chat = |extra: Value| {
        let mut body = serde_json::json!({
            "model": base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
        });
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };
    // No key, a wrong key.
    let (s, _, body) = raw(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        Some(chat(serde_json::json!({}))),
    )
    .await;
    assert_eq!(s, 401, "{body}");
    let (s, _, _) = raw(addr, "GET", "/v1/models", Some("graft_nope_nope"), None).await;
    assert_eq!(s, 401);
    for (extra, param) in [
        (serde_json::json!({"temperature": -1}), "temperature"),
        (serde_json::json!({"top_p": 0}), "top_p"),
        (serde_json::json!({"n": 9}), "n"),
        (
            serde_json::json!({"presence_penalty": 3}),
            "presence_penalty",
        ),
        (
            serde_json::json!({"frequency_penalty": -2.5}),
            "frequency_penalty",
        ),
        (serde_json::json!({"max_tokens": 0}), "max_tokens"),
        (
            serde_json::json!({"max_completion_tokens": 100000}),
            "max_completion_tokens",
        ),
        (
            serde_json::json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (serde_json::json!({"stop": ["", "x"]}), "stop[0]"),
        (serde_json::json!({"messages": []}), "messages"),
        (
            serde_json::json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0].type",
        ),
        (serde_json::json!({"model": ""}), "model"),
        (serde_json::json!({"model": "bad name!"}), "model"),
        (serde_json::json!({"temperature": "hot"}), "temperature"),
        (
            serde_json::json!({"tools": [{"type": "function"}]}),
            "tools",
        ),
        (serde_json::json!({"logit_bias": {"1": 5}}), "logit_bias"),
        (
            serde_json::json!({"response_format": {"type": "xml"}}),
            "response_format.type",
        ),
    ] {
        let (s, _, body) = raw(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat(extra.clone())),
        )
        .await;
        assert_eq!(s, 400, "{extra}: {body}");
        let (kind, p) = error_of(&body);
        assert_eq!(kind, "invalid_request_error", "{extra}");
        assert_eq!(p.as_deref(), Some(param), "{extra}: {body}");
    }
    // A missing required field, and not JSON at all.
    let (s, _, body) = raw(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(serde_json::json!({"model": base})),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("messages"), "{body}");
    // Completions' own fields.
    for (extra, param) in [
        (serde_json::json!({"prompt": [1, 2, 3]}), "prompt"),
        (serde_json::json!({"prompt": "x", "echo": true}), "echo"),
        (
            serde_json::json!({"prompt": "x", "logprobs": 6}),
            "logprobs",
        ),
        (serde_json::json!({"prompt": "x", "suffix": "y"}), "suffix"),
    ] {
        let mut body = serde_json::json!({"model": base, "max_tokens": 2});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (s, _, resp) = raw(addr, "POST", "/v1/completions", Some(&key), Some(body)).await;
        assert_eq!(s, 400, "{extra}: {resp}");
        assert_eq!(error_of(&resp).1.as_deref(), Some(param), "{extra}");
    }
    // A path graft does not serve.
    let (s, _, body) = raw(addr, "GET", "/v1/embeddings", Some(&key), None).await;
    assert_eq!(s, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_stream_quota_gets_429_with_retry_after() {
    let (ts, key) = start().await;
    ts.admin
        .admin()
        .set_quotas(pb::SetQuotasRequest {
            tenant: TENANT.into(),
            quotas: Some(pb::Quotas {
                max_concurrent_streams: Some(1),
                ..Default::default()
            }),
            reset: false,
        })
        .await
        .expect("quota");
    let addr = http_addr(&ts);
    let base = ts.server.engine().expect("ready").model().name.clone();
    // One stream holds the only slot (its first chunk has come) while a second asks.
    let oa = client(&ts, &key);
    let mut held = oa
        .chat()
        .create_stream(
            CreateChatCompletionRequestArgs::default()
                .model(&base)
                .messages(vec![user("Tell me a long story about a dragon.")])
                .temperature(0.0)
                .max_tokens(150u32)
                .stream(true)
                .build()
                .expect("request"),
        )
        .await
        .expect("the first stream");
    held.next().await.expect("a first chunk").expect("ok");
    let (s, head, resp) = raw(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(serde_json::json!({
            "model": base, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}],
        })),
    )
    .await;
    assert_eq!(s, 429, "{resp}");
    let retry = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .map(|v| v.trim().to_string())
        })
        .expect("Retry-After header");
    assert!(retry.parse::<u64>().is_ok_and(|s| s >= 1), "{retry}");
    let v: Value = serde_json::from_str(&resp).expect("json");
    assert_eq!(v["error"]["code"], "max_concurrent_streams", "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    // The first stream goes on to its end; then the slot is free again.
    while let Some(chunk) = held.next().await {
        chunk.expect("the held stream is unharmed");
    }
    drop(held);
    let mut ok = false;
    for _ in 0..100 {
        let (s, _, _) = raw(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(serde_json::json!({
                "model": base, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}],
            })),
        )
        .await;
        if s == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the slot came back");
}
