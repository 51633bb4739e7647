//! Preference rows: a prompt with a preferred and a rejected completion, in the two shapes
//! the ecosystem writes them:
//! - TRL's: `{"prompt", "chosen", "rejected"}`, plain strings, or conversational (`prompt`
//!   a list of chat messages, `chosen`/`rejected` lists of assistant messages), with an
//!   optional numeric `margin`;
//! - OpenAI's DPO files: `{"input": {"messages": [...]}, "preferred_output": [...],
//!   "non_preferred_output": [...]}`.
//!
//! Each row becomes an [`Example`] whose segments are the rendered prompt and the chosen
//! completion, with the rejected completion beside it. Datasets of this format are stored
//! and listed like any other; training on them needs the preference objectives (reward
//! models, DPO), so a job with another objective refuses them.

use serde_json::Value;

use super::dataset::{tokenize_one, Example, Overflow, RenderChat};
use crate::model::{ChatMessage, TextTokenizer};

type Bad = (&'static str, String);

/// Whether a row looks like a preference row (by its keys).
pub fn is_preference(obj: &serde_json::Map<String, Value>) -> bool {
    [
        "chosen",
        "rejected",
        "preferred_output",
        "non_preferred_output",
    ]
    .iter()
    .any(|k| obj.contains_key(*k))
}

/// Chat messages of `field`: a list of `{"role", "content"}` with known roles.
fn messages(v: &Value, field: &str) -> Result<Vec<ChatMessage>, Bad> {
    let arr = v.as_array().ok_or_else(|| {
        (
            "wrong type",
            format!("{field:?} must be a string or a list of messages"),
        )
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            if !["system", "user", "assistant"].contains(&role) {
                return Err((
                    "unknown role",
                    format!("{field}[{i}].role is {role:?}; expected system, user or assistant"),
                ));
            }
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| ("missing field", format!("{field}[{i}].content")))?;
            Ok(ChatMessage {
                role: role.into(),
                content: content.into(),
            })
        })
        .collect()
}

/// A completion: a string, or assistant messages (their contents joined).
fn completion(v: Option<&Value>, field: &str) -> Result<String, Bad> {
    let v = v.ok_or_else(|| ("missing field", format!("{field:?} is required")))?;
    let text = match v {
        Value::String(s) => s.clone(),
        other => {
            let msgs = messages(other, field)?;
            if let Some((i, m)) = msgs.iter().enumerate().find(|(_, m)| m.role != "assistant") {
                return Err((
                    "unknown role",
                    format!(
                        "{field}[{i}].role is {:?}; a completion is the assistant's",
                        m.role
                    ),
                ));
            }
            msgs.into_iter().map(|m| m.content).collect()
        }
    };
    if text.trim().is_empty() {
        return Err(("empty output", format!("{field:?} is empty")));
    }
    Ok(text)
}

/// One preference row as an example: the prompt (rendered with the chat template when it
/// is messages), the chosen completion trained, and the rejected one beside it.
pub fn example(
    obj: &serde_json::Map<String, Value>,
    render: RenderChat<'_>,
) -> Result<Example, Bad> {
    let openai = obj.contains_key("preferred_output") || obj.contains_key("non_preferred_output");
    let (prompt_field, chosen_field, rejected_field) = if openai {
        ("input", "preferred_output", "non_preferred_output")
    } else {
        ("prompt", "chosen", "rejected")
    };
    let prompt = match obj.get(prompt_field) {
        None => return Err(("missing field", format!("{prompt_field:?} is required"))),
        Some(Value::String(s)) if !openai => render_prompt(&[user(s)], render)?,
        Some(Value::Object(o)) if openai => {
            let m = o.get("messages").ok_or_else(|| {
                (
                    "missing field",
                    "\"input.messages\" is required".to_string(),
                )
            })?;
            render_prompt(&messages(m, "input.messages")?, render)?
        }
        Some(v @ Value::Array(_)) if !openai => render_prompt(&messages(v, "prompt")?, render)?,
        Some(_) => {
            let want = if openai {
                "an object with \"messages\""
            } else {
                "a string or a list of messages"
            };
            return Err(("wrong type", format!("{prompt_field:?} must be {want}")));
        }
    };
    let chosen = completion(obj.get(chosen_field), chosen_field)?;
    let rejected = completion(obj.get(rejected_field), rejected_field)?;
    if chosen == rejected {
        return Err((
            "same completions",
            format!("{chosen_field:?} and {rejected_field:?} are the same text"),
        ));
    }
    let margin = match obj.get("margin") {
        None | Some(Value::Null) => 0.0,
        Some(m) => m
            .as_f64()
            .filter(|m| m.is_finite())
            .ok_or(("wrong type", "\"margin\" must be a number".to_string()))?,
    };
    Ok(Example {
        segments: vec![(prompt, false), (chosen, true)],
        line: 0,
        label: None,
        rejected: Some(rejected),
        margin,
        fields: None,
    })
}

/// The ids a reward model reads for `prompt` (messages) and `completion`: a preference
/// row's side as training tokenises it (the rendered prompt with its generation prompt,
/// the completion, EOS), refused past `max_len` tokens. The error is the reason.
pub fn scored_ids(
    prompt: &[ChatMessage],
    completion: &str,
    render: RenderChat<'_>,
    tk: &TextTokenizer,
    max_len: usize,
) -> Result<Vec<u32>, String> {
    let prompt = render_prompt(prompt, render).map_err(|(_, e)| e)?;
    let e = Example {
        segments: vec![(prompt, false), (completion.to_string(), true)],
        line: 0,
        label: None,
        rejected: None,
        margin: 0.0,
        fields: None,
    };
    let t = tokenize_one(&e, tk, max_len, Overflow::Reject).map_err(|p| p.detail)?;
    Ok(t.tokens.ids)
}

/// A prompt row for online RL: `prompt` (a string, as one user message, or messages) or
/// `messages`, rendered with the generation prompt; every other field is kept for the
/// graders.
pub fn prompt_row(
    obj: &serde_json::Map<String, Value>,
    render: RenderChat<'_>,
) -> Result<Example, Bad> {
    let (key, msgs) = match (obj.get("prompt"), obj.get("messages")) {
        (Some(Value::String(s)), None) => ("prompt", vec![user(s)]),
        (Some(v @ Value::Array(_)), None) => ("prompt", messages(v, "prompt")?),
        (None, Some(v)) => ("messages", messages(v, "messages")?),
        (Some(_), Some(_)) => {
            return Err((
                "mixed formats",
                "give \"prompt\" or \"messages\", not both".into(),
            ))
        }
        (Some(_), None) => {
            return Err((
                "wrong type",
                "\"prompt\" must be a string or a list of messages".into(),
            ))
        }
        (None, None) => {
            return Err((
                "missing field",
                "\"prompt\" or \"messages\" is required".into(),
            ))
        }
    };
    if msgs.iter().all(|m| m.content.trim().is_empty()) {
        return Err(("empty prompt", format!("{key:?} is empty")));
    }
    let prompt = render_prompt(&msgs, render)?;
    let mut fields = obj.clone();
    fields.remove(key);
    Ok(Example {
        segments: vec![(prompt, false)],
        line: 0,
        label: None,
        rejected: None,
        margin: 0.0,
        fields: Some(fields),
    })
}

/// A plain-text prompt as the chat it stands for: one user message.
pub fn user(s: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: s.into(),
    }
}

/// The prompt as the model sees it before the assistant's answer.
fn render_prompt(msgs: &[ChatMessage], render: RenderChat<'_>) -> Result<String, Bad> {
    if msgs.is_empty() {
        return Err(("missing field", "the prompt has no messages".into()));
    }
    render(msgs, true).map_err(|e| ("template", e.to_string()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn render(m: &[ChatMessage], gen: bool) -> Result<String, crate::model::ModelError> {
        let mut s: String = m
            .iter()
            .map(|m| format!("<{}>{}</>", m.role, m.content))
            .collect();
        if gen {
            s.push_str("<assistant>");
        }
        Ok(s)
    }

    fn parse(v: Value) -> Result<Example, Bad> {
        example(v.as_object().expect("object"), &render)
    }

    #[test]
    fn trl_and_openai_rows_become_prompt_chosen_and_rejected() {
        let plain =
            parse(json!({"prompt": "2+2?", "chosen": "4", "rejected": "Five.", "margin": 1.5}))
                .expect("plain");
        assert_eq!(
            plain.segments,
            vec![
                ("<user>2+2?</><assistant>".to_string(), false),
                ("4".to_string(), true)
            ]
        );
        assert_eq!(plain.rejected.as_deref(), Some("Five."));
        assert_eq!(plain.margin, 1.5);
        let conv = parse(json!({
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "It is four."}],
        }))
        .expect("conversational");
        assert!(conv.segments[0].0.starts_with("<system>Be brief.</>"));
        let openai = parse(json!({
            "input": {"messages": [{"role": "user", "content": "2+2?"}]},
            "preferred_output": [{"role": "assistant", "content": "4"}],
            "non_preferred_output": [{"role": "assistant", "content": "It is four."}],
        }))
        .expect("openai");
        assert_eq!(openai.segments, plain.segments);
        assert_eq!(openai.rejected.as_deref(), Some("It is four."));
    }

    #[test]
    fn bad_rows_are_named() {
        let kind = |v: Value| parse(v).expect_err("refused").0;
        assert_eq!(kind(json!({"prompt": "q", "chosen": "a"})), "missing field");
        assert_eq!(
            kind(json!({"prompt": "q", "chosen": "a", "rejected": " "})),
            "empty output"
        );
        assert_eq!(
            kind(json!({"prompt": "q", "chosen": "a", "rejected": "a"})),
            "same completions"
        );
        assert_eq!(
            kind(json!({"prompt": 3, "chosen": "a", "rejected": "b"})),
            "wrong type"
        );
        assert_eq!(
            kind(json!({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "x"})),
            "wrong type"
        );
        assert_eq!(
            kind(
                json!({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"})
            ),
            "unknown role"
        );
        assert_eq!(
            kind(json!({"input": {}, "preferred_output": [], "non_preferred_output": []})),
            "missing field"
        );
        assert_eq!(
            kind(
                json!({"input": {"messages": [{"role": "user", "content": "q"}]},
                        "preferred_output": [{"role": "assistant", "content": "a"}]})
            ),
            "missing field"
        );
    }
}
