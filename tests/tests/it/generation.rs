//! Generation through gRPC with the real SmolLM2: answers, streaming, seeds, stops,
//! concurrency, cancellation, deadlines.

use std::time::Duration;

use futures::future::join_all;
use graft_client::{proto, GenerateOptions};
use graft_tests::{eventually, start_real};

fn france() -> Vec<(&'static str, &'static str)> {
    vec![("user", "What is the capital of France?")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_sensibly_and_reports_usage() {
    let t = start_real().await;
    let r = t
        .client
        .generate(GenerateOptions::greedy(24).chat(france()))
        .await
        .expect("generate");
    assert!(r.text.contains("Paris"), "answer: {:?}", r.text);
    let usage = r.usage.expect("usage");
    assert!(usage.prompt_tokens > 20);
    assert_eq!(usage.completion_tokens as usize, r.token_ids.len());
    let fr = proto::FinishReason::try_from(r.finish_reason).expect("enum");
    assert!(matches!(
        fr,
        proto::FinishReason::Eos | proto::FinishReason::Length
    ));
    let timings = r.timings.expect("timings");
    assert!(timings.total_seconds >= timings.time_to_first_token_seconds);
    assert!(timings.time_to_first_token_seconds > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_pieces_add_up_to_the_unary_answer() {
    let t = start_real().await;
    let opts = GenerateOptions {
        max_new_tokens: Some(20),
        temperature: Some(0.8),
        seed: Some(42),
        logprobs: true,
        ..Default::default()
    };
    let unary = t
        .client
        .generate(opts.chat(france()))
        .await
        .expect("generate");
    let mut stream = t
        .client
        .generate_stream(opts.chat(france()))
        .await
        .expect("stream");
    let (mut text, mut ids, mut logprobs, mut last) = (String::new(), vec![], vec![], None);
    let mut messages = 0;
    while let Some(m) = stream.message().await.expect("message") {
        assert!(last.is_none(), "a message after the final one");
        messages += 1;
        text.push_str(&m.text);
        ids.extend(m.token_ids.iter().copied());
        logprobs.extend(m.logprobs.iter().copied());
        if m.finish_reason != 0 {
            last = Some(m);
        }
    }
    let last = last.expect("final message");
    assert!(messages > 2, "streamed in pieces");
    assert_eq!(text, unary.text);
    assert_eq!(ids, unary.token_ids);
    assert_eq!(logprobs.len(), ids.len());
    assert!(logprobs.iter().all(|l| *l <= 0.0 && l.is_finite()));
    assert_eq!(
        last.usage.expect("usage").completion_tokens as usize,
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_output_other_seed_other_output() {
    let t = start_real().await;
    let run = |seed| {
        let opts = GenerateOptions {
            max_new_tokens: Some(16),
            temperature: Some(1.0),
            seed: Some(seed),
            ..Default::default()
        };
        let c = t.client.clone();
        async move {
            c.generate(opts.prompt("Once upon a time"))
                .await
                .expect("generate")
                .token_ids
        }
    };
    let a = run(7).await;
    assert_eq!(a, run(7).await);
    assert_ne!(a, run(8).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequence_ends_the_answer_before_it() {
    let t = start_real().await;
    let free = t
        .client
        .generate(GenerateOptions::greedy(24).chat(france()))
        .await
        .expect("generate");
    let at = free.text.find("Paris").expect("mentions Paris");
    let opts = GenerateOptions {
        stop: vec!["Paris".into(), "zzzz-never".into()],
        ..GenerateOptions::greedy(24)
    };
    let stopped = t
        .client
        .generate(opts.chat(france()))
        .await
        .expect("generate");
    assert_eq!(stopped.text, free.text[..at]);
    assert_eq!(stopped.finish_reason, proto::FinishReason::Stop as i32);
}

/// 16 requests (greedy and seeded sampling) give the same tokens alone and all together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_match_their_solo_runs() {
    let t = start_real().await;
    let subjects = [
        "the sea",
        "a cat",
        "Rust",
        "bread",
        "winter",
        "music",
        "trains",
        "the moon",
        "coffee",
        "a library",
        "rain",
        "chess",
        "volcanoes",
        "bees",
        "maps",
        "clocks",
    ];
    let reqs: Vec<_> = subjects
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let opts = GenerateOptions {
                max_new_tokens: Some(10),
                temperature: Some(if i % 2 == 0 { 0.0 } else { 0.9 }),
                top_p: Some(0.95),
                seed: Some(i as u64),
                ..Default::default()
            };
            opts.chat([("user", format!("Write one sentence about {s}."))])
        })
        .collect();
    let mut solo = Vec::new();
    for r in &reqs {
        solo.push(t.client.generate(r.clone()).await.expect("solo").token_ids);
    }
    let together = join_all(reqs.iter().map(|r| {
        let c = t.client.clone();
        let r = r.clone();
        async move {
            let mut s = c.generate_stream(r).await.expect("stream");
            let mut ids = Vec::new();
            while let Some(m) = s.message().await.expect("message") {
                ids.extend(m.token_ids);
            }
            ids
        }
    }))
    .await;
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i} differs when batched with 15 others");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_its_sequence() {
    let t = start_real().await;
    let engine = t.server.engine().expect("engine").clone();
    let opts = GenerateOptions::greedy(2000);
    let mut s = t
        .client
        .generate_stream(opts.prompt("Count from 1 to 1000: 1, 2, 3, 4,"))
        .await
        .expect("stream");
    for _ in 0..3 {
        s.message().await.expect("message").expect("some");
    }
    assert_eq!(engine.in_flight(), 1);
    drop(s);
    assert!(
        eventually(Duration::from_secs(10), || engine.in_flight() == 0).await,
        "sequence still in flight after the client left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_is_honoured() {
    let t = start_real().await;
    let engine = t.server.engine().expect("engine").clone();
    let mut req = tonic::Request::new(
        GenerateOptions::greedy(2000).prompt("Count from 1 to 1000: 1, 2, 3, 4,"),
    );
    req.set_timeout(Duration::from_millis(500));
    let started = std::time::Instant::now();
    let err = t
        .client
        .generation()
        .generate(req)
        .await
        .expect_err("times out");
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "got {err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(eventually(Duration::from_secs(10), || engine.in_flight() == 0).await);
}
