//! Every metric graft exports: names in one place, described once, Prometheus conventions
//! (`graft_` prefix, `_seconds`/`_total` suffixes, bounded labels; never a tenant or adapter
//! id as a label).

use std::sync::Mutex;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

pub const REQUESTS_TOTAL: &str = "graft_requests_total";
pub const REQUEST_DURATION: &str = "graft_request_duration_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "graft_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "graft_inter_token_latency_seconds";
pub const PROMPT_TOKENS_TOTAL: &str = "graft_prompt_tokens_total";
pub const GENERATED_TOKENS_TOTAL: &str = "graft_generated_tokens_total";
pub const QUEUE_DEPTH: &str = "graft_queue_depth";
pub const BATCH_SIZE: &str = "graft_batch_size";
pub const ACTIVE_SEQUENCES: &str = "graft_active_sequences";
pub const KV_BLOCKS_TOTAL: &str = "graft_kv_blocks_total";
pub const KV_BLOCKS_USED: &str = "graft_kv_blocks_used";
pub const KV_PREEMPTIONS_TOTAL: &str = "graft_kv_preemptions_total";
pub const PREFIX_CACHE_HIT_TOKENS_TOTAL: &str = "graft_prefix_cache_hit_tokens_total";
pub const ADAPTER_CACHE_HITS_TOTAL: &str = "graft_adapter_cache_hits_total";
pub const ADAPTER_CACHE_MISSES_TOTAL: &str = "graft_adapter_cache_misses_total";
pub const ADAPTER_CACHE_EVICTIONS_TOTAL: &str = "graft_adapter_cache_evictions_total";
pub const ADAPTER_LOAD_SECONDS: &str = "graft_adapter_load_seconds";
pub const ADAPTERS_RESIDENT: &str = "graft_adapters_resident";
pub const ADAPTERS_RESIDENT_BYTES: &str = "graft_adapters_resident_bytes";
pub const HOSTED_MODELS_RESIDENT: &str = "graft_hosted_models_resident";
pub const HOSTED_MODELS_RESIDENT_BYTES: &str = "graft_hosted_models_resident_bytes";
pub const HOSTED_MODEL_LOADS_TOTAL: &str = "graft_hosted_model_loads_total";
pub const HOSTED_MODEL_UNLOADS_TOTAL: &str = "graft_hosted_model_unloads_total";
pub const TRAINING_JOBS: &str = "graft_training_jobs_total";
pub const TRAINING_JOBS_NOW: &str = "graft_training_jobs_current";
pub const TRAINING_LOSS: &str = "graft_training_loss";
pub const TRAINING_TOKENS_PER_SECOND: &str = "graft_training_tokens_per_second";
pub const TRAINING_TOKENS_TOTAL: &str = "graft_training_tokens_total";
pub const TRAINING_STEP_SECONDS: &str = "graft_training_step_seconds";
pub const AUTH_FAILURES_TOTAL: &str = "graft_auth_failures_total";
pub const QUOTA_REJECTIONS_TOTAL: &str = "graft_quota_rejections_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Describes every metric (once, at start-up).
pub fn describe() {
    describe_counter!(REQUESTS_TOTAL, "RPCs answered, by rpc and gRPC status code");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "RPC duration, by rpc");
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "From a generation request's arrival to its first token"
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Time between two consecutive tokens of one sequence"
    );
    describe_counter!(
        PROMPT_TOKENS_TOTAL,
        "Prompt tokens admitted into the engine"
    );
    describe_counter!(GENERATED_TOKENS_TOTAL, "Tokens generated");
    describe_gauge!(QUEUE_DEPTH, "Generation requests waiting for admission");
    describe_histogram!(BATCH_SIZE, "Sequences in one engine step");
    describe_gauge!(ACTIVE_SEQUENCES, "Sequences being prefilled or decoded");
    describe_gauge!(
        KV_BLOCKS_TOTAL,
        "Blocks of the KV pool (16 tokens each), fixed by --kv-cache-mb"
    );
    describe_gauge!(
        KV_BLOCKS_USED,
        "KV blocks referenced by running sequences (cached unreferenced prefix blocks are not counted)"
    );
    describe_counter!(
        KV_PREEMPTIONS_TOTAL,
        "Sequences preempted because the KV pool ran out (recomputed later, same output)"
    );
    describe_counter!(
        PREFIX_CACHE_HIT_TOKENS_TOTAL,
        "Prompt tokens whose keys and values came from the prefix cache instead of a prefill"
    );
    describe_counter!(
        ADAPTER_CACHE_HITS_TOTAL,
        "Adapter leases served from memory"
    );
    describe_counter!(
        ADAPTER_CACHE_MISSES_TOTAL,
        "Adapter leases that loaded the adapter from disk"
    );
    describe_counter!(
        ADAPTER_CACHE_EVICTIONS_TOTAL,
        "Adapters evicted from memory to stay within the budget"
    );
    describe_histogram!(
        ADAPTER_LOAD_SECONDS,
        Unit::Seconds,
        "Time to load an adapter from disk"
    );
    describe_gauge!(ADAPTERS_RESIDENT, "Adapter versions resident in memory");
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        "Calls refused UNAUTHENTICATED (missing, malformed, unknown, revoked or expired keys)"
    );
    describe_counter!(
        QUOTA_REJECTIONS_TOTAL,
        "Calls refused RESOURCE_EXHAUSTED by a tenant quota, by quota"
    );
    describe_counter!(
        TRAINING_JOBS,
        "Training jobs entering running, succeeded, failed or cancelled, by status"
    );
    describe_gauge!(
        TRAINING_JOBS_NOW,
        "Training jobs queued and running now, by status (read from the database)"
    );
    describe_gauge!(
        ADAPTERS_RESIDENT_BYTES,
        Unit::Bytes,
        "Bytes of adapter weights resident in memory"
    );
    describe_gauge!(
        HOSTED_MODELS_RESIDENT,
        "Fully fine-tuned models loaded for serving, each with its own engine"
    );
    describe_gauge!(
        HOSTED_MODELS_RESIDENT_BYTES,
        Unit::Bytes,
        "Bytes of the loaded fine-tuned models: weights and KV pools"
    );
    describe_counter!(
        HOSTED_MODEL_LOADS_TOTAL,
        "Fully fine-tuned models loaded from disk for serving"
    );
    describe_counter!(
        HOSTED_MODEL_UNLOADS_TOTAL,
        "Fully fine-tuned models unloaded (idle, to make room, or deleted)"
    );
}

/// The process-wide recorder, installed on first use (several servers in one test process
/// share it).
pub fn handle() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut slot = HANDLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = slot.as_ref() {
        return Ok(h.clone());
    }
    let h = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS)?
        .install_recorder()?;
    describe();
    *slot = Some(h.clone());
    Ok(h)
}

/// Serves the text exposition format on every request to `listener` (any path, as
/// Prometheus scrapes `/metrics`). The exporter crate's own listener cannot report the port
/// it bound, which tests on port 0 need; this is the few lines it would otherwise do.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            // Read the request head (we answer every path alike).
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await;
            let body = handle.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// A job started running.
pub fn job_started() {
    metrics::counter!(TRAINING_JOBS, "status" => "running").increment(1);
}

/// A job reached a terminal status.
pub fn job_finished(status: crate::store::training::JobStatus) {
    metrics::counter!(TRAINING_JOBS, "status" => status.as_str()).increment(1);
}

/// The jobs waiting and running now, over all tenants.
pub fn jobs_now(queued: u64, running: u64) {
    metrics::gauge!(TRAINING_JOBS_NOW, "status" => "queued").set(queued as f64);
    metrics::gauge!(TRAINING_JOBS_NOW, "status" => "running").set(running as f64);
}

/// One optimizer step's figures.
pub fn training_step(loss: f64, tokens_per_second: f64, tokens: usize, seconds: f64) {
    metrics::gauge!(TRAINING_LOSS).set(loss);
    metrics::gauge!(TRAINING_TOKENS_PER_SECOND).set(tokens_per_second);
    metrics::counter!(TRAINING_TOKENS_TOTAL).increment(tokens as u64);
    metrics::histogram!(TRAINING_STEP_SECONDS).record(seconds);
}
