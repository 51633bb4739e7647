//! `graft`: the command line for graftd. Streams generated text to stdout as it arrives.

use std::io::{BufRead, Write};

use clap::{Args, Parser, Subcommand};
use graft_client::{proto, ConnectOptions, GenerateOptions, GraftClient, TlsOptions};

mod admin_cmd;

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
    /// Manage LoRA adapters (Hugging Face PEFT format).
    #[command(subcommand)]
    Adapters(AdapterCmd),
    /// Upload and list training datasets (JSONL: Alpaca, chat messages, prompt/completion, text).
    #[command(subcommand)]
    Datasets(DatasetCmd),
    /// Create, follow and cancel LoRA training jobs.
    #[command(subcommand)]
    Jobs(JobCmd),
    /// Exit 0 when the server's gRPC health service says SERVING (needs no key; for
    /// container health checks).
    Health,
    /// Tenants, API keys and quotas (needs the admin key).
    #[command(subcommand)]
    Admin(admin_cmd::AdminCmd),
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
    /// Delete a dataset.
    Rm { name: String },
}

#[derive(Subcommand)]
enum JobCmd {
    /// Train a LoRA adapter NAME on DATASET; the result becomes NAME's next version.
    Create {
        #[arg(long)]
        dataset: String,
        #[arg(long)]
        adapter: String,
        #[arg(long)]
        epochs: Option<u32>,
        #[arg(long)]
        learning_rate: Option<f64>,
        #[arg(long)]
        batch_size: Option<u32>,
        #[arg(long)]
        rank: Option<u32>,
        /// Fraction of the dataset held out for evaluation.
        #[arg(long)]
        validation_split: Option<f64>,
        /// Follow the job until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// List jobs.
    Ls,
    /// Show one job.
    Show { id: String },
    /// Print a job's events (replayed from the start) until it ends.
    Watch { id: String },
    /// Cancel a job.
    Cancel { id: String },
}

#[derive(Subcommand)]
enum AdapterCmd {
    /// Upload a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) as the
    /// next version of NAME.
    Import {
        dir: std::path::PathBuf,
        #[arg(long)]
        name: String,
        /// Accept an adapter made for another base model name.
        #[arg(long)]
        force: bool,
    },
    /// Download NAME or NAME@VERSION as a PEFT directory.
    Export {
        adapter: String,
        #[arg(long)]
        out: std::path::PathBuf,
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

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
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
        Command::Adapters(cmd) => adapters(&client, &cli.tenant, cmd).await?,
        Command::Datasets(cmd) => datasets(&client, &cli.tenant, cmd).await?,
        Command::Jobs(cmd) => jobs(&client, &cli.tenant, cmd).await?,
        Command::Health => {
            let status = client.health().await.map_err(status_error)?;
            println!("{status}");
            anyhow::ensure!(status == "SERVING", "not serving");
        }
        Command::Admin(cmd) => admin_cmd::run(&client, cmd).await.map_err(status_error)?,
        Command::Generate { prompt, sampling } => {
            let opts = with_tenant(sampling);
            stream_to_stdout(&client, opts.prompt(prompt)).await?;
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

fn print_version(v: &proto::AdapterVersion) {
    println!(
        "{}@{}\t{}\tr={}\talpha={}\t{} bytes\t{}\t{}",
        v.name,
        v.version,
        v.kind,
        v.rank,
        v.alpha,
        v.size_bytes,
        v.target_modules.join(","),
        &v.sha256[..v.sha256.len().min(12)]
    );
}

async fn adapters(client: &GraftClient, tenant: &str, cmd: AdapterCmd) -> anyhow::Result<()> {
    match cmd {
        AdapterCmd::Import { dir, name, force } => {
            let v = client
                .import_adapter_dir(tenant, &name, &dir, force)
                .await
                .map_err(status_error)?;
            print_version(&v);
        }
        AdapterCmd::Export { adapter, out } => {
            let (c, w) = client
                .export_adapter(tenant, &adapter)
                .await
                .map_err(status_error)?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join(graft_client::ADAPTER_CONFIG_FILE), c)?;
            std::fs::write(out.join(graft_client::ADAPTER_WEIGHTS_FILE), w)?;
            println!("wrote {}", out.display());
        }
        AdapterCmd::Ls => {
            for v in client.list_adapters(tenant).await.map_err(status_error)? {
                print_version(&v);
            }
        }
        AdapterCmd::Show { adapter } => print_version(
            &client
                .get_adapter(tenant, &adapter)
                .await
                .map_err(status_error)?,
        ),
        AdapterCmd::Rm { adapter } => {
            let v = client
                .delete_adapter(tenant, &adapter)
                .await
                .map_err(status_error)?;
            println!("deleted versions {v:?}");
        }
    }
    Ok(())
}

async fn datasets(client: &GraftClient, tenant: &str, cmd: DatasetCmd) -> anyhow::Result<()> {
    match cmd {
        DatasetCmd::Upload { file, name, format } => {
            let d = client
                .upload_dataset(tenant, &name, &format, std::fs::read(&file)?)
                .await
                .map_err(status_error)?;
            println!(
                "{}\t{}\t{} examples\t{} tokens\t{} truncated",
                d.name, d.format, d.examples, d.tokens, d.truncated_examples
            );
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
                println!(
                    "{}\t{}\t{} examples\t{} tokens",
                    d.name, d.format, d.examples, d.tokens
                );
            }
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

fn print_job(j: &proto::Job) {
    println!(
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

async fn watch(client: &GraftClient, tenant: &str, id: &str) -> anyhow::Result<()> {
    use proto::job_event::Event;
    let mut s = client
        .watch_job(tenant, id, 0)
        .await
        .map_err(status_error)?;
    while let Some(e) = s.message().await.map_err(status_error)? {
        match e.event {
            Some(Event::Status(st)) => eprintln!("[{}] {} {}", e.seq, st.status, st.message),
            Some(Event::Step(st)) => eprintln!(
                "step {}/{} epoch {:.2} loss {:.4} lr {:.2e} grad-norm {:.3} {:.0} tok/s eta {:.0}s",
                st.step, st.total_steps, st.epoch, st.train_loss, st.learning_rate, st.grad_norm, st.tokens_per_second, st.eta_seconds
            ),
            Some(Event::Eval(ev)) => eprintln!("eval at step {}: loss {:.4} token accuracy {:.3}", ev.step, ev.eval_loss, ev.token_accuracy),
            Some(Event::Checkpoint(c)) => eprintln!("checkpoint at step {}", c.step),
            None => {}
        }
    }
    let j = client.get_job(tenant, id).await.map_err(status_error)?;
    print_job(&j);
    if j.status != "succeeded" {
        anyhow::bail!("job {} ended {}", j.id, j.status);
    }
    Ok(())
}

async fn jobs(client: &GraftClient, tenant: &str, cmd: JobCmd) -> anyhow::Result<()> {
    match cmd {
        JobCmd::Create {
            dataset,
            adapter,
            epochs,
            learning_rate,
            batch_size,
            rank,
            validation_split,
            watch: follow,
        } => {
            let j = client
                .create_job(proto::CreateJobRequest {
                    tenant: tenant.into(),
                    dataset,
                    adapter_name: adapter,
                    validation_split,
                    lora: Some(proto::LoraMethod {
                        r: rank,
                        ..Default::default()
                    }),
                    hyperparameters: Some(proto::Hyperparameters {
                        epochs,
                        learning_rate,
                        batch_size,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?;
            print_job(&j);
            if follow {
                watch(client, tenant, &j.id).await?;
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
                print_job(j);
            }
        }
        JobCmd::Show { id } => print_job(&client.get_job(tenant, &id).await.map_err(status_error)?),
        JobCmd::Watch { id } => watch(client, tenant, &id).await?,
        JobCmd::Cancel { id } => {
            print_job(&client.cancel_job(tenant, &id).await.map_err(status_error)?)
        }
    }
    Ok(())
}
