//! `POST /v1/chat/completions` and `POST /v1/completions`, unary and streamed (server-sent
//! events in OpenAI's chunk format, ending with `data: [DONE]`). Each of the `n` choices is
//! its own sequence in the engine's batch (seed + i), all admitted through
//! `api::generate::admit`.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Bytes,
    extract::State,
    response::{
        sse::{Event, Sse},
        IntoResponse, Response,
    },
    Json,
};
use futures::{stream, Stream, StreamExt};

use super::{
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
        ready, Ready, StreamRecord,
    },
    engine::{FinishReason, SamplingParams, StreamEvent, Usage},
    model::{BaseModel, ChatMessage},
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
    match &s.response_format {
        None => {}
        Some(v) if v.get("type").and_then(|t| t.as_str()) == Some("text") => {}
        Some(_) => {
            return refuse(
                "response_format",
                "structured output (json_object, json_schema) is not supported yet; only {\"type\": \"text\"}",
            )
        }
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

/// What a response repeats of its request.
#[derive(Debug, Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
    /// Choices per prompt.
    n: u32,
}

impl Meta {
    fn new(prefix: &str, model: &str, logprobs: bool, s: &oa::Sampling, n: u32) -> Self {
        Self {
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_string(),
            logprobs,
            include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
            n,
        }
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

/// One choice, read to its end.
struct Finished {
    text: String,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<Vec<(u32, f32)>>,
    reason: FinishReason,
    usage: Usage,
}

async fn read_choice(mut a: Admitted) -> Result<Finished, ApiError> {
    let mut out = Finished {
        text: String::new(),
        ids: Vec::new(),
        logprobs: Vec::new(),
        top: Vec::new(),
        reason: FinishReason::Stop,
        usage: Usage::default(),
    };
    while let Some(ev) = a.events.recv().await {
        match ev {
            StreamEvent::Tokens {
                text,
                ids,
                logprobs,
                top_logprobs,
            } => {
                a.permit.charge(ids.len());
                out.text.push_str(&text);
                out.ids.extend(ids);
                out.logprobs.extend(logprobs);
                out.top.extend(top_logprobs);
            }
            StreamEvent::Finished { reason, usage, .. } => {
                out.reason = reason;
                out.usage = usage;
                return Ok(out);
            }
            StreamEvent::DeadlineExceeded => return Err(ApiError::DeadlineExceeded),
            StreamEvent::Failed(e) => return Err(ApiError::Internal(e)),
            StreamEvent::Classified { .. } => {
                return Err(ApiError::Internal(
                    "the engine classified a generation request".into(),
                ))
            }
        }
    }
    Err(ApiError::Internal("the engine stopped".into()))
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Eos | FinishReason::Cancelled => "stop",
    }
}

/// The usage of a request from each choice's `(index, usage)`: the choices of one prompt
/// (indexes `p * n .. (p + 1) * n`) share it, so its tokens are counted once, from the
/// prompt's first choice, as OpenAI counts them.
fn usage(all: &[(u32, Usage)], n: u32) -> oa::Usage {
    let firsts = all
        .iter()
        .filter(|(i, _)| i % n.max(1) == 0)
        .map(|(_, u)| u);
    let (prompt_tokens, cached_tokens) = firsts.fold((0, 0), |(p, c), u| {
        (p + u.prompt_tokens, c + u.cached_prompt_tokens)
    });
    let completion_tokens: u32 = all.iter().map(|(_, u)| u.completion_tokens).sum();
    oa::Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: oa::PromptTokensDetails { cached_tokens },
    }
}

/// The visible text of one token (special tokens are empty).
fn token_text(model: &BaseModel, id: u32) -> String {
    model.tokenizer.decode(&[id]).unwrap_or_default()
}

/// Per reported token, its entry in a chat choice's `logprobs.content`. The end-of-sequence
/// token, which OpenAI does not report, is left out.
fn chat_logprobs(
    model: &BaseModel,
    ids: &[u32],
    logprobs: &[f32],
    top: &[Vec<(u32, f32)>],
) -> oa::ChatLogprobs {
    let content = ids
        .iter()
        .zip(logprobs)
        .enumerate()
        .filter(|(_, (id, _))| !model.tokenizer.is_eos(**id))
        .map(|(i, (&id, &logprob))| {
            let token = token_text(model, id);
            oa::TokenLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob,
                top_logprobs: top
                    .get(i)
                    .map(|alts| {
                        alts.iter()
                            .map(|&(id, logprob)| {
                                let token = token_text(model, id);
                                oa::TopLogprob {
                                    bytes: token.as_bytes().to_vec(),
                                    token,
                                    logprob,
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    oa::ChatLogprobs {
        content,
        refusal: None,
    }
}

async fn chat_unary(
    admitted: Vec<Admitted>,
    meta: Meta,
) -> Result<Json<oa::ChatCompletion>, HttpError> {
    let model = admitted.first().map(|a| a.model.clone());
    let done = futures::future::join_all(admitted.into_iter().map(read_choice)).await;
    let mut choices = Vec::with_capacity(done.len());
    let mut usages = Vec::with_capacity(done.len());
    for (i, f) in done.into_iter().enumerate() {
        let f = f?;
        let logprobs = match (&model, meta.logprobs) {
            (Some(m), true) => Some(chat_logprobs(m, &f.ids, &f.logprobs, &f.top)),
            _ => None,
        };
        usages.push((i as u32, f.usage));
        choices.push(oa::ChatChoice {
            index: i as u32,
            message: oa::AssistantMessage {
                role: "assistant",
                content: f.text,
                refusal: None,
            },
            logprobs,
            finish_reason: finish_reason(f.reason),
        });
    }
    Ok(Json(oa::ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices,
        usage: usage(&usages, meta.n),
        system_fingerprint: None,
    }))
}

/// What one choice's stream yields: a chunk's choice, or its end with its usage.
enum Part {
    Choice(oa::ChunkChoice),
    Completion(oa::CompletionChoice),
    /// Choice `index` ended with this usage.
    End(u32, Usage),
}

/// One choice's engine events as stream parts, in order; ends after its final event.
/// `convert` turns a token event into the route's part.
fn choice_parts(
    a: Admitted,
    convert: impl Fn(&BaseModel, String, Vec<u32>, Vec<f32>, Vec<Vec<(u32, f32)>>) -> Option<Part>
        + Send
        + 'static,
    index: u32,
    end: impl Fn(FinishReason) -> Part + Send + 'static,
) -> impl Stream<Item = Result<Part, ApiError>> + Send {
    stream::unfold(Some((a, convert, end)), move |state| async move {
        let (mut a, convert, end) = state?;
        let fail = |e| Some((stream::iter(vec![Err(e)]), None));
        loop {
            match a.events.recv().await {
                Some(StreamEvent::Tokens {
                    text,
                    ids,
                    logprobs,
                    top_logprobs,
                }) => {
                    a.permit.charge(ids.len());
                    if let Some(p) = convert(&a.model, text, ids, logprobs, top_logprobs) {
                        return Some((stream::iter(vec![Ok(p)]), Some((a, convert, end))));
                    }
                }
                Some(StreamEvent::Finished { reason, usage, .. }) => {
                    let last = vec![Ok(end(reason)), Ok(Part::End(index, usage))];
                    return Some((stream::iter(last), None));
                }
                Some(StreamEvent::DeadlineExceeded) => return fail(ApiError::DeadlineExceeded),
                Some(StreamEvent::Failed(e)) => return fail(ApiError::Internal(e)),
                Some(StreamEvent::Classified { .. }) | None => {
                    return fail(ApiError::Internal("the engine stopped".into()))
                }
            }
        }
    })
    .flatten()
}

/// Server-sent events of a streamed answer: the route's chunks of every choice as they come
/// (choices interleaved), then the usage chunk when asked for, then `[DONE]`; if a choice
/// fails, an error object and nothing after it. Records the route in the metrics when the
/// stream ends (CANCELLED if the client leaves first).
fn sse(
    route: &'static str,
    parts: impl Stream<Item = Result<Part, ApiError>> + Send + 'static,
    chunk: impl Fn(Part) -> serde_json::Value + Send + 'static,
    usage_chunk: impl Fn(oa::Usage) -> serde_json::Value + Send + 'static,
    meta: &Meta,
    started: Instant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    struct State<P, C, U> {
        parts: P,
        chunk: C,
        usage_chunk: U,
        usages: Vec<(u32, Usage)>,
        include_usage: bool,
        n: u32,
        rec: StreamRecord,
    }
    let state = State {
        parts: Box::pin(parts),
        chunk,
        usage_chunk,
        usages: Vec::new(),
        include_usage: meta.include_usage,
        n: meta.n,
        rec: StreamRecord::new(route, started),
    };
    let json = |v: serde_json::Value| Event::default().data(v.to_string());
    let events = stream::unfold(Some(state), move |st| async move {
        let mut st = st?;
        loop {
            match st.parts.next().await {
                Some(Ok(Part::End(index, u))) => st.usages.push((index, u)),
                Some(Ok(p)) => {
                    let ev = json((st.chunk)(p));
                    return Some((vec![ev], Some(st)));
                }
                Some(Err(e)) => {
                    st.rec.end(e.code());
                    let body = serde_json::json!({ "error": {
                        "message": e.to_string(), "type": "server_error",
                        "param": null, "code": null,
                    }});
                    return Some((vec![json(body)], None));
                }
                None => {
                    let mut out = Vec::new();
                    if st.include_usage {
                        out.push(json((st.usage_chunk)(usage(&st.usages, st.n))));
                    }
                    out.push(Event::default().data("[DONE]"));
                    st.rec.end(tonic::Code::Ok);
                    return Some((out, None));
                }
            }
        }
    })
    .flat_map(|evs| stream::iter(evs.into_iter().map(Ok)));
    Sse::new(events)
}

fn chat_stream(
    admitted: Vec<Admitted>,
    meta: Meta,
    started: Instant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let logprobs = meta.logprobs;
    let heads: Vec<_> = (0..admitted.len() as u32)
        .map(|index| {
            Ok(Part::Choice(oa::ChunkChoice {
                index,
                delta: oa::Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            }))
        })
        .collect();
    let streams = admitted.into_iter().enumerate().map(move |(i, a)| {
        let index = i as u32;
        choice_parts(
            a,
            move |model, text, ids, lps, top| {
                if text.is_empty() && !logprobs {
                    return None;
                }
                Some(Part::Choice(oa::ChunkChoice {
                    index,
                    delta: oa::Delta {
                        role: None,
                        content: Some(text),
                    },
                    logprobs: logprobs.then(|| chat_logprobs(model, &ids, &lps, &top)),
                    finish_reason: None,
                }))
            },
            index,
            move |reason| {
                Part::Choice(oa::ChunkChoice {
                    index,
                    delta: oa::Delta::default(),
                    logprobs: None,
                    finish_reason: Some(finish_reason(reason)),
                })
            },
        )
        .boxed()
    });
    let parts = stream::iter(heads).chain(stream::select_all(streams));
    let (m1, m2) = (meta.clone(), meta.clone());
    sse(
        CHAT,
        parts,
        move |p| {
            let choices = match p {
                Part::Choice(c) => vec![c],
                _ => vec![],
            };
            serde_json::to_value(oa::ChatChunk {
                id: m1.id.clone(),
                object: "chat.completion.chunk",
                created: m1.created,
                model: m1.model.clone(),
                choices,
                usage: m1.include_usage.then_some(None),
                system_fingerprint: None,
            })
            .unwrap_or_default()
        },
        move |u| {
            serde_json::to_value(oa::ChatChunk {
                id: m2.id.clone(),
                object: "chat.completion.chunk",
                created: m2.created,
                model: m2.model.clone(),
                choices: vec![],
                usage: Some(Some(u)),
                system_fingerprint: None,
            })
            .unwrap_or_default()
        },
        &meta,
        started,
    )
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

/// The legacy API's log-probabilities of one choice's tokens, offsets counted from
/// `offset` (bytes of the text before them).
fn legacy_logprobs(
    model: &BaseModel,
    ids: &[u32],
    logprobs: &[f32],
    top: &[Vec<(u32, f32)>],
    mut offset: u32,
) -> oa::CompletionLogprobs {
    let mut out = oa::CompletionLogprobs::default();
    for (i, (&id, &lp)) in ids.iter().zip(logprobs).enumerate() {
        if model.tokenizer.is_eos(id) {
            continue;
        }
        let token = token_text(model, id);
        out.text_offset.push(offset);
        offset += token.len() as u32;
        out.tokens.push(token);
        out.token_logprobs.push(lp);
        out.top_logprobs.push(
            top.get(i)
                .into_iter()
                .flatten()
                .map(|&(id, lp)| (token_text(model, id), serde_json::json!(lp)))
                .collect(),
        );
    }
    out
}

async fn completions_unary(
    admitted: Vec<Admitted>,
    meta: Meta,
) -> Result<Json<oa::Completion>, HttpError> {
    let model = admitted.first().map(|a| a.model.clone());
    let done = futures::future::join_all(admitted.into_iter().map(read_choice)).await;
    let mut choices = Vec::with_capacity(done.len());
    let mut usages = Vec::with_capacity(done.len());
    for (i, f) in done.into_iter().enumerate() {
        let f = f?;
        let logprobs = match (&model, meta.logprobs) {
            (Some(m), true) => Some(legacy_logprobs(m, &f.ids, &f.logprobs, &f.top, 0)),
            _ => None,
        };
        usages.push((i as u32, f.usage));
        choices.push(oa::CompletionChoice {
            index: i as u32,
            text: f.text,
            logprobs,
            finish_reason: Some(finish_reason(f.reason)),
        });
    }
    Ok(Json(oa::Completion {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        choices,
        usage: Some(Some(usage(&usages, meta.n))),
        system_fingerprint: None,
    }))
}

fn completions_stream(
    admitted: Vec<Admitted>,
    meta: Meta,
    started: Instant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let logprobs = meta.logprobs;
    let streams = admitted.into_iter().enumerate().map(move |(i, a)| {
        let index = i as u32;
        let offset = Arc::new(Mutex::new(0u32));
        choice_parts(
            a,
            move |model, text, ids, lps, top| {
                if text.is_empty() && !logprobs {
                    return None;
                }
                let mut at = offset.lock().unwrap_or_else(|p| p.into_inner());
                let lp = logprobs.then(|| legacy_logprobs(model, &ids, &lps, &top, *at));
                *at += text.len() as u32;
                Some(Part::Completion(oa::CompletionChoice {
                    index,
                    text,
                    logprobs: lp,
                    finish_reason: None,
                }))
            },
            index,
            move |reason| {
                Part::Completion(oa::CompletionChoice {
                    index,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(finish_reason(reason)),
                })
            },
        )
        .boxed()
    });
    let (m1, m2) = (meta.clone(), meta.clone());
    sse(
        COMPLETIONS,
        stream::select_all(streams),
        move |p| {
            let choices = match p {
                Part::Completion(c) => vec![c],
                _ => vec![],
            };
            serde_json::to_value(oa::Completion {
                id: m1.id.clone(),
                object: "text_completion",
                created: m1.created,
                model: m1.model.clone(),
                choices,
                usage: m1.include_usage.then_some(None),
                system_fingerprint: None,
            })
            .unwrap_or_default()
        },
        move |u| {
            serde_json::to_value(oa::Completion {
                id: m2.id.clone(),
                object: "text_completion",
                created: m2.created,
                model: m2.model.clone(),
                choices: vec![],
                usage: Some(Some(u)),
                system_fingerprint: None,
            })
            .unwrap_or_default()
        },
        &meta,
        started,
    )
}
