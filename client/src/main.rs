//! `graft`: the command line for graftd. Streams generated text to stdout as it arrives.

use std::io::{BufRead, Write};

use clap::{Args, Parser, Subcommand};
use graft_client::{proto, GenerateOptions, GraftClient};

#[derive(Parser)]
#[command(name = "graft", version, about = "Talk to a graftd server")]
struct Cli {
    /// Server address.
    #[arg(
        long,
        env = "GRAFT_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion of a raw prompt, streaming it to stdout.
    Generate {
        /// The prompt (tokenised as is; use `chat` for chat messages).
        prompt: String,
        #[command(flatten)]
        sampling: Sampling,
    },
    /// Chat interactively (one user turn per line; history is kept). With --message, send one
    /// user message and print the answer.
    Chat {
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
        /// One message to send instead of reading stdin.
        #[arg(long)]
        message: Option<String>,
        #[command(flatten)]
        sampling: Sampling,
    },
}

#[derive(Args, Clone)]
struct Sampling {
    /// New tokens at most.
    #[arg(long, short = 'n')]
    max_new_tokens: Option<u32>,
    /// 0 = greedy.
    #[arg(long, short = 't')]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<i32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Stop sequence (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Adapter: NAME or NAME@VERSION.
    #[arg(long)]
    adapter: Option<String>,
}

impl From<Sampling> for GenerateOptions {
    fn from(s: Sampling) -> Self {
        Self {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            repetition_penalty: s.repetition_penalty,
            stop: s.stop,
            seed: s.seed,
            logprobs: false,
            adapter: s.adapter,
        }
    }
}

/// Streams one request to stdout; returns the whole text.
async fn stream_to_stdout(
    client: &GraftClient,
    req: proto::GenerateRequest,
) -> anyhow::Result<String> {
    let mut stream = client.generate_stream(req).await.map_err(status_error)?;
    let mut text = String::new();
    let mut out = std::io::stdout();
    while let Some(msg) = stream.message().await.map_err(status_error)? {
        out.write_all(msg.text.as_bytes())?;
        out.flush()?;
        text.push_str(&msg.text);
    }
    writeln!(out)?;
    Ok(text)
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = GraftClient::connect(&cli.addr).await?;
    match cli.command {
        Command::Generate { prompt, sampling } => {
            let opts = GenerateOptions::from(sampling);
            stream_to_stdout(&client, opts.prompt(prompt)).await?;
        }
        Command::Chat {
            system,
            message,
            sampling,
        } => {
            let opts = GenerateOptions::from(sampling);
            let mut history: Vec<(String, String)> = system
                .map(|s| vec![("system".to_string(), s)])
                .unwrap_or_default();
            if let Some(m) = message {
                history.push(("user".into(), m));
                stream_to_stdout(&client, opts.chat(history)).await?;
                return Ok(());
            }
            let stdin = std::io::stdin();
            eprint!("> ");
            for line in stdin.lock().lines() {
                let line = line?;
                if line.trim().is_empty() {
                    eprint!("> ");
                    continue;
                }
                history.push(("user".into(), line));
                let answer = stream_to_stdout(&client, opts.chat(history.clone())).await?;
                history.push(("assistant".into(), answer));
                eprint!("> ");
            }
        }
    }
    Ok(())
}
