//! `graft classify`: texts through an adapter's classification head; `graft score`:
//! (prompt, completion) pairs through a reward model.

use std::io::BufRead;

use clap::Args;
use graft_client::{proto as pb, GraftClient};
use tonic::Status;

#[derive(Args)]
pub struct ClassifyArgs {
    /// The adapter with the head: NAME or NAME@VERSION.
    #[arg(long)]
    adapter: String,
    /// Texts to classify; none: one per line of stdin.
    texts: Vec<String>,
}

pub async fn run(
    client: &GraftClient,
    tenant: &str,
    args: ClassifyArgs,
    json: bool,
) -> Result<(), Status> {
    let texts = if args.texts.is_empty() {
        stdin_lines()?
    } else {
        args.texts
    };
    let out = client
        .classify(pb::ClassifyRequest {
            adapter: args.adapter,
            inputs: texts
                .iter()
                .map(|t| pb::ClassifyInput {
                    text: t.clone(),
                    messages: Vec::new(),
                })
                .collect(),
            tenant: tenant.into(),
        })
        .await?;
    for (text, r) in texts.iter().zip(&out.results) {
        if json {
            let scores: serde_json::Map<String, serde_json::Value> = r
                .scores
                .iter()
                .map(|s| {
                    let v = serde_json::json!({"logit": s.logit, "probability": s.probability});
                    (s.label.clone(), v)
                })
                .collect();
            outln!(
                "{}",
                serde_json::json!({"text": text, "label": r.label, "scores": scores})
            );
        } else {
            let probs: Vec<String> = r
                .scores
                .iter()
                .map(|s| format!("{}={:.3}", s.label, s.probability))
                .collect();
            outln!("{}\t{}\t{}", r.label, probs.join(" "), text);
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ScoreArgs {
    /// The reward model: NAME or NAME@VERSION.
    #[arg(long)]
    adapter: String,
    /// The prompt (one user message) every completion answers.
    #[arg(long)]
    prompt: String,
    /// Completions to score; none: one per line of stdin.
    completions: Vec<String>,
}

pub async fn score(
    client: &GraftClient,
    tenant: &str,
    args: ScoreArgs,
    json: bool,
) -> Result<(), Status> {
    let completions = if args.completions.is_empty() {
        stdin_lines()?
    } else {
        args.completions
    };
    let out = client
        .score(pb::ScoreRequest {
            adapter: args.adapter,
            inputs: completions
                .iter()
                .map(|c| pb::ScoreInput {
                    prompt: args.prompt.clone(),
                    messages: Vec::new(),
                    completion: c.clone(),
                })
                .collect(),
            tenant: tenant.into(),
        })
        .await?;
    for (completion, r) in completions.iter().zip(&out.results) {
        if json {
            outln!(
                "{}",
                serde_json::json!({"completion": completion, "reward": r.reward})
            );
        } else {
            outln!("{:.4}\t{}", r.reward, completion);
        }
    }
    Ok(())
}

/// The non-blank lines of stdin.
fn stdin_lines() -> Result<Vec<String>, Status> {
    Ok(std::io::stdin()
        .lock()
        .lines()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::invalid_argument(format!("stdin: {e}")))?
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect())
}
