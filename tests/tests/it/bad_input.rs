//! Bad input gets INVALID_ARGUMENT naming the field (or the right other code), and the
//! server keeps answering. Uses the tiny model: these tests are about the edge, not the math.

use std::time::Duration;

use futures::future::join_all;
use graft_client::{proto, proto::generate_request::Constraint, GenerateOptions};
use graft_tests::{start_tiny, start_with, tiny_model_path};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tonic::Code;
use tonic_types::StatusExt;

fn base() -> proto::GenerateRequest {
    GenerateOptions::greedy(4).prompt("hello")
}

fn with(f: impl FnOnce(&mut proto::SamplingParameters)) -> proto::GenerateRequest {
    let mut r = base();
    f(r.parameters.as_mut().expect("params"));
    r
}

fn assert_invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(field),
        "message {:?} names {field}",
        status.message()
    );
    let br = status
        .get_details_bad_request()
        .expect("BadRequest details");
    assert_eq!(br.field_violations[0].field, field);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_field_is_named() {
    let t = start_tiny().await;
    let msg = |role: &str| proto::ChatMessage {
        role: role.into(),
        content: "x".into(),
    };
    let cases: Vec<(proto::GenerateRequest, &str)> = vec![
        (
            proto::GenerateRequest {
                prompt: String::new(),
                ..base()
            },
            "prompt",
        ),
        (
            proto::GenerateRequest {
                messages: vec![msg("user")],
                ..base()
            },
            "prompt",
        ),
        (
            proto::GenerateRequest {
                prompt: String::new(),
                messages: vec![msg("user"), msg("robot")],
                ..base()
            },
            "messages[1].role",
        ),
        (
            proto::GenerateRequest {
                prompt: String::new(),
                raw_prompt: vec![b'a', 0xC3, 0x28],
                ..base()
            },
            "raw_prompt",
        ),
        (
            with(|p| p.max_new_tokens = Some(0)),
            "parameters.max_new_tokens",
        ),
        (
            with(|p| p.max_new_tokens = Some(1_000_000)),
            "parameters.max_new_tokens",
        ),
        (
            with(|p| p.temperature = Some(-1.0)),
            "parameters.temperature",
        ),
        (
            with(|p| p.temperature = Some(f32::NAN)),
            "parameters.temperature",
        ),
        (with(|p| p.top_p = Some(0.0)), "parameters.top_p"),
        (with(|p| p.top_p = Some(1.01)), "parameters.top_p"),
        (with(|p| p.top_k = Some(-3)), "parameters.top_k"),
        (
            with(|p| p.repetition_penalty = Some(-1.0)),
            "parameters.repetition_penalty",
        ),
        (with(|p| p.stop = vec!["s".into(); 9]), "parameters.stop"),
        (
            with(|p| p.stop = vec!["ok".into(), "x".repeat(300)]),
            "parameters.stop[1]",
        ),
    ];
    for (req, field) in cases {
        let err = t.client.generate(req.clone()).await.expect_err(field);
        assert_invalid(&err, field);
        let err = t.client.generate_stream(req).await.expect_err(field);
        assert_invalid(&err, field);
    }
    // Still serving.
    t.client.generate(base()).await.expect("still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_context_names_both_numbers() {
    let t = start_tiny().await;
    let long = "a b c d ".repeat(200);
    let err = t
        .client
        .generate(GenerateOptions::greedy(4).prompt(long))
        .await
        .expect_err("too long");
    assert_invalid(&err, "prompt");
    assert!(err.message().contains("512"), "{}", err.message());
    assert!(err.message().contains("1600"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_adapter_is_not_found() {
    let t = start_tiny().await;
    let opts = GenerateOptions {
        adapter: Some("nobody@3".into()),
        ..GenerateOptions::greedy(4)
    };
    let err = t
        .client
        .generate(opts.prompt("hi"))
        .await
        .expect_err("no adapter");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted_with_a_retry_hint() {
    let t = start_with(tiny_model_path(), |c| {
        c.engine.max_active_sequences = 1;
        c.engine.max_queued_requests = 2;
    })
    .await;
    let results = join_all((0..24).map(|_| {
        let c = t.client.clone();
        async move { c.generate(GenerateOptions::greedy(400).prompt("go")).await }
    }))
    .await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!refused.is_empty(), "nothing was refused");
    for e in &refused {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        let retry = e.get_details_retry_info().expect("RetryInfo");
        assert!(retry.retry_delay.expect("delay") > Duration::ZERO);
    }
    assert!(results.iter().any(|r| r.is_ok()));
}

/// Thousands of random requests, valid and not: never a panic or INTERNAL, and the server
/// keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_never_break_the_server() {
    let t = start_tiny().await;
    let mut rng = StdRng::seed_from_u64(0xF022);
    let pick_f = |rng: &mut StdRng| -> Option<f32> {
        match rng.random_range(0..10) {
            0..=4 => None,
            5 => Some(f32::NAN),
            6 => Some(f32::INFINITY),
            7 => Some(-rng.random::<f32>() * 5.0),
            _ => Some(1.0 - rng.random::<f32>() * 0.9),
        }
    };
    let mut reqs = Vec::new();
    for _ in 0..3000 {
        let text_len = rng.random_range(0..40);
        let prompt: String = (0..text_len)
            .map(|_| char::from_u32(rng.random_range(0..0x3000)).unwrap_or('?'))
            .collect();
        let raw: Vec<u8> = if rng.random_bool(0.2) {
            (0..rng.random_range(0..10)).map(|_| rng.random()).collect()
        } else {
            vec![]
        };
        let roles = ["user", "system", "assistant", "", "USER", "tool"];
        let messages = (0..rng.random_range(0..3))
            .map(|_| proto::ChatMessage {
                role: roles[rng.random_range(0..roles.len())].into(),
                content: "hi".into(),
            })
            .collect();
        reqs.push(proto::GenerateRequest {
            prompt: if rng.random_bool(0.7) {
                prompt
            } else {
                String::new()
            },
            raw_prompt: raw,
            messages,
            tenant: if rng.random_bool(0.05) {
                "../etc".into()
            } else {
                String::new()
            },
            adapter: if rng.random_bool(0.05) {
                "x".into()
            } else {
                String::new()
            },
            parameters: Some(proto::SamplingParameters {
                max_new_tokens: match rng.random_range(0..5) {
                    0 => None,
                    1 => Some(0),
                    2 => Some(u32::MAX),
                    _ => Some(rng.random_range(1..4)),
                },
                temperature: pick_f(&mut rng),
                top_p: pick_f(&mut rng),
                top_k: if rng.random_bool(0.5) {
                    Some(rng.random_range(-5..50))
                } else {
                    None
                },
                repetition_penalty: pick_f(&mut rng),
                stop: (0..rng.random_range(0..3))
                    .map(|i| "ab".repeat(i))
                    .collect(),
                seed: Some(rng.random()),
                logprobs: rng.random(),
                presence_penalty: pick_f(&mut rng).filter(|_| rng.random_bool(0.3)),
                frequency_penalty: pick_f(&mut rng).filter(|_| rng.random_bool(0.3)),
                top_logprobs: if rng.random_bool(0.2) {
                    rng.random_range(0..25)
                } else {
                    0
                },
            }),
            // Now and then a constraint, valid or not.
            constraint: match rng.random_range(0..40) {
                0 => Some(Constraint::Regex("[a-z]{1,3}".into())),
                1 => Some(Constraint::Regex("(".into())),
                2 => Some(Constraint::JsonObject(rng.random())),
                3 => Some(Constraint::JsonSchema("{\"type\": 7}".into())),
                _ => None,
            },
        });
    }
    let mut ok = 0;
    for batch in reqs.chunks(16) {
        let results = join_all(batch.iter().map(|r| {
            let c = t.client.clone();
            let r = r.clone();
            async move { c.generate(r).await }
        }))
        .await;
        for r in results {
            match r {
                Ok(_) => ok += 1,
                Err(e) => assert!(
                    matches!(
                        e.code(),
                        Code::InvalidArgument
                            | Code::NotFound
                            | Code::ResourceExhausted
                            | Code::PermissionDenied
                    ),
                    "unexpected {e:?}"
                ),
            }
        }
    }
    assert!(ok > 20, "only {ok} requests succeeded");
    t.client.generate(base()).await.expect("still answers");
}
