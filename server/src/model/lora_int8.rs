//! An `int8` LoRA pair's update as integer dot products ([`apply_row`]).
//!
//! `A`'s rows and `B`'s columns are 8-bit with one scale each ([`Int8`]; `B` is stored
//! column by column, `B^T`). The row's input is quantised to 16 bits with one scale
//! (`x ≈ sx·qx`, `sx = max|x| / 32767`, the nearest step, ties to even), so each rank
//! component is one exact integer sum, `t_j = Σ qA_jk·qx_k` (AVX-512 VNNI's `vpdpwssd` or
//! AVX2's `madd_epi16`: sixteen or thirty-two products an instruction where the
//! widen-then-FMA form does eight). Then `u_j = ((t_j as f32 · (sx·sa_j)) · scale) · sb_j`
//! and `y_o += Σ_j qB^T_jo · u_j`, the sum fused over `j` in order from `+0.0`: sixteen
//! outputs a register, no horizontal adds.
//!
//! Invariant: the integer sums are exact (every partial sum of at most 512 products of
//! `|q| ≤ 127` and `|qx| ≤ 32767` fits an `i32`; longer rows are summed in 512-value
//! pieces into an `i64`), and the float steps are one order in every kernel, so AVX-512,
//! AVX2 and the plain code give the same bits, whatever else is in the batch.
//! Why 16-bit activations (llama.cpp uses 8): a LoRA update is small beside the shared
//! weights' output, and at 16 bits its error is ~1/65,534 of the row's largest value, far
//! below the 8-bit weights' own.

use super::lora_values::{Int8, Scaled};

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

/// One row's update: its pair (`a` scaled by rows `(r, in)`, `b` by columns `(out, r)`
/// stored as `B^T`), its input `x` and output `y`.
pub struct Row<'a> {
    pub a: &'a Int8,
    pub b: &'a Int8,
    pub scale: f32,
    pub x: &'a [f32],
    pub y: &'a mut [f32],
}

impl Row<'_> {
    /// `(in, r, out)`, the shapes checked.
    fn shape(&self) -> (usize, usize, usize) {
        assert_eq!(
            (self.a.scaled, self.b.scaled),
            (Scaled::Rows, Scaled::Columns),
            "A by rows, B by columns"
        );
        let (inp, r, out) = (self.a.cols, self.a.scales.len(), self.y.len());
        assert!(self.x.len() == inp && self.b.cols == r && self.b.q.len() == r * out);
        (inp, r, out)
    }

    /// Rank component `j` from its integer sum: `((t as f32 · (sx·sa_j)) · scale) · sb_j`.
    fn component(&self, j: usize, t: i64, sx: f32) -> f32 {
        ((t as f32 * (sx * self.a.scales[j])) * self.scale) * self.b.scales[j]
    }
}

thread_local! {
    /// A row's input in 16 bits and its rank components, reused call after call.
    static SCRATCH: std::cell::RefCell<(Vec<i16>, Vec<f32>)> = Default::default();
}

/// `y += scale · B (A x)` for one row; the module's arithmetic is above.
/// # Panics
/// If `isa` is not [`Isa::available`] or the shapes disagree.
pub fn apply_row(row: Row, isa: Isa) {
    assert!(isa.available(), "{isa:?} is not available on this CPU");
    let (inp, r, _) = row.shape();
    SCRATCH.with_borrow_mut(|(qx, u)| {
        qx.resize(inp, 0);
        u.resize(r, 0.0);
        let sx = quantise(row.x, qx, isa);
        for (j, (uj, a)) in u.iter_mut().zip(row.a.q.chunks_exact(inp)).enumerate() {
            prefetch_part(&row.b.q, j, r);
            *uj = row.component(j, dot(a, qx, isa), sx);
        }
        expand(&row.b.q, u, row.y, isa);
    })
}

/// How far ahead of the `A` sums their bytes are asked for.
const AHEAD: usize = 4096;

/// Asks for part `j` of `r` of `bt` in cache (a hint only), so `B` arrives while `A`'s
/// sums run.
fn prefetch_part(bt: &[i8], j: usize, r: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (from, to) = (bt.len() * j / r, bt.len() * (j + 1) / r);
        for at in (from / 64 * 64..to).step_by(64) {
            // SAFETY: a prefetch reads nothing; the address is inside `bt`.
            #[allow(unsafe_code)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    bt.as_ptr().add(at).cast(),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bt, j, r);
}

/// `x` to 16 bits in `q`; returns the scale `max|x| / 32767` (`x` finite). Like [`dot`]
/// and [`expand`], private: `isa` must be available, which [`apply_row`] checks.
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

/// `Σ a_k·x_k`, exactly.
fn dot(a: &[i8], x: &[i16], isa: Isa) -> i64 {
    assert!(x.len() >= a.len());
    let mut s = 0i64;
    for (ac, xc) in a.chunks(PIECE).zip(x.chunks(PIECE)) {
        s += match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller checked `isa` is available.
            #[allow(unsafe_code)]
            Isa::Avx512 => unsafe { avx512::dot(ac, xc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            #[allow(unsafe_code)]
            Isa::Avx2 => unsafe { avx2::dot(ac, xc) },
            _ => dot_plain(ac, xc),
        } as i64;
    }
    s
}

/// The values whose products' every partial sum fits an `i32`: `512 · 127 · 32767 < 2^31`.
const PIECE: usize = 512;

fn dot_plain(a: &[i8], x: &[i16]) -> i32 {
    a.iter().zip(x).map(|(&a, &x)| a as i32 * x as i32).sum()
}

/// `y_o += Σ_j bt[j·out + o] · u_j`, fused over `j` in order from `+0.0`.
fn expand(bt: &[i8], u: &[f32], y: &mut [f32], isa: Isa) {
    let out = y.len();
    assert_eq!(bt.len(), u.len() * out);
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked `isa` is available.
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe { avx512::expand(bt, u, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { avx2::expand(bt, u, y) },
        _ => 0,
    };
    expand_plain(bt, u, y, done);
}

/// [`expand`]'s plain form for outputs `from..`.
fn expand_plain(bt: &[i8], u: &[f32], y: &mut [f32], from: usize) {
    let out = y.len();
    for (o, yo) in y.iter_mut().enumerate().skip(from) {
        let mut acc = 0f32;
        for (j, &uj) in u.iter().enumerate() {
            acc = (bt[j * out + o] as f32).mul_add(uj, acc);
        }
        *yo += acc;
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

    /// `Σ a_k·x_k` over at most [`super::PIECE`] values, exact in `i32`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dot(a: &[i8], x: &[i16]) -> i32 {
        let n = a.len() / 32 * 32;
        let (ap, xp) = (a.as_ptr(), x.as_ptr());
        let mut acc = _mm512_setzero_si512();
        for c in (0..n).step_by(32) {
            if c.is_multiple_of(64) {
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(c + super::AHEAD).cast());
            }
            let a16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(ap.add(c).cast()));
            acc = _mm512_dpwssd_epi32(acc, a16, _mm512_loadu_si512(xp.add(c).cast()));
        }
        _mm512_reduce_add_epi32(acc) + super::dot_plain(&a[n..], &x[n..])
    }

    /// [`super::expand`] for the whole 16-blocks of outputs; returns how many were done.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn expand(bt: &[i8], u: &[f32], y: &mut [f32]) -> usize {
        let out = y.len();
        let n = out / 16 * 16;
        for o in (0..n).step_by(16) {
            let mut acc = _mm512_setzero_ps();
            for (j, &uj) in u.iter().enumerate() {
                let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(bt.as_ptr().add(j * out + o).cast()));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(uj), acc);
            }
            let yp = y.as_mut_ptr().add(o);
            _mm512_storeu_ps(yp, _mm512_add_ps(_mm512_loadu_ps(yp), acc));
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

    /// `Σ a_k·x_k` over at most [`super::PIECE`] values, exact in `i32`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot(a: &[i8], x: &[i16]) -> i32 {
        let n = a.len() / 16 * 16;
        let (ap, xp) = (a.as_ptr(), x.as_ptr());
        let mut acc = _mm256_setzero_si256();
        for c in (0..n).step_by(16) {
            if c.is_multiple_of(64) {
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(c + super::AHEAD).cast());
            }
            let a16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(ap.add(c).cast()));
            let p = _mm256_madd_epi16(a16, _mm256_loadu_si256(xp.add(c).cast()));
            acc = _mm256_add_epi32(acc, p);
        }
        let q = _mm_add_epi32(
            _mm256_castsi256_si128(acc),
            _mm256_extracti128_si256(acc, 1),
        );
        let q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0b01_00_11_10));
        let q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0b10_11_00_01));
        _mm_cvtsi128_si32(q) + super::dot_plain(&a[n..], &x[n..])
    }

    /// [`super::expand`] for the whole 8-blocks of outputs; returns how many were done.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn expand(bt: &[i8], u: &[f32], y: &mut [f32]) -> usize {
        let out = y.len();
        let n = out / 8 * 8;
        for o in (0..n).step_by(8) {
            let mut acc = _mm256_setzero_ps();
            for (j, &uj) in u.iter().enumerate() {
                let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(bt.as_ptr().add(j * out + o).cast()));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(uj), acc);
            }
            let yp = y.as_mut_ptr().add(o);
            _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), acc));
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

    /// Quantising, the integer sums (pieces past 512 values, tails, the extremes), the `B`
    /// update and a whole row's update: each SIMD kernel gives the plain code's bits.
    #[test]
    fn each_kernel_is_the_plain_one_bit_for_bit() {
        for isa in simd_isas() {
            for n in [7, 43, 576, 1100, 1536] {
                let x: Vec<f32> = (0..n)
                    .map(|i| ((i * 53 % 89) as f32 - 44.0) / 17.0 + 1e-3 * i as f32)
                    .collect();
                let (mut plain, mut fast) = (vec![0i16; n], vec![0i16; n]);
                let s = quantise(&x, &mut plain, Isa::Plain);
                assert_eq!(quantise(&x, &mut fast, isa).to_bits(), s.to_bits());
                assert_eq!(plain, fast, "{isa:?} quantise {n}");
                assert!(plain.iter().any(|&q| q.abs() == 32767));
                let a: Vec<i8> = (0..n).map(|i| (i * 41 % 255) as i8).collect();
                let want: i64 = a
                    .iter()
                    .zip(&plain)
                    .map(|(&a, &x)| a as i64 * x as i64)
                    .sum();
                assert_eq!(dot(&a, &plain, isa), want, "{isa:?} dot {n}");
                // The largest products, all of one sign: past an i32 beyond 516 values.
                let (top, most) = (vec![127i8; n], vec![32767i16; n]);
                assert_eq!(dot(&top, &most, isa), n as i64 * 127 * 32767, "{isa:?} {n}");
                let neg = vec![-127i8; n];
                assert_eq!(dot(&neg, &most, isa), -(n as i64) * 127 * 32767);
            }
            for (r, out) in [(1, 9), (8, 20), (16, 36), (16, 576), (24, 1536)] {
                let bt: Vec<i8> = (0..out * r).map(|i| (i * 37 % 255) as i8).collect();
                let u: Vec<f32> = (0..r)
                    .map(|i| ((i * 53 % 89) as f32 - 44.0) / 17.0)
                    .collect();
                let y0: Vec<f32> = (0..out).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
                let (mut plain, mut fast) = (y0.clone(), y0.clone());
                expand(&bt, &u, &mut plain, Isa::Plain);
                expand(&bt, &u, &mut fast, isa);
                assert_eq!(bits(&plain), bits(&fast), "{isa:?} expand rank {r}, {out}");
                assert_ne!(plain, y0);
            }
            for (r, inp, out) in [(16, 576, 192), (12, 43, 20), (8, 1536, 576)] {
                let q = pair(r, inp, out).to_dtype(LoraDtype::Int8).expect("finite");
                let (Values::Int8(a), Values::Int8(b)) = (&q.a, &q.b) else {
                    panic!("int8")
                };
                let x: Vec<f32> = (0..inp).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
                let (mut plain, mut fast) = (vec![-0.0; out], vec![-0.0; out]);
                let row = |y| Row {
                    a,
                    b,
                    scale: q.scale,
                    x: &x,
                    y,
                };
                apply_row(row(&mut plain), Isa::Plain);
                apply_row(row(&mut fast), isa);
                assert_eq!(bits(&plain), bits(&fast), "{isa:?} row {r} {inp} {out}");
            }
        }
    }

    /// An int8 pair's update is `y + scale · B' A' x` (in f64) where `A'` and `B'` are the
    /// values its bytes and scales stand for, to within what quantising the row to 16 bits
    /// can move it (half a step of the row's scale through `|B'| |A'|`); the row's values
    /// are rounded, so it differs from the f32 pair's, but little. Ranks 12 and 16, the
    /// kernel this CPU runs.
    #[test]
    fn an_int8_pair_computes_the_values_it_stands_for() {
        for r in [12, 16] {
            let (inp, out) = (43, 20);
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
            for o in 0..out {
                let (mut want, mut bound) = (y0[o] as f64, 0f64);
                for j in 0..r {
                    let a = &qa[j * inp..(j + 1) * inp];
                    let ax: f64 = a.iter().zip(&x).map(|(&a, &x)| a as f64 * x as f64).sum();
                    let b = q.scale as f64 * qb[o * r + j] as f64;
                    want += b * ax;
                    bound += b.abs() * a.iter().map(|&a| a.abs() as f64).sum::<f64>() * half_step;
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
