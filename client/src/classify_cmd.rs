//! `graft classify`: texts through an adapter's classification head.

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
        std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("stdin: {e}")))?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect()
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
