//! The method-generic adapter: one immutable value per adapter version, made of optional
//! parts, whatever method produced it (LoRA, prompt tuning, P-tuning, prefix tuning...).
//! Both forwards consult it at the same hook points:
//! - `post_linear`: a linear module's output is changed per row ([`LinearDelta`]: LoRA's
//!   `y += s B A x`);
//! - the KV prefix: a sequence's cache starts with [`KvPrefix`] (keys already rotated,
//!   values), so real tokens take positions `P..`; prompt tuning and P-tuning become one too
//!   (their virtual tokens depend only on the adapter: the registry runs them through the
//!   base once at load, [`super::Llama::prefix_from_embeddings`]);
//! - the trainer's embedding hook ([`TensorAdapter::prompt`]): virtual input embeddings in
//!   front of the real ones.
//!
//! [`super::Llama::forward_batch`] applies an `Adapter` per row on plain slices;
//! [`super::Llama::forward_hidden`] applies any [`TensorAdapter`] as tensors — an `Adapter`
//! (as constants, to hold one path against the other) or the trainer's `Var`s.
//! Invariant: an adapter's part touches only the rows of sequences that use it, so a row's
//! result never depends on which other adapters share the batch; nothing here is ever
//! merged into the shared weights.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::{lora::LoraPair, sites::Module, weights::Weights};

/// A change to one linear module's output.
#[derive(Debug, Clone, PartialEq)]
pub enum LinearDelta {
    Lora(LoraPair),
}

impl LinearDelta {
    pub fn bytes(&self) -> usize {
        match self {
            LinearDelta::Lora(p) => p.bytes(),
        }
    }

    /// `post_linear` for one row: `y` is the base output for input `x`.
    pub fn post_row(&self, x: &[f32], y: &mut [f32]) {
        match self {
            LinearDelta::Lora(p) => p.apply_row(x, y),
        }
    }

    pub fn as_lora(&self) -> Option<&LoraPair> {
        match self {
            LinearDelta::Lora(p) => Some(p),
        }
    }
}

/// Keys (rotated, in the model's q/k row layout) and values of `len` virtual positions
/// `0..len`, per layer: `keys[layer]` is `(len, kv_dim)` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct KvPrefix {
    pub len: usize,
    pub kv_dim: usize,
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
}

impl KvPrefix {
    pub fn bytes(&self) -> usize {
        2 * self.keys.len() * self.len * self.kv_dim * 4
    }

    /// From rows `(len, layers * 2 * kv_dim)`: per position and layer a key then a value.
    pub fn from_rows(rows: &[f32], len: usize, layers: usize, kv_dim: usize) -> Self {
        let mut keys = vec![Vec::with_capacity(len * kv_dim); layers];
        let mut values = vec![Vec::with_capacity(len * kv_dim); layers];
        for row in rows.chunks_exact(layers * 2 * kv_dim).take(len) {
            for (l, lw) in row.chunks_exact(2 * kv_dim).enumerate() {
                keys[l].extend_from_slice(&lw[..kv_dim]);
                values[l].extend_from_slice(&lw[kv_dim..]);
            }
        }
        Self {
            len,
            kv_dim,
            keys,
            values,
        }
    }

    /// Back to the rows [`Self::from_rows`] reads.
    pub fn to_rows(&self) -> Vec<f32> {
        let d = self.kv_dim;
        let mut out = Vec::with_capacity(self.len * self.keys.len() * 2 * d);
        for t in 0..self.len {
            for (k, v) in self.keys.iter().zip(&self.values) {
                out.extend_from_slice(&k[t * d..(t + 1) * d]);
                out.extend_from_slice(&v[t * d..(t + 1) * d]);
            }
        }
        out
    }
}

/// One adapter version as served.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Adapter {
    /// `linear[layer][module]`; empty when the method has no linear part.
    pub linear: Vec<[Option<LinearDelta>; 7]>,
    pub prefix: Option<Arc<KvPrefix>>,
}

impl Adapter {
    /// An adapter with room for linear parts in `num_layers` layers, none set.
    pub fn new(num_layers: usize) -> Self {
        Self {
            linear: (0..num_layers).map(|_| Default::default()).collect(),
            prefix: None,
        }
    }

    /// An adapter that is only a KV prefix.
    pub fn with_prefix(prefix: KvPrefix) -> Self {
        Self {
            linear: Vec::new(),
            prefix: Some(Arc::new(prefix)),
        }
    }

    pub fn linear(&self, layer: usize, m: Module) -> Option<&LinearDelta> {
        self.linear.get(layer)?[m.index()].as_ref()
    }

    /// The LoRA pair of a module, if that is what the adapter has there.
    pub fn get(&self, layer: usize, m: Module) -> Option<&LoraPair> {
        self.linear(layer, m).and_then(LinearDelta::as_lora)
    }

    pub fn set(&mut self, layer: usize, m: Module, pair: LoraPair) {
        self.linear[layer][m.index()] = Some(LinearDelta::Lora(pair));
    }

    /// Resident bytes of the parts.
    pub fn bytes(&self) -> usize {
        let linear: usize = self
            .linear
            .iter()
            .flat_map(|l| l.iter().flatten())
            .map(LinearDelta::bytes)
            .sum();
        linear + self.prefix.as_ref().map_or(0, |p| p.bytes())
    }

    /// Positions the adapter puts in front of every sequence (they count against the
    /// context window).
    pub fn virtual_tokens(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.len)
    }

    /// The largest LoRA rank of any module.
    pub fn max_rank(&self) -> usize {
        self.linear
            .iter()
            .flat_map(|l| l.iter().flatten())
            .filter_map(|d| d.as_lora().map(|p| p.rank))
            .max()
            .unwrap_or(0)
    }

    /// The modules with a linear part in at least one layer.
    pub fn modules(&self) -> Vec<Module> {
        Module::ALL
            .into_iter()
            .filter(|m| self.linear.iter().any(|l| l[m.index()].is_some()))
            .collect()
    }

    /// The reference path for linear parts: a copy of `base` with `W + s*B*A` merged into
    /// every targeted weight (packed decode forms dropped, so the merged model runs the f32
    /// path only).
    pub fn merged_into(&self, base: &Weights) -> candle_core::Result<Weights> {
        let mut w = base.clone();
        for (li, layer) in w.layers.iter_mut().enumerate() {
            for m in Module::ALL {
                let lin = m.of_mut(layer);
                lin.packed = None;
                if let Some(p) = self.get(li, m) {
                    lin.weight = (&lin.weight + p.delta()?)?;
                }
            }
        }
        w.lm_head.packed = None;
        Ok(w)
    }
}

/// `post_linear` for a step: `rows[i]` is the adapter of row `i` (if any); `x: (n, in)`,
/// `y: (n, out)` row-major, `y` holding the shared weight's output.
pub fn post_linear_rows(
    rows: &[Option<&Adapter>],
    layer: usize,
    m: Module,
    x: &[f32],
    y: &mut [f32],
) {
    use rayon::prelude::*;
    let n = rows.len();
    if n == 0
        || rows
            .iter()
            .all(|r| r.and_then(|a| a.linear(layer, m)).is_none())
    {
        return;
    }
    let (inp, out) = (x.len() / n, y.len() / n);
    y.par_chunks_mut(out)
        .zip(x.par_chunks(inp))
        .zip(rows.par_iter())
        .for_each(|((yr, xr), a)| {
            if let Some(d) = a.and_then(|a| a.linear(layer, m)) {
                d.post_row(xr, yr);
            }
        });
}

/// An adapter as tensors, for [`super::Llama::forward_hidden`]: the trainer's `Var`s, or an
/// [`Adapter`] as constants. Every hook defaults to "nothing here".
pub trait TensorAdapter {
    /// The `post_linear` hook of a module.
    fn linear(&self, _layer: usize, _m: Module) -> Option<&dyn LinearHook> {
        None
    }
    /// Virtual input embeddings `(P, hidden)` placed in front of the real tokens'.
    fn prompt(&self) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
    /// The KV prefix as rows `(P, layers * 2 * kv_dim)`: per position and layer a key
    /// (rotated, model layout) then a value ([`KvPrefix::from_rows`]'s layout).
    fn kv_prefix(&self) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// One module's `post_linear` as tensors: `x: (n, in)`, `y: (n, out)` -> the new `y`.
pub trait LinearHook {
    fn post_linear(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor>;
}

impl LinearHook for LinearDelta {
    fn post_linear(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        match self {
            LinearDelta::Lora(p) => {
                let dev = x.device();
                let a = Tensor::from_slice(&p.a, (p.rank, p.in_features), dev)?;
                let b_t = Tensor::from_slice(&p.b_t, (p.rank, p.out_features), dev)?;
                y + (x.matmul(&a.t()?)?.matmul(&b_t)? * p.scale as f64)?
            }
        }
    }
}

impl TensorAdapter for Adapter {
    fn linear(&self, layer: usize, m: Module) -> Option<&dyn LinearHook> {
        Adapter::linear(self, layer, m).map(|d| d as &dyn LinearHook)
    }

    fn kv_prefix(&self) -> candle_core::Result<Option<Tensor>> {
        let Some(p) = &self.prefix else {
            return Ok(None);
        };
        let width = p.keys.len() * 2 * p.kv_dim;
        Ok(Some(Tensor::from_vec(
            p.to_rows(),
            (p.len, width),
            &Device::Cpu,
        )?))
    }
}
