//! Starting and stopping a whole graftd: listeners, services, health, reflection, metrics,
//! the model load and warm-up, and the graceful drain. `main.rs` and the integration tests
//! both go through [`start`].
//! Invariant: health says SERVING only after the model is loaded and one warm-up step ran,
//! and NOT_SERVING again from the moment a drain begins.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use graft_proto::v1::{
    adapters_server::AdaptersServer, admin_server::AdminServer,
    generation_server::GenerationServer, training_server::TrainingServer,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{server::TcpIncoming, Certificate, Identity, ServerTlsConfig},
};
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{
    adapters::{AdapterRegistry, RegistryConfig},
    config::ServerConfig,
    engine::{hosted::HostedModels, EngineHandle, GenerationRequest, SamplingParams, StreamEvent},
    grpc::{
        adapters::AdaptersService, admin::AdminService, auth::Authenticate, convert::RequestLimits,
        generation::GenerationService, training::TrainingGrpc, Ready, ReadySlot,
    },
    model::BaseModel,
    store::Db,
    tenancy::Tenancy,
    train::jobs::{TrainingConfig, TrainingService},
};

/// Where the model load stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadState {
    Loading,
    Ready,
    Failed(String),
}

/// A started server.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The OpenAI-compatible HTTP front's address, when it is on (`--http-listen`).
    pub http_addr: Option<SocketAddr>,
    cfg: ServerConfig,
    ready: ReadySlot,
    health: HealthReporter,
    load: watch::Receiver<LoadState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    http: Option<(
        tokio::sync::oneshot::Sender<()>,
        JoinHandle<std::io::Result<()>>,
    )>,
}

const SERVICE_NAME: &str = "graft.v1.Generation";

async fn set_health(h: &HealthReporter, status: ServingStatus) {
    h.set_service_status("", status).await;
    h.set_service_status(SERVICE_NAME, status).await;
}

/// Binds the listeners, starts serving (NOT_SERVING at first) and loads the model in the
/// background.
pub async fn start(cfg: ServerConfig) -> anyhow::Result<RunningServer> {
    let tls = tls_config(&cfg)?;
    let metrics = crate::metrics::handle()?;
    let metrics_listener = TcpListener::bind(cfg.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("metrics listener {}: {e}", cfg.metrics_listen))?;
    let metrics_addr = metrics_listener.local_addr()?;
    tokio::spawn(crate::metrics::serve(metrics_listener, metrics));

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("gRPC listener {}: {e}", cfg.listen))?;
    let grpc_addr = listener.local_addr()?;
    let http_listener = match cfg.http_listen {
        Some(addr) => {
            let transport = crate::http::Transport::of(&cfg, addr)?;
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("HTTP listener {addr}: {e}"))?;
            Some((l, transport))
        }
        None => None,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    // Reflection in both versions: v1, and v1alpha for the many tools that still ask only
    // for it (grpcurl before 1.8.8, older Postman and evans).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(graft_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_v1alpha) =
        (reflection().build_v1()?, reflection().build_v1alpha()?);
    // The database and the tenants come before the model: keys are checked (and the Admin
    // service answers) while the model loads.
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| anyhow::anyhow!("data directory {}: {e}", cfg.data_dir.display()))?;
    let db = match &cfg.database_url {
        Some(url) => Db::connect(url).await?,
        None => Db::open(&cfg.data_dir.join("graft.db")).await?,
    };
    let blobs = Arc::new(
        crate::blobs::Blobs::open(cfg.blob_store.as_deref(), &cfg.data_dir)
            .map_err(|e| anyhow::anyhow!(e))?,
    );
    let tenancy = Tenancy::open(db.clone(), cfg.tenancy.clone()).await?;
    // On a database other processes share, their tenant and key changes reach this one by
    // notification, and by a poll every 10 s at worst (returns at once on SQLite).
    tokio::spawn(
        tenancy
            .clone()
            .follow_changes(std::time::Duration::from_secs(10)),
    );
    if cfg.tenancy.admin_key.is_none() {
        tracing::warn!("no admin key configured: the Admin service is disabled");
    }
    let auth = Authenticate {
        tenancy: tenancy.clone(),
    };
    let ready: ReadySlot = Arc::default();
    let generation =
        GenerationService::new(ready.clone(), RequestLimits::new(cfg.max_new_tokens_cap));
    let adapters = AdaptersService::new(ready.clone());
    let training = TrainingGrpc::new(ready.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let serve = tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(
                GenerationServer::new(generation),
                auth.clone(),
            ))
            .add_service(InterceptedService::new(
                TrainingServer::new(training)
                    .max_decoding_message_size(8 << 20)
                    .max_encoding_message_size(8 << 20),
                auth.clone(),
            ))
            .add_service(InterceptedService::new(
                AdaptersServer::new(adapters)
                    .max_decoding_message_size(8 << 20)
                    .max_encoding_message_size(8 << 20),
                auth.clone(),
            ))
            .add_service(InterceptedService::new(
                AdminServer::new(AdminService),
                auth,
            ))
            // TCP_NODELAY: without it a response written in several pieces waits out the
            // peer's delayed ACK (~40 ms; the builder's own setting does not apply to an
            // incoming stream given like this).
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    let (http_addr, http) = match http_listener {
        Some((l, transport)) => {
            let addr = l.local_addr()?;
            let state = crate::http::HttpState {
                ready: ready.clone(),
                tenancy: tenancy.clone(),
                limits: RequestLimits::new(cfg.max_new_tokens_cap),
                started_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(crate::http::serve(l, transport, state, async {
                let _ = rx.await;
            }));
            tracing::info!(http_addr = %addr, "OpenAI-compatible HTTP front listening");
            (Some(addr), Some((tx, task)))
        }
        None => (None, None),
    };
    tracing::info!(%grpc_addr, %metrics_addr, "listening");

    let (load_tx, load) = watch::channel(LoadState::Loading);
    {
        let (cfg, slot, health) = (cfg.clone(), ready.clone(), health.clone());
        tokio::spawn(async move {
            let state = match load_and_warm(&cfg, db, tenancy, blobs, &slot).await {
                Ok(()) => {
                    set_health(&health, ServingStatus::Serving).await;
                    LoadState::Ready
                }
                Err(e) => {
                    tracing::error!(error = %e, "model load failed");
                    LoadState::Failed(format!("{e:#}"))
                }
            };
            let _ = load_tx.send(state);
        });
    }
    Ok(RunningServer {
        grpc_addr,
        metrics_addr,
        http_addr,
        http,
        cfg,
        ready,
        health,
        load,
        shutdown: Some(stop_tx),
        serve,
    })
}

/// The listener's TLS settings, or `None` for plaintext (allowed on loopback or when
/// explicitly configured).
fn tls_config(cfg: &ServerConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
    let Some(files) = &cfg.tls else {
        anyhow::ensure!(
            cfg.listen.ip().is_loopback() || cfg.allow_plaintext,
            "refusing plaintext gRPC on {}: configure --tls-cert/--tls-key, or pass --allow-plaintext (e.g. behind a TLS-terminating proxy)",
            cfg.listen
        );
        return Ok(None);
    };
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| anyhow::anyhow!("TLS file {}: {e}", p.display()))
    };
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

async fn load_and_warm(
    cfg: &ServerConfig,
    db: Db,
    tenancy: Arc<Tenancy>,
    blobs: Arc<crate::blobs::Blobs>,
    slot: &ReadySlot,
) -> anyhow::Result<()> {
    if let Some(gate) = &cfg.load_gate {
        gate.notified().await;
    }
    let t0 = Instant::now();
    let (path, device) = (cfg.model.clone(), cfg.device);
    let model =
        tokio::task::spawn_blocking(move || BaseModel::load(&path, &device.open()?)).await??;
    let mut model = model;
    model.llama.set_decode_kernel(cfg.decode_kernel);
    let model = Arc::new(model);
    tracing::info!(
        model = %model.name,
        layers = model.config().num_layers,
        hidden = model.config().hidden_size,
        device = %cfg.device,
        seconds = t0.elapsed().as_secs_f64(),
        "model loaded"
    );
    let mut base_aliases = cfg.base_model_aliases.clone();
    base_aliases.extend(model.aliases.iter().cloned());
    let adapters = Arc::new(
        AdapterRegistry::open(
            db.clone(),
            tenancy.clone(),
            model.clone(),
            blobs.clone(),
            RegistryConfig {
                data_dir: cfg.data_dir.clone(),
                orphan_grace: cfg.orphan_grace,
                cache_bytes: cfg.adapter_cache_bytes,
                lora_dtype: cfg.lora_dtype,
                max_rank: cfg.max_adapter_rank,
                max_virtual_tokens: cfg.max_virtual_tokens,
                max_upload_bytes: cfg.max_adapter_upload_bytes,
                base_aliases,
            },
        )
        .await?,
    );
    // Adapter versions other processes on a shared database store or delete: by
    // notification, and every 10 s at worst (returns at once on SQLite).
    tokio::spawn(
        adapters
            .clone()
            .follow_changes(std::time::Duration::from_secs(10)),
    );
    // Orphaned blobs (an upload whose row never came) go once older than the grace; the
    // sweep runs every quarter of it, at most once a minute.
    tokio::spawn(
        adapters
            .clone()
            .sweep_forever((cfg.orphan_grace / 4).max(std::time::Duration::from_secs(60))),
    );
    // What the allocator keeps for training steps (`process::keep_freed_memory`) goes back
    // to the kernel once a minute.
    tokio::spawn(crate::process::release_freed_memory_every(
        std::time::Duration::from_secs(60),
    ));
    let training = TrainingService::new(
        db,
        tenancy,
        model.clone(),
        adapters.clone(),
        TrainingConfig {
            data_dir: cfg.data_dir.clone(),
            max_rank: cfg.max_adapter_rank,
            max_virtual_tokens: cfg.max_virtual_tokens,
            max_dataset_bytes: cfg.max_dataset_bytes,
            training_threads: cfg.training_threads,
            max_concurrent_jobs: cfg.max_concurrent_jobs,
            keep_checkpoints: cfg.keep_checkpoints,
            orphan_grace: cfg.orphan_grace,
            job_lease: cfg.job_lease,
            max_training_memory_bytes: cfg.max_training_memory_bytes,
        },
    );
    let engine = EngineHandle::start(model.clone(), cfg.engine.clone())?;
    training.attach_engine(engine.clone());
    // One real step through the engine before we say SERVING.
    let prompt_ids = model.tokenizer.encode("Hello").unwrap_or_else(|_| vec![0]);
    let mut rx = engine.submit(GenerationRequest {
        task: crate::engine::Task::Generate,
        prompt_ids,
        params: SamplingParams {
            max_new_tokens: 1,
            temperature: 0.0,
            ..Default::default()
        },
        deadline: None,
        adapter: None,
        tenant: "graftd-warm-up".into(),
        constraint: None,
        background: false,
    })?;
    loop {
        match rx.recv().await {
            Some(StreamEvent::Finished { .. }) => break,
            Some(StreamEvent::Tokens { .. }) => {}
            Some(other) => anyhow::bail!("warm-up failed: {other:?}"),
            None => anyhow::bail!("warm-up failed: the engine stopped"),
        }
    }
    tracing::info!(
        seconds = t0.elapsed().as_secs_f64(),
        "warm-up done; serving"
    );
    training.start().await?;
    let hosted = HostedModels::new(cfg.hosted.clone(), cfg.engine.clone());
    hosted.spawn_reaper();
    slot.set(Ready {
        engine,
        adapters,
        training,
        hosted,
    })
    .map_err(|_| anyhow::anyhow!("engine already started"))?;
    Ok(())
}

impl RunningServer {
    /// Waits until the model is loaded and warm (or its load failed).
    /// The configuration it runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    pub async fn ready(&self) -> anyhow::Result<()> {
        let mut rx = self.load.clone();
        let state = rx
            .wait_for(|s| *s != LoadState::Loading)
            .await
            .map_err(|_| anyhow::anyhow!("loader vanished"))?
            .clone();
        match state {
            LoadState::Ready => Ok(()),
            LoadState::Failed(e) => Err(anyhow::anyhow!("model load failed: {e}")),
            LoadState::Loading => unreachable!("wait_for returned while loading"),
        }
    }

    pub fn load_state(&self) -> LoadState {
        self.load.borrow().clone()
    }

    pub fn engine(&self) -> Option<&EngineHandle> {
        self.ready.get().map(|r| &r.engine)
    }

    pub fn adapters(&self) -> Option<&Arc<AdapterRegistry>> {
        self.ready.get().map(|r| &r.adapters)
    }

    pub fn hosted(&self) -> Option<&Arc<HostedModels>> {
        self.ready.get().map(|r| &r.hosted)
    }

    /// Graceful stop: NOT_SERVING, refuse new requests, let in-flight ones finish within the
    /// drain timeout (then cancel them), close the listener, wait for the server to end.
    pub async fn drain(mut self) -> anyhow::Result<()> {
        set_health(&self.health, ServingStatus::NotServing).await;
        if let Some(ready) = self.ready.get() {
            // Running training jobs stop at their next step and go back to the queue (another
            // replica resumes them from their last checkpoint), within the drain timeout.
            ready
                .training
                .release_all(Instant::now() + self.cfg.drain_timeout)
                .await;
            // The base's engine and every hosted model's, under one deadline.
            let mut engines = vec![ready.engine.clone()];
            engines.extend(ready.hosted.engines().await);
            for e in &engines {
                e.begin_drain();
            }
            let deadline = Instant::now() + self.cfg.drain_timeout;
            for engine in &engines {
                if !engine.wait_idle(deadline).await {
                    tracing::warn!(in_flight = engine.in_flight(), "drain timeout; cancelling");
                    engine.cancel_all();
                    engine
                        .wait_idle(Instant::now() + std::time::Duration::from_secs(5))
                        .await;
                }
            }
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some((tx, task)) = self.http.take() {
            let _ = tx.send(());
            task.await??;
        }
        (&mut self.serve).await??;
        tracing::info!("drained; bye");
        Ok(())
    }
}
