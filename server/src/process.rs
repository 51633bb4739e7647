//! Process-wide settings a binary applies first thing in `main`, while it has one thread.

/// A binary's `main`: the settings below, then `body` on a multi-threaded tokio runtime.
pub fn run_main<T>(body: impl std::future::Future<Output = T>) -> std::io::Result<T> {
    park_candle_workers_at_once();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(body))
}

/// candle's element-wise ops hand half their work to a pool of candle's own threads
/// (`candle-bp-*`, one fewer than the cores), and each of those spins up to 25,000 times
/// after every op before it parks (`CANDLE_BARRIER_POOL_SPIN_LIMIT`). On a machine with as
/// many busy threads as cores (a training step's GEMMs split over the rayon pool, or serving
/// beside a job) that spinning holds the core the other rayon worker is waiting for, and the
/// caller ends up running both halves of a GEMM itself: `perf` of a LoRA step on 2 cores put
/// every microkernel sample on one thread while candle's worker spun 22 % of the time.
/// Parking at once instead made the trainer ~15 % faster (`BENCHMARKS.md`, issue 17, ninth
/// part). An operator's own setting is kept.
///
/// Call before any other thread exists: it sets an environment variable.
pub fn park_candle_workers_at_once() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "0");
    }
}
