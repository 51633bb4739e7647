//! `graft.v1.Training`: datasets and jobs. Converts and validates the request's fields
//! (INVALID_ARGUMENT naming each), then calls `train::jobs::TrainingService`.

use std::pin::Pin;

use futures::Stream;
use graft_proto::v1::{self as pb, training_server::Training, upload_dataset_request::Part};
use tonic::{Request, Response, Status, Streaming};

use super::{
    auth::Caller,
    error::{transport, ApiError},
    job_request, ready, recorded, ReadySlot,
};
use crate::{
    store::training::{DatasetRow, JobRow},
    train::{
        dataset::Format,
        jobs::{JobEvent, JobSpec},
        trainer::{Objective, TrainEvent},
    },
};

pub struct TrainingGrpc {
    ready: ReadySlot,
}

impl TrainingGrpc {
    pub fn new(ready: ReadySlot) -> Self {
        Self { ready }
    }
}

impl From<DatasetRow> for pb::Dataset {
    fn from(d: DatasetRow) -> Self {
        Self {
            tenant: d.tenant,
            name: d.name,
            id: d.id,
            format: d.format,
            examples: d.examples,
            tokens: d.tokens,
            truncated_examples: d.truncated,
            size_bytes: d.size_bytes,
            sha256: d.sha256,
            created_at_unix: d.created_at,
            filename: d.filename.unwrap_or_default(),
            label_counts: d
                .label_counts
                .into_iter()
                .map(|(label, count)| pb::LabelCount { label, count })
                .collect(),
        }
    }
}

impl From<JobRow> for pb::Job {
    fn from(j: JobRow) -> Self {
        let spec = JobSpec::of(&j);
        Self {
            id: j.id,
            tenant: j.tenant,
            dataset: j.dataset_name,
            dataset_id: j.dataset,
            validation_dataset: j.eval_dataset_name.unwrap_or_default(),
            adapter_name: j.adapter_name,
            status: j.status.to_string(),
            error: j.error.unwrap_or_default(),
            adapter_version: j.adapter_version.unwrap_or(0),
            step: j.step,
            total_steps: j.total_steps,
            created_at_unix: j.created_at,
            updated_at_unix: j.updated_at,
            method: spec.as_ref().map_or("", |s| s.train.method.name()).into(),
            objective: spec
                .as_ref()
                .map_or("", |s| s.train.objective.name())
                .into(),
            labels: match spec.map(|s| s.train.objective) {
                Some(Objective::Classification { labels }) => labels,
                _ => Vec::new(),
            },
        }
    }
}

fn to_proto_event(seq: u64, at_ms: i64, e: JobEvent) -> pb::JobEvent {
    use pb::job_event::Event;
    let event = match e {
        JobEvent::Status { status, message } => Event::Status(pb::StatusEvent {
            status: status.to_string(),
            message,
        }),
        JobEvent::Train(TrainEvent::Step {
            step,
            total_steps,
            epoch,
            train_loss,
            learning_rate,
            grad_norm,
            tokens_per_second,
            eta_seconds,
            metrics,
            ..
        }) => Event::Step(pb::StepEvent {
            metrics: metrics.into_iter().collect(),
            step: step as u64,
            total_steps: total_steps as u64,
            epoch,
            train_loss,
            learning_rate,
            grad_norm,
            tokens_per_second,
            eta_seconds,
        }),
        JobEvent::Train(TrainEvent::Eval {
            step,
            eval_loss,
            token_accuracy,
            classes,
            metrics,
        }) => Event::Eval(pb::EvalEvent {
            metrics: metrics.into_iter().collect(),
            step: step as u64,
            eval_loss,
            token_accuracy,
            macro_f1: classes.as_ref().map_or(0.0, |c| c.macro_f1),
            per_class: classes
                .map(|c| c.per_class)
                .unwrap_or_default()
                .into_iter()
                .map(|c| pb::ClassScore {
                    label: c.label,
                    precision: c.precision,
                    recall: c.recall,
                    f1: c.f1,
                    support: c.support,
                })
                .collect(),
        }),
        JobEvent::Train(TrainEvent::Checkpoint { step }) => {
            Event::Checkpoint(pb::CheckpointEvent { step: step as u64 })
        }
    };
    pb::JobEvent {
        seq,
        time_unix_ms: at_ms,
        event: Some(event),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Training for TrainingGrpc {
    async fn upload_dataset(
        &self,
        req: Request<Streaming<pb::UploadDatasetRequest>>,
    ) -> Result<Response<pb::Dataset>, Status> {
        recorded("UploadDataset", async {
            let svc = &ready(&self.ready)?.training;
            let caller = Caller::of(&req)?;
            let mut s = req.into_inner();
            let header = match s.message().await.map_err(transport)? {
                Some(pb::UploadDatasetRequest {
                    part: Some(Part::Header(h)),
                }) => h,
                _ => {
                    return Err(ApiError::invalid(
                        "header",
                        "the first message must be a DatasetHeader",
                    ))
                }
            };
            let tenant = caller.acting(&header.tenant)?;
            let format = match header.format.as_str() {
                "" => None,
                f => Some(Format::parse(f).ok_or_else(|| {
                    ApiError::invalid(
                        "header.format",
                        format!("{f:?}; expected alpaca, chat, prompt_completion or text"),
                    )
                })?),
            };
            let mut upload = svc.begin_upload(&tenant, &header.name, format).await?;
            while let Some(m) = s.message().await.map_err(transport)? {
                match m.part {
                    Some(Part::Chunk(c)) => upload.write(&c).await?,
                    _ => {
                        return Err(ApiError::invalid(
                            "header",
                            "only the first message may be a header",
                        ))
                    }
                }
            }
            Ok(svc.finish_upload(upload).await?.into())
        })
        .await
    }

    async fn get_dataset(
        &self,
        req: Request<pb::GetDatasetRequest>,
    ) -> Result<Response<pb::Dataset>, Status> {
        recorded("GetDataset", async {
            let caller = Caller::of(&req)?;
            let r = req.into_inner();
            Ok(ready(&self.ready)?
                .training
                .dataset(&caller.acting(&r.tenant)?, &r.name)
                .await?
                .into())
        })
        .await
    }

    async fn list_datasets(
        &self,
        req: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        recorded("ListDatasets", async {
            let caller = Caller::of(&req)?;
            let r = req.into_inner();
            let rows = ready(&self.ready)?
                .training
                .datasets(&caller.acting(&r.tenant)?)
                .await?;
            Ok(pb::ListDatasetsResponse {
                datasets: rows.into_iter().map(Into::into).collect(),
            })
        })
        .await
    }

    async fn delete_dataset(
        &self,
        req: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::Dataset>, Status> {
        recorded("DeleteDataset", async {
            let caller = Caller::of(&req)?;
            let r = req.into_inner();
            Ok(ready(&self.ready)?
                .training
                .delete_dataset(&caller.acting(&r.tenant)?, &r.name)
                .await?
                .into())
        })
        .await
    }

    async fn create_job(
        &self,
        req: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        recorded("CreateJob", async {
            let caller = Caller::of(&req)?;
            let r = req.into_inner();
            let tenant = caller.acting(&r.tenant)?;
            let job = job_request::job_from(&r)?;
            let training = &ready(&self.ready)?.training;
            Ok(training.create_job(&tenant, job).await?.into())
        })
        .await
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        recorded("GetJob", async {
            let caller = Caller::of(&req)?;
            let r = req.into_inner();
            Ok(ready(&self.ready)?
                .training
                .job(&caller.acting(&r.tenant)?, &r.id)
                .await?
                .into())
        })
        .await
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        recorded("ListJobs", async {
            let caller = Caller::of(&req)?;
            let r = req.into_inner();
            let rows = ready(&self.ready)?
                .training
                .jobs(&caller.acting(&r.tenant)?)
                .await?;
            Ok(pb::ListJobsResponse {
                jobs: rows.into_iter().map(Into::into).collect(),
            })
        })
        .await
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        recorded("CancelJob", async {
            let caller = Caller::of(&req)?;
            let r = req.into_inner();
            Ok(ready(&self.ready)?
                .training
                .cancel(&caller.acting(&r.tenant)?, &r.id)
                .await?
                .into())
        })
        .await
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        recorded("WatchJob", async {
            let caller = Caller::of(&req)?;
            let r = req.into_inner();
            let rx = ready(&self.ready)?
                .training
                .watch(&caller.acting(&r.tenant)?, &r.id, r.after_seq)
                .await?;
            let s = futures::stream::unfold(rx, |mut rx| async move {
                let (row, e) = rx.recv().await?;
                Some((Ok(to_proto_event(row.seq, row.at_ms, e)), rx))
            });
            Ok(Box::pin(s) as EventStream)
        })
        .await
    }
}
