//! Training datasets: JSONL in the ecosystem's formats, validated line by line, turned into
//! token ids with a loss mask.
//! Formats (detected per line, or forced): Alpaca (`instruction`, `input`, `output`,
//! optional `system`, `history`), chat (`messages` with system/user/assistant and an optional
//! per-message `weight` 0/1), `prompt`/`completion`, plain `text`, and classification
//! (`text` with a `label`: a string or an integer index; `train::classes`).
//! Invariant: a dataset that validates yields only examples with at least one trained token,
//! or (classification) only labelled examples, all of one label kind, with two labels or
//! more.
//! Bounds: a line longer than [`MAX_LINE_BYTES`] is refused before it is parsed, an example
//! longer than [`MAX_EXAMPLE_TOKENS`] tokens is refused, and [`validate_reader`] holds one
//! line and one example at a time, so validating costs memory proportional to the largest
//! allowed line, whatever the file's size or shape. Duplicate keys in a JSON object are
//! refused (JSON parsers disagree on which one wins).
//! `tokenize`: validated examples to token ids with the loss mask.

mod tokenize;

use std::io::BufRead;

use serde_json::Value;

use super::{
    classes::{Label, LabelCounts, LabelKinds},
    strict_json::Strict,
};

/// Longest line of a dataset, in bytes.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Longest example, in tokens, before truncation to a job's `max_seq_len`.
pub const MAX_EXAMPLE_TOKENS: usize = 32_768;

use crate::model::{ChatMessage, ModelError, TextTokenizer};

pub use tokenize::{tokenize, tokenize_one, TokenizedOne};

/// A dataset format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Alpaca,
    Chat,
    PromptCompletion,
    Text,
    /// `{"text", "label"}`: one class per text.
    Classification,
    /// A prompt with a chosen and a rejected completion (TRL's or OpenAI's DPO rows;
    /// `train::preference`).
    Preference,
    /// Prompts alone, for online RL: `{"prompt"}` (a string or messages) or `{"messages"}`
    /// (with this format named at upload), every other field kept for graders.
    Prompts,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Chat => "chat",
            Format::PromptCompletion => "prompt_completion",
            Format::Text => "text",
            Format::Classification => "classification",
            Format::Preference => "preference",
            Format::Prompts => "prompts",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "alpaca" => Some(Self::Alpaca),
            "chat" | "messages" => Some(Self::Chat),
            "prompt_completion" | "prompt-completion" => Some(Self::PromptCompletion),
            "text" => Some(Self::Text),
            "classification" => Some(Self::Classification),
            "preference" => Some(Self::Preference),
            "prompts" | "prompt" => Some(Self::Prompts),
            _ => None,
        }
    }

    fn detect(v: &serde_json::Map<String, Value>) -> Option<Self> {
        if v.contains_key("label") {
            Some(Self::Classification)
        } else if super::preference::is_preference(v) {
            Some(Self::Preference)
        } else if v.contains_key("messages") {
            Some(Self::Chat)
        } else if v.contains_key("instruction") || v.contains_key("output") {
            Some(Self::Alpaca)
        } else if v.contains_key("prompt") && !v.contains_key("completion") {
            Some(Self::Prompts)
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
    /// The 1-based line it came from.
    pub line: usize,
    /// A classification row's label (its one segment is the text, not trained on).
    pub label: Option<Label>,
    /// A preference row's rejected completion (its segments are the prompt and the chosen
    /// completion).
    pub rejected: Option<String>,
    /// A preference row's margin (TRL's `margin`: how much better the chosen completion
    /// is; 0 when not given).
    pub margin: f64,
    /// A prompt row's other fields (for graders); `Some` marks a prompt row, whose one
    /// segment is the rendered prompt.
    pub fields: Option<serde_json::Map<String, Value>>,
}

/// A tokenised example: ids and, per id, whether its prediction is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    /// `mask[i]`: the loss includes predicting `ids[i]` from `ids[..i]`.
    pub mask: Vec<bool>,
    /// A classification row's label: the loss is the head's at the last token instead.
    pub label: Option<Label>,
    /// A preference row's other side: `ids`/`mask` are the prompt and the chosen
    /// completion, this the same prompt and the rejected one.
    pub rejected: Option<Box<RejectedTokens>>,
    /// A prompt row's other fields (online RL: the graders read them); its `ids` are the
    /// prompt, nothing trained.
    pub fields: Option<std::sync::Arc<serde_json::Map<String, Value>>>,
}

/// The rejected side of a tokenised preference row.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedTokens {
    pub ids: Vec<u32>,
    /// As [`Tokenized::mask`]: the rejected completion's tokens.
    pub mask: Vec<bool>,
    pub margin: f32,
}

/// What to do with an example longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Truncate,
    Reject,
}

/// Counts after tokenisation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub examples: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub truncated: usize,
    /// Classification datasets: examples per label.
    pub labels: LabelCounts,
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
        Format::Preference => super::preference::example(obj, render),
        Format::Prompts => super::preference::prompt_row(obj, render),
        Format::Classification => {
            let t = text_of(obj, "text").ok_or_else(|| missing("text"))?;
            if t.trim().is_empty() {
                return Err(("empty text", "\"text\" is empty".into()));
            }
            let v = obj.get("label").ok_or_else(|| missing("label"))?;
            let label = Label::parse(v).map_err(|e| ("invalid label", e))?;
            Ok(Example {
                segments: vec![(t, false)],
                line: 0,
                label: Some(label),
                rejected: None,
                margin: 0.0,
                fields: None,
            })
        }
        Format::Text => {
            let t = text_of(obj, "text").ok_or_else(|| missing("text"))?;
            if t.trim().is_empty() {
                return Err(("empty output", "\"text\" is empty".into()));
            }
            Ok(Example {
                segments: vec![(t, true)],
                line: 0,
                label: None,
                rejected: None,
                margin: 0.0,
                fields: None,
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
                line: 0,
                label: None,
                rejected: None,
                margin: 0.0,
                fields: None,
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
            // The trained text is what the template writes for the assistant's turn (for
            // ChatML `answer<|im_end|>\n`), as for chat rows; a template that does not render
            // the turn after the prompt gets the bare answer (and EOS, at tokenisation).
            msgs.push(ChatMessage {
                role: "assistant".into(),
                content: out.clone(),
            });
            let full = render(&msgs, false).map_err(|e| ("template", e.to_string()))?;
            let answer = full
                .strip_prefix(prompt.as_str())
                .filter(|a| a.starts_with(out.as_str()))
                .map_or(out, str::to_string);
            Ok(Example {
                segments: vec![(prompt, false), (answer, true)],
                line: 0,
                label: None,
                rejected: None,
                margin: 0.0,
                fields: None,
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
            Ok(Example {
                segments,
                line: 0,
                label: None,
                rejected: None,
                margin: 0.0,
                fields: None,
            })
        }
    }
}

pub(super) fn problem(line: usize, kind: &'static str, detail: impl Into<String>) -> Problem {
    Problem {
        line,
        kind,
        detail: detail.into(),
    }
}

/// Parses line `line_no` (blank lines are `None`): its length, JSON (no duplicate keys),
/// format and fields.
fn parse_line(
    line_no: usize,
    line: &str,
    forced: Option<Format>,
    render: RenderChat<'_>,
) -> Result<Option<(Example, Format)>, Problem> {
    if line.len() > MAX_LINE_BYTES {
        return Err(too_long_line(line_no, line.len()));
    }
    if line.trim().is_empty() {
        return Ok(None);
    }
    let v = match serde_json::from_str::<Strict>(line) {
        Ok(Strict(v)) => v,
        Err(e) => {
            let msg = e.to_string();
            let kind = if msg.starts_with("duplicate key") {
                "duplicate key"
            } else {
                "invalid JSON"
            };
            return Err(problem(line_no, kind, msg));
        }
    };
    let Some(obj) = v.as_object() else {
        return Err(problem(
            line_no,
            "invalid JSON",
            "each line must be a JSON object",
        ));
    };
    let Some(format) = forced.or_else(|| Format::detect(obj)) else {
        return Err(problem(
            line_no,
            "missing field",
            "no instruction/output, messages, prompt/completion, text, or chosen/rejected field",
        ));
    };
    let mut e = example_of(obj, format, render).map_err(|(k, d)| problem(line_no, k, d))?;
    e.line = line_no;
    Ok(Some((e, format)))
}

fn too_long_line(line_no: usize, bytes: usize) -> Problem {
    problem(
        line_no,
        "line too long",
        format!("{bytes} bytes or more; a line may have at most {MAX_LINE_BYTES}"),
    )
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
        match parse_line(i + 1, line, forced, render) {
            Ok(Some((e, f))) => {
                seen_format.get_or_insert(f);
                examples.push(e);
            }
            Ok(None) => {}
            Err(p) => problems.push(p),
        }
    }
    finish(examples.is_empty(), problems)?;
    Ok((examples, seen_format.unwrap_or(Format::Text)))
}

fn finish(no_examples: bool, mut problems: Vec<Problem>) -> Result<(), Vec<Problem>> {
    if no_examples && problems.is_empty() {
        problems.push(problem(0, "empty dataset", "no examples"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Reads the next line of `r` into `buf` (without its line ending), holding at most
/// `MAX_LINE_BYTES + 1` bytes: a longer line is skipped and reported as `Some(Err(len))`.
fn next_line<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Result<(), usize>>> {
    buf.clear();
    let n = std::io::Read::take(&mut *r, MAX_LINE_BYTES as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Some(Ok(())));
    }
    if buf.len() <= MAX_LINE_BYTES {
        return Ok(Some(Ok(()))); // the last line, without a newline
    }
    let mut len = buf.len();
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            break;
        }
        if let Some(p) = avail.iter().position(|&b| b == b'\n') {
            len += p;
            r.consume(p + 1);
            break;
        }
        let l = avail.len();
        len += l;
        r.consume(l);
    }
    Ok(Some(Err(len)))
}

/// What [`validate_reader`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub format: Format,
    pub stats: Stats,
}

/// Validates a JSONL dataset as it is read, one line and one example at a time: parse,
/// tokenise (truncating at `max_seq_len` for the statistics), count, drop. The problems
/// are those [`parse_jsonl`] and [`tokenize`] report, with line numbers, and invalid UTF-8
/// is reported by line too.
pub fn validate_reader(
    mut r: impl BufRead,
    forced: Option<Format>,
    render: RenderChat<'_>,
    tk: &TextTokenizer,
    max_seq_len: usize,
) -> std::io::Result<Result<Validated, Vec<Problem>>> {
    let mut problems = Vec::new();
    let mut stats = Stats::default();
    let mut seen_format = forced;
    let mut labels = LabelKinds::default();
    let mut buf = Vec::new();
    let mut line_no = 0;
    while problems.len() < MAX_PROBLEMS {
        let Some(read) = next_line(&mut r, &mut buf)? else {
            break;
        };
        line_no += 1;
        if let Err(len) = read {
            problems.push(too_long_line(line_no, len));
            continue;
        }
        let line = match std::str::from_utf8(&buf) {
            Ok(l) => l,
            Err(e) => {
                problems.push(problem(
                    line_no,
                    "invalid UTF-8",
                    format!("at byte {} of the line", e.valid_up_to()),
                ));
                continue;
            }
        };
        let e = match parse_line(line_no, line, forced, render) {
            Ok(Some((e, f))) => {
                seen_format.get_or_insert(f);
                e
            }
            Ok(None) => continue,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        if let Err(p) = labels.check(&e) {
            problems.push(p);
            continue;
        }
        // Prompt rows (no answers) and rows with answers do not mix: a prompt/completion
        // line without its completion is a missing field, not a prompt.
        let prompts = seen_format == Some(Format::Prompts);
        if e.fields.is_some() != prompts {
            let format = seen_format.map_or("", Format::name);
            problems.push(problem(
                line_no,
                "mixed formats",
                if prompts {
                    "this row has an answer; a prompts dataset has prompts only".to_string()
                } else {
                    format!("\"completion\" is required for the {format} format")
                },
            ));
            continue;
        }
        match tokenize_one(&e, tk, max_seq_len, Overflow::Truncate) {
            Ok(t) => stats.add(&t),
            Err(p) => problems.push(p),
        }
    }
    if problems.is_empty() && stats.examples > 0 {
        if let Err(p) = labels.finish(&stats.labels) {
            problems.push(p);
        }
    }
    if let Err(p) = finish(stats.examples == 0, problems) {
        return Ok(Err(p));
    }
    Ok(Ok(Validated {
        format: seen_format.unwrap_or(Format::Text),
        stats,
    }))
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
        assert_eq!(e[0].segments[1], ("Hello<|im_end|>\n".into(), true));
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

    /// A reader of `n` bytes of `b`, never held in memory as a whole.
    struct Repeat {
        b: u8,
        left: usize,
    }

    impl std::io::Read for Repeat {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(self.left);
            out[..n].fill(self.b);
            self.left -= n;
            Ok(n)
        }
    }

    fn tiny_tokenizer() -> TextTokenizer {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("tiny.gguf");
        crate::model::tiny::write_tiny_gguf(&path, &Default::default()).expect("tiny");
        crate::model::BaseModel::load(&path, &candle_core::Device::Cpu)
            .expect("load")
            .tokenizer
    }

    #[test]
    fn a_line_over_the_cap_is_refused_unread_and_the_next_line_still_parses() {
        use std::io::Read;
        let huge = Repeat {
            b: b'a',
            left: 5 * MAX_LINE_BYTES,
        };
        let rest = "\n{\"text\":\"fine\"}\n{\"text\": 1, \"text\": 2}\n".as_bytes();
        let reader = std::io::BufReader::new(huge.chain(rest));
        let tk = tiny_tokenizer();
        let p = validate_reader(reader, None, &render, &tk, 64)
            .expect("io")
            .expect_err("problems");
        let got: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.kind)).collect();
        assert_eq!(got, vec![(1, "line too long"), (3, "duplicate key")]);
        assert!(
            p[0].detail.contains(&(5 * MAX_LINE_BYTES).to_string()),
            "{}",
            p[0]
        );
        assert!(p[1].detail.contains("\"text\""), "{}", p[1]);
        // The same line through the in-memory parser.
        let text = format!("{}\n", "a".repeat(MAX_LINE_BYTES + 1));
        assert_eq!(parse(&text).expect_err("long")[0].kind, "line too long");
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let p = parse(r#"{"messages":[{"role":"user","content":"a","content":"b"}]}"#)
            .expect_err("dup");
        assert_eq!((p[0].line, p[0].kind), (1, "duplicate key"));
        assert!(p[0].detail.contains("\"content\""), "{}", p[0]);
        parse(r#"{"prompt":"a","completion":"b","extra":{"x":1,"y":[{"x":2}]}}"#).expect("no dup");
    }

    #[test]
    fn invalid_utf8_is_reported_by_line() {
        let mut bytes = b"{\"text\":\"ok\"}\n{\"text\":\"ok\"}\n{\"text\":\"".to_vec();
        bytes.extend([0xff, 0xfe]);
        bytes.extend(b"\"}\n");
        let tk = tiny_tokenizer();
        let p = validate_reader(&bytes[..], None, &render, &tk, 64)
            .expect("io")
            .expect_err("bad utf-8");
        assert_eq!((p[0].line, p[0].kind), (3, "invalid UTF-8"));
        let ok = validate_reader(&bytes[..28], None, &render, &tk, 64)
            .expect("io")
            .expect("two good lines");
        assert_eq!(ok.stats.examples, 2);
    }

    #[test]
    fn prompt_rows_and_rows_with_answers_do_not_mix() {
        let tk = tiny_tokenizer();
        let check =
            |text: &str| validate_reader(text.as_bytes(), None, &render, &tk, 64).expect("io");
        let p = check("{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"prompt\":\"c\"}\n")
            .expect_err("a completion is missing");
        assert_eq!((p[0].line, p[0].kind), (2, "mixed formats"));
        assert!(
            p[0].detail.contains("\"completion\" is required"),
            "{}",
            p[0]
        );
        let p =
            check("{\"prompt\":\"a\",\"answer\":\"x\"}\n{\"prompt\":\"c\",\"completion\":\"d\"}\n")
                .expect_err("an answer in a prompts dataset");
        assert_eq!((p[0].line, p[0].kind), (2, "mixed formats"));
        let ok =
            check("{\"prompt\":\"a\",\"answer\":\"x\"}\n{\"prompt\":\"c\"}\n").expect("prompts");
        assert_eq!((ok.format, ok.stats.examples), (Format::Prompts, 2));
    }
}
