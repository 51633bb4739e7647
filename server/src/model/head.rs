//! The output hook: an adapter's own output layer in place of the language-model head.
//! A [`ClassHead`] is `LlamaForSequenceClassification`'s `score`: a bias-free linear map from
//! the final-norm hidden state of a sequence's last token to one logit per label. A sequence
//! whose adapter has one is classified, not continued: it is prefill-only, and its one
//! output is the class logits.
//!
//! Invariant: `weight` is `(labels.len(), hidden)` row-major and never empty.

use candle_core::{Device, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct ClassHead {
    /// The labels in the order of the head's rows (`id2label`).
    pub labels: Vec<String>,
    /// `(labels, hidden)`, row-major.
    pub weight: Vec<f32>,
    pub hidden: usize,
}

impl ClassHead {
    /// A head of `weight.len() / hidden` rows named `LABEL_0..` (transformers' default
    /// `id2label`).
    pub fn new(weight: Vec<f32>, hidden: usize) -> Self {
        let n = weight.len() / hidden.max(1);
        Self {
            labels: (0..n).map(|i| format!("LABEL_{i}")).collect(),
            weight,
            hidden,
        }
    }

    pub fn num_labels(&self) -> usize {
        self.labels.len()
    }

    /// A head of one output is a reward model's (transformers' `num_labels: 1`, as TRL's
    /// reward models are saved): it scores rather than classifies.
    pub fn is_reward(&self) -> bool {
        self.num_labels() == 1
    }

    pub fn bytes(&self) -> usize {
        self.weight.len() * 4 + self.labels.iter().map(String::len).sum::<usize>()
    }

    /// The class logits of one final-norm hidden state.
    pub fn apply_row(&self, h: &[f32]) -> Vec<f32> {
        self.weight
            .chunks_exact(self.hidden)
            .map(|w| w.iter().zip(h).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// The weight as a `(labels, hidden)` tensor.
    pub fn tensor(&self, dev: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.weight, (self.num_labels(), self.hidden), dev)
    }

    /// Replaces the labels; their number must be the head's.
    pub fn with_labels(mut self, labels: Vec<String>) -> Result<Self, String> {
        check_labels(&labels, self.num_labels())?;
        self.labels = labels;
        Ok(self)
    }
}

/// A replaced LM head (PEFT's `modules_to_save: ["lm_head"]`): the adapter's own whole
/// output layer `(vocab, hidden)` row-major, used in place of the base's for the rows of
/// sequences that use the adapter (they generate as usual). For SmolLM2, whose LM head is
/// tied to the input embeddings, this unties them for that adapter only.
#[derive(Debug, Clone, PartialEq)]
pub struct LmHead {
    pub weight: Vec<f32>,
    pub hidden: usize,
}

impl LmHead {
    pub fn vocab(&self) -> usize {
        self.weight.len() / self.hidden.max(1)
    }

    pub fn bytes(&self) -> usize {
        self.weight.len() * 4
    }

    /// The logits of one final-norm hidden state (rows in parallel).
    pub fn apply_row(&self, h: &[f32]) -> Vec<f32> {
        use rayon::prelude::*;
        self.weight
            .par_chunks_exact(self.hidden)
            .map(|w| w.iter().zip(h).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// The weight as a `(vocab, hidden)` tensor.
    pub fn tensor(&self, dev: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.weight, (self.vocab(), self.hidden), dev)
    }
}

/// Longest label accepted, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;

/// Labels of a `rows`-row head: that many, none empty or too long, no two alike.
pub fn check_labels(labels: &[String], rows: usize) -> Result<(), String> {
    if labels.len() != rows {
        return Err(format!(
            "{} labels given; the head has {rows} outputs",
            labels.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for l in labels {
        if l.is_empty() || l.len() > MAX_LABEL_BYTES {
            return Err(format!(
                "label {l:?} must be 1 to {MAX_LABEL_BYTES} bytes long"
            ));
        }
        if !seen.insert(l.as_str()) {
            return Err(format!("label {l:?} appears twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_maps_a_hidden_state_to_one_logit_per_row() {
        let h = ClassHead::new(vec![1.0, 0.0, 0.5, -1.0, 2.0, 2.0], 2);
        assert_eq!(h.labels, ["LABEL_0", "LABEL_1", "LABEL_2"]);
        assert_eq!(h.apply_row(&[2.0, 3.0]), vec![2.0, -2.0, 10.0]);
        assert!(h.clone().with_labels(vec!["a".into(), "b".into()]).is_err());
        assert!(h
            .clone()
            .with_labels(vec!["a".into(), "b".into(), "a".into()])
            .is_err());
        let h = h
            .with_labels(vec!["a".into(), "b".into(), "c".into()])
            .expect("three distinct labels");
        assert_eq!(h.labels[2], "c");
    }
}
