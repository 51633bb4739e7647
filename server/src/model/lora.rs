//! LoRA math over the frozen base: per-row low-rank updates `y += s * B (A x)` beside the
//! shared weights (never merged into them), and the merged reference `W + s*B*A`. A LoRA
//! adapter is an [`super::adapter::Adapter`] whose linear parts are [`LoraPair`]s.
//! Weights here are already in the model's layout (GGUF q/k row order); reading and writing
//! PEFT files is `adapters::peft`'s job.
//! Invariant: an update touches only its own row, so a row's result never depends on which
//! other adapters share the batch.

use candle_core::Tensor;

pub use super::sites::Module;

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

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
