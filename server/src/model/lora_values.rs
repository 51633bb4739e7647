//! A LoRA matrix's values as served: `f32` (the default and the reference; what PEFT
//! files usually hold, read in place where they can be), or `bf16`/`f16` on request
//! (`--lora-dtype`, as vLLM's), half the bytes a decode step reads for each row's adapter.
//! Invariant: widening a 16-bit value to `f32` is exact, and the kernels widen before they
//! multiply, so a pair served in `bf16` computes exactly what an `f32` pair holding the
//! rounded values computes.

use std::borrow::Cow;

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
}

impl LoraDtype {
    pub fn name(self) -> &'static str {
        match self {
            LoraDtype::F32 => "f32",
            LoraDtype::Bf16 => "bf16",
            LoraDtype::F16 => "f16",
        }
    }

    /// Bytes of one value.
    pub fn bytes(self) -> usize {
        match self {
            LoraDtype::F32 => 4,
            LoraDtype::Bf16 | LoraDtype::F16 => 2,
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
            other => Err(format!("{other:?}: expected f32, bf16 or f16")),
        }
    }
}

/// A matrix's values, row-major, in one of the [`LoraDtype`]s.
#[derive(Clone)]
pub enum Values {
    F32(F32s),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
            Values::F16(v) => v.len(),
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
        }
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype().bytes()
    }

    /// The values as `f32` (exact: a 16-bit value widens without loss); borrowed when they
    /// are `f32` already.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Values::F32(v) => Cow::Borrowed(v),
            Values::Bf16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Values::F16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        }
    }

    /// These values in `dtype`: as they are, widened exactly, or rounded to the nearest
    /// (ties to even). A value the narrower type cannot hold (an `f32` beyond `f16`'s
    /// ±65,504) is refused, naming it, rather than served as an infinity.
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
        })
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
            .contains("expected f32, bf16 or f16"));
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
