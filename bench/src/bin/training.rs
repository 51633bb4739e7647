//! Training benchmarks (BENCHMARKS.md, issue 4):
//! 1. trainer throughput, forward + backward + AdamW, rank 8 on all seven modules,
//!    batch 4 x 128 tokens, on SmolLM2, with 2 threads and with 1;
//! 2. serving beside training over gRPC: inter-token latency p50/p99 of 4 concurrent
//!    streams without and with a running job, and the job's tokens/s with and without load.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use candle_core::Device;
use clap::Parser;
use futures::future::join_all;
use graft_bench::pct;
use graft_client::{proto as pb, GenerateOptions, GraftClient};
use graft_server::{
    config::ServerConfig,
    model::BaseModel,
    server,
    train::methods::{FullSelection, MethodSpec},
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Measure full fine-tuning instead (every weight, f32, AdamW): tokens/s and the
    /// process's peak resident memory; nothing else runs.
    #[arg(long)]
    full: bool,
    /// Only the trainer's throughput with 2 threads (and the process's peak memory), as
    /// `make bench-peers` compares it with PyTorch+PEFT's.
    #[arg(long)]
    trainer_only: bool,
}

fn throughput(
    model: &BaseModel,
    steps: usize,
    threads: usize,
    method: MethodSpec,
) -> anyhow::Result<f64> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| graft_bench::trainer_rate(model, steps, method))
}

/// Inter-token gaps (ms) of 4 concurrent streams of 48 tokens.
async fn itl(client: &GraftClient) -> anyhow::Result<Vec<f64>> {
    let all = join_all((0..4).map(|i| {
        let c = client.clone();
        async move {
            let mut s = c
                .generate_stream(
                    GenerateOptions {
                        max_new_tokens: Some(48),
                        temperature: Some(0.7),
                        seed: Some(i),
                        ..Default::default()
                    }
                    .prompt(format!("Tale {i}: once upon a time")),
                )
                .await?;
            let mut gaps = Vec::new();
            let mut last: Option<Instant> = None;
            while let Some(m) = s.message().await? {
                if m.token_ids.is_empty() {
                    continue;
                }
                let now = Instant::now();
                if let Some(l) = last {
                    gaps.push((now - l).as_secs_f64() * 1e3);
                }
                last = Some(now);
            }
            Ok::<_, tonic::Status>(gaps)
        }
    }))
    .await;
    let mut out = Vec::new();
    for g in all {
        out.extend(g?);
    }
    Ok(out)
}

/// The running job's training tokens/s over `window`, from its step events.
async fn job_rate(client: &GraftClient, id: &str, window: Duration) -> anyhow::Result<f64> {
    let mut s = client.watch_job("", id, 0).await?;
    // Skip the replay: read until events are live.
    let start = Instant::now();
    let (mut first, mut last) = (None::<(Instant, u64)>, None::<(Instant, u64)>);
    while let Some(e) = s.message().await? {
        if let Some(pb::job_event::Event::Step(st)) = e.event {
            let now = Instant::now();
            if now - start < Duration::from_millis(300) {
                continue;
            }
            first.get_or_insert((now, st.step));
            last = Some((now, st.step));
            if now - start > window {
                break;
            }
        }
    }
    let ((t0, s0), (t1, s1)) = (first.unwrap_or((start, 0)), last.unwrap_or((start, 0)));
    Ok((s1 - s0) as f64 * 4.0 * 60.0 / (t1 - t0).as_secs_f64().max(1e-9))
}

/// As graftd: its process settings (`graft_server::process`), then the measurements.
fn main() -> anyhow::Result<()> {
    graft_server::process::run_main(run())?
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = Arc::new(BaseModel::load(&args.model, &Device::Cpu)?);
    if args.full {
        let sel = FullSelection {
            layers: vec![],
            embeddings: true,
            norms: true,
            tied: model.llama.weights.tied(),
        };
        let (cfg, base) = (model.config().clone(), graft_bench::peak_rss_mib());
        let estimate = sel.memory_bytes(&cfg, 4, 128) as f64 / (1 << 20) as f64;
        let m = model.clone();
        let (steps, s) = (args.steps, sel.clone());
        let tps =
            tokio::task::spawn_blocking(move || throughput(&m, steps, 2, MethodSpec::Full(s)))
                .await??;
        println!(
            "full fine-tuning, {} weights, batch 4x128, 2 threads: {tps:.1} tokens/s; peak RSS {:.0} MiB (base loaded: {base:.0} MiB; CreateJob's estimate beyond the base: {estimate:.0} MiB)",
            sel.trained_floats(&cfg),
            graft_bench::peak_rss_mib()
        );
        return Ok(());
    }
    let threads: &[usize] = if args.trainer_only { &[2] } else { &[2, 1] };
    for &threads in threads {
        let m = model.clone();
        let steps = args.steps;
        let tps =
            tokio::task::spawn_blocking(move || throughput(&m, steps, threads, MethodSpec::Lora))
                .await??;
        println!(
            "trainer, rank 8 x 7 modules, batch 4x128, {threads} thread(s): {tps:.1} tokens/s"
        );
        graft_bench::result(
            "graft_lora_sft",
            serde_json::json!({ "threads": threads, "batch": 4, "seq": 128, "tok_s": tps,
                "peak_rss_mib": graft_bench::peak_rss_mib() }),
        );
    }
    if args.trainer_only {
        return Ok(());
    }
    drop(model);

    let data = tempfile::tempdir()?;
    let mut cfg = ServerConfig::for_model(&args.model, data.path());
    cfg.tenancy.admin_key = Some(graft_tests::ADMIN_KEY.into());
    let srv = server::start(cfg).await?;
    srv.ready().await?;
    let client = graft_tests::connect_as(srv.grpc_addr, graft_tests::TENANT).await;
    itl(&client).await?; // warm
    let mut idle = itl(&client).await?;
    let line = "{\"prompt\":\"Tell me about the weather in the mountains today, please, in a few words.\",\"completion\":\" It is cold, windy and bright, with snow on the high passes and sun in the valleys.\"}\n";
    client
        .upload_dataset("", "bench", "", line.repeat(64).into_bytes())
        .await?;
    let job = client
        .create_job(pb::CreateJobRequest {
            dataset: "bench".into(),
            adapter_name: "bench".into(),
            hyperparameters: Some(pb::Hyperparameters {
                epochs: Some(100),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    let alone = job_rate(&client, &job.id, Duration::from_secs(20)).await?;
    let rate_task = {
        let c = client.clone();
        let id = job.id.clone();
        tokio::spawn(async move { job_rate(&c, &id, Duration::from_secs(20)).await })
    };
    let mut busy = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        busy.extend(itl(&client).await?);
    }
    let loaded = rate_task.await??;
    println!(
        "4 streams, inter-token latency: idle p50 {:.1} ms p99 {:.1} ms; with a running job p50 {:.1} ms p99 {:.1} ms (p50 ratio {:.2})",
        pct(&mut idle, 0.5),
        pct(&mut idle, 0.99),
        pct(&mut busy, 0.5),
        pct(&mut busy, 0.99),
        pct(&mut busy, 0.5) / pct(&mut idle, 0.5)
    );
    println!("job training throughput (1 training thread): alone {alone:.1} tokens/s (approx., 60-token examples); under 4-stream serving load {loaded:.1} tokens/s");
    client.cancel_job("", &job.id).await?;
    srv.drain().await?;
    Ok(())
}
