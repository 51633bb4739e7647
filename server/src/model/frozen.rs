//! `x W^T` over a frozen weight as a candle custom op whose backward yields the gradient of
//! `x` only. candle's own matmul backward also computes the weight's gradient, which for
//! frozen base weights is a whole extra matmul per layer thrown away; training would pay a
//! third more compute for nothing.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use super::fused::{last, values, with_values};

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
        let x = values(storage, layout, "x")?;
        let (out, inp) = self.weight.dims2()?;
        let rows = rows_of(x, inp, "x")?;
        let y = times_frozen_t(&self.weight, x, rows)?;
        Ok((CpuStorage::F32(y), output_shape(layout, out)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let out = self.weight.dim(0)?;
        // Detached, as in `FrozenPlusLowRank::bwd`: a gradient need not keep the graph.
        let g = grad
            .detach()
            .reshape((grad.elem_count() / out.max(1), out))?;
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

/// How many rows of `cols` values `v` holds, refusing a length that is not a whole number.
fn rows_of(v: &[f32], cols: usize, what: &str) -> candle_core::Result<usize> {
    if cols == 0 || !v.len().is_multiple_of(cols) {
        return Err(candle_core::Error::Msg(format!(
            "{what}: {} values are not rows of {cols}",
            v.len()
        )));
    }
    Ok(v.len() / cols)
}

/// `dst (m, n) = lhs (m, k) rhs^T`, or `+=` with `accumulate`, where `rhs` is `(n, k)` row
/// major: a weight as stored. One call of the GEMM candle's own matmul runs (the same kernels,
/// threads and blocking), straight on the slices: no copy of the input into a tensor, none of
/// the result out of one, and no third tensor for a sum.
fn gemm_nt(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == n * k);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let (n_i, k_i) = (n as isize, k as isize);
    // SAFETY: the lengths are asserted above, and every stride below stays inside them:
    // dst and lhs are row major (`(m, n)`, `(m, k)`), and rhs^T's element `(p, j)` is
    // `rhs[j * k + p]`.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n_i,
            accumulate,
            lhs.as_ptr(),
            1,
            k_i,
            rhs.as_ptr(),
            k_i,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `x W^T` for `rows` rows of `x` over a frozen `W: (out, in)`, as a fresh `(rows, out)`.
fn times_frozen_t(weight: &Tensor, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
    let (out, inp) = weight.dims2()?;
    let mut y = vec![0f32; rows * out];
    with_values(weight, "W", |w| {
        gemm_nt(&mut y, x, w, (rows, out, inp), false);
        Ok(())
    })?;
    Ok(y)
}

/// The op's output shape: the input's with its last dimension `out`.
fn output_shape(input: &Layout, out: usize) -> Shape {
    let mut shape = input.shape().dims().to_vec();
    if let Some(l) = shape.last_mut() {
        *l = out;
    }
    Shape::from(shape)
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
            values(s1, l1, "x")?,
            values(s2, l2, "t")?,
            values(s3, l3, "B")?,
        );
        let (out, inp) = self.weight.dims2()?;
        let (rows, r) = (rows_of(x, inp, "x")?, last(l2.shape())?);
        if rows_of(t, r, "t")? != rows || rows_of(b, r, "B")? != out {
            return Err(candle_core::Error::Msg(format!(
                "frozen-plus-low-rank: x {:?}, t {:?}, B {:?}, W {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                self.weight.dims()
            )));
        }
        let mut y = times_frozen_t(&self.weight, x, rows)?;
        gemm_nt(&mut y, t, b, (rows, out, r), true);
        Ok((CpuStorage::F32(y), output_shape(l1, out)))
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

    use super::{super::fused::check::same, frozen_matmul, frozen_plus_low_rank};

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

    #[test]
    fn the_frozen_product_is_candles_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, inp, out) = (70, 96, 40);
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
        let x = Var::randn(0f32, 1.0, (2, rows / 2, inp), &dev)?;
        let fused = frozen_matmul(&x, &w)?;
        let plain = x.as_tensor().broadcast_matmul(&w.t()?)?;
        // The same GEMM with the same blocking: the same bits, straight from the slices.
        assert_eq!(fused.dims(), plain.dims());
        assert_eq!(
            fused.flatten_all()?.to_vec1::<f32>()?,
            plain.flatten_all()?.to_vec1::<f32>()?
        );
        same(&[&x], &fused, &plain, 1e-4)
    }

    #[test]
    fn arguments_that_do_not_fit_are_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 6), candle_core::DType::F32, &dev)?;
        let x = Tensor::zeros((3, 5), candle_core::DType::F32, &dev)?;
        let err = frozen_matmul(&x, &w).err();
        assert!(err.is_some_and(|e| e.to_string().contains("are not rows of 6")));
        let x = Tensor::zeros((3, 6), candle_core::DType::F32, &dev)?;
        let t = Tensor::zeros((2, 2), candle_core::DType::F32, &dev)?;
        let b = Tensor::zeros((4, 2), candle_core::DType::F32, &dev)?;
        let err = frozen_plus_low_rank(&x, &w, &t, &b).err();
        assert!(err.is_some_and(|e| e.to_string().contains("do not fit")));
        Ok(())
    }
}
