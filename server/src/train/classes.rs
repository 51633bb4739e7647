//! Classification data and metrics: a row's label (a name from a fixed set, or an integer
//! index, as `{"text", "label"}` datasets give it), a job's label set, and the evaluation
//! (accuracy, per-class precision/recall/F1 and their macro average).
//!
//! Invariant: a job's label set has at least two labels, each valid for a head
//! ([`check_labels`]); every training and validation row's label is in it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    dataset::{problem, Example, Overflow, Problem, Tokenized, TokenizedOne, MAX_EXAMPLE_TOKENS},
    trainer::Objective,
};
use crate::model::head::check_labels;
use crate::model::TextTokenizer;

/// A row's label as the dataset gives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Label {
    Name(String),
    /// The class with this index (its name is the job's `labels[i]`, or `LABEL_i`).
    Index(u32),
}

/// Most labels a job may have (a head's rows).
pub const MAX_CLASSES: usize = 1024;

impl Label {
    /// A JSON string (non-empty) or a non-negative integer below [`MAX_CLASSES`].
    pub fn parse(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) if !s.trim().is_empty() => Ok(Label::Name(s.clone())),
            Value::String(_) => Err("\"label\" is empty".into()),
            Value::Number(n) => match n.as_u64() {
                Some(i) if (i as usize) < MAX_CLASSES => Ok(Label::Index(i as u32)),
                _ => Err(format!(
                    "\"label\" {n} must be a string or an integer from 0 to {}",
                    MAX_CLASSES - 1
                )),
            },
            other => Err(format!(
                "\"label\" must be a string or an integer, not {other}"
            )),
        }
    }

    /// The key the dataset statistics count it under.
    pub fn key(&self) -> String {
        match self {
            Label::Name(n) => n.clone(),
            Label::Index(i) => i.to_string(),
        }
    }
}

/// Examples per label (by [`Label::key`]).
pub type LabelCounts = BTreeMap<String, u64>;

/// A job's label set: `given` (in the head's output order) when not empty, else the data's
/// names sorted, or `LABEL_0..=max` for integer labels. Every label `seen` in the data must
/// belong to it. The error names what is wrong.
pub fn label_set(given: &[String], seen: &BTreeSet<Label>) -> Result<Vec<String>, String> {
    let names = seen.iter().any(|l| matches!(l, Label::Name(_)));
    let indices = seen.iter().any(|l| matches!(l, Label::Index(_)));
    if names && indices {
        return Err("the dataset mixes string and integer labels".into());
    }
    let set: Vec<String> = if !given.is_empty() {
        given.to_vec()
    } else if indices {
        let max = seen
            .iter()
            .filter_map(|l| match l {
                Label::Index(i) => Some(*i),
                Label::Name(_) => None,
            })
            .max()
            .unwrap_or(0);
        (0..=max).map(|i| format!("LABEL_{i}")).collect()
    } else {
        seen.iter().map(Label::key).collect()
    };
    if set.len() < 2 {
        return Err(format!(
            "{} label{} ({}); a classifier needs at least two",
            set.len(),
            if set.len() == 1 { "" } else { "s" },
            set.join(", ")
        ));
    }
    if set.len() > MAX_CLASSES {
        return Err(format!("{} labels; at most {MAX_CLASSES}", set.len()));
    }
    check_labels(&set, set.len())?;
    let index = Classes::new(&set);
    for l in seen {
        if index.class(l).is_none() {
            return Err(match l {
                Label::Name(n) => format!("label {n:?} is not one of {}", set.join(", ")),
                Label::Index(i) => format!("label {i} is out of range: {} labels", set.len()),
            });
        }
    }
    Ok(set)
}

/// Checks a job's data against its objective and fixes a classification job's label set
/// (the given one, or the data's): SFT on labelled rows, classification on unlabelled rows
/// and labels outside the set are refused as `(field, reason)`.
pub fn resolve_objective(
    objective: &mut Objective,
    sets: &[&[Tokenized]],
) -> Result<(), (String, String)> {
    let rows = || sets.iter().flat_map(|s| s.iter());
    let (pairs, online) = (objective.on_pairs(), objective.online());
    if rows().any(|t| t.fields.is_some() != online) {
        return Err((
            "dataset".into(),
            if online {
                format!("the {} objective trains on a prompts dataset ({{\"prompt\"}} or {{\"messages\"}} without answers)", objective.name())
            } else {
                format!(
                    "the dataset is a prompts dataset (no answers); it trains grpo, not {}",
                    objective.name()
                )
            },
        ));
    }
    if rows().any(|t| t.rejected.is_some() != pairs) {
        return Err((
            "dataset".into(),
            if pairs {
                format!("the {} objective trains on a preference dataset ({{\"prompt\", \"chosen\", \"rejected\"}} on every row)", objective.name())
            } else {
                format!("the dataset is a preference dataset (prompt, chosen, rejected); it trains the reward_model and dpo objectives, not {}", objective.name())
            },
        ));
    }
    match objective {
        Objective::RewardModel { .. }
        | Objective::Dpo(_)
        | Objective::Grpo(_)
        | Objective::Ppo(_) => Ok(()),
        Objective::Sft => {
            if rows().any(|t| t.label.is_some()) {
                return Err((
                    "objective".into(),
                    "the dataset is a classification dataset (rows with a \"label\"); use the classification objective".into(),
                ));
            }
            Ok(())
        }
        Objective::Classification { labels } => {
            if rows().any(|t| t.label.is_none()) {
                return Err((
                    "dataset".into(),
                    "the classification objective needs a classification dataset ({\"text\", \"label\"} on every row)".into(),
                ));
            }
            let seen: BTreeSet<Label> = rows().filter_map(|t| t.label.clone()).collect();
            let field = if labels.is_empty() {
                "dataset"
            } else {
                "classification.labels"
            };
            *labels = label_set(labels, &seen).map_err(|e| (field.to_string(), e))?;
            Ok(())
        }
    }
}

/// What a dataset's rows have been so far: labelled or not, and which label kind.
#[derive(Default)]
pub(super) struct LabelKinds {
    /// (the first row's line, whether it had a label)
    first: Option<(usize, bool)>,
    /// (the first labelled row's line, whether its label was an integer)
    kind: Option<(usize, bool)>,
}

impl LabelKinds {
    /// Every row like the first: all labelled (with labels of one kind) or none.
    pub(super) fn check(&mut self, e: &Example) -> Result<(), Problem> {
        let (line, labelled) = *self.first.get_or_insert((e.line, e.label.is_some()));
        if labelled != e.label.is_some() {
            return Err(problem(
                e.line,
                "mixed formats",
                format!(
                    "line {line} {} a \"label\" and this one {}; a classification dataset labels every row",
                    if labelled { "has" } else { "has no" },
                    if labelled { "has none" } else { "has one" },
                ),
            ));
        }
        if let Some(l) = &e.label {
            let int = matches!(l, Label::Index(_));
            let (line, first_int) = *self.kind.get_or_insert((e.line, int));
            if int != first_int {
                return Err(problem(
                    e.line,
                    "mixed labels",
                    format!("line {line}'s label is of the other kind; give every label as a string or every one as an integer"),
                ));
            }
        }
        Ok(())
    }

    /// A classification dataset has two labels or more.
    pub(super) fn finish(&self, counts: &LabelCounts) -> Result<(), Problem> {
        if self.kind.is_some() && counts.len() < 2 {
            let only = counts.keys().next().cloned().unwrap_or_default();
            return Err(problem(
                0,
                "one label",
                format!("every example has the label {only:?}; a classifier needs at least two"),
            ));
        }
        Ok(())
    }
}

/// A classification row: its text's ids (no EOS; nothing trained on the LM head), cut to
/// the first `max_seq_len` as transformers' truncation does, or refused.
pub(super) fn tokenize_labelled(
    e: &Example,
    tk: &TextTokenizer,
    max_seq_len: usize,
    overflow: Overflow,
) -> Result<TokenizedOne, Problem> {
    let text = e.segments.first().map_or("", |s| s.0.as_str());
    let mut ids = tk
        .encode(text)
        .map_err(|err| problem(e.line, "tokenizer", err.to_string()))?;
    if ids.is_empty() {
        return Err(problem(e.line, "empty text", "the text has no tokens"));
    }
    if ids.len() > MAX_EXAMPLE_TOKENS {
        return Err(problem(
            e.line,
            "too long",
            format!("over {MAX_EXAMPLE_TOKENS} tokens, the most an example may have"),
        ));
    }
    let truncated = ids.len() > max_seq_len;
    if truncated {
        if overflow == Overflow::Reject {
            return Err(problem(
                e.line,
                "too long",
                format!("{} tokens; max_seq_len is {max_seq_len}", ids.len()),
            ));
        }
        ids.truncate(max_seq_len);
    }
    Ok(TokenizedOne {
        tokens: Tokenized {
            mask: vec![false; ids.len()],
            ids,
            label: e.label.clone(),
            rejected: None,
            fields: None,
        },
        truncated,
    })
}

/// A label set's lookup from a row's label to its class index.
pub struct Classes {
    by_name: HashMap<String, u32>,
    len: usize,
}

impl Classes {
    pub fn new(labels: &[String]) -> Self {
        Self {
            by_name: labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), i as u32))
                .collect(),
            len: labels.len(),
        }
    }

    pub fn class(&self, l: &Label) -> Option<u32> {
        match l {
            Label::Name(n) => self.by_name.get(n).copied(),
            Label::Index(i) => ((*i as usize) < self.len).then_some(*i),
        }
    }
}

/// One class's scores on a validation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Validation rows with this gold label.
    pub support: u64,
}

/// A classifier's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassEval {
    pub accuracy: f64,
    /// The unweighted mean of the per-class F1 scores of the labels in the gold or the
    /// predicted classes (scikit-learn's `macro`).
    pub macro_f1: f64,
    pub per_class: Vec<ClassScore>,
}

/// Accuracy and per-class F1 of predictions against gold classes (0 where a ratio's
/// denominator is 0, as scikit-learn's `zero_division=0`).
pub fn evaluate(pred: &[u32], gold: &[u32], labels: &[String]) -> ClassEval {
    let n = labels.len();
    let (mut tp, mut fp, mut fneg) = (vec![0u64; n], vec![0u64; n], vec![0u64; n]);
    for (&p, &g) in pred.iter().zip(gold) {
        let (p, g) = (p as usize, g as usize);
        if p == g {
            tp[g] += 1;
        } else {
            fp[p.min(n - 1)] += 1;
            fneg[g.min(n - 1)] += 1;
        }
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class: Vec<ClassScore> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let precision = ratio(tp[i], tp[i] + fp[i]);
            let recall = ratio(tp[i], tp[i] + fneg[i]);
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            ClassScore {
                label: l.clone(),
                precision,
                recall,
                f1,
                support: tp[i] + fneg[i],
            }
        })
        .collect();
    // As scikit-learn's default: the mean over the labels present in the gold or the
    // predicted classes (a label neither has scores nothing either way).
    let present: Vec<f64> = (0..n)
        .filter(|&i| tp[i] + fp[i] + fneg[i] > 0)
        .map(|i| per_class[i].f1)
        .collect();
    ClassEval {
        accuracy: ratio(tp.iter().sum(), gold.len() as u64),
        macro_f1: present.iter().sum::<f64>() / present.len().max(1) as f64,
        per_class,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> BTreeSet<Label> {
        v.iter().map(|s| Label::Name(s.to_string())).collect()
    }

    #[test]
    fn labels_parse_from_strings_and_integers_only() {
        assert_eq!(Label::parse(&"food".into()), Ok(Label::Name("food".into())));
        assert_eq!(Label::parse(&3.into()), Ok(Label::Index(3)));
        for bad in [
            serde_json::json!(""),
            serde_json::json!(-1),
            serde_json::json!(1.5),
            serde_json::json!(1024),
            serde_json::json!(true),
            serde_json::json!(["a"]),
        ] {
            assert!(Label::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_label_set_comes_from_the_job_or_the_data() {
        let seen = names(&["weather", "food", "sport"]);
        assert_eq!(
            label_set(&[], &seen).expect("sorted"),
            ["food", "sport", "weather"]
        );
        let given: Vec<String> = ["sport", "weather", "food", "other"]
            .map(String::from)
            .to_vec();
        assert_eq!(label_set(&given, &seen).expect("given"), given);
        let e = label_set(&given[..2], &seen).expect_err("food not in the set");
        assert!(e.contains("\"food\" is not one of sport, weather"), "{e}");
        let e = label_set(&[], &names(&["food"])).expect_err("one label");
        assert!(e.contains("at least two"), "{e}");
        let ints: BTreeSet<Label> = [Label::Index(0), Label::Index(2)].into();
        assert_eq!(
            label_set(&[], &ints).expect("ints"),
            ["LABEL_0", "LABEL_1", "LABEL_2"]
        );
        let two: Vec<String> = vec!["a".into(), "b".into()];
        assert!(label_set(&two, &ints)
            .expect_err("2 out of range")
            .contains("out of range"));
        let mixed: BTreeSet<Label> = [Label::Index(0), Label::Name("a".into())].into();
        assert!(label_set(&[], &mixed).expect_err("mixed").contains("mixes"));
        let dup: Vec<String> = vec!["a".into(), "a".into()];
        assert!(label_set(&dup, &BTreeSet::new())
            .expect_err("twice")
            .contains("twice"));
    }

    #[test]
    fn per_class_f1_is_scikit_learns() {
        let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        // gold a a b b c ; pred a b b b a
        let e = evaluate(&[0, 1, 1, 1, 0], &[0, 0, 1, 1, 2], &labels);
        assert!((e.accuracy - 0.6).abs() < 1e-12);
        let f: Vec<f64> = e.per_class.iter().map(|c| c.f1).collect();
        // a: p 1/2 r 1/2 -> 0.5; b: p 2/3 r 1 -> 0.8; c: 0
        assert!((f[0] - 0.5).abs() < 1e-12 && (f[1] - 0.8).abs() < 1e-12 && f[2] == 0.0);
        assert!((e.macro_f1 - 1.3 / 3.0).abs() < 1e-12);
        // A label in neither the gold nor the predictions does not count in the mean.
        let four: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let e4 = evaluate(&[0, 1, 1, 1, 0], &[0, 0, 1, 1, 2], &four);
        assert_eq!(e4.per_class[3].support, 0);
        assert!((e4.macro_f1 - e.macro_f1).abs() < 1e-12);
        assert_eq!(
            e.per_class.iter().map(|c| c.support).collect::<Vec<_>>(),
            [2, 2, 1]
        );
    }
}
