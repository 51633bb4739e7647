//! LoRA math over the frozen base: per-row low-rank updates `y += s * B (A x)` beside the
//! shared weights (never merged into them), and the merged reference `W + s*B*A`. A LoRA
//! adapter is an [`super::adapter::Adapter`] whose linear parts are [`LoraPair`]s.
//! Weights here are already in the model's layout (GGUF q/k row order); reading and writing
//! PEFT files is `adapters::peft`'s job.
//! Invariant: an update touches only its own row, so a row's result never depends on which
//! other adapters share the batch.

use candle_core::Tensor;

pub use super::f32s::F32s;

pub use super::sites::Module;

/// One module's low-rank pair, row-major f32 as PEFT stores it: `A: (r, in)` and
/// `B: (out, r)` (in the model's row order). Either may be read in place from a stored
/// file ([`F32s`]): a cold load of a PEFT file with f32 weights copies only q's and k's `B`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub a: F32s,
    pub b: F32s,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
}

impl LoraPair {
    /// `y += scale * B (A x)` for one row.
    pub fn apply_row(&self, x: &[f32], y: &mut [f32]) {
        let r = self.rank;
        let mut stack = [0f32; 256];
        let mut heap;
        let t: &mut [f32] = if r <= stack.len() {
            &mut stack[..r]
        } else {
            heap = vec![0f32; r];
            &mut heap
        };
        for (tj, a) in t.iter_mut().zip(self.a.chunks_exact(self.in_features)) {
            *tj = dot(a, x) * self.scale;
        }
        // y += B t, each output's r terms summed in `b_dot`'s order.
        #[cfg(target_arch = "x86_64")]
        if r.is_multiple_of(8) && super::packed::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            #[allow(unsafe_code)]
            unsafe {
                avx2::add_b_t(&self.b, t, y)
            };
            return;
        }
        add_b_t(&self.b, t, y);
    }

    pub fn bytes(&self) -> usize {
        (self.a.len() + self.b.len()) * 4
    }

    /// `scale * B A` as an `(out, in)` tensor.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::from_slice(&self.a, (self.rank, self.in_features), &dev)?;
        let b = Tensor::from_slice(&self.b, (self.out_features, self.rank), &dev)?;
        b.matmul(&a)? * self.scale as f64
    }
}

/// `y += B t`: `b: (out, r)`, `t: (r)`; the plain form of [`avx2::add_b_t`], bit for bit.
fn add_b_t(b: &[f32], t: &[f32], y: &mut [f32]) {
    for (bo, yo) in b.chunks_exact(t.len()).zip(y.iter_mut()) {
        *yo += b_dot(bo, t);
    }
}

/// One output's `Σ_j b_j t_j`: eight lanes `p_l` over the whole 8-chunks of `j` (the first
/// chunk a product, the rest fused multiply-adds), summed `((p0+p1)+(p2+p3)) +
/// ((p4+p5)+(p6+p7))`, then the tail's terms fused in order.
fn b_dot(b: &[f32], t: &[f32]) -> f32 {
    let c = t.len() / 8 * 8;
    let mut p = [0f32; 8];
    if c > 0 {
        for l in 0..8 {
            p[l] = b[l] * t[l];
        }
        for ch in (8..c).step_by(8) {
            for l in 0..8 {
                p[l] = b[ch + l].mul_add(t[ch + l], p[l]);
            }
        }
    }
    let mut s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    for j in c..t.len() {
        s = b[j].mul_add(t[j], s);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    /// [`super::add_b_t`] for a rank that is a multiple of 8, eight outputs at a time: each
    /// output's lanes are one register, and the 8 registers' sums come out of one `hadd`
    /// tree in `b_dot`'s order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_b_t(b: &[f32], t: &[f32], y: &mut [f32]) {
        let r = t.len();
        let out = y.len();
        assert_eq!(b.len(), out * r, "B is (out, r)");
        let whole = out / 8 * 8;
        let tp = t.as_ptr();
        for o in (0..whole).step_by(8) {
            let bp = b.as_ptr().add(o * r);
            let mut v = [_mm256_setzero_ps(); 8];
            for (k, vk) in v.iter_mut().enumerate() {
                let row = bp.add(k * r);
                *vk = _mm256_mul_ps(_mm256_loadu_ps(row), _mm256_loadu_ps(tp));
                for ch in (8..r).step_by(8) {
                    *vk = _mm256_fmadd_ps(
                        _mm256_loadu_ps(row.add(ch)),
                        _mm256_loadu_ps(tp.add(ch)),
                        *vk,
                    );
                }
            }
            let q0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
            let q1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
            let s = _mm256_add_ps(
                _mm256_permute2f128_ps(q0, q1, 0x20),
                _mm256_permute2f128_ps(q0, q1, 0x31),
            );
            let yp = y.as_mut_ptr().add(o);
            _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), s));
        }
        for o in whole..out {
            y[o] += super::b_dot(&b[o * r..(o + 1) * r], t);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(rank: usize, inp: usize, out: usize) -> LoraPair {
        let v = |n: usize, k: usize| -> F32s {
            (0..n)
                .map(|i| ((i * 7919 + k * 104729) % 1000) as f32 / 1000.0 - 0.5)
                .collect::<Vec<_>>()
                .into()
        };
        LoraPair {
            a: v(rank * inp, 1),
            b: v(out * rank, 2),
            rank,
            in_features: inp,
            out_features: out,
            scale: 0.75,
        }
    }

    /// The AVX2 form of `y += B t` is the plain form bit for bit (ranks 8, 16 and 24, an
    /// output count with a tail), and on this machine it is the one `apply_row` runs.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_b_update_is_the_plain_one_bit_for_bit() {
        assert!(
            crate::model::packed::avx2_fma(),
            "this test needs AVX2 and FMA"
        );
        for (r, out) in [(8, 16), (16, 36), (24, 8)] {
            let b: Vec<f32> = (0..out * r)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 31.0)
                .collect();
            let t: Vec<f32> = (0..r)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 17.0)
                .collect();
            let y0: Vec<f32> = (0..out).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
            let (mut plain, mut fast) = (y0.clone(), y0.clone());
            add_b_t(&b, &t, &mut plain);
            // SAFETY: checked above.
            #[allow(unsafe_code)]
            unsafe {
                avx2::add_b_t(&b, &t, &mut fast)
            };
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&plain), bits(&fast), "rank {r}, {out} outputs");
            assert_ne!(plain, y0);
        }
    }

    /// A row's update is `y + scale * B A x` (in f64 here) to float error, through the
    /// plain `B` update (rank 12) and the AVX2 one (rank 16).
    #[test]
    fn a_rows_update_is_the_plain_low_rank_update() {
        for r in [12, 16] {
            let (inp, out) = (40, 24);
            let p = pair(r, inp, out);
            let x: Vec<f32> = (0..inp).map(|i| ((i % 17) as f32 - 8.0) / 9.0).collect();
            let y0: Vec<f32> = (0..out).map(|i| (i % 5) as f32 - 2.0).collect();
            let mut y = y0.clone();
            p.apply_row(&x, &mut y);
            for o in 0..out {
                let mut want = y0[o] as f64;
                for j in 0..r {
                    let ax: f64 = (0..inp)
                        .map(|k| p.a[j * inp + k] as f64 * x[k] as f64)
                        .sum();
                    want += p.scale as f64 * p.b[o * r + j] as f64 * ax;
                }
                let got = y[o] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "rank {r} out {o}: {got} vs {want}"
                );
            }
        }
    }
}
