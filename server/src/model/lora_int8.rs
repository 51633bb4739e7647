//! An `int8` LoRA pair's update as integer dot products ([`apply_rows`]).
//!
//! `A`'s rows and `B`'s columns are 8-bit with one scale each ([`Int8`]; `B` stored in
//! blocks of 16 outputs, each output's bytes for two rank components side by side). Each
//! row's input is quantised to 16 bits with one scale (`x ≈ sx·qx`, `sx = max|x| /
//! 32767`, the nearest step, ties to even), so each rank component is one exact integer
//! sum, `t_j = Σ qA_jk·qx_k`, and `u_j = ((t_j as f32 · (sx·sa_j)) · scale) · sb_j`. The
//! rank components are quantised the same way (`u ≈ su·qu`), so the output is one exact
//! integer sum too: `y_o += (Σ_j qB_oj·qu_j) as f32 · su`. AVX-512 VNNI's `vpdpwssd` or
//! AVX2's `madd_epi16` do both sums, 32 or 16 products an instruction.
//!
//! Rows that share a pair (a prompt's tokens) run together, up to [`TILE`] at a time: each
//! of the pair's bytes is loaded and widened once for all of them.
//!
//! Invariant: the integer sums are exact (every partial sum of at most 512 products of
//! `|q| ≤ 127` and `|qx| ≤ 32767` fits an `i32`; longer sums are taken in 512-value pieces
//! into an `i64`), and the float steps are one order in every kernel, so AVX-512, AVX2 and
//! the plain code give the same bits, for a row alone or in a tile, whatever else is in the
//! batch.
//! Why 16-bit activations (llama.cpp uses 8): a LoRA update is small beside the shared
//! weights' output, and at 16 bits its error is ~1/65,534 of the largest value, far below
//! the 8-bit weights' own.

use super::lora_values::{column_at, padded, Int8, Scaled};

/// Which instructions the kernels use. [`Isa::best`] picks the widest this CPU has; tests
/// run each one against [`Isa::Plain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Plain,
    Avx2,
    Avx512,
}

impl Isa {
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(Isa::detect)
    }

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512;
            }
            if super::packed::avx2_fma() {
                return Isa::Avx2;
            }
        }
        Isa::Plain
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match (self, Isa::best()) {
            (Isa::Plain, _) | (_, Isa::Avx512) => true,
            (Isa::Avx2, best) => best == Isa::Avx2,
            (Isa::Avx512, _) => false,
        }
    }
}

/// Rows that share one pair (`a` scaled by rows `(r, in)`, `b` by columns `(out, r)`):
/// their inputs `x: (n, in)` and outputs `y: (n, out)`, row-major.
pub struct Rows<'a> {
    pub a: &'a Int8,
    pub b: &'a Int8,
    pub scale: f32,
    pub x: &'a [f32],
    pub y: &'a mut [f32],
}

impl Rows<'_> {
    /// `(n, in, r, out)`, the shapes checked.
    fn shape(&self) -> (usize, usize, usize, usize) {
        assert_eq!(
            (self.a.scaled, self.b.scaled),
            (Scaled::Rows, Scaled::Columns),
            "A by rows, B by columns"
        );
        let (inp, r, out) = (self.a.cols, self.a.rows, self.b.rows);
        assert!(inp > 0 && self.x.len().is_multiple_of(inp) && self.b.cols == r);
        let n = self.x.len() / inp;
        assert_eq!(self.y.len(), n * out, "y is (n, out)");
        (n, inp, r, out)
    }

    /// Rank component `j` from its integer sum: `((t as f32 · (sx·sa_j)) · scale) · sb_j`.
    fn component(&self, j: usize, t: i64, sx: f32) -> f32 {
        ((t as f32 * (sx * self.a.scales[j])) * self.scale) * self.b.scales[j]
    }
}

/// Rows of one pair taken together.
pub const TILE: usize = 4;

/// The scratch of a run of rows, reused call after call.
#[derive(Default)]
struct Scratch {
    /// The inputs in 16 bits, `(n, in)`, and their scales.
    qx: Vec<i16>,
    sx: Vec<f32>,
    /// The rank components, `(n, r2)` with `r2` even (a zero past an odd rank), in `f32`
    /// and in 16 bits, and their scales.
    u: Vec<f32>,
    qu: Vec<i16>,
    su: Vec<f32>,
    /// `qu` two by two, as the `i32` one lane of `vpdpwssd` takes: `(n, r2 / 2)`.
    pairs: Vec<i32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = Default::default();
}

/// `y_i += scale · B (A x_i)` for each row; the module's arithmetic is above.
/// # Panics
/// If `isa` is not [`Isa::available`] or the shapes disagree.
pub fn apply_rows(rows: Rows, isa: Isa) {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    let (n, inp, r, out) = rows.shape();
    let r2 = r.next_multiple_of(2);
    SCRATCH.with_borrow_mut(|s| {
        s.qx.resize(n * inp, 0);
        s.sx.clear();
        for (x, q) in rows.x.chunks_exact(inp).zip(s.qx.chunks_exact_mut(inp)) {
            s.sx.push(quantise(x, q, isa));
        }
        s.u.clear();
        s.u.resize(n * r2, 0.0);
        for (j, a) in rows.a.q.chunks_exact(inp).enumerate() {
            let mut i = 0;
            while i < n {
                let k = TILE.min(n - i);
                let t = dots(a, &s.qx[i * inp..(i + k) * inp], isa);
                for (d, &t) in t[..k].iter().enumerate() {
                    s.u[(i + d) * r2 + j] = rows.component(j, t, s.sx[i + d]);
                }
                i += k;
            }
        }
        s.qu.resize(n * r2, 0);
        s.su.clear();
        s.pairs.clear();
        for (u, q) in s.u.chunks_exact(r2).zip(s.qu.chunks_exact_mut(r2)) {
            s.su.push(quantise(u, q, isa));
            s.pairs.extend(
                q.chunks_exact(2)
                    .map(|p| (p[0] as u16 as u32 | (p[1] as u16 as u32) << 16) as i32),
            );
        }
        let half = r2 / 2;
        let mut i = 0;
        while i < n {
            let k = TILE.min(n - i);
            expand(
                &rows.b.q,
                &s.pairs[i * half..(i + k) * half],
                &s.su[i..i + k],
                &mut rows.y[i * out..(i + k) * out],
                isa,
            );
            i += k;
        }
    })
}

/// How far ahead of the `A` sums their bytes are asked for. `B`'s bytes are not asked
/// for: its sums read it front to back, which the hardware prefetcher follows, and on the
/// machine of issue 17's seventeenth part asking for them while `A`'s sums ran made a
/// decode step's updates slower (`mixed_step`'s `lora` mode: ~13.5 against ~11 ms a
/// step), the prefetches waiting on memory as loads do.
const AHEAD: usize = 4096;

/// `x` to 16 bits in `q`; returns the scale `max|x| / 32767` (`x` finite). Like [`dots`]
/// and [`expand`], private: `isa` must be available, which [`apply_rows`] checks.
fn quantise(x: &[f32], q: &mut [i16], isa: Isa) -> f32 {
    assert_eq!(x.len(), q.len());
    let amax = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked `isa` is available.
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe { avx512::amax(x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { avx2::amax(x) },
        _ => x.iter().fold(0f32, |m, v| m.max(v.abs())),
    };
    let scale = amax / 32767.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe { avx512::steps(x, inv, q) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { avx2::steps(x, inv, q) },
        _ => 0,
    };
    for (o, &v) in q[done..].iter_mut().zip(&x[done..]) {
        *o = (v * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16;
    }
    scale
}

/// `Σ a_k·x_ik` exactly, for each of the (up to [`TILE`]) rows `x_i` of `x: (k, a.len())`;
/// entries past `k` are zero.
fn dots(a: &[i8], x: &[i16], isa: Isa) -> [i64; TILE] {
    let len = a.len();
    assert!(len > 0 && x.len().is_multiple_of(len) && x.len() / len <= TILE);
    let k = x.len() / len;
    let row = |i: usize, c: usize| &x[i * len + c..i * len + (c + PIECE).min(len)];
    let mut s = [0i64; TILE];
    for c in (0..len).step_by(PIECE) {
        let ac = &a[c..(c + PIECE).min(len)];
        let piece: [i32; TILE] = match (isa, k) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller checked `isa` is available.
            #[allow(unsafe_code)]
            (Isa::Avx512, TILE) => unsafe {
                avx512::dots(ac, [row(0, c), row(1, c), row(2, c), row(3, c)])
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            #[allow(unsafe_code)]
            (Isa::Avx512, _) => std::array::from_fn(|i| {
                if i < k {
                    unsafe { avx512::dots(ac, [row(i, c)])[0] }
                } else {
                    0
                }
            }),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            #[allow(unsafe_code)]
            (Isa::Avx2, TILE) => unsafe {
                avx2::dots(ac, [row(0, c), row(1, c), row(2, c), row(3, c)])
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            #[allow(unsafe_code)]
            (Isa::Avx2, _) => std::array::from_fn(|i| {
                if i < k {
                    unsafe { avx2::dots(ac, [row(i, c)])[0] }
                } else {
                    0
                }
            }),
            _ => std::array::from_fn(|i| if i < k { dot_plain(ac, row(i, c)) } else { 0 }),
        };
        for (s, p) in s.iter_mut().zip(piece) {
            *s += p as i64;
        }
    }
    s
}

/// The values whose products' every partial sum fits an `i32`: `512 · 127 · 32767 < 2^31`.
const PIECE: usize = 512;

fn dot_plain(a: &[i8], x: &[i16]) -> i32 {
    a.iter().zip(x).map(|(&a, &x)| a as i32 * x as i32).sum()
}

/// `y_io += (Σ_j b_oj·qu_ij) as f32 · su_i` for the (up to [`TILE`]) rows of `y: (k, out)`;
/// `pairs: (k, r2 / 2)` holds each row's `qu` two by two, `b` is stored by columns.
fn expand(b: &[i8], pairs: &[i32], su: &[f32], y: &mut [f32], isa: Isa) {
    let k = su.len();
    let (half, out) = (pairs.len() / k, y.len() / k);
    assert!(pairs.len() == k * half && y.len() == k * out && k <= TILE);
    assert_eq!(b.len(), padded(out, 2 * half), "B is (out, r) by columns");
    // Past 512 rank components a sum may pass an `i32`: the plain code's `i64` takes them.
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked `isa` is available.
        #[allow(unsafe_code)]
        Isa::Avx512 if half <= PIECE / 2 => unsafe { avx512::expand(b, pairs, su, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx2 if half <= PIECE / 2 => unsafe { avx2::expand(b, pairs, su, y) },
        _ => 0,
    };
    expand_plain(b, pairs, su, y, done);
}

/// [`expand`]'s plain form for outputs `from..` of each row.
fn expand_plain(b: &[i8], pairs: &[i32], su: &[f32], y: &mut [f32], from: usize) {
    let k = su.len();
    let (half, out) = (pairs.len() / k, y.len() / k);
    for ((y, pairs), &su) in y
        .chunks_exact_mut(out)
        .zip(pairs.chunks_exact(half))
        .zip(su)
    {
        for (o, yo) in y.iter_mut().enumerate().skip(from) {
            let mut acc = 0i64;
            for (p, &qp) in pairs.iter().enumerate() {
                let (lo, hi) = (qp as i16 as i64, (qp >> 16) as i16 as i64);
                let w = &b[column_at(o, 2 * p, 2 * half)..];
                acc += w[0] as i64 * lo + w[1] as i64 * hi;
            }
            *yo += acc as f32 * su;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::*;

    /// `max |x|`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn amax(x: &[f32]) -> f32 {
        let n = x.len() / 16 * 16;
        let mut m = _mm512_setzero_ps();
        for c in (0..n).step_by(16) {
            m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(c))));
        }
        x[n..]
            .iter()
            .fold(_mm512_reduce_max_ps(m), |m, v| m.max(v.abs()))
    }

    /// `q = clamp(round(x · inv))` for the whole 16-chunks; returns how many were done.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn steps(x: &[f32], inv: f32, q: &mut [i16]) -> usize {
        let n = x.len() / 16 * 16;
        let (iv, lo, hi) = (
            _mm512_set1_ps(inv),
            _mm512_set1_epi32(-32767),
            _mm512_set1_epi32(32767),
        );
        for c in (0..n).step_by(16) {
            // The default rounding: to nearest, ties to even.
            let i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(c)), iv));
            let i = _mm512_min_epi32(_mm512_max_epi32(i, lo), hi);
            _mm256_storeu_si256(q.as_mut_ptr().add(c).cast(), _mm512_cvtepi32_epi16(i));
        }
        n
    }

    /// `Σ a_k·x_ik` for each row `x_i` (at least `a`'s length) over at most
    /// [`super::PIECE`] values, exact in `i32`; `a`'s bytes are widened once for all.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dots<const K: usize>(a: &[i8], x: [&[i16]; K]) -> [i32; K] {
        let n = a.len() / 32 * 32;
        let ap = a.as_ptr();
        let mut acc = [_mm512_setzero_si512(); K];
        for c in (0..n).step_by(32) {
            if c.is_multiple_of(64) {
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(c + super::AHEAD).cast());
            }
            let a16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(ap.add(c).cast()));
            for (acc, x) in acc.iter_mut().zip(&x) {
                *acc = _mm512_dpwssd_epi32(*acc, a16, _mm512_loadu_si512(x.as_ptr().add(c).cast()));
            }
        }
        std::array::from_fn(|i| {
            _mm512_reduce_add_epi32(acc[i]) + super::dot_plain(&a[n..], &x[i][n..])
        })
    }

    /// [`super::expand`] for the whole 16-blocks of outputs; returns how many were done.
    /// Each block: per pair of rank components, the 32 bytes widened once, then one
    /// `vpdpwssd` a row against that row's two components.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn expand(b: &[i8], pairs: &[i32], su: &[f32], y: &mut [f32]) -> usize {
        let k = su.len();
        let (half, out) = (pairs.len() / k, y.len() / k);
        let n = out / 16 * 16;
        for o in (0..n).step_by(16) {
            let block = b.as_ptr().add(super::column_at(o, 0, 2 * half));
            let mut acc = [_mm512_setzero_si512(); super::TILE];
            for p in 0..half {
                let w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(block.add(p * 32).cast()));
                for (i, acc) in acc[..k].iter_mut().enumerate() {
                    let u = _mm512_set1_epi32(*pairs.get_unchecked(i * half + p));
                    *acc = _mm512_dpwssd_epi32(*acc, w, u);
                }
            }
            for (i, acc) in acc[..k].iter().enumerate() {
                let yp = y.as_mut_ptr().add(i * out + o);
                let add = _mm512_mul_ps(_mm512_cvtepi32_ps(*acc), _mm512_set1_ps(su[i]));
                _mm512_storeu_ps(yp, _mm512_add_ps(_mm512_loadu_ps(yp), add));
            }
        }
        n
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    /// `max |x|`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn amax(x: &[f32]) -> f32 {
        let n = x.len() / 8 * 8;
        let (mut m, sign) = (_mm256_setzero_ps(), _mm256_set1_ps(-0.0));
        for c in (0..n).step_by(8) {
            m = _mm256_max_ps(
                m,
                _mm256_andnot_ps(sign, _mm256_loadu_ps(x.as_ptr().add(c))),
            );
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        x[n..]
            .iter()
            .chain(&lanes)
            .fold(0f32, |m, v| m.max(v.abs()))
    }

    /// `q = clamp(round(x · inv))` for the whole 8-chunks; returns how many were done.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn steps(x: &[f32], inv: f32, q: &mut [i16]) -> usize {
        let n = x.len() / 8 * 8;
        let (iv, lo, hi) = (
            _mm256_set1_ps(inv),
            _mm256_set1_epi32(-32767),
            _mm256_set1_epi32(32767),
        );
        for c in (0..n).step_by(8) {
            // The default rounding: to nearest, ties to even.
            let i = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(c)), iv));
            let i = _mm256_min_epi32(_mm256_max_epi32(i, lo), hi);
            // Packing works within 128-bit halves: values 0..4 and 4..8 land in quarters 0
            // and 2, which the permute brings together.
            let p = _mm256_permute4x64_epi64(_mm256_packs_epi32(i, i), 0b10_00);
            _mm_storeu_si128(q.as_mut_ptr().add(c).cast(), _mm256_castsi256_si128(p));
        }
        n
    }

    /// `Σ a_k·x_ik` for each row `x_i` (at least `a`'s length) over at most
    /// [`super::PIECE`] values, exact in `i32`; `a`'s bytes are widened once for all.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dots<const K: usize>(a: &[i8], x: [&[i16]; K]) -> [i32; K] {
        let n = a.len() / 16 * 16;
        let ap = a.as_ptr();
        let mut acc = [_mm256_setzero_si256(); K];
        for c in (0..n).step_by(16) {
            if c.is_multiple_of(64) {
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(c + super::AHEAD).cast());
            }
            let a16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(ap.add(c).cast()));
            for (acc, x) in acc.iter_mut().zip(&x) {
                let p = _mm256_madd_epi16(a16, _mm256_loadu_si256(x.as_ptr().add(c).cast()));
                *acc = _mm256_add_epi32(*acc, p);
            }
        }
        std::array::from_fn(|i| sum8(acc[i]) + super::dot_plain(&a[n..], &x[i][n..]))
    }

    /// The sum of eight `i32` lanes.
    #[target_feature(enable = "avx2")]
    unsafe fn sum8(v: __m256i) -> i32 {
        let q = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0b01_00_11_10));
        let q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0b10_11_00_01));
        _mm_cvtsi128_si32(q)
    }

    /// [`super::expand`] for the whole 16-blocks of outputs, eight at a time; returns how
    /// many were done.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn expand(b: &[i8], pairs: &[i32], su: &[f32], y: &mut [f32]) -> usize {
        let k = su.len();
        let (half, out) = (pairs.len() / k, y.len() / k);
        let n = out / 16 * 16;
        for o in (0..n).step_by(8) {
            // Outputs `o..o + 8` are the first or second sixteen bytes of each pair's 32.
            let lanes = b.as_ptr().add(super::column_at(o, 0, 2 * half));
            let mut acc = [_mm256_setzero_si256(); super::TILE];
            for p in 0..half {
                let w = _mm256_cvtepi8_epi16(_mm_loadu_si128(lanes.add(p * 32).cast()));
                for (i, acc) in acc[..k].iter_mut().enumerate() {
                    let u = _mm256_set1_epi32(*pairs.get_unchecked(i * half + p));
                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(w, u));
                }
            }
            for (i, acc) in acc[..k].iter().enumerate() {
                let yp = y.as_mut_ptr().add(i * out + o);
                let add = _mm256_mul_ps(_mm256_cvtepi32_ps(*acc), _mm256_set1_ps(su[i]));
                _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), add));
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::{
        tests::{pair, worst},
        LoraDtype,
    };
    use crate::model::lora_values::Values;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// The SIMD kernels this CPU has: AVX2 on every x86-64 this project builds for, and
    /// AVX-512 where the CPU has it (said on stderr when it does not).
    fn simd_isas() -> Vec<Isa> {
        let mut isas = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            assert!(Isa::Avx2.available(), "this test needs AVX2");
            isas.push(Isa::Avx2);
            if Isa::Avx512.available() {
                isas.push(Isa::Avx512);
            } else {
                eprintln!("this CPU lacks AVX-512 BW/VNNI: that kernel is never used here");
            }
        }
        isas
    }

    fn values(n: usize, k: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 53 + k * 31) % 89) as f32 - 44.0) / 17.0 + 1e-3 * i as f32)
            .collect()
    }

    /// Quantising and the integer sums (pieces past 512 values, tails, the extremes, one to
    /// four rows at once): each SIMD kernel gives the plain code's values, and the sums are
    /// the exact ones.
    #[test]
    fn each_quantiser_and_sum_is_the_plain_one() {
        for isa in simd_isas() {
            for n in [7, 43, 576, 1100, 1536] {
                let x = values(n, 0);
                let (mut plain, mut fast) = (vec![0i16; n], vec![0i16; n]);
                let s = quantise(&x, &mut plain, Isa::Plain);
                assert_eq!(quantise(&x, &mut fast, isa).to_bits(), s.to_bits());
                assert_eq!(plain, fast, "{isa:?} quantise {n}");
                assert!(plain.iter().any(|&q| q.abs() == 32767));
                let a: Vec<i8> = (0..n).map(|i| (i * 41 % 255) as i8).collect();
                for k in 1..=TILE {
                    let xs: Vec<i16> = (0..k)
                        .flat_map(|i| plain.iter().map(move |&q| q.wrapping_mul(i as i16 * 2 - 3)))
                        .collect();
                    let want: Vec<i64> = xs
                        .chunks(n)
                        .map(|x| x.iter().zip(&a).map(|(&x, &a)| a as i64 * x as i64).sum())
                        .collect();
                    let got = dots(&a, &xs, isa);
                    assert_eq!(&got[..k], &want[..], "{isa:?} dots {n} x {k}");
                    assert!(got[k..].iter().all(|&s| s == 0));
                }
                // The largest products, all of one sign: past an i32 beyond 516 values.
                let (top, most) = (vec![127i8; n], vec![32767i16; n * 2]);
                let big = n as i64 * 127 * 32767;
                assert_eq!(dots(&top, &most, isa)[..2], [big, big], "{isa:?} {n}");
                assert_eq!(dots(&vec![-127i8; n], &most[..n], isa)[0], -big);
            }
        }
    }

    /// The output sums read `B` where [`Int8::at`] puts its values (odd ranks, outputs
    /// past a block of 16, one to four rows), and each SIMD kernel gives the plain bits.
    #[test]
    fn each_expansion_reads_b_where_it_lies_and_is_the_plain_one() {
        for (r, out) in [(1, 9), (8, 20), (15, 36), (16, 576), (24, 1536)] {
            let bq = Int8::quantise(&values(out * r, 3), r, Scaled::Columns).expect("finite");
            let r2 = r.next_multiple_of(2);
            for k in 1..=TILE {
                let qu: Vec<i16> = (0..k * r2)
                    .map(|i| {
                        if i % r2 < r {
                            ((i * 7919 + 1234) % 65535) as i16
                        } else {
                            0
                        }
                    })
                    .collect();
                let pairs: Vec<i32> = qu
                    .chunks_exact(2)
                    .map(|p| (p[0] as u16 as u32 | (p[1] as u16 as u32) << 16) as i32)
                    .collect();
                let su: Vec<f32> = (0..k).map(|i| 1e-4 * (i + 1) as f32).collect();
                let y0: Vec<f32> = (0..k * out).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
                let mut plain = y0.clone();
                expand(&bq.q, &pairs, &su, &mut plain, Isa::Plain);
                for (i, (y, y0)) in plain.chunks(out).zip(y0.chunks(out)).enumerate() {
                    for o in 0..out {
                        let t: i64 = (0..r)
                            .map(|j| bq.q[bq.at(o, j)] as i64 * qu[i * r2 + j] as i64)
                            .sum();
                        assert_eq!(y[o], y0[o] + t as f32 * su[i], "rank {r} out {o} row {i}");
                    }
                }
                assert_ne!(plain, y0);
                for isa in simd_isas() {
                    let mut fast = y0.clone();
                    expand(&bq.q, &pairs, &su, &mut fast, isa);
                    assert_eq!(
                        bits(&plain),
                        bits(&fast),
                        "{isa:?} rank {r}, {out}, {k} rows"
                    );
                }
            }
        }
    }

    /// Whole updates: each kernel gives the plain code's bits, and a row's bits are the
    /// same alone as among others of its pair (tiles of four and what is left).
    #[test]
    fn a_row_has_the_same_bits_alone_in_a_tile_and_in_every_kernel() {
        for (r, inp, out) in [(16, 576, 192), (12, 43, 20), (8, 1536, 576), (5, 40, 17)] {
            let q = pair(r, inp, out).to_dtype(LoraDtype::Int8).expect("finite");
            let (Values::Int8(a), Values::Int8(b)) = (&q.a, &q.b) else {
                panic!("int8")
            };
            let n = 7;
            let x: Vec<f32> = (0..n * inp)
                .map(|i| ((i % 13) as f32 - 6.0) / 7.0 * (1 + i / inp) as f32)
                .collect();
            let run = |x: &[f32], isa| {
                let mut y = vec![-0.0; x.len() / inp * out];
                let (a, b, scale) = (a, b, q.scale);
                apply_rows(
                    Rows {
                        a,
                        b,
                        scale,
                        x,
                        y: &mut y,
                    },
                    isa,
                );
                y
            };
            let together = run(&x, Isa::Plain);
            let alone: Vec<f32> = x.chunks(inp).flat_map(|x| run(x, Isa::Plain)).collect();
            assert_eq!(bits(&together), bits(&alone), "rank {r} {inp} {out}: alone");
            assert!(together.iter().all(|v| *v != 0.0));
            for isa in simd_isas() {
                assert_eq!(
                    bits(&run(&x, isa)),
                    bits(&together),
                    "{isa:?} {r} {inp} {out}"
                );
            }
        }
    }

    /// An int8 pair's update is `y + scale · B' A' x` (in f64) where `A'` and `B'` are the
    /// values its bytes and scales stand for, to within what quantising the row and the
    /// rank components to 16 bits can move it (half a step of each's scale through the
    /// matrices); so it differs from the f32 pair's, but little. Ranks 12 and 16, the kernel
    /// this CPU runs.
    #[test]
    fn an_int8_pair_computes_the_values_it_stands_for() {
        for r in [12, 16] {
            let (inp, out) = (43, 32);
            let p = pair(r, inp, out);
            let q = p.to_dtype(LoraDtype::Int8).expect("finite");
            // A byte a value, and an f32 scale for each of A's rows and B's columns.
            assert_eq!(q.bytes(), p.bytes() / 4 + 2 * r * 4, "rank {r}");
            let (qa, qb) = (q.a.to_f32(), q.b.to_f32());
            let x: Vec<f32> = (0..inp).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
            let half_step = x.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 32767.0 / 2.0;
            let y0: Vec<f32> = (0..out).map(|i| (i % 3) as f32 - 1.0).collect();
            let (mut exact, mut y) = (y0.clone(), y0.clone());
            p.apply_row(&x, &mut exact);
            q.apply_row(&x, &mut y);
            // The rank components (`scale · A' x`), and half a step of theirs.
            let u: Vec<f64> = (0..r)
                .map(|j| {
                    let a = &qa[j * inp..(j + 1) * inp];
                    q.scale as f64
                        * a.iter()
                            .zip(&x)
                            .map(|(&a, &x)| a as f64 * x as f64)
                            .sum::<f64>()
                })
                .collect();
            let Values::Int8(b) = &q.b else {
                panic!("int8")
            };
            let u_half = (0..r)
                .map(|j| (u[j] * b.scales[j] as f64).abs())
                .fold(0f64, f64::max)
                * 1.0001
                / 32767.0
                / 2.0;
            for o in 0..out {
                let (mut want, mut bound) = (y0[o] as f64, 0f64);
                for j in 0..r {
                    let a = &qa[j * inp..(j + 1) * inp];
                    let b_oj = qb[o * r + j] as f64;
                    want += b_oj * u[j];
                    bound += (q.scale as f64 * b_oj).abs()
                        * a.iter().map(|&a| a.abs() as f64).sum::<f64>()
                        * half_step;
                    bound += (b.q[b.at(o, j)] as f64).abs() * u_half;
                }
                let err = (y[o] as f64 - want).abs();
                assert!(
                    err <= bound + 1e-6 * (1.0 + want.abs()),
                    "rank {r} out {o}: {err} > {bound}"
                );
            }
            assert_ne!(y, exact, "rank {r}: the values are rounded");
            let worst = worst(&y, &exact);
            assert!(worst < 0.1, "rank {r}: {worst}");
        }
    }
}
