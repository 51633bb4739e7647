//! Structured output (BENCHMARKS.md, issue 13): aggregate decode of 32 concurrent sampled
//! streams with none constrained, against the same 32 with half of them under a constraint
//! (a JSON Schema, or a regex of unbounded prose), alternated over several rounds in one
//! process; and the time to compile a schema.

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use futures::future::join_all;
use graft_client::{proto::generate_request::Constraint, GenerateOptions, GraftClient};
use graft_server::{config::ServerConfig, server};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value_t = 32)]
    streams: usize,
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn schema() -> String {
    serde_json::json!({
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "characters": {"type": "array", "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"]
            }},
            "genre": {"enum": ["fantasy", "mystery", "romance", "science fiction"]},
            "summary": {"type": "string"}
        },
        "required": ["title", "characters", "genre", "summary"]
    })
    .to_string()
}

/// Aggregate generated tokens per second of `streams` streams, every other one under `c`.
async fn run(client: &GraftClient, streams: usize, tokens: u32, c: Option<&Constraint>) -> f64 {
    let start = Instant::now();
    let results = join_all((0..streams).map(|i| {
        let client = client.clone();
        let mut req = GenerateOptions {
            max_new_tokens: Some(tokens),
            temperature: Some(0.7),
            seed: Some(i as u64),
            ..Default::default()
        }
        .chat([("user", format!("Write story number {i} as JSON."))]);
        if i % 2 == 1 {
            req.constraint = c.cloned();
        }
        async move { client.generate(req).await }
    }))
    .await;
    let mut n = 0.0;
    for r in results {
        n += r
            .expect("generate")
            .usage
            .unwrap_or_default()
            .completion_tokens as f64;
    }
    n / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data = tempfile::tempdir()?;
    let mut cfg = ServerConfig::for_model(&args.model, data.path());
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let client = graft_tests::connect_as(srv.grpc_addr, "bench").await;
    let json = Constraint::JsonSchema(schema());
    let prose = Constraint::Regex("[A-Za-z ,.']+".into());
    // The first constrained request builds the token trie; time a compile after it.
    let engine = srv.engine().expect("ready");
    let grammars = engine.grammars().map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let spec = graft_server::engine::constraint::ConstraintSpec::JsonSchema(serde_json::from_str(
        &schema(),
    )?);
    grammars.compile(&spec).map_err(anyhow::Error::msg)?;
    println!(
        "compile the story schema: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    run(&client, 4, 8, Some(&json)).await; // warm
    let (mut none, mut half_json, mut half_prose) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        none.push(run(&client, args.streams, args.tokens, None).await);
        half_json.push(run(&client, args.streams, args.tokens, Some(&json)).await);
        half_prose.push(run(&client, args.streams, args.tokens, Some(&prose)).await);
        println!(
            "round {round}: none {:.1} tok/s, half JSON schema {:.1}, half regex {:.1}",
            none[round], half_json[round], half_prose[round]
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "{} streams x {} tokens, mean of {} rounds: none {:.1} tok/s; half JSON schema {:.1} ({:.2}x); half regex {:.1} ({:.2}x)",
        args.streams,
        args.tokens,
        args.rounds,
        mean(&none),
        mean(&half_json),
        mean(&half_json) / mean(&none),
        mean(&half_prose),
        mean(&half_prose) / mean(&none),
    );
    srv.drain().await?;
    Ok(())
}
