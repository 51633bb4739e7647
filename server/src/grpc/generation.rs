//! `graft.v1.Generation`: validate, tokenise, submit to the engine, convert events back.

use std::{pin::Pin, time::Instant};

use futures::Stream;
use graft_proto::v1::{self as pb, generation_server::Generation};
use tonic::{Request, Response, Status};

use super::{
    auth::Caller,
    convert::{
        deadline_from, validate_classify, validate_generate, validate_score, PromptInput,
        RequestLimits,
    },
    error::ApiError,
    observe, recorded, ReadySlot,
};
use crate::api::StreamRecord;
use crate::{
    api::generate::{admit, tokenise, Admitted, InputField, CLASSIFIED},
    engine::{GenerationRequest, StreamEvent, Task},
    train::preference,
};

pub struct GenerationService {
    ready: ReadySlot,
    limits: RequestLimits,
}

impl GenerationService {
    pub fn new(ready: ReadySlot, limits: RequestLimits) -> Self {
        Self { ready, limits }
    }

    /// Validation, then the shared path (`api::generate::admit`): the events of the
    /// accepted request.
    async fn start(&self, req: Request<pb::GenerateRequest>) -> Result<Admitted, ApiError> {
        let deadline = deadline_from(req.metadata(), Instant::now());
        let caller = Caller::of(&req)?;
        let ready = super::ready(&self.ready)?;
        let tenant = caller.acting(&req.get_ref().tenant)?;
        let valid = validate_generate(req.into_inner(), &self.limits)?;
        let field = match valid.input {
            PromptInput::Text(_) => "prompt",
            PromptInput::Chat(_) => "messages",
        };
        let mut one = admit(
            ready,
            &caller.tenancy,
            &tenant,
            valid,
            InputField(field),
            deadline,
            1,
        )
        .await?;
        one.pop()
            .ok_or_else(|| ApiError::Internal("no sequence was admitted".into()))
    }
}

impl GenerationService {
    /// Every input through the adapter's classification head (`head_outputs`).
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
        let head = match lease.adapter().head.clone() {
            Some(h) if !h.is_reward() => h,
            other => {
                return Err(ApiError::invalid(
                    "adapter",
                    if other.is_some() {
                        format!("{} is a reward model; it scores (Score)", valid.adapter)
                    } else {
                        format!(
                            "{} has no classification head; it generates (Generate)",
                            valid.adapter
                        )
                    },
                ))
            }
        };
        let virt = lease.adapter().virtual_tokens();
        let model = ready.engine.model();
        let prompts = valid
            .inputs
            .into_iter()
            .map(|(input, field)| tokenise(model, input, &field, virt, Task::Classify))
            .collect::<Result<Vec<_>, _>>()?;
        let results = head_outputs(&ready.engine, &lease, &tenant, deadline, prompts)
            .await?
            .into_iter()
            .map(|(logits, usage, timings)| pb::Classification {
                usage: Some(usage),
                timings: Some(timings),
                ..classification(&head.labels, &logits)
            })
            .collect();
        Ok(pb::ClassifyResponse { results })
    }

    /// Every (prompt, completion) pair through the reward model's head (`head_outputs`).
    async fn score(&self, req: Request<pb::ScoreRequest>) -> Result<pb::ScoreResponse, ApiError> {
        let deadline = deadline_from(req.metadata(), Instant::now());
        let caller = Caller::of(&req)?;
        let ready = super::ready(&self.ready)?;
        let tenant = caller.acting(&req.get_ref().tenant)?;
        let valid = validate_score(req.into_inner(), &self.limits)?;
        let _permit = caller.tenancy.begin_stream(&tenant, 0)?;
        let lease = ready.adapters.lease(&tenant, &valid.adapter).await?;
        match &lease.adapter().head {
            Some(h) if h.is_reward() => {}
            other => {
                let has = match other {
                    Some(h) => format!(
                        "a classification head of {} labels (Classify)",
                        h.num_labels()
                    ),
                    None => "no head; it generates (Generate)".into(),
                };
                return Err(ApiError::invalid(
                    "adapter",
                    format!("{} is not a reward model: it has {has}", valid.adapter),
                ));
            }
        }
        let model = ready.engine.model();
        let room = model.config().max_position - lease.adapter().virtual_tokens();
        let render = |m: &[crate::model::ChatMessage], g: bool| model.chat.render(m, g);
        let prompts = valid
            .inputs
            .into_iter()
            .map(|(prompt, field, completion)| {
                let msgs = match prompt {
                    PromptInput::Text(t) => vec![preference::user(&t)],
                    PromptInput::Chat(m) => m,
                };
                preference::scored_ids(&msgs, &completion, &render, &model.tokenizer, room)
                    .map_err(|e| ApiError::invalid(field, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let results = head_outputs(&ready.engine, &lease, &tenant, deadline, prompts)
            .await?
            .into_iter()
            .map(|(logits, usage, timings)| pb::Score {
                reward: logits.first().copied().unwrap_or_default(),
                usage: Some(usage),
                timings: Some(timings),
            })
            .collect();
        Ok(pb::ScoreResponse { results })
    }
}

/// Each prompt as its own prefill-only sequence through the adapter's head, submitted
/// together so they share steps (with generation too); their head outputs in order.
async fn head_outputs(
    engine: &crate::engine::EngineHandle,
    lease: &crate::adapters::AdapterLease,
    tenant: &str,
    deadline: Option<Instant>,
    prompts: Vec<Vec<u32>>,
) -> Result<Vec<(Vec<f32>, pb::Usage, pb::Timings)>, ApiError> {
    let mut pending = Vec::with_capacity(prompts.len());
    for prompt_ids in prompts {
        pending.push(engine.submit(GenerationRequest {
            task: Task::Classify,
            prompt_ids,
            params: Default::default(),
            deadline,
            adapter: Some(lease.clone()),
            tenant: tenant.into(),
            constraint: None,
            background: false,
        })?);
    }
    let mut out = Vec::with_capacity(pending.len());
    for events in pending {
        out.push(head_output(events).await?);
    }
    Ok(out)
}

/// A prefill-only sequence's head logits, usage and timings, read to its end.
async fn head_output(
    mut events: tokio::sync::mpsc::Receiver<StreamEvent>,
) -> Result<(Vec<f32>, pb::Usage, pb::Timings), ApiError> {
    let mut out = Vec::new();
    loop {
        match events.recv().await {
            Some(StreamEvent::Classified { logits }) => out = logits,
            Some(StreamEvent::Finished { usage, timings, .. }) => {
                return Ok((out, usage.into(), timings.into()))
            }
            Some(StreamEvent::DeadlineExceeded) => return Err(ApiError::DeadlineExceeded),
            Some(StreamEvent::Failed(e)) => return Err(ApiError::Internal(e)),
            Some(StreamEvent::Tokens { .. }) => {}
            None => return Err(ApiError::Internal("the engine stopped".into())),
        }
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

/// One position's alternatives as proto.
fn top(alternatives: Vec<(u32, f32)>) -> pb::TopLogprobs {
    pb::TopLogprobs {
        tokens: alternatives
            .into_iter()
            .map(|(token_id, logprob)| pb::TokenLogprob { token_id, logprob })
            .collect(),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

/// Engine events -> proto stream messages; ends after the final event.
fn to_proto_stream(admitted: Admitted, started: Instant) -> EventStream {
    let rec = StreamRecord::new("GenerateStream", started);
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
                top_logprobs,
            }) => (
                Ok(pb::GenerateStreamResponse {
                    text,
                    token_ids: ids,
                    logprobs,
                    top_logprobs: top_logprobs.into_iter().map(top).collect(),
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
            let c = self.start(req).await?.complete().await?;
            Ok(pb::GenerateResponse {
                text: c.text,
                token_ids: c.ids,
                finish_reason: pb::FinishReason::from(c.reason) as i32,
                usage: Some(c.usage.into()),
                timings: Some(c.timings.into()),
                logprobs: c.logprobs,
                top_logprobs: c.top.into_iter().map(top).collect(),
            })
        })
        .await
    }

    async fn classify(
        &self,
        req: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        recorded("Classify", GenerationService::classify(self, req)).await
    }

    async fn score(
        &self,
        req: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        recorded("Score", GenerationService::score(self, req)).await
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
