//! LoRA math over the frozen base: per-row low-rank updates `y += s * B (A x)` beside the
//! shared weights (never merged into them), and the merged reference `W + s*B*A`. A LoRA
//! adapter is an [`super::adapter::Adapter`] whose linear parts are [`LoraPair`]s.
//! Weights here are already in the model's layout (GGUF q/k row order); reading and writing
//! PEFT files is `adapters::peft`'s job.
//! Invariant: an update touches only its own row, so a row's result never depends on which
//! other adapters share the batch.

use candle_core::Tensor;

pub use super::f32s::F32s;
use super::lora_int8::{self, Isa};
use super::lora_values::Weight;
pub use super::lora_values::{Int8, LoraDtype, Scaled, Values};

pub use super::sites::Module;

/// One module's low-rank pair, row-major as PEFT stores it: `A: (r, in)` and `B: (out, r)`
/// (in the model's row order). In `f32` either may be read in place from a stored file
/// ([`F32s`]): a cold load of a PEFT file with f32 weights copies only q's and k's `B`; on
/// request both are served in `bf16` or `f16` ([`Values`], [`LoraPair::to_dtype`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub a: Values,
    pub b: Values,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f32,
}

impl LoraPair {
    /// `y += scale * B (A x)` for one row. Whatever the float dtype, values are widened to
    /// `f32` before any arithmetic, in one order, so the result is that of an `f32` pair
    /// holding the same values, bit for bit. An `int8` pair runs as integer dot products
    /// over the row quantised to 16 bits ([`super::lora_int8`]).
    pub fn apply_row(&self, x: &[f32], y: &mut [f32]) {
        if let Some(row) = self.int8_row(x, y) {
            return lora_int8::apply_rows(row, Isa::best());
        }
        let r = self.rank;
        let mut stack = [0f32; 256];
        let mut heap;
        let t: &mut [f32] = if r <= stack.len() {
            &mut stack[..r]
        } else {
            heap = vec![0f32; r];
            &mut heap
        };
        let fast = simd();
        self.prefetch_head();
        match &self.a {
            Values::F32(a) => self.shrink(a, x, t, fast),
            Values::Bf16(a) => self.shrink(a, x, t, fast),
            Values::F16(a) => self.shrink(a, x, t, fast),
            // One int8 matrix beside a float one is never served; its values are the same.
            Values::Int8(_) => self.shrink(&self.a.to_f32(), x, t, fast),
        }
        match &self.b {
            Values::F32(b) => add_b_t_any(b, t, y, fast),
            Values::Bf16(b) => add_b_t_any(b, t, y, fast),
            Values::F16(b) => add_b_t_any(b, t, y, fast),
            Values::Int8(_) => add_b_t_any(&self.b.to_f32(), t, y, fast),
        }
    }

    /// [`Self::apply_row`] for rows `x: (n, in)` and `y: (n, out)` of this pair, taken
    /// together (`int8`: its bytes widened once for a tile of four rows; a float pair: each
    /// row of `A` feeds four rows' chains of FMAs at once, and runs of `B`'s rows stay in
    /// L1 for every row), each row's bits those it has alone.
    pub fn apply_rows(&self, x: &[f32], y: &mut [f32]) {
        if let Some(rows) = self.int8_row(x, y) {
            return lora_int8::apply_rows(rows, Isa::best());
        }
        match (&self.a, &self.b) {
            _ if x.len() <= self.in_features => {}
            (Values::F32(a), Values::F32(b)) => return self.float_rows(a, b, x, y),
            (Values::Bf16(a), Values::Bf16(b)) => return self.float_rows(a, b, x, y),
            (Values::F16(a), Values::F16(b)) => return self.float_rows(a, b, x, y),
            _ => {}
        }
        let rows = x.chunks_exact(self.in_features);
        for (x, y) in rows.zip(y.chunks_exact_mut(self.out_features)) {
            self.apply_row(x, y);
        }
    }

    /// [`Self::apply_rows`] for a float pair: [`Self::apply_row`]'s arithmetic for every
    /// row (the same bits), in an order that reads each row of `A`, and each run of `B`'s
    /// rows, once for all the rows while it is in the nearest cache.
    fn float_rows<W: Weight>(&self, a: &[W], b: &[W], x: &[f32], y: &mut [f32]) {
        let (inp, r, out) = (self.in_features, self.rank, self.out_features);
        let n = x.len() / inp;
        assert!(
            x.len() == n * inp && y.len() == n * out,
            "x is (n, in), y (n, out)"
        );
        let fast = simd();
        self.prefetch_head();
        let mut t = vec![0f32; n * r];
        for (j, a) in a.chunks_exact(inp).enumerate() {
            let mut i = 0;
            // Four rows' sums side by side: four chains of fused multiply-adds, not one.
            #[cfg(target_arch = "x86_64")]
            while fast && i + 4 <= n {
                let xs: [&[f32]; 4] = std::array::from_fn(|k| &x[(i + k) * inp..(i + k + 1) * inp]);
                // SAFETY: the CPU has AVX2, FMA and F16C (`simd`).
                #[allow(unsafe_code)]
                let d = unsafe { avx2::dots(a, xs) };
                for (k, d) in d.into_iter().enumerate() {
                    t[(i + k) * r + j] = d * self.scale;
                }
                i += 4;
            }
            for (i, x) in x.chunks_exact(inp).enumerate().skip(i) {
                t[i * r + j] = self.dot(a, x, fast) * self.scale;
            }
        }
        /// Outputs whose rows of `B` every row adds before the next ones.
        const OUTPUTS: usize = 64;
        for o in (0..out).step_by(OUTPUTS) {
            let end = (o + OUTPUTS).min(out);
            for (t, y) in t.chunks_exact(r).zip(y.chunks_exact_mut(out)) {
                add_b_t_any(&b[o * r..end * r], t, &mut y[o..end], fast);
            }
        }
    }

    /// These rows' job for [`lora_int8`], when both matrices are `int8`.
    fn int8_row<'a>(&'a self, x: &'a [f32], y: &'a mut [f32]) -> Option<lora_int8::Rows<'a>> {
        match (&self.a, &self.b) {
            (Values::Int8(a), Values::Int8(b)) => Some(lora_int8::Rows {
                a,
                b,
                scale: self.scale,
                x,
                y,
            }),
            _ => None,
        }
    }

    /// Asks for the first lines of `A` and `B` in cache, ahead of the kernels' own
    /// prefetches (a hint only).
    fn prefetch_head(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            let head = |p: *const u8, bytes: usize| {
                for line in (0..bytes.min(2048)).step_by(64) {
                    // SAFETY: a prefetch reads nothing; the address is inside the matrix.
                    #[allow(unsafe_code)]
                    unsafe {
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                            p.wrapping_add(line).cast(),
                        )
                    };
                }
            };
            for v in [&self.a, &self.b] {
                let (p, bytes) = v.raw();
                head(p, bytes);
            }
        }
    }

    /// `t = scale * A x`.
    fn shrink<A: Weight>(&self, a: &[A], x: &[f32], t: &mut [f32], fast: bool) {
        for (tj, a) in t.iter_mut().zip(a.chunks_exact(self.in_features)) {
            *tj = self.dot(a, x, fast) * self.scale;
        }
    }

    /// `a · x` for a row of `A`: the AVX2 kernel when `fast`, else the plain one (the same
    /// bits).
    fn dot<A: Weight>(&self, a: &[A], x: &[f32], fast: bool) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: the CPU has AVX2, FMA and F16C (`simd`).
            #[allow(unsafe_code)]
            return unsafe { avx2::dot(a, x) };
        }
        let _ = fast;
        dot(a, x)
    }

    /// Both matrices in `dtype` ([`Values::to_dtype`]; in `int8`, `A` scaled by rows and
    /// `B` by columns: one scale per rank component each); an error names the matrix.
    pub fn to_dtype(&self, dtype: LoraDtype) -> Result<Self, String> {
        let (a, b) = match dtype {
            LoraDtype::Int8 => (
                self.a.to_int8(self.in_features, Scaled::Rows),
                self.b.to_int8(self.rank, Scaled::Columns),
            ),
            _ => (self.a.to_dtype(dtype), self.b.to_dtype(dtype)),
        };
        Ok(LoraPair {
            a: a.map_err(|e| format!("lora_A: {e}"))?,
            b: b.map_err(|e| format!("lora_B: {e}"))?,
            ..*self
        })
    }

    pub fn bytes(&self) -> usize {
        self.a.bytes() + self.b.bytes()
    }

    /// `scale * B A` as an `(out, in)` tensor.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::from_slice(&self.a.to_f32(), (self.rank, self.in_features), &dev)?;
        let b = Tensor::from_slice(&self.b.to_f32(), (self.out_features, self.rank), &dev)?;
        b.matmul(&a)? * self.scale as f64
    }
}

/// Whether the AVX2 kernels run: AVX2, FMA and F16C.
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::packed::avx2_fma() && std::arch::is_x86_feature_detected!("f16c");
    #[allow(unreachable_code)]
    false
}

/// `y += B t` through the AVX2 kernel when `fast` and the rank is a multiple of 8, else
/// the plain form (the same bits).
fn add_b_t_any<B: Weight>(b: &[B], t: &[f32], y: &mut [f32], fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast && t.len().is_multiple_of(8) {
        // SAFETY: the CPU has AVX2, FMA and F16C (`simd`).
        #[allow(unsafe_code)]
        unsafe {
            avx2::add_b_t(b, t, y)
        };
        return;
    }
    let _ = fast;
    add_b_t(b, t, y);
}

/// `y += B t`: `b: (out, r)`, `t: (r)`; the plain form of [`avx2::add_b_t`], bit for bit.
fn add_b_t<B: Weight>(b: &[B], t: &[f32], y: &mut [f32]) {
    for (bo, yo) in b.chunks_exact(t.len()).zip(y.iter_mut()) {
        *yo += b_dot(bo, t);
    }
}

/// One output's `Σ_j b_j t_j`: eight lanes `p_l` over the whole 8-chunks of `j` (the first
/// chunk a product, the rest fused multiply-adds), summed `((p0+p1)+(p2+p3)) +
/// ((p4+p5)+(p6+p7))`, then the tail's terms fused in order.
fn b_dot<B: Weight>(b: &[B], t: &[f32]) -> f32 {
    let c = t.len() / 8 * 8;
    let mut p = [0f32; 8];
    if c > 0 {
        for l in 0..8 {
            p[l] = b[l].widen() * t[l];
        }
        for ch in (8..c).step_by(8) {
            for l in 0..8 {
                p[l] = b[ch + l].widen().mul_add(t[ch + l], p[l]);
            }
        }
    }
    let mut s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    for j in c..t.len() {
        s = b[j].widen().mul_add(t[j], s);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Weight;

    /// [`super::dot`] eight lanes at a time, in its order: lane `l` fuses the `l`-th value
    /// of every whole 8-chunk, the lanes are summed `((0+4)+(1+5)) + ((2+6)+(3+7))`, then
    /// the tail is fused in order. One row: [`dots`]'s.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot<A: Weight>(a: &[A], x: &[f32]) -> f32 {
        let [s] = dots(a, [x]);
        s
    }

    /// [`dot`] for `K` rows at once, each in its order (the same bits): `a`'s values are
    /// loaded once for all, and the rows' chains of fused multiply-adds run side by side.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dots<A: Weight, const K: usize>(a: &[A], x: [&[f32]; K]) -> [f32; K] {
        let n = a.len() / 8 * 8;
        assert!(
            x.iter().all(|x| x.len() >= a.len()),
            "x is as long as a row of A"
        );
        let ap = a.as_ptr();
        let mut acc = [_mm256_setzero_ps(); K];
        for c in (0..n).step_by(8) {
            if c.is_multiple_of(32) {
                ahead(ap.add(c), 32);
            }
            let w = A::load8(ap.add(c));
            for (acc, x) in acc.iter_mut().zip(&x) {
                *acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(c)), *acc);
            }
        }
        std::array::from_fn(|k| {
            // The lanes summed `((0+4)+(1+5)) + ((2+6)+(3+7))`, then the tail in order.
            let q = _mm_add_ps(
                _mm256_castps256_ps128(acc[k]),
                _mm256_extractf128_ps(acc[k], 1),
            );
            let h = _mm_hadd_ps(q, q);
            let mut s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
            for i in n..a.len() {
                s = a[i].widen().mul_add(x[k][i], s);
            }
            s
        })
    }

    /// How far ahead of a matrix's reads its lines are asked for.
    const AHEAD_BYTES: usize = 2048;

    /// Asks for the lines `AHEAD_BYTES` past the `n` values at `p` (a hint only: the
    /// address may lie past the matrix; nothing is read).
    #[inline(always)]
    unsafe fn ahead<T>(p: *const T, n: usize) {
        let at = p.cast::<u8>().wrapping_add(AHEAD_BYTES);
        for line in (0..n * std::mem::size_of::<T>()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line).cast());
        }
    }

    /// [`super::add_b_t`] for a rank that is a multiple of 8, eight outputs at a time: each
    /// output's lanes are one register, and the 8 registers' sums come out of one `hadd`
    /// tree in `b_dot`'s order.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn add_b_t<B: Weight>(b: &[B], t: &[f32], y: &mut [f32]) {
        let r = t.len();
        let out = y.len();
        assert_eq!(b.len(), out * r, "B is (out, r)");
        let whole = out / 8 * 8;
        let tp = t.as_ptr();
        for o in (0..whole).step_by(8) {
            let bp = b.as_ptr().add(o * r);
            ahead(bp, 8 * r);
            let mut v = [_mm256_setzero_ps(); 8];
            for (k, vk) in v.iter_mut().enumerate() {
                let row = bp.add(k * r);
                *vk = _mm256_mul_ps(B::load8(row), _mm256_loadu_ps(tp));
                for ch in (8..r).step_by(8) {
                    *vk = _mm256_fmadd_ps(B::load8(row.add(ch)), _mm256_loadu_ps(tp.add(ch)), *vk);
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

pub(crate) fn dot<A: Weight>(a: &[A], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len() / 8 * 8;
    for (ac, bc) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = ac[l].widen().mul_add(bc[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in n..a.len() {
        s = a[i].widen().mul_add(b[i], s);
    }
    s
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::model) fn pair(rank: usize, inp: usize, out: usize) -> LoraPair {
        let v = |n: usize, k: usize| -> Values {
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
            add_b_t::<f32>(&b, &t, &mut plain);
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
            let (pa, pb) = (p.a.to_f32(), p.b.to_f32());
            let x: Vec<f32> = (0..inp).map(|i| ((i % 17) as f32 - 8.0) / 9.0).collect();
            let y0: Vec<f32> = (0..out).map(|i| (i % 5) as f32 - 2.0).collect();
            let mut y = y0.clone();
            p.apply_row(&x, &mut y);
            assert_is_update_in_f64(&y, &y0, &pa, &pb, &x, &p, 1e-4);
        }
    }

    /// `y` is `y0 + scale * B A x` computed in f64 from the values `a` and `b`, to `tol`.
    fn assert_is_update_in_f64(
        y: &[f32],
        y0: &[f32],
        a: &[f32],
        b: &[f32],
        x: &[f32],
        p: &LoraPair,
        tol: f64,
    ) {
        let (r, inp) = (p.rank, p.in_features);
        for o in 0..p.out_features {
            let mut want = y0[o] as f64;
            for j in 0..r {
                let ax: f64 = (0..inp).map(|k| a[j * inp + k] as f64 * x[k] as f64).sum();
                want += p.scale as f64 * b[o * r + j] as f64 * ax;
            }
            let got = y[o] as f64;
            assert!(
                (got - want).abs() < tol,
                "rank {r} out {o}: {got} vs {want}"
            );
        }
    }

    /// The largest difference between `a` and `b`.
    pub(in crate::model) fn worst(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    /// Rows of one pair taken together have the bits each has alone: every dtype, ranks
    /// that are and are not a multiple of 8, outputs past a run of 64 and past a block of 8.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn rows_taken_together_have_the_bits_each_has_alone() {
        // Else the rows' four chains of FMAs side by side would never run here.
        assert!(simd(), "this test needs AVX2, FMA and F16C");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for dtype in [
            LoraDtype::F32,
            LoraDtype::Bf16,
            LoraDtype::F16,
            LoraDtype::Int8,
        ] {
            for (r, inp, out) in [(16, 40, 150), (12, 33, 36), (8, 576, 64)] {
                let p = pair(r, inp, out).to_dtype(dtype).expect("finite");
                let n = 5;
                let x: Vec<f32> = (0..n * inp)
                    .map(|i| ((i * 31 % 17) as f32 - 8.0) / 9.0)
                    .collect();
                let y0: Vec<f32> = (0..n * out).map(|i| (i % 5) as f32 - 2.0).collect();
                let mut together = y0.clone();
                p.apply_rows(&x, &mut together);
                let mut alone = y0.clone();
                for (x, y) in x.chunks(inp).zip(alone.chunks_mut(out)) {
                    p.apply_row(x, y);
                }
                assert_eq!(
                    bits(&together),
                    bits(&alone),
                    "{dtype:?} rank {r} {inp} {out}"
                );
                assert_ne!(together, y0);
            }
        }
    }

    /// A pair served in bf16 or f16 computes exactly what an f32 pair holding the rounded
    /// values computes (ranks 8, 12 and 16: the AVX2 `B` update and the plain one), and
    /// rounding does change the result; the AVX2 `A` dot is the plain one bit for bit.
    #[test]
    fn a_16_bit_pair_is_the_f32_pair_of_its_rounded_values_bit_for_bit() {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for r in [8, 12, 16] {
            let (inp, out) = (43, 20);
            let p = pair(r, inp, out);
            let x: Vec<f32> = (0..inp).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
            let y0: Vec<f32> = (0..out).map(|i| (i % 3) as f32 - 1.0).collect();
            let mut exact = y0.clone();
            p.apply_row(&x, &mut exact);
            for dtype in [LoraDtype::Bf16, LoraDtype::F16] {
                let half = p.to_dtype(dtype).expect("fits");
                assert_eq!(half.bytes() * 2, p.bytes());
                let widened = half.to_dtype(LoraDtype::F32).expect("widens");
                let (mut h, mut w) = (y0.clone(), y0.clone());
                half.apply_row(&x, &mut h);
                widened.apply_row(&x, &mut w);
                assert_eq!(bits(&h), bits(&w), "rank {r} {dtype:?}");
                assert_ne!(bits(&h), bits(&exact), "rank {r} {dtype:?}: rounding shows");
                let worst = worst(&h, &exact);
                assert!(worst < 0.05, "rank {r} {dtype:?}: {worst}");
            }
        }
    }

    /// Each value of an int8 matrix is within half a step of its group (A's rows, B's
    /// columns); an all-zero group is zeros; a value that is not finite is refused.
    #[test]
    fn int8_values_are_within_half_a_step_of_their_group() {
        let v: Vec<f32> = (0..24)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) / 9.0)
            .collect();
        for (scaled, group) in [
            (Scaled::Rows, (|i: usize| i / 6) as fn(usize) -> usize),
            (Scaled::Columns, |i: usize| i % 6),
        ] {
            let q = Int8::quantise(&v, 6, scaled).expect("finite");
            assert_eq!(q.scales.len(), if scaled == Scaled::Rows { 4 } else { 6 });
            for (i, (got, want)) in q.dequantise().iter().zip(&v).enumerate() {
                let step = q.scales[group(i)];
                assert!((got - want).abs() <= step / 2.0 + 1e-7, "{scaled:?} {i}");
            }
            let largest = |g: usize| (0..24).filter(move |&i| group(i) == g).map(|i| v[i].abs());
            for (g, s) in q.scales.iter().enumerate() {
                assert_eq!(
                    *s,
                    largest(g).fold(0f32, f32::max) / 127.0,
                    "{scaled:?} {g}"
                );
            }
        }
        let zeros = Int8::quantise(&[0.0; 8], 4, Scaled::Rows).expect("zeros");
        assert_eq!(zeros.dequantise(), vec![0.0; 8]);
        let e = Int8::quantise(&[1.0, f32::NAN], 2, Scaled::Rows).expect_err("NaN");
        assert!(e.contains("value 1 (NaN) is not finite"), "{e}");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_a_dot_is_the_plain_one_bit_for_bit() {
        assert!(simd(), "this test needs AVX2, FMA and F16C");
        for n in [8, 43, 576, 600] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 31.0)
                .collect();
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 17.0)
                .collect();
            let ab: Vec<half::bf16> = a.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let ah: Vec<half::f16> = a.iter().map(|&v| half::f16::from_f32(v)).collect();
            // SAFETY: checked above.
            #[allow(unsafe_code)]
            let fast = unsafe { [avx2::dot(&a, &x), avx2::dot(&ab, &x), avx2::dot(&ah, &x)] };
            let plain = [dot(&a, &x), dot(&ab, &x), dot(&ah, &x)];
            assert_eq!(fast.map(f32::to_bits), plain.map(f32::to_bits), "n {n}");
            assert_ne!(plain[0], plain[1]);
        }
    }
}
