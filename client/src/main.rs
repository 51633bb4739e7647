//! `graft`: the command line for graftd. Streams generated text to stdout as it arrives.

use std::io::{BufRead, Write};

use clap::{Args, Parser, Subcommand};
use graft_client::{
    proto, ConnectOptions, GenerateOptions, GraftClient, ImportOptions, TlsOptions,
};

/// `println!` without its panic when stdout is a closed pipe (`graft adapters ls | head`).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_stdout(format!($($arg)*).as_bytes(), true)
    };
}

mod admin_cmd;
mod classify_cmd;
mod job_cmd;
mod plot;

/// Writes to stdout. When the reader has gone (a closed pipe), the command ends quietly
/// with success, as `head` expects of the writer; any other failure is an error exit.
fn write_stdout(bytes: &[u8], newline: bool) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_all(bytes)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    if let Err(e) = written {
        exit_on_stdout_error(&e);
    }
}

fn exit_on_stdout_error(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1);
}

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
    /// API key (a tenant's key, or the admin key).
    #[arg(long, env = "GRAFT_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Acting tenant: only with the admin key (a tenant's key acts for its own tenant).
    #[arg(long, env = "GRAFT_TENANT", default_value = "", global = true)]
    tenant: String,
    /// Output of listings and shows: `text` (aligned for people) or `json` (one object per line).
    #[arg(long, value_enum, default_value = "text", global = true)]
    output: Output,
    /// PEM CA certificate to trust for an https:// address (default: the system's roots).
    #[arg(long, env = "GRAFT_CA_CERT", global = true)]
    ca_cert: Option<std::path::PathBuf>,
    /// Name the server's certificate must carry (default: the address's host).
    #[arg(long, env = "GRAFT_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
    /// PEM client certificate and key for mutual TLS.
    #[arg(
        long,
        env = "GRAFT_CLIENT_CERT",
        global = true,
        requires = "client_key"
    )]
    client_cert: Option<std::path::PathBuf>,
    #[arg(
        long,
        env = "GRAFT_CLIENT_KEY",
        global = true,
        requires = "client_cert"
    )]
    client_key: Option<std::path::PathBuf>,
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
    /// Classify texts (arguments, or one per stdin line) with an adapter that has a
    /// classification head: the label, then every label's probability.
    Classify(classify_cmd::ClassifyArgs),
    /// Score completions (arguments, or one per stdin line) of one prompt with a reward
    /// model: the reward, then the completion.
    Score(classify_cmd::ScoreArgs),
    /// Manage adapters (PEFT and AdapterHub formats).
    #[command(subcommand)]
    Adapters(AdapterCmd),
    /// Upload and list training datasets (JSONL: Alpaca, chat messages, prompt/completion, text).
    #[command(subcommand)]
    Datasets(DatasetCmd),
    /// Create, follow and cancel LoRA training jobs.
    #[command(subcommand)]
    Jobs(JobCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Exit 0 when the server's gRPC health service says SERVING (needs no key; for
    /// container health checks).
    Health,
    /// Tenants, API keys and quotas (needs the admin key).
    #[command(subcommand)]
    Admin(admin_cmd::AdminCmd),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum DatasetCmd {
    /// Upload FILE (JSONL) as dataset NAME; it is validated before it is stored.
    Upload {
        file: std::path::PathBuf,
        #[arg(long)]
        name: String,
        /// alpaca, chat, prompt_completion or text (default: detected per line).
        #[arg(long, default_value = "")]
        format: String,
    },
    /// List datasets.
    Ls,
    /// Show one dataset's statistics.
    Show { name: String },
    /// Delete a dataset.
    Rm { name: String },
}

#[derive(Subcommand)]
enum JobCmd {
    /// Train an adapter (--adapter) on a dataset (--dataset) with any method; the result
    /// becomes the adapter's next version. Every setting is a flag or comes from --config.
    Create {
        #[command(flatten)]
        args: Box<job_cmd::JobArgs>,
        /// Follow the job until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// List jobs.
    Ls,
    /// Show one job.
    Show { id: String },
    /// Follow a job to its end: a step progress bar with ETA, live loss and eval loss.
    Watch { id: String },
    /// Draw a job's training and validation loss against the step as a PNG; with
    /// --metrics, those step metrics instead (an RL job's reward and KL: --metrics reward,kl).
    Plot {
        id: String,
        #[arg(long, default_value = "loss.png")]
        out: std::path::PathBuf,
        #[arg(long, value_delimiter = ',')]
        metrics: Vec<String>,
    },
    /// Cancel a job.
    Cancel { id: String },
}

#[derive(Subcommand)]
enum AdapterCmd {
    /// Upload an adapter directory (adapter_config.json + adapter_model.safetensors from PEFT,
    /// or + adapter.safetensors from AdapterHub) as the next version of NAME.
    Import {
        dir: std::path::PathBuf,
        #[arg(long)]
        name: String,
        /// Accept an adapter made for another base model name.
        #[arg(long)]
        force: bool,
        /// A classification head's labels in the order of its outputs, comma-separated
        /// (default LABEL_0, LABEL_1, ...).
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
    },
    /// Download NAME or NAME@VERSION as a directory of its library's files (PEFT's, or
    /// AdapterHub's for bottleneck adapters; a fully fine-tuned model's HF directory).
    Export {
        adapter: String,
        #[arg(long)]
        out: std::path::PathBuf,
        /// `gguf`: a fully fine-tuned model as one llama.cpp GGUF file instead.
        #[arg(long, default_value = "")]
        format: String,
        /// With `--format gguf`: f32, f16 (default), q8_0, q4_0 or q4_1.
        #[arg(long, default_value = "")]
        quantization: String,
    },
    /// List every live version.
    Ls,
    /// Show one version (NAME = the newest).
    Show { adapter: String },
    /// Delete NAME@VERSION, or every version of NAME.
    Rm { adapter: String },
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
    /// OpenAI's presence penalty, in [-2, 2].
    #[arg(long, allow_hyphen_values = true)]
    presence_penalty: Option<f32>,
    /// OpenAI's frequency penalty, in [-2, 2].
    #[arg(long, allow_hyphen_values = true)]
    frequency_penalty: Option<f32>,
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
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            stop: s.stop,
            seed: s.seed,
            logprobs: false,
            top_logprobs: 0,
            adapter: s.adapter,
            tenant: None,
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

/// A byte progress bar on stderr (hidden when stderr is not a terminal) and the client
/// hook that moves it.
fn byte_bar(client: &GraftClient, total: u64, what: &str) -> (GraftClient, indicatif::ProgressBar) {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:40.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    let b = bar.clone();
    let c = client.with_progress(std::sync::Arc::new(move |n| b.set_position(n)));
    (c, bar)
}

pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    exit_on_stdout_error(io);
                }
            }
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "graft", &mut script);
        write_stdout(&script, false);
        return Ok(());
    }
    let json = cli.output == Output::Json;
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    let identity = match (&cli.client_cert, &cli.client_key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    let opts = ConnectOptions {
        api_key: cli.api_key.clone(),
        tls: TlsOptions {
            ca_pem: cli.ca_cert.as_deref().map(read).transpose()?,
            domain: cli.tls_domain.clone(),
            identity,
        },
    };
    let client = GraftClient::connect_with(&cli.addr, &opts).await?;
    let tenant = cli.tenant.clone();
    let with_tenant = |s: Sampling| GenerateOptions {
        tenant: Some(tenant.clone()),
        ..GenerateOptions::from(s)
    };
    match cli.command {
        Command::Adapters(cmd) => adapters(&client, &cli.tenant, cmd, json).await?,
        Command::Datasets(cmd) => datasets(&client, &cli.tenant, cmd, json).await?,
        Command::Jobs(cmd) => jobs(&client, &cli.tenant, cmd, json).await?,
        Command::Completions { .. } => unreachable!("handled before connecting"),
        Command::Health => {
            let status = client.health().await.map_err(status_error)?;
            outln!("{status}");
            anyhow::ensure!(status == "SERVING", "not serving");
        }
        Command::Classify(args) => classify_cmd::run(&client, &cli.tenant, args, json)
            .await
            .map_err(status_error)?,
        Command::Score(args) => classify_cmd::score(&client, &cli.tenant, args, json)
            .await
            .map_err(status_error)?,
        Command::Admin(cmd) => admin_cmd::run(&client, cmd, json)
            .await
            .map_err(status_error)?,
        Command::Generate { prompt, sampling } => {
            let opts = with_tenant(sampling);
            if json {
                let r = client
                    .generate(opts.prompt(prompt))
                    .await
                    .map_err(status_error)?;
                let usage = r.usage.unwrap_or_default();
                let v = serde_json::json!({
                    "text": r.text, "token_ids": r.token_ids, "logprobs": r.logprobs,
                    "finish_reason": r.finish_reason().as_str_name(),
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                });
                outln!("{v}");
            } else {
                stream_to_stdout(&client, opts.prompt(prompt)).await?;
            }
        }
        Command::Chat {
            system,
            message,
            sampling,
        } => {
            let opts = with_tenant(sampling);
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

/// A version's method settings, in one short line.
fn method_summary(v: &proto::AdapterVersion) -> String {
    use proto::adapter_version::Details;
    let summary = match &v.details {
        Some(Details::Lora(l)) => format!(
            "r={}\talpha={}\t{}{}",
            l.rank,
            l.alpha,
            l.target_modules.join(","),
            if l.use_dora { "\tdora" } else { "" }
        ),
        Some(Details::Ia3(i)) => format!(
            "targets={}\tfeedforward={}",
            i.target_modules.join(","),
            i.feedforward_modules.join(",")
        ),
        Some(Details::Bottleneck(b)) => format!(
            "reduction_factor={}\t{}\t{}",
            b.reduction_factor,
            b.non_linearity,
            match (b.after_attention, b.after_ffn) {
                (true, true) => "after attention and ffn",
                (true, false) => "after attention",
                _ => "after ffn",
            }
        ),
        Some(Details::PTuning(p)) => format!(
            "virtual_tokens={}\tencoder={} ({})",
            p.num_virtual_tokens, p.encoder, p.encoder_hidden_size
        ),
        Some(Details::PrefixTuning(p)) => format!(
            "virtual_tokens={}\tprojection={}",
            p.num_virtual_tokens, p.encoder_hidden_size
        ),
        Some(Details::Full(f)) => format!(
            "model\tlayers={}\tembeddings={}\tnorms={}\ttrained={}",
            if f.layers.is_empty() {
                "all".to_string()
            } else {
                f.layers
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            },
            f.embeddings,
            f.norms,
            f.trained_parameters
        ),
        _ => format!("virtual_tokens={}", v.virtual_tokens),
    };
    match &v.head {
        Some(h) => format!("{summary}\thead={}", h.labels.join(",")),
        None if v.lm_head => format!("{summary}\tlm_head"),
        None => summary,
    }
}

fn print_version(v: &proto::AdapterVersion, json: bool) {
    if json {
        let j = serde_json::json!({
            "tenant": v.tenant, "name": v.name, "version": v.version, "method": v.method,
            "virtual_tokens": v.virtual_tokens, "size_bytes": v.size_bytes,
            "details": method_summary(v),
            "labels": v.head.as_ref().map(|h| h.labels.clone()), "sha256": v.sha256, "created_at_unix": v.created_at_unix,
        });
        outln!("{j}");
        return;
    }
    outln!(
        "{}@{}\t{}\t{}\t{} bytes\t{}",
        v.name,
        v.version,
        v.method,
        method_summary(v),
        v.size_bytes,
        &v.sha256[..v.sha256.len().min(12)]
    );
}

async fn adapters(
    client: &GraftClient,
    tenant: &str,
    cmd: AdapterCmd,
    json: bool,
) -> anyhow::Result<()> {
    match cmd {
        AdapterCmd::Import {
            dir,
            name,
            force,
            labels,
        } => {
            let size = [
                graft_client::ADAPTER_CONFIG_FILE,
                graft_client::ADAPTER_WEIGHTS_FILE,
                graft_client::ADAPTERHUB_WEIGHTS_FILE,
            ]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
            let (c, bar) = byte_bar(client, size, "upload");
            let v = c
                .import_adapter_dir_with(tenant, &name, &dir, &ImportOptions { force, labels })
                .await
                .map_err(status_error)?;
            bar.finish_and_clear();
            print_version(&v, json);
        }
        AdapterCmd::Export {
            adapter,
            out,
            format,
            quantization,
        } => {
            let size = client
                .get_adapter(tenant, &adapter)
                .await
                .map_err(status_error)?
                .size_bytes;
            let (cl, bar) = byte_bar(client, size, "download");
            cl.export_adapter_dir_as(tenant, &adapter, &out, &format, &quantization)
                .await
                .map_err(status_error)?;
            bar.finish_and_clear();
            outln!("wrote {}", out.display());
        }
        AdapterCmd::Ls => {
            for v in client.list_adapters(tenant).await.map_err(status_error)? {
                print_version(&v, json);
            }
        }
        AdapterCmd::Show { adapter } => print_version(
            &client
                .get_adapter(tenant, &adapter)
                .await
                .map_err(status_error)?,
            json,
        ),
        AdapterCmd::Rm { adapter } => {
            let v = client
                .delete_adapter(tenant, &adapter)
                .await
                .map_err(status_error)?;
            outln!("deleted versions {v:?}");
        }
    }
    Ok(())
}

fn print_dataset(d: &proto::Dataset, json: bool) {
    let labels: serde_json::Map<String, serde_json::Value> = d
        .label_counts
        .iter()
        .map(|c| (c.label.clone(), c.count.into()))
        .collect();
    if json {
        let j = serde_json::json!({
            "id": d.id, "name": d.name, "format": d.format, "examples": d.examples,
            "tokens": d.tokens, "truncated_examples": d.truncated_examples,
            "label_counts": labels,
        });
        outln!("{j}");
    } else {
        let counts: Vec<String> = d
            .label_counts
            .iter()
            .map(|c| format!("{}={}", c.label, c.count))
            .collect();
        outln!(
            "{}\t{}\t{} examples\t{} tokens\t{} truncated{}",
            d.name,
            d.format,
            d.examples,
            d.tokens,
            d.truncated_examples,
            if counts.is_empty() {
                String::new()
            } else {
                format!("\tlabels {}", counts.join(" "))
            }
        );
    }
}

async fn datasets(
    client: &GraftClient,
    tenant: &str,
    cmd: DatasetCmd,
    json: bool,
) -> anyhow::Result<()> {
    match cmd {
        DatasetCmd::Upload { file, name, format } => {
            let bytes = std::fs::read(&file)?;
            let (c, bar) = byte_bar(client, bytes.len() as u64, "upload");
            let d = c
                .upload_dataset(tenant, &name, &format, bytes)
                .await
                .map_err(status_error)?;
            bar.finish_and_clear();
            print_dataset(&d, json);
        }
        DatasetCmd::Ls => {
            let l = client
                .training()
                .list_datasets(proto::ListDatasetsRequest {
                    tenant: tenant.into(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            for d in l.datasets {
                print_dataset(&d, json);
            }
        }
        DatasetCmd::Show { name } => {
            let d = client
                .training()
                .get_dataset(proto::GetDatasetRequest {
                    tenant: tenant.into(),
                    name,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_dataset(&d, json);
        }
        DatasetCmd::Rm { name } => {
            client
                .training()
                .delete_dataset(proto::DeleteDatasetRequest {
                    tenant: tenant.into(),
                    name,
                })
                .await
                .map_err(status_error)?;
        }
    }
    Ok(())
}

pub(crate) fn print_job(j: &proto::Job, json: bool) {
    if json {
        let v = serde_json::json!({
            "id": j.id, "status": j.status, "dataset": j.dataset, "dataset_id": j.dataset_id,
            "validation_dataset": j.validation_dataset, "adapter_name": j.adapter_name,
            "adapter_version": j.adapter_version, "step": j.step, "total_steps": j.total_steps,
            "error": j.error, "method": j.method, "objective": j.objective,
        });
        outln!("{v}");
        return;
    }
    outln!(
        "{}\t{}\t{} -> {}{}\tstep {}/{}{}",
        j.id,
        j.status,
        j.dataset,
        j.adapter_name,
        if j.adapter_version > 0 {
            format!("@{}", j.adapter_version)
        } else {
            String::new()
        },
        j.step,
        j.total_steps,
        if j.error.is_empty() {
            String::new()
        } else {
            format!("\t{}", j.error)
        }
    );
}

/// The job's stored events so far (a running job's stream is read until it goes quiet).
async fn loss_points(
    client: &GraftClient,
    tenant: &str,
    id: &str,
) -> anyhow::Result<(Vec<(f64, f64)>, Vec<(f64, f64)>)> {
    use proto::job_event::Event;
    let mut s = client
        .watch_job(tenant, id, 0)
        .await
        .map_err(status_error)?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    while let Ok(Some(e)) = tokio::time::timeout(std::time::Duration::from_secs(2), s.message())
        .await
        .map_err(|_| ())
        .and_then(|r| r.map_err(|_| ()))
    {
        match e.event {
            Some(Event::Step(st)) => train.push((st.step as f64, st.train_loss)),
            Some(Event::Eval(ev)) => eval.push((ev.step as f64, ev.eval_loss)),
            _ => {}
        }
    }
    Ok((train, eval))
}

/// Each of `names`' (step, value) points from the job's step events.
async fn metric_points(
    client: &GraftClient,
    tenant: &str,
    id: &str,
    names: &[String],
) -> anyhow::Result<Vec<Vec<(f64, f64)>>> {
    use proto::job_event::Event;
    let mut s = client
        .watch_job(tenant, id, 0)
        .await
        .map_err(status_error)?;
    let mut out = vec![Vec::new(); names.len()];
    while let Ok(Some(e)) = tokio::time::timeout(std::time::Duration::from_secs(2), s.message())
        .await
        .map_err(|_| ())
        .and_then(|r| r.map_err(|_| ()))
    {
        if let Some(Event::Step(st)) = e.event {
            for (n, pts) in names.iter().zip(&mut out) {
                if let Some(v) = st.metrics.get(n) {
                    pts.push((st.step as f64, *v));
                }
            }
        }
    }
    Ok(out)
}

async fn jobs(client: &GraftClient, tenant: &str, cmd: JobCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        JobCmd::Create {
            args,
            watch: follow,
        } => {
            let j = client
                .create_job(args.request(tenant)?)
                .await
                .map_err(status_error)?;
            print_job(&j, json);
            if follow {
                job_cmd::watch(client, tenant, &j.id, json).await?;
            }
        }
        JobCmd::Ls => {
            let l = client
                .training()
                .list_jobs(proto::ListJobsRequest {
                    tenant: tenant.into(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            for j in &l.jobs {
                print_job(j, json);
            }
        }
        JobCmd::Show { id } => print_job(
            &client.get_job(tenant, &id).await.map_err(status_error)?,
            json,
        ),
        JobCmd::Watch { id } => job_cmd::watch(client, tenant, &id, json).await?,
        JobCmd::Plot { id, out, metrics } if !metrics.is_empty() => {
            let points = metric_points(client, tenant, &id, &metrics).await?;
            let series: Vec<plot::Series<'_>> = points
                .iter()
                .zip(&metrics)
                .map(|(p, m)| (&p[..], m.as_str(), false))
                .collect();
            let (steps, lo, hi) =
                plot::series_png(&format!("Job {id}"), &metrics.join(", "), &series, &out)?;
            outln!(
                "wrote {}: {} of {} steps; x: step 0..{steps}, y: {lo:.3}..{hi:.3}",
                out.display(),
                metrics.join(", "),
                points.iter().map(Vec::len).max().unwrap_or(0)
            );
        }
        JobCmd::Plot { id, out, .. } => {
            let (train, eval) = loss_points(client, tenant, &id).await?;
            let (steps, lo, hi) =
                plot::loss_png(&format!("Loss of job {id}"), &train, &eval, &out)?;
            outln!(
                "wrote {}: {} training and {} validation points; x: step 0..{steps}, y: loss {lo:.3}..{hi:.3}",
                out.display(),
                train.len(),
                eval.len()
            );
        }
        JobCmd::Cancel { id } => print_job(
            &client.cancel_job(tenant, &id).await.map_err(status_error)?,
            json,
        ),
    }
    Ok(())
}
