//! Graders: rules that score a completion of a prompt row in [0, 1], for online RL
//! (rewards) and as an evaluation. No code runs but these: a string match against a row
//! field or a literal, a regular expression, "parses as JSON and validates against this
//! JSON Schema" (the schema compiled by llguidance, as structured output is), length
//! bounds in tokens or words, a reward-model adapter's `σ(reward)`, and a weighted sum of
//! graders.
//!
//! A reference is a literal, or a row field written `{{row.FIELD}}` (as in OpenAI's
//! graders' `{{item.FIELD}}`, which is accepted too). Specs are checked when a job is
//! created ([`check`]): a field no row has is an error naming the grader.

use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::engine::constraint::{ConstraintSpec, Grammars};

/// How a grader is given (stored with the job).
/// Graded generations as an offline job's evaluation (`CreateJob.eval_grader`): the
/// adapter answers each validation prompt, the grader scores the answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalGrader {
    pub grader: GraderSpec,
    /// 0: greedy.
    pub temperature: f32,
    pub max_new_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GraderSpec {
    /// 1 when the completion equals (or, with `contains`, contains) the reference.
    StringMatch {
        reference: String,
        #[serde(default)]
        case_insensitive: bool,
        #[serde(default)]
        contains: bool,
    },
    /// 1 when the regular expression matches somewhere in the completion.
    Regex { pattern: String },
    /// 1 when the completion is JSON valid under the schema.
    JsonSchema { schema: Value },
    /// 1 when the completion's length is within `[min, max]` (either may be absent).
    Length {
        #[serde(default)]
        min: Option<u32>,
        #[serde(default)]
        max: Option<u32>,
        unit: LengthUnit,
    },
    /// `σ(reward)` of a reward-model adapter of the job's tenant (`name` or
    /// `name@version`), on the prompt and the completion as the reward model was trained.
    RewardModel { adapter: String },
    /// `Σ wᵢ gᵢ / Σ wᵢ` of the inner graders (weights ≥ 0, not all 0).
    Weighted { graders: Vec<Weighted> },
}

impl GraderSpec {
    /// The reward-model adapters this grader reads (to be leased before compiling).
    pub fn reward_models(&self) -> Vec<&str> {
        match self {
            GraderSpec::RewardModel { adapter } => vec![adapter.as_str()],
            GraderSpec::Weighted { graders } => graders
                .iter()
                .flat_map(|w| w.grader.reward_models())
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A reward model's reward of a whole sequence (prompt, completion, EOS): the serving
/// engine's Score path (`train::rollouts`).
pub trait RewardScorer: Send + Sync {
    fn reward(&self, ids: &[u32]) -> Result<f32, String>;
}

/// What compiling a grader may need: the grammar compiler (JSON Schema) and the leased
/// reward models by the name the spec gives.
pub struct Resources<'a> {
    pub grammars: &'a dyn Fn() -> Result<Arc<Grammars>, String>,
    pub reward_models: &'a HashMap<String, Arc<dyn RewardScorer>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Weighted {
    pub weight: f64,
    pub grader: GraderSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthUnit {
    Tokens,
    Words,
}

/// A grader ready to score.
pub enum Grader {
    StringMatch {
        reference: Reference,
        case_insensitive: bool,
        contains: bool,
    },
    Regex(regex::Regex),
    JsonSchema(Arc<Grammars>, ConstraintSpec),
    RewardModel(Arc<dyn RewardScorer>),
    Length {
        min: u32,
        max: u32,
        unit: LengthUnit,
    },
    Weighted(Vec<(f64, Grader)>),
}

/// A literal, or a row's field.
#[derive(Debug, Clone, PartialEq)]
pub enum Reference {
    Literal(String),
    Field(String),
}

impl Reference {
    /// `{{row.F}}` or `{{item.F}}` (spaces inside the braces allowed) is field `F`.
    pub fn parse(s: &str) -> Self {
        let field = s
            .trim()
            .strip_prefix("{{")
            .and_then(|r| r.strip_suffix("}}"))
            .map(str::trim)
            .and_then(|r| r.strip_prefix("row.").or_else(|| r.strip_prefix("item.")));
        match field {
            Some(f) if !f.is_empty() => Reference::Field(f.to_string()),
            _ => Reference::Literal(s.to_string()),
        }
    }

    /// The text it stands for in `row` (a field's string, or its JSON for other values).
    fn resolve<'a>(&'a self, row: &'a Map<String, Value>) -> Option<std::borrow::Cow<'a, str>> {
        match self {
            Reference::Literal(s) => Some(s.as_str().into()),
            Reference::Field(f) => match row.get(f)? {
                Value::String(s) => Some(s.as_str().into()),
                Value::Null => None,
                other => Some(other.to_string().into()),
            },
        }
    }
}

/// Most graders one job may nest, all levels counted.
pub const MAX_GRADERS: usize = 16;

/// Compiles `spec` (the request's field is `field`), checking every row field it reads is
/// in every one of `rows`; the error is (field, reason).
pub fn compile(
    spec: &GraderSpec,
    field: &str,
    rows: &[&Map<String, Value>],
    res: &Resources<'_>,
) -> Result<Grader, (String, String)> {
    let mut count = 0;
    compile_inner(spec, field, rows, res, &mut count)
}

fn compile_inner(
    spec: &GraderSpec,
    field: &str,
    rows: &[&Map<String, Value>],
    res: &Resources<'_>,
    count: &mut usize,
) -> Result<Grader, (String, String)> {
    *count += 1;
    let bad = |f: &str, r: String| Err((format!("{field}.{f}"), r));
    if *count > MAX_GRADERS {
        return Err((field.into(), format!("more than {MAX_GRADERS} graders")));
    }
    Ok(match spec {
        GraderSpec::StringMatch {
            reference,
            case_insensitive,
            contains,
        } => {
            let r = Reference::parse(reference);
            match &r {
                Reference::Literal(s) if s.is_empty() => {
                    return bad("reference", "empty: give a text or {{row.FIELD}}".into())
                }
                Reference::Field(f) => {
                    if let Some(i) = rows
                        .iter()
                        .position(|row| row.get(f).is_none_or(|v| v.is_null()))
                    {
                        return bad(
                            "reference",
                            format!("row {} of the dataset has no field {f:?}", i + 1),
                        );
                    }
                }
                Reference::Literal(_) => {}
            }
            Grader::StringMatch {
                reference: r,
                case_insensitive: *case_insensitive,
                contains: *contains,
            }
        }
        GraderSpec::Regex { pattern } => match regex::Regex::new(pattern) {
            Ok(re) => Grader::Regex(re),
            Err(e) => return bad("pattern", e.to_string()),
        },
        GraderSpec::JsonSchema { schema } => {
            if !schema.is_object() {
                return bad("schema", "a JSON Schema is an object".into());
            }
            let g = (res.grammars)().map_err(|e| (format!("{field}.schema"), e))?;
            let spec = ConstraintSpec::JsonSchema(schema.clone());
            g.compile(&spec)
                .map_err(|e| (format!("{field}.schema"), e))?;
            Grader::JsonSchema(g, spec)
        }
        GraderSpec::RewardModel { adapter } => match res.reward_models.get(adapter) {
            Some(r) => Grader::RewardModel(r.clone()),
            None => {
                return bad(
                    "adapter",
                    format!("the reward model {adapter:?} is not leased"),
                )
            }
        },
        GraderSpec::Length { min, max, unit } => {
            let (lo, hi) = (min.unwrap_or(0), max.unwrap_or(u32::MAX));
            if min.is_none() && max.is_none() {
                return bad("max", "give min, max or both".into());
            }
            if lo > hi {
                return bad("min", format!("{lo} is above max {hi}"));
            }
            Grader::Length {
                min: lo,
                max: hi,
                unit: *unit,
            }
        }
        GraderSpec::Weighted { graders } => {
            if graders.is_empty() {
                return bad("graders", "no graders to weigh".into());
            }
            let mut out = Vec::with_capacity(graders.len());
            for (i, w) in graders.iter().enumerate() {
                let f = format!("{field}.graders[{i}]");
                if !(w.weight.is_finite() && w.weight >= 0.0) {
                    return Err((format!("{f}.weight"), format!("{} must be ≥ 0", w.weight)));
                }
                out.push((
                    w.weight,
                    compile_inner(&w.grader, &format!("{f}.grader"), rows, res, count)?,
                ));
            }
            if out.iter().all(|(w, _)| *w == 0.0) {
                return bad("graders", "every weight is 0".into());
            }
            Grader::Weighted(out)
        }
    })
}

/// What a grader reads of one completion.
pub struct Sample<'a> {
    pub text: &'a str,
    /// The completion's tokens (without EOS).
    pub tokens: &'a [u32],
    /// The prompt's tokens and the EOS id (what a reward model reads around the tokens).
    pub prompt: &'a [u32],
    pub eos: u32,
    pub row: &'a Map<String, Value>,
}

impl Grader {
    /// The completion's score in [0, 1].
    pub fn score(&self, s: &Sample<'_>) -> f64 {
        match self {
            Grader::StringMatch {
                reference,
                case_insensitive,
                contains,
            } => {
                let Some(r) = reference.resolve(s.row) else {
                    return 0.0;
                };
                let (t, r) = if *case_insensitive {
                    (s.text.trim().to_lowercase(), r.trim().to_lowercase())
                } else {
                    (s.text.trim().to_string(), r.trim().to_string())
                };
                f64::from(u8::from(if *contains { t.contains(&r) } else { t == r }))
            }
            Grader::Regex(re) => f64::from(u8::from(re.is_match(s.text))),
            Grader::JsonSchema(g, spec) => f64::from(u8::from(
                g.compile(spec).is_ok_and(|mut c| c.accepts(s.tokens)),
            )),
            Grader::RewardModel(r) => {
                let ids: Vec<u32> = s
                    .prompt
                    .iter()
                    .chain(s.tokens)
                    .copied()
                    .chain([s.eos])
                    .collect();
                // A failed score is no reward (logged): the run goes on.
                match r.reward(&ids) {
                    Ok(x) => 1.0 / (1.0 + (-(x as f64)).exp()),
                    Err(e) => {
                        tracing::warn!(error = %e, "reward model grader");
                        0.0
                    }
                }
            }
            Grader::Length { min, max, unit } => {
                let n = match unit {
                    LengthUnit::Tokens => s.tokens.len(),
                    LengthUnit::Words => s.text.split_whitespace().count(),
                } as u64;
                f64::from(u8::from(n >= *min as u64 && n <= *max as u64))
            }
            Grader::Weighted(gs) => {
                let total: f64 = gs.iter().map(|(w, _)| w).sum();
                gs.iter().map(|(w, g)| w * g.score(s)).sum::<f64>() / total
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    fn no_grammars() -> Result<Arc<Grammars>, String> {
        Err("no grammars here".into())
    }

    struct Fixed(f32);

    impl RewardScorer for Fixed {
        fn reward(&self, ids: &[u32]) -> Result<f32, String> {
            // The prompt, the completion and EOS, in that order.
            assert_eq!(ids.first(), Some(&1000));
            assert_eq!(ids.last(), Some(&2));
            Ok(self.0)
        }
    }

    fn models() -> HashMap<String, Arc<dyn RewardScorer>> {
        HashMap::from([(
            "rm".to_string(),
            Arc::new(Fixed(0.0)) as Arc<dyn RewardScorer>,
        )])
    }

    fn grade(spec: Value, text: &str, r: &Map<String, Value>) -> f64 {
        let spec: GraderSpec = serde_json::from_value(spec).expect("spec");
        let models = models();
        let res = Resources {
            grammars: &no_grammars,
            reward_models: &models,
        };
        let g = compile(&spec, "graders[0]", &[r], &res).expect("compiles");
        let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
        g.score(&Sample {
            text,
            tokens: &tokens,
            prompt: &[1000],
            eos: 2,
            row: r,
        })
    }

    #[test]
    fn each_grader_scores_what_it_says() {
        let r = row(json!({"answer": "Paris", "n": 4}));
        let m = |reference: &str, ci: bool, contains: bool| json!({"type": "string_match", "reference": reference, "case_insensitive": ci, "contains": contains});
        assert_eq!(grade(m("{{row.answer}}", false, false), " Paris ", &r), 1.0);
        assert_eq!(grade(m("{{row.answer}}", false, false), "paris", &r), 0.0);
        assert_eq!(grade(m("{{ item.answer }}", true, false), "paris", &r), 1.0);
        assert_eq!(
            grade(m("{{row.answer}}", true, true), "It is PARIS.", &r),
            1.0
        );
        assert_eq!(grade(m("{{row.n}}", false, true), "4 legs", &r), 1.0);
        assert_eq!(grade(m("Paris", false, false), "Paris", &r), 1.0);
        let re = json!({"type": "regex", "pattern": "^[A-Z][a-z]+\\.?$"});
        assert_eq!(grade(re.clone(), "Paris.", &r), 1.0);
        assert_eq!(grade(re, "the city of Paris", &r), 0.0);
        let words = json!({"type": "length", "max": 3, "unit": "words"});
        assert_eq!(grade(words.clone(), "It is Paris", &r), 1.0);
        assert_eq!(grade(words, "It is Paris, France", &r), 0.0);
        let toks = json!({"type": "length", "min": 2, "max": 5, "unit": "tokens"});
        assert_eq!(grade(toks.clone(), "a", &r), 0.0);
        assert_eq!(grade(toks, "abc", &r), 1.0);
        let sum = json!({"type": "weighted", "graders": [
            {"weight": 3, "grader": m("{{row.answer}}", true, true)},
            {"weight": 1, "grader": {"type": "length", "max": 2, "unit": "words"}},
        ]});
        assert_eq!(grade(sum.clone(), "Paris.", &r), 1.0);
        assert_eq!(grade(sum.clone(), "It is Paris.", &r), 0.75);
        assert_eq!(grade(sum, "No idea", &r), 0.25);
        // A reward model's reward through the logistic: 0 -> 0.5.
        assert_eq!(
            grade(json!({"type": "reward_model", "adapter": "rm"}), "x", &r),
            0.5
        );
    }

    #[test]
    fn bad_specs_are_named() {
        let rows = [row(json!({"answer": "x"})), row(json!({"other": 1}))];
        let refs: Vec<&Map<String, Value>> = rows.iter().collect();
        let err = |spec: Value| {
            let spec: GraderSpec = serde_json::from_value(spec).expect("spec");
            let models = models();
            let res = Resources {
                grammars: &no_grammars,
                reward_models: &models,
            };
            match compile(&spec, "graders[0]", &refs, &res) {
                Ok(_) => panic!("accepted"),
                Err(e) => e,
            }
        };
        let (f, r) = err(json!({"type": "string_match", "reference": "{{row.answer}}"}));
        assert_eq!(f, "graders[0].reference");
        assert!(r.contains("row 2") && r.contains("\"answer\""), "{r}");
        assert_eq!(
            err(json!({"type": "regex", "pattern": "("})).0,
            "graders[0].pattern"
        );
        assert_eq!(
            err(json!({"type": "length", "min": 5, "max": 2, "unit": "words"})).0,
            "graders[0].min"
        );
        assert_eq!(
            err(json!({"type": "weighted", "graders": [{"weight": -1, "grader": {"type": "regex", "pattern": "a"}}]})).0,
            "graders[0].graders[0].weight"
        );
        assert_eq!(
            err(json!({"type": "weighted", "graders": [{"weight": 1, "grader": {"type": "string_match", "reference": "{{row.missing}}"}}]})).0,
            "graders[0].graders[0].grader.reference"
        );
        assert_eq!(
            err(json!({"type": "json_schema", "schema": {"type": "object"}})).1,
            "no grammars here"
        );
    }
}
