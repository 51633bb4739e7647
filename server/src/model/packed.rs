//! Packed (block-quantised) weights and the decode matmul over them.
//! Decoding is memory-bound: streaming f32 weights costs 4 bytes a parameter, Q4_1 blocks
//! 0.625. This kernel keeps the GGUF blocks as they are (Q4_0, Q4_1, Q8_0; other types as
//! f32), dequantises one weight row at a time into a small buffer (the exact values the f32
//! reference uses) and dots it with every activation row in f32.
//! Invariant: the result for one activation row is bit-identical whatever other rows are
//! computed with it (fixed per-row accumulation order), so batching never changes tokens.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

mod dense;
mod int16;
mod wide;

const BLOCK: usize = 32;

/// Whether this CPU runs the AVX2/FMA kernels (`avx2`, `int16::avx2`).
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma");
    #[allow(unreachable_code)]
    false
}

/// How decode rows' activations meet the packed weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeKernel {
    /// f32 activations against the exactly dequantised weights: the reference.
    #[default]
    Exact,
    /// Activations quantised to 16 bits per block of 32 and integer dot products
    /// ([`int16`]); weights kept as f32 fall back to the exact kernel.
    Int16,
}

impl std::str::FromStr for DecodeKernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(Self::Exact),
            "int16" => Ok(Self::Int16),
            other => Err(format!(
                "unknown decode kernel {other:?} (expected exact or int16)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
enum Blocks {
    /// `d * (q - 8)`, one f32 scale per block.
    Q4_0 { d: Vec<f32>, qs: Vec<u8> },
    /// `fma(q, d, m)`.
    Q4_1 { dm: Vec<f32>, qs: Vec<u8> },
    /// `d * q`.
    Q8_0 { d: Vec<f32>, qs: Vec<i8> },
    /// Plain rows.
    F32(Vec<f32>),
}

/// A weight `(out, in)` in a packed format, for the decode path.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    out: usize,
    inp: usize,
    blocks: Blocks,
}

impl PackedLinear {
    /// Keeps Q4_0/Q4_1/Q8_0 blocks as they are; anything else (or a row length not a
    /// multiple of 32) is dequantised to f32.
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Self> {
        let (out, inp) = q.shape().dims2()?;
        let nb = inp / BLOCK;
        let blocks = match q.dtype() {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0 if inp % BLOCK == 0 => {
                let raw = q.data()?;
                let f16_at = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
                match q.dtype() {
                    GgmlDType::Q4_0 => {
                        let (mut d, mut qs) = (
                            Vec::with_capacity(out * nb),
                            Vec::with_capacity(out * inp / 2),
                        );
                        for blk in raw.chunks_exact(18) {
                            d.push(f16_at(&blk[0..2]));
                            qs.extend_from_slice(&blk[2..18]);
                        }
                        Blocks::Q4_0 { d, qs }
                    }
                    GgmlDType::Q4_1 => {
                        let (mut dm, mut qs) = (
                            Vec::with_capacity(2 * out * nb),
                            Vec::with_capacity(out * inp / 2),
                        );
                        for blk in raw.chunks_exact(20) {
                            dm.push(f16_at(&blk[0..2]));
                            dm.push(f16_at(&blk[2..4]));
                            qs.extend_from_slice(&blk[4..20]);
                        }
                        Blocks::Q4_1 { dm, qs }
                    }
                    _ => {
                        let (mut d, mut qs) =
                            (Vec::with_capacity(out * nb), Vec::with_capacity(out * inp));
                        for blk in raw.chunks_exact(34) {
                            d.push(f16_at(&blk[0..2]));
                            qs.extend(blk[2..34].iter().map(|&b| b as i8));
                        }
                        Blocks::Q8_0 { d, qs }
                    }
                }
            }
            _ => {
                let t = q.dequantize(&candle_core::Device::Cpu)?;
                Blocks::F32(t.flatten_all()?.to_vec1::<f32>()?)
            }
        };
        Ok(Self { out, inp, blocks })
    }

    /// From plain f32 rows `(out, in)`.
    pub fn from_f32(w: &candle_core::Tensor) -> candle_core::Result<Self> {
        let (out, inp) = w.dims2()?;
        Ok(Self {
            out,
            inp,
            blocks: Blocks::F32(w.flatten_all()?.to_vec1::<f32>()?),
        })
    }

    pub fn out_features(&self) -> usize {
        self.out
    }

    pub fn in_features(&self) -> usize {
        self.inp
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Q4_0 { d, qs } => d.len() * 4 + qs.len(),
            Blocks::Q4_1 { dm, qs } => dm.len() * 4 + qs.len(),
            Blocks::Q8_0 { d, qs } => d.len() * 4 + qs.len(),
            Blocks::F32(w) => w.len() * 4,
        }
    }

    /// Writes row `r` of the weight, dequantised, into `buf` (len `in`): with AVX2 four
    /// 8-wide groups per block, else [`PackedLinear::row_portable`] (the same values).
    #[allow(unsafe_code)]
    fn row(&self, r: usize, buf: &mut [f32]) {
        assert!(r < self.out && buf.len() == self.inp);
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() && self.inp.is_multiple_of(BLOCK) {
            // SAFETY: AVX2/FMA checked above; row `r` exists and `buf` holds its `inp` values.
            unsafe { avx2::dequant_row(&self.blocks, self.inp / BLOCK, r, buf) };
            return;
        }
        self.row_portable(r, buf);
    }

    /// [`PackedLinear::row`] one value at a time: the reference.
    fn row_portable(&self, r: usize, buf: &mut [f32]) {
        let nb = self.inp / BLOCK;
        match &self.blocks {
            Blocks::Q4_0 { d, qs } => {
                let qs = &qs[r * nb * 16..(r + 1) * nb * 16];
                for ((o, q), &s) in buf
                    .chunks_exact_mut(BLOCK)
                    .zip(qs.chunks_exact(16))
                    .zip(&d[r * nb..(r + 1) * nb])
                {
                    let (lo, hi) = o.split_at_mut(16);
                    for j in 0..16 {
                        lo[j] = ((q[j] & 0x0F) as i32 - 8) as f32 * s;
                        hi[j] = ((q[j] >> 4) as i32 - 8) as f32 * s;
                    }
                }
            }
            Blocks::Q4_1 { dm, qs } => {
                let qs = &qs[r * nb * 16..(r + 1) * nb * 16];
                for ((o, q), sm) in buf
                    .chunks_exact_mut(BLOCK)
                    .zip(qs.chunks_exact(16))
                    .zip(dm[2 * r * nb..2 * (r + 1) * nb].chunks_exact(2))
                {
                    let (s, m) = (sm[0], sm[1]);
                    let (lo, hi) = o.split_at_mut(16);
                    for j in 0..16 {
                        lo[j] = ((q[j] & 0x0F) as f32).mul_add(s, m);
                        hi[j] = ((q[j] >> 4) as f32).mul_add(s, m);
                    }
                }
            }
            Blocks::Q8_0 { d, qs } => {
                let qs = &qs[r * self.inp..(r + 1) * self.inp];
                for ((o, q), &s) in buf
                    .chunks_exact_mut(BLOCK)
                    .zip(qs.chunks_exact(BLOCK))
                    .zip(&d[r * nb..(r + 1) * nb])
                {
                    for j in 0..BLOCK {
                        o[j] = q[j] as f32 * s;
                    }
                }
            }
            Blocks::F32(w) => buf.copy_from_slice(&w[r * self.inp..(r + 1) * self.inp]),
        }
    }

    /// [`PackedLinear::matmul`] through `kernel`.
    pub fn matmul_with(&self, kernel: DecodeKernel, x: &[f32], rows: usize) -> Vec<f32> {
        match kernel {
            DecodeKernel::Int16 => {
                int16::matmul(self, x, rows).unwrap_or_else(|| self.matmul(x, rows))
            }
            DecodeKernel::Exact => self.matmul(x, rows),
        }
    }

    /// `x: (rows, in)` row-major -> `(rows, out)` row-major, f32 activations (the exact
    /// kernel).
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (n, k) = (self.out, self.inp);
        debug_assert_eq!(x.len(), rows * k);
        if rows < 4 {
            if let Some(out) = self.matmul_fused(x, rows) {
                return out;
            }
        }
        // Each task takes TILE weight rows, dequantises them two at a time and runs 2x4
        // tiles into its transposed chunk (four at a time through `wide` where it runs).
        const TILE: usize = 16;
        #[cfg(target_arch = "x86_64")]
        if wide::available() && k.is_multiple_of(LANES) {
            let xp = wide::Pairs::new(x, rows, k);
            return by_tiles(
                n,
                rows,
                TILE,
                || vec![vec![0f32; k]; 4],
                |w, t, chunk| {
                    let wrows = chunk.len() / rows;
                    for i in (0..wrows).step_by(4) {
                        let take = (wrows - i).min(4);
                        for (j, w) in w.iter_mut().take(take).enumerate() {
                            self.row(t * TILE + i + j, w);
                        }
                        let ws: Vec<&[f32]> = w.iter().take(take).map(|w| &w[..]).collect();
                        let mut outs: Vec<&mut [f32]> = chunk[i * rows..(i + take) * rows]
                            .chunks_mut(rows)
                            .collect();
                        // SAFETY: `wide::available()` checked above.
                        #[allow(unsafe_code)]
                        unsafe {
                            wide::tile(&ws, &xp, rows, &mut outs)
                        };
                    }
                },
            );
        }
        by_tiles(
            n,
            rows,
            TILE,
            || (vec![0f32; k], vec![0f32; k]),
            |(w0, w1), t, chunk| {
                let wrows = chunk.len() / rows;
                let mut i = 0;
                while i < wrows {
                    let pair = i + 1 < wrows;
                    self.row(t * TILE + i, w0);
                    if pair {
                        self.row(t * TILE + i + 1, w1);
                    }
                    let (o0, rest) = chunk[i * rows..].split_at_mut(rows);
                    let o1 = if pair { Some(&mut rest[..rows]) } else { None };
                    tile_rows(w0, pair.then_some(&w1[..]), x, k, rows, o0, o1);
                    i += if pair { 2 } else { 1 };
                }
            },
        )
    }
}

/// The output `(rows, n)` of a matmul whose tasks each own `tile` weight rows: task `t`
/// fills `chunk`, its outputs transposed (`(w, rows)`, `w` = `tile` but for the last
/// task), and copies them into columns `t*tile..` of every row itself, in parallel.
#[allow(unsafe_code)]
fn by_tiles<S>(
    n: usize,
    rows: usize,
    tile: usize,
    init: impl Fn() -> S + Sync + Send,
    task: impl Fn(&mut S, usize, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    if rows == 1 {
        // One row: the transposed chunk is the row's own slice.
        out.par_chunks_mut(tile)
            .enumerate()
            .for_each_init(&init, |s, (t, chunk)| task(s, t, chunk));
        return out;
    }
    /// The output's base pointer, shared by tasks that write disjoint columns.
    struct Dst(*mut f32);
    // SAFETY: tasks write through it only at disjoint indices (below).
    unsafe impl Sync for Dst {}
    impl Dst {
        fn at(&self, i: usize) -> *mut f32 {
            self.0.wrapping_add(i)
        }
    }
    let dst = Dst(out.as_mut_ptr());
    (0..n.div_ceil(tile)).into_par_iter().for_each_init(
        || (init(), Vec::new()),
        |(s, chunk), t| {
            let w = tile.min(n - t * tile);
            chunk.clear();
            chunk.resize(w * rows, 0f32);
            task(s, t, chunk);
            for b in 0..rows {
                for (j, col) in chunk.chunks_exact(rows).enumerate() {
                    // SAFETY: `b < rows` and `t*tile + j < n`, so the index is inside
                    // `out` (rows * n), which outlives the loop; column `t*tile + j`
                    // belongs to task `t` alone, so no two tasks write one element.
                    unsafe { *dst.at(b * n + t * tile + j) = col[b] };
                }
            }
        },
    );
    out
}

impl PackedLinear {
    /// Few rows (decode at small batch): dequantise in registers, four weight rows at a time,
    /// with the same per-pair arithmetic as the buffered path. `None` without AVX2/FMA.
    #[allow(unsafe_code)]
    fn matmul_fused(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() && self.inp.is_multiple_of(BLOCK) {
            let (n, k) = (self.out, self.inp);
            assert!(x.len() >= rows * k);
            let mut out = vec![0f32; rows * n];
            for b in 0..rows {
                let xb = &x[b * k..(b + 1) * k];
                let mut ob = vec![0f32; n];
                ob.par_chunks_mut(16).enumerate().for_each(|(t, o)| {
                    let mut r = 0;
                    while r < o.len() {
                        let take = (o.len() - r).min(4);
                        // SAFETY: AVX2/FMA checked above; rows t*16+r.. < out, `xb` holds `k`
                        // values, and every block read lies inside this weight's arrays.
                        let v = unsafe { avx2::dot_rows(&self.blocks, t * 16 + r, take, k, xb) };
                        o[r..r + take].copy_from_slice(&v[..take]);
                        r += take;
                    }
                });
                out[b * n..(b + 1) * n].copy_from_slice(&ob);
            }
            return Some(out);
        }
        let _ = (x, rows);
        None
    }
}

const LANES: usize = 8;
type Acc = [f32; LANES];

/// Lane `l` sums elements `l, l+8, l+16, ...` (in order); lanes are reduced in a fixed
/// order. Every tile shape below does exactly this per (weight row, input row) pair, which
/// is what makes rows batch-invariant.
#[inline(always)]
fn reduce(acc: &Acc) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[inline(always)]
fn fma(acc: &mut Acc, w: &[f32], x: &[f32]) {
    let (w, x): (&Acc, &Acc) = (w.try_into().expect("lane"), x.try_into().expect("lane"));
    for l in 0..LANES {
        acc[l] = w[l].mul_add(x[l], acc[l]);
    }
}

/// Dots one or two dequantised weight rows with every input row.
#[allow(unsafe_code)]
fn tile_rows(
    w0: &[f32],
    w1: Option<&[f32]>,
    x: &[f32],
    k: usize,
    rows: usize,
    o0: &mut [f32],
    o1: Option<&mut [f32]>,
) {
    assert!(
        k.is_multiple_of(LANES),
        "row length must be a multiple of {LANES}"
    );
    assert!(w0.len() == k && w1.is_none_or(|w| w.len() == k) && x.len() >= rows * k);
    assert!(o0.len() >= rows && o1.as_ref().is_none_or(|o| o.len() >= rows));
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); every pointer the kernel reads or
        // writes is within the slices whose lengths the asserts above check.
        unsafe { avx2::tile_rows(w0, w1, x, k, rows, o0, o1) };
        return;
    }
    tile_rows_portable(w0, w1, x, k, rows, o0, o1);
}

/// The same arithmetic as the AVX2 kernel, lane by lane (FMA is exactly rounded either way).
fn tile_rows_portable(
    w0: &[f32],
    w1: Option<&[f32]>,
    x: &[f32],
    k: usize,
    rows: usize,
    o0: &mut [f32],
    mut o1: Option<&mut [f32]>,
) {
    for b in 0..rows {
        let xb = &x[b * k..(b + 1) * k];
        let (mut a0, mut a1) = ([0f32; LANES], [0f32; LANES]);
        for c in 0..k / LANES {
            let s = c * LANES..(c + 1) * LANES;
            fma(&mut a0, &w0[s.clone()], &xb[s.clone()]);
            if let Some(w1) = w1 {
                fma(&mut a1, &w1[s.clone()], &xb[s.clone()]);
            }
        }
        o0[b] = reduce(&a0);
        if let Some(o1) = o1.as_deref_mut() {
            o1[b] = reduce(&a1);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{reduce, Acc, Blocks, BLOCK, LANES};

    /// The four 8-wide groups of block `b` of weight row `r`, dequantised exactly as
    /// `PackedLinear::row` does.
    #[inline(always)]
    unsafe fn block(blocks: &Blocks, nb: usize, r: usize, b: usize) -> [__m256; 4] {
        let i = r * nb + b;
        match blocks {
            Blocks::Q4_1 { dm, qs } => {
                let d = _mm256_set1_ps(*dm.get_unchecked(2 * i));
                let m = _mm256_set1_ps(*dm.get_unchecked(2 * i + 1));
                let q = _mm_loadu_si128(qs.as_ptr().add(16 * i) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let f =
                    |v: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), d, m);
                [
                    f(lo),
                    f(_mm_srli_si128(lo, 8)),
                    f(hi),
                    f(_mm_srli_si128(hi, 8)),
                ]
            }
            Blocks::Q4_0 { d, qs } => {
                let d = _mm256_set1_ps(*d.get_unchecked(i));
                let q = _mm_loadu_si128(qs.as_ptr().add(16 * i) as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let eight = _mm256_set1_epi32(8);
                let f = |v: __m128i| {
                    _mm256_mul_ps(
                        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(v), eight)),
                        d,
                    )
                };
                [
                    f(lo),
                    f(_mm_srli_si128(lo, 8)),
                    f(hi),
                    f(_mm_srli_si128(hi, 8)),
                ]
            }
            Blocks::Q8_0 { d, qs } => {
                let d = _mm256_set1_ps(*d.get_unchecked(i));
                let p = qs.as_ptr().add(BLOCK * i) as *const __m128i;
                let a = _mm_loadu_si128(p);
                let c = _mm_loadu_si128(p.add(1));
                let f = |v: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d);
                [f(a), f(_mm_srli_si128(a, 8)), f(c), f(_mm_srli_si128(c, 8))]
            }
            Blocks::F32(w) => {
                let p = w.as_ptr().add(BLOCK * i);
                [
                    _mm256_loadu_ps(p),
                    _mm256_loadu_ps(p.add(8)),
                    _mm256_loadu_ps(p.add(16)),
                    _mm256_loadu_ps(p.add(24)),
                ]
            }
        }
    }

    /// Row `r` dequantised into `out` (`nb` blocks of 32), exactly as `PackedLinear::row_portable`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; row `r` exists, the weight's rows are `nb` blocks
    /// long and `out` holds `nb * 32` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequant_row(blocks: &Blocks, nb: usize, r: usize, out: &mut [f32]) {
        let po = out.as_mut_ptr();
        for b in 0..nb {
            let v = block(blocks, nb, r, b);
            for (g, v) in v.into_iter().enumerate() {
                _mm256_storeu_ps(po.add(b * BLOCK + g * LANES), v);
            }
        }
    }

    /// `take` (1..=4) consecutive weight rows from `r0`, each dotted with `x` (len `k`):
    /// independent accumulation chains, one per weight row, in the canonical lane order.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; rows `r0..r0+take` exist; `x` holds `k` values and
    /// `k` is the weight's row length, a multiple of 32.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(
        blocks: &Blocks,
        r0: usize,
        take: usize,
        k: usize,
        x: &[f32],
    ) -> [f32; 4] {
        let nb = k / BLOCK;
        let px = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..nb {
            let xb = px.add(b * BLOCK);
            let xs = [
                _mm256_loadu_ps(xb),
                _mm256_loadu_ps(xb.add(8)),
                _mm256_loadu_ps(xb.add(16)),
                _mm256_loadu_ps(xb.add(24)),
            ];
            for (j, a) in acc.iter_mut().enumerate().take(take) {
                prefetch(blocks, (r0 + j + PREFETCH_ROWS) * nb + b);
                let w = block(blocks, nb, r0 + j, b);
                for g in 0..4 {
                    *a = _mm256_fmadd_ps(w[g], xs[g], *a);
                }
            }
        }
        let mut out = [0f32; 4];
        for j in 0..take {
            out[j] = hsum(acc[j]);
        }
        out
    }

    /// Weight rows this far below the ones being read are prefetched, block by block.
    /// Decode streams every weight from memory once a token; the hardware prefetcher alone
    /// left a single row's kernel at ~6.5 GB/s here, and reading two 4-row tiles ahead
    /// brought a scratch benchmark over 88 MB of Q4_1 rows to ~10.8 GB/s (BENCHMARKS.md).
    pub(super) const PREFETCH_ROWS: usize = 8;

    /// Asks for block `i`'s quants (and its scales every 8th block) in cache. A hint only:
    /// any index is safe (wrapping address arithmetic, no access is made).
    #[inline(always)]
    pub(super) unsafe fn prefetch(blocks: &Blocks, i: usize) {
        let hint = |p: *const u8| _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
        match blocks {
            Blocks::Q4_1 { dm, qs } => {
                hint(qs.as_ptr().wrapping_add(16 * i));
                if i.is_multiple_of(8) {
                    hint(dm.as_ptr().wrapping_add(2 * i) as *const u8);
                }
            }
            Blocks::Q4_0 { d, qs } => {
                hint(qs.as_ptr().wrapping_add(16 * i));
                if i.is_multiple_of(16) {
                    hint(d.as_ptr().wrapping_add(i) as *const u8);
                }
            }
            Blocks::Q8_0 { d, qs } => {
                hint(qs.as_ptr().wrapping_add(BLOCK * i) as *const u8);
                if i.is_multiple_of(16) {
                    hint(d.as_ptr().wrapping_add(i) as *const u8);
                }
            }
            Blocks::F32(w) => hint(w.as_ptr().wrapping_add(BLOCK * i) as *const u8),
        }
    }

    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let mut a: Acc = [0.0; LANES];
        _mm256_storeu_ps(a.as_mut_ptr(), v);
        reduce(&a)
    }

    /// 2 weight rows x 4 input rows per inner loop: 8 accumulators, 6 loads per 8 FMAs.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `w0`/`w1` hold `k` values, `x` holds `rows * k`,
    /// `o0`/`o1` hold at least `rows`, and `k` is a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_rows(
        w0: &[f32],
        w1: Option<&[f32]>,
        x: &[f32],
        k: usize,
        rows: usize,
        o0: &mut [f32],
        mut o1: Option<&mut [f32]>,
    ) {
        let chunks = k / LANES;
        let p0 = w0.as_ptr();
        let p1 = w1.map(|w| w.as_ptr());
        let px = x.as_ptr();
        let mut b = 0;
        while b + 4 <= rows {
            let xr = [
                px.add(b * k),
                px.add((b + 1) * k),
                px.add((b + 2) * k),
                px.add((b + 3) * k),
            ];
            let mut a0 = [_mm256_setzero_ps(); 4];
            let mut a1 = [_mm256_setzero_ps(); 4];
            match p1 {
                Some(p1) => {
                    for c in 0..chunks {
                        let o = c * LANES;
                        let wv0 = _mm256_loadu_ps(p0.add(o));
                        let wv1 = _mm256_loadu_ps(p1.add(o));
                        for r in 0..4 {
                            let xv = _mm256_loadu_ps(xr[r].add(o));
                            a0[r] = _mm256_fmadd_ps(wv0, xv, a0[r]);
                            a1[r] = _mm256_fmadd_ps(wv1, xv, a1[r]);
                        }
                    }
                }
                None => {
                    for c in 0..chunks {
                        let o = c * LANES;
                        let wv0 = _mm256_loadu_ps(p0.add(o));
                        for r in 0..4 {
                            a0[r] = _mm256_fmadd_ps(wv0, _mm256_loadu_ps(xr[r].add(o)), a0[r]);
                        }
                    }
                }
            }
            for r in 0..4 {
                o0[b + r] = hsum(a0[r]);
                if let Some(o1) = o1.as_deref_mut() {
                    o1[b + r] = hsum(a1[r]);
                }
            }
            b += 4;
        }
        while b < rows {
            let xb = px.add(b * k);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in 0..chunks {
                let o = c * LANES;
                let xv = _mm256_loadu_ps(xb.add(o));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(p0.add(o)), xv, a0);
                if let Some(p1) = p1 {
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(p1.add(o)), xv, a1);
                }
            }
            o0[b] = hsum(a0);
            if let Some(o1) = o1.as_deref_mut() {
                o1[b] = hsum(a1);
            }
            b += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    pub(super) fn weights(n: usize, k: usize) -> Tensor {
        let v: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        Tensor::from_vec(v, (n, k), &Device::Cpu).expect("tensor")
    }

    /// [`weights`] packed from each block format the kernels take (and f32).
    pub(super) fn every_format(n: usize, k: usize) -> Vec<(GgmlDType, PackedLinear)> {
        [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::F32,
        ]
        .into_iter()
        .map(|dt| {
            let q = QTensor::quantize(&weights(n, k), dt).expect("q");
            (dt, PackedLinear::from_qtensor(&q).expect("pack"))
        })
        .collect()
    }

    pub(super) fn inputs(rows: usize, k: usize) -> Vec<f32> {
        (0..rows * k)
            .map(|i| (i * 104729 % 977) as f32 / 488.0 - 1.0)
            .collect()
    }

    /// Every format against the f32 matmul of its own dequantised weights.
    #[test]
    fn packed_matmul_matches_dequantised_reference() {
        let (n, k, rows) = (40, 96, 7);
        let w = weights(n, k);
        let x = inputs(rows, k);
        let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).expect("x");
        for dt in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::F16,
            GgmlDType::F32,
        ] {
            let q = QTensor::quantize(&w, dt).expect("quantize");
            let deq = q.dequantize(&Device::Cpu).expect("dequantize");
            let want: Vec<f32> = xt
                .matmul(&deq.t().expect("t"))
                .expect("matmul")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            let got = PackedLinear::from_qtensor(&q)
                .expect("pack")
                .matmul(&x, rows);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{dt:?}: {worst}");
        }
    }

    /// The portable kernel and the AVX2 kernel give bit-identical results.
    #[test]
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    fn portable_and_simd_kernels_agree_bitwise() {
        // The AVX2 kernel itself, called directly: a machine without it fails here rather
        // than comparing the portable kernel with itself.
        assert!(
            avx2_fma(),
            "this CPU lacks AVX2/FMA, so the SIMD kernel cannot be checked on it"
        );
        let k = 64;
        let (w0, w1) = (inputs(1, k), inputs(2, k)[k..].to_vec());
        let x = inputs(7, k);
        let (mut a0, mut a1, mut b0, mut b1) =
            (vec![0f32; 7], vec![0f32; 7], vec![0f32; 7], vec![0f32; 7]);
        // SAFETY: AVX2 and FMA are present (asserted); the slices have the lengths
        // `tile_rows` checks: w0, w1 of k, x of 7k, outputs of 7.
        unsafe { avx2::tile_rows(&w0, Some(&w1), &x, k, 7, &mut a0, Some(&mut a1)) };
        tile_rows_portable(&w0, Some(&w1), &x, k, 7, &mut b0, Some(&mut b1));
        assert_ne!(a0, vec![0f32; 7], "the SIMD kernel wrote its outputs");
        assert_eq!((a0, a1), (b0, b1));
    }

    /// The AVX-512 tile (two activation rows a register) gives the portable kernel's bits
    /// for every weight-row count it takes and odd and even row counts. On a CPU without
    /// AVX-512 the matmul never calls it, and the test says so and checks nothing else.
    #[test]
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    fn wide_tile_agrees_bitwise_with_the_portable_kernel() {
        if !wide::available() {
            eprintln!("this CPU lacks AVX-512 F/DQ: the wide tile is never used here");
            return;
        }
        let k = 96;
        let w = inputs(4, k);
        for rows in 1..=11 {
            let x = inputs(rows, k);
            let xp = wide::Pairs::new(&x, rows, k);
            for take in 1..=4 {
                let ws: Vec<&[f32]> = w.chunks_exact(k).take(take).collect();
                let mut got = vec![vec![0f32; rows]; take];
                let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|o| &mut o[..]).collect();
                // SAFETY: `wide::available()` is true (checked above).
                unsafe { wide::tile(&ws, &xp, rows, &mut outs) };
                for (j, got) in got.iter().enumerate() {
                    let mut want = vec![0f32; rows];
                    tile_rows_portable(ws[j], None, &x, k, rows, &mut want, None);
                    assert_ne!(want, vec![0f32; rows]);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "rows {rows}, weight row {j} of {take}"
                    );
                }
            }
        }
    }

    /// The AVX2 dequantisation of a row gives the portable one's values, bit for bit.
    #[test]
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    fn simd_and_portable_dequantisation_agree_bitwise() {
        assert!(
            avx2_fma(),
            "this CPU lacks AVX2/FMA, so the SIMD dequantisation cannot be checked on it"
        );
        let (n, k) = (5, 96);
        for (dt, p) in every_format(n, k) {
            for r in 0..n {
                let (mut simd, mut portable) = (vec![0f32; k], vec![0f32; k]);
                // SAFETY: AVX2/FMA asserted; row r < n exists, rows are k/32 blocks, and
                // `simd` holds k values.
                unsafe { avx2::dequant_row(&p.blocks, k / BLOCK, r, &mut simd) };
                p.row_portable(r, &mut portable);
                assert_ne!(portable, vec![0f32; k], "{dt:?} row {r} dequantised");
                assert_eq!(
                    simd.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{dt:?} row {r}"
                );
            }
        }
    }

    /// A row gives bit-identical results alone and among others.
    #[test]
    fn rows_are_batch_invariant() {
        let (n, k) = (33, 64);
        for (dt, p) in every_format(n, k) {
            let x = inputs(9, k);
            let all = p.matmul(&x, 9);
            for r in 0..9 {
                let alone = p.matmul(&x[r * k..(r + 1) * k], 1);
                assert_eq!(alone, all[r * n..(r + 1) * n], "{dt:?} row {r}");
            }
            let three = p.matmul(&x[..3 * k], 3);
            assert_eq!(three, all[..3 * n], "{dt:?} first three rows");
        }
    }
}
