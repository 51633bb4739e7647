//! LoRA matrices in 8 bits ([`Int8`]): one `f32` scale per rank component, `B` laid out
//! for the integer kernels of `model::lora_int8`, and an adapter's matrices packed into one
//! buffer in the order a step reads them ([`pack_int8`]).

use bytes::Bytes;

use super::{F32s, Values};

/// Which values of a matrix share an [`Int8`] scale: a rank component's. `A: (r, in)`
/// scales each row and stores them one after another; `B: (out, r)` scales each column and
/// stores them as `model::lora_int8` multiplies them ([`Int8::at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scaled {
    Rows,
    Columns,
}

/// A `(rows, cols)` matrix in 8 bits. Value `(r, c)` is byte [`Int8::at`]`(r, c)` times
/// `scales[g]`, `g` its row or its column. By rows, `q[r * cols + c]`. By columns (a LoRA
/// `B`, rows its outputs, columns its rank components), in blocks of 16 rows, and within
/// a block the columns two by two, each row's two bytes side by side: the 32 bytes of
/// columns `2p, 2p + 1` for rows `16b..16b + 16` are the sixteen lanes of pairs one
/// `vpdpwssd` multiplies. Rows are padded to a multiple of 16 and columns to one of 2 with
/// zero bytes. Each group's scale is its largest magnitude over 127 and each value is
/// `x · (1 / scale)` to the nearest integer (ties to even), so no value is off by more
/// than half a step of its group (and the product's rounding). A group whose largest
/// magnitude is under ~3.7e-37 (its scale's inverse would overflow) is stored as zeros.
#[derive(Clone, Debug)]
pub struct Int8 {
    pub q: I8s,
    pub scales: F32s,
    pub rows: usize,
    pub cols: usize,
    pub scaled: Scaled,
}

/// Rows in a block of a matrix stored by columns.
const BLOCK: usize = 16;

impl Int8 {
    /// `v: (rows, cols)` quantised; a value that is not finite is refused, naming it.
    pub fn quantise(v: &[f32], cols: usize, scaled: Scaled) -> Result<Self, String> {
        let (q_len, groups) = Self::sizes(v.len(), cols, scaled)?;
        let (mut q, mut scales) = (vec![0u8; q_len], vec![0f32; groups]);
        Self::quantise_into(v, cols, scaled, &mut q, &mut scales)?;
        Ok(Int8 {
            q: I8s(Bytes::from(q)),
            scales: scales.into(),
            rows: v.len() / cols,
            cols,
            scaled,
        })
    }

    /// How many bytes and scales `len` values `(_, cols)` take when `scaled` so.
    fn sizes(len: usize, cols: usize, scaled: Scaled) -> Result<(usize, usize), String> {
        if cols == 0 || !len.is_multiple_of(cols) {
            return Err(format!("{len} values are not rows of {cols}"));
        }
        let rows = len / cols;
        Ok(match scaled {
            Scaled::Rows => (len, rows),
            Scaled::Columns => (padded(rows, cols), cols),
        })
    }

    /// [`Int8::quantise`] into `q` and `scales`, [`Int8::sizes`] long, `q` zeros
    /// beforehand: where an adapter's matrices are quantised straight into the buffer they
    /// are served from ([`pack_int8`]).
    fn quantise_into(
        v: &[f32],
        cols: usize,
        scaled: Scaled,
        q: &mut [u8],
        scales: &mut [f32],
    ) -> Result<(), String> {
        assert_eq!((q.len(), scales.len()), Self::sizes(v.len(), cols, scaled)?);
        // A group's largest magnitude: finite values order as their magnitude bits do,
        // which an integer maximum finds in vectors. An infinity or a NaN orders above
        // every finite value, so the same pass finds whether there is one.
        let bits = |x: &f32| x.to_bits() & 0x7fff_ffff;
        let top: Vec<u32> = match scaled {
            Scaled::Rows => v
                .chunks_exact(cols)
                .map(|g| g.iter().map(bits).fold(0, u32::max))
                .collect(),
            Scaled::Columns => column_top(v, cols),
        };
        if top.iter().any(|&t| t >= f32::INFINITY.to_bits()) {
            let i = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(format!("value {i} ({}) is not finite", v[i]));
        }
        for (s, &t) in scales.iter_mut().zip(&top) {
            *s = f32::from_bits(t) / 127.0;
        }
        // `x · (1 / s)` to the nearest step: one multiply a value, in loops that vectorise.
        // A scale so small that its inverse is infinite (a group of magnitudes all under
        // ~4e-37) rounds its values to zero.
        let inv: Vec<f32> = scales
            .iter()
            .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
            .map(|i| if i.is_finite() { i } else { 0.0 })
            .collect();
        match scaled {
            Scaled::Rows => {
                for ((q, g), &inv) in q.chunks_exact_mut(cols).zip(v.chunks_exact(cols)).zip(&inv) {
                    steps8(g, Inverse::One(inv), q);
                }
            }
            Scaled::Columns => column_bytes(v, &inv, q),
        }
        Ok(())
    }

    /// Where value `(r, c)`'s byte lies in `q`.
    pub fn at(&self, r: usize, c: usize) -> usize {
        match self.scaled {
            Scaled::Rows => r * self.cols + c,
            Scaled::Columns => column_at(r, c, self.cols),
        }
    }

    /// The values these stand for, `(rows, cols)` row-major.
    pub fn dequantise(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            v.extend((0..self.cols).map(|c| {
                let s = match self.scaled {
                    Scaled::Rows => self.scales[r],
                    Scaled::Columns => self.scales[c],
                };
                self.q[self.at(r, c)] as f32 * s
            }));
        }
        v
    }
}

/// Each column's largest magnitude, as bits (finite values order as their magnitude bits
/// do), of a `(_, cols)` matrix; with AVX2 for a rank of 8 to 64 in eights.
fn column_top(v: &[f32], cols: usize) -> Vec<u32> {
    #[cfg(target_arch = "x86_64")]
    if crate::model::packed::avx2_fma() && cols.is_multiple_of(8) && cols <= 64 {
        // SAFETY: the CPU has AVX2; the rank is checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::column_top(v, cols) };
    }
    v.chunks_exact(cols).fold(vec![0; cols], |mut m, row| {
        for (m, x) in m.iter_mut().zip(row) {
            *m = (*m).max(x.to_bits() & 0x7fff_ffff);
        }
        m
    })
}

/// A `(_, cols)` matrix's values times their column's `inv`, to the nearest step, into `q`
/// stored by columns ([`Int8::at`]), `q` zeros beforehand; with AVX2 where the CPU has it
/// and the rank is a multiple of 8, else [`column_bytes_any`]: the same bytes.
fn column_bytes(v: &[f32], inv: &[f32], q: &mut [u8]) {
    let cols = inv.len();
    assert!(v.len().is_multiple_of(cols) && q.len() == padded(v.len() / cols, cols));
    #[cfg(target_arch = "x86_64")]
    if crate::model::packed::avx2_fma() && cols.is_multiple_of(8) {
        // SAFETY: the CPU has AVX2; the rank and the lengths are checked above.
        #[allow(unsafe_code)]
        unsafe {
            avx2::column_bytes(v, inv, q)
        };
        return;
    }
    column_bytes_any(v, inv, q)
}

/// [`column_bytes`] a row at a time through [`steps8`], then the row's bytes two by two
/// to their places: any rank, any CPU, and the reference the fast form is tested against.
fn column_bytes_any(v: &[f32], inv: &[f32], q: &mut [u8]) {
    let cols = inv.len();
    let mut row8 = vec![0u8; cols.next_multiple_of(2)];
    for (r, row) in v.chunks_exact(cols).enumerate() {
        steps8(row, Inverse::Each(inv), &mut row8[..cols]);
        for (c, two) in row8.chunks_exact(2).enumerate() {
            let at = column_at(r, 2 * c, cols);
            q[at..at + 2].copy_from_slice(two);
        }
    }
}

/// What a group's values are multiplied by before rounding: one inverse scale for all
/// (a row's), or one a value (a row of a matrix scaled by columns).
#[derive(Clone, Copy)]
enum Inverse<'a> {
    One(f32),
    Each(&'a [f32]),
}

/// `out_k = clamp(round(x_k · inv_k), ±127)` (ties to even), the bytes of `i8`s; AVX2 where
/// the CPU has it, the same values (its conversion rounds to nearest even too).
fn steps8(x: &[f32], inv: Inverse, out: &mut [u8]) {
    assert_eq!(x.len(), out.len());
    if let Inverse::Each(i) = inv {
        assert_eq!(i.len(), x.len());
    }
    #[cfg(target_arch = "x86_64")]
    let done = if crate::model::packed::avx2_fma() {
        // SAFETY: the CPU has AVX2; the lengths are checked above.
        #[allow(unsafe_code)]
        unsafe {
            avx2::steps8(x, inv, out)
        }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (k, (o, &x)) in out.iter_mut().zip(x).enumerate().skip(done) {
        let inv = match inv {
            Inverse::One(i) => i,
            Inverse::Each(i) => i[k],
        };
        *o = (x * inv).round_ties_even().clamp(-127.0, 127.0) as i32 as u8;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::Inverse;
    use std::arch::x86_64::*;

    /// Eight values times their inverse scales, to the nearest integer (the default
    /// rounding: ties to even), within ±127: the steps every int8 matrix is stored in.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn round8(x: __m256, inv: __m256) -> __m256i {
        let q = _mm256_cvtps_epi32(_mm256_mul_ps(x, inv));
        _mm256_min_epi32(
            _mm256_max_epi32(q, _mm256_set1_epi32(-127)),
            _mm256_set1_epi32(127),
        )
    }

    /// [`super::steps8`] for the whole 8-chunks; returns how many values were done.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn steps8(x: &[f32], inv: Inverse, out: &mut [u8]) -> usize {
        let n = x.len() / 8 * 8;
        for c in (0..n).step_by(8) {
            let iv = match inv {
                Inverse::One(i) => _mm256_set1_ps(i),
                Inverse::Each(i) => _mm256_loadu_ps(i.as_ptr().add(c)),
            };
            let q = round8(_mm256_loadu_ps(x.as_ptr().add(c)), iv);
            // Packing works within 128-bit halves: values 0..4 are the first four bytes of
            // the low half, 4..8 of the high one.
            let b = _mm256_packs_epi16(_mm256_packs_epi32(q, q), _mm256_setzero_si256());
            let (l, h) = (_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
            let o = out.as_mut_ptr().add(c);
            std::ptr::write_unaligned(o.cast::<i32>(), _mm_cvtsi128_si32(l));
            std::ptr::write_unaligned(o.add(4).cast::<i32>(), _mm_cvtsi128_si32(h));
        }
        n
    }

    /// [`super::column_top`] for a rank `cols`, a multiple of 8 up to 64: eight columns'
    /// maxima a register, the registers held across the rows.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn column_top(v: &[f32], cols: usize) -> Vec<u32> {
        #[target_feature(enable = "avx2")]
        unsafe fn held<const N: usize>(v: &[f32]) -> Vec<u32> {
            let mask = _mm256_set1_epi32(0x7fff_ffff);
            let mut m = [_mm256_setzero_si256(); N];
            for row in v.chunks_exact(8 * N) {
                for (k, m) in m.iter_mut().enumerate() {
                    let x = _mm256_loadu_si256(row[8 * k..8 * k + 8].as_ptr().cast());
                    *m = _mm256_max_epu32(*m, _mm256_and_si256(x, mask));
                }
            }
            let mut top = vec![0u32; 8 * N];
            for (k, m) in m.iter().enumerate() {
                _mm256_storeu_si256(top[8 * k..8 * k + 8].as_mut_ptr().cast(), *m);
            }
            top
        }
        match cols / 8 {
            1 => held::<1>(v),
            2 => held::<2>(v),
            3 => held::<3>(v),
            4 => held::<4>(v),
            5 => held::<5>(v),
            6 => held::<6>(v),
            7 => held::<7>(v),
            _ => held::<8>(v),
        }
    }

    /// [`super::column_bytes`] for a rank `inv.len()` that is a multiple of 8. A block of
    /// 16 rows and 16 columns is 16 rows of eight 2-byte pairs: the rows in registers (row
    /// `i` beside row `i + 8`), transposed as 16-bit words, give each pair's 32 bytes, the
    /// sixteen rows' bytes for two columns, as [`super::column_at`] lays them. Each value
    /// rounds as in [`steps8`] ([`round8`]).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn column_bytes(v: &[f32], inv: &[f32], q: &mut [u8]) {
        let cols = inv.len();
        let rows = v.len() / cols;
        for b in 0..rows.div_ceil(16) {
            for c in (0..cols).step_by(16) {
                // Plain loops over fixed arrays (not `array::from_fn`, whose closures were
                // not inlined here and took the registers through memory).
                let z = _mm256_setzero_si256();
                let mut x = [z; 8];
                for (i, x) in x.iter_mut().enumerate() {
                    let row = |r: usize| row16(v, inv, r, c, rows);
                    *x = _mm256_set_m128i(row(16 * b + i + 8), row(16 * b + i));
                }
                // 16-bit words, then pairs of them, then fours: eight rows' word `p` in
                // each half of `o[p]`.
                let mut t = [z; 8];
                for k in (0..8).step_by(2) {
                    t[k] = _mm256_unpacklo_epi16(x[k], x[k + 1]);
                    t[k + 1] = _mm256_unpackhi_epi16(x[k], x[k + 1]);
                }
                // u[0..4]: words 0-1, 2-3, 4-5, 6-7 of rows 0-3; u[4..8] of rows 4-7.
                let mut u = [z; 8];
                for h in [0, 4] {
                    for j in [0, 2] {
                        let (l, r) = (t[h + j / 2], t[h + j / 2 + 2]);
                        u[h + j] = _mm256_unpacklo_epi32(l, r);
                        u[h + j + 1] = _mm256_unpackhi_epi32(l, r);
                    }
                }
                let mut o = [z; 8];
                for p in (0..8).step_by(2) {
                    let (l, r) = (u[p / 2], u[p / 2 + 4]);
                    o[p] = _mm256_unpacklo_epi64(l, r);
                    o[p + 1] = _mm256_unpackhi_epi64(l, r);
                }
                let block = b * 16 * cols;
                for (p, o) in o.iter().take((cols - c) / 2).enumerate() {
                    let at = block + (c / 2 + p) * 32;
                    _mm256_storeu_si256(q[at..at + 32].as_mut_ptr().cast(), *o);
                }
            }
        }
    }

    /// Row `r`'s values in columns `c..c + 16` times their `inv`, rounded, as 16 bytes (the
    /// last 8 zero where the rank ends at `c + 8`); zeros for a row past `rows`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn row16(v: &[f32], inv: &[f32], r: usize, c: usize, rows: usize) -> __m128i {
        let cols = inv.len();
        if r >= rows {
            return _mm_setzero_si128();
        }
        let eight = |k: usize| {
            let x = _mm256_loadu_ps(v[r * cols + k..r * cols + k + 8].as_ptr());
            round8(x, _mm256_loadu_ps(inv[k..k + 8].as_ptr()))
        };
        let a = eight(c);
        let b = if c + 16 <= cols {
            eight(c + 8)
        } else {
            _mm256_setzero_si256()
        };
        // Words a0-3 b0-3 | a4-7 b4-7, bytes likewise twice a half: its dwords 0, 4, 1, 5
        // are a0-3, a4-7, b0-3, b4-7.
        let w = _mm256_packs_epi32(a, b);
        let by = _mm256_packs_epi16(w, w);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5);
        _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(by, order))
    }
}

/// The bytes of a `(rows, cols)` matrix stored by columns, padding included.
pub(crate) fn padded(rows: usize, cols: usize) -> usize {
    rows.next_multiple_of(BLOCK) * cols.next_multiple_of(2)
}

/// Where value `(r, c)` of a `(_, cols)` matrix stored by columns lies.
pub(crate) fn column_at(r: usize, c: usize, cols: usize) -> usize {
    (r / BLOCK) * BLOCK * cols.next_multiple_of(2) + (c / 2) * 2 * BLOCK + (r % BLOCK) * 2 + c % 2
}

/// 8-bit values, in bytes that may be shared: an adapter's int8 matrices are packed into
/// one buffer in the order a step reads them ([`pack_int8`]).
#[derive(Clone, PartialEq, Eq)]
pub struct I8s(Bytes);

impl std::ops::Deref for I8s {
    type Target = [i8];
    fn deref(&self) -> &[i8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl std::fmt::Debug for I8s {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// How each packed matrix's start is aligned: a cache line.
const PACK_ALIGN: usize = 64;

/// One matrix for [`pack_int8`]: its values, `(_, cols)`, and which of them share a scale
/// (as given to [`Int8::quantise`]; an `int8` matrix keeps its own).
pub struct ToPack<'a> {
    pub values: &'a mut Values,
    pub cols: usize,
    pub scaled: Scaled,
}

/// Quantises `matrices` ([`Int8::quantise`]; one `int8` already is copied as it is) straight
/// into one buffer, each matrix at a cache line with its scales right after its bytes, in
/// the order given, and serves each from there. A step reads an adapter's matrices layer by
/// layer, module by module, so packed in that order a row's reads are long runs of adjacent
/// bytes, which memory serves faster than scattered ones. The matrices are quantised side
/// by side (rayon). A matrix that cannot be (a value not finite, a length not rows of
/// `cols`) is refused as `(its index, why)`, the first in order, and no matrix is changed.
pub fn pack_int8(matrices: Vec<ToPack<'_>>) -> Result<(), (usize, String)> {
    use rayon::prelude::*;
    let places: Vec<Place> = matrices
        .iter()
        .enumerate()
        .map(|(i, m)| Place::of(m).map_err(|e| (i, e)))
        .collect::<Result<_, _>>()?;
    let total: usize = places.iter().map(Place::span).sum();
    // One spare line, so the first matrix can start on a line whatever the allocation.
    let mut all = vec![0u8; total + PACK_ALIGN];
    let skip = all.as_ptr().align_offset(PACK_ALIGN).min(PACK_ALIGN);
    let mut parts = Vec::with_capacity(places.len());
    let mut rest = &mut all[skip..];
    for p in &places {
        let (this, after) = rest.split_at_mut(p.span());
        rest = after;
        let (q, scales) = this.split_at_mut(p.scales_at());
        parts.push((&mut q[..p.bytes], &mut scales[..p.scales * 4]));
    }
    let done: Vec<Result<(), String>> = matrices
        .par_iter()
        .zip(&places)
        .zip(parts)
        .map(|((m, p), (q, scales))| {
            // The buffer starts on a line and each matrix's scales on a multiple of 4.
            let scales: &mut [f32] = bytemuck::try_cast_slice_mut(scales)
                .map_err(|e| format!("scales not aligned: {e}"))?;
            match &*m.values {
                Values::Int8(x) => {
                    q.copy_from_slice(bytemuck::cast_slice(&x.q));
                    scales.copy_from_slice(&x.scales);
                    Ok(())
                }
                v => Int8::quantise_into(&v.to_f32(), p.cols, p.scaled, q, scales),
            }
        })
        .collect();
    if let Some((i, Err(e))) = done.into_iter().enumerate().find(|(_, d)| d.is_err()) {
        return Err((i, e));
    }
    let all = Bytes::from(all);
    let mut at = skip;
    for (m, p) in matrices.into_iter().zip(&places) {
        let scales = all.slice(at + p.scales_at()..at + p.scales_at() + p.scales * 4);
        *m.values = Values::Int8(Int8 {
            q: I8s(all.slice(at..at + p.bytes)),
            // Always a view: the scales lie on a multiple of 4, as checked above; read as
            // they were written (native order) otherwise.
            scales: F32s::view(scales.clone()).unwrap_or_else(|| {
                let v: Vec<f32> = scales
                    .chunks_exact(4)
                    .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                v.into()
            }),
            rows: p.rows,
            cols: p.cols,
            scaled: p.scaled,
        });
        at += p.span();
    }
    Ok(())
}

/// A matrix's shape packed ([`pack_int8`]), its bytes and its scales.
struct Place {
    rows: usize,
    cols: usize,
    scaled: Scaled,
    bytes: usize,
    scales: usize,
}

impl Place {
    /// `m` quantised as it asks ([`Int8::sizes`]), or an `int8` matrix as it is.
    fn of(m: &ToPack) -> Result<Self, String> {
        if let Values::Int8(q) = &*m.values {
            return Ok(Place {
                rows: q.rows,
                cols: q.cols,
                scaled: q.scaled,
                bytes: q.q.len(),
                scales: q.scales.len(),
            });
        }
        let len = m.values.len();
        let (bytes, scales) = Int8::sizes(len, m.cols, m.scaled)?;
        Ok(Place {
            rows: len / m.cols,
            cols: m.cols,
            scaled: m.scaled,
            bytes,
            scales,
        })
    }

    /// Where its scales start: after its bytes, padded to a whole `f32`.
    fn scales_at(&self) -> usize {
        self.bytes.next_multiple_of(4)
    }

    /// Its bytes, then its scales, then up to a line.
    fn span(&self) -> usize {
        (self.scales_at() + self.scales * 4).next_multiple_of(PACK_ALIGN)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::lora::LoraDtype;

    /// Values of every magnitude and sign, some ties, from a fixed seed.
    pub(crate) fn mixed_values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match i % 7 {
                    0 => unit * 1e-3,
                    1 => (unit * 254.0).round() / 2.0, // ties once scaled by 127/127
                    _ => unit,
                }
            })
            .collect()
    }

    /// The by-columns bytes of the fast form (AVX2, a rank a multiple of 8) equal the
    /// reference's, row at a time through `steps8`, for every rank and a partial last block.
    #[test]
    fn by_columns_bytes_equal_the_row_at_a_time_form() {
        assert!(crate::model::packed::avx2_fma(), "this test needs AVX2");
        for cols in [8, 16, 24, 32, 64, 3, 6] {
            for rows in [1, 15, 16, 17, 100] {
                let v = mixed_values(rows * cols, (rows * 100 + cols) as u64);
                let top = column_top(&v, cols);
                let any_top = v.chunks_exact(cols).fold(vec![0u32; cols], |mut m, row| {
                    for (m, x) in m.iter_mut().zip(row) {
                        *m = (*m).max(x.to_bits() & 0x7fff_ffff);
                    }
                    m
                });
                assert_eq!(top, any_top, "{rows} x {cols}: maxima");
                let inv: Vec<f32> = top.iter().map(|&t| 127.0 / f32::from_bits(t)).collect();
                // The fast form writes every byte, padding included; the other needs zeros.
                let fill = if cols % 8 == 0 { 7 } else { 0 };
                let (mut fast, mut any) = (
                    vec![fill; padded(rows, cols)],
                    vec![0u8; padded(rows, cols)],
                );
                column_bytes(&v, &inv, &mut fast);
                column_bytes_any(&v, &inv, &mut any);
                assert_eq!(fast, any, "{rows} x {cols}");
            }
        }
    }

    /// A group too small for its scale's inverse is zeros, on every path alike.
    #[test]
    fn a_group_under_the_smallest_invertible_scale_is_zeros() {
        // Column 3 is tiny (a group by columns), and so is all of row 5 (a group by rows).
        let tiny = |k: usize| if k.is_multiple_of(2) { 1e-38 } else { -2e-39 };
        let mut v = vec![0.5f32; 16 * 20];
        for r in 0..20 {
            v[r * 16 + 3] = tiny(r);
        }
        for c in 0..16 {
            v[5 * 16 + c] = tiny(c);
        }
        for scaled in [Scaled::Columns, Scaled::Rows] {
            let q = Int8::quantise(&v, 16, scaled).expect("finite");
            let back = q.dequantise();
            for (i, (&got, &want)) in back.iter().zip(&v).enumerate() {
                assert!(
                    (got - want).abs() <= 0.5 / 127.0 / 2.0 + 1e-7,
                    "{scaled:?} {i}"
                );
                let tiny_group = match scaled {
                    Scaled::Columns => i % 16 == 3,
                    Scaled::Rows => i / 16 == 5,
                };
                if tiny_group {
                    assert_eq!(got, 0.0, "{scaled:?} {i}");
                }
            }
        }
    }

    /// Packed matrices hold what each quantised alone holds (an `int8` one its own bytes),
    /// each at a line with its scales right after its bytes, in order.
    #[test]
    fn packed_int8_matrices_equal_each_quantised_alone_and_lie_in_order() {
        let v = |n: usize, k: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * 37 + k) % 29) as f32 - 14.0).collect()
        };
        let already = Int8::quantise(&v(100 * 3, 3), 3, Scaled::Columns).expect("finite");
        let mut ms = [
            Values::from(v(6 * 5, 1)),
            Values::from(mixed_values(40 * 16, 2)),
            Values::Int8(already.clone()),
            Values::from(v(7, 4)),
        ];
        let shapes = [
            (5, Scaled::Rows),
            (16, Scaled::Columns),
            (3, Scaled::Columns),
            (7, Scaled::Rows),
        ];
        let alone: Vec<Int8> = ms
            .iter()
            .zip(shapes)
            .map(|(m, (cols, scaled))| match m {
                Values::Int8(q) => q.clone(),
                m => Int8::quantise(&m.to_f32(), cols, scaled).expect("finite"),
            })
            .collect();
        let packs = ms
            .iter_mut()
            .zip(shapes)
            .map(|(values, (cols, scaled))| ToPack {
                values,
                cols,
                scaled,
            })
            .collect();
        pack_int8(packs).expect("finite");
        for (m, want) in ms.iter().zip(&alone) {
            let Values::Int8(got) = m else { panic!("int8") };
            assert_eq!(got.q, want.q);
            assert_eq!(*got.scales, *want.scales);
            assert_eq!(
                (got.rows, got.cols, got.scaled),
                (want.rows, want.cols, want.scaled)
            );
        }
        let at = |i: usize| ms[i].raw().0 as usize;
        assert_eq!(at(0) % 64, 0, "at a line");
        // 30 bytes, 2 to a whole f32 and 6 scales: 56 bytes, then the next line.
        assert_eq!(at(1), at(0) + 64);
        // By columns, 40 rows pad to 48 of 16 bytes: 768 bytes and 16 scales.
        assert_eq!(at(2), at(1) + 832);
        // 100 rows pad to 112 and 3 columns to 4: 448 bytes and 3 scales.
        assert_eq!(at(3), at(2) + 512);
        for m in &ms {
            let Values::Int8(q) = m else { panic!("int8") };
            let scales = q.scales.as_ptr() as usize;
            assert_eq!(scales, m.raw().0 as usize + q.q.len().next_multiple_of(4));
        }
    }

    /// A matrix that cannot be quantised is named by its index, and none is changed.
    #[test]
    fn a_matrix_that_cannot_be_packed_is_named_and_none_is_changed() {
        let pack = |ms: &mut [Values], cols: usize, scaled: Scaled| {
            let packs = ms
                .iter_mut()
                .map(|values| ToPack {
                    values,
                    cols,
                    scaled,
                })
                .collect();
            let e = pack_int8(packs).expect_err("refused");
            assert!(
                ms.iter().all(|m| m.dtype() == LoraDtype::F32),
                "none changed"
            );
            e
        };
        let mut inf = vec![0.5f32; 4 * 8];
        inf[13] = f32::INFINITY;
        let mut ms = [Values::from(vec![1.0f32; 8]), Values::from(inf)];
        let (i, e) = pack(&mut ms, 8, Scaled::Rows);
        assert_eq!(i, 1);
        assert!(e.contains("value 13 (inf) is not finite"), "{e}");
        // By columns, a NaN: its magnitude bits order above an infinity's.
        let mut nan = vec![0.5f32; 40 * 8];
        nan[77] = f32::NAN;
        let mut ms = [Values::from(nan), Values::from(vec![1.0f32; 8])];
        let (i, e) = pack(&mut ms, 8, Scaled::Columns);
        assert_eq!(i, 0);
        assert!(e.contains("value 77 (NaN) is not finite"), "{e}");
        let (i, e) = pack(&mut [Values::from(vec![1.0f32; 9])], 2, Scaled::Columns);
        assert_eq!(i, 0);
        assert!(e.contains("not rows of 2"), "{e}");
    }
}
