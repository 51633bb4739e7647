//! LoRA math over the frozen base: per-row low-rank updates `y += s * B (A x)` beside the
//! shared weights (never merged into them), and the merged reference `W + s*B*A`.
//! Weights here are already in the model's layout (GGUF q/k row order); reading and writing
//! PEFT files is `adapters::peft`'s job.
//! Invariant: an update touches only its own row, so a row's result never depends on which
//! other adapters share the batch.

use candle_core::Tensor;

use super::{
    config::LlamaConfig,
    weights::{LayerWeights, Linear, Weights},
};

/// The seven linear modules of a Llama block, in PEFT's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// The PEFT/HF module name (`q_proj`...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// The HF parent path (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_hf_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.hf_name() == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// This module's weight shape `(out, in)` in a model of shape `cfg`.
    pub fn shape(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (h, f, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim());
        match self {
            Module::Q | Module::O => (h, h),
            Module::K | Module::V => (kv, h),
            Module::Gate | Module::Up => (f, h),
            Module::Down => (h, f),
        }
    }

    /// This module's base weight in a layer.
    pub fn of(self, l: &LayerWeights) -> &Linear {
        match self {
            Module::Q => &l.q,
            Module::K => &l.k,
            Module::V => &l.v,
            Module::O => &l.o,
            Module::Gate => &l.gate,
            Module::Up => &l.up,
            Module::Down => &l.down,
        }
    }

    fn of_mut(self, l: &mut LayerWeights) -> &mut Linear {
        match self {
            Module::Q => &mut l.q,
            Module::K => &mut l.k,
            Module::V => &mut l.v,
            Module::O => &mut l.o,
            Module::Gate => &mut l.gate,
            Module::Up => &mut l.up,
            Module::Down => &mut l.down,
        }
    }
}

/// One module's low-rank pair, row-major f32: `A: (r, in)` and `B` stored transposed,
/// `b_t = B^T: (r, out)`, so the update `y += B t` is `r` contiguous axpys over `out`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b_t: Vec<f32>,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
}

impl LoraPair {
    /// `y += scale * B (A x)` for one row.
    pub fn apply_row(&self, x: &[f32], y: &mut [f32]) {
        let mut t = [0f32; 256];
        let mut heap;
        let t: &mut [f32] = if self.rank <= t.len() {
            &mut t[..self.rank]
        } else {
            heap = vec![0f32; self.rank];
            &mut heap
        };
        for (j, tj) in t.iter_mut().enumerate() {
            let a = &self.a[j * self.in_features..(j + 1) * self.in_features];
            *tj = dot(a, x) * self.scale;
        }
        // Each output sums its r terms in order j = 0..r (fixed per row, batch-invariant).
        for (j, &tj) in t.iter().enumerate() {
            let bj = &self.b_t[j * self.out_features..(j + 1) * self.out_features];
            for (yo, &b) in y.iter_mut().zip(bj) {
                *yo = b.mul_add(tj, *yo);
            }
        }
    }

    pub fn bytes(&self) -> usize {
        (self.a.len() + self.b_t.len()) * 4
    }

    /// `B: (out, r)` row-major, as PEFT stores it.
    pub fn b(&self) -> Vec<f32> {
        transpose(&self.b_t, self.rank, self.out_features)
    }

    /// `scale * B A` as an `(out, in)` tensor.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::from_slice(&self.a, (self.rank, self.in_features), &dev)?;
        let b_t = Tensor::from_slice(&self.b_t, (self.rank, self.out_features), &dev)?;
        b_t.t()?.matmul(&a)? * self.scale as f64
    }
}

/// `(rows, cols)` row-major -> `(cols, rows)`.
pub fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len() / 8 * 8;
    for (ac, bc) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = ac[l].mul_add(bc[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in n..a.len() {
        s = a[i].mul_add(b[i], s);
    }
    s
}

/// A LoRA adapter for a whole model: `layers[l][module]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraWeights {
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

impl LoraWeights {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| Default::default()).collect(),
        }
    }

    pub fn get(&self, layer: usize, m: Module) -> Option<&LoraPair> {
        self.layers.get(layer)?[m.index()].as_ref()
    }

    pub fn set(&mut self, layer: usize, m: Module, pair: LoraPair) {
        self.layers[layer][m.index()] = Some(pair);
    }

    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .map(LoraPair::bytes)
            .sum()
    }

    /// The largest rank of any module.
    pub fn max_rank(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .map(|p| p.rank)
            .max()
            .unwrap_or(0)
    }

    /// The modules targeted in at least one layer.
    pub fn modules(&self) -> Vec<Module> {
        Module::ALL
            .into_iter()
            .filter(|m| self.layers.iter().any(|l| l[m.index()].is_some()))
            .collect()
    }

    /// The reference path: a copy of `base` with `W + s*B*A` merged into every targeted
    /// weight (packed decode forms dropped, so the merged model runs the f32 path only).
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

/// Adds each row's LoRA update: `rows[i]` is `Some(adapter)` for rows that have one.
/// `x: (n, in)`, `y: (n, out)` row-major.
pub fn apply_rows(
    rows: &[Option<&LoraWeights>],
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
            .all(|r| r.and_then(|a| a.get(layer, m)).is_none())
    {
        return;
    }
    let (inp, out) = (x.len() / n, y.len() / n);
    y.par_chunks_mut(out)
        .zip(x.par_chunks(inp))
        .zip(rows.par_iter())
        .for_each(|((yr, xr), a)| {
            if let Some(p) = a.and_then(|a| a.get(layer, m)) {
                p.apply_row(xr, yr);
            }
        });
}
