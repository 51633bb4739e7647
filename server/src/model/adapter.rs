//! The method-generic adapter: one immutable value per adapter version, made of optional
//! parts, whatever method produced it (LoRA, DoRA, IA3, bottleneck adapters, prompt tuning,
//! P-tuning, prefix tuning...). Both forwards consult it at the same hook points:
//! - `pre_linear`: a linear module's input is changed per row before the shared weight
//!   (IA3 on a feed-forward module: `x *= l`);
//! - `post_linear`: a linear module's output is changed per row ([`LinearDelta`]: LoRA's
//!   `y += s B A x`, IA3's `y *= l`, DoRA's `y = g (y + s B A x)`);
//! - `after_sublayer`: the block's state after attention or the FFN is computed from the
//!   sublayer's output and its residual input ([`Bottleneck`]; by default `r + h`);
//! - the KV prefix: a sequence's cache starts with [`KvPrefix`] (keys already rotated,
//!   values), so real tokens take positions `P..`; prompt tuning and P-tuning become one too
//!   (their virtual tokens depend only on the adapter: the registry runs them through the
//!   base once at load, [`super::Llama::prefix_from_embeddings`]);
//! - the trainer's embedding hook ([`TensorAdapter::prompt`]): virtual input embeddings in
//!   front of the real ones;
//! - the output: a [`ClassHead`] in place of the LM head on the last position, or a
//!   replaced LM head ([`LmHead`]) ([`super::Llama::forward_step`]; as tensors,
//!   [`TensorAdapter::head`] and [`TensorAdapter::lm_head`]).
//!
//! [`super::Llama::forward_batch`] applies an `Adapter` per row on plain slices;
//! [`super::Llama::forward_hidden`] applies any [`TensorAdapter`] as tensors — an `Adapter`
//! (as constants, to hold one path against the other) or the trainer's `Var`s.
//! Invariant: an adapter's part touches only the rows of sequences that use it, so a row's
//! result never depends on which other adapters share the batch; nothing here is ever
//! merged into the shared weights.

use std::{borrow::Cow, sync::Arc};

use candle_core::{DType, Device, Tensor};

pub use super::bottleneck::Bottleneck;
pub use super::head::{ClassHead, LmHead};
use super::{
    bottleneck,
    lora::LoraPair,
    sites::{Module, Sublayer},
    weights::{Linear, Weights},
};

/// DoRA's parts of one module: a LoRA pair, the learned magnitude, and the gain
/// `magnitude / ||W + s B A||` (per output row, on the dequantised base weight `W`) that the
/// forward uses, computed once by [`Adapter::compile`].
#[derive(Debug, Clone, PartialEq)]
pub struct Dora {
    pub lora: LoraPair,
    pub magnitude: Vec<f32>,
    pub gain: Vec<f32>,
}

impl Dora {
    /// `||W + s B A||` per output row of `weight: (out, in)`, as PEFT's `get_weight_norm`.
    pub fn weight_norm(lora: &LoraPair, weight: &Tensor) -> candle_core::Result<Vec<f32>> {
        // On the CPU in f32 (a GPU holds the base as bf16 there; the adapter is on the CPU).
        let weight = weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        (weight + lora.delta()?)?
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_vec1::<f32>()
    }
}

/// A change to one linear module.
#[derive(Debug, Clone, PartialEq)]
pub enum LinearDelta {
    Lora(LoraPair),
    /// IA3: a learned vector scaling the output (`y *= l`) or, on a feed-forward module,
    /// the input (`x *= l`, before the weight).
    Ia3 {
        scale: Vec<f32>,
        on_input: bool,
    },
    Dora(Box<Dora>),
}

impl LinearDelta {
    pub fn bytes(&self) -> usize {
        match self {
            LinearDelta::Lora(p) => p.bytes(),
            LinearDelta::Ia3 { scale, .. } => scale.len() * 4,
            LinearDelta::Dora(d) => d.lora.bytes() + (d.magnitude.len() + d.gain.len()) * 4,
        }
    }

    /// Whether the module's input is changed (`pre_linear`).
    pub fn has_pre(&self) -> bool {
        matches!(self, LinearDelta::Ia3 { on_input: true, .. })
    }

    /// `pre_linear` for one row of input `x`.
    pub fn pre_row(&self, x: &mut [f32]) {
        if let LinearDelta::Ia3 {
            scale,
            on_input: true,
        } = self
        {
            for (v, l) in x.iter_mut().zip(scale) {
                *v *= l;
            }
        }
    }

    /// `post_linear` for one row: `y` is the base output for input `x`. `low_rank`, when
    /// given, is this row's low-rank update computed apart ([`low_rank_rows`]), added here
    /// in place of computing it.
    pub fn post_row(&self, x: &[f32], y: &mut [f32], low_rank: Option<&[f32]>) {
        let lora = |p: &LoraPair, y: &mut [f32]| match low_rank {
            Some(d) => {
                for (v, d) in y.iter_mut().zip(d) {
                    *v += d;
                }
            }
            None => p.apply_row(x, y),
        };
        match self {
            LinearDelta::Lora(p) => lora(p, y),
            LinearDelta::Ia3 {
                scale,
                on_input: false,
            } => {
                for (v, l) in y.iter_mut().zip(scale) {
                    *v *= l;
                }
            }
            LinearDelta::Ia3 { .. } => {}
            LinearDelta::Dora(d) => {
                debug_assert_eq!(
                    d.gain.len(),
                    y.len(),
                    "DoRA's gains come from Adapter::compile"
                );
                lora(&d.lora, y);
                for (v, g) in y.iter_mut().zip(&d.gain) {
                    *v *= g;
                }
            }
        }
    }

    pub fn as_lora(&self) -> Option<&LoraPair> {
        match self {
            LinearDelta::Lora(p) => Some(p),
            _ => None,
        }
    }

    /// The LoRA pair of a LoRA or DoRA module.
    pub fn low_rank(&self) -> Option<&LoraPair> {
        match self {
            LinearDelta::Lora(p) => Some(p),
            LinearDelta::Dora(d) => Some(&d.lora),
            LinearDelta::Ia3 { .. } => None,
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
    /// `sublayer[layer][site]`; empty when the method has no bottleneck.
    pub sublayer: Vec<[Option<Bottleneck>; 2]>,
    pub prefix: Option<Arc<KvPrefix>>,
    /// The output hook: a classification head in place of the LM head. A sequence of an
    /// adapter with one is classified (prefill only), never continued.
    pub head: Option<Arc<ClassHead>>,
    /// The output hook's other form: a replaced LM head (the rows still generate).
    pub lm_head: Option<Arc<LmHead>>,
}

impl Adapter {
    /// An adapter with room for linear parts in `num_layers` layers, none set.
    pub fn new(num_layers: usize) -> Self {
        Self {
            linear: (0..num_layers).map(|_| Default::default()).collect(),
            sublayer: Vec::new(),
            prefix: None,
            head: None,
            lm_head: None,
        }
    }

    /// An adapter that is only a KV prefix.
    pub fn with_prefix(prefix: KvPrefix) -> Self {
        Self {
            linear: Vec::new(),
            sublayer: Vec::new(),
            prefix: Some(Arc::new(prefix)),
            head: None,
            lm_head: None,
        }
    }

    pub fn linear(&self, layer: usize, m: Module) -> Option<&LinearDelta> {
        self.linear.get(layer)?[m.index()].as_ref()
    }

    pub fn bottleneck(&self, layer: usize, site: Sublayer) -> Option<&Bottleneck> {
        self.sublayer.get(layer)?[site.index()].as_ref()
    }

    /// Whether any part acts on the rows themselves (rather than on the KV cache).
    pub fn has_row_hooks(&self) -> bool {
        !self.linear.is_empty() || !self.sublayer.is_empty()
    }

    /// Computes what the forward needs from the base weights once (DoRA's gains).
    pub fn compile(&mut self, base: &Weights) -> candle_core::Result<()> {
        for (li, layer) in self.linear.iter_mut().enumerate() {
            for m in Module::ALL {
                if let Some(LinearDelta::Dora(d)) = &mut layer[m.index()] {
                    let norm = Dora::weight_norm(&d.lora, &m.of(&base.layers[li]).weight()?)?;
                    d.gain = d.magnitude.iter().zip(&norm).map(|(m, n)| m / n).collect();
                }
            }
        }
        Ok(())
    }

    /// Every LoRA and DoRA pair in `dtype` ([`LoraPair::to_dtype`]): what the registry
    /// serves with `--lora-dtype`. Done before [`Adapter::compile`], so DoRA's gains are
    /// those of the values served. An error names the layer and module. In `int8` the
    /// matrices are quantised straight into one buffer in the order a step reads them
    /// ([`super::lora_values::pack_int8`]).
    pub fn set_lora_dtype(&mut self, dtype: super::lora::LoraDtype) -> Result<(), String> {
        use rayon::prelude::*;
        let mut pairs: Vec<(usize, Module, &mut LoraPair)> = Vec::new();
        for (li, layer) in self.linear.iter_mut().enumerate() {
            for (m, d) in Module::ALL.into_iter().zip(layer.iter_mut()) {
                match d {
                    Some(LinearDelta::Lora(p)) => pairs.push((li, m, p)),
                    Some(LinearDelta::Dora(d)) => pairs.push((li, m, &mut d.lora)),
                    _ => {}
                }
            }
        }
        if dtype == super::lora::LoraDtype::Int8 {
            return Self::pack_int8(pairs);
        }
        // The pairs converted side by side (a cold load waits on this); the first error in
        // layer order is the one reported.
        let done: Vec<Result<(), String>> = pairs
            .par_iter_mut()
            .map(|(li, m, pair)| {
                if pair.a.dtype() != dtype || pair.b.dtype() != dtype {
                    **pair = pair
                        .to_dtype(dtype)
                        .map_err(|e| format!("layer {li} {}: {e}", m.hf_name()))?;
                }
                Ok(())
            })
            .collect();
        done.into_iter().collect::<Result<(), String>>()
    }

    /// [`Adapter::set_lora_dtype`] in `int8`: `pairs`' matrices, `A` by rows and `B` by
    /// columns (as [`LoraPair::to_dtype`] quantises them), in one buffer.
    fn pack_int8(pairs: Vec<(usize, Module, &mut LoraPair)>) -> Result<(), String> {
        use super::lora_values::{Scaled, ToPack};
        let mut names = Vec::with_capacity(2 * pairs.len());
        let mut matrices = Vec::with_capacity(2 * pairs.len());
        for (li, m, p) in pairs {
            names.push((li, m, "lora_A"));
            names.push((li, m, "lora_B"));
            let (cols_a, cols_b) = (p.in_features, p.rank);
            matrices.push(ToPack {
                values: &mut p.a,
                cols: cols_a,
                scaled: Scaled::Rows,
            });
            matrices.push(ToPack {
                values: &mut p.b,
                cols: cols_b,
                scaled: Scaled::Columns,
            });
        }
        super::lora_values::pack_int8(matrices).map_err(|(i, e)| {
            let (li, m, which) = names[i];
            format!("layer {li} {}: {which}: {e}", m.hf_name())
        })
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
        let sublayer: usize = self
            .sublayer
            .iter()
            .flat_map(|l| l.iter().flatten())
            .map(Bottleneck::bytes)
            .sum();
        linear
            + sublayer
            + self.prefix.as_ref().map_or(0, |p| p.bytes())
            + self.head.as_ref().map_or(0, |h| h.bytes())
            + self.lm_head.as_ref().map_or(0, |h| h.bytes())
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
            .filter_map(|d| d.low_rank().map(|p| p.rank))
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

    /// The reference path for linear parts: a copy of `base` with every linear part merged
    /// into its weight (`W + s*B*A`; IA3: `diag(l) W` or `W diag(l)`; DoRA:
    /// `diag(g) (W + s*B*A)`), packed decode forms dropped, so the merged model runs the f32
    /// path only.
    pub fn merged_into(&self, base: &Weights) -> candle_core::Result<Weights> {
        let mut w = base.clone();
        for (li, layer) in w.layers.iter_mut().enumerate() {
            for m in Module::ALL {
                let lin = m.of_mut(layer);
                let base = lin.weight()?;
                let dev = base.device().clone();
                *lin = Linear::new(match self.linear(li, m) {
                    None => base,
                    Some(LinearDelta::Lora(p)) => (&base + p.delta()?)?,
                    Some(LinearDelta::Ia3 { scale, on_input }) => {
                        let l = vector(scale, &dev)?;
                        let l = if *on_input {
                            l.unsqueeze(0)?
                        } else {
                            l.unsqueeze(1)?
                        };
                        base.broadcast_mul(&l)?
                    }
                    Some(LinearDelta::Dora(d)) => (&base + d.lora.delta()?)?
                        .broadcast_mul(&vector(&d.gain, &dev)?.unsqueeze(1)?)?,
                });
            }
        }
        let tied = w.tied();
        w.embed = w.embed.unpacked()?;
        w.lm_head = if tied {
            w.embed.clone()
        } else {
            w.lm_head.unpacked()?
        };
        Ok(w)
    }
}

/// `pre_linear` for a step: the module's input `x: (n, in)` with the rows whose adapter has
/// an input hook on this module changed, a copy; `x` itself when no row has one.
pub fn pre_linear_rows<'x>(
    rows: &[Option<&Adapter>],
    layer: usize,
    m: Module,
    x: &'x [f32],
) -> Cow<'x, [f32]> {
    fn hook<'a>(a: &Option<&'a Adapter>, layer: usize, m: Module) -> Option<&'a LinearDelta> {
        a.and_then(|a| a.linear(layer, m)).filter(|d| d.has_pre())
    }
    let n = rows.len();
    if n == 0 || rows.iter().all(|a| hook(a, layer, m).is_none()) {
        return Cow::Borrowed(x);
    }
    let mut xv = x.to_vec();
    let inp = xv.len() / n;
    for (xr, a) in xv.chunks_mut(inp).zip(rows) {
        if let Some(d) = hook(a, layer, m) {
            d.pre_row(xr);
        }
    }
    Cow::Owned(xv)
}

/// `after_sublayer` for a step: `h: (n, hidden)` holds the sublayer's output and gets the
/// block's new state; `r` is the residual input. Rows without a bottleneck get `r + h`.
pub fn after_sublayer_rows(
    rows: &[Option<&Adapter>],
    layer: usize,
    site: Sublayer,
    h: &mut [f32],
    r: &[f32],
) {
    use rayon::prelude::*;
    let n = rows.len();
    if n == 0 {
        return;
    }
    let hidden = h.len() / n;
    h.par_chunks_mut(hidden)
        .zip(r.par_chunks(hidden))
        .zip(rows.par_iter())
        .for_each(
            |((hr, rr), a)| match a.and_then(|a| a.bottleneck(layer, site)) {
                Some(b) => b.apply_row(hr, rr),
                None => {
                    for (v, s) in hr.iter_mut().zip(rr) {
                        *v += s;
                    }
                }
            },
        );
}

/// The low-rank updates of a step's rows apart from the shared weights' outputs, so they
/// can be computed while those are: for each module `(m, x, out)` of one input (`x: (n,
/// in)`, the module's own after its `pre_linear` hooks), row `i` of its result is `scale *
/// B A x_i` for a row whose adapter has a LoRA or DoRA pair on it, for [`post_linear_rows`]
/// to add; `None` for a module no row has a pair on. Each update lands on `-0.0`, which
/// leaves every value as it is, so adding it later gives the bits of
/// [`LoraPair::apply_row`] on the output itself.
/// A row's modules go one after another, so a thread reads one adapter's bytes in longer
/// runs (an int8 adapter's pairs lie packed in that order).
pub fn low_rank_rows(
    rows: &[Option<&Adapter>],
    layer: usize,
    mods: &[(Module, &[f32], usize)],
) -> Vec<Option<Vec<f32>>> {
    use rayon::prelude::*;
    fn pair<'a>(a: &Option<&'a Adapter>, layer: usize, m: Module) -> Option<&'a LoraPair> {
        a.and_then(|a| a.linear(layer, m))
            .and_then(LinearDelta::low_rank)
    }
    let n = rows.len();
    let mut out: Vec<Option<Vec<f32>>> = mods
        .iter()
        .map(|&(m, _, o)| {
            (n > 0 && rows.iter().any(|r| pair(r, layer, m).is_some()))
                .then(|| vec![-0.0f32; n * o])
        })
        .collect();
    // Each run's slices of the results.
    let runs = runs(rows);
    let mut by_run: Vec<Vec<Option<&mut [f32]>>> = (0..runs.len()).map(|_| Vec::new()).collect();
    for (d, &(_, _, o)) in out.iter_mut().zip(mods) {
        let mut rest = d.as_deref_mut();
        for (slots, run) in by_run.iter_mut().zip(&runs) {
            let (this, next) = match rest.take() {
                Some(r) => {
                    let (a, b) = r.split_at_mut(run.len() * o);
                    (Some(a), Some(b))
                }
                None => (None, None),
            };
            slots.push(this);
            rest = next;
        }
    }
    by_run
        .into_par_iter()
        .zip(runs.par_iter())
        .for_each(|(slots, run)| {
            for (slot, &(m, x, _)) in slots.into_iter().zip(mods) {
                if let (Some(d), Some(p)) = (slot, pair(&rows[run.start], layer, m)) {
                    let inp = x.len() / n;
                    p.apply_rows(&x[run.start * inp..run.end * inp], d);
                }
            }
        });
    out
}

/// Runs of adjacent rows on one adapter (a prompt's tokens), taken together by
/// [`low_rank_rows`]; at most `RUN` long, so a long prompt still spreads over the threads.
fn runs(rows: &[Option<&Adapter>]) -> Vec<std::ops::Range<usize>> {
    const RUN: usize = 8;
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, &row) in rows.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if run.len() < RUN && same(rows[run.start], row) => run.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// Whether two rows are on the same adapter (or both on none).
fn same(a: Option<&Adapter>, b: Option<&Adapter>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// `post_linear` for a step: `rows[i]` is the adapter of row `i` (if any); `x: (n, in)`,
/// `y: (n, out)` row-major, `y` holding the shared weight's output; `low_rank` the rows'
/// [`low_rank_rows`] when they were computed apart (else each is computed here).
pub fn post_linear_rows(
    rows: &[Option<&Adapter>],
    layer: usize,
    m: Module,
    x: &[f32],
    y: &mut [f32],
    low_rank: Option<&[f32]>,
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
        .enumerate()
        .for_each(|(i, ((yr, xr), a))| {
            if let Some(d) = a.and_then(|a| a.linear(layer, m)) {
                d.post_row(xr, yr, low_rank.map(|l| &l[i * out..(i + 1) * out]));
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
    /// The `after_sublayer` hook of a block's sublayer.
    fn sublayer(&self, _layer: usize, _site: Sublayer) -> Option<&dyn SublayerHook> {
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
    /// The output hook: a classification head `(labels, hidden)` applied to the last
    /// position's final-norm state in place of the LM head.
    fn head(&self) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
    /// The output hook's other form: a replaced LM head `(vocab, hidden)` in place of the
    /// base's.
    fn lm_head(&self) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// One module's hooks as tensors: `pre_linear` maps the input `x: (n, in)` (by default
/// unchanged); `post_linear` maps the output `y: (n, out)` of the (pre-hooked) `x`.
pub trait LinearHook {
    fn pre_linear(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(x.clone())
    }
    fn post_linear(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor>;
    /// The whole hooked module `post_linear(pre_linear(x), lin(pre_linear(x)))`
    /// ([`composed`]). A hook may compute the same values with fewer tensors kept for the
    /// backward (a trained LoRA pair: one fused op, [`Linear::forward_train_plus`]).
    fn project(&self, lin: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        composed(self, lin, x)
    }
}

/// [`LinearHook::project`] from the hook points, op by op: the reference a fused form is
/// tested against.
pub fn composed<H: LinearHook + ?Sized>(
    hook: &H,
    lin: &Linear,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let x = hook.pre_linear(x)?;
    let y = lin.forward_train(&x)?;
    hook.post_linear(&x, y)
}

/// A sublayer's `after_sublayer` as tensors: the sublayer's output `h` and residual input
/// `r`, both `(n, hidden)`, -> the block's new state.
pub trait SublayerHook {
    fn after_sublayer(&self, h: &Tensor, r: &Tensor) -> candle_core::Result<Tensor>;
}

impl SublayerHook for Bottleneck {
    fn after_sublayer(&self, h: &Tensor, r: &Tensor) -> candle_core::Result<Tensor> {
        bottleneck::after_sublayer(
            &self.tensors()?,
            self.act,
            self.scaling as f64,
            self.placement,
            h,
            r,
        )
    }
}

fn vector(v: &[f32], dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_slice(v, v.len(), dev)
}

fn low_rank_update(p: &LoraPair, x: &Tensor) -> candle_core::Result<Tensor> {
    let dev = x.device();
    let a = Tensor::from_slice(&p.a.to_f32(), (p.rank, p.in_features), dev)?;
    let b = Tensor::from_slice(&p.b.to_f32(), (p.out_features, p.rank), dev)?;
    x.matmul(&a.t()?)?.matmul(&b.t()?)? * p.scale as f64
}

impl LinearHook for LinearDelta {
    fn pre_linear(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            LinearDelta::Ia3 {
                scale,
                on_input: true,
            } => x.broadcast_mul(&vector(scale, x.device())?),
            _ => Ok(x.clone()),
        }
    }

    fn post_linear(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        match self {
            LinearDelta::Lora(p) => y + low_rank_update(p, x)?,
            LinearDelta::Ia3 {
                scale,
                on_input: false,
            } => y.broadcast_mul(&vector(scale, x.device())?),
            LinearDelta::Ia3 { .. } => Ok(y),
            LinearDelta::Dora(d) => {
                (y + low_rank_update(&d.lora, x)?)?.broadcast_mul(&vector(&d.gain, x.device())?)
            }
        }
    }
}

impl TensorAdapter for Adapter {
    fn linear(&self, layer: usize, m: Module) -> Option<&dyn LinearHook> {
        Adapter::linear(self, layer, m).map(|d| d as &dyn LinearHook)
    }

    fn sublayer(&self, layer: usize, site: Sublayer) -> Option<&dyn SublayerHook> {
        self.bottleneck(layer, site).map(|b| b as &dyn SublayerHook)
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

    fn head(&self) -> candle_core::Result<Option<Tensor>> {
        self.head
            .as_ref()
            .map(|h| h.tensor(&Device::Cpu))
            .transpose()
    }

    fn lm_head(&self) -> candle_core::Result<Option<Tensor>> {
        self.lm_head
            .as_ref()
            .map(|h| h.tensor(&Device::Cpu))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::LoraDtype;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    }

    fn pair(seed: usize, rank: usize, inp: usize, out: usize) -> LoraPair {
        LoraPair {
            a: values(rank * inp, seed).into(),
            b: values(out * rank, seed + 1).into(),
            rank,
            in_features: inp,
            out_features: out,
            scale: 0.75,
        }
    }

    /// Served in int8, an adapter's matrices lie packed in the order a step reads them:
    /// layer by layer, module by module, `A` then `B`, each with its scales after its bytes
    /// and on the cache line after the last one's end.
    #[test]
    fn an_int8_adapter_lies_packed_in_the_order_a_step_reads_it() {
        let (inp, out) = (43, 36);
        let mut a = Adapter::new(2);
        for li in 0..2 {
            for m in [Module::Q, Module::V] {
                a.set(li, m, pair(li * 10 + m.index(), 16, inp, out));
            }
        }
        a.set_lora_dtype(LoraDtype::Int8).expect("finite");
        let mut end: Option<usize> = None;
        for li in 0..2 {
            for m in [Module::Q, Module::V] {
                let p = a.get(li, m).expect("a pair");
                assert_eq!(p.a.dtype(), LoraDtype::Int8);
                for v in [&p.a, &p.b] {
                    let (at, n) = v.raw();
                    let at = at as usize;
                    assert_eq!(at % 64, 0, "layer {li} {m:?}: on a line");
                    if let Some(e) = end {
                        assert_eq!(at, e.next_multiple_of(64), "layer {li} {m:?}: next");
                    }
                    // Its scales right after its bytes, and the next matrix after them.
                    let crate::model::lora_values::Values::Int8(q) = v else {
                        panic!("int8")
                    };
                    let scales = q.scales.as_ptr() as usize;
                    assert_eq!(
                        scales,
                        at + n.next_multiple_of(4),
                        "layer {li} {m:?}: scales"
                    );
                    end = Some(scales + q.scales.len() * 4);
                }
            }
        }
    }

    /// The low-rank updates computed apart (beside the shared weight's product) and added
    /// afterwards give every row the bits of computing them on the output itself: LoRA,
    /// DoRA and IA3 rows and a row without an adapter, with f32 and int8 pairs.
    #[test]
    fn low_rank_updates_computed_apart_give_the_same_bits() {
        let (inp, out, m) = (40, 36, Module::Q);
        for dtype in [LoraDtype::F32, LoraDtype::Int8] {
            let lora_pair = pair(1, 16, inp, out).to_dtype(dtype).expect("finite");
            let mut lora = Adapter::new(1);
            lora.set(0, m, lora_pair);
            let mut dora = Adapter::new(1);
            dora.linear[0][m.index()] = Some(LinearDelta::Dora(Box::new(Dora {
                lora: pair(3, 8, inp, out).to_dtype(dtype).expect("finite"),
                magnitude: vec![1.0; out],
                gain: values(out, 5).iter().map(|g| 1.0 + g).collect(),
            })));
            let mut ia3 = Adapter::new(1);
            ia3.linear[0][m.index()] = Some(LinearDelta::Ia3 {
                scale: values(out, 7),
                on_input: false,
            });
            let rows = [Some(&lora), None, Some(&dora), Some(&ia3), Some(&lora)];
            let n = rows.len();
            let x = values(n * inp, 9);
            let y0 = values(n * out, 11);
            let low = low_rank_rows(&rows, 0, &[(m, &x, out)]);
            assert!(
                low[0].is_some(),
                "{dtype:?}: the updates are computed apart"
            );
            let mut apart = y0.clone();
            post_linear_rows(&rows, 0, m, &x, &mut apart, low[0].as_deref());
            let mut in_place = y0.clone();
            post_linear_rows(&rows, 0, m, &x, &mut in_place, None);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&apart), bits(&in_place), "{dtype:?}");
            let row = |v: &[f32], i: usize| v[i * out..(i + 1) * out].to_vec();
            for i in [0, 2, 3, 4] {
                assert_ne!(row(&apart, i), row(&y0, i), "{dtype:?}: row {i} changed");
            }
            assert_eq!(row(&apart, 1), row(&y0, 1), "no adapter, no change");
            assert!(
                low_rank_rows(&[None, Some(&ia3)], 0, &[(m, &x[..2 * inp], out)])[0].is_none(),
                "no row has a pair"
            );
        }
    }

    /// Adjacent rows on one adapter (a prompt's tokens) are taken together, in runs, and
    /// each row's updates have the bits it has alone: a run longer than one, rows on no
    /// adapter between, a module only one adapter has; f32 and int8 pairs.
    #[test]
    fn rows_in_runs_of_one_adapter_have_the_bits_each_has_alone() {
        let (inp, out) = (40, 36);
        for dtype in [LoraDtype::F32, LoraDtype::Int8] {
            let mut one = Adapter::new(1);
            one.set(
                0,
                Module::Q,
                pair(1, 16, inp, out).to_dtype(dtype).expect("finite"),
            );
            one.set(
                0,
                Module::K,
                pair(2, 8, inp, 20).to_dtype(dtype).expect("finite"),
            );
            let mut two = Adapter::new(1);
            two.set(
                0,
                Module::Q,
                pair(3, 4, inp, out).to_dtype(dtype).expect("finite"),
            );
            let mut rows = vec![Some(&one); 11];
            rows.extend([None, Some(&two), Some(&two), Some(&two), Some(&one)]);
            let n = rows.len();
            assert_eq!(
                runs(&rows),
                [0..8, 8..11, 11..12, 12..15, 15..16],
                "runs of one adapter, at most 8 long"
            );
            let (xq, xk) = (values(n * inp, 9), values(n * inp, 13));
            let mods = |r: std::ops::Range<usize>| {
                [
                    (Module::Q, &xq[r.start * inp..r.end * inp], out),
                    (Module::K, &xk[r.start * inp..r.end * inp], 20),
                ]
            };
            let together = low_rank_rows(&rows, 0, &mods(0..n));
            for (mi, o) in [(0, out), (1, 20)] {
                let all = together[mi].as_deref().expect("a row has the pair");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                for (i, row) in rows.iter().enumerate() {
                    let alone = low_rank_rows(&[*row], 0, &mods(i..i + 1));
                    let want = alone[mi].clone().unwrap_or_else(|| vec![-0.0; o]);
                    let got = &all[i * o..(i + 1) * o];
                    assert_eq!(bits(got), bits(&want), "{dtype:?} module {mi} row {i}");
                }
                assert!(
                    all[..o].iter().any(|v| *v != 0.0),
                    "{dtype:?}: row 0 updated"
                );
            }
        }
    }
}
