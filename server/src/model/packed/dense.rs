//! The f32 weights of a packed layer, made from its blocks when an f32 path asks for them
//! (the trainer, the plain reference path, the embedding lookup), so a served model need
//! not hold a second, f32 copy of every weight beside its blocks.
//! Invariant: the values are the ones candle's `QTensor::dequantize` gives for the same
//! GGUF tensor, bit for bit (the kernels' own rows: Q4_1's fused `fma(q, d, m)` rounds as
//! candle's `q * d + m` does, the product of a 4-bit `q` and an f16 `d` being exact in f32),
//! so training and the reference path see the weights they always saw.

use rayon::prelude::*;

use super::PackedLinear;

impl PackedLinear {
    /// The whole weight `(out, in)`, row-major, rows dequantised in parallel ([`PackedLinear::row`]).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        w.par_chunks_mut(self.inp)
            .enumerate()
            .for_each(|(r, row)| self.row(r, row));
        w
    }

    /// Rows `ids` of the weight, dequantised, one after another (an embedding lookup).
    /// Answers None when an id is not a row.
    pub fn dense_rows(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.inp];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.inp.max(1))) {
            if id as usize >= self.out {
                return None;
            }
            self.row(id as usize, row);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{quantized::QTensor, Device};

    use super::super::tests::every_format;

    /// Every format's f32 weights and looked-up rows are candle's dequantisation, bit for
    /// bit.
    #[test]
    fn dense_weights_are_candles_dequantisation_bitwise() {
        let (n, k) = (7, 96);
        for (dt, p) in every_format(n, k) {
            let q = QTensor::quantize(&super::super::tests::weights(n, k), dt).expect("q");
            let want: Vec<u32> = q
                .dequantize(&Device::Cpu)
                .expect("dequantize")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("vec")
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let bits = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(p.to_dense()), want, "{dt:?} whole weight");
            let ids = [6u32, 0, 3, 3];
            let rows = p.dense_rows(&ids).expect("rows exist");
            for (i, &id) in ids.iter().enumerate() {
                let id = id as usize;
                assert_eq!(
                    bits(rows[i * k..(i + 1) * k].to_vec()),
                    want[id * k..(id + 1) * k],
                    "{dt:?} row {id}"
                );
            }
            assert!(
                p.dense_rows(&[n as u32]).is_none(),
                "{dt:?}: row {n} refused"
            );
        }
    }
}
