//! Fused ops of the differentiable forward (training and the plain path): each computes
//! what a chain of candle ops computes, but keeps one output tensor for the backward where
//! the chain keeps one per op. A training step's memory is mostly these kept tensors (a
//! causal softmax over `(B, heads, T, T)` scores was five of them).
//!
//! Each op runs on the CPU over f32; [`causal_softmax`], [`rms_norm`], [`rope_i`],
//! [`swiglu`] and [`cross_entropy`] fall back to the candle chain elsewhere (a GPU, bf16).
//! The tests hold every op equal to its chain in values and gradients.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor, WithDType, D};
use rayon::prelude::*;

/// The contiguous values of an op's argument.
fn slice_of<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

/// The contiguous f32 values of an op's argument.
pub(super) fn values<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    slice_of(s, l, what)
}

/// Runs `f` on the contiguous f32 values of a tensor held on the CPU.
pub(super) fn with_values<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(values(s, layout, what)?),
        _ => Err(candle_core::Error::Msg(format!(
            "{what} must be on the CPU"
        ))),
    }
}

/// The last dimension of a shape.
pub(super) fn last(shape: &Shape) -> candle_core::Result<usize> {
    shape
        .dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("a scalar has no rows".into()))
}

/// Whether `t` can take the fused form.
fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// Softmax over the last dimension of attention scores `(.., T, P)`, scaled by `scale`,
/// where query `i` (of `T`) sees keys `0..=i + offset` and the rest get probability 0.
struct CausalSoftmax {
    scale: f32,
    offset: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s, l, "scores")?;
        let p = last(l.shape())?;
        let t = l.dims().len().checked_sub(2).map_or(1, |i| l.dims()[i]);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(p)
            .zip(x.par_chunks(p))
            .enumerate()
            .for_each(|(r, (o, x))| {
                let seen = (r % t + self.offset + 1).min(p);
                let max = x[..seen]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &v| m.max(v * self.scale));
                let mut sum = 0f32;
                for (o, &v) in o[..seen].iter_mut().zip(&x[..seen]) {
                    *o = (v * self.scale - max).exp();
                    sum += *o;
                }
                for o in &mut o[..seen] {
                    *o /= sum;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // ds = scale * p * (g - sum(g * p)); masked keys have p = 0.
        let (p, g) = (res.detach(), g.detach());
        let dot = (&g * &p)?.sum_keepdim(D::Minus1)?;
        Ok(Some(
            (g.broadcast_sub(&dot)? * p)?.affine(self.scale as f64, 0.)?,
        ))
    }
}

/// Causal softmax of attention scores `(B, heads, T, P)`: `softmax(scores * scale + mask)`
/// where query `i` sees keys `0..=i + offset` (`offset` = `P - T`, a prefix's length).
pub fn causal_softmax(scores: &Tensor, scale: f64, offset: usize) -> candle_core::Result<Tensor> {
    if fusable(scores) {
        return scores.contiguous()?.apply_op1(CausalSoftmax {
            scale: scale as f32,
            offset,
        });
    }
    causal_softmax_chain(scores, scale, offset)
}

/// [`causal_softmax`] op by op.
pub fn causal_softmax_chain(
    scores: &Tensor,
    scale: f64,
    offset: usize,
) -> candle_core::Result<Tensor> {
    let (t, p) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..p).map(move |j| {
                if j > i + offset {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, p), scores.device())?.to_dtype(scores.dtype())?;
    candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, D::Minus1)
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x^2) + eps) * alpha`.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, alpha) = (values(s1, l1, "x")?, values(s2, l2, "alpha")?);
        let n = last(l1.shape())?;
        if alpha.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "rms-norm: alpha has {} values for rows of {n}",
                alpha.len()
            )));
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, x)| {
                let r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / n as f32 + self.eps).sqrt();
                for ((o, &v), &a) in o.iter_mut().zip(x).zip(alpha) {
                    *o = v * r * a;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // With r = 1/rms and xh = x r: dx = r (dy - xh mean(dy xh)), dy = g alpha;
        // dalpha = sum over rows of g xh.
        let (x, alpha, g) = (x.detach(), alpha.detach(), g.detach());
        let r = ((x.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?.sqrt()?).recip()?;
        let xh = x.broadcast_mul(&r)?;
        let dy = g.broadcast_mul(&alpha)?;
        let m = (&dy * &xh)?.mean_keepdim(D::Minus1)?;
        let dx = (dy - xh.broadcast_mul(&m)?)?.broadcast_mul(&r)?;
        let rows = g.elem_count() / alpha.elem_count().max(1);
        let da = (g * xh)?
            .reshape((rows, alpha.elem_count()))?
            .sum(0)?
            .reshape(alpha.shape())?;
        Ok((Some(dx), Some(da)))
    }
}

/// RMSNorm of `x` over its last dimension with weight `alpha`.
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if fusable(x) && fusable(alpha) {
        return x
            .contiguous()?
            .apply_op2(&alpha.contiguous()?, RmsNorm { eps });
    }
    candle_nn::ops::rms_norm_slow(x, alpha, eps)
}

/// `silu(g) * u`, the gated feed-forward's product.
struct Swiglu;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (values(s1, l1, "gate")?, values(s2, l2, "up")?);
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::Msg(format!(
                "swiglu: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            )));
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d silu(g) / dg = s (1 + g (1 - s)), s = sigmoid(g).
        let (g, u, grad) = (g.detach(), u.detach(), grad.detach());
        let s = candle_nn::ops::sigmoid(&g)?;
        let silu = (&g * &s)?;
        let dsilu = (&s * ((&g * (1.0 - &s)?)? + 1.0)?)?;
        Ok((Some((&grad * u)?.mul(&dsilu)?), Some((grad * silu)?)))
    }
}

/// `silu(g) * u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    if fusable(g) && fusable(u) {
        return g.contiguous()?.apply_op2(&u.contiguous()?, Swiglu);
    }
    candle_nn::ops::silu(g)? * u
}

/// Interleaved rotary embedding of `(B, heads, T, D)`: each pair `(x[2i], x[2i+1])` of
/// position `t` rotated by the angle whose cosine and sine are `cos[t, i]`, `sin[t, i]`.
struct RopeI {
    /// `(T, D/2)` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    t: usize,
}

impl RopeI {
    /// Rotates every row of `x` by its position's angle, or by its negative (`back`: the
    /// backward, the rotation's transpose).
    fn rotate(&self, x: &[f32], d: usize, back: bool) -> Vec<f32> {
        let half = d / 2;
        let sign = if back { -1.0 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(r, (o, x))| {
                let at = (r % self.t) * half;
                let (cos, sin) = (&self.cos[at..at + half], &self.sin[at..at + half]);
                for i in 0..half {
                    let (x0, x1, c, s) = (x[2 * i], x[2 * i + 1], cos[i], sign * sin[i]);
                    o[2 * i] = x0 * c - x1 * s;
                    o[2 * i + 1] = x0 * s + x1 * c;
                }
            });
        out
    }
}

impl CustomOp1 for RopeI {
    fn name(&self) -> &'static str {
        "rope-i"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s, l, "x")?;
        let d = last(l.shape())?;
        let rows_t = l.dims().len().checked_sub(2).map_or(1, |i| l.dims()[i]);
        if rows_t != self.t || self.cos.len() != self.t * (d / 2) || d % 2 != 0 {
            return Err(candle_core::Error::Msg(format!(
                "rope-i: x {:?} against tables of {} positions x {}",
                l.dims(),
                self.t,
                self.cos.len() / self.t.max(1)
            )));
        }
        Ok((CpuStorage::F32(self.rotate(x, d, false)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = x.dim(D::Minus1)?;
        let g: Vec<f32> = g.detach().contiguous()?.flatten_all()?.to_vec1()?;
        let dx = self.rotate(&g, d, true);
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Interleaved RoPE of `x: (B, heads, T, D)` with `cos`, `sin`: `(T, D/2)`, as
/// `candle_nn::rotary_emb::rope_i_slow`.
pub fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if fusable(x) && fusable(cos) && fusable(sin) {
        let t = cos.dim(0)?;
        let op = RopeI {
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
            t,
        };
        return x.contiguous()?.apply_op1(op);
    }
    candle_nn::rotary_emb::rope_i_slow(x, cos, sin)
}

/// Mean cross-entropy of `logits: (N, C)` against `targets: (N)` (u32 class indices).
struct CrossEntropy;

/// Per row: `logsumexp(row)` and `softmax(row)` into `probs` when given.
fn log_sum_exp(row: &[f32], probs: Option<&mut [f32]>) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = match probs {
        Some(p) => {
            let mut s = 0f32;
            for (p, &v) in p.iter_mut().zip(row) {
                *p = (v - max).exp();
                s += *p;
            }
            p.iter_mut().for_each(|p| *p /= s);
            s
        }
        None => row.iter().map(|&v| (v - max).exp()).sum(),
    };
    max + sum.ln()
}

/// The class index of each row, checked against `classes`.
fn classes_of(t: &[u32], n: usize, classes: usize) -> candle_core::Result<Vec<usize>> {
    if t.len() != n {
        return Err(candle_core::Error::Msg(format!(
            "cross-entropy: {} targets for {n} rows",
            t.len()
        )));
    }
    t.iter()
        .map(|&c| {
            let c = c as usize;
            if c < classes {
                Ok(c)
            } else {
                Err(candle_core::Error::Msg(format!(
                    "cross-entropy: target {c} of {classes} classes"
                )))
            }
        })
        .collect()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let logits = values(s1, l1, "logits")?;
        let c = last(l1.shape())?;
        let n = logits.len() / c.max(1);
        let classes = classes_of(slice_of(s2, l2, "targets")?, n, c)?;
        let total: f64 = logits
            .par_chunks(c)
            .zip(classes.par_iter())
            .map(|(row, &k)| (log_sum_exp(row, None) - row[k]) as f64)
            .sum();
        Ok((
            CpuStorage::F32(vec![(total / n.max(1) as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d/dlogits = (softmax - onehot) * g / N.
        let (n, c) = logits.dims2()?;
        let classes = classes_of(&targets.to_vec1::<u32>()?, n, c)?;
        let g = grad.detach().to_scalar::<f32>()? / n.max(1) as f32;
        let mut d = vec![0f32; n * c];
        // The logits read where they are: a copy would be `N x C` floats (100 MB for 512
        // tokens of SmolLM2's vocabulary) written once and read once.
        with_values(logits, "logits", |x| {
            d.par_chunks_mut(c)
                .zip(x.par_chunks(c).zip(classes.par_iter()))
                .for_each(|(d, (row, &k))| {
                    log_sum_exp(row, Some(d));
                    d[k] -= 1.0;
                    d.iter_mut().for_each(|v| *v *= g);
                });
            Ok(())
        })?;
        Ok((Some(Tensor::from_vec(d, (n, c), logits.device())?), None))
    }
}

/// Mean cross-entropy of `logits: (N, C)` against class indices `targets: (N)`, as
/// `candle_nn::loss::cross_entropy`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if fusable(logits) && targets.device().is_cpu() && targets.dtype() == candle_core::DType::U32 {
        return logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy);
    }
    candle_nn::loss::cross_entropy(logits, targets)
}

/// What the tests of a fused op check it with.
#[cfg(test)]
pub(crate) mod check {
    use candle_core::{Device, Result, Tensor, Var};

    /// The largest absolute difference of two same-shaped tensors.
    pub fn worst(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()
    }

    /// `fused` and `chain` of the same vars: equal values, and equal gradients of a random
    /// weighting of their outputs (not trivial ones), no gradient keeping a graph the chain's
    /// does not (one would keep the step's whole forward alive in the optimizer's state).
    pub fn same(vars: &[&Var], fused: &Tensor, chain: &Tensor, tol: f32) -> Result<()> {
        assert_eq!(fused.dims(), chain.dims());
        let d = worst(fused, chain)?;
        assert!(d < tol, "values: {d}");
        let c = Tensor::randn(0f32, 1.0, fused.shape(), &Device::Cpu)?;
        let gf = (fused * &c)?.sum_all()?.backward()?;
        let gc = (chain * &c)?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let (Some(f), Some(p)) = (gf.get(v), gc.get(v)) else {
                panic!("no gradient for var {i}");
            };
            let d = worst(f, p)?;
            assert!(d < tol, "gradient {i}: {d}");
            assert!(!f.track_op() || p.track_op(), "gradient {i} keeps a graph");
            assert!(
                worst(p, &p.zeros_like()?)? > 1e-3,
                "gradient {i} is trivial"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor, Var};

    use super::{check::same, *};

    fn var(shape: &[usize], scale: f64) -> Result<Var> {
        Var::from_tensor(&(Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * scale)?)
    }

    #[test]
    fn causal_softmax_is_the_masked_softmax_chain() -> Result<()> {
        // A prefix of 3 (P = T + 3), and none.
        for (t, p) in [(5, 8), (6, 6)] {
            let s = var(&[2, 3, t, p], 2.0)?;
            let fused = causal_softmax(&s, 0.37, p - t)?;
            let chain = causal_softmax_chain(&s, 0.37, p - t)?;
            same(&[&s], &fused, &chain, 1e-5)?;
            // The mask holds: query 0 sees keys 0..=p-t only.
            let row: Vec<f32> = fused.flatten_all()?.to_vec1()?[..p].to_vec();
            assert!(row[p - t + 1..].iter().all(|&v| v == 0.0), "{row:?}");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_is_the_chain() -> Result<()> {
        let x = var(&[2, 5, 24], 3.0)?;
        let a = var(&[24], 1.0)?;
        let fused = rms_norm(&x, &a, 1e-5)?;
        let chain = candle_nn::ops::rms_norm_slow(&x, &a, 1e-5)?;
        same(&[&x, &a], &fused, &chain, 1e-4)
    }

    #[test]
    fn rope_i_is_the_chain() -> Result<()> {
        let x = var(&[2, 3, 5, 8], 1.0)?;
        let cos = Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu)?;
        let sin = Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu)?;
        let fused = rope_i(&x, &cos, &sin)?;
        let chain = candle_nn::rotary_emb::rope_i_slow(&x, &cos, &sin)?;
        same(&[&x], &fused, &chain, 1e-5)
    }

    #[test]
    fn swiglu_is_the_chain() -> Result<()> {
        let g = var(&[7, 33], 3.0)?;
        let u = var(&[7, 33], 1.0)?;
        let fused = swiglu(&g, &u)?;
        let chain = (candle_nn::ops::silu(&g)? * u.as_tensor())?;
        same(&[&g, &u], &fused, &chain, 1e-5)
    }

    #[test]
    fn cross_entropy_is_candles() -> Result<()> {
        let l = var(&[9, 50], 4.0)?;
        let t = Tensor::from_vec(vec![0u32, 49, 3, 3, 17, 25, 1, 48, 30], 9, &Device::Cpu)?;
        let fused = cross_entropy(&l, &t)?;
        let chain = candle_nn::loss::cross_entropy(&l, &t)?;
        same(&[&l], &fused, &chain, 1e-5)?;
        let bad = Tensor::from_vec(vec![50u32; 9], 9, &Device::Cpu)?;
        assert!(
            cross_entropy(&l, &bad).is_err(),
            "a target past the classes"
        );
        Ok(())
    }
}
