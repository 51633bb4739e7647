//! The exact kernel's tile for many activation rows on AVX-512: two activation rows share
//! one 512-bit register (rows `2p` and `2p+1` in the low and high eight lanes) and each
//! eight-wide weight chunk is broadcast to both halves. Every (weight row, activation row)
//! pair is then accumulated exactly as the AVX2 and portable kernels do it (lane `l` sums
//! elements `l, l+8, ...` in order with one FMA each, lanes summed with
//! [`super::reduce`]'s additions), at twice the width, so the bits are the same whichever
//! kernel ran and whatever else was in the batch.

use super::LANES;

/// Whether this CPU runs [`tile`] (AVX-512 F and DQ).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq");
    #[allow(unreachable_code)]
    false
}

/// Activation rows `(rows, k)` interleaved in pairs: pair `p`, chunk `c` is
/// `[x[2p][8c..8c+8], x[2p+1][8c..8c+8]]`; a zero row pads an odd count.
pub(super) struct Pairs {
    v: Vec<f32>,
    pairs: usize,
    k: usize,
}

impl Pairs {
    pub(super) fn new(x: &[f32], rows: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(LANES) && x.len() >= rows * k);
        let pairs = rows.div_ceil(2);
        let mut v = vec![0f32; pairs * 2 * k];
        for b in 0..rows {
            let (p, half) = (b / 2, b % 2);
            for c in 0..k / LANES {
                let at = p * 2 * k + c * 2 * LANES + half * LANES;
                v[at..at + LANES].copy_from_slice(&x[b * k + c * LANES..b * k + (c + 1) * LANES]);
            }
        }
        Self { v, pairs, k }
    }
}

/// Dots weight rows `ws` (1..=4 rows of `k` dequantised values) with activation rows
/// `0..rows` of `xp`: `outs[j][b]` gets weight row `j` against activation row `b`.
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) unsafe fn tile(ws: &[&[f32]], xp: &Pairs, rows: usize, outs: &mut [&mut [f32]]) {
    assert!((1..=4).contains(&ws.len()) && outs.len() == ws.len());
    assert!(ws.iter().all(|w| w.len() == xp.k) && outs.iter().all(|o| o.len() >= rows));
    assert!(rows.div_ceil(2) <= xp.pairs);
    match ws.len() {
        4 => pairs::<4>(ws, xp, rows, outs),
        3 => pairs::<3>(ws, xp, rows, outs),
        2 => pairs::<2>(ws, xp, rows, outs),
        _ => pairs::<1>(ws, xp, rows, outs),
    }
}

/// Four pairs at a time, then one.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn pairs<const W: usize>(ws: &[&[f32]], xp: &Pairs, rows: usize, outs: &mut [&mut [f32]]) {
    let w: [*const f32; W] = std::array::from_fn(|j| ws[j].as_ptr());
    let n = rows.div_ceil(2);
    let mut p = 0;
    while p + 4 <= n {
        let acc = block::<W, 4>(w, xp, p);
        write(&acc, p, rows, outs);
        p += 4;
    }
    while p < n {
        let acc = block::<W, 1>(w, xp, p);
        write(&acc, p, rows, outs);
        p += 1;
    }
}

/// `W` weight rows against pairs `p0..p0+P`: one 512-bit accumulator each.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn block<const W: usize, const P: usize>(
    w: [*const f32; W],
    xp: &Pairs,
    p0: usize,
) -> [[std::arch::x86_64::__m512; P]; W] {
    use std::arch::x86_64::*;
    let k = xp.k;
    let x: [*const f32; P] = std::array::from_fn(|i| xp.v.as_ptr().add((p0 + i) * 2 * k));
    let mut acc = [[_mm512_setzero_ps(); P]; W];
    for c in 0..k / LANES {
        let xs: [__m512; P] = std::array::from_fn(|i| _mm512_loadu_ps(x[i].add(2 * LANES * c)));
        for j in 0..W {
            let wv = _mm512_broadcast_f32x8(_mm256_loadu_ps(w[j].add(LANES * c)));
            for i in 0..P {
                acc[j][i] = _mm512_fmadd_ps(wv, xs[i], acc[j][i]);
            }
        }
    }
    acc
}

/// Each accumulator's two halves, reduced, to the outputs of rows `2p` and `2p+1`.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn write<const W: usize, const P: usize>(
    acc: &[[std::arch::x86_64::__m512; P]; W],
    p0: usize,
    rows: usize,
    outs: &mut [&mut [f32]],
) {
    use std::arch::x86_64::*;
    for (j, acc) in acc.iter().enumerate() {
        for (i, a) in acc.iter().enumerate() {
            let (lo, hi) = halves(*a);
            let b = 2 * (p0 + i);
            outs[j][b] = lo;
            if b + 1 < rows {
                outs[j][b + 1] = hi;
            }
        }
    }
    /// [`super::reduce`] of both eight-lane halves in registers: lane `l` of each half plus
    /// lane `l+4`, then lanes 0+1 and 2+3, then those two sums; `reduce`'s additions in its
    /// order, so the bits are the same.
    #[inline(always)]
    unsafe fn halves(v: __m512) -> (f32, f32) {
        let s = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0xB1>(v, v));
        let t = _mm512_add_ps(s, _mm512_permute_ps::<0xB1>(s));
        let u = _mm512_add_ps(t, _mm512_permute_ps::<0x4E>(t));
        (
            _mm512_cvtss_f32(u),
            _mm_cvtss_f32(_mm512_extractf32x4_ps::<2>(u)),
        )
    }
}
