//! What goes back to the client of the inference routes: each choice read to its end for a
//! unary answer, or its events as server-sent chunks (OpenAI's chunk format, choices
//! interleaved, an optional usage chunk, then `data: [DONE]`); usage, finish reasons and
//! log-probabilities in OpenAI's shapes for both.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    response::sse::{Event, Sse},
    Json,
};
use futures::{stream, Stream, StreamExt};

use super::{error::HttpError, openai as oa};
use crate::{
    api::{error::ApiError, generate::Admitted, StreamRecord},
    engine::{FinishReason, StreamEvent, Usage},
    model::BaseModel,
};

const CHAT: &str = "POST /v1/chat/completions";
const COMPLETIONS: &str = "POST /v1/completions";

/// What a response repeats of its request.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) logprobs: bool,
    pub(super) include_usage: bool,
    /// Choices per prompt.
    pub(super) n: u32,
}

impl Meta {
    pub(super) fn new(prefix: &str, model: &str, logprobs: bool, s: &oa::Sampling, n: u32) -> Self {
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

pub(super) fn finish_reason(r: FinishReason) -> &'static str {
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

pub(super) async fn chat_unary(
    admitted: Vec<Admitted>,
    meta: Meta,
) -> Result<Json<oa::ChatCompletion>, HttpError> {
    let model = admitted.first().map(|a| a.model.clone());
    let done = futures::future::join_all(admitted.into_iter().map(Admitted::complete)).await;
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
    object: &'static str,
    parts: impl Stream<Item = Result<Part, ApiError>> + Send + 'static,
    meta: Meta,
    started: Instant,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    struct State<P> {
        parts: P,
        meta: Meta,
        usages: Vec<(u32, Usage)>,
        rec: StreamRecord,
    }
    // One chunk: the route's envelope around `choices`; `usage` is null on every chunk but
    // the last when usage was asked for, and absent otherwise.
    let envelope = move |meta: &Meta, choices: serde_json::Value, usage: Option<oa::Usage>| {
        let mut v = serde_json::json!({
            "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
            "choices": choices, "system_fingerprint": null,
        });
        if meta.include_usage {
            v["usage"] = serde_json::to_value(usage).unwrap_or_default();
        }
        v
    };
    let state = State {
        parts: Box::pin(parts),
        meta,
        usages: Vec::new(),
        rec: StreamRecord::new(route, started),
    };
    let json = |v: serde_json::Value| Event::default().data(v.to_string());
    let events = stream::unfold(Some(state), move |st| async move {
        let mut st = st?;
        loop {
            match st.parts.next().await {
                Some(Ok(Part::End(index, u))) => st.usages.push((index, u)),
                Some(Ok(p)) => {
                    let choice = match p {
                        Part::Choice(c) => serde_json::to_value(c),
                        Part::Completion(c) => serde_json::to_value(c),
                        Part::End(..) => continue,
                    };
                    let choices = serde_json::json!([choice.unwrap_or_default()]);
                    let ev = json(envelope(&st.meta, choices, None));
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
                    if st.meta.include_usage {
                        let u = usage(&st.usages, st.meta.n);
                        out.push(json(envelope(&st.meta, serde_json::json!([]), Some(u))));
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

pub(super) fn chat_stream(
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
    sse(CHAT, "chat.completion.chunk", parts, meta, started)
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

pub(super) async fn completions_unary(
    admitted: Vec<Admitted>,
    meta: Meta,
) -> Result<Json<oa::Completion>, HttpError> {
    let model = admitted.first().map(|a| a.model.clone());
    let done = futures::future::join_all(admitted.into_iter().map(Admitted::complete)).await;
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
        usage: usage(&usages, meta.n),
        system_fingerprint: None,
    }))
}

pub(super) fn completions_stream(
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
    sse(
        COMPLETIONS,
        "text_completion",
        stream::select_all(streams),
        meta,
        started,
    )
}
