//! `x W^T` over a frozen weight as a candle custom op whose backward yields the gradient of
//! `x` only. candle's own matmul backward also computes the weight's gradient, which for
//! frozen base weights is a whole extra matmul per layer thrown away; training would pay a
//! third more compute for nothing.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Shape, Tensor};

use super::fused::{last, values};

pub struct FrozenMatmul {
    /// `(out, in)`; a cheap handle on the shared weight.
    pub weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = matrix(storage, layout, "x")?.matmul(&self.weight.t()?)?;
        output(&y, layout, self.weight.dim(0)?)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let out = self.weight.dim(0)?;
        let g = grad.reshape((grad.elem_count() / out.max(1), out))?;
        Ok(Some(g.matmul(&self.weight)?.reshape(x.shape())?))
    }
}

/// `x W^T` with no gradient for `W`.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })
}

/// `x W^T + t B^T` over a frozen `W`: a projection and a low-rank update whose small input
/// `t: (rows, r)` the caller computes (LoRA's `s x A^T`). A composed `y + t B^T` keeps three
/// `(rows, out)` tensors alive until the backward (the frozen product, the update and their
/// sum); this keeps one. Its backward yields the gradients of `x` (through `W`: `t`'s own
/// dependence on `x` is the caller's graph's), of `t` and of `B`.
pub struct FrozenPlusLowRank {
    /// `(out, in)`; a cheap handle on the shared weight.
    pub weight: Tensor,
}

/// The contiguous f32 values of an argument as a `(rows, cols)` tensor (a copy).
fn matrix(storage: &CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<Tensor> {
    let v = values(storage, layout, what)?;
    let cols = last(layout.shape())?;
    Tensor::from_slice(v, (v.len() / cols.max(1), cols), &Device::Cpu)
}

/// A matmul's result `y: (rows, out)` as the op's output: the input's shape with its last
/// dimension `out`.
fn output(y: &Tensor, input: &Layout, out: usize) -> candle_core::Result<(CpuStorage, Shape)> {
    let mut shape = input.shape().dims().to_vec();
    if let Some(l) = shape.last_mut() {
        *l = out;
    }
    Ok((
        CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
        Shape::from(shape),
    ))
}

impl CustomOp3 for FrozenPlusLowRank {
    fn name(&self) -> &'static str {
        "frozen-plus-low-rank"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, t, b) = (
            matrix(s1, l1, "x")?,
            matrix(s2, l2, "t")?,
            matrix(s3, l3, "B")?,
        );
        if t.dim(0)? != x.dim(0)? || b.dim(1)? != t.dim(1)? || b.dim(0)? != self.weight.dim(0)? {
            return Err(candle_core::Error::Msg(format!(
                "frozen-plus-low-rank: x {:?}, t {:?}, B {:?}, W {:?} do not fit",
                x.dims(),
                t.dims(),
                b.dims(),
                self.weight.dims()
            )));
        }
        let y = (x.matmul(&self.weight.t()?)? + t.matmul(&b.t()?)?)?;
        output(&y, l1, self.weight.dim(0)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let out = self.weight.dim(0)?;
        let rows = grad.elem_count() / out.max(1);
        // From detached arguments: a gradient that kept `t`'s graph (the whole forward,
        // through `x`) would keep it alive in the optimizer's state after the step.
        let g = grad.detach().reshape((rows, out))?;
        let t2 = t.detach().reshape((rows, b.dim(1)?))?;
        let gx = g.matmul(&self.weight)?.reshape(x.shape())?;
        let gt = g.matmul(&b.detach())?.reshape(t.shape())?;
        let gb = g.t()?.matmul(&t2)?;
        Ok((Some(gx), Some(gt), Some(gb)))
    }
}

/// `x W^T + t B^T` with no gradient for `W` ([`FrozenPlusLowRank`]).
pub fn frozen_plus_low_rank(
    x: &Tensor,
    weight: &Tensor,
    t: &Tensor,
    b: &Tensor,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        &t.contiguous()?,
        &b.contiguous()?,
        FrozenPlusLowRank {
            weight: weight.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result, Tensor, Var};

    use super::{super::fused::check::same, frozen_plus_low_rank};

    #[test]
    fn the_fused_update_has_the_composed_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inp, out, r) = (6, 20, 12, 3);
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
        let x = Var::randn(0f32, 1.0, (2, rows / 2, inp), &dev)?;
        let a = Var::randn(0f32, 1.0, (r, inp), &dev)?;
        let b = Var::randn(0f32, 1.0, (out, r), &dev)?;
        // The op flattens leading dimensions; the composed form runs on the flat rows.
        let flat = x.as_tensor().reshape((rows, inp))?;
        let t = (flat.matmul(&a.t()?)? * 0.5)?;
        let fused = frozen_plus_low_rank(&x, &w, &t, &b)?;
        let plain = (flat.matmul(&w.t()?)? + t.matmul(&b.t()?)?)?.reshape((2, rows / 2, out))?;
        same(&[&x, &a, &b], &fused, &plain, 1e-4)
    }
}
