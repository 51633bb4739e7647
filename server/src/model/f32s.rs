//! `f32` values owned, or read in place from bytes someone else owns (a stored adapter's
//! mapped weights file), so a cold adapter load need not copy what it serves.
//! Invariant: a shared view is 4-byte aligned little-endian `f32`s, checked when it is made.

use std::ops::Deref;

use bytes::Bytes;

#[derive(Clone)]
pub enum F32s {
    Owned(Vec<f32>),
    /// Bytes whose address and length [`F32s::view`] checked.
    Shared(Bytes),
}

impl F32s {
    /// `bytes` read in place as little-endian `f32`s, where the machine is little-endian and
    /// they are aligned and whole; `None` otherwise (the caller copies them).
    pub fn view(bytes: Bytes) -> Option<Self> {
        (cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, f32>(&bytes).is_ok())
            .then_some(F32s::Shared(bytes))
    }
}

impl Deref for F32s {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32s::Owned(v) => v,
            // Checked in `view`; a Bytes never moves its contents.
            F32s::Shared(b) => bytemuck::cast_slice(b),
        }
    }
}

impl From<Vec<f32>> for F32s {
    fn from(v: Vec<f32>) -> Self {
        F32s::Owned(v)
    }
}

impl PartialEq for F32s {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for F32s {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_only_aligned_whole_values_and_reads_them_in_place() {
        let v: Vec<f32> = vec![1.5, -2.0, 3.25];
        let bytes = Bytes::copy_from_slice(bytemuck::cast_slice(&v));
        let whole = F32s::view(bytes.clone()).expect("aligned");
        assert_eq!(&*whole, &v[..]);
        assert_eq!(
            whole.as_ptr() as *const u8,
            bytes.as_ptr(),
            "read in place, not copied"
        );
        assert!(F32s::view(bytes.slice(1..9)).is_none(), "misaligned");
        assert!(F32s::view(bytes.slice(0..6)).is_none(), "not whole values");
    }
}
