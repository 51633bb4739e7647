//! `graft.v1.Generation`: validate, tokenise, submit to the engine, convert events back.

use std::{pin::Pin, time::Instant};

use futures::Stream;
use graft_proto::v1::{self as pb, generation_server::Generation};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::{
    auth::Caller,
    convert::{deadline_from, validate_generate, PromptInput, RequestLimits},
    error::ApiError,
    observe, recorded, ReadySlot,
};
use crate::{
    engine::{GenerationRequest, StreamEvent},
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
        let adapter = match &valid.adapter {
            Some(r) => Some(ready.adapters.lease(&tenant, r).await?),
            None => None,
        };
        let model = ready.engine.model();
        let (text, field) = match valid.input {
            PromptInput::Text(t) => (t, "prompt"),
            PromptInput::Chat(m) => (
                model
                    .chat
                    .render(&m, true)
                    .map_err(|e| ApiError::invalid("messages", e.to_string()))?,
                "messages",
            ),
        };
        let prompt_ids = model
            .tokenizer
            .encode(&text)
            .map_err(|e| ApiError::invalid(field, e.to_string()))?;
        let window = model.config().max_position;
        if prompt_ids.is_empty() {
            return Err(ApiError::invalid(field, "the prompt has no tokens"));
        }
        let virt = adapter.as_ref().map_or(0, |a| a.adapter().virtual_tokens());
        if prompt_ids.len() + virt >= window {
            let with = if virt > 0 {
                format!(" plus the adapter's {virt} virtual tokens")
            } else {
                String::new()
            };
            return Err(ApiError::invalid(
                field,
                format!(
                    "the prompt is {} tokens{with} but the context window is {window} (and at least one new token must fit)",
                    prompt_ids.len()
                ),
            ));
        }
        let events = ready.engine.submit(GenerationRequest {
            prompt_ids,
            params: valid.params,
            deadline,
            adapter,
            tenant: tenant.into(),
        })?;
        Ok(Admitted { events, permit })
    }
}

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
                }
            }
            Err(ApiError::Internal("the engine stopped".into()))
        })
        .await
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
