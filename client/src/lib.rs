//! `graft-client`: a typed async client for graftd.
//! Wraps the generated tonic clients; callers build requests with [`GenerateOptions`] and
//! get domain-friendly results back. Transport errors and server statuses stay `tonic::Status`
//! so callers can match on the code. Idempotent reads (get, list, export) are retried on
//! `UNAVAILABLE` with backoff ([`retrying`]); uploads and exports can report progress
//! ([`GraftClient::with_progress`]).

use futures::StreamExt as _;
use graft_proto::v1::admin_client::AdminClient;
use graft_proto::v1::{
    self as pb, adapters_client::AdaptersClient, generation_client::GenerationClient,
    import_adapter_request::Part, training_client::TrainingClient, ChatMessage, GenerateRequest,
    SamplingParameters,
};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Request, Status, Streaming,
};

/// Adds `authorization: Bearer <key>` to every call (when a key is set).
#[derive(Clone, Default)]
pub struct BearerKey(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerKey {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The transport every typed client runs over: the channel plus the bearer key.
pub type Transport = InterceptedService<Channel, BearerKey>;

/// TLS settings of a connection (used for `https://` addresses).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM CA certificate(s) to trust; `None`: the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The name the server's certificate must carry (default: the address's host).
    pub domain: Option<String>,
    /// PEM certificate and key for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Called with the bytes sent (uploads) or received (exports) so far.
pub type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// Runs an idempotent call, retrying `UNAVAILABLE` (server loading, draining or
/// restarting) with exponential backoff: 4 tries, 100 ms, 200 ms, 400 ms apart.
pub async fn retrying<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut delay = std::time::Duration::from_millis(100);
    for _ in 0..3 {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    call().await
}

/// How to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// API key (a tenant's, or the admin key) sent as a bearer token.
    pub api_key: Option<String>,
    pub tls: TlsOptions,
}

pub use graft_proto::v1 as proto;

pub mod routing;
pub use routing::{Replicas, ADAPTER_HEADER};

/// Connection to one graftd.
#[derive(Clone)]
pub struct GraftClient {
    channel: Channel,
    generation: GenerationClient<Transport>,
    adapters: AdaptersClient<Transport>,
    training: TrainingClient<Transport>,
    admin: AdminClient<Transport>,
    progress: Option<Progress>,
}

/// Adapter file names: the config, PEFT's weights and AdapterHub's weights (bottleneck
/// adapters).
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const ADAPTERHUB_WEIGHTS_FILE: &str = "adapter.safetensors";
const UPLOAD_CHUNK: usize = 1 << 20;

/// Sampling options for a request; `None` leaves the server's default.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub logprobs: bool,
    /// With `logprobs`: this many most likely alternatives per token (0-20).
    pub top_logprobs: u32,
    pub adapter: Option<String>,
    /// Acting tenant: leave `None` with a tenant's key; name it with the admin key.
    pub tenant: Option<String>,
}

impl GenerateOptions {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: u32) -> Self {
        Self {
            max_new_tokens: Some(max_new_tokens),
            temperature: Some(0.0),
            ..Default::default()
        }
    }

    fn parameters(&self) -> SamplingParameters {
        SamplingParameters {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            stop: self.stop.clone(),
            seed: self.seed,
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs,
        }
    }

    /// A request for a raw prompt.
    pub fn prompt(&self, prompt: impl Into<String>) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            adapter: self.adapter.clone().unwrap_or_default(),
            tenant: self.tenant.clone().unwrap_or_default(),
            parameters: Some(self.parameters()),
            ..Default::default()
        }
    }

    /// A request for chat messages `(role, content)`.
    pub fn chat<R: Into<String>, C: Into<String>>(
        &self,
        messages: impl IntoIterator<Item = (R, C)>,
    ) -> GenerateRequest {
        GenerateRequest {
            messages: messages
                .into_iter()
                .map(|(role, content)| ChatMessage {
                    role: role.into(),
                    content: content.into(),
                })
                .collect(),
            adapter: self.adapter.clone().unwrap_or_default(),
            tenant: self.tenant.clone().unwrap_or_default(),
            parameters: Some(self.parameters()),
            ..Default::default()
        }
    }
}

/// Errors of connecting.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid address {0:?}: {1}")]
    Address(String, String),
    #[error("cannot connect to {0}: {1}")]
    Transport(String, tonic::transport::Error),
    #[error("invalid API key: it must be printable ASCII")]
    ApiKey,
}

/// How an adapter is imported.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Accept an adapter made for another base model.
    pub force: bool,
    /// A classification head's labels in the order of its outputs (empty: LABEL_i).
    pub labels: Vec<String>,
}

impl GraftClient {
    /// Connects to `addr` (`http://host:port`; a bare `host:port` gets `http://`) without
    /// a key (only health and reflection will answer).
    pub async fn connect(addr: &str) -> Result<Self, ConnectError> {
        Self::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connects with a key and, for `https://` addresses, TLS.
    pub async fn connect_with(addr: &str, opts: &ConnectOptions) -> Result<Self, ConnectError> {
        let (uri, endpoint) = Self::endpoint(addr, opts)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ConnectError::Transport(uri, e))?;
        Self::from_channel(channel).with_api_key(opts.api_key.as_deref())
    }

    /// Like [`Self::connect_with`], connecting on the first call instead of now (and again
    /// after the connection is lost): a replica that is down fails its calls with
    /// `UNAVAILABLE`, not the client's making.
    pub fn connect_lazy_with(addr: &str, opts: &ConnectOptions) -> Result<Self, ConnectError> {
        let (_, endpoint) = Self::endpoint(addr, opts)?;
        Self::from_channel(endpoint.connect_lazy()).with_api_key(opts.api_key.as_deref())
    }

    fn endpoint(
        addr: &str,
        opts: &ConnectOptions,
    ) -> Result<(String, tonic::transport::Endpoint), ConnectError> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let mut endpoint = Channel::from_shared(uri.clone())
            .map_err(|e| ConnectError::Address(addr.into(), e.to_string()))?;
        if uri.starts_with("https://") {
            let t = &opts.tls;
            let mut tls = ClientTlsConfig::new();
            tls = match &t.ca_pem {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
                None => tls.with_native_roots(),
            };
            if let Some(d) = &t.domain {
                tls = tls.domain_name(d.clone());
            }
            if let Some((cert, key)) = &t.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ConnectError::Transport(uri.clone(), e))?;
        }
        Ok((uri, endpoint))
    }

    pub fn from_channel(channel: Channel) -> Self {
        Self::build(channel, BearerKey::default())
    }

    fn build(channel: Channel, key: BearerKey) -> Self {
        let t = || InterceptedService::new(channel.clone(), key.clone());
        Self {
            generation: GenerationClient::new(t()),
            adapters: AdaptersClient::new(t())
                .max_decoding_message_size(8 << 20)
                .max_encoding_message_size(8 << 20),
            training: TrainingClient::new(t())
                .max_decoding_message_size(8 << 20)
                .max_encoding_message_size(8 << 20),
            admin: AdminClient::new(t()),
            channel,
            progress: None,
        }
    }

    /// The same client, reporting upload and export bytes to `progress`.
    pub fn with_progress(&self, progress: Progress) -> Self {
        Self {
            progress: Some(progress),
            ..self.clone()
        }
    }

    fn report(&self, bytes: u64) {
        if let Some(p) = &self.progress {
            p(bytes);
        }
    }

    /// Streams `msgs`, reporting the cumulative size of each as it is sent.
    fn reporting<M: Send + 'static>(
        &self,
        msgs: Vec<(u64, M)>,
    ) -> impl futures::Stream<Item = M> + Send + 'static {
        let progress = self.progress.clone();
        let mut sent = 0u64;
        futures::stream::iter(msgs).map(move |(n, m)| {
            sent += n;
            if let Some(p) = &progress {
                p(sent);
            }
            m
        })
    }

    /// The same connection, calling with `key` (or with none).
    pub fn with_api_key(&self, key: Option<&str>) -> Result<Self, ConnectError> {
        let key = match key {
            Some(k) => Some(
                format!("Bearer {k}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ConnectError::ApiKey)?,
            ),
            None => None,
        };
        Ok(Self::build(self.channel.clone(), BearerKey(key)))
    }

    /// The gRPC health service's overall status (`SERVING`, `NOT_SERVING`, ...).
    pub async fn health(&self) -> Result<String, Status> {
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let r = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest::default())
            .await?
            .into_inner();
        Ok(r.status().as_str_name().to_string())
    }

    /// The raw admin client.
    pub fn admin(&self) -> AdminClient<Transport> {
        self.admin.clone()
    }

    /// Creates a tenant (admin key).
    pub async fn create_tenant(&self, name: &str) -> Result<pb::Tenant, Status> {
        Ok(self
            .admin
            .clone()
            .create_tenant(pb::CreateTenantRequest {
                name: name.into(),
                quotas: None,
            })
            .await?
            .into_inner())
    }

    /// A new key for `tenant` (admin key); returns the secret bearer token.
    pub async fn create_key(&self, tenant: &str, description: &str) -> Result<String, Status> {
        Ok(self
            .admin
            .clone()
            .create_key(pb::CreateKeyRequest {
                tenant: tenant.into(),
                description: description.into(),
                ttl_seconds: 0,
            })
            .await?
            .into_inner()
            .secret)
    }

    /// The raw training client.
    pub fn training(&self) -> TrainingClient<Transport> {
        self.training.clone()
    }

    /// Uploads a JSONL dataset (streamed in chunks). `format` empty: detected.
    pub async fn upload_dataset(
        &self,
        tenant: &str,
        name: &str,
        format: &str,
        jsonl: Vec<u8>,
    ) -> Result<pb::Dataset, Status> {
        use pb::upload_dataset_request::Part as P;
        let mut msgs = vec![(
            0,
            pb::UploadDatasetRequest {
                part: Some(P::Header(pb::DatasetHeader {
                    tenant: tenant.into(),
                    name: name.into(),
                    format: format.into(),
                })),
            },
        )];
        for c in jsonl.chunks(UPLOAD_CHUNK) {
            msgs.push((
                c.len() as u64,
                pb::UploadDatasetRequest {
                    part: Some(P::Chunk(c.to_vec())),
                },
            ));
        }
        Ok(self
            .training
            .clone()
            .upload_dataset(self.reporting(msgs))
            .await?
            .into_inner())
    }

    pub async fn create_job(&self, req: pb::CreateJobRequest) -> Result<pb::Job, Status> {
        Ok(self.training.clone().create_job(req).await?.into_inner())
    }

    pub async fn get_job(&self, tenant: &str, id: &str) -> Result<pb::Job, Status> {
        let req = pb::GetJobRequest {
            tenant: tenant.into(),
            id: id.into(),
        };
        Ok(retrying(|| {
            let (mut c, r) = (self.training.clone(), req.clone());
            async move { c.get_job(r).await }
        })
        .await?
        .into_inner())
    }

    pub async fn cancel_job(&self, tenant: &str, id: &str) -> Result<pb::Job, Status> {
        Ok(self
            .training
            .clone()
            .cancel_job(pb::CancelJobRequest {
                tenant: tenant.into(),
                id: id.into(),
            })
            .await?
            .into_inner())
    }

    /// The job's events from `after_seq` on; the stream ends when the job does.
    pub async fn watch_job(
        &self,
        tenant: &str,
        id: &str,
        after_seq: u64,
    ) -> Result<Streaming<pb::JobEvent>, Status> {
        Ok(self
            .training
            .clone()
            .watch_job(pb::WatchJobRequest {
                tenant: tenant.into(),
                id: id.into(),
                after_seq,
            })
            .await?
            .into_inner())
    }

    /// Follows a job to its end; returns every event and the final job.
    pub async fn follow_job(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<(Vec<pb::JobEvent>, pb::Job), Status> {
        let mut s = self.watch_job(tenant, id, 0).await?;
        let mut events = Vec::new();
        while let Some(e) = s.message().await? {
            events.push(e);
        }
        Ok((events, self.get_job(tenant, id).await?))
    }

    /// The raw adapters client.
    pub fn adapters(&self) -> AdaptersClient<Transport> {
        self.adapters.clone()
    }

    /// Uploads a PEFT adapter (the two files' bytes) as the next version of `name`.
    pub async fn import_adapter(
        &self,
        tenant: &str,
        name: &str,
        config: Vec<u8>,
        weights: Vec<u8>,
        force: bool,
    ) -> Result<pb::AdapterVersion, Status> {
        let opts = ImportOptions {
            force,
            labels: Vec::new(),
        };
        self.import_adapter_with(tenant, name, config, weights, &opts)
            .await
    }

    /// [`GraftClient::import_adapter`] with every option (a classification head's labels).
    pub async fn import_adapter_with(
        &self,
        tenant: &str,
        name: &str,
        config: Vec<u8>,
        weights: Vec<u8>,
        opts: &ImportOptions,
    ) -> Result<pb::AdapterVersion, Status> {
        let mut msgs = vec![(
            0,
            pb::ImportAdapterRequest {
                part: Some(Part::Header(pb::ImportHeader {
                    tenant: tenant.into(),
                    name: name.into(),
                    force: opts.force,
                    labels: opts.labels.clone(),
                })),
            },
        )];
        for (file, data) in [
            (ADAPTER_CONFIG_FILE, config),
            (ADAPTER_WEIGHTS_FILE, weights),
        ] {
            for c in data.chunks(UPLOAD_CHUNK) {
                msgs.push((
                    c.len() as u64,
                    pb::ImportAdapterRequest {
                        part: Some(Part::Chunk(pb::AdapterFileChunk {
                            file_name: file.into(),
                            data: c.to_vec(),
                        })),
                    },
                ));
            }
        }
        Ok(self
            .adapters
            .clone()
            .import_adapter(self.reporting(msgs))
            .await?
            .into_inner())
    }

    /// Uploads an adapter directory: `adapter_config.json` and the weights, PEFT's
    /// `adapter_model.safetensors` or AdapterHub's `adapter.safetensors`.
    pub async fn import_adapter_dir(
        &self,
        tenant: &str,
        name: &str,
        dir: &std::path::Path,
        force: bool,
    ) -> Result<pb::AdapterVersion, Status> {
        let opts = ImportOptions {
            force,
            labels: Vec::new(),
        };
        self.import_adapter_dir_with(tenant, name, dir, &opts).await
    }

    /// [`GraftClient::import_adapter_dir`] with every option.
    pub async fn import_adapter_dir_with(
        &self,
        tenant: &str,
        name: &str,
        dir: &std::path::Path,
        opts: &ImportOptions,
    ) -> Result<pb::AdapterVersion, Status> {
        let read = |f: &str| {
            std::fs::read(dir.join(f))
                .map_err(|e| Status::invalid_argument(format!("{}: {e}", dir.join(f).display())))
        };
        let weights = if dir.join(ADAPTER_WEIGHTS_FILE).exists() {
            ADAPTER_WEIGHTS_FILE
        } else {
            ADAPTERHUB_WEIGHTS_FILE
        };
        let (c, w) = (read(ADAPTER_CONFIG_FILE)?, read(weights)?);
        self.import_adapter_with(tenant, name, c, w, opts).await
    }

    /// Downloads a version into `dir` as its library's files; returns the weights file's
    /// name.
    pub async fn export_adapter_dir(
        &self,
        tenant: &str,
        adapter: &str,
        dir: &std::path::Path,
    ) -> Result<String, Status> {
        self.export_adapter_dir_as(tenant, adapter, dir, "", "")
            .await
    }

    /// [`Self::export_adapter_dir`] in `format` (ExportAdapterRequest's: "" for the
    /// version's own files, "gguf" for a fully fine-tuned model as one GGUF file, its
    /// matrices in `quantization`); returns the weights file's name.
    pub async fn export_adapter_dir_as(
        &self,
        tenant: &str,
        adapter: &str,
        dir: &std::path::Path,
        format: &str,
        quantization: &str,
    ) -> Result<String, Status> {
        let files = self
            .export_files_as(tenant, adapter, format, quantization)
            .await?;
        let mut weights = String::new();
        for (f, d) in files {
            // Only plain names: the server never writes outside `dir`.
            if std::path::Path::new(&f).file_name() != Some(std::ffi::OsStr::new(&f)) {
                return Err(Status::internal(format!("unexpected file name {f:?}")));
            }
            if f.ends_with(".safetensors") || f.ends_with(".gguf") {
                weights = f.clone();
            }
            std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::write(dir.join(&f), d))
                .map_err(|e| Status::internal(format!("{}: {e}", dir.join(&f).display())))?;
        }
        Ok(weights)
    }

    /// Downloads a version's files as the server names them, in order: an adapter's config
    /// and weights, or a fully fine-tuned model's HF directory (config.json,
    /// model.safetensors, tokenizer.json, tokenizer_config.json).
    pub async fn export_files(
        &self,
        tenant: &str,
        adapter: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, Status> {
        self.export_files_as(tenant, adapter, "", "").await
    }

    /// [`Self::export_files`] in `format` and `quantization` (see
    /// [`Self::export_adapter_dir_as`]).
    pub async fn export_files_as(
        &self,
        tenant: &str,
        adapter: &str,
        format: &str,
        quantization: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, Status> {
        let req = pb::ExportAdapterRequest {
            tenant: tenant.into(),
            adapter: adapter.into(),
            format: format.into(),
            quantization: quantization.into(),
        };
        let mut s = retrying(|| {
            let (mut c, r) = (self.adapters.clone(), req.clone());
            async move { c.export_adapter(r).await }
        })
        .await?
        .into_inner();
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut received = 0u64;
        while let Some(chunk) = s.message().await? {
            received += chunk.data.len() as u64;
            self.report(received);
            match files.last_mut() {
                Some((name, data)) if *name == chunk.file_name => data.extend(chunk.data),
                _ => files.push((chunk.file_name, chunk.data)),
            }
        }
        Ok(files)
    }

    /// Downloads a version's files: `(adapter_config.json, weights)`.
    pub async fn export_adapter(
        &self,
        tenant: &str,
        adapter: &str,
    ) -> Result<(Vec<u8>, Vec<u8>), Status> {
        let (c, _, w) = self.export_adapter_files(tenant, adapter).await?;
        Ok((c, w))
    }

    /// Downloads an adapter version's files: `(config, weights file name, weights)`.
    pub async fn export_adapter_files(
        &self,
        tenant: &str,
        adapter: &str,
    ) -> Result<(Vec<u8>, String, Vec<u8>), Status> {
        let (mut c, mut w) = (Vec::new(), (ADAPTER_WEIGHTS_FILE.to_string(), Vec::new()));
        for (name, data) in self.export_files(tenant, adapter).await? {
            match name.as_str() {
                ADAPTER_CONFIG_FILE => c = data,
                ADAPTER_WEIGHTS_FILE | ADAPTERHUB_WEIGHTS_FILE => w = (name, data),
                other => return Err(Status::internal(format!("unexpected file {other:?}"))),
            }
        }
        Ok((c, w.0, w.1))
    }

    /// Every live version of the tenant's adapters (all pages).
    pub async fn list_adapters(&self, tenant: &str) -> Result<Vec<pb::AdapterVersion>, Status> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListAdaptersRequest {
                tenant: tenant.into(),
                name: String::new(),
                page_size: 200,
                page_token: token,
            };
            let page = retrying(|| {
                let (mut c, r) = (self.adapters.clone(), req.clone());
                async move { c.list_adapters(r).await }
            })
            .await?
            .into_inner();
            out.extend(page.adapters);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    pub async fn get_adapter(
        &self,
        tenant: &str,
        adapter: &str,
    ) -> Result<pb::AdapterVersion, Status> {
        let req = pb::GetAdapterRequest {
            tenant: tenant.into(),
            adapter: adapter.into(),
        };
        Ok(retrying(|| {
            let (mut c, r) = (self.adapters.clone(), req.clone());
            async move { c.get_adapter(r).await }
        })
        .await?
        .into_inner())
    }

    /// Deletes `name@version` or every version of `name`; returns the deleted versions.
    pub async fn delete_adapter(&self, tenant: &str, adapter: &str) -> Result<Vec<u32>, Status> {
        Ok(self
            .adapters
            .clone()
            .delete_adapter(pb::DeleteAdapterRequest {
                tenant: tenant.into(),
                adapter: adapter.into(),
            })
            .await?
            .into_inner()
            .deleted_versions)
    }

    /// The raw generated client, for calls this wrapper does not cover.
    pub fn generation(&self) -> GenerationClient<Transport> {
        self.generation.clone()
    }

    pub async fn generate(&self, req: GenerateRequest) -> Result<pb::GenerateResponse, Status> {
        let req = naming_adapter(&req.adapter.clone(), req);
        Ok(self.generation.clone().generate(req).await?.into_inner())
    }

    /// Classifies texts or conversations with an adapter that has a classification head.
    pub async fn classify(&self, req: pb::ClassifyRequest) -> Result<pb::ClassifyResponse, Status> {
        let req = naming_adapter(&req.adapter.clone(), req);
        Ok(self.generation.clone().classify(req).await?.into_inner())
    }

    /// The rewards a reward-model adapter gives (prompt, completion) pairs.
    pub async fn score(&self, req: pb::ScoreRequest) -> Result<pb::ScoreResponse, Status> {
        let req = naming_adapter(&req.adapter.clone(), req);
        Ok(self.generation.clone().score(req).await?.into_inner())
    }

    pub async fn generate_stream(
        &self,
        req: GenerateRequest,
    ) -> Result<Streaming<pb::GenerateStreamResponse>, Status> {
        let req = naming_adapter(&req.adapter.clone(), req);
        Ok(self
            .generation
            .clone()
            .generate_stream(req)
            .await?
            .into_inner())
    }
}

/// The request with the [`ADAPTER_HEADER`] set to the adapter's name (none for the bare
/// model, or a name that is not a valid header value: the server rejects those anyway).
fn naming_adapter<T>(adapter: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    let key = routing::routing_key(adapter);
    if let (false, Ok(v)) = (key.is_empty(), key.parse::<MetadataValue<Ascii>>()) {
        req.metadata_mut().insert(ADAPTER_HEADER, v);
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn unavailable_is_retried_and_other_errors_are_not() {
        let calls = AtomicUsize::new(0);
        let r = retrying(|| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(Status::unavailable("loading"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.expect("third try"), 2);
        let calls = AtomicUsize::new(0);
        let r: Result<(), Status> = retrying(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::not_found("x")) }
        })
        .await;
        assert_eq!(r.expect_err("not retried").code(), tonic::Code::NotFound);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let calls = AtomicUsize::new(0);
        let r: Result<(), Status> = retrying(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::unavailable("down")) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4, "gives up after 4 tries");
    }

    #[test]
    fn adapter_calls_name_the_adapter_in_a_header_for_proxies() {
        let r = naming_adapter("support@3", ());
        assert_eq!(
            r.metadata()
                .get(ADAPTER_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("support"),
            "the name, without the version"
        );
        assert!(naming_adapter("", ())
            .metadata()
            .get(ADAPTER_HEADER)
            .is_none());
        assert!(naming_adapter("bad\nname", ())
            .metadata()
            .get(ADAPTER_HEADER)
            .is_none());
    }
}
