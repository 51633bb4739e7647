//! Kernel micro-benchmark: the packed decode matmul (Q4_1 / Q8_0 blocks), exact and int16,
//! against candle's f32 matmul on the same shapes, at several batch sizes. Ratios in one run.

use std::time::Instant;

use candle_core::{
    quantized::{GgmlDType, QTensor},
    Device, Tensor,
};
use graft_server::model::packed::{DecodeKernel, PackedLinear};

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let iters = 20;
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64 * 1e3
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dt)?;
            let deq = q.dequantize(&dev)?;
            let packed = PackedLinear::from_qtensor(&q)?;
            for rows in [1usize, 8, 32, 256] {
                let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
                let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let f32_ms = time(|| {
                    let _ = x.matmul(&deq.t().expect("t")).expect("mm");
                });
                let packed_ms = time(|| {
                    let _ = packed.matmul(&xv, rows);
                });
                let int16_ms = time(|| {
                    let _ = packed.matmul_with(DecodeKernel::Int16, &xv, rows);
                });
                println!(
                    "{n:>5}x{k:<5} {dt:?} rows {rows:>3}: f32 {f32_ms:7.3} ms  packed {packed_ms:7.3} ms  int16 {int16_ms:7.3} ms  (packed/f32 {:.2}, int16/packed {:.2})",
                    packed_ms / f32_ms,
                    int16_ms / packed_ms
                );
            }
        }
    }
    Ok(())
}
