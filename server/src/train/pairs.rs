//! The preference objectives, trained on pairs of completions of one prompt: a reward
//! model's pairwise loss on a scalar head, and DPO's loss on sequence log-probabilities
//! against a frozen reference.
//!
//! A micro-batch of `B` pairs is one padded batch of `2B` rows, the chosen sides first, so
//! one forward pass serves both sides. DPO's reference log-probabilities (the base with the
//! adapter off) are computed once per example before training and kept with the job's
//! checkpoints ([`References`]), never recomputed per step.
//! Metric names are TRL's (`rewards/chosen`, `rewards/margins`, `logps/rejected`, ...).

use std::{collections::BTreeMap, path::Path};

use candle_core::{Device, Tensor};

use super::{
    dataset::Tokenized,
    sequences::{hidden, sequence_logps, SeqBatch},
    trainable::Trainable,
    trainer::{DpoLoss, DpoSettings, Objective, TrainError},
};
use crate::model::BaseModel;

/// Named scalars of a step or an evaluation.
pub type Metrics = BTreeMap<String, f64>;

/// One padded batch of `2B` rows: the chosen sides of `B` pairs, then their rejected sides.
pub struct PairBatch {
    seqs: SeqBatch,
    margins: Tensor,
    pub pairs: usize,
    pub tokens: usize,
}

/// The batch of `pairs` (each a preference row: chosen in `ids`, rejected beside it).
pub fn pair_batch(pairs: &[&Tokenized], pad: u32) -> Result<PairBatch, TrainError> {
    let mut sides: Vec<(&[u32], &[bool])> = Vec::with_capacity(2 * pairs.len());
    let mut margins = Vec::with_capacity(pairs.len());
    for p in pairs {
        sides.push((&p.ids, &p.mask));
        margins.push(p.rejected.as_ref().map_or(0.0, |r| r.margin));
    }
    for p in pairs {
        let r = p.rejected.as_ref().ok_or_else(|| {
            TrainError::Label("a preference objective needs preference rows".into())
        })?;
        sides.push((&r.ids, &r.mask));
    }
    let seqs = SeqBatch::new(&sides, pad)?;
    Ok(PairBatch {
        tokens: seqs.tokens,
        seqs,
        margins: Tensor::from_vec(margins, pairs.len(), &Device::Cpu)?,
        pairs: pairs.len(),
    })
}

/// `log σ(x)`, computed stably: `min(x, 0) − log(1 + e^{−|x|})`.
pub fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let abs = x.abs()?;
    let min0 = ((x - &abs)? * 0.5)?;
    min0 - ((abs.neg()?.exp()? + 1.0)?.log()?)
}

/// The reference's log-probabilities of every pair's two completions, `(chosen, rejected)`
/// per example, computed once for a DPO job and kept beside its checkpoints.
pub struct References {
    pub train: Vec<[f32; 2]>,
    pub eval: Vec<[f32; 2]>,
}

const REFERENCES_FILE: &str = "reference_logps.safetensors";

impl References {
    /// Reads the job's stored references, or computes them with `reference` (none: the
    /// base, the adapter off) and stores them first.
    pub fn load_or_compute(
        model: &BaseModel,
        reference: Option<&dyn Trainable>,
        train: &[Tokenized],
        eval: &[Tokenized],
        batch: usize,
        pad: u32,
        dir: &Path,
    ) -> Result<Self, TrainError> {
        let path = dir.join(REFERENCES_FILE);
        if path.exists() {
            let saved = candle_core::safetensors::load(&path, &Device::Cpu)
                .map_err(|e| TrainError::Checkpoint(format!("reading {REFERENCES_FILE}: {e}")))?;
            let get = |k: &str, n: usize| -> Result<Vec<[f32; 2]>, TrainError> {
                let t = saved.get(k).ok_or_else(|| {
                    TrainError::Checkpoint(format!("{REFERENCES_FILE} lacks {k}"))
                })?;
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                if v.len() != 2 * n {
                    return Err(TrainError::Checkpoint(format!(
                        "{REFERENCES_FILE}: {k} holds {} pairs, the job has {n}",
                        v.len() / 2
                    )));
                }
                Ok(v.chunks_exact(2).map(|c| [c[0], c[1]]).collect())
            };
            return Ok(Self {
                train: get("train", train.len())?,
                eval: get("eval", eval.len())?,
            });
        }
        let of = |set: &[Tokenized]| -> Result<Vec<[f32; 2]>, TrainError> {
            let mut out = Vec::with_capacity(set.len());
            for chunk in set.chunks(batch.max(1)) {
                let rows: Vec<&Tokenized> = chunk.iter().collect();
                let b = pair_batch(&rows, pad)?;
                let lp = sequence_logps(model, reference, &b.seqs)?.to_vec1::<f32>()?;
                let (c, r) = lp.split_at(b.pairs);
                out.extend(c.iter().zip(r).map(|(&c, &r)| [c, r]));
            }
            Ok(out)
        };
        let refs = Self {
            train: of(train)?,
            eval: of(eval)?,
        };
        let flat = |v: &[[f32; 2]]| {
            Tensor::from_vec(
                v.iter().flatten().copied().collect::<Vec<f32>>(),
                (v.len(), 2),
                &Device::Cpu,
            )
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| TrainError::Checkpoint(format!("creating the job's folder: {e}")))?;
        let tensors = [
            ("train".to_string(), flat(&refs.train)?),
            ("eval".to_string(), flat(&refs.eval)?),
        ]
        .into();
        super::trainer::save_tensors(&path, &tensors)?;
        Ok(refs)
    }
}

/// A preference objective's loss on one batch, its metrics (sums over the batch's pairs;
/// the caller divides), and how many pairs it ranked right.
pub struct PairLoss {
    pub loss: Tensor,
    pub sums: Metrics,
    pub correct: usize,
}

/// The loss of `b` under `objective` with the adapter `vars`; `refs` are the reference
/// log-probabilities of the batch's pairs (DPO).
pub fn pair_loss(
    model: &BaseModel,
    vars: &dyn Trainable,
    objective: &Objective,
    b: &PairBatch,
    refs: &[[f32; 2]],
) -> Result<PairLoss, TrainError> {
    match objective {
        Objective::RewardModel {
            center_rewards_coefficient,
        } => reward_loss(model, vars, b, *center_rewards_coefficient),
        Objective::Dpo(s) => dpo_loss(model, vars, b, s, refs),
        other => Err(TrainError::Label(format!(
            "the {} objective does not train on pairs",
            other.name()
        ))),
    }
}

/// The reward model's scalar of each row, `(2B,)`: the head on the last token's hidden state.
fn rewards(model: &BaseModel, vars: &dyn Trainable, b: &PairBatch) -> Result<Tensor, TrainError> {
    let h = hidden(model, Some(vars), &b.seqs)?;
    let (rows, t, width) = h.dims3()?;
    let h = h
        .reshape((rows * t, width))?
        .index_select(&b.seqs.last, 0)?;
    let head = vars
        .head()?
        .ok_or_else(|| TrainError::Label("a reward model needs its head".into()))?;
    Ok(h.matmul(&head.t()?)?.squeeze(1)?)
}

/// TRL's `RewardTrainer` loss: `−log σ(r_c − r_r − margin)`, plus the centring term.
fn reward_loss(
    model: &BaseModel,
    vars: &dyn Trainable,
    b: &PairBatch,
    center: f64,
) -> Result<PairLoss, TrainError> {
    let r = rewards(model, vars, b)?;
    let (rc, rr) = (r.narrow(0, 0, b.pairs)?, r.narrow(0, b.pairs, b.pairs)?);
    let diff = (&rc - &rr)?;
    let mut loss = log_sigmoid(&(&diff - &b.margins)?)?.neg()?.mean_all()?;
    if center > 0.0 {
        loss = (loss + ((&rc + &rr)?.sqr()?.mean_all()? * center)?)?;
    }
    let (c, rj, d) = (
        rc.to_vec1::<f32>()?,
        rr.to_vec1::<f32>()?,
        diff.to_vec1::<f32>()?,
    );
    let correct = d.iter().filter(|&&x| x > 0.0).count();
    let sums = Metrics::from([
        ("rewards/chosen".into(), sum(&c)),
        ("rewards/rejected".into(), sum(&rj)),
        ("rewards/margins".into(), sum(&d)),
        ("rewards/accuracies".into(), correct as f64),
    ]);
    Ok(PairLoss {
        loss,
        sums,
        correct,
    })
}

fn sum(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum()
}

/// DPO (Rafailov et al.) and its IPO and hinge variants, as TRL's `DPOTrainer` computes
/// them; the implicit rewards are `β (log π − log π_ref)` of each side.
fn dpo_loss(
    model: &BaseModel,
    vars: &dyn Trainable,
    b: &PairBatch,
    s: &DpoSettings,
    refs: &[[f32; 2]],
) -> Result<PairLoss, TrainError> {
    let lp = sequence_logps(model, Some(vars), &b.seqs)?;
    let (pc, pr) = (lp.narrow(0, 0, b.pairs)?, lp.narrow(0, b.pairs, b.pairs)?);
    let dev = Device::Cpu;
    let ref_c = Tensor::from_vec(refs.iter().map(|r| r[0]).collect(), b.pairs, &dev)?;
    let ref_r = Tensor::from_vec(refs.iter().map(|r| r[1]).collect(), b.pairs, &dev)?;
    let (dc, dr) = ((&pc - &ref_c)?, (&pr - &ref_r)?);
    let h = (&dc - &dr)?;
    let losses = dpo_losses(&h, s)?;
    let loss = losses.mean_all()?;
    let (c, r) = (
        (dc * s.beta)?.to_vec1::<f32>()?,
        (dr * s.beta)?.to_vec1::<f32>()?,
    );
    let correct = c.iter().zip(&r).filter(|(c, r)| c > r).count();
    let margins: Vec<f32> = c.iter().zip(&r).map(|(c, r)| c - r).collect();
    let sums = Metrics::from([
        ("rewards/chosen".into(), sum(&c)),
        ("rewards/rejected".into(), sum(&r)),
        ("rewards/margins".into(), sum(&margins)),
        ("rewards/accuracies".into(), correct as f64),
        ("logps/chosen".into(), sum(&pc.to_vec1::<f32>()?)),
        ("logps/rejected".into(), sum(&pr.to_vec1::<f32>()?)),
    ]);
    Ok(PairLoss {
        loss,
        sums,
        correct,
    })
}

/// Per-pair DPO losses of the log-ratio differences `h`.
pub fn dpo_losses(h: &Tensor, s: &DpoSettings) -> candle_core::Result<Tensor> {
    let bh = (h * s.beta)?;
    match s.loss_type {
        DpoLoss::Sigmoid => {
            let eps = s.label_smoothing;
            let pos = (log_sigmoid(&bh)? * (1.0 - eps))?;
            let neg = (log_sigmoid(&bh.neg()?)? * eps)?;
            (pos + neg)?.neg()
        }
        DpoLoss::Ipo => (h - 1.0 / (2.0 * s.beta))?.sqr(),
        DpoLoss::Hinge => (bh.neg()? + 1.0)?.relu(),
    }
}

/// Folds one batch's sums into a running total.
pub fn add_metrics(total: &mut Metrics, sums: &Metrics) {
    for (k, v) in sums {
        *total.entry(k.clone()).or_default() += v;
    }
}

/// Sums over `n` pairs as means.
pub fn mean_metrics(sums: Metrics, n: usize) -> Metrics {
    sums.into_iter()
        .map(|(k, v)| (k, v / n.max(1) as f64))
        .collect()
}
