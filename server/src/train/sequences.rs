//! Batches of whole sequences whose completion tokens are scored one by one: the shared
//! ground of the preference objectives (both sides of a pair) and online RL (rollouts).
//! [`token_logps`] runs the differentiable forward with an adapter, or the base's with
//! none (the reference).

use candle_core::{Device, Tensor, D};

use super::{trainable::Trainable, trainer::TrainError};
use crate::model::{adapter::TensorAdapter, BaseModel};

/// One padded batch of `R` rows; the trained tokens of every row, flattened.
pub struct SeqBatch {
    pub ids: Tensor,
    /// Flat index (`row * T + i`) of each row's last token.
    pub last: Tensor,
    /// Flat indices of the hidden states that predict each trained token, and the tokens.
    pub positions: Tensor,
    pub targets: Tensor,
    /// `(R, N)`: row r's trained tokens are the ones with a 1.
    pub rows: Tensor,
    /// Each row's trained tokens.
    pub counts: Vec<usize>,
    /// Tokens in the batch (padding excluded).
    pub tokens: usize,
}

impl SeqBatch {
    /// The rows `(ids, mask)`: `mask[i]` marks `ids[i]` as trained (predicted from
    /// `ids[..i]`); `pad` fills the rows to the longest.
    pub fn new(rows: &[(&[u32], &[bool])], pad: u32) -> Result<Self, TrainError> {
        let t = rows.iter().map(|s| s.0.len()).max().unwrap_or(1).max(1);
        let (mut ids, mut last, mut positions, mut targets, mut owner) = (
            Vec::with_capacity(rows.len() * t),
            vec![],
            vec![],
            vec![],
            vec![],
        );
        let mut counts = vec![0; rows.len()];
        let mut tokens = 0;
        for (r, (row, mask)) in rows.iter().enumerate() {
            tokens += row.len();
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad, t - row.len()));
            last.push((r * t + row.len().max(1) - 1) as u32);
            for (i, (&id, &m)) in row.iter().zip(mask.iter()).enumerate() {
                if m && i > 0 {
                    positions.push((r * t + i - 1) as u32);
                    targets.push(id);
                    owner.push(r);
                    counts[r] += 1;
                }
            }
        }
        let n = positions.len();
        let mut sel = vec![0f32; rows.len() * n];
        for (j, &r) in owner.iter().enumerate() {
            sel[r * n + j] = 1.0;
        }
        let dev = Device::Cpu;
        Ok(Self {
            ids: Tensor::from_vec(ids, (rows.len(), t), &dev)?,
            last: Tensor::from_vec(last, rows.len(), &dev)?,
            positions: Tensor::from_vec(positions, n, &dev)?,
            targets: Tensor::from_vec(targets, n, &dev)?,
            rows: Tensor::from_vec(sel, (rows.len(), n), &dev)?,
            counts,
            tokens,
        })
    }
}

/// The final-norm hidden states `(R, T, H)` of the batch with the adapter `vars`, or the
/// base's with none.
pub fn hidden(
    model: &BaseModel,
    vars: Option<&dyn Trainable>,
    b: &SeqBatch,
) -> Result<Tensor, TrainError> {
    let llama = vars.and_then(|v| v.model()).unwrap_or(&model.llama);
    Ok(llama.forward_hidden(&b.ids, vars.map(|v| v as &dyn TensorAdapter))?)
}

/// The log-probability of each trained token `(N,)` (differentiable with `vars`), and with
/// `entropy` the mean entropy of the distributions they were drawn from.
pub fn token_logps(
    model: &BaseModel,
    vars: Option<&dyn Trainable>,
    b: &SeqBatch,
    entropy: bool,
) -> Result<(Tensor, Option<f64>), TrainError> {
    let (lp, ent, _) = token_outputs(model, vars, b, entropy)?;
    Ok((lp, ent))
}

/// [`token_logps`], and the final-norm hidden states `(N, H)` that predicted each trained
/// token (a value head reads them).
pub fn token_outputs(
    model: &BaseModel,
    vars: Option<&dyn Trainable>,
    b: &SeqBatch,
    entropy: bool,
) -> Result<(Tensor, Option<f64>, Tensor), TrainError> {
    let h = hidden(model, vars, b)?;
    let (rows, t, width) = h.dims3()?;
    let h = h
        .reshape((rows * t, width))?
        .index_select(&b.positions, 0)?;
    let lm = match vars {
        Some(v) => v.lm_head()?,
        None => None,
    };
    let llama = vars.and_then(|v| v.model()).unwrap_or(&model.llama);
    let logits = match lm {
        Some(w) => h.matmul(&w.t()?)?,
        None => llama.weights.lm_head.forward_train(&h)?,
    };
    let ls = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let lp = ls.gather(&b.targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let ent = if entropy && b.targets.dim(0)? > 0 {
        let ls = ls.detach();
        let h = (ls.exp()? * &ls)?.sum(D::Minus1)?.neg()?;
        Some(h.mean_all()?.to_scalar::<f32>()? as f64)
    } else {
        None
    };
    Ok((lp, ent, h))
}

/// Each row's summed log-probability of its trained tokens, `(R,)`.
pub fn sequence_logps(
    model: &BaseModel,
    vars: Option<&dyn Trainable>,
    b: &SeqBatch,
) -> Result<Tensor, TrainError> {
    let (lp, _) = token_logps(model, vars, b, false)?;
    Ok(b.rows.matmul(&lp.unsqueeze(1)?)?.squeeze(1)?)
}
