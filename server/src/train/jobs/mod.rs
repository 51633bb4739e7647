//! Datasets and training jobs as a service: upload and validate datasets, create, run,
//! cancel and watch jobs, and register each successful result as a new adapter version.
//! One runner task owns job execution (one job computes at a time by default); job state
//! lives in the database, events are stored before anyone sees them, so `watch` can replay.
//! Training computes in its own rayon pool of `training_threads` threads (default 1 of the
//! machine's cores), which leaves the rest to the serving engine: serving keeps priority,
//! training keeps a floor.
//!
//! `create`: CreateJob's checks of a job against its data, the tenant's adapters and the
//! quotas.

mod create;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use super::{
    classes,
    dataset::{self, Format, Overflow, Problem, Tokenized},
    methods::{self, MethodSpec},
    trainer::{self, Control, Outcome, TrainEvent, TrainSpec},
};
use crate::{
    adapters::{peft::Details, AdapterRegistry},
    model::BaseModel,
    store::{
        training::{DatasetRow, EventRow, JobRow, JobStatus},
        Db, DbError,
    },
    tenancy::{Tenancy, TenancyError},
};

/// Settings of the training service.
#[derive(Debug, Clone)]
pub struct TrainingConfig {
    pub data_dir: PathBuf,
    pub max_rank: usize,
    /// Most virtual tokens a prompt-method job may train.
    pub max_virtual_tokens: usize,
    pub max_dataset_bytes: usize,
    pub training_threads: usize,
    /// Jobs computing at the same time (default 1; the others wait in the queue).
    pub max_concurrent_jobs: usize,
    /// Checkpoints a running job keeps on disk (the newest; at least 1). All of them go
    /// when the job succeeds.
    pub keep_checkpoints: usize,
    /// Stored files no row names are removed once older than this.
    pub orphan_grace: std::time::Duration,
    /// How long a claimed job stays this process's without a heartbeat (renewed every
    /// third of it): after a crash, another process on the same database takes the job over
    /// once this has passed.
    pub job_lease: std::time::Duration,
    /// Memory one full fine-tuning run may take beyond the resident base (its estimate is
    /// checked at CreateJob).
    pub max_training_memory_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Storage(String),
    /// The server's disk is full: nothing was stored.
    #[error("no space left on the server's disk ({0})")]
    NoSpace(String),
    #[error(transparent)]
    Quota(#[from] TenancyError),
    /// The run would need more memory than this server allows a training run.
    #[error("{method} needs an estimated {needed_mib} MiB of memory to train; this server allows {limit_mib} MiB (--max-training-memory-mb)")]
    Memory {
        method: String,
        needed_mib: u64,
        limit_mib: u64,
    },
    /// The training run itself failed (NaN loss, a tensor error, a checkpoint write).
    #[error("training failed: {0}")]
    Failed(#[from] trainer::TrainError),
    /// Registering the trained adapter failed.
    #[error("registering the adapter: {0}")]
    Registry(#[from] crate::adapters::RegistryError),
    /// A thread or task of the server failed.
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Blob(#[from] crate::blobs::BlobError),
}

/// An I/O failure while `doing` something: a full disk is [`TrainingError::NoSpace`]; the
/// message never carries a server path.
pub(super) fn io_error(doing: &str, e: std::io::Error) -> TrainingError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        TrainingError::NoSpace(doing.into())
    } else {
        tracing::error!(error = %e, "{doing}");
        TrainingError::Storage(format!("{doing} failed: {}", e.kind()))
    }
}

/// A job's checkpoints' prefix in the blob store.
fn checkpoint_key(job: &str) -> String {
    format!("jobs/{job}")
}

/// A stored dataset file's key in the blob store.
pub(super) fn dataset_key(file: &str) -> String {
    format!("datasets/{file}")
}

pub(super) fn invalid(field: &str, reason: impl Into<String>) -> TrainingError {
    TrainingError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What a job runs: the trainer's spec plus data handling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub train: TrainSpec,
    pub validation_split: f64,
    pub loss_on_all: bool,
    pub reject_too_long: bool,
    /// Warm-up as a fraction of all steps (used when `train.warmup_steps` is 0).
    pub warmup_ratio: f64,
    /// The LoRA adapter version the job continues (`name@version`, fixed at CreateJob);
    /// its settings are the job's.
    #[serde(default)]
    pub init_adapter: Option<String>,
    /// An offline job's evaluation by a grader, on a validation dataset of prompts.
    #[serde(default)]
    pub eval_grader: Option<super::graders::EvalGrader>,
}

impl JobSpec {
    /// A stored job's spec; `None` when the row's JSON cannot be read.
    pub fn of(row: &JobRow) -> Option<Self> {
        serde_json::from_str(&row.spec).ok()
    }

    /// The grader the job runs and the request's field that gave it: an online
    /// objective's, or an offline job's `eval_grader`.
    pub fn grader(&self) -> Option<(&super::graders::GraderSpec, String)> {
        super::rl_job::job_grader(&self.train.objective, self.eval_grader.as_ref())
    }
}

/// A stored job event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum JobEvent {
    Status { status: JobStatus, message: String },
    Train(TrainEvent),
}

/// A job request, before validation against the data.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub dataset: String,
    pub validation_dataset: Option<String>,
    pub adapter_name: String,
    pub spec: JobSpec,
}

struct Live {
    cancel: Arc<AtomicBool>,
    /// Set by a drain: the stopped run goes back to the queue rather than ending cancelled.
    release: Arc<AtomicBool>,
}

pub struct TrainingService {
    db: Db,
    tenancy: Arc<Tenancy>,
    model: Arc<BaseModel>,
    registry: Arc<AdapterRegistry>,
    cfg: TrainingConfig,
    live: Mutex<HashMap<String, Live>>,
    wake: Notify,
    /// Set by [`TrainingService::release_all`]: this process claims no more jobs.
    draining: AtomicBool,
    /// The serving engine, once it runs: online RL samples its rollouts there.
    engine: std::sync::OnceLock<crate::engine::EngineHandle>,
}

pub(super) fn new_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{nanos:x}{:06x}",
        rand::random::<u32>() & 0xFF_FFFF
    )
}

pub(super) fn problems_text(p: &[Problem]) -> String {
    p.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl TrainingService {
    pub fn new(
        db: Db,
        tenancy: Arc<Tenancy>,
        model: Arc<BaseModel>,
        registry: Arc<AdapterRegistry>,
        cfg: TrainingConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            db,
            tenancy,
            model,
            registry,
            cfg,
            live: Mutex::default(),
            wake: Notify::new(),
            draining: AtomicBool::new(false),
            engine: std::sync::OnceLock::new(),
        })
    }

    /// Gives online-RL jobs the serving engine to sample with (once, at start).
    pub fn attach_engine(&self, engine: crate::engine::EngineHandle) {
        let _ = self.engine.set(engine);
    }

    pub fn config(&self) -> &TrainingConfig {
        &self.cfg
    }

    pub(super) fn db(&self) -> &Db {
        &self.db
    }

    pub(super) fn model(&self) -> &Arc<BaseModel> {
        &self.model
    }

    pub(super) fn tenancy(&self) -> &Tenancy {
        &self.tenancy
    }

    /// Where uploads are written and checked before they are stored (this machine's).
    pub(super) fn uploads_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("uploads")
    }

    pub(super) fn blobs(&self) -> &crate::blobs::Blobs {
        self.registry.blobs()
    }

    /// The bytes the adapter `job` trains will store, for the storage quota at CreateJob.
    pub fn adapter_bytes(&self, job: &NewJob) -> u64 {
        job.spec.train.adapter_bytes(self.model.config())
    }

    /// What an unfinished job holds against the storage quota: its adapter's bytes, and
    /// its checkpoints' (they are removed when it succeeds).
    pub fn held_bytes(&self, job: &NewJob) -> u64 {
        let adapter = self.adapter_bytes(job);
        let trained = job.spec.train.trainable_bytes(self.model.config());
        adapter + self.cfg.keep_checkpoints.max(1) as u64 * trainer::checkpoint_bytes(trained)
    }

    pub async fn dataset(&self, tenant: &str, name: &str) -> Result<DatasetRow, TrainingError> {
        self.db
            .dataset_by_name(tenant, name)
            .await?
            .ok_or_else(|| TrainingError::NotFound(format!("dataset {name:?}")))
    }

    pub async fn datasets(&self, tenant: &str) -> Result<Vec<DatasetRow>, TrainingError> {
        Ok(self.db.list_datasets(tenant).await?)
    }

    /// Deletes a dataset. Jobs created on it still run on it (a queued job, a job resumed
    /// after a restart); its file is removed once no unfinished job needs it.
    pub async fn delete_dataset(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<DatasetRow, TrainingError> {
        let row = self
            .db
            .delete_dataset(tenant, name)
            .await?
            .ok_or_else(|| TrainingError::NotFound(format!("dataset {name:?}")))?;
        self.remove_unneeded_dataset_files().await;
        Ok(row)
    }

    /// Removes the files of deleted datasets that no unfinished job needs, then forgets them.
    async fn remove_unneeded_dataset_files(&self) {
        let rows = match self.db.dataset_files_to_remove().await {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!(error = %e, "finding dataset files to remove"),
        };
        for (id, file) in rows {
            if let Err(e) = self.blobs().delete(&dataset_key(&file)).await {
                tracing::warn!(dataset = id, error = %e, "removing a deleted dataset's file");
                continue;
            }
            if let Err(e) = self.db.forget_dataset_file(&id).await {
                tracing::warn!(dataset = id, error = %e, "forgetting a dataset file");
            }
        }
    }

    /// At start-up (before any upload): removes this machine's unfinished uploads, stored
    /// dataset files no row names (a crash between storing the file and recording the
    /// dataset) once older than the orphan grace (younger ones may be another replica's
    /// upload in progress), and unneeded ones.
    async fn sweep_dataset_files(&self) -> Result<(), TrainingError> {
        let _ = tokio::fs::remove_dir_all(self.uploads_dir()).await;
        self.remove_unneeded_dataset_files().await;
        let old = self
            .blobs()
            .entries_older_than("datasets", self.cfg.orphan_grace)
            .await?;
        if old.is_empty() {
            return Ok(());
        }
        let named: std::collections::HashSet<String> =
            self.db.dataset_files().await?.into_iter().collect();
        for file in old.into_iter().filter(|f| !named.contains(f)) {
            tracing::info!(file, "removing an orphaned dataset file");
            self.blobs().delete(&dataset_key(&file)).await?;
        }
        Ok(())
    }

    /// Loads, parses and tokenises a dataset for a job, on a blocking thread: reading and
    /// tokenising up to the dataset cap must not hold an async worker.
    async fn load_examples(
        &self,
        row: &DatasetRow,
        spec: &JobSpec,
    ) -> Result<Vec<Tokenized>, TrainingError> {
        let path = self.blobs().local_file(&dataset_key(&row.file)).await?;
        let (model, format) = (self.model.clone(), Format::parse(&row.format));
        let (overflow, max_seq_len, loss_on_all) = (
            if spec.reject_too_long {
                Overflow::Reject
            } else {
                Overflow::Truncate
            },
            spec.train.max_seq_len,
            spec.loss_on_all,
        );
        tokio::task::spawn_blocking(move || {
            let text =
                std::fs::read_to_string(&path).map_err(|e| io_error("reading the dataset", e))?;
            let render = |m: &[crate::model::ChatMessage], g: bool| model.chat.render(m, g);
            let (ex, _) = dataset::parse_jsonl(&text, format, &render)
                .map_err(|p| invalid("dataset", problems_text(&p)))?;
            drop(text);
            let (mut tok, _) = dataset::tokenize(&ex, &model.tokenizer, max_seq_len, overflow)
                .map_err(|p| invalid("dataset", problems_text(&p)))?;
            if loss_on_all {
                for t in &mut tok {
                    for (i, m) in t.mask.iter_mut().enumerate() {
                        *m = i > 0;
                    }
                }
            }
            Ok(tok)
        })
        .await
        .map_err(|e| TrainingError::Storage(e.to_string()))?
    }

    pub async fn job(&self, tenant: &str, id: &str) -> Result<JobRow, TrainingError> {
        self.db
            .job(tenant, id)
            .await?
            .ok_or_else(|| TrainingError::NotFound(format!("job {id:?}")))
    }

    pub async fn jobs(&self, tenant: &str) -> Result<Vec<JobRow>, TrainingError> {
        Ok(self.db.list_jobs(tenant).await?)
    }

    /// A dataset and the path of its stored file (read-only: served as the file's content).
    pub async fn dataset_file(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<(DatasetRow, PathBuf), TrainingError> {
        let row = self.dataset(tenant, name).await?;
        let path = self.blobs().local_file(&dataset_key(&row.file)).await?;
        Ok((row, path))
    }

    /// A job's stored events so far, oldest first (events that no longer parse are left
    /// out, as `watch` leaves them).
    pub async fn events(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Vec<(EventRow, JobEvent)>, TrainingError> {
        self.job(tenant, id).await?;
        let rows = self.db.events_after(id, 0).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| Some((serde_json::from_str(&r.event).ok()?, r)))
            .map(|(e, r)| (r, e))
            .collect())
    }

    /// Cancels a queued job at once, a running one at its next micro-step.
    pub async fn cancel(&self, tenant: &str, id: &str) -> Result<JobRow, TrainingError> {
        let job = self.job(tenant, id).await?;
        if job.status.is_terminal() {
            return Ok(job);
        }
        let running = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|l| l.cancel.clone());
        match running {
            Some(flag) => flag.store(true, Ordering::SeqCst),
            None => {
                if self
                    .db
                    .set_job_status(
                        id,
                        JobStatus::Cancelled,
                        Some("cancelled before it started"),
                        None,
                        None,
                    )
                    .await?
                {
                    self.event(
                        id,
                        JobEvent::Status {
                            status: JobStatus::Cancelled,
                            message: "cancelled before it started".into(),
                        },
                    )
                    .await?;
                }
            }
        }
        self.job(tenant, id).await
    }

    async fn event(&self, job_id: &str, e: JobEvent) -> Result<EventRow, TrainingError> {
        let json = serde_json::to_string(&e).map_err(|e| TrainingError::Storage(e.to_string()))?;
        Ok(self.db.append_event(job_id, &json).await?)
    }

    /// Stored events after `after`, then new ones as they are stored, until the job ends.
    pub async fn watch(
        self: &Arc<Self>,
        tenant: &str,
        id: &str,
        after: u64,
    ) -> Result<mpsc::Receiver<(EventRow, JobEvent)>, TrainingError> {
        self.job(tenant, id).await?;
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let mut last = after;
            loop {
                let Ok(rows) = me.db.events_after(&id, last).await else {
                    return;
                };
                for r in rows {
                    last = r.seq;
                    let Ok(e) = serde_json::from_str::<JobEvent>(&r.event) else {
                        continue;
                    };
                    let end = matches!(&e, JobEvent::Status { status, .. } if status.is_terminal());
                    if tx.send((r, e)).await.is_err() || end {
                        return;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }

    /// Starts the runner: re-queues jobs a stop interrupted, then runs queued jobs in order,
    /// `max_concurrent_jobs` at a time, until the process ends.
    pub async fn start(self: &Arc<Self>) -> Result<(), TrainingError> {
        self.sweep_dataset_files().await?;
        // A database of this process's own: what was running was this process's. On a
        // shared one, expired leases are claimed like queued jobs.
        if self.db.backend() == crate::store::Backend::Sqlite {
            let n = self.db.requeue_interrupted_jobs().await?;
            if n > 0 {
                tracing::info!(jobs = n, "re-queued interrupted training jobs");
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            // The database is the one truth of how many jobs wait and run; a gauge read
            // from it stays right across restarts and every path a job can take.
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                match me.db.count_unfinished_jobs().await {
                    Ok((queued, running)) => crate::metrics::jobs_now(queued, running),
                    Err(e) => tracing::warn!(error = %e, "counting jobs"),
                }
            }
        });
        let me = self.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(
            self.cfg.max_concurrent_jobs.max(1),
        ));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                if me.draining.load(Ordering::SeqCst) {
                    return;
                }
                let (default_limit, limits) = me.tenancy.running_job_limits();
                let may_run = |tenant: &str, running: u32| {
                    running < limits.get(tenant).copied().unwrap_or(default_limit)
                };
                let owner = me.db.instance();
                match me.db.claim_job(&owner, me.cfg.job_lease, may_run).await {
                    Ok(Some(job)) => {
                        let me = me.clone();
                        tokio::spawn(async move {
                            me.run(job).await;
                            drop(slot);
                        });
                    }
                    Ok(None) => {
                        drop(slot);
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), me.wake.notified()).await;
                    }
                    Err(e) => {
                        drop(slot);
                        tracing::error!(error = %e, "claiming a job");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(())
    }

    async fn finish(&self, id: &str, status: JobStatus, message: String, version: Option<u32>) {
        let err = (status == JobStatus::Failed).then_some(message.as_str());
        let owner = self.db.instance();
        match self
            .db
            .set_job_status(id, status, err, version, Some(&owner))
            .await
        {
            Ok(true) => {
                let _ = self.event(id, JobEvent::Status { status, message }).await;
            }
            Ok(false) => {}
            Err(e) => tracing::error!(job = id, error = %e, "recording the job's end"),
        }
        crate::metrics::job_finished(status);
        if status == JobStatus::Succeeded {
            self.remove_checkpoints(id).await;
        }
        self.remove_unneeded_dataset_files().await;
    }

    /// A job a drain stopped (and checkpointed) goes back to the queue, for another process
    /// (or this one when it starts again) to resume from its last stored checkpoint.
    async fn release(&self, id: &str) {
        match self.db.release_job(id, &self.db.instance()).await {
            Ok(true) => {
                let message = "released by a stopping replica; resumes from its last checkpoint";
                let _ = self
                    .event(
                        id,
                        JobEvent::Status {
                            status: JobStatus::Queued,
                            message: message.into(),
                        },
                    )
                    .await;
                self.wake.notify_one();
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(job = id, error = %e, "releasing the job (its lease will expire)")
            }
        }
    }

    /// Drain: claims no more jobs, stops the running ones at their next step or micro-batch,
    /// checkpoints the steps they completed (stored in the blob store) and gives them back
    /// to the queue; returns once none runs here or at `deadline`.
    pub async fn release_all(&self, deadline: std::time::Instant) {
        self.draining.store(true, Ordering::SeqCst);
        for live in self.live.lock().unwrap_or_else(|e| e.into_inner()).values() {
            live.release.store(true, Ordering::SeqCst);
            live.cancel.store(true, Ordering::SeqCst);
        }
        while std::time::Instant::now() < deadline
            && !self
                .live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A succeeded job's checkpoints go: its adapter is a registered version now. (A
    /// cancelled or failed job keeps its last checkpoints.)
    async fn remove_checkpoints(&self, id: &str) {
        let dir = trainer::checkpoint_dir(&self.cfg.data_dir, id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(job = id, error = %e, "removing an ended job's checkpoints"),
        }
        if let Err(e) = self.blobs().delete_prefix(&checkpoint_key(id)).await {
            tracing::warn!(job = id, error = %e, "removing an ended job's stored checkpoints");
        }
    }

    async fn run(self: &Arc<Self>, job: JobRow) {
        let id = job.id.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id.clone(),
            Live {
                cancel: cancel.clone(),
                release: release.clone(),
            },
        );
        // Claimed as a drain began (after it flagged the running jobs): give it back too.
        if self.draining.load(Ordering::SeqCst) {
            release.store(true, Ordering::SeqCst);
            cancel.store(true, Ordering::SeqCst);
        }
        // The heartbeat: while this runs, the lease is renewed; a lease this process no
        // longer holds (the job was cancelled on another process, or this one stalled past
        // the lease and another took the job over) stops the run.
        let heartbeat = {
            let (db, id, cancel) = (self.db.clone(), id.clone(), cancel.clone());
            let lease = self.cfg.job_lease;
            tokio::spawn(async move {
                let owner = db.instance();
                loop {
                    tokio::time::sleep(lease / 3).await;
                    match db.renew_job_lease(&id, &owner, lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(job = id, "the job's lease is gone; stopping it here");
                            cancel.store(true, Ordering::SeqCst);
                            return;
                        }
                        // The database is away: keep running, try again (the lease may
                        // expire meanwhile; then the next renewal finds it gone).
                        Err(e) => tracing::warn!(job = id, error = %e, "renewing the job's lease"),
                    }
                }
            })
        };
        let result = self.run_inner(&job, cancel, release.clone()).await;
        heartbeat.abort();
        match result {
            Ok(Some(version)) => {
                self.finish(
                    &id,
                    JobStatus::Succeeded,
                    format!("registered {}@{version}", job.adapter_name),
                    Some(version),
                )
                .await
            }
            Ok(None) if release.load(Ordering::SeqCst) => self.release(&id).await,
            Ok(None) => {
                self.finish(&id, JobStatus::Cancelled, "cancelled".into(), None)
                    .await
            }
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "training job failed");
                self.finish(&id, JobStatus::Failed, e.to_string(), None)
                    .await
            }
        }
        // Only now: a drain waits for this, so the process does not exit before the job's
        // end (or its release to the queue) is recorded.
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Runs one claimed job; `Ok(Some(version))` when its adapter was registered.
    async fn run_inner(
        self: &Arc<Self>,
        job: &JobRow,
        cancel: Arc<AtomicBool>,
        release: Arc<AtomicBool>,
    ) -> Result<Option<u32>, TrainingError> {
        let spec: JobSpec = serde_json::from_str(&job.spec)
            .map_err(|e| TrainingError::Storage(format!("job spec: {e}")))?;
        let ds = self
            .db
            .job_dataset(&job.tenant, &job.dataset)
            .await?
            .ok_or_else(|| TrainingError::NotFound("the job's dataset".into()))?;
        let mut train = self.load_examples(&ds, &spec).await?;
        let eval = match &job.eval_dataset {
            Some(e) => {
                let row = self.db.job_dataset(&job.tenant, e).await?.ok_or_else(|| {
                    TrainingError::NotFound("the job's validation dataset".into())
                })?;
                self.load_examples(&row, &spec).await?
            }
            None if spec.validation_split > 0.0 => {
                train.shuffle(&mut StdRng::seed_from_u64(spec.train.seed));
                let (n_train, _) = split_sizes(train.len(), spec.validation_split);
                train.split_off(n_train)
            }
            None => Vec::new(),
        };
        self.event(
            &job.id,
            JobEvent::Status {
                status: JobStatus::Running,
                message: format!(
                    "{} training, {} validation examples",
                    train.len(),
                    eval.len()
                ),
            },
        )
        .await?;
        crate::metrics::job_started();
        let ckpt = trainer::checkpoint_dir(&self.cfg.data_dir, &job.id);
        // A job resumed on a machine that does not have its checkpoints (another replica
        // ran it before) starts from the ones in the store.
        let ckpt_key = checkpoint_key(&job.id);
        if !self.blobs().in_place(&ckpt_key, &ckpt)
            && !tokio::fs::try_exists(ckpt.join(trainer::CHECKPOINT_META))
                .await
                .unwrap_or(false)
        {
            self.blobs().fetch_dir(&ckpt_key, &ckpt).await?;
        }
        let (etx, mut erx) = mpsc::unbounded_channel::<TrainEvent>();
        let model = self.model.clone();
        let threads = self.cfg.training_threads.max(1);
        let init = match &spec.init_adapter {
            Some(name) => {
                let r: crate::adapters::AdapterRef = name
                    .parse()
                    .map_err(|e: String| invalid("init_adapter", e))?;
                // Its stored values, not the served ones (`--lora-dtype` may round them).
                let adapter = self
                    .registry
                    .exact(&job.tenant, &r)
                    .await
                    .map_err(|e| match e {
                        crate::adapters::RegistryError::NotFound(_) => {
                            TrainingError::NotFound(format!("init_adapter {name}"))
                        }
                        other => TrainingError::Registry(other),
                    })?;
                Some(Arc::new(adapter))
            }
            None => None,
        };
        let ctl = Control {
            cancel,
            checkpoint_on_cancel: release,
            keep_checkpoints: self.cfg.keep_checkpoints,
            init,
            start_values: None,
        };
        let train_spec = spec.train.clone();
        let eval_grader = spec.eval_grader.clone();
        // Online objectives and graded evaluations sample with the serving engine.
        let samples = train_spec.objective.online() || eval_grader.is_some();
        let engine = self.engine.get().cloned();
        let (tenant, name) = (job.tenant.clone(), job.adapter_name.clone());
        let reward_models = self.reward_models(&job.tenant, &spec).await?;
        let handle = tokio::task::spawn_blocking(move || {
            // The base's f32 weights, made from its blocks at the first step, stay until the
            // last running job ends.
            let dense = model.llama.weights.dense_in_use();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("graft-train-{i}"))
                .build()
                .map_err(|e| trainer::TrainError::Checkpoint(format!("training threads: {e}")))?;
            let mut emit = |e| {
                let _ = etx.send(e);
            };
            let ended = pool.install(|| match &engine {
                Some(engine) if samples => super::rl_job::run(
                    &model,
                    &train_spec,
                    eval_grader.as_ref(),
                    engine,
                    &tenant,
                    &name,
                    &train,
                    &eval,
                    &ckpt,
                    &ctl,
                    &reward_models,
                    &mut emit,
                ),
                None if samples => Err(trainer::TrainError::Rollout(
                    "the serving engine is not running".into(),
                )),
                _ => trainer::train(&model, &train_spec, &train, &eval, &ckpt, &ctl, &mut emit),
            });
            drop((pool, dense));
            // What the steps kept for one another goes back to the kernel.
            crate::process::release_freed_memory();
            ended
        });
        let me = self.clone();
        let jid = job.id.clone();
        let forward = tokio::spawn(async move {
            while let Some(e) = erx.recv().await {
                if let TrainEvent::Step {
                    step,
                    total_steps,
                    train_loss,
                    tokens_per_second,
                    step_tokens,
                    step_seconds,
                    ..
                } = &e
                {
                    let _ = me
                        .db
                        .set_job_progress(&jid, *step as u64, *total_steps as u64)
                        .await;
                    crate::metrics::training_step(
                        *train_loss,
                        *tokens_per_second,
                        *step_tokens,
                        *step_seconds,
                    );
                }
                if let TrainEvent::Checkpoint { .. } = &e {
                    // Into the store, so another replica can resume from it.
                    let dir = trainer::checkpoint_dir(&me.cfg.data_dir, &jid);
                    let stored = me
                        .blobs()
                        .mirror_dir(&checkpoint_key(&jid), &dir, trainer::CHECKPOINT_META)
                        .await;
                    if let Err(e) = stored {
                        tracing::warn!(job = jid, error = %e, "storing a checkpoint");
                    }
                }
                let _ = me.event(&jid, JobEvent::Train(e)).await;
            }
        });
        let outcome = handle
            .await
            .map_err(|e| TrainingError::Internal(format!("training thread: {e}")))?;
        let _ = forward.await;
        match outcome {
            Ok(Outcome::Cancelled) => Ok(None),
            // Full fine-tuning yields a model; every other method an adapter.
            Ok(Outcome::Finished(vars)) => match (&spec.train.method, vars.model()) {
                (MethodSpec::Full(sel), Some(llama)) => {
                    let details = Details::Full {
                        layers: sel.layers.clone(),
                        embeddings: sel.embeddings,
                        norms: sel.norms,
                        trained_parameters: sel.trained_floats(self.model.config()) as u64,
                    };
                    let row = self
                        .registry
                        .store_model(
                            &job.tenant,
                            &job.adapter_name,
                            llama.weights.clone(),
                            details,
                        )
                        .await?;
                    Ok(Some(row.version))
                }
                _ => {
                    let parsed = vars.export().map_err(trainer::TrainError::from)?;
                    let row = self
                        .registry
                        .store_parsed(&job.tenant, &job.adapter_name, &parsed)
                        .await?;
                    Ok(Some(row.version))
                }
            },
            Err(e) => Err(e.into()),
        }
    }
}

/// `(train, eval)` sizes for a split fraction.
fn split_sizes(n: usize, split: f64) -> (usize, usize) {
    if split <= 0.0 || n < 2 {
        return (n, 0);
    }
    let e = ((n as f64 * split).round() as usize).clamp(1, n - 1);
    (n - e, e)
}
