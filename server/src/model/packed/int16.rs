//! The integer-dot decode kernel: each activation row is quantised to 16 bits per block of
//! 32 (`x ≈ d·q`, `d = max|x| / 32767`), and each block's dot product with a weight block is
//! a sum of integer products (`madd_epi16` on AVX2: sixteen multiply-adds an instruction
//! against the f32 kernel's dequantise-then-FMA eight), scaled once per block.
//!
//! Why 16 bits and not llama.cpp's 8: with 8-bit activations the real model's top-20
//! log-probabilities move by up to ~0.6 (llama.cpp's own are within ~0.5 of transformers');
//! graft bounds them at 0.05 (`server/tests/fast_paths.rs`), which 16-bit activations
//! meet with room to spare.
//!
//! Per (weight row, activation row) pair the arithmetic is fixed: lane `l` of a block holds
//! the integer sum of elements `2l, 2l+1, 16+2l, 17+2l` (exact in f32: at most
//! 4·128·32767 < 2^24); `acc[l] = fma(d_w·d_x, lane, acc[l])` block after block; Q4_1's
//! `m·d_x·Σq` term goes to a scalar `fma` chain; the result is `reduce(acc) + that scalar`.
//! Every tile shape, SIMD or portable, does exactly this, so a row's result never depends on
//! the rows beside it.

use super::{avx2_fma, reduce, Acc, Blocks, PackedLinear, BLOCK, LANES};

/// Activation rows quantised per block: `q` (rows·k), and per block `d` and `d·Σq`.
pub(super) struct QuantRows {
    q: Vec<i16>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl QuantRows {
    /// `x`: rows of `k` values (a multiple of 32), row-major.
    pub(super) fn new(x: &[f32], k: usize) -> Self {
        debug_assert!(k.is_multiple_of(BLOCK));
        let blocks = x.len() / BLOCK;
        let (mut q, mut d, mut s) = (
            vec![0i16; x.len()],
            Vec::with_capacity(blocks),
            Vec::with_capacity(blocks),
        );
        for (xb, qb) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 32767.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (o, &v) in qb.iter_mut().zip(xb) {
                let r = (v * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16;
                sum += r as i32;
                *o = r;
            }
            d.push(scale);
            s.push(scale * sum as f32);
        }
        Self { q, d, s }
    }
}

/// Block `b` of weight row `r`, portable: its 32 values in element order (Q4_1's nibbles
/// `0..=15`, Q4_0's `q - 8`, Q8_0's `q`), its scale and Q4_1's min.
fn wblock(blocks: &Blocks, nb: usize, r: usize, b: usize) -> ([i32; BLOCK], f32, Option<f32>) {
    let i = r * nb + b;
    let nibbles = |qs: &[u8], off: i32| -> [i32; BLOCK] {
        std::array::from_fn(|j| {
            let q = qs[16 * i + j % 16];
            (if j < 16 { q & 0x0F } else { q >> 4 }) as i32 - off
        })
    };
    match blocks {
        Blocks::Q4_1 { dm, qs } => (nibbles(qs, 0), dm[2 * i], Some(dm[2 * i + 1])),
        Blocks::Q4_0 { d, qs } => (nibbles(qs, 8), d[i], None),
        Blocks::Q8_0 { d, qs } => (
            std::array::from_fn(|j| qs[BLOCK * i + j] as i32),
            d[i],
            None,
        ),
        Blocks::F32(_) => unreachable!("f32 weights have no integer kernel"),
    }
}

/// One (weight row, activation row) pair, lane by lane: the reference the SIMD tiles
/// match bit for bit.
fn dot_portable(blocks: &Blocks, nb: usize, r: usize, xq: &QuantRows, row: usize) -> f32 {
    let mut acc: Acc = [0.0; LANES];
    let mut summ = 0f32;
    for b in 0..nb {
        let at = row * nb + b;
        let xb = &xq.q[at * BLOCK..(at + 1) * BLOCK];
        let (w, d, m) = wblock(blocks, nb, r, b);
        if let Some(m) = m {
            summ = m.mul_add(xq.s[at], summ);
        }
        let dd = d * xq.d[at];
        let prod = |e: usize| w[e] * xb[e] as i32;
        for (l, a) in acc.iter_mut().enumerate() {
            let lane = prod(2 * l) + prod(2 * l + 1) + prod(16 + 2 * l) + prod(17 + 2 * l);
            *a = dd.mul_add(lane as f32, *a);
        }
    }
    reduce(&acc) + summ
}

/// `x: (rows, in)` -> `(rows, out)` through the integer kernel; `None` for f32 weights or
/// rows not made of whole blocks (the caller then uses the f32 kernel).
#[allow(unsafe_code)]
pub(super) fn matmul(w: &PackedLinear, x: &[f32], rows: usize) -> Option<Vec<f32>> {
    let (n, k) = (w.out, w.inp);
    if matches!(w.blocks, Blocks::F32(_)) || !k.is_multiple_of(BLOCK) || rows == 0 {
        return None;
    }
    assert_eq!(x.len(), rows * k, "activation rows");
    let xq = QuantRows::new(x, k);
    let simd = avx2_fma();
    // Each task owns TILE weight rows' outputs.
    const TILE: usize = 16;
    Some(super::by_tiles(
        n,
        rows,
        TILE,
        || (),
        |_, t, chunk| {
            let r0 = t * TILE;
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2/FMA present (`avx2_fma`); the chunk holds the outputs of
                // weight rows r0.. (all < out) for every activation row, and `xq` was built
                // from `rows` rows of `k` values, `k` a whole number of blocks.
                unsafe {
                    avx2::tiles(&w.blocks, k / BLOCK, r0, &xq, rows, chunk)
                };
                return;
            }
            for (j, o) in chunk.chunks_exact_mut(rows).enumerate() {
                for (b, o) in o.iter_mut().enumerate() {
                    *o = dot_portable(&w.blocks, k / BLOCK, r0 + j, &xq, b);
                }
            }
        },
    ))
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{
        super::avx2::{hsum, prefetch, PREFETCH_ROWS},
        Blocks, QuantRows, BLOCK,
    };

    /// Block `b` of weight row `r` as sixteen-bit values: elements 0..16 and 16..32, its
    /// scale, and Q4_1's min (0 and `false` for the others).
    #[inline(always)]
    unsafe fn wblock(
        blocks: &Blocks,
        nb: usize,
        r: usize,
        b: usize,
    ) -> (__m256i, __m256i, f32, f32, bool) {
        let i = r * nb + b;
        let nibbles = |qs: &[u8]| {
            let q = _mm_loadu_si128(qs.as_ptr().add(16 * i) as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            (
                _mm256_cvtepu8_epi16(_mm_and_si128(q, mask)),
                _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), mask)),
            )
        };
        match blocks {
            Blocks::Q4_1 { dm, qs } => {
                let (lo, hi) = nibbles(qs);
                let (d, m) = (*dm.get_unchecked(2 * i), *dm.get_unchecked(2 * i + 1));
                (lo, hi, d, m, true)
            }
            Blocks::Q4_0 { d, qs } => {
                let (lo, hi) = nibbles(qs);
                let eight = _mm256_set1_epi16(8);
                let d = *d.get_unchecked(i);
                (
                    _mm256_sub_epi16(lo, eight),
                    _mm256_sub_epi16(hi, eight),
                    d,
                    0.0,
                    false,
                )
            }
            Blocks::Q8_0 { d, qs } => {
                let p = qs.as_ptr().add(BLOCK * i) as *const __m128i;
                (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(1))),
                    *d.get_unchecked(i),
                    0.0,
                    false,
                )
            }
            Blocks::F32(_) => unreachable!("f32 weights have no integer kernel"),
        }
    }

    /// `WR` weight rows from `r0` by `XR` activation rows from `b0`; `out[j * rows + b]` is
    /// weight row `r0 + j` with activation row `b`.
    #[inline(always)]
    unsafe fn tile<const WR: usize, const XR: usize>(
        blocks: &Blocks,
        nb: usize,
        r0: usize,
        xq: &QuantRows,
        b0: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); XR]; WR];
        let mut summ = [[0f32; XR]; WR];
        for b in 0..nb {
            let mut ws = [(
                _mm256_setzero_si256(),
                _mm256_setzero_si256(),
                0f32,
                0f32,
                false,
            ); WR];
            for (j, w) in ws.iter_mut().enumerate() {
                prefetch(blocks, (r0 + j + PREFETCH_ROWS) * nb + b);
                *w = wblock(blocks, nb, r0 + j, b);
            }
            for i in 0..XR {
                let at = (b0 + i) * nb + b;
                let px = xq.q.as_ptr().add(at * BLOCK) as *const __m256i;
                let (xlo, xhi) = (_mm256_loadu_si256(px), _mm256_loadu_si256(px.add(1)));
                let dx = *xq.d.get_unchecked(at);
                for j in 0..WR {
                    let (wlo, whi, d, m, has_min) = ws[j];
                    let lanes =
                        _mm256_add_epi32(_mm256_madd_epi16(wlo, xlo), _mm256_madd_epi16(whi, xhi));
                    acc[j][i] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * dx),
                        _mm256_cvtepi32_ps(lanes),
                        acc[j][i],
                    );
                    if has_min {
                        summ[j][i] = m.mul_add(*xq.s.get_unchecked(at), summ[j][i]);
                    }
                }
            }
        }
        for j in 0..WR {
            for i in 0..XR {
                out[j * rows + b0 + i] = hsum(acc[j][i]) + summ[j][i];
            }
        }
    }

    /// Every pair of one task's weight rows (`chunk.len() / rows` from `r0`) with every
    /// activation row, in register tiles: 4x1 for a single row, 2x4 otherwise.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; weight rows `r0..r0 + chunk.len() / rows` exist with
    /// `nb` blocks each; `xq` holds `rows` rows of `nb` blocks.
    // Kept out of line: inlined into its caller's closure, the build of 2026-12-06 decoded one
    // stream ~20 % slower (`BENCHMARKS.md`, issue 17, tenth part).
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tiles(
        blocks: &Blocks,
        nb: usize,
        r0: usize,
        xq: &QuantRows,
        rows: usize,
        chunk: &mut [f32],
    ) {
        let wrows = chunk.len() / rows;
        let mut j = 0;
        if rows == 1 {
            while j + 4 <= wrows {
                tile::<4, 1>(blocks, nb, r0 + j, xq, 0, 1, &mut chunk[j..]);
                j += 4;
            }
            while j < wrows {
                tile::<1, 1>(blocks, nb, r0 + j, xq, 0, 1, &mut chunk[j..]);
                j += 1;
            }
            return;
        }
        while j < wrows {
            let pair = j + 2 <= wrows;
            let out = &mut chunk[j * rows..];
            let mut b = 0;
            while b + 4 <= rows {
                if pair {
                    tile::<2, 4>(blocks, nb, r0 + j, xq, b, rows, out);
                } else {
                    tile::<1, 4>(blocks, nb, r0 + j, xq, b, rows, out);
                }
                b += 4;
            }
            while b < rows {
                if pair {
                    tile::<2, 1>(blocks, nb, r0 + j, xq, b, rows, out);
                } else {
                    tile::<1, 1>(blocks, nb, r0 + j, xq, b, rows, out);
                }
                b += 1;
            }
            j += if pair { 2 } else { 1 };
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};

    use super::{super::tests::inputs, super::tests::weights, *};

    const FORMATS: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

    fn packed(dt: GgmlDType, n: usize, k: usize) -> PackedLinear {
        PackedLinear::from_qtensor(&QTensor::quantize(&weights(n, k), dt).expect("q"))
            .expect("pack")
    }

    /// The SIMD tiles against the portable lane-by-lane reference, bit for bit, at every
    /// tile shape (1 row; 9 rows: 2x4 tiles and remainders; 37 weight rows: an odd last one).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_tiles_match_the_portable_kernel_bitwise() {
        assert!(
            avx2_fma(),
            "this CPU lacks AVX2/FMA, so the SIMD kernel cannot be checked on it"
        );
        let (n, k) = (37, 96);
        for dt in FORMATS {
            let w = packed(dt, n, k);
            for rows in [1, 9] {
                let x = inputs(rows, k);
                let got = matmul(&w, &x, rows).expect("integer kernel");
                let xq = QuantRows::new(&x, k);
                for b in 0..rows {
                    for r in 0..n {
                        let want = dot_portable(&w.blocks, k / BLOCK, r, &xq, b);
                        assert_eq!(got[b * n + r].to_bits(), want.to_bits(), "{dt:?} {b} {r}");
                    }
                }
            }
        }
    }

    /// Near the f32 kernel (the activations' rounding to 16 bits is the only difference),
    /// and each row bit-identical alone and among others.
    #[test]
    fn close_to_f32_and_batch_invariant() {
        let (n, k, rows) = (33, 128, 9);
        for dt in FORMATS {
            let w = packed(dt, n, k);
            let x = inputs(rows, k);
            let all = matmul(&w, &x, rows).expect("integer kernel");
            let exact = w.matmul(&x, rows);
            let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = all
                .iter()
                .zip(&exact)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst > 0.0 && worst < 1e-4 * scale,
                "{dt:?}: {worst} of {scale}"
            );
            for r in 0..rows {
                let alone = matmul(&w, &x[r * k..(r + 1) * k], 1).expect("one row");
                assert_eq!(alone, all[r * n..(r + 1) * n], "{dt:?} row {r}");
            }
        }
    }

    /// Quantisation: zero blocks stay zero, the largest value maps to ±32767.
    #[test]
    fn activations_quantise_per_block() {
        let mut x = vec![0f32; 64];
        x[40] = -2.0;
        x[41] = 0.5;
        let q = QuantRows::new(&x, 64);
        assert_eq!((q.d[0], q.s[0]), (0.0, 0.0));
        assert!(q.q[..32].iter().all(|&v| v == 0));
        assert_eq!((q.q[40], q.q[41]), (-32767, 8192));
        assert!((q.d[1] - 2.0 / 32767.0).abs() < 1e-9);
        assert!((q.s[1] - q.d[1] * (8192.0 - 32767.0)).abs() < 1e-6);
    }
}
