//! Proto -> domain for generation requests: every check of the request's own fields, with
//! the offending field named. Checks that need the model (prompt length) happen in the
//! service after tokenisation.

use std::time::{Duration, Instant};

use graft_proto::v1 as pb;

use crate::api::error::ApiError;
use crate::{
    adapters::AdapterRef,
    api::generate::{check_messages, SamplingRequest},
    engine::{constraint::ConstraintSpec, SamplingParams},
    model::ChatMessage,
};

pub use crate::api::generate::{
    adapter_ref, PromptInput, RequestLimits, ValidRequest, CHAT_ROLES, DEFAULT_MAX_NEW_TOKENS,
};

pub fn validate_generate(
    req: pb::GenerateRequest,
    limits: &RequestLimits,
) -> Result<ValidRequest, ApiError> {
    let given = [
        !req.prompt.is_empty(),
        !req.raw_prompt.is_empty(),
        !req.messages.is_empty(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given == 0 {
        return Err(ApiError::invalid(
            "prompt",
            "give a prompt (or raw_prompt) or chat messages; all are empty",
        ));
    }
    if given > 1 {
        return Err(ApiError::invalid(
            "prompt",
            "give exactly one of prompt, raw_prompt or messages, not several",
        ));
    }
    let input = if !req.messages.is_empty() {
        PromptInput::Chat(chat_messages("messages", req.messages, limits)?)
    } else if !req.raw_prompt.is_empty() {
        match String::from_utf8(req.raw_prompt) {
            Ok(s) => PromptInput::Text(s),
            Err(e) => {
                return Err(ApiError::invalid(
                    "raw_prompt",
                    format!(
                        "not valid UTF-8 (error at byte {})",
                        e.utf8_error().valid_up_to()
                    ),
                ))
            }
        }
    } else {
        PromptInput::Text(req.prompt)
    };
    let adapter = match req.adapter.as_str() {
        "" => None,
        a => Some(adapter_ref("adapter", a)?),
    };
    let params = validate_params(req.parameters.unwrap_or_default(), limits)?;
    let constraint = req.constraint.map(constraint_of).transpose()?;
    Ok(ValidRequest {
        input,
        adapter,
        params,
        constraint,
    })
}

/// The request's constraint, with the field it came from.
fn constraint_of(
    c: pb::generate_request::Constraint,
) -> Result<(ConstraintSpec, String), ApiError> {
    use pb::generate_request::Constraint as C;
    Ok(match c {
        C::JsonSchema(s) => {
            let v = serde_json::from_str(&s)
                .map_err(|e| ApiError::invalid("json_schema", format!("not JSON: {e}")))?;
            (ConstraintSpec::JsonSchema(v), "json_schema".into())
        }
        C::JsonObject(true) => (ConstraintSpec::JsonObject, "json_object".into()),
        C::JsonObject(false) => {
            return Err(ApiError::invalid(
                "json_object",
                "set it to true, or leave the constraint out",
            ))
        }
        C::Regex(r) => (ConstraintSpec::Regex(r), "regex".into()),
        C::Grammar(g) => (ConstraintSpec::Lark(g), "grammar".into()),
    })
}

/// Chat messages of the request's field `field`, checked by the one rule
/// ([`check_messages`]).
fn chat_messages(
    field: &str,
    messages: Vec<pb::ChatMessage>,
    limits: &RequestLimits,
) -> Result<Vec<ChatMessage>, ApiError> {
    let msgs = messages
        .into_iter()
        .map(|m| ChatMessage {
            role: m.role,
            content: m.content,
        })
        .collect();
    check_messages(field, msgs, limits)
}

/// Most inputs one Classify request may carry.
pub const MAX_CLASSIFY_INPUTS: usize = 256;

/// A classification request whose fields are all valid: the adapter, and per input its
/// text or messages with the field it came from (`inputs[i].text` / `inputs[i].messages`).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidClassify {
    pub adapter: AdapterRef,
    pub inputs: Vec<(PromptInput, String)>,
}

pub fn validate_classify(
    req: pb::ClassifyRequest,
    limits: &RequestLimits,
) -> Result<ValidClassify, ApiError> {
    if req.adapter.is_empty() {
        return Err(ApiError::invalid(
            "adapter",
            "name the adapter with the classification head",
        ));
    }
    let adapter = adapter_ref("adapter", &req.adapter)?;
    if req.inputs.is_empty() || req.inputs.len() > MAX_CLASSIFY_INPUTS {
        return Err(ApiError::invalid(
            "inputs",
            format!(
                "{} inputs; give 1 to {MAX_CLASSIFY_INPUTS}",
                req.inputs.len()
            ),
        ));
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (i, input) in req.inputs.into_iter().enumerate() {
        inputs.push(text_or_messages(
            &format!("inputs[{i}]."),
            ("text", input.text),
            input.messages,
            limits,
        )?);
    }
    Ok(ValidClassify { adapter, inputs })
}

/// An input given as a text (`text.0` names its field) or as chat messages, exactly one,
/// with the field it came from (under `prefix`).
fn text_or_messages(
    prefix: &str,
    text: (&str, String),
    messages: Vec<pb::ChatMessage>,
    limits: &RequestLimits,
) -> Result<(PromptInput, String), ApiError> {
    let field = |f: &str| format!("{prefix}{f}");
    match (text.1.is_empty(), messages.is_empty()) {
        (false, true) => Ok((PromptInput::Text(text.1), field(text.0))),
        (true, false) => Ok((
            PromptInput::Chat(chat_messages(&field("messages"), messages, limits)?),
            field("messages"),
        )),
        (true, true) => Err(ApiError::invalid(
            field(text.0),
            format!("give a {} or chat messages; both are empty", text.0),
        )),
        (false, false) => Err(ApiError::invalid(
            field(text.0),
            format!("give a {} or chat messages, not both", text.0),
        )),
    }
}

/// A Score request whose fields are all valid: the adapter, and per pair the prompt (a text
/// or messages, with its field) and the completion.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidScore {
    pub adapter: AdapterRef,
    pub inputs: Vec<(PromptInput, String, String)>,
}

pub fn validate_score(
    req: pb::ScoreRequest,
    limits: &RequestLimits,
) -> Result<ValidScore, ApiError> {
    if req.adapter.is_empty() {
        return Err(ApiError::invalid("adapter", "name the reward model"));
    }
    let adapter = adapter_ref("adapter", &req.adapter)?;
    if req.inputs.is_empty() || req.inputs.len() > MAX_CLASSIFY_INPUTS {
        return Err(ApiError::invalid(
            "inputs",
            format!(
                "{} inputs; give 1 to {MAX_CLASSIFY_INPUTS}",
                req.inputs.len()
            ),
        ));
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (i, input) in req.inputs.into_iter().enumerate() {
        let prefix = format!("inputs[{i}].");
        let (prompt, field) =
            text_or_messages(&prefix, ("prompt", input.prompt), input.messages, limits)?;
        if input.completion.trim().is_empty() {
            return Err(ApiError::invalid(
                format!("{prefix}completion"),
                "the completion to score is empty",
            ));
        }
        inputs.push((prompt, field, input.completion));
    }
    Ok(ValidScore { adapter, inputs })
}

fn validate_params(
    p: pb::SamplingParameters,
    limits: &RequestLimits,
) -> Result<SamplingParams, ApiError> {
    SamplingRequest {
        max_new_tokens: p.max_new_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k.map(i64::from),
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        stop: p.stop,
        seed: p.seed,
        logprobs: p.logprobs,
        top_logprobs: Some(p.top_logprobs),
    }
    .check(limits, |f| format!("parameters.{f}"))
}

/// Reads the client's `grpc-timeout` header ("<digits><unit>", unit one of H M S m u n).
pub fn deadline_from(meta: &tonic::metadata::MetadataMap, now: Instant) -> Option<Instant> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    now.checked_add(d)
}

impl From<crate::engine::FinishReason> for pb::FinishReason {
    fn from(r: crate::engine::FinishReason) -> Self {
        use crate::engine::FinishReason as F;
        match r {
            F::Length => Self::Length,
            F::Stop => Self::Stop,
            F::Eos => Self::Eos,
            F::Cancelled => Self::Cancelled,
        }
    }
}

impl From<crate::engine::Usage> for pb::Usage {
    fn from(u: crate::engine::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_prompt_tokens: u.cached_prompt_tokens,
            virtual_tokens: u.virtual_tokens,
        }
    }
}

impl From<crate::engine::Timings> for pb::Timings {
    fn from(t: crate::engine::Timings) -> Self {
        Self {
            queue_seconds: t.queue.as_secs_f64(),
            time_to_first_token_seconds: t.time_to_first_token.as_secs_f64(),
            total_seconds: t.total.as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(req: pb::GenerateRequest, field: &str) {
        match validate_generate(req, &RequestLimits::new(100)) {
            Err(ApiError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected INVALID_ARGUMENT on {field}, got {other:?}"),
        }
    }

    fn prompt(p: pb::SamplingParameters) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: "hi".into(),
            parameters: Some(p),
            ..Default::default()
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        check(pb::GenerateRequest::default(), "prompt");
        check(
            pb::GenerateRequest {
                prompt: "a".into(),
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: "b".into(),
                }],
                ..Default::default()
            },
            "prompt",
        );
        check(
            pb::GenerateRequest {
                messages: vec![pb::ChatMessage {
                    role: "wizard".into(),
                    content: "b".into(),
                }],
                ..Default::default()
            },
            "messages[0].role",
        );
        check(
            pb::GenerateRequest {
                raw_prompt: vec![0xff, 0xfe],
                ..Default::default()
            },
            "raw_prompt",
        );
        check(
            prompt(pb::SamplingParameters {
                max_new_tokens: Some(0),
                ..Default::default()
            }),
            "parameters.max_new_tokens",
        );
        check(
            prompt(pb::SamplingParameters {
                max_new_tokens: Some(101),
                ..Default::default()
            }),
            "parameters.max_new_tokens",
        );
        check(
            prompt(pb::SamplingParameters {
                temperature: Some(-0.1),
                ..Default::default()
            }),
            "parameters.temperature",
        );
        check(
            prompt(pb::SamplingParameters {
                top_p: Some(0.0),
                ..Default::default()
            }),
            "parameters.top_p",
        );
        check(
            prompt(pb::SamplingParameters {
                top_p: Some(1.5),
                ..Default::default()
            }),
            "parameters.top_p",
        );
        check(
            prompt(pb::SamplingParameters {
                top_k: Some(-1),
                ..Default::default()
            }),
            "parameters.top_k",
        );
        check(
            prompt(pb::SamplingParameters {
                repetition_penalty: Some(0.0),
                ..Default::default()
            }),
            "parameters.repetition_penalty",
        );
        check(
            prompt(pb::SamplingParameters {
                stop: vec!["x".into(); 9],
                ..Default::default()
            }),
            "parameters.stop",
        );
        check(
            prompt(pb::SamplingParameters {
                stop: vec!["".into()],
                ..Default::default()
            }),
            "parameters.stop[0]",
        );
        check(
            prompt(pb::SamplingParameters {
                stop: vec!["y".repeat(257)],
                ..Default::default()
            }),
            "parameters.stop[0]",
        );
    }

    #[test]
    fn defaults_fill_in() {
        let v = validate_generate(
            prompt(pb::SamplingParameters::default()),
            &RequestLimits::new(100),
        )
        .expect("valid");
        assert_eq!(v.params.max_new_tokens, 100);
        assert_eq!(v.params.temperature, 1.0);
        assert_eq!(v.input, PromptInput::Text("hi".into()));
    }

    #[test]
    fn grpc_timeout_parses() {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("grpc-timeout", "250m".parse().expect("ascii"));
        let now = Instant::now();
        assert_eq!(
            deadline_from(&m, now),
            Some(now + Duration::from_millis(250))
        );
    }
}
