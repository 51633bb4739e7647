//! Training datasets: JSONL in the ecosystem's formats, validated line by line, turned into
//! token ids with a loss mask.
//! Formats (detected per line, or forced): Alpaca (`instruction`, `input`, `output`,
//! optional `system`, `history`), chat (`messages` with system/user/assistant and an optional
//! per-message `weight` 0/1), `prompt`/`completion`, and plain `text`.
//! Invariant: a dataset that validates yields only examples with at least one trained token.

use serde_json::Value;

use crate::model::{ChatMessage, ModelError, TextTokenizer};

/// A dataset format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Alpaca,
    Chat,
    PromptCompletion,
    Text,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Chat => "chat",
            Format::PromptCompletion => "prompt_completion",
            Format::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "alpaca" => Some(Self::Alpaca),
            "chat" | "messages" => Some(Self::Chat),
            "prompt_completion" | "prompt-completion" => Some(Self::PromptCompletion),
            "text" => Some(Self::Text),
            _ => None,
        }
    }

    fn detect(v: &serde_json::Map<String, Value>) -> Option<Self> {
        if v.contains_key("messages") {
            Some(Self::Chat)
        } else if v.contains_key("instruction") || v.contains_key("output") {
            Some(Self::Alpaca)
        } else if v.contains_key("prompt") || v.contains_key("completion") {
            Some(Self::PromptCompletion)
        } else if v.contains_key("text") {
            Some(Self::Text)
        } else {
            None
        }
    }
}

/// Renders chat messages into prompt text (the model's chat template).
pub type RenderChat<'a> = &'a dyn Fn(&[ChatMessage], bool) -> Result<String, ModelError>;

/// One problem, with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub kind: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.kind, self.detail)
    }
}

/// A training example: segments of text, each trained on or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub segments: Vec<(String, bool)>,
}

/// A tokenised example: ids and, per id, whether its prediction is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    /// `mask[i]`: the loss includes predicting `ids[i]` from `ids[..i]`.
    pub mask: Vec<bool>,
}

/// What to do with an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Truncate,
    Reject,
}

/// Counts after tokenisation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub examples: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub truncated: usize,
}

const MAX_PROBLEMS: usize = 10;

fn text_of(obj: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(|v| v.as_str()).map(str::to_string)
}

/// Parses one JSON object into an example (chat-templated with `chat`).
fn example_of(
    obj: &serde_json::Map<String, Value>,
    format: Format,
    render: RenderChat<'_>,
) -> Result<Example, (&'static str, String)> {
    let missing = |k: &str| {
        (
            "missing field",
            format!("{k:?} is required for the {} format", format.name()),
        )
    };
    match format {
        Format::Text => {
            let t = text_of(obj, "text").ok_or_else(|| missing("text"))?;
            if t.trim().is_empty() {
                return Err(("empty output", "\"text\" is empty".into()));
            }
            Ok(Example {
                segments: vec![(t, true)],
            })
        }
        Format::PromptCompletion => {
            let p = text_of(obj, "prompt").ok_or_else(|| missing("prompt"))?;
            let c = text_of(obj, "completion").ok_or_else(|| missing("completion"))?;
            if c.trim().is_empty() {
                return Err(("empty output", "\"completion\" is empty".into()));
            }
            Ok(Example {
                segments: vec![(p, false), (c, true)],
            })
        }
        Format::Alpaca => {
            let ins = text_of(obj, "instruction").ok_or_else(|| missing("instruction"))?;
            let out = text_of(obj, "output").ok_or_else(|| missing("output"))?;
            if out.trim().is_empty() {
                return Err(("empty output", "\"output\" is empty".into()));
            }
            let input = text_of(obj, "input").unwrap_or_default();
            let mut msgs = Vec::new();
            if let Some(s) = text_of(obj, "system").filter(|s| !s.is_empty()) {
                msgs.push(ChatMessage {
                    role: "system".into(),
                    content: s,
                });
            }
            if let Some(h) = obj.get("history").and_then(|h| h.as_array()) {
                for (i, pair) in h.iter().enumerate() {
                    let p = pair.as_array().filter(|p| p.len() == 2).ok_or_else(|| {
                        (
                            "invalid history",
                            format!("history[{i}] must be a [question, answer] pair"),
                        )
                    })?;
                    for (role, v) in ["user", "assistant"].iter().zip(p) {
                        msgs.push(ChatMessage {
                            role: role.to_string(),
                            content: v.as_str().unwrap_or_default().to_string(),
                        });
                    }
                }
            }
            let user = if input.is_empty() {
                ins
            } else {
                format!("{ins}\n\n{input}")
            };
            msgs.push(ChatMessage {
                role: "user".into(),
                content: user,
            });
            let prompt = render(&msgs, true).map_err(|e| ("template", e.to_string()))?;
            Ok(Example {
                segments: vec![(prompt, false), (out, true)],
            })
        }
        Format::Chat => {
            let arr = obj
                .get("messages")
                .and_then(|m| m.as_array())
                .ok_or_else(|| ("missing field", "\"messages\" must be a list".to_string()))?;
            let mut msgs = Vec::new();
            let mut weights = Vec::new();
            for (i, m) in arr.iter().enumerate() {
                let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("");
                if !["system", "user", "assistant"].contains(&role) {
                    return Err((
                        "unknown role",
                        format!(
                            "messages[{i}].role is {role:?}; expected system, user or assistant"
                        ),
                    ));
                }
                let content = m
                    .get("content")
                    .and_then(|c| c.as_str())
                    .ok_or_else(|| ("missing field", format!("messages[{i}].content")))?;
                let w = match m.get("weight") {
                    None => role == "assistant",
                    Some(v) => match v.as_u64() {
                        Some(0) => false,
                        Some(1) => role == "assistant",
                        _ => {
                            return Err((
                                "invalid weight",
                                format!("messages[{i}].weight must be 0 or 1"),
                            ))
                        }
                    },
                };
                msgs.push(ChatMessage {
                    role: role.into(),
                    content: content.into(),
                });
                weights.push(w);
            }
            if !msgs.iter().any(|m| m.role == "assistant") {
                return Err((
                    "no assistant turn",
                    "a chat example needs at least one assistant message".into(),
                ));
            }
            if !weights.iter().any(|w| *w) {
                return Err((
                    "empty output",
                    "every assistant message has weight 0".into(),
                ));
            }
            // Each assistant turn: the text the template adds for it, trained when weighted.
            let mut segments = Vec::new();
            let mut done = String::new();
            for (i, m) in msgs.iter().enumerate() {
                if m.role == "assistant" {
                    let before =
                        render(&msgs[..i], true).map_err(|e| ("template", e.to_string()))?;
                    let after =
                        render(&msgs[..=i], false).map_err(|e| ("template", e.to_string()))?;
                    let (Some(p), Some(a)) = (
                        before.strip_prefix(done.as_str()),
                        after.strip_prefix(before.as_str()),
                    ) else {
                        return Err((
                            "template",
                            "the chat template does not render turns as prefixes of each other"
                                .into(),
                        ));
                    };
                    segments.push((p.to_string(), false));
                    segments.push((a.to_string(), weights[i]));
                    done = after;
                }
            }
            Ok(Example { segments })
        }
    }
}

/// Parses and validates a whole JSONL dataset. On success, the examples; on failure, the
/// first problems (at most 10) with line numbers.
pub fn parse_jsonl(
    text: &str,
    forced: Option<Format>,
    render: RenderChat<'_>,
) -> Result<(Vec<Example>, Format), Vec<Problem>> {
    let mut problems = Vec::new();
    let mut examples = Vec::new();
    let mut seen_format = forced;
    for (i, line) in text.lines().enumerate() {
        if problems.len() >= MAX_PROBLEMS {
            break;
        }
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    line: line_no,
                    kind: "invalid JSON",
                    detail: e.to_string(),
                });
                continue;
            }
        };
        let Some(obj) = v.as_object() else {
            problems.push(Problem {
                line: line_no,
                kind: "invalid JSON",
                detail: "each line must be a JSON object".into(),
            });
            continue;
        };
        let format = match forced.or_else(|| Format::detect(obj)) {
            Some(f) => f,
            None => {
                problems.push(Problem {
                    line: line_no,
                    kind: "missing field",
                    detail: "no instruction/output, messages, prompt/completion or text field"
                        .into(),
                });
                continue;
            }
        };
        seen_format.get_or_insert(format);
        match example_of(obj, format, render) {
            Ok(e) => examples.push(e),
            Err((kind, detail)) => problems.push(Problem {
                line: line_no,
                kind,
                detail,
            }),
        }
    }
    if examples.is_empty() && problems.is_empty() {
        problems.push(Problem {
            line: 0,
            kind: "empty dataset",
            detail: "no examples".into(),
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok((examples, seen_format.unwrap_or(Format::Text)))
}

/// Tokenises examples; too-long ones are truncated or rejected (with their index).
pub fn tokenize(
    examples: &[Example],
    tk: &TextTokenizer,
    max_seq_len: usize,
    overflow: Overflow,
) -> Result<(Vec<Tokenized>, Stats), Vec<Problem>> {
    let mut out = Vec::with_capacity(examples.len());
    let mut stats = Stats::default();
    let mut problems = Vec::new();
    for (n, e) in examples.iter().enumerate() {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        for (k, (text, trained)) in e.segments.iter().enumerate() {
            let mut seg = tk.encode(text).map_err(|err| {
                vec![Problem {
                    line: n + 1,
                    kind: "tokenizer",
                    detail: err.to_string(),
                }]
            })?;
            if k > 0 && tk.add_bos && seg.first() == tk.bos_id.as_ref() {
                seg.remove(0);
            }
            mask.extend(std::iter::repeat_n(*trained, seg.len()));
            ids.extend(seg);
            if *trained {
                if let Some(&eos) = tk.eos_ids.first() {
                    // Completions end with EOS so the model learns to stop, unless the chat
                    // template already wrote it.
                    if ids.last() != Some(&eos) && !text.ends_with('\n') {
                        ids.push(eos);
                        mask.push(true);
                    }
                }
            }
        }
        if ids.len() > max_seq_len {
            match overflow {
                Overflow::Truncate => {
                    ids.truncate(max_seq_len);
                    mask.truncate(max_seq_len);
                    stats.truncated += 1;
                }
                Overflow::Reject => {
                    problems.push(Problem {
                        line: n + 1,
                        kind: "too long",
                        detail: format!("{} tokens; max_seq_len is {max_seq_len}", ids.len()),
                    });
                    if problems.len() >= MAX_PROBLEMS {
                        break;
                    }
                    continue;
                }
            }
        }
        // The first token has no prediction.
        if let Some(m) = mask.first_mut() {
            *m = false;
        }
        if !mask.iter().any(|m| *m) {
            problems.push(Problem {
                line: n + 1,
                kind: "empty output",
                detail: "no trained token left (truncated away?)".into(),
            });
            continue;
        }
        stats.examples += 1;
        stats.tokens += ids.len();
        stats.trained_tokens += mask.iter().filter(|m| **m).count();
        out.push(Tokenized { ids, mask });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(m: &[ChatMessage], gen: bool) -> Result<String, ModelError> {
        let t = crate::model::ChatTemplate::new(crate::model::chat::CHATML_TEMPLATE, "", "")?;
        t.render(m, gen)
    }

    fn parse(text: &str) -> Result<(Vec<Example>, Format), Vec<Problem>> {
        parse_jsonl(text, None, &render)
    }

    #[test]
    fn formats_are_detected() {
        let (e, f) = parse(r#"{"instruction":"Hi","input":"","output":"Hello"}"#).expect("alpaca");
        assert_eq!(f, Format::Alpaca);
        assert_eq!(e[0].segments[1], ("Hello".into(), true));
        assert!(e[0].segments[0].0.ends_with("<|im_start|>assistant\n"));
        let (e, f) = parse(r#"{"prompt":"2+2=","completion":"4"}"#).expect("pc");
        assert_eq!(f, Format::PromptCompletion);
        assert_eq!(
            e[0].segments,
            vec![("2+2=".into(), false), ("4".into(), true)]
        );
        let (e, _) = parse(r#"{"text":"你好，世界"}"#).expect("text");
        assert_eq!(e[0].segments, vec![("你好，世界".into(), true)]);
    }

    #[test]
    fn chat_weights_select_trained_turns() {
        let line = r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b","weight":0},{"role":"user","content":"c"},{"role":"assistant","content":"d"}]}"#;
        let (e, f) = parse(line).expect("chat");
        assert_eq!(f, Format::Chat);
        let trained: Vec<&str> = e[0]
            .segments
            .iter()
            .filter(|s| s.1)
            .map(|s| s.0.as_str())
            .collect();
        assert_eq!(trained, vec!["d<|im_end|>\n"]);
        let all: String = e[0].segments.iter().map(|s| s.0.as_str()).collect();
        let msgs: Vec<ChatMessage> = ["a", "b", "c", "d"]
            .iter()
            .zip(["user", "assistant", "user", "assistant"])
            .map(|(c, r)| ChatMessage {
                role: r.into(),
                content: c.to_string(),
            })
            .collect();
        assert_eq!(all, render(&msgs, false).expect("render"));
    }

    #[test]
    fn problems_carry_line_numbers_and_kinds() {
        let text = "{\"instruction\":\"q\",\"output\":\"a\"}\nnot json\n{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}\n{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}\n{\"instruction\":\"q\",\"output\":\"\"}\n{\"foo\":1}\n";
        let p = parse(text).expect_err("problems");
        let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.kind)).collect();
        assert_eq!(
            got,
            vec![
                (2, "invalid JSON"),
                (3, "unknown role"),
                (4, "no assistant turn"),
                (5, "empty output"),
                (6, "missing field")
            ]
        );
        assert_eq!(parse("").expect_err("empty")[0].kind, "empty dataset");
    }
}
