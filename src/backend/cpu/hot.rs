//! A training step on a rayon pool whose idle workers stay awake.
//!
//! A step is a few hundred ops, many of them tens of microseconds long. Rayon
//! puts a worker to sleep shortly after it runs out of work, and waking it again
//! (a futex, and on a VM an inter-processor interrupt to a halted vCPU) costs
//! about as much as such an op. [`run_hot`] runs the step on a worker and keeps
//! every other worker polling for work until it returns, as OpenMP runtimes do
//! with their spin-wait time (`KMP_BLOCKTIME`, `GOMP_SPINCOUNT`) under PyTorch.
//! The price is CPU time burnt between ops, only while a step runs.
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    /// Whether this thread is inside [`run_hot`]'s step or polling for it: a
    /// second step or poller on the same thread would nest under it, so it
    /// returns at once instead.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Sets `done` and clears this thread's mark when dropped, on return or unwind,
/// so the pollers always stop.
struct Finish<'a> {
    done: &'a AtomicBool,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        BUSY.with(|b| b.set(false));
    }
}

/// Runs `f` on a worker of the current rayon pool while the pool's other idle
/// workers poll for its parallel jobs instead of sleeping. Runs `f` directly on
/// a one-thread pool, or when this thread is already inside `run_hot`.
pub fn run_hot<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_num_threads() < 2 || BUSY.with(Cell::get) {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        BUSY.with(|b| b.set(true));
        let _finish = Finish { done: &done };
        s.spawn_broadcast(|_, _| {
            if BUSY.with(|b| b.replace(true)) {
                return;
            }
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::hint::spin_loop();
                }
            }
            BUSY.with(|b| b.set(false));
        });
        f()
    })
}
