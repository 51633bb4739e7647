//! `/v1/fine_tuning/jobs`: OpenAI's fine-tuning jobs are graft's training jobs. A request is
//! turned into the same job request gRPC's `CreateJob` takes and checked by the same rules
//! (`grpc::job_request::job_from`, then `TrainingService::create_job`), with the errors
//! naming OpenAI's fields. `"auto"` hyper-parameters take graft's defaults, which the job
//! object reports back. The result is an adapter named `ft-[<suffix>-]<job hex>`, which is
//! the job's `fine_tuned_model` and can be named as `model` at once. What graft offers
//! beyond OpenAI (other methods, LoRA settings, schedules) is under the `graft` extension
//! object, never in an OpenAI field.

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    response::Response,
    Json,
};
use graft_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{completions::model_ref, error::HttpError, parse, recorded, Auth, HttpState};
use crate::{
    api::{error::ApiError, ready, Ready},
    grpc::job_request::job_from,
    store::training::{JobRow, JobStatus},
    train::{
        jobs::{JobEvent, JobSpec},
        trainer::{Objective, TrainEvent},
    },
};

/// A hyper-parameter given as a value or `"auto"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum Auto<T> {
    Value(T),
    Word(AutoWord),
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoWord {
    Auto,
}

impl<T> Auto<T> {
    fn value(self) -> Option<T> {
        match self {
            Self::Value(v) => Some(v),
            Self::Word(AutoWord::Auto) => None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hyperparameters {
    pub n_epochs: Option<Auto<u32>>,
    pub batch_size: Option<Auto<u32>>,
    pub learning_rate_multiplier: Option<Auto<f64>>,
    /// DPO's; refused with the method.
    pub beta: Option<Auto<f64>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Method {
    #[serde(rename = "type")]
    pub kind: String,
    pub supervised: Option<MethodSettings>,
    pub dpo: Option<MethodSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSettings {
    pub hyperparameters: Option<Hyperparameters>,
}

/// graft's own settings (`"graft": {...}`): the method and what OpenAI's API has no
/// field for. Unknown keys are refused, naming them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    /// lora (default), ia3, prompt_tuning, p_tuning, prefix_tuning, p_tuning_v2,
    /// bottleneck or full, each with its default settings.
    pub method: Option<String>,
    pub lora: Option<LoraExt>,
    pub lr_scheduler: Option<String>,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub max_seq_len: Option<u32>,
    pub gradient_accumulation: Option<u32>,
    pub eval_every: Option<u32>,
    pub patience: Option<u32>,
    pub checkpoint_every: Option<u32>,
    pub validation_split: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraExt {
    pub r: Option<u32>,
    pub alpha: Option<f64>,
    pub dropout: Option<f64>,
    #[serde(default)]
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CreateJob {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: Option<i64>,
    pub hyperparameters: Option<Hyperparameters>,
    pub method: Option<Method>,
    #[serde(default)]
    pub integrations: Vec<Value>,
    pub graft: Option<Extension>,
}

/// Suffix characters at most (the adapter name must stay within 64).
const MAX_SUFFIX: usize = 40;

/// `(gRPC's field, OpenAI's field)`: the job rules name gRPC's fields; answers here name the
/// field the client wrote.
const FIELDS: &[(&str, &str)] = &[
    ("dataset", "training_file"),
    ("validation_dataset", "validation_file"),
    ("hyperparameters.epochs", "hyperparameters.n_epochs"),
    ("hyperparameters.batch_size", "hyperparameters.batch_size"),
    (
        "hyperparameters.learning_rate",
        "hyperparameters.learning_rate_multiplier",
    ),
    ("hyperparameters.seed", "seed"),
    ("adapter_name", "suffix"),
    ("method", "graft.method"),
    ("validation_split", "graft.validation_split"),
];

fn rename(e: impl Into<ApiError>) -> HttpError {
    match e.into() {
        ApiError::InvalidArgument { field, reason } => {
            let to = FIELDS
                .iter()
                .find(|(g, _)| *g == field)
                .map(|(_, o)| o.to_string())
                .or_else(|| {
                    field
                        .strip_prefix("hyperparameters.")
                        .map(|f| format!("graft.{f}"))
                })
                .unwrap_or_else(|| format!("graft.{field}"));
            HttpError(ApiError::invalid(to, reason))
        }
        other => HttpError(other),
    }
}

/// The job request gRPC's `CreateJob` would carry for this body, and the learning rate
/// multiplier (which scales the method's default rate once the method is known).
fn to_request(
    req: &CreateJob,
    ready: &Ready,
) -> Result<(pb::CreateJobRequest, Option<f64>), HttpError> {
    let bad = |f: &str, r: String| HttpError(ApiError::invalid(f, r));
    if model_ref(ready, &req.model)?.is_some() {
        return Err(bad(
            "model",
            format!(
                "graft fine-tunes the base model it serves ({}); {:?} is not it",
                ready.engine.model().name,
                req.model
            ),
        ));
    }
    if !req.integrations.is_empty() {
        return Err(bad("integrations", "integrations are not supported".into()));
    }
    let mut hyper = req.hyperparameters.clone();
    let kind = req
        .method
        .as_ref()
        .map_or("supervised", |m| m.kind.as_str());
    if let Some(m) = &req.method {
        let settings = match kind {
            "supervised" => &m.supervised,
            "dpo" => &m.dpo,
            "reinforcement" => {
                return Err(bad(
                    "method.type",
                    "\"reinforcement\" (RL fine-tuning with graders) is not here yet; supervised and dpo are".into(),
                ))
            }
            other => {
                return Err(bad(
                    "method.type",
                    format!("{other:?}; expected supervised or dpo"),
                ))
            }
        };
        if let Some(h) = settings.as_ref().and_then(|s| s.hyperparameters.clone()) {
            if hyper.is_some() {
                return Err(bad(
                    &format!("method.{kind}.hyperparameters"),
                    "give hyperparameters here or at the top, not both".into(),
                ));
            }
            hyper = Some(h);
        }
    }
    let h = hyper.unwrap_or_default();
    let dpo = match (kind, h.beta.and_then(Auto::value)) {
        ("dpo", beta) => Some(
            crate::grpc::job_request::dpo_settings(beta, "", None, "method.dpo.hyperparameters.")
                .map_err(HttpError)?,
        ),
        (_, _) if h.beta.is_some() => {
            return Err(bad(
                "hyperparameters.beta",
                "beta is DPO's; the method is supervised".into(),
            ))
        }
        _ => None,
    };
    let ext = req.graft.clone().unwrap_or_default();
    let method = ext.method.clone().unwrap_or_else(|| "lora".into());
    let job_hex: String = format!("{:08x}", rand::random::<u32>());
    let adapter_name = match &req.suffix {
        None => format!("ft-{job_hex}"),
        Some(s) if s.len() > MAX_SUFFIX || crate::names::validate(s, "suffix").is_err() => {
            return Err(bad(
                "suffix",
                format!(
                    "{s:?}: 1-{MAX_SUFFIX} of A-Z a-z 0-9 . _ -, starting with a letter or digit"
                ),
            ))
        }
        Some(s) => format!("ft-{s}-{job_hex}"),
    };
    let lora = ext.lora.clone().map(|l| {
        pb::create_job_request::MethodConfig::Lora(pb::LoraMethod {
            r: l.r,
            alpha: l.alpha,
            dropout: l.dropout,
            target_modules: l.target_modules,
            use_rslora: l.use_rslora,
            use_dora: l.use_dora,
        })
    });
    let multiplier = h.learning_rate_multiplier.and_then(Auto::value);
    if let Some(m) = multiplier.filter(|m| !(m.is_finite() && *m > 0.0)) {
        return Err(bad(
            "hyperparameters.learning_rate_multiplier",
            format!("{m} must be > 0"),
        ));
    }
    let pb_req = pb::CreateJobRequest {
        dataset: req.training_file.clone(),
        validation_dataset: req.validation_file.clone().unwrap_or_default(),
        adapter_name,
        method,
        method_config: lora,
        validation_split: ext.validation_split,
        objective: if dpo.is_some() { "dpo" } else { "sft" }.into(),
        dpo: dpo.map(|d| pb::DpoObjective {
            beta: Some(d.beta),
            loss_type: String::new(),
            label_smoothing: None,
        }),
        hyperparameters: Some(pb::Hyperparameters {
            epochs: h.n_epochs.and_then(Auto::value),
            batch_size: h.batch_size.and_then(Auto::value),
            seed: req.seed.map(|s| s as u64),
            lr_scheduler: ext.lr_scheduler.unwrap_or_default(),
            warmup_ratio: ext.warmup_ratio,
            weight_decay: ext.weight_decay,
            max_grad_norm: ext.max_grad_norm,
            max_seq_len: ext.max_seq_len,
            gradient_accumulation: ext.gradient_accumulation,
            eval_every: ext.eval_every,
            patience: ext.patience,
            checkpoint_every: ext.checkpoint_every,
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok((pb_req, multiplier))
}

/// OpenAI's name for a job status.
fn status(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Validating => "validating_files",
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    }
}

/// The job object, as OpenAI shapes it, with graft's extension under `graft`.
fn job_object(row: &JobRow, ready: &Ready) -> Value {
    let spec = JobSpec::of(row);
    let train = spec.as_ref().map(|s| &s.train);
    let hyper = train.map(|t| {
        json!({
            "n_epochs": t.epochs,
            "batch_size": t.batch_size,
            "learning_rate_multiplier": t.learning_rate / t.method.default_learning_rate(),
        })
    });
    let suffix = row
        .adapter_name
        .strip_prefix("ft-")
        .and_then(|r| r.rsplit_once('-'))
        .map(|(s, _)| s.to_string());
    json!({
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": row.created_at,
        "finished_at": row.status.is_terminal().then_some(row.updated_at),
        "model": ready.engine.model().name,
        "fine_tuned_model": (row.status == JobStatus::Succeeded).then_some(&row.adapter_name),
        "organization_id": row.tenant,
        "result_files": [],
        "status": status(row.status),
        "validation_file": row.eval_dataset_name,
        "training_file": row.dataset_name,
        "hyperparameters": hyper,
        "trained_tokens": null,
        "error": (row.status == JobStatus::Failed).then(|| json!({
            "code": "training_failed",
            "message": row.error.clone().unwrap_or_default(),
            "param": null,
        })),
        "seed": train.map(|t| t.seed as i64),
        "estimated_finish": null,
        "integrations": [],
        "metadata": null,
        "user_provided_suffix": suffix,
        "method": match train.map(|t| &t.objective) {
            Some(Objective::Dpo(d)) => {
                let mut h = hyper.unwrap_or_default();
                h["beta"] = json!(d.beta);
                json!({"type": "dpo", "dpo": {"hyperparameters": h}})
            }
            _ => json!({"type": "supervised", "supervised": {"hyperparameters": hyper}}),
        },
        "graft": {
            "method": train.map(|t| t.method.name()),
            "adapter": row.adapter_name,
            "adapter_version": row.adapter_version,
            "step": row.step,
            "total_steps": row.total_steps,
        },
    })
}

pub async fn create(State(st): State<HttpState>, auth: Auth, body: Bytes) -> Response {
    recorded("POST /v1/fine_tuning/jobs", async {
        let ready = ready(&st.ready)?;
        let req: CreateJob = parse(&body)?;
        let (pb_req, multiplier) = to_request(&req, ready)?;
        let mut job = job_from(&pb_req).map_err(rename)?;
        if let Some(m) = multiplier {
            job.spec.train.learning_rate *= m;
        }
        let row = ready
            .training
            .create_job(&auth.tenant, job)
            .await
            .map_err(rename)?;
        Ok::<_, HttpError>(Json(job_object(&row, ready)))
    })
    .await
}

#[derive(Debug, Deserialize)]
pub struct Page {
    pub after: Option<String>,
    pub limit: Option<usize>,
}

/// Items newest first, those after the one with id `after`, at most `limit` (default 20,
/// at most 100), and whether more follow.
fn page<T>(items: Vec<T>, id: impl Fn(&T) -> &str, p: &Page) -> Result<(Vec<T>, bool), HttpError> {
    let limit = p.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(HttpError(ApiError::invalid(
            "limit",
            format!("{limit} is outside [1, 100]"),
        )));
    }
    let start = match &p.after {
        None => 0,
        Some(a) => {
            items.iter().position(|x| id(x) == a).ok_or_else(|| {
                HttpError(ApiError::invalid(
                    "after",
                    format!("{a:?} is not in this list"),
                ))
            })? + 1
        }
    };
    let more = items.len() > start + limit;
    Ok((items.into_iter().skip(start).take(limit).collect(), more))
}

pub async fn list(State(st): State<HttpState>, auth: Auth, Query(p): Query<Page>) -> Response {
    recorded("GET /v1/fine_tuning/jobs", async {
        let ready = ready(&st.ready)?;
        let mut rows = ready
            .training
            .jobs(&auth.tenant)
            .await
            .map_err(ApiError::from)?;
        rows.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let (rows, has_more) = page(rows, |r| r.id.as_str(), &p)?;
        Ok::<_, HttpError>(Json(json!({
            "object": "list",
            "data": rows.iter().map(|r| job_object(r, ready)).collect::<Vec<_>>(),
            "has_more": has_more,
        })))
    })
    .await
}

pub async fn get(State(st): State<HttpState>, auth: Auth, Path(id): Path<String>) -> Response {
    recorded("GET /v1/fine_tuning/jobs/{id}", async {
        let ready = ready(&st.ready)?;
        let row = ready
            .training
            .job(&auth.tenant, &id)
            .await
            .map_err(ApiError::from)?;
        Ok::<_, HttpError>(Json(job_object(&row, ready)))
    })
    .await
}

pub async fn cancel(State(st): State<HttpState>, auth: Auth, Path(id): Path<String>) -> Response {
    recorded("POST /v1/fine_tuning/jobs/{id}/cancel", async {
        let ready = ready(&st.ready)?;
        let row = ready
            .training
            .cancel(&auth.tenant, &id)
            .await
            .map_err(ApiError::from)?;
        Ok::<_, HttpError>(Json(job_object(&row, ready)))
    })
    .await
}

/// One stored event as OpenAI's `fine_tuning.job.event`.
fn event_object(job: &str, seq: u64, at_ms: i64, e: &JobEvent) -> Value {
    let (kind, message, data) = match e {
        JobEvent::Status { status: s, message } => (
            "message",
            if message.is_empty() {
                format!("Job {}", status(*s))
            } else {
                format!("Job {}: {message}", status(*s))
            },
            json!({ "status": status(*s) }),
        ),
        JobEvent::Train(TrainEvent::Step {
            step,
            total_steps,
            train_loss,
            learning_rate,
            metrics,
            ..
        }) => {
            let mut data = json!({ "step": step, "total_steps": total_steps,
                "train_loss": train_loss, "learning_rate": learning_rate });
            // The objective's own (DPO's and reward models': TRL's names), as they are.
            for (k, v) in metrics {
                data[k] = json!(v);
            }
            (
                "metrics",
                format!("Step {step}/{total_steps}: training loss={train_loss:.4}"),
                data,
            )
        }
        JobEvent::Train(TrainEvent::Eval {
            step,
            eval_loss,
            token_accuracy,
            metrics,
            ..
        }) => {
            let mut data = json!({ "step": step, "valid_loss": eval_loss,
                "valid_mean_token_accuracy": token_accuracy });
            for (k, v) in metrics {
                data[format!("valid_{k}")] = json!(v);
            }
            (
                "metrics",
                format!("Step {step}: validation loss={eval_loss:.4}"),
                data,
            )
        }
        JobEvent::Train(TrainEvent::Checkpoint { step }) => (
            "message",
            format!("Checkpoint saved at step {step}"),
            json!({ "step": step }),
        ),
    };
    json!({
        "object": "fine_tuning.job.event",
        "id": format!("ftevent-{job}-{seq}"),
        "created_at": at_ms / 1000,
        "level": "info",
        "message": message,
        "data": data,
        "type": kind,
    })
}

pub async fn events(
    State(st): State<HttpState>,
    auth: Auth,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Response {
    recorded("GET /v1/fine_tuning/jobs/{id}/events", async {
        let ready = ready(&st.ready)?;
        let mut all: Vec<Value> = ready
            .training
            .events(&auth.tenant, &id)
            .await
            .map_err(ApiError::from)?
            .iter()
            .map(|(r, e)| event_object(&id, r.seq, r.at_ms, e))
            .collect();
        all.reverse();
        let (data, has_more) = page(all, |v| v["id"].as_str().unwrap_or_default(), &p)?;
        Ok::<_, HttpError>(Json(
            json!({ "object": "list", "data": data, "has_more": has_more }),
        ))
    })
    .await
}

#[derive(Debug, Serialize)]
struct Checkpoint {
    object: &'static str,
    id: String,
    created_at: i64,
    fine_tuned_model_checkpoint: String,
    step_number: usize,
    metrics: Value,
    fine_tuning_job_id: String,
}

/// The job's checkpoints (graft's resume points), newest first, each with the training loss
/// of its step. They are not served: `fine_tuned_model_checkpoint` names them
/// (`<adapter>:step-<n>`) for reference; only the finished adapter answers as a model.
pub async fn checkpoints(
    State(st): State<HttpState>,
    auth: Auth,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Response {
    recorded("GET /v1/fine_tuning/jobs/{id}/checkpoints", async {
        let ready = ready(&st.ready)?;
        let row = ready
            .training
            .job(&auth.tenant, &id)
            .await
            .map_err(ApiError::from)?;
        let events = ready
            .training
            .events(&auth.tenant, &id)
            .await
            .map_err(ApiError::from)?;
        // A checkpoint follows its step's events: the latest losses are its step's.
        let (mut loss, mut valid) = (None, None);
        let mut all = Vec::new();
        for (r, e) in &events {
            match e {
                JobEvent::Train(TrainEvent::Step {
                    step, train_loss, ..
                }) => loss = Some((*step, *train_loss)),
                JobEvent::Train(TrainEvent::Eval {
                    step,
                    eval_loss,
                    token_accuracy,
                    ..
                }) => valid = Some((*step, *eval_loss, *token_accuracy)),
                JobEvent::Train(TrainEvent::Checkpoint { step }) => all.push(Checkpoint {
                    object: "fine_tuning.job.checkpoint",
                    id: format!("ftckpt-{id}-{step}"),
                    created_at: r.at_ms / 1000,
                    fine_tuned_model_checkpoint: format!("{}:step-{step}", row.adapter_name),
                    step_number: *step,
                    metrics: {
                        // Only what was measured at that step (OpenAI's other metrics,
                        // e.g. full_valid_loss, are not computed).
                        let mut m = json!({ "step": step });
                        if let Some((_, l)) = loss.filter(|(s, _)| s == step) {
                            m["train_loss"] = json!(l);
                        }
                        if let Some((_, l, a)) = valid.filter(|(s, _, _)| s == step) {
                            m["valid_loss"] = json!(l);
                            m["valid_mean_token_accuracy"] = json!(a);
                        }
                        m
                    },
                    fine_tuning_job_id: id.clone(),
                }),
                _ => {}
            }
        }
        all.reverse();
        let (data, has_more) = page(all, |c| c.id.as_str(), &p)?;
        let first = data.first().map(|c| c.id.clone());
        let last = data.last().map(|c| c.id.clone());
        Ok::<_, HttpError>(Json(json!({
            "object": "list", "data": data, "has_more": has_more,
            "first_id": first, "last_id": last,
        })))
    })
    .await
}
