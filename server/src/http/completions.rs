//! `POST /v1/chat/completions` and `POST /v1/completions`, unary and streamed (server-sent
//! events in OpenAI's chunk format, ending with `data: [DONE]`). Each of the `n` choices is
//! its own sequence in the engine's batch (seed + i), all admitted through
//! `api::generate::admit`; what goes back is built in `answers.rs`.

use std::time::Instant;

use axum::{
    body::Bytes,
    extract::State,
    response::{IntoResponse, Response},
};

use super::{
    answers::{chat_stream, chat_unary, completions_stream, completions_unary, Meta},
    error::HttpError,
    openai::{self as oa, Content, OneOrMany},
    parse, recorded, Auth, HttpState,
};
use crate::{
    adapters::AdapterRef,
    api::{
        error::ApiError,
        generate::{
            adapter_ref, admit, check_messages, Admitted, InputField, PromptInput, SamplingRequest,
            ValidRequest,
        },
        ready, Ready,
    },
    engine::{constraint::ConstraintSpec, SamplingParams},
    model::ChatMessage,
};

const CHAT: &str = "POST /v1/chat/completions";
const COMPLETIONS: &str = "POST /v1/completions";
/// Choices one request may ask for at most.
pub const MAX_N: u32 = 8;
/// Alternatives per position the legacy completions API allows at most.
const MAX_LEGACY_LOGPROBS: u32 = 5;

/// `model`: the base model (its name or an alias) or one of the tenant's adapters
/// (`name` or `name@version`, or a fully fine-tuned model's name).
pub fn model_ref(ready: &Ready, model: &str) -> Result<Option<AdapterRef>, HttpError> {
    if model.is_empty() {
        return Err(HttpError(ApiError::invalid(
            "model",
            "name the base model or one of your adapters",
        )));
    }
    let base = ready.engine.model();
    if model == base.name
        || ready
            .adapters
            .config()
            .base_aliases
            .iter()
            .any(|a| a == model)
    {
        return Ok(None);
    }
    Ok(Some(adapter_ref("model", model)?))
}

/// OpenAI's `response_format` as a constraint: `text` (none), `json_object`, or
/// `json_schema` with its `json_schema.schema`.
fn response_format(s: &oa::Sampling) -> Result<Option<(ConstraintSpec, String)>, HttpError> {
    let Some(f) = &s.response_format else {
        return Ok(None);
    };
    let bad = |field: &str, why: &str| HttpError(ApiError::invalid(field, why));
    match f.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some((ConstraintSpec::JsonObject, "response_format".into()))),
        Some("json_schema") => {
            let schema = f
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("response_format.json_schema.schema", "required"))?;
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad(
                    "response_format.json_schema.schema",
                    "a JSON Schema is an object",
                ));
            }
            Ok(Some((
                ConstraintSpec::JsonSchema(schema.clone()),
                "response_format.json_schema.schema".into(),
            )))
        }
        _ => Err(bad(
            "response_format.type",
            "expected text, json_object or json_schema",
        )),
    }
}

/// Refuses the OpenAI fields graft does not implement, naming them.
fn refuse_unsupported(s: &oa::Sampling) -> Result<(), HttpError> {
    let refuse = |field: &str, why: &str| Err(HttpError(ApiError::invalid(field, why)));
    if s.tools.is_some() || s.functions.is_some() {
        let f = if s.tools.is_some() {
            "tools"
        } else {
            "functions"
        };
        return refuse(f, "tool and function calling are not supported");
    }
    if s.logit_bias.is_some() {
        return refuse("logit_bias", "logit_bias is not supported");
    }
    Ok(())
}

/// The shared sampling checks, with the errors naming OpenAI's fields.
fn sampling(
    s: &oa::Sampling,
    max_tokens: (Option<u32>, &'static str),
    logprobs: bool,
    top_logprobs: Option<u32>,
    top_name: &'static str,
    st: &HttpState,
) -> Result<SamplingParams, HttpError> {
    SamplingRequest {
        max_new_tokens: max_tokens.0,
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        stop: s.stop.clone().map(OneOrMany::into_vec).unwrap_or_default(),
        // OpenAI's seed is a signed 64-bit integer; its bits seed the sampler.
        seed: s.seed.map(|v| v as u64),
        logprobs,
        top_logprobs,
    }
    .check(&st.limits, |f| {
        match f {
            "max_new_tokens" => max_tokens.1,
            "top_logprobs" => top_name,
            other => other,
        }
        .to_string()
    })
    .map_err(HttpError)
}

fn choices(n: Option<u32>) -> Result<u32, HttpError> {
    let n = n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(HttpError(ApiError::invalid(
            "n",
            format!("{n} is outside [1, {MAX_N}]"),
        )));
    }
    Ok(n)
}

/// OpenAI's chat messages as graft's: `developer` is the system role; content parts must
/// be text.
fn messages(msgs: Vec<oa::Message>, st: &HttpState) -> Result<Vec<ChatMessage>, HttpError> {
    if msgs.is_empty() {
        return Err(HttpError(ApiError::invalid(
            "messages",
            "give at least one message",
        )));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.into_iter().enumerate() {
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        ("text", None) => {
                            return Err(HttpError(ApiError::invalid(
                                format!("messages[{i}].content[{j}].text"),
                                "a text part needs its text",
                            )))
                        }
                        (kind, _) => {
                            return Err(HttpError(ApiError::invalid(
                                format!("messages[{i}].content[{j}].type"),
                                format!("{kind:?} parts are not supported; only text"),
                            )))
                        }
                    }
                }
                text
            }
        };
        out.push(ChatMessage { role, content });
    }
    Ok(check_messages("messages", out, &st.limits)?)
}

pub async fn chat(State(st): State<HttpState>, auth: Auth, body: Bytes) -> Response {
    let req = match parse::<oa::ChatRequest>(&body)
        .and_then(|r| Ok((r, parse::<oa::Sampling>(&body)?)))
    {
        Ok(r) => r,
        Err(e) => return recorded(CHAT, async { Err::<(), _>(e) }).await,
    };
    if req.1.stream {
        let started = Instant::now();
        match start_chat(&st, &auth, req).await {
            Ok((admitted, meta)) => chat_stream(admitted, meta, started).into_response(),
            Err(e) => {
                crate::api::observe(CHAT, e.0.code(), started);
                e.into_response()
            }
        }
    } else {
        recorded(CHAT, async {
            let (admitted, meta) = start_chat(&st, &auth, req).await?;
            chat_unary(admitted, meta).await
        })
        .await
    }
}

async fn start_chat(
    st: &HttpState,
    auth: &Auth,
    (req, sampled): (oa::ChatRequest, oa::Sampling),
) -> Result<(Vec<Admitted>, Meta), HttpError> {
    let ready = ready(&st.ready)?;
    refuse_unsupported(&sampled)?;
    let n = choices(sampled.n)?;
    let max_tokens = match req.max_completion_tokens {
        Some(m) => (Some(m), "max_completion_tokens"),
        None => (sampled.max_tokens, "max_tokens"),
    };
    let params = sampling(
        &sampled,
        max_tokens,
        req.logprobs,
        req.top_logprobs,
        "top_logprobs",
        st,
    )?;
    let adapter = model_ref(ready, &req.model)?;
    let input = PromptInput::Chat(messages(req.messages, st)?);
    let meta = Meta::new("chatcmpl", &req.model, req.logprobs, &sampled, n);
    let valid = ValidRequest {
        input,
        adapter,
        params,
        constraint: response_format(&sampled)?,
    };
    let admitted = admit(
        ready,
        &st.tenancy,
        &auth.tenant,
        valid,
        InputField("messages"),
        None,
        n,
    )
    .await
    .map_err(|e| HttpError::renamed(e, "adapter", "model"))?;
    Ok((admitted, meta))
}

pub async fn completions(State(st): State<HttpState>, auth: Auth, body: Bytes) -> Response {
    let req = match parse::<oa::CompletionRequest>(&body)
        .and_then(|r| Ok((r, parse::<oa::Sampling>(&body)?)))
    {
        Ok(r) => r,
        Err(e) => return recorded(COMPLETIONS, async { Err::<(), _>(e) }).await,
    };
    if req.1.stream {
        let started = Instant::now();
        match start_completions(&st, &auth, req).await {
            Ok((admitted, meta)) => completions_stream(admitted, meta, started).into_response(),
            Err(e) => {
                crate::api::observe(COMPLETIONS, e.0.code(), started);
                e.into_response()
            }
        }
    } else {
        recorded(COMPLETIONS, async {
            let (admitted, meta) = start_completions(&st, &auth, req).await?;
            completions_unary(admitted, meta).await
        })
        .await
    }
}

/// The prompts of a completions request: a string or a list of strings.
fn prompts(p: Option<serde_json::Value>) -> Result<Vec<String>, HttpError> {
    let bad = |why: &str| HttpError(ApiError::invalid("prompt", why));
    let list = match p {
        None => return Err(bad("give a prompt")),
        Some(serde_json::Value::String(s)) => vec![s],
        Some(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Ok(s),
                _ => Err(bad(
                    "a list of strings is supported; token-id prompts are not",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("a string or a list of strings")),
    };
    if list.is_empty() || list.len() > MAX_N as usize {
        return Err(bad(&format!("{} prompts; give 1 to {MAX_N}", list.len())));
    }
    Ok(list)
}

async fn start_completions(
    st: &HttpState,
    auth: &Auth,
    (req, sampled): (oa::CompletionRequest, oa::Sampling),
) -> Result<(Vec<Admitted>, Meta), HttpError> {
    let ready = ready(&st.ready)?;
    refuse_unsupported(&sampled)?;
    let n = choices(sampled.n)?;
    if req.echo {
        return Err(HttpError(ApiError::invalid(
            "echo",
            "echo is not supported",
        )));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_null() && s != "") {
        return Err(HttpError(ApiError::invalid(
            "suffix",
            "suffix (fill in the middle) is not supported",
        )));
    }
    if req.best_of.is_some_and(|b| b != n) {
        return Err(HttpError(ApiError::invalid(
            "best_of",
            "best_of other than n is not supported",
        )));
    }
    if let Some(k) = req.logprobs.filter(|k| *k > MAX_LEGACY_LOGPROBS) {
        return Err(HttpError(ApiError::invalid(
            "logprobs",
            format!("{k} is outside [0, {MAX_LEGACY_LOGPROBS}]"),
        )));
    }
    let params = sampling(
        &sampled,
        (sampled.max_tokens, "max_tokens"),
        req.logprobs.is_some(),
        req.logprobs,
        "logprobs",
        st,
    )?;
    let adapter = model_ref(ready, &req.model)?;
    let texts = prompts(req.prompt)?;
    let constraint = response_format(&sampled)?;
    let count = texts.len() as u32;
    let meta = Meta::new("cmpl", &req.model, req.logprobs.is_some(), &sampled, n);
    let mut admitted = Vec::new();
    for (i, text) in texts.into_iter().enumerate() {
        let field = if count == 1 {
            "prompt".to_string()
        } else {
            format!("prompt[{i}]")
        };
        let valid = ValidRequest {
            input: PromptInput::Text(text),
            adapter: adapter.clone(),
            params: params.clone(),
            constraint: constraint.clone(),
        };
        admitted.extend(
            admit(
                ready,
                &st.tenancy,
                &auth.tenant,
                valid,
                InputField(&field),
                None,
                n,
            )
            .await
            .map_err(|e| HttpError::renamed(e, "adapter", "model"))?,
        );
    }
    Ok((admitted, meta))
}
