//! Process-wide settings a binary applies first thing in `main`, while it has one thread.

/// A binary's `main`: the settings below, then `body` on a multi-threaded tokio runtime.
pub fn run_main<T>(body: impl std::future::Future<Output = T>) -> std::io::Result<T> {
    park_candle_workers_at_once();
    keep_freed_memory();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(body))
}

/// candle's element-wise ops hand half their work to a pool of candle's own threads
/// (`candle-bp-*`, one fewer than the cores), and each of those spins up to 25,000 times
/// after every op before it parks (`CANDLE_BARRIER_POOL_SPIN_LIMIT`). On a machine with as
/// many busy threads as cores (a training step's GEMMs split over the rayon pool, or serving
/// beside a job) that spinning holds a core another thread is waiting for: `perf` of a LoRA
/// step on 2 cores had candle's worker spinning 22 % of the time. Parking at once instead
/// made the trainer ~15 % faster (`BENCHMARKS.md`, issue 17, ninth part). An operator's own
/// setting is kept.
///
/// Call before any other thread exists: it sets an environment variable.
pub fn park_candle_workers_at_once() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "0");
    }
}

/// glibc's allocator, left to itself, hands every block of more than 128 KiB..32 MiB
/// (its threshold moves) to `mmap` and back to the kernel at `free`, and trims its heaps
/// whenever their free top passes twice that: a training step, which makes and drops the
/// same few hundred `(tokens, width)` buffers every step, then faults each of them in again,
/// page by page, on the trainer's own thread (~100,000 faults a step for SmolLM2, batch
/// 4 x 128). This keeps freed memory in one heap for the next step instead: one arena for
/// every thread (the trainer runs on a fresh rayon pool, whose threads would otherwise take
/// arenas of their own), no `mmap`ed blocks, and no trimming at `free`.
/// [`release_freed_memory`] gives it back when a job ends, and graftd's server calls it once
/// a minute too ([`release_freed_memory_every`]), so a large one-off buffer (an export, an
/// import) does not stay resident in a server that trains nothing. An operator's own
/// `GLIBC_TUNABLES` for malloc are kept. Elsewhere than glibc this does nothing.
///
/// Call before any other thread exists: the arena limit binds threads as they first
/// allocate.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."));
        if !tuned {
            // SAFETY: `mallopt` only sets the allocator's parameters; called while this
            // process has one thread.
            #[allow(unsafe_code)]
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
                libc::mallopt(libc::M_MMAP_MAX, 0);
                libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
            }
        }
    }
}

/// Returns the allocator's free pages to the kernel (glibc's `malloc_trim`, which also
/// releases free pages inside the heap): what [`keep_freed_memory`] kept for the next step,
/// once there is no next step. Elsewhere than glibc this does nothing.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` only walks the allocator's own free lists.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// [`release_freed_memory`] every `period`, forever (off the async threads). While a job
/// trains, each call costs its next step, once, the page faults [`keep_freed_memory`]
/// saves (~100,000 for SmolLM2 at batch 4 x 128).
pub async fn release_freed_memory_every(period: std::time::Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let _ = tokio::task::spawn_blocking(release_freed_memory).await;
    }
}
