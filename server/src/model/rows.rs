//! The small per-row operations of the serving step on plain `f32` buffers: RMSNorm, the
//! SwiGLU product and residual adds. The serving path keeps a step's activations in
//! buffers it owns and runs these in place, with no tensor round trip between them.
//! Invariant: each row's result depends on that row alone (batch-invariant).

/// `out = x / rms(x) * w` per row of `x` (rows of `w.len()` values) in f32, with the very
/// arithmetic of candle's `rms_norm` op (the mean square summed in order, `x / m * w`), so
/// the serving step's bits are those it had when it ran on tensors.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    let mut out = vec![0f32; x.len()];
    for (o, r) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
        let ss: f32 = r.iter().map(|v| v * v).sum();
        let m = (ss / dim as f32 + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(r).zip(w) {
            *o = v / m * g;
        }
    }
    out
}

/// `gate[i] = silu(gate[i]) * up[i]`, in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x[i] += h[i]`, in place.
pub fn add(x: &mut [f32], h: &[f32]) {
    for (x, &h) in x.iter_mut().zip(h) {
        *x += h;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The buffer ops against candle's ops on the same values, bit for bit (the serving
    /// step ran on those before).
    #[test]
    fn row_ops_match_candle_bitwise() {
        let dev = Device::Cpu;
        let (rows, dim) = (3, 64);
        let x: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 / 64.0).collect();
        let xt = Tensor::from_slice(&x, (rows, dim), &dev).expect("x");
        let wt = Tensor::from_slice(&w, dim, &dev).expect("w");
        let want: Vec<f32> = candle_nn::ops::rms_norm(&xt, &wt, 1e-5)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("rms");
        let close = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
        };
        assert!(close(&rms_norm(&x, &w, 1e-5), &want));
        let mut g = x.clone();
        silu_mul(&mut g, &x[..]);
        let want: Vec<f32> = (xt.silu().expect("silu") * &xt)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("swiglu");
        assert!(close(&g, &want));
        let mut s = x.clone();
        add(&mut s, &x);
        assert!(s.iter().zip(&x).all(|(s, x)| *s == 2.0 * x));
    }
}
