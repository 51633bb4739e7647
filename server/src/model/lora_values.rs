//! A LoRA matrix's values as served: `f32` (the default and the reference; what PEFT
//! files usually hold, read in place where they can be), `bf16`/`f16` on request
//! (`--lora-dtype`, as vLLM's), half the bytes a decode step reads for each row's adapter,
//! or `int8` with one `f32` scale per rank component ([`Int8`]), a quarter of them.
//! Invariant: widening a 16-bit value to `f32` is exact, and the kernels widen before they
//! multiply, so a pair served in `bf16` computes exactly what an `f32` pair holding the
//! rounded values computes; an `int8` pair runs as integer sums with its scales applied to
//! the rank components (`model::lora_int8`).

use std::borrow::Cow;

use bytes::Bytes;
use half::{bf16, f16};

use super::f32s::F32s;

/// The element type LoRA (and DoRA) matrices are served in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraDtype {
    #[default]
    #[serde(alias = "float32")]
    F32,
    #[serde(alias = "bfloat16")]
    Bf16,
    #[serde(alias = "float16")]
    F16,
    /// 8-bit integers with one `f32` scale per rank component ([`Int8`]).
    Int8,
}

impl LoraDtype {
    pub fn name(self) -> &'static str {
        match self {
            LoraDtype::F32 => "f32",
            LoraDtype::Bf16 => "bf16",
            LoraDtype::F16 => "f16",
            LoraDtype::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for LoraDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(LoraDtype::F32),
            "bf16" | "bfloat16" => Ok(LoraDtype::Bf16),
            "f16" | "float16" => Ok(LoraDtype::F16),
            "int8" | "i8" => Ok(LoraDtype::Int8),
            other => Err(format!("{other:?}: expected f32, bf16, f16 or int8")),
        }
    }
}

/// A matrix's values, row-major, in one of the [`LoraDtype`]s.
#[derive(Clone)]
pub enum Values {
    F32(F32s),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    Int8(Int8),
}

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
/// than half a step of its group (and the product's rounding).
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
        if cols == 0 || !v.len().is_multiple_of(cols) {
            return Err(format!("{} values are not rows of {cols}", v.len()));
        }
        // One pass that vectorises; the position only when there is one to report.
        if v.iter().fold(false, |bad, x| bad | !x.is_finite()) {
            let i = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(format!("value {i} ({}) is not finite", v[i]));
        }
        let rows = v.len() / cols;
        // A group's largest magnitude: finite values order as their magnitude bits do,
        // which an integer maximum finds in vectors.
        let bits = |x: &f32| x.to_bits() & 0x7fff_ffff;
        let top: Vec<u32> = match scaled {
            Scaled::Rows => v
                .chunks_exact(cols)
                .map(|g| g.iter().map(bits).fold(0, u32::max))
                .collect(),
            Scaled::Columns => v.chunks_exact(cols).fold(vec![0; cols], |mut m, row| {
                for (m, x) in m.iter_mut().zip(row) {
                    *m = (*m).max(bits(x));
                }
                m
            }),
        };
        let scales: Vec<f32> = top.iter().map(|&t| f32::from_bits(t) / 127.0).collect();
        // `x · (1 / s)` to the nearest step: one multiply a value, in loops that vectorise.
        let inv: Vec<f32> = scales
            .iter()
            .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
            .collect();
        let q: Vec<u8> = match scaled {
            Scaled::Rows => {
                let mut q = vec![0u8; v.len()];
                for ((q, g), &inv) in q.chunks_exact_mut(cols).zip(v.chunks_exact(cols)).zip(&inv) {
                    steps8(g, Inverse::One(inv), q);
                }
                q
            }
            Scaled::Columns => {
                // Each row in 8 bits, then its bytes two by two to their places.
                let mut q = vec![0u8; padded(rows, cols)];
                let mut row8 = vec![0u8; cols.next_multiple_of(2)];
                for (r, row) in v.chunks_exact(cols).enumerate() {
                    steps8(row, Inverse::Each(&inv), &mut row8[..cols]);
                    for (c, two) in row8.chunks_exact(2).enumerate() {
                        let at = column_at(r, 2 * c, cols);
                        q[at..at + 2].copy_from_slice(two);
                    }
                }
                q
            }
        };
        Ok(Int8 {
            q: I8s(Bytes::from(q)),
            scales: scales.into(),
            rows,
            cols,
            scaled,
        })
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
    let done = if super::packed::avx2_fma() {
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

    /// [`super::steps8`] for the whole 8-chunks; returns how many values were done.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn steps8(x: &[f32], inv: Inverse, out: &mut [u8]) -> usize {
        let n = x.len() / 8 * 8;
        let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
        for c in (0..n).step_by(8) {
            let iv = match inv {
                Inverse::One(i) => _mm256_set1_ps(i),
                Inverse::Each(i) => _mm256_loadu_ps(i.as_ptr().add(c)),
            };
            // The default rounding: to nearest, ties to even.
            let q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(c)), iv));
            let q = _mm256_min_epi32(_mm256_max_epi32(q, lo), hi);
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

/// Moves the bytes of `matrices`' int8 values, and their scales, into one buffer, each
/// matrix at a cache line with its scales right after its bytes, in the order given (the
/// values are unchanged; only where they lie). A step reads an adapter's matrices layer by
/// layer, module by module, so packed in that order a row's reads are long runs of
/// adjacent bytes, which memory serves faster than scattered ones.
pub fn pack_int8<'a>(matrices: impl IntoIterator<Item = &'a mut Values>) {
    let mut int8: Vec<&mut Int8> = matrices
        .into_iter()
        .filter_map(|v| match v {
            Values::Int8(q) => Some(q),
            _ => None,
        })
        .collect();
    // A matrix's bytes, padded to a whole `f32`, then its scales.
    let span = |q: &Int8| q.q.len().next_multiple_of(4) + q.scales.len() * 4;
    let total: usize = int8
        .iter()
        .map(|q| span(q).next_multiple_of(PACK_ALIGN))
        .sum();
    // One spare line, so the first matrix can start on a line whatever the allocation.
    let mut all: Vec<u8> = Vec::with_capacity(total + PACK_ALIGN);
    let skip = all.as_ptr().align_offset(PACK_ALIGN).min(PACK_ALIGN);
    all.resize(skip, 0);
    let mut spans = Vec::with_capacity(int8.len());
    for q in &int8 {
        let at = all.len();
        all.extend_from_slice(&q.q.0);
        all.resize(at + q.q.len().next_multiple_of(4), 0);
        let scales = all.len();
        all.extend_from_slice(bytemuck::cast_slice(&q.scales));
        all.resize(skip + (all.len() - skip).next_multiple_of(PACK_ALIGN), 0);
        spans.push((at..at + q.q.len(), scales..scales + q.scales.len() * 4));
    }
    // Length and capacity equal, so the buffer does not move into `Bytes`.
    all.resize(all.capacity(), 0);
    let all = Bytes::from(all);
    for (q, (bytes, scales)) in int8.iter_mut().zip(spans) {
        q.q = I8s(all.slice(bytes));
        // Always a view: the buffer starts on a line and the scales on a multiple of 4.
        if let Some(s) = F32s::view(all.slice(scales)) {
            q.scales = s;
        }
    }
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
            Values::F16(v) => v.len(),
            Values::Int8(v) => v.rows * v.cols,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> LoraDtype {
        match self {
            Values::F32(_) => LoraDtype::F32,
            Values::Bf16(_) => LoraDtype::Bf16,
            Values::F16(_) => LoraDtype::F16,
            Values::Int8(_) => LoraDtype::Int8,
        }
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        match self {
            Values::F32(v) => v.len() * 4,
            Values::Bf16(v) => v.len() * 2,
            Values::F16(v) => v.len() * 2,
            Values::Int8(v) => v.q.len() + v.scales.len() * 4,
        }
    }

    /// Where the values lie and how many bytes they take.
    pub(crate) fn raw(&self) -> (*const u8, usize) {
        match self {
            Values::F32(v) => (v.as_ptr().cast(), v.len() * 4),
            Values::Bf16(v) => (v.as_ptr().cast(), v.len() * 2),
            Values::F16(v) => (v.as_ptr().cast(), v.len() * 2),
            Values::Int8(v) => (v.q.as_ptr().cast(), v.q.len()),
        }
    }

    /// The values as `f32` (exact: a 16-bit value widens without loss); borrowed when they
    /// are `f32` already.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Values::F32(v) => Cow::Borrowed(v),
            Values::Bf16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Values::F16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Values::Int8(v) => Cow::Owned(v.dequantise()),
        }
    }

    /// These values in `dtype`: as they are, widened exactly, or rounded to the nearest
    /// (ties to even). A value the narrower type cannot hold (an `f32` beyond `f16`'s
    /// ±65,504) is refused, naming it, rather than served as an infinity. `int8` needs the
    /// matrix's shape and which values share a scale: [`Values::to_int8`].
    pub fn to_dtype(&self, dtype: LoraDtype) -> Result<Values, String> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        let wide = self.to_f32();
        let too_big = |i: usize| format!("value {i} ({}) does not fit {}", wide[i], dtype.name());
        Ok(match dtype {
            LoraDtype::F32 => Values::F32(wide.into_owned().into()),
            LoraDtype::Bf16 => {
                let v: Vec<bf16> = wide.iter().map(|&x| bf16::from_f32(x)).collect();
                if let Some(i) = v.iter().position(|x| x.is_infinite()) {
                    return Err(too_big(i));
                }
                Values::Bf16(v)
            }
            LoraDtype::F16 => {
                let v: Vec<f16> = wide.iter().map(|&x| f16::from_f32(x)).collect();
                if let Some(i) = v.iter().position(|x| x.is_infinite()) {
                    return Err(too_big(i));
                }
                Values::F16(v)
            }
            LoraDtype::Int8 => return Err("int8 needs the matrix's shape (to_int8)".into()),
        })
    }

    /// These values, a `(_, cols)` matrix, in 8 bits ([`Int8::quantise`]).
    pub fn to_int8(&self, cols: usize, scaled: Scaled) -> Result<Values, String> {
        Ok(Values::Int8(Int8::quantise(&self.to_f32(), cols, scaled)?))
    }
}

impl From<Vec<f32>> for Values {
    fn from(v: Vec<f32>) -> Self {
        Values::F32(v.into())
    }
}

impl From<F32s> for Values {
    fn from(v: F32s) -> Self {
        Values::F32(v)
    }
}

/// Equal when of one dtype and equal values.
impl PartialEq for Values {
    fn eq(&self, other: &Self) -> bool {
        self.dtype() == other.dtype() && self.to_f32() == other.to_f32()
    }
}

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dtype().name())?;
        self.to_f32().fmt(f)
    }
}

/// An element the LoRA kernels read: widened to `f32` (exactly) before any arithmetic.
pub trait Weight: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;

    /// Eight consecutive values from `p`, widened.
    /// # Safety
    /// `p` must point at eight readable values; the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

#[allow(unsafe_code)]
impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

#[allow(unsafe_code)]
impl Weight for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; a bf16 is the top half of its f32.
        unsafe {
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
}

#[allow(unsafe_code)]
impl Weight for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (F16C).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_widening_exact_and_overflow_refused() {
        let v: Values = vec![1.0f32, 1.0 + 1.0 / 512.0, -3.1e-3, 7.0e4].into();
        let b = v.to_dtype(LoraDtype::Bf16).expect("bf16 holds all");
        assert_eq!(b.bytes(), 8);
        // 1 + 2^-9 is a tie between 1 and 1 + 2^-7: to even, 1.
        assert_eq!(b.to_f32()[..2], [1.0, 1.0]);
        assert!((b.to_f32()[2] + 3.1e-3).abs() < 3.1e-3 / 128.0);
        let back = b.to_dtype(LoraDtype::F32).expect("widens");
        assert_eq!(back.to_f32(), b.to_f32());
        assert_ne!(back, v);
        let e = v
            .clone()
            .to_dtype(LoraDtype::F16)
            .expect_err("70,000 is beyond f16");
        assert!(e.contains("value 3"), "{e}");
        assert_eq!("BF16".parse::<LoraDtype>(), Ok(LoraDtype::Bf16));
        assert!("fp8"
            .parse::<LoraDtype>()
            .expect_err("no fp8")
            .contains("expected f32, bf16, f16 or int8"));
        assert_eq!("int8".parse::<LoraDtype>(), Ok(LoraDtype::Int8));
        assert!(v
            .to_dtype(LoraDtype::Int8)
            .expect_err("a shape is needed")
            .contains("to_int8"));
    }

    /// Packing leaves every int8 matrix's values as they were and lays them one after
    /// another, each at a cache line, in the order given; other dtypes are left alone.
    #[test]
    fn packed_int8_matrices_keep_their_values_and_lie_in_order() {
        let v = |n: usize, k: usize| -> Vec<f32> {
            (0..n).map(|i| ((i * 37 + k) % 29) as f32 - 14.0).collect()
        };
        let mut ms = [
            Values::from(v(6 * 5, 1))
                .to_int8(5, Scaled::Rows)
                .expect("finite"),
            Values::from(v(40, 2)),
            Values::from(v(100 * 3, 3))
                .to_int8(3, Scaled::Columns)
                .expect("finite"),
            Values::from(v(7, 4))
                .to_int8(7, Scaled::Rows)
                .expect("finite"),
        ];
        let before: Vec<Vec<f32>> = ms.iter().map(|m| m.to_f32().into_owned()).collect();
        pack_int8(ms.iter_mut());
        let after: Vec<Vec<f32>> = ms.iter().map(|m| m.to_f32().into_owned()).collect();
        assert_eq!(after, before);
        assert_eq!(ms[1].dtype(), LoraDtype::F32);
        let at = |i: usize| ms[i].raw().0 as usize;
        assert!([0, 2, 3].iter().all(|&i| at(i) % 64 == 0), "each at a line");
        // 30 bytes, 2 to a whole f32 and 6 scales, then the next line.
        assert_eq!(at(2), at(0) + 64, "56 bytes, then the next line");
        // By columns, 100 rows pad to 112 and 3 columns to 4: 448 bytes and 3 scales.
        assert_eq!(at(3), at(2) + 512, "460 bytes, then the next line");
        for m in [0, 2, 3] {
            let Values::Int8(q) = &ms[m] else {
                panic!("int8")
            };
            let scales = q.scales.as_ptr() as usize;
            assert_eq!(
                scales,
                at(m) + q.q.len().next_multiple_of(4),
                "{m}: scales after"
            );
        }
    }

    /// The AVX2 loads widen exactly as `widen` does, subnormals and signs included.
    #[test]
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    fn eight_wide_loads_widen_as_the_scalar_form() {
        assert!(super::super::packed::avx2_fma(), "this test needs AVX2");
        let src = [1.5f32, -2.0e-7, 3.0e-5, 65504.0, -0.0, 1.0e-38, 0.1, -7.25];
        fn check<T: Weight>(v: &[T]) {
            let mut out = [0f32; 8];
            // SAFETY: eight values; AVX2 and F16C checked by the caller.
            unsafe { std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr(), T::load8(v.as_ptr())) };
            let want: Vec<u32> = v.iter().map(|x| x.widen().to_bits()).collect();
            assert_eq!(out.map(f32::to_bits).to_vec(), want);
        }
        check(&src);
        check(&src.map(bf16::from_f32));
        check(&src.map(f16::from_f32));
    }
}
