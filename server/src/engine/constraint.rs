//! Structured output: a request's constraint (a JSON Schema, any JSON object, a regular
//! expression or a Lark grammar) compiled by `llguidance` against the model's tokenizer into
//! a [`Constraint`], which the sequence's sampler consults each step: the logits of every
//! token that cannot continue a valid output are masked out, and every chosen token is
//! committed to it. The text therefore always parses (or stops at `max_tokens`, with
//! `finish_reason` length).
//!
//! Why llguidance: it compiles JSON Schema, regex and Lark grammars lazily against the
//! token trie (no ahead-of-time automaton over the 49k-token vocabulary; a nested schema
//! compiles in ~1 ms here, BENCHMARKS.md), and 16 constrained streams among 32 left
//! aggregate decode unchanged within noise; outlines-core covers JSON Schema and regex but
//! no context-free grammars.
//!
//! Where the time goes: compilation runs at admission, on a blocking thread, never on the
//! engine loop. The masks of a step's constrained sequences are computed on a side thread
//! while the step's forward pass runs (their next mask depends only on the tokens they
//! already have), so constrained sequences do not serialise the batch.

use std::sync::{Arc, OnceLock};

use llguidance::{
    api::TopLevelGrammar,
    toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv},
    Matcher, ParserFactory,
};

use crate::model::BaseModel;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Output that validates against this JSON Schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// Output that matches this regular expression (whole).
    Regex(String),
    /// Output in this grammar's language (llguidance's Lark dialect).
    Lark(String),
}

/// The tokenizer as llguidance sees it: every token's bytes, and our tokenizer for text.
struct Env {
    trie: TokTrie,
    model: Arc<BaseModel>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.model.tokenizer.encode_plain(text).unwrap_or_default()
        })
    }
}

/// Compiles constraints for one model; built once, on the first constrained request.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    pub fn new(model: Arc<BaseModel>) -> Result<Self, String> {
        let tk = &model.tokenizer;
        let json: serde_json::Value = serde_json::from_str(
            &tk.to_json()
                .map_err(|e| format!("the tokenizer as JSON: {e}"))?,
        )
        .map_err(|e| format!("the tokenizer as JSON: {e}"))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| format!("the tokenizer's token bytes: {e}"))?;
        // The model's output layer may be wider than the tokenizer's vocabulary.
        let vocab = words.len().max(model.config().vocab_size);
        words.resize(vocab, Vec::new());
        let eos = *tk
            .eos_ids
            .first()
            .ok_or_else(|| "the tokenizer has no end-of-sequence token".to_string())?;
        let mut trie = TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &words);
        if tk.eos_ids.len() > 1 {
            trie = trie.with_eos_tokens(&tk.eos_ids);
        }
        let env: TokEnv = Arc::new(Env { trie, model });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles `spec` into a fresh constraint; the error says what is wrong with it. A
    /// constraint that admits no output at all is an error too.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, String> {
        let grammar = match spec {
            ConstraintSpec::JsonSchema(s) => TopLevelGrammar::from_json_schema(compact(s)),
            ConstraintSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(&serde_json::json!({"type": "object"})))
            }
            ConstraintSpec::Regex(r) => {
                // Checked first: llguidance accepts some patterns the regex crate refuses.
                regex::Regex::new(r).map_err(|e| format!("not a valid regular expression: {e}"))?;
                TopLevelGrammar::from_regex(r)
            }
            ConstraintSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let mut matcher = Matcher::new(Ok(parser));
        let first = matcher.compute_mask().map_err(|e| e.to_string())?;
        if first.num_set() == 0 {
            return Err("no output satisfies it".into());
        }
        Ok(Constraint {
            matcher,
            mask: Some(first),
        })
    }
}

/// The schema with llguidance's layout set to compact JSON (`{"a":1,"b":[2,3]}`, as
/// OpenAI's structured outputs are) unless the schema sets its own `x-guidance`: with
/// flexible whitespace a sampled model can pad the output with whitespace and never close
/// it within `max_tokens`.
fn compact(schema: &serde_json::Value) -> serde_json::Value {
    let mut s = schema.clone();
    if let Some(o) = s.as_object_mut() {
        o.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ",",
                "key_separator": ":",
            })
        });
    }
    s
}

/// One sequence's live constraint: the parser state after the tokens generated so far, and
/// the mask for the next token once computed.
pub struct Constraint {
    matcher: Matcher,
    mask: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            mask: self.mask.clone(),
        }
    }
}

impl Constraint {
    /// Computes the next token's mask (if not done yet): called off the engine's critical
    /// path, while the step's forward pass runs.
    pub fn prepare(&mut self) {
        if self.mask.is_none() && !self.matcher.is_stopped() {
            self.mask = self.matcher.compute_mask().ok();
        }
    }

    /// Masks out (to -inf) the logits of tokens that cannot come next. Errs when the parser
    /// failed (nothing can come next).
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.prepare();
        let mask = self.mask.take().ok_or_else(|| {
            self.matcher
                .get_error()
                .unwrap_or_else(|| "the constraint admits no further token".into())
        })?;
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= mask.len() || !mask.is_allowed(i as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Commits the chosen token.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// Whether `tokens` (a fresh constraint's whole output) are a complete sentence of
    /// the grammar: the JSON Schema grader's test.
    pub fn accepts(&mut self, tokens: &[u32]) -> bool {
        self.matcher.consume_tokens(tokens).is_ok() && self.matcher.is_accepting().unwrap_or(false)
    }

    /// Whether the output is complete and nothing may follow.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// The model's grammar compiler, built on first use and shared.
#[derive(Default, Clone)]
pub struct LazyGrammars(Arc<OnceLock<Result<Arc<Grammars>, String>>>);

impl LazyGrammars {
    pub fn get(&self, model: &Arc<BaseModel>) -> Result<Arc<Grammars>, String> {
        self.0
            .get_or_init(|| Grammars::new(model.clone()).map(Arc::new))
            .clone()
    }
}
