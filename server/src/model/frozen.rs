//! `x W^T` over a frozen weight as a candle custom op whose backward yields the gradient of
//! `x` only. candle's own matmul backward also computes the weight's gradient, which for
//! frozen base weights is a whole extra matmul per layer thrown away; training would pay a
//! third more compute for nothing.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

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
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul needs a contiguous input".into())
        })?;
        let x = &storage.as_slice::<f32>()?[start..end];
        let dims = layout.shape().dims();
        let inp = *dims
            .last()
            .ok_or_else(|| candle_core::Error::Msg("scalar input".into()))?;
        let rows = x.len() / inp.max(1);
        let xt = Tensor::from_slice(x, (rows, inp), self.weight.device())?;
        let y = xt.matmul(&self.weight.t()?)?;
        let out = self.weight.dim(0)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("non-empty") = out;
        Ok((
            CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            Shape::from(shape),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = grad.dims();
        let out = *dims
            .last()
            .ok_or_else(|| candle_core::Error::Msg("scalar grad".into()))?;
        let rows = grad.elem_count() / out.max(1);
        let g = grad.reshape((rows, out))?.matmul(&self.weight)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("non-empty") = self.weight.dim(1)?;
        Ok(Some(g.reshape(shape)?))
    }
}

/// `x W^T` with no gradient for `W`.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })
}
