//! The one path from a generation request to engine events, whichever front it came
//! through: the rules of its fields (ranges, roles, counts), the acting tenant's stream
//! permit, the adapter or hosted model it names, tokenisation against the context window,
//! and submission. A front converts its wire form into [`ValidRequest`] (naming fields in
//! its own words) and the events back; nothing here knows gRPC or HTTP.

use std::{sync::Arc, time::Instant};

use tokio::sync::mpsc;

use super::{error::ApiError, Ready};
use crate::{
    adapters::{AdapterRef, Resolved},
    engine::{
        constraint::{Constraint, ConstraintSpec},
        EngineHandle, FinishReason, GenerationRequest, SamplingParams, StreamEvent, Task, Timings,
        Usage,
    },
    model::{BaseModel, ChatMessage},
    tenancy::{StreamPermit, Tenancy},
};

/// Bounds a request must respect.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_new_tokens_cap: u32,
    pub max_stop_sequences: usize,
    pub max_stop_bytes: usize,
    pub max_messages: usize,
}

impl RequestLimits {
    pub fn new(max_new_tokens_cap: u32) -> Self {
        Self {
            max_new_tokens_cap,
            max_stop_sequences: 8,
            max_stop_bytes: 256,
            max_messages: 1024,
        }
    }
}

pub const DEFAULT_MAX_NEW_TOKENS: u32 = 256;
pub const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];
/// Most alternatives a request may ask for beside each token (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// The prompt, before tokenisation.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// A generation request whose fields are all valid.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub input: PromptInput,
    pub adapter: Option<AdapterRef>,
    pub params: SamplingParams,
    /// Structured output, and the request field it came from (for errors).
    pub constraint: Option<(ConstraintSpec, String)>,
}

/// `name` or `name@version`.
pub fn adapter_ref(field: &str, s: &str) -> Result<AdapterRef, ApiError> {
    s.parse().map_err(|e: String| ApiError::invalid(field, e))
}

/// Chat messages of the request's field `field`: known roles, at most `max_messages`.
pub fn check_messages(
    field: &str,
    messages: Vec<ChatMessage>,
    limits: &RequestLimits,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.len() > limits.max_messages {
        return Err(ApiError::invalid(
            field,
            format!(
                "{} messages; at most {} are allowed",
                messages.len(),
                limits.max_messages
            ),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        if !CHAT_ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                format!("{field}[{i}].role"),
                format!(
                    "unknown role {:?}; expected one of system, user, assistant",
                    m.role
                ),
            ));
        }
    }
    Ok(messages)
}

/// Sampling settings as a caller gave them (`None`: the default).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingRequest {
    pub max_new_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
}

impl SamplingRequest {
    /// Checks every setting and fills in the defaults. Errors name the setting as
    /// `name(setting)` says, where `setting` is the field's name in
    /// [`SamplingParams`] (`max_new_tokens`, `temperature`, ..., `stop`, `stop[i]`), so each
    /// front reports it in its own words.
    pub fn check(
        self,
        limits: &RequestLimits,
        name: impl Fn(&str) -> String,
    ) -> Result<SamplingParams, ApiError> {
        let bad = |f: &str, reason: String| ApiError::invalid(name(f), reason);
        let max_new_tokens = self
            .max_new_tokens
            .unwrap_or(DEFAULT_MAX_NEW_TOKENS.min(limits.max_new_tokens_cap));
        if max_new_tokens == 0 || max_new_tokens > limits.max_new_tokens_cap {
            return Err(bad(
                "max_new_tokens",
                format!(
                    "{max_new_tokens} is outside [1, {}]",
                    limits.max_new_tokens_cap
                ),
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(bad(
                "temperature",
                format!("{temperature} must be a finite number >= 0 (0 = greedy)"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad("top_p", format!("{top_p} is outside (0, 1]")));
        }
        let top_k = self.top_k.unwrap_or(0);
        if !(0..=i64::from(u32::MAX)).contains(&top_k) {
            return Err(bad("top_k", format!("{top_k} must be >= 0 (0 = off)")));
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !repetition_penalty.is_finite() || repetition_penalty <= 0.0 {
            return Err(bad(
                "repetition_penalty",
                format!("{repetition_penalty} must be a finite number > 0 (1 = off)"),
            ));
        }
        let penalty = |f: &str, v: Option<f32>| {
            let v = v.unwrap_or(0.0);
            if (-2.0..=2.0).contains(&v) {
                Ok(v)
            } else {
                Err(bad(f, format!("{v} is outside [-2, 2] (0 = off)")))
            }
        };
        let presence_penalty = penalty("presence_penalty", self.presence_penalty)?;
        let frequency_penalty = penalty("frequency_penalty", self.frequency_penalty)?;
        let top_logprobs = self.top_logprobs.unwrap_or(0);
        if top_logprobs > MAX_TOP_LOGPROBS {
            return Err(bad(
                "top_logprobs",
                format!("{top_logprobs} is outside [0, {MAX_TOP_LOGPROBS}]"),
            ));
        }
        if top_logprobs > 0 && !self.logprobs {
            return Err(bad(
                "top_logprobs",
                "needs logprobs to be true (the alternatives come with the token's own)".into(),
            ));
        }
        if self.stop.len() > limits.max_stop_sequences {
            return Err(bad(
                "stop",
                format!(
                    "{} stop sequences; at most {} are allowed",
                    self.stop.len(),
                    limits.max_stop_sequences
                ),
            ));
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() || s.len() > limits.max_stop_bytes {
                return Err(bad(
                    &format!("stop[{i}]"),
                    format!(
                        "{} bytes; a stop sequence must be 1 to {} bytes",
                        s.len(),
                        limits.max_stop_bytes
                    ),
                ));
            }
        }
        Ok(SamplingParams {
            max_new_tokens,
            temperature,
            top_p,
            top_k: top_k as u32,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            stop: self.stop,
            seed: self.seed.unwrap_or_else(rand::random),
            logprobs: self.logprobs,
            top_logprobs,
        })
    }
}

/// An accepted request: its engine events, its tenant's stream slot (held until the
/// response ends; generated tokens are charged to it) and the model that runs it (for its
/// tokenizer).
pub struct Admitted {
    pub events: mpsc::Receiver<StreamEvent>,
    pub permit: StreamPermit,
    pub model: Arc<BaseModel>,
}

/// A request read to its end: everything it generated, why it ended, and its usage and
/// timings.
pub struct Completed {
    pub text: String,
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Per id, the most likely alternatives (when asked for).
    pub top: Vec<Vec<(u32, f32)>>,
    pub reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
}

impl Admitted {
    /// Reads the request's events to its end, charging its tokens to its tenant; a deadline
    /// or an engine failure is the error.
    pub async fn complete(mut self) -> Result<Completed, ApiError> {
        let mut out = Completed {
            text: String::new(),
            ids: Vec::new(),
            logprobs: Vec::new(),
            top: Vec::new(),
            reason: FinishReason::Stop,
            usage: Usage::default(),
            timings: Timings::default(),
        };
        while let Some(ev) = self.events.recv().await {
            match ev {
                StreamEvent::Tokens {
                    text,
                    ids,
                    logprobs,
                    top_logprobs,
                } => {
                    self.permit.charge(ids.len());
                    out.text.push_str(&text);
                    out.ids.extend(ids);
                    out.logprobs.extend(logprobs);
                    out.top.extend(top_logprobs);
                }
                StreamEvent::Finished {
                    reason,
                    usage,
                    timings,
                } => {
                    out.reason = reason;
                    out.usage = usage;
                    out.timings = timings;
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
    }
}

/// A generation sequence never gets class logits (the engine refuses head adapters there).
pub const CLASSIFIED: &str = "the engine classified a generation request";

/// Where a request's prompt came from, for errors that name it.
#[derive(Debug, Clone, Copy)]
pub struct InputField<'a>(pub &'a str);

/// Takes `n` stream permits of `tenant`, resolves the adapter or hosted model, tokenises
/// the prompt once and submits `n` sequences: sequence `i` samples with seed `seed + i`, so
/// the choices differ and each is reproducible. `field` names the prompt in the caller's
/// words.
pub async fn admit(
    ready: &Ready,
    tenancy: &Tenancy,
    tenant: &str,
    req: ValidRequest,
    field: InputField<'_>,
    deadline: Option<Instant>,
    n: u32,
) -> Result<Vec<Admitted>, ApiError> {
    let mut permits = Vec::with_capacity(n as usize);
    for _ in 0..n {
        permits.push(tenancy.begin_stream(tenant, u64::from(req.params.max_new_tokens))?);
    }
    // An adapter runs in the base's engine; a fully fine-tuned model in its own.
    let (engine, adapter): (EngineHandle, _) = match &req.adapter {
        Some(r) => match ready.adapters.resolve(tenant, r).await? {
            Resolved::Adapter(lease) => (ready.engine.clone(), Some(lease)),
            Resolved::Model { row, dir } => (
                ready.hosted.engine(row.id, &r.to_string(), &dir).await?,
                None,
            ),
        },
        None => (ready.engine.clone(), None),
    };
    let virt = adapter.as_ref().map_or(0, |a| a.adapter().virtual_tokens());
    let prompt_ids = tokenise(engine.model(), req.input, field.0, virt, Task::Generate)?;
    let constraint = match req.constraint {
        Some((spec, field)) => Some(compile(&engine, spec, &field).await?),
        None => None,
    };
    let mut admitted = Vec::with_capacity(n as usize);
    for (i, permit) in permits.into_iter().enumerate() {
        let mut params = req.params.clone();
        params.seed = params.seed.wrapping_add(i as u64);
        let events = engine.submit(GenerationRequest {
            task: Task::Generate,
            prompt_ids: prompt_ids.clone(),
            params,
            deadline,
            adapter: adapter.clone(),
            tenant: tenant.into(),
            constraint: constraint.clone(),
            background: false,
        })?;
        admitted.push(Admitted {
            events,
            permit,
            model: engine.model().clone(),
        });
    }
    Ok(admitted)
}

/// Compiles a constraint against the engine's model on a blocking thread (a large schema
/// can take a while); a bad or unsatisfiable one is INVALID_ARGUMENT naming `field`.
async fn compile(
    engine: &EngineHandle,
    spec: ConstraintSpec,
    field: &str,
) -> Result<Constraint, ApiError> {
    let grammars = engine
        .grammars()
        .map_err(|e| ApiError::FailedPrecondition(format!("structured output: {e}")))?;
    tokio::task::spawn_blocking(move || grammars.compile(&spec))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::invalid(field, e))
}

/// A prompt's token ids, checked against the context window (with the adapter's `virt`
/// virtual tokens, and room for one new token when generating). Chat messages are rendered
/// with the generation prompt for generation, without it for classification. `field` is
/// the request field the input came from.
pub fn tokenise(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: SamplingRequest) -> String {
        match r.check(&RequestLimits::new(100), |f| format!("p.{f}")) {
            Err(ApiError::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn penalties_and_top_logprobs_are_bounded_and_named() {
        let r = |f: fn(&mut SamplingRequest)| {
            let mut r = SamplingRequest::default();
            f(&mut r);
            r
        };
        assert_eq!(
            field_of(r(|r| r.presence_penalty = Some(2.5))),
            "p.presence_penalty"
        );
        assert_eq!(
            field_of(r(|r| r.frequency_penalty = Some(f32::NAN))),
            "p.frequency_penalty"
        );
        assert_eq!(
            field_of(r(|r| {
                r.logprobs = true;
                r.top_logprobs = Some(21)
            })),
            "p.top_logprobs"
        );
        assert_eq!(field_of(r(|r| r.top_logprobs = Some(2))), "p.top_logprobs");
        let ok = r(|r| {
            r.presence_penalty = Some(-2.0);
            r.frequency_penalty = Some(2.0);
            r.logprobs = true;
            r.top_logprobs = Some(20);
        })
        .check(&RequestLimits::new(100), str::to_string)
        .expect("valid");
        assert_eq!(
            (ok.presence_penalty, ok.frequency_penalty, ok.top_logprobs),
            (-2.0, 2.0, 20)
        );
    }
}
