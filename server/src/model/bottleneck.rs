//! Bottleneck adapters (Houlsby et al., Pfeiffer et al.) as AdapterHub's `adapters` library
//! computes them on a Llama block: after a sublayer (attention or the FFN) with output `h`
//! and residual input `r`, the block's new state is
//!
//! ```text
//! residual = h                      (residual_before_ln)
//! z        = h + r                  (original_ln_before; the library passes no layer norm for Llama)
//! residual = z                      (!residual_before_ln)
//! up       = W_up f(W_down LN?(z) + b_down) + b_up, times `scaling`
//! out      = LN_after?(up + residual)   (adapter_residual_before_ln) or LN_after?(up) + residual
//! out      = out + r                (original_ln_after)
//! ```
//!
//! (`adapters/methods/modeling.py`: `Adapter.pre_forward`, `forward`, `post_forward`.)
//! Both forms live here: per row on slices (the serving path, row-wise and therefore batch
//! invariant) and as tensors (the plain path and training, differentiable in the
//! parameters), computed from the same parameters.

use candle_core::{Tensor, D};

use super::lora::dot;

/// The bottleneck's non-linearity (transformers' `ACT2FN` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `swish` / `silu`.
    Swish,
    Relu,
    /// Exact (erf) GELU: `gelu`.
    Gelu,
    /// The tanh approximation: `gelu_new`, `gelu_pytorch_tanh`.
    GeluTanh,
    Tanh,
    Sigmoid,
    /// `leakyrelu`: slope 0.01.
    LeakyRelu,
    /// `linear` / `identity`.
    Identity,
}

impl Activation {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "swish" | "silu" => Activation::Swish,
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "tanh" => Activation::Tanh,
            "sigmoid" => Activation::Sigmoid,
            "leakyrelu" => Activation::LeakyRelu,
            "linear" | "identity" => Activation::Identity,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::Swish => "swish",
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::LeakyRelu => "leakyrelu",
            Activation::Identity => "linear",
        }
    }

    fn scalar(self, x: f32) -> f32 {
        match self {
            Activation::Swish => x / (1.0 + (-x).exp()),
            Activation::Relu => x.max(0.0),
            Activation::Gelu => 0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x / 2f32.sqrt())),
            Activation::GeluTanh => {
                let c = (2.0 / std::f32::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::LeakyRelu => {
                if x >= 0.0 {
                    x
                } else {
                    0.01 * x
                }
            }
            Activation::Identity => x,
        }
    }

    fn tensor(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Swish => candle_nn::ops::silu(x),
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::LeakyRelu => x.relu()? - (x.neg()?.relu()? * 0.01)?,
            Activation::Identity => Ok(x.clone()),
        }
    }
}

/// Where the residuals go (AdapterHub's config names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub residual_before_ln: bool,
    pub original_ln_before: bool,
    pub original_ln_after: bool,
    pub adapter_residual_before_ln: bool,
}

impl Placement {
    /// `DoubleSeqBnConfig` / `SeqBnConfig`'s placement (they differ in `original_ln_before`).
    pub fn houlsby() -> Self {
        Self {
            residual_before_ln: true,
            original_ln_before: false,
            original_ln_after: true,
            adapter_residual_before_ln: false,
        }
    }

    pub fn pfeiffer() -> Self {
        Self {
            original_ln_before: true,
            ..Self::houlsby()
        }
    }
}

/// Layer norm eps of the adapter's own norms (`nn.LayerNorm`'s default).
pub const LN_EPS: f32 = 1e-5;

/// One bottleneck after one sublayer, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Bottleneck {
    pub hidden: usize,
    pub size: usize,
    /// `(size, hidden)`, as `nn.Linear` stores it.
    pub down: Vec<f32>,
    pub down_bias: Vec<f32>,
    /// `W_up^T: (size, hidden)`, so the up projection is `size` contiguous axpys.
    pub up_t: Vec<f32>,
    pub up_bias: Vec<f32>,
    pub act: Activation,
    pub scaling: f32,
    pub placement: Placement,
    /// The adapter's own layer norms (weight, bias), when the config asks for them.
    pub ln_before: Option<(Vec<f32>, Vec<f32>)>,
    pub ln_after: Option<(Vec<f32>, Vec<f32>)>,
}

fn layer_norm_row(x: &mut [f32], (w, b): &(Vec<f32>, Vec<f32>)) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + LN_EPS).sqrt();
    for ((v, w), b) in x.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * w + b;
    }
}

impl Bottleneck {
    pub fn bytes(&self) -> usize {
        let ln =
            |l: &Option<(Vec<f32>, Vec<f32>)>| l.as_ref().map_or(0, |(w, b)| w.len() + b.len());
        (self.down.len()
            + self.down_bias.len()
            + self.up_t.len()
            + self.up_bias.len()
            + ln(&self.ln_before)
            + ln(&self.ln_after))
            * 4
    }

    /// One row: `h` is the sublayer's output, `r` its residual input; returns the block's
    /// new state in `h`.
    pub fn apply_row(&self, h: &mut [f32], r: &[f32]) {
        let p = self.placement;
        let residual = if p.residual_before_ln {
            Some(h.to_vec())
        } else {
            None
        };
        if p.original_ln_before {
            for (a, b) in h.iter_mut().zip(r) {
                *a += b;
            }
        }
        let residual = residual.unwrap_or_else(|| h.to_vec());
        let mut z = h.to_vec();
        if let Some(ln) = &self.ln_before {
            layer_norm_row(&mut z, ln);
        }
        let mut out = self.up_bias.clone();
        for j in 0..self.size {
            let d = &self.down[j * self.hidden..(j + 1) * self.hidden];
            let t = self.act.scalar(dot(d, &z) + self.down_bias[j]);
            let u = &self.up_t[j * self.hidden..(j + 1) * self.hidden];
            for (o, &w) in out.iter_mut().zip(u) {
                *o = w.mul_add(t, *o);
            }
        }
        for o in out.iter_mut() {
            *o *= self.scaling;
        }
        if p.adapter_residual_before_ln {
            for (o, s) in out.iter_mut().zip(&residual) {
                *o += s;
            }
        }
        if let Some(ln) = &self.ln_after {
            layer_norm_row(&mut out, ln);
        }
        if !p.adapter_residual_before_ln {
            for (o, s) in out.iter_mut().zip(&residual) {
                *o += s;
            }
        }
        if p.original_ln_after {
            for (o, s) in out.iter_mut().zip(r) {
                *o += s;
            }
        }
        h.copy_from_slice(&out);
    }

    /// The parameters as constant tensors.
    pub fn tensors(&self) -> candle_core::Result<BottleneckTensors> {
        let dev = candle_core::Device::Cpu;
        let (d, hd) = (self.size, self.hidden);
        let ln =
            |l: &Option<(Vec<f32>, Vec<f32>)>| -> candle_core::Result<Option<(Tensor, Tensor)>> {
                l.as_ref()
                    .map(|(w, b)| {
                        Ok((
                            Tensor::from_slice(w, hd, &dev)?,
                            Tensor::from_slice(b, hd, &dev)?,
                        ))
                    })
                    .transpose()
            };
        Ok(BottleneckTensors {
            down: Tensor::from_slice(&self.down, (d, hd), &dev)?,
            down_bias: Tensor::from_slice(&self.down_bias, d, &dev)?,
            up: Tensor::from_slice(&self.up_t, (d, hd), &dev)?
                .t()?
                .contiguous()?,
            up_bias: Tensor::from_slice(&self.up_bias, hd, &dev)?,
            ln_before: ln(&self.ln_before)?,
            ln_after: ln(&self.ln_after)?,
        })
    }
}

/// A bottleneck's parameters as tensors (constants, or the trainer's `Var`s).
#[derive(Debug, Clone)]
pub struct BottleneckTensors {
    /// `(size, hidden)`.
    pub down: Tensor,
    pub down_bias: Tensor,
    /// `(hidden, size)`.
    pub up: Tensor,
    pub up_bias: Tensor,
    pub ln_before: Option<(Tensor, Tensor)>,
    pub ln_after: Option<(Tensor, Tensor)>,
}

fn layer_norm(x: &Tensor, (w, b): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let c = x.broadcast_sub(&mean)?;
    let var = c.sqr()?.mean_keepdim(D::Minus1)?;
    c.broadcast_div(&(var + LN_EPS as f64)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// The tensor form of [`Bottleneck::apply_row`] over rows `h, r: (n, hidden)`.
pub fn after_sublayer(
    t: &BottleneckTensors,
    act: Activation,
    scaling: f64,
    p: Placement,
    h: &Tensor,
    r: &Tensor,
) -> candle_core::Result<Tensor> {
    let z = if p.original_ln_before {
        (h + r)?
    } else {
        h.clone()
    };
    let residual = if p.residual_before_ln { h } else { &z };
    let zin = match &t.ln_before {
        Some(ln) => layer_norm(&z, ln)?,
        None => z.clone(),
    };
    let down = zin.matmul(&t.down.t()?)?.broadcast_add(&t.down_bias)?;
    let up = (act
        .tensor(&down)?
        .matmul(&t.up.t()?)?
        .broadcast_add(&t.up_bias)?
        * scaling)?;
    let mut out = if p.adapter_residual_before_ln {
        (up + residual)?
    } else {
        up
    };
    if let Some(ln) = &t.ln_after {
        out = layer_norm(&out, ln)?;
    }
    if !p.adapter_residual_before_ln {
        out = (out + residual)?;
    }
    if p.original_ln_after {
        out = (out + r)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ln: bool, placement: Placement, act: Activation) -> Bottleneck {
        let (hd, d) = (8, 3);
        let f = |n: usize, k: f32| {
            (0..n)
                .map(|i| ((i as f32 * k).sin()) * 0.3)
                .collect::<Vec<_>>()
        };
        Bottleneck {
            hidden: hd,
            size: d,
            down: f(d * hd, 0.7),
            down_bias: f(d, 1.3),
            up_t: f(d * hd, 0.9),
            up_bias: f(hd, 2.1),
            act,
            scaling: 0.5,
            placement,
            ln_before: ln.then(|| (f(hd, 0.4).iter().map(|v| v + 1.0).collect(), f(hd, 0.2))),
            ln_after: ln.then(|| (f(hd, 0.3).iter().map(|v| v + 1.0).collect(), f(hd, 0.6))),
        }
    }

    #[test]
    fn row_and_tensor_forms_agree_for_every_placement_and_activation() {
        let dev = candle_core::Device::Cpu;
        let placements = [
            Placement::houlsby(),
            Placement::pfeiffer(),
            Placement {
                residual_before_ln: false,
                original_ln_before: true,
                original_ln_after: false,
                adapter_residual_before_ln: true,
            },
        ];
        let acts = [
            Activation::Swish,
            Activation::Relu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Tanh,
            Activation::Sigmoid,
            Activation::LeakyRelu,
            Activation::Identity,
        ];
        let h: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).cos()).collect();
        let r: Vec<f32> = (0..16).map(|i| (i as f32 * 0.11).sin()).collect();
        for ln in [false, true] {
            for p in placements {
                for act in acts {
                    let b = sample(ln, p, act);
                    let mut rows = h.clone();
                    for (hr, rr) in rows.chunks_mut(8).zip(r.chunks(8)) {
                        b.apply_row(hr, rr);
                    }
                    let ht = Tensor::from_slice(&h, (2, 8), &dev).expect("h");
                    let rt = Tensor::from_slice(&r, (2, 8), &dev).expect("r");
                    let t = after_sublayer(&b.tensors().expect("t"), act, 0.5, p, &ht, &rt)
                        .expect("tensor form");
                    let tv: Vec<f32> = t.flatten_all().expect("f").to_vec1().expect("v");
                    let diff = rows
                        .iter()
                        .zip(&tv)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(diff < 1e-5, "{p:?} {act:?} ln={ln}: {diff}");
                    assert!(rows.iter().zip(&h).any(|(a, b)| (a - b).abs() > 1e-3));
                }
            }
        }
    }
}
