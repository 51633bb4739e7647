//! `graft.v1.Generation`: validate, tokenise, submit to the engine, convert events back.

use std::{pin::Pin, time::Instant};

use futures::Stream;
use graft_proto::v1::{self as pb, generation_server::Generation};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::{
    auth::Caller,
    convert::{deadline_from, validate_classify, validate_generate, PromptInput, RequestLimits},
    error::ApiError,
    observe, recorded, ReadySlot,
};
use crate::{
    adapters::Resolved,
    engine::{GenerationRequest, StreamEvent, Task},
    model::BaseModel,
    tenancy::StreamPermit,
};

pub struct GenerationService {
    ready: ReadySlot,
    limits: RequestLimits,
}

impl GenerationService {
    pub fn new(ready: ReadySlot, limits: RequestLimits) -> Self {
        Self { ready, limits }
    }

    /// Validation, adapter lease, tokenisation and admission; the events of the accepted
    /// request.
    async fn start(&self, req: Request<pb::GenerateRequest>) -> Result<Admitted, ApiError> {
        let deadline = deadline_from(req.metadata(), Instant::now());
        let caller = Caller::of(&req)?;
        let ready = super::ready(&self.ready)?;
        let tenant = caller.acting(&req.get_ref().tenant)?;
        let valid = validate_generate(req.into_inner(), &self.limits)?;
        let permit = caller
            .tenancy
            .begin_stream(&tenant, valid.params.max_new_tokens as u64)?;
        // An adapter runs in the base's engine; a fully fine-tuned model in its own.
        let (engine, adapter) = match &valid.adapter {
            Some(r) => match ready.adapters.resolve(&tenant, r).await? {
                Resolved::Adapter(lease) => (ready.engine.clone(), Some(lease)),
                Resolved::Model { row, dir } => (
                    ready.hosted.engine(row.id, &r.to_string(), &dir).await?,
                    None,
                ),
            },
            None => (ready.engine.clone(), None),
        };
        let virt = adapter.as_ref().map_or(0, |a| a.adapter().virtual_tokens());
        let field = match valid.input {
            PromptInput::Text(_) => "prompt",
            PromptInput::Chat(_) => "messages",
        };
        let prompt_ids = tokenise(engine.model(), valid.input, field, virt, Task::Generate)?;
        let events = engine.submit(GenerationRequest {
            task: Task::Generate,
            prompt_ids,
            params: valid.params,
            deadline,
            adapter,
            tenant: tenant.into(),
        })?;
        Ok(Admitted { events, permit })
    }
}

impl GenerationService {
    /// Every input as its own prefill-only sequence, submitted together so they share steps.
    async fn classify(
        &self,
        req: Request<pb::ClassifyRequest>,
    ) -> Result<pb::ClassifyResponse, ApiError> {
        let deadline = deadline_from(req.metadata(), Instant::now());
        let caller = Caller::of(&req)?;
        let ready = super::ready(&self.ready)?;
        let tenant = caller.acting(&req.get_ref().tenant)?;
        let valid = validate_classify(req.into_inner(), &self.limits)?;
        let _permit = caller.tenancy.begin_stream(&tenant, 0)?;
        let lease = ready.adapters.lease(&tenant, &valid.adapter).await?;
        let Some(head) = lease.adapter().head.clone() else {
            return Err(ApiError::invalid(
                "adapter",
                format!(
                    "{} has no classification head; it generates (Generate)",
                    valid.adapter
                ),
            ));
        };
        let virt = lease.adapter().virtual_tokens();
        let model = ready.engine.model();
        let mut pending = Vec::with_capacity(valid.inputs.len());
        for (input, field) in valid.inputs {
            let prompt_ids = tokenise(model, input, &field, virt, Task::Classify)?;
            pending.push(ready.engine.submit(GenerationRequest {
                task: Task::Classify,
                prompt_ids,
                params: Default::default(),
                deadline,
                adapter: Some(lease.clone()),
                tenant: tenant.clone().into(),
            })?);
        }
        let mut results = Vec::with_capacity(pending.len());
        for mut events in pending {
            let mut out = pb::Classification::default();
            loop {
                match events.recv().await {
                    Some(StreamEvent::Classified { logits }) => {
                        out = classification(&head.labels, &logits);
                    }
                    Some(StreamEvent::Finished { usage, timings, .. }) => {
                        out.usage = Some(usage.into());
                        out.timings = Some(timings.into());
                        break;
                    }
                    Some(StreamEvent::DeadlineExceeded) => return Err(ApiError::DeadlineExceeded),
                    Some(StreamEvent::Failed(e)) => return Err(ApiError::Internal(e)),
                    Some(StreamEvent::Tokens { .. }) => {}
                    None => return Err(ApiError::Internal("the engine stopped".into())),
                }
            }
            results.push(out);
        }
        Ok(pb::ClassifyResponse { results })
    }
}

/// Labels with their logits and softmax probabilities; the label is the argmax.
fn classification(labels: &[String], logits: &[f32]) -> pb::Classification {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    pb::Classification {
        label: labels.get(best).cloned().unwrap_or_default(),
        scores: labels
            .iter()
            .zip(logits)
            .zip(&exp)
            .map(|((label, &logit), e)| pb::LabelScore {
                label: label.clone(),
                logit,
                probability: e / sum,
            })
            .collect(),
        ..Default::default()
    }
}

/// A prompt's token ids, checked against the context window (with the adapter's `virt`
/// virtual tokens, and room for one new token when generating). Chat messages are rendered
/// with the generation prompt for generation, without it for classification. `field` is
/// the request field the input came from.
fn tokenise(
    model: &BaseModel,
    input: PromptInput,
    field: &str,
    virt: usize,
    task: Task,
) -> Result<Vec<u32>, ApiError> {
    let generate = task == Task::Generate;
    let text = match input {
        PromptInput::Text(t) => t,
        PromptInput::Chat(m) => model
            .chat
            .render(&m, generate)
            .map_err(|e| ApiError::invalid(field, e.to_string()))?,
    };
    let prompt_ids = model
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid(field, e.to_string()))?;
    let window = model.config().max_position;
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid(field, "the prompt has no tokens"));
    }
    let room = usize::from(generate);
    if prompt_ids.len() + virt + room > window {
        let with = if virt > 0 {
            format!(" plus the adapter's {virt} virtual tokens")
        } else {
            String::new()
        };
        let new = if generate {
            " (and at least one new token must fit)"
        } else {
            ""
        };
        return Err(ApiError::invalid(
            field,
            format!(
                "the prompt is {} tokens{with} but the context window is {window}{new}",
                prompt_ids.len()
            ),
        ));
    }
    Ok(prompt_ids)
}

/// A generation sequence never gets class logits (the engine refuses head adapters there).
const CLASSIFIED: &str = "the engine classified a generation request";

/// An accepted request: its engine events, and its tenant's stream slot (held until the
/// response ends; generated tokens are charged to it).
struct Admitted {
    events: mpsc::Receiver<StreamEvent>,
    permit: StreamPermit,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

/// Engine events -> proto stream messages; ends after the final event.
/// Records a GenerateStream in the request metrics exactly once: with the code it ended
/// with, or CANCELLED when the client dropped it before its end.
struct StreamRecord {
    started: Instant,
    done: bool,
}

impl StreamRecord {
    fn end(&mut self, code: tonic::Code) {
        if !self.done {
            self.done = true;
            observe("GenerateStream", code, self.started);
        }
    }
}

impl Drop for StreamRecord {
    fn drop(&mut self) {
        self.end(tonic::Code::Cancelled);
    }
}

fn to_proto_stream(admitted: Admitted, started: Instant) -> EventStream {
    let rec = StreamRecord {
        started,
        done: false,
    };
    let stream = futures::stream::unfold(Some((admitted, rec)), move |a| async move {
        let (mut a, mut rec) = a?;
        let ev = a.events.recv().await;
        if let Some(StreamEvent::Tokens { ids, .. }) = &ev {
            a.permit.charge(ids.len());
        }
        let (item, more) = match ev {
            Some(StreamEvent::Tokens {
                text,
                ids,
                logprobs,
            }) => (
                Ok(pb::GenerateStreamResponse {
                    text,
                    token_ids: ids,
                    logprobs,
                    ..Default::default()
                }),
                true,
            ),
            Some(StreamEvent::Finished {
                reason,
                usage,
                timings,
            }) => {
                rec.end(tonic::Code::Ok);
                (
                    Ok(pb::GenerateStreamResponse {
                        finish_reason: pb::FinishReason::from(reason) as i32,
                        usage: Some(usage.into()),
                        timings: Some(timings.into()),
                        ..Default::default()
                    }),
                    false,
                )
            }
            Some(StreamEvent::DeadlineExceeded) => {
                rec.end(tonic::Code::DeadlineExceeded);
                (Err(ApiError::DeadlineExceeded.into()), false)
            }
            Some(StreamEvent::Failed(e)) => {
                rec.end(tonic::Code::Internal);
                (Err(ApiError::Internal(e).into()), false)
            }
            Some(StreamEvent::Classified { .. }) => {
                rec.end(tonic::Code::Internal);
                (Err(ApiError::Internal(CLASSIFIED.into()).into()), false)
            }
            None => {
                rec.end(tonic::Code::Internal);
                (Err(Status::internal("the engine stopped")), false)
            }
        };
        Some((item, more.then_some((a, rec))))
    });
    Box::pin(stream)
}

#[tonic::async_trait]
impl Generation for GenerationService {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        recorded("Generate", async {
            let mut a = self.start(req).await?;
            let mut out = pb::GenerateResponse::default();
            while let Some(ev) = a.events.recv().await {
                match ev {
                    StreamEvent::Tokens {
                        text,
                        ids,
                        logprobs,
                    } => {
                        a.permit.charge(ids.len());
                        out.text.push_str(&text);
                        out.token_ids.extend(ids);
                        out.logprobs.extend(logprobs);
                    }
                    StreamEvent::Finished {
                        reason,
                        usage,
                        timings,
                    } => {
                        out.finish_reason = pb::FinishReason::from(reason) as i32;
                        out.usage = Some(usage.into());
                        out.timings = Some(timings.into());
                        return Ok(out);
                    }
                    StreamEvent::DeadlineExceeded => return Err(ApiError::DeadlineExceeded),
                    StreamEvent::Failed(e) => return Err(ApiError::Internal(e)),
                    StreamEvent::Classified { .. } => {
                        return Err(ApiError::Internal(CLASSIFIED.into()))
                    }
                }
            }
            Err(ApiError::Internal("the engine stopped".into()))
        })
        .await
    }

    async fn classify(
        &self,
        req: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        recorded("Classify", GenerationService::classify(self, req)).await
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let started = Instant::now();
        match self.start(req).await {
            Ok(a) => Ok(Response::new(to_proto_stream(a, started))),
            Err(e) => {
                observe("GenerateStream", e.code(), started);
                Err(e.into())
            }
        }
    }
}
