//! Validated examples to token ids with the loss mask: the completion's tokens trained
//! (or all, or per message), a classification row's label, a preference row's two sides, a
//! prompt row's prompt; too long examples truncated or refused with their line.

use super::*;
use crate::train::classes::tokenize_labelled;

/// One tokenised example and whether it was truncated.
pub struct TokenizedOne {
    pub tokens: Tokenized,
    pub truncated: bool,
}

impl Stats {
    pub(super) fn add(&mut self, t: &TokenizedOne) {
        self.examples += 1;
        self.tokens += t.tokens.ids.len();
        self.trained_tokens += t.tokens.mask.iter().filter(|m| **m).count();
        self.truncated += usize::from(t.truncated);
        if let Some(l) = &t.tokens.label {
            *self.labels.entry(l.key()).or_default() += 1;
        }
    }
}

/// Tokenises one example: too long (over `max_seq_len`) is truncated or refused, over
/// [`MAX_EXAMPLE_TOKENS`] always refused.
pub fn tokenize_one(
    e: &Example,
    tk: &TextTokenizer,
    max_seq_len: usize,
    overflow: Overflow,
) -> Result<TokenizedOne, Problem> {
    if e.label.is_some() {
        return tokenize_labelled(e, tk, max_seq_len, overflow);
    }
    if let Some(fields) = &e.fields {
        return tokenize_prompt(e, fields, tk, max_seq_len);
    }
    if let Some(rejected) = &e.rejected {
        // Both sides as completions of the same prompt, each under the same limits.
        let mut chosen = tokenize_one(
            &Example {
                rejected: None,
                ..e.clone()
            },
            tk,
            max_seq_len,
            overflow,
        )?;
        let other = Example {
            segments: vec![e.segments[0].clone(), (rejected.clone(), true)],
            rejected: None,
            ..e.clone()
        };
        let other = tokenize_one(&other, tk, max_seq_len, overflow)?;
        chosen.tokens.rejected = Some(Box::new(RejectedTokens {
            ids: other.tokens.ids,
            mask: other.tokens.mask,
            margin: e.margin as f32,
        }));
        chosen.truncated |= other.truncated;
        return Ok(chosen);
    }
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (k, (text, trained)) in e.segments.iter().enumerate() {
        let mut seg = tk
            .encode(text)
            .map_err(|err| problem(e.line, "tokenizer", err.to_string()))?;
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
        if ids.len() > MAX_EXAMPLE_TOKENS {
            return Err(problem(
                e.line,
                "too long",
                format!("over {MAX_EXAMPLE_TOKENS} tokens, the most an example may have"),
            ));
        }
    }
    let mut truncated = false;
    if ids.len() > max_seq_len {
        match overflow {
            Overflow::Truncate => {
                ids.truncate(max_seq_len);
                mask.truncate(max_seq_len);
                truncated = true;
            }
            Overflow::Reject => {
                return Err(problem(
                    e.line,
                    "too long",
                    format!("{} tokens; max_seq_len is {max_seq_len}", ids.len()),
                ));
            }
        }
    }
    // The first token has no prediction.
    if let Some(m) = mask.first_mut() {
        *m = false;
    }
    if !mask.iter().any(|m| *m) {
        return Err(problem(
            e.line,
            "empty output",
            "no trained token left (truncated away?)",
        ));
    }
    Ok(TokenizedOne {
        tokens: Tokenized {
            ids,
            mask,
            label: None,
            rejected: None,
            fields: None,
        },
        truncated,
    })
}

/// A prompt row: the rendered prompt's ids (refused past `max_seq_len`: a cut prompt
/// would ask something else) and its fields.
fn tokenize_prompt(
    e: &Example,
    fields: &serde_json::Map<String, Value>,
    tk: &TextTokenizer,
    max_seq_len: usize,
) -> Result<TokenizedOne, Problem> {
    let text = e.segments.first().map_or("", |s| s.0.as_str());
    let ids = tk
        .encode(text)
        .map_err(|err| problem(e.line, "tokenizer", err.to_string()))?;
    if ids.is_empty() {
        return Err(problem(e.line, "empty prompt", "the prompt has no tokens"));
    }
    if ids.len() > max_seq_len.min(MAX_EXAMPLE_TOKENS) {
        return Err(problem(
            e.line,
            "too long",
            format!(
                "the prompt is {} tokens; max_seq_len is {max_seq_len}",
                ids.len()
            ),
        ));
    }
    Ok(TokenizedOne {
        tokens: Tokenized {
            mask: vec![false; ids.len()],
            ids,
            label: None,
            rejected: None,
            fields: Some(std::sync::Arc::new(fields.clone())),
        },
        truncated: false,
    })
}

/// Tokenises examples; too-long ones are truncated or rejected (with their line).
pub fn tokenize(
    examples: &[Example],
    tk: &TextTokenizer,
    max_seq_len: usize,
    overflow: Overflow,
) -> Result<(Vec<Tokenized>, Stats), Vec<Problem>> {
    let mut out = Vec::with_capacity(examples.len());
    let mut stats = Stats::default();
    let mut problems = Vec::new();
    for e in examples {
        match tokenize_one(e, tk, max_seq_len, overflow) {
            Ok(t) => {
                stats.add(&t);
                out.push(t.tokens);
            }
            Err(p) => {
                problems.push(p);
                if problems.len() >= MAX_PROBLEMS {
                    break;
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok((out, stats))
}
