//! Configuration: command-line flags, `GRAFT_*` environment variables and an optional TOML
//! file, in that order of precedence, resolved into one [`ServerConfig`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use serde::Deserialize;

use crate::{
    engine::{EngineConfig, StepLimits},
    model::{lora::LoraDtype, packed::DecodeKernel, DeviceSpec, KvDtype},
    tenancy::{Limits, TenancyConfig},
};

/// The default cap on a prompt-method adapter's virtual tokens (PEFT's examples use 8-30;
/// P-tuning v2 up to ~100).
pub const DEFAULT_MAX_VIRTUAL_TOKENS: usize = 128;

/// Every setting, optional at this stage so the layers can be merged.
#[derive(Clone, Default, Parser, Deserialize)]
#[command(
    name = "graftd",
    version,
    about = "graft: one frozen base model, many adapters, batched generation over gRPC"
)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// TOML file with any of these settings (flags and env vars win over it).
    #[arg(long, env = "GRAFT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model: a .gguf file or an HF-style directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "GRAFT_MODEL")]
    pub model: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "GRAFT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Prometheus /metrics listen address.
    #[arg(long, env = "GRAFT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// OpenAI-compatible HTTP API listen address (`/v1/chat/completions`, `/v1/models`, ...);
    /// off unless set. Same keys, tenants, quotas and TLS settings as gRPC.
    #[arg(long, env = "GRAFT_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Sequences decoded together at most.
    #[arg(long, env = "GRAFT_MAX_ACTIVE_SEQUENCES")]
    pub max_active_sequences: Option<usize>,
    /// Sequences of one tenant decoded together at most (default: three quarters of
    /// --max-active-sequences), so a flooding tenant leaves room for the others.
    #[arg(long, env = "GRAFT_MAX_ACTIVE_PER_TENANT")]
    pub max_active_per_tenant: Option<usize>,
    /// Requests waiting for admission at most (beyond: RESOURCE_EXHAUSTED).
    #[arg(long, env = "GRAFT_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: Option<usize>,
    /// Tokens in one forward step at most (decode rows + prefill chunks).
    #[arg(long, env = "GRAFT_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Prompt tokens one sequence prefills in one step at most.
    #[arg(long, env = "GRAFT_PREFILL_CHUNK")]
    pub prefill_chunk: Option<usize>,
    /// Prompt tokens of background work (RL jobs' rollouts) in one step at most while
    /// interactive requests run.
    #[arg(long, env = "GRAFT_BACKGROUND_PREFILL")]
    pub background_prefill: Option<usize>,
    /// The decode rows' matmul kernel over the GGUF's quantised weights: "int16"
    /// (activations quantised to 16 bits per block of 32, integer dot products) or "exact"
    /// (f32 activations; the reference).
    #[arg(long, env = "GRAFT_DECODE_KERNEL")]
    pub decode_kernel: Option<DecodeKernel>,
    /// Where the model's weights live and its matmuls run: "cpu" (default), or "cuda:N"
    /// (one GPU; only in a build with the `cuda` feature, `make build-cuda`).
    #[arg(long, env = "GRAFT_DEVICE")]
    pub device: Option<DeviceSpec>,
    /// MiB of KV memory for every running sequence and cached prompt prefix together
    /// (default: a quarter of the machine's memory). A request that could never fit is
    /// refused; when running sequences fill it, the newest waits (preempted).
    #[arg(long, env = "GRAFT_KV_CACHE_MB")]
    pub kv_cache_mb: Option<usize>,
    /// How cached keys and values are stored: "f32" (default; a served row's logits equal
    /// the plain forward's) or "f16" (half the memory and the bytes each decode step
    /// reads, as llama.cpp's default cache; each cached value rounded to f16).
    #[arg(long, env = "GRAFT_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: Option<KvDtype>,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "GRAFT_MAX_NEW_TOKENS_CAP")]
    pub max_new_tokens_cap: Option<u32>,
    /// Seconds in-flight requests get to finish on SIGTERM/SIGINT before they are cancelled.
    #[arg(long, env = "GRAFT_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
    /// Data directory: the database and adapter files.
    #[arg(long, env = "GRAFT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The metadata database: `postgres://user:password@host/db` for a PostgreSQL server
    /// that several replicas share, or `sqlite://FILE` (default: `graft.db` in the data
    /// directory).
    #[arg(long, env = "GRAFT_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where adapters, datasets and checkpoints are stored: `s3://bucket/prefix` for an
    /// S3-compatible bucket that several replicas share (endpoint, region and credentials
    /// from the usual `AWS_*` variables), or `file:///dir` (default: the data directory).
    #[arg(long, env = "GRAFT_BLOB_STORE")]
    pub blob_store: Option<String>,
    /// Seconds a stored file no row names is kept before the orphan sweep removes it
    /// (another replica may still be uploading it).
    #[arg(long, env = "GRAFT_ORPHAN_GRACE_SECS")]
    pub orphan_grace_secs: Option<u64>,
    /// Seconds a running job stays this process's without a heartbeat (renewed every third
    /// of it): on a shared database, another replica takes over a dead one's job after this.
    #[arg(long, env = "GRAFT_JOB_LEASE_SECS")]
    pub job_lease_secs: Option<u64>,
    /// MiB of adapter weights kept in memory (least recently used evicted; in-use never).
    #[arg(long, env = "GRAFT_ADAPTER_CACHE_MB")]
    pub adapter_cache_mb: Option<usize>,
    /// What LoRA and DoRA matrices are served in: "f32" (the default: the stored values
    /// exactly), "bf16" or "f16" (each value rounded once when the adapter is loaded: half
    /// the memory, and half the bytes a decode step reads for each row's adapter, as vLLM's
    /// --lora-dtype), or "int8" (8 bits a value and one scale per rank component: about a
    /// quarter of them). Stored files and training keep their f32 values.
    #[arg(long, env = "GRAFT_LORA_DTYPE")]
    pub lora_dtype: Option<LoraDtype>,
    /// Largest LoRA rank accepted.
    #[arg(long, env = "GRAFT_MAX_ADAPTER_RANK")]
    pub max_adapter_rank: Option<usize>,
    /// Most virtual tokens a prompt-method adapter (prompt tuning, P-tuning, prefix
    /// tuning) may have, imported or trained.
    #[arg(long, env = "GRAFT_MAX_VIRTUAL_TOKENS")]
    pub max_virtual_tokens: Option<usize>,
    /// Largest adapter upload, in MiB.
    #[arg(long, env = "GRAFT_MAX_ADAPTER_UPLOAD_MB")]
    pub max_adapter_upload_mb: Option<usize>,
    /// Another name (HF repo id) of the base model, accepted in adapters'
    /// base_model_name_or_path (repeatable).
    #[arg(
        long = "base-model-alias",
        env = "GRAFT_BASE_MODEL_ALIASES",
        value_delimiter = ','
    )]
    pub base_model_aliases: Option<Vec<String>>,
    /// Largest dataset upload, in MiB.
    #[arg(long, env = "GRAFT_MAX_DATASET_MB")]
    pub max_dataset_mb: Option<usize>,
    /// Threads a training job computes with (the rest of the cores stay with serving).
    #[arg(long, env = "GRAFT_TRAINING_THREADS")]
    pub training_threads: Option<usize>,
    /// Training jobs computing at once (others wait in the queue).
    #[arg(long, env = "GRAFT_MAX_CONCURRENT_JOBS")]
    pub max_concurrent_jobs: Option<usize>,
    /// Checkpoints a running job keeps on disk (the newest; default 2). They count against
    /// the tenant's stored bytes while the job is unfinished and are removed when it
    /// succeeds.
    #[arg(long, env = "GRAFT_KEEP_CHECKPOINTS")]
    pub keep_checkpoints: Option<usize>,
    /// MiB one full fine-tuning run may take beyond the resident base (default: half the
    /// machine's memory). A job whose estimate is larger is refused at CreateJob.
    #[arg(long, env = "GRAFT_MAX_TRAINING_MEMORY_MB")]
    pub max_training_memory_mb: Option<usize>,
    /// MiB of fully fine-tuned models kept loaded for serving, weights and KV pools
    /// together (default 2048). Idle ones are unloaded to make room.
    #[arg(long, env = "GRAFT_HOSTED_MODELS_MB")]
    pub hosted_models_mb: Option<usize>,
    /// MiB of KV memory each hosted fine-tuned model's engine gets (default 256).
    #[arg(long, env = "GRAFT_HOSTED_MODEL_KV_MB")]
    pub hosted_model_kv_mb: Option<usize>,
    /// Seconds a hosted fine-tuned model stays loaded without requests (default 300).
    #[arg(long, env = "GRAFT_HOSTED_MODEL_IDLE_SECS")]
    pub hosted_model_idle_secs: Option<u64>,
    /// Log format: "text" or "json".
    #[arg(long, env = "GRAFT_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// The admin key (at least 16 characters) for the Admin service. Prefer
    /// --admin-key-file or the environment to a flag, which other users can see in `ps`.
    /// No default: without one the Admin service is disabled.
    #[arg(long, env = "GRAFT_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// File holding the admin key (surrounding whitespace ignored).
    #[arg(long, env = "GRAFT_ADMIN_KEY_FILE")]
    pub admin_key_file: Option<PathBuf>,
    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, env = "GRAFT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "GRAFT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): require client certificates signed by them (mutual TLS).
    #[arg(long, env = "GRAFT_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback address (behind a TLS-terminating proxy or
    /// in a private network). Loopback addresses are always allowed plaintext.
    #[arg(long, env = "GRAFT_ALLOW_PLAINTEXT", num_args = 0..=1, default_missing_value = "true")]
    pub allow_plaintext: Option<bool>,
    /// Default quota: adapter names a tenant may store.
    #[arg(long, env = "GRAFT_QUOTA_MAX_ADAPTERS")]
    pub quota_max_adapters: Option<u64>,
    /// Default quota: MiB of adapters and datasets a tenant may store.
    #[arg(long, env = "GRAFT_QUOTA_MAX_STORED_MB")]
    pub quota_max_stored_mb: Option<u64>,
    /// Default quota: datasets a tenant may store.
    #[arg(long, env = "GRAFT_QUOTA_MAX_DATASETS")]
    pub quota_max_datasets: Option<u64>,
    /// Default quota: training jobs of one tenant computing at once.
    #[arg(long, env = "GRAFT_QUOTA_MAX_RUNNING_JOBS")]
    pub quota_max_running_jobs: Option<u32>,
    /// Default quota: unfinished training jobs of one tenant.
    #[arg(long, env = "GRAFT_QUOTA_MAX_QUEUED_JOBS")]
    pub quota_max_queued_jobs: Option<u32>,
    /// Default quota: generation streams of one tenant in flight.
    #[arg(long, env = "GRAFT_QUOTA_MAX_CONCURRENT_STREAMS")]
    pub quota_max_concurrent_streams: Option<u32>,
    /// Default quota: tokens one tenant may generate per minute.
    #[arg(long, env = "GRAFT_QUOTA_MAX_TOKENS_PER_MINUTE")]
    pub quota_max_tokens_per_minute: Option<u64>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the admin key.
        f.debug_struct("Settings")
            .field("config", &self.config)
            .field("model", &self.model)
            .field("listen", &self.listen)
            .field("admin_key", &self.admin_key.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

/// TLS material for the gRPC listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// The OpenAI-compatible HTTP front, when on.
    pub http_listen: Option<SocketAddr>,
    pub engine: EngineConfig,
    pub decode_kernel: DecodeKernel,
    pub device: DeviceSpec,
    pub max_new_tokens_cap: u32,
    pub drain_timeout: Duration,
    pub log_json: bool,
    pub data_dir: PathBuf,
    /// The metadata database's URL; `None`: SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// The blob store's URL; `None`: the data directory.
    pub blob_store: Option<String>,
    pub orphan_grace: Duration,
    pub job_lease: Duration,
    pub adapter_cache_bytes: usize,
    pub lora_dtype: LoraDtype,
    pub max_adapter_rank: usize,
    pub max_virtual_tokens: usize,
    pub max_adapter_upload_bytes: usize,
    pub base_model_aliases: Vec<String>,
    pub max_dataset_bytes: usize,
    pub training_threads: usize,
    pub max_concurrent_jobs: usize,
    pub keep_checkpoints: usize,
    pub max_training_memory_bytes: u64,
    pub hosted: crate::engine::hosted::HostedConfig,
    pub tenancy: TenancyConfig,
    pub tls: Option<TlsFiles>,
    pub allow_plaintext: bool,
    /// For tests of the loading phase: when set, loading the model waits until it is
    /// notified (no flag or file sets it).
    pub load_gate: Option<std::sync::Arc<tokio::sync::Notify>>,
}

pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The HF repo id of the default model, which PEFT writes into adapters made for it.
pub const DEFAULT_BASE_ALIAS: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

impl Settings {
    /// Flags/env merged over the TOML file (if any), then defaults.
    pub fn resolve(self) -> anyhow::Result<ServerConfig> {
        let file = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", p.display()))?;
                toml::from_str::<Settings>(&text)
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", p.display()))?
            }
            None => Settings::default(),
        };
        let d = EngineConfig::default();
        let max_active = self
            .max_active_sequences
            .or(file.max_active_sequences)
            .unwrap_or(d.max_active_sequences);
        let engine = EngineConfig {
            gauges: true,
            max_active_sequences: max_active,
            max_active_per_tenant: self
                .max_active_per_tenant
                .or(file.max_active_per_tenant)
                .unwrap_or((max_active * 3 / 4).max(1))
                .clamp(1, max_active.max(1)),
            max_queued_requests: self
                .max_queued_requests
                .or(file.max_queued_requests)
                .unwrap_or(d.max_queued_requests),
            limits: StepLimits {
                max_batch_tokens: self
                    .max_batch_tokens
                    .or(file.max_batch_tokens)
                    .unwrap_or(d.limits.max_batch_tokens),
                prefill_chunk: self
                    .prefill_chunk
                    .or(file.prefill_chunk)
                    .unwrap_or(d.limits.prefill_chunk),
                background_prefill: self
                    .background_prefill
                    .or(file.background_prefill)
                    .unwrap_or(d.limits.background_prefill),
            },
            kv_cache_bytes: self
                .kv_cache_mb
                .or(file.kv_cache_mb)
                .map_or(d.kv_cache_bytes, |mb| mb << 20),
            kv_cache_dtype: self
                .kv_cache_dtype
                .or(file.kv_cache_dtype)
                .unwrap_or_default(),
        };
        anyhow::ensure!(
            engine.kv_cache_bytes >= 1 << 20,
            "kv_cache_mb must be at least 1"
        );
        anyhow::ensure!(max_active >= 1, "max_active_sequences must be at least 1");
        anyhow::ensure!(
            engine.limits.max_batch_tokens >= max_active,
            "max_batch_tokens ({}) must be at least max_active_sequences ({max_active}) so every decoding sequence runs each step",
            engine.limits.max_batch_tokens
        );
        anyhow::ensure!(
            engine.limits.prefill_chunk >= 1,
            "prefill_chunk must be at least 1"
        );
        anyhow::ensure!(
            engine.limits.background_prefill >= 1,
            "background_prefill must be at least 1"
        );
        let log_format = self
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        anyhow::ensure!(
            log_format == "text" || log_format == "json",
            "log_format must be \"text\" or \"json\", not {log_format:?}"
        );
        let admin_key = match (
            self.admin_key.or(file.admin_key),
            self.admin_key_file.or(file.admin_key_file),
        ) {
            (Some(_), Some(_)) => {
                anyhow::bail!("give the admin key once: --admin-key or --admin-key-file, not both")
            }
            (Some(k), None) => Some(k),
            (None, Some(p)) => Some(
                std::fs::read_to_string(&p)
                    .map_err(|e| anyhow::anyhow!("admin key file {}: {e}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if let Some(k) = &admin_key {
            anyhow::ensure!(
                k.len() >= 16 && !k.chars().any(char::is_whitespace),
                "the admin key must be at least 16 characters with no whitespace"
            );
        }
        let tls = match (
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
            self.tls_client_ca.or(file.tls_client_ca),
        ) {
            (Some(cert), Some(key), client_ca) => Some(TlsFiles {
                cert,
                key,
                client_ca,
            }),
            (None, None, None) => None,
            _ => anyhow::bail!(
                "TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)"
            ),
        };
        let q = Limits::default();
        let defaults = Limits {
            max_adapters: self
                .quota_max_adapters
                .or(file.quota_max_adapters)
                .unwrap_or(q.max_adapters),
            max_stored_bytes: self
                .quota_max_stored_mb
                .or(file.quota_max_stored_mb)
                .map_or(q.max_stored_bytes, |mb| mb << 20),
            max_datasets: self
                .quota_max_datasets
                .or(file.quota_max_datasets)
                .unwrap_or(q.max_datasets),
            max_running_jobs: self
                .quota_max_running_jobs
                .or(file.quota_max_running_jobs)
                .unwrap_or(q.max_running_jobs),
            max_queued_jobs: self
                .quota_max_queued_jobs
                .or(file.quota_max_queued_jobs)
                .unwrap_or(q.max_queued_jobs),
            max_concurrent_streams: self
                .quota_max_concurrent_streams
                .or(file.quota_max_concurrent_streams)
                .unwrap_or(q.max_concurrent_streams),
            max_tokens_per_minute: self
                .quota_max_tokens_per_minute
                .or(file.quota_max_tokens_per_minute)
                .unwrap_or(q.max_tokens_per_minute),
        };
        Ok(ServerConfig {
            tenancy: TenancyConfig {
                admin_key,
                defaults,
            },
            tls,
            allow_plaintext: self
                .allow_plaintext
                .or(file.allow_plaintext)
                .unwrap_or(false),
            load_gate: None,
            model: self
                .model
                .or(file.model)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL)),
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
            http_listen: self.http_listen.or(file.http_listen),
            metrics_listen: self
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
            engine,
            decode_kernel: self
                .decode_kernel
                .or(file.decode_kernel)
                .unwrap_or_default(),
            device: self.device.or(file.device).unwrap_or_default(),
            max_new_tokens_cap: self
                .max_new_tokens_cap
                .or(file.max_new_tokens_cap)
                .unwrap_or(4096),
            drain_timeout: Duration::from_secs(
                self.drain_timeout_secs
                    .or(file.drain_timeout_secs)
                    .unwrap_or(30),
            ),
            log_json: log_format == "json",
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("data")),
            database_url: self.database_url.or(file.database_url),
            blob_store: self.blob_store.or(file.blob_store),
            orphan_grace: Duration::from_secs(
                self.orphan_grace_secs
                    .or(file.orphan_grace_secs)
                    .unwrap_or(3600),
            ),
            job_lease: Duration::from_secs(
                self.job_lease_secs
                    .or(file.job_lease_secs)
                    .unwrap_or(30)
                    .max(1),
            ),
            adapter_cache_bytes: self
                .adapter_cache_mb
                .or(file.adapter_cache_mb)
                .unwrap_or(1024)
                << 20,
            lora_dtype: self.lora_dtype.or(file.lora_dtype).unwrap_or_default(),
            max_adapter_rank: self
                .max_adapter_rank
                .or(file.max_adapter_rank)
                .unwrap_or(64),
            max_virtual_tokens: self
                .max_virtual_tokens
                .or(file.max_virtual_tokens)
                .unwrap_or(DEFAULT_MAX_VIRTUAL_TOKENS),
            max_adapter_upload_bytes: self
                .max_adapter_upload_mb
                .or(file.max_adapter_upload_mb)
                .unwrap_or(512)
                << 20,
            base_model_aliases: self
                .base_model_aliases
                .or(file.base_model_aliases)
                .unwrap_or_else(|| vec![DEFAULT_BASE_ALIAS.into()]),
            max_dataset_bytes: self.max_dataset_mb.or(file.max_dataset_mb).unwrap_or(256) << 20,
            training_threads: self.training_threads.or(file.training_threads).unwrap_or(1),
            max_concurrent_jobs: self
                .max_concurrent_jobs
                .or(file.max_concurrent_jobs)
                .unwrap_or(1),
            keep_checkpoints: self
                .keep_checkpoints
                .or(file.keep_checkpoints)
                .unwrap_or(2)
                .max(1),
            max_training_memory_bytes: self
                .max_training_memory_mb
                .or(file.max_training_memory_mb)
                .map_or_else(default_training_memory_bytes, |mb| (mb as u64) << 20),
            hosted: crate::engine::hosted::HostedConfig {
                budget_bytes: self
                    .hosted_models_mb
                    .or(file.hosted_models_mb)
                    .unwrap_or(2048)
                    << 20,
                kv_cache_bytes: self
                    .hosted_model_kv_mb
                    .or(file.hosted_model_kv_mb)
                    .unwrap_or(256)
                    .max(1)
                    << 20,
                idle: Duration::from_secs(
                    self.hosted_model_idle_secs
                        .or(file.hosted_model_idle_secs)
                        .unwrap_or(300),
                ),
            },
        })
    }
}

/// Half the machine's memory (8 GiB where it cannot be read).
fn default_training_memory_bytes() -> u64 {
    crate::engine::machine_memory_bytes().map_or(8 << 30, |b| b as u64 / 2)
}

impl ServerConfig {
    /// Defaults for `model` (for tests and tools); listeners on loopback port 0; data in
    /// `data_dir`.
    pub fn for_model(model: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: None,
            engine: EngineConfig::default(),
            decode_kernel: DecodeKernel::default(),
            device: DeviceSpec::Cpu,
            max_new_tokens_cap: 4096,
            drain_timeout: Duration::from_secs(30),
            log_json: false,
            data_dir: data_dir.into(),
            database_url: None,
            blob_store: None,
            orphan_grace: Duration::from_secs(3600),
            job_lease: Duration::from_secs(30),
            adapter_cache_bytes: 1 << 30,
            lora_dtype: LoraDtype::F32,
            max_adapter_rank: 64,
            max_virtual_tokens: DEFAULT_MAX_VIRTUAL_TOKENS,
            max_adapter_upload_bytes: 512 << 20,
            base_model_aliases: vec![DEFAULT_BASE_ALIAS.into()],
            max_dataset_bytes: 256 << 20,
            training_threads: 1,
            max_concurrent_jobs: 1,
            keep_checkpoints: 2,
            max_training_memory_bytes: default_training_memory_bytes(),
            hosted: crate::engine::hosted::HostedConfig::default(),
            tenancy: TenancyConfig::default(),
            tls: None,
            allow_plaintext: false,
            load_gate: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("graft.toml");
        std::fs::write(&path, "max_active_sequences = 8\nprefill_chunk = 64\n").expect("write");
        let s = Settings::parse_from([
            "graftd",
            "--config",
            path.to_str().expect("utf8"),
            "--prefill-chunk",
            "32",
        ]);
        let c = s.resolve().expect("resolves");
        assert_eq!(c.engine.max_active_sequences, 8);
        assert_eq!(c.engine.limits.prefill_chunk, 32);
        assert_eq!(c.listen.port(), 50051);
    }

    #[test]
    fn the_decode_kernel_comes_from_flag_or_file_and_a_wrong_name_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("graft.toml");
        std::fs::write(&path, "decode_kernel = \"int16\"\n").expect("write");
        let file = Settings::parse_from(["graftd", "--config", path.to_str().expect("utf8")]);
        assert_eq!(
            file.resolve().expect("resolves").decode_kernel,
            DecodeKernel::Int16
        );
        let flag = Settings::parse_from([
            "graftd",
            "--config",
            path.to_str().expect("utf8"),
            "--decode-kernel",
            "exact",
        ]);
        assert_eq!(
            flag.resolve().expect("resolves").decode_kernel,
            DecodeKernel::Exact
        );
        let default = Settings::parse_from(["graftd"]);
        assert_eq!(
            default.resolve().expect("resolves").decode_kernel,
            DecodeKernel::Exact
        );
        let wrong = Settings::try_parse_from(["graftd", "--decode-kernel", "int8"])
            .expect_err("refused")
            .to_string();
        assert!(
            wrong.contains("int8") && wrong.contains("exact or int16"),
            "{wrong}"
        );
    }

    #[test]
    fn the_kv_cache_and_lora_dtypes_come_from_flag_or_file_and_a_wrong_name_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("graft.toml");
        std::fs::write(&path, "kv_cache_dtype = \"f16\"\nlora_dtype = \"bf16\"\n").expect("write");
        let cfg = path.to_str().expect("utf8");
        let dtypes = |args: &[&str]| {
            let s = Settings::parse_from(args).resolve().expect("resolves");
            (s.engine.kv_cache_dtype, s.lora_dtype)
        };
        assert_eq!(
            dtypes(&["graftd", "--config", cfg]),
            (KvDtype::F16, LoraDtype::Bf16)
        );
        assert_eq!(
            dtypes(&[
                "graftd",
                "--config",
                cfg,
                "--kv-cache-dtype",
                "f32",
                "--lora-dtype",
                "f16"
            ]),
            (KvDtype::F32, LoraDtype::F16)
        );
        assert_eq!(dtypes(&["graftd"]), (KvDtype::F32, LoraDtype::F32));
        assert_eq!(
            dtypes(&["graftd", "--lora-dtype", "int8"]),
            (KvDtype::F32, LoraDtype::Int8)
        );
        for (flag, known) in [
            ("--kv-cache-dtype", "f32 or f16"),
            ("--lora-dtype", "f32, bf16, f16 or int8"),
        ] {
            let wrong = Settings::try_parse_from(["graftd", flag, "fp8"])
                .expect_err("refused")
                .to_string();
            assert!(wrong.contains("fp8") && wrong.contains(known), "{wrong}");
        }
    }

    #[test]
    fn the_device_comes_from_flag_env_or_file_and_a_wrong_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("graft.toml");
        std::fs::write(&path, "device = \"cuda:1\"\n").expect("write");
        let cfg = path.to_str().expect("utf8");
        let file = Settings::parse_from(["graftd", "--config", cfg]);
        assert_eq!(
            file.resolve().expect("resolves").device,
            DeviceSpec::Cuda(1)
        );
        let flag = Settings::parse_from(["graftd", "--config", cfg, "--device", "cpu"]);
        assert_eq!(flag.resolve().expect("resolves").device, DeviceSpec::Cpu);
        let default = Settings::parse_from(["graftd"]);
        assert_eq!(default.resolve().expect("resolves").device, DeviceSpec::Cpu);
        let wrong = Settings::try_parse_from(["graftd", "--device", "gpu0"])
            .expect_err("refused")
            .to_string();
        assert!(
            wrong.contains("gpu0") && wrong.contains("cuda:N"),
            "{wrong}"
        );
        std::fs::write(&path, "device = \"tpu\"\n").expect("write");
        let wrong = Settings::parse_from(["graftd", "--config", cfg])
            .resolve()
            .expect_err("refused")
            .to_string();
        assert!(wrong.contains("tpu"), "{wrong}");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("graft.toml");
        std::fs::write(&path, "max_actve = 8\n").expect("write");
        let s = Settings::parse_from(["graftd", "--config", path.to_str().expect("utf8")]);
        assert!(s.resolve().is_err());
    }
}
