//! A LoRA matrix's values as served: `f32` (the default and the reference; what PEFT
//! files usually hold, read in place where they can be), `bf16`/`f16` on request
//! (`--lora-dtype`, as vLLM's), half the bytes a decode step reads for each row's adapter,
//! or `int8` with one `f32` scale per rank component ([`Int8`]), a quarter of them.
//! Invariant: widening a 16-bit value to `f32` is exact, and the kernels widen before they
//! multiply, so a pair served in `bf16` computes exactly what an `f32` pair holding the
//! rounded values computes; an `int8` pair runs as integer sums with its scales applied to
//! the rank components (`model::lora_int8`).

use std::borrow::Cow;

use half::{bf16, f16, slice::HalfFloatSliceExt};

use super::f32s::F32s;

mod int8;
pub(crate) use int8::{column_at, padded};
pub use int8::{pack_int8, I8s, Int8, Scaled, ToPack};

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
                let v: Vec<bf16> = wide
                    .iter()
                    .map(|x| bf16::from_bits(bf16_bits(x.to_bits())))
                    .collect();
                if let Some(i) = first_infinite(v.iter().map(|x| x.to_bits()), 0x7f80) {
                    return Err(too_big(i));
                }
                Values::Bf16(v)
            }
            LoraDtype::F16 => {
                // half's slice conversion: F16C's, where the CPU has it.
                let mut v = vec![f16::ZERO; wide.len()];
                v.convert_from_f32_slice(&wide);
                if let Some(i) = first_infinite(v.iter().map(|x| x.to_bits()), 0x7c00) {
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

/// `bf16::from_f32(f32::from_bits(x))`'s bits without its branches, so a loop of it
/// vectorises: to nearest, ties to even (adding `0x7fff` and the kept part's lowest bit
/// carries into it exactly when the dropped half is over `0x8000`, or equal with that bit
/// set); a NaN keeps its high bits with the quiet bit set.
fn bf16_bits(x: u32) -> u16 {
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x40;
    (if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

/// Where the first of 16-bit values (their `bits`) that is an infinity (`inf`, either
/// sign) lies, after one pass that vectorises finds there is one.
fn first_infinite(mut bits: impl Iterator<Item = u16> + Clone, inf: u16) -> Option<usize> {
    let is_inf = |b: u16| b & 0x7fff == inf;
    if bits.clone().fold(false, |any, b| any | is_inf(b)) {
        bits.position(is_inf)
    } else {
        None
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
    use super::int8::tests::mixed_values;
    use super::*;

    /// The branch-free `bf16` rounding is `half`'s, bit for bit: ties, carries into the
    /// exponent, the largest finite values, infinities, subnormals and NaNs included.
    #[test]
    fn bf16_rounding_equals_halfs() {
        let mut bits: Vec<u32> = vec![
            0,
            0x8000_0000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x3f80_7fff,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f7f_8000,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0xffc0_0000,
            0x7fff_ffff,
            0x0000_8000,
            0x0001_8000,
            0x0000_7fff,
            0x807f_ffff,
        ];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        bits.extend((0..100_000).map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 32) as u32
        }));
        for b in bits {
            assert_eq!(
                bf16_bits(b),
                bf16::from_f32(f32::from_bits(b)).to_bits(),
                "{b:#010x}"
            );
        }
        // And through `to_dtype`, f16 by half's slice conversion, as value by value.
        let v = mixed_values(1000, 5);
        let (b, h) = (
            Values::from(v.clone())
                .to_dtype(LoraDtype::Bf16)
                .expect("fits"),
            Values::from(v.clone())
                .to_dtype(LoraDtype::F16)
                .expect("fits"),
        );
        let (Values::Bf16(b), Values::F16(h)) = (b, h) else {
            panic!("16 bits")
        };
        assert_eq!(b, v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>());
        assert_eq!(h, v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>());
    }

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
