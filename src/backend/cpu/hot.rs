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
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

thread_local! {
    /// Whether this thread is inside [`run_hot`]'s step or polling for it: a
    /// second step or poller on the same thread would nest under it, so it
    /// returns at once instead.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Sets `done` and restores this thread's mark when dropped, on return or unwind,
/// so the pollers always stop.
struct Finish<'a> {
    done: &'a AtomicBool,
    /// This thread's mark before the step: a worker may run another caller's step
    /// nested inside its own work, and must find its mark as it left it.
    prev: bool,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        BUSY.with(|b| b.set(self.prev));
    }
}

/// Whether polling is on: `DUALPRIV_CPU_POLL=0` turns it off (read once), for a
/// machine shared with other work, where the idle workers then sleep as rayon's
/// do and the step pays their wake-ups.
fn polling() -> bool {
    match POLL.load(Ordering::Relaxed) {
        POLL_ON => true,
        POLL_OFF => false,
        _ => {
            let on = std::env::var("DUALPRIV_CPU_POLL").map_or(true, |v| v != "0");
            POLL.store(if on { POLL_ON } else { POLL_OFF }, Ordering::Relaxed);
            on
        }
    }
}

const POLL_ON: u8 = 1;
const POLL_OFF: u8 = 2;
/// 0 until [`polling`] first reads the environment or [`set_polling`] is called.
static POLL: AtomicU8 = AtomicU8::new(0);

/// Turns the polling workers on or off for this process, overriding
/// `DUALPRIV_CPU_POLL` (a library caller's equivalent of the variable).
pub fn set_polling(on: bool) {
    POLL.store(if on { POLL_ON } else { POLL_OFF }, Ordering::Relaxed);
}

/// Runs `f` on a worker of the current rayon pool while the pool's other idle
/// workers poll for its parallel jobs instead of sleeping. Runs `f` directly on
/// a one-thread pool, when this thread is already inside `run_hot`, or with
/// polling turned off (`DUALPRIV_CPU_POLL=0`).
///
/// The pollers are the second halves of nested `rayon::join`s, which live on
/// this stack frame (`spawn_broadcast`, which reaches each worker for certain,
/// allocates its job on the heap every step). Idle workers steal them oldest
/// first, before any job of `f`. A poller taken by a thread that is busy already
/// (this one, out of `f`'s jobs before a worker stole it) returns at once; that
/// step then has one poller fewer, which costs wake-ups, not results.
pub fn run_hot<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let n = rayon::current_num_threads();
    if n < 2 || BUSY.with(Cell::get) || !polling() {
        return f();
    }
    let polls = Polls {
        done: AtomicBool::new(false),
        taken: AtomicUsize::new(0),
        count: n - 1,
    };
    with_pollers(polls.count, &polls, || {
        let prev = BUSY.with(|b| b.replace(true));
        let _finish = Finish {
            done: &polls.done,
            prev,
        };
        f()
    })
}

/// The pollers of one [`run_hot`] step.
struct Polls {
    /// Set when the step returns (or unwinds).
    done: AtomicBool,
    /// Pollers started so far, those that returned at once included.
    taken: AtomicUsize,
    /// Pollers queued.
    count: usize,
}

/// Threads polling now, over every [`run_hot`] step (for the tests).
static POLLING: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with `k` pollers queued under it on this worker's deque.
fn with_pollers<R: Send>(k: usize, polls: &Polls, f: impl FnOnce() -> R + Send) -> R {
    if k == 0 {
        return f();
    }
    rayon::join(|| with_pollers(k - 1, polls, f), || poll(polls)).0
}

/// Runs the pool's jobs until the step is done; returns at once on a thread that
/// is busy with a step or a poller already.
fn poll(polls: &Polls) {
    let nested = BUSY.with(|b| b.replace(true));
    polls.taken.fetch_add(1, Ordering::AcqRel);
    if nested {
        return;
    }
    // Until every poller is taken, spin without running jobs: `yield_now` would
    // steal the next queued poller (oldest first), which would return at once on
    // this busy thread instead of waking an idle worker.
    while polls.taken.load(Ordering::Acquire) < polls.count && !polls.done.load(Ordering::Acquire) {
        std::hint::spin_loop();
    }
    POLLING.fetch_add(1, Ordering::Relaxed);
    while !polls.done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
    POLLING.fetch_sub(1, Ordering::Relaxed);
    BUSY.with(|b| b.set(false));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    #[test]
    fn runs_on_a_worker_and_returns_the_result() {
        let p = pool(3);
        let (on_worker, sum) = p.install(|| {
            run_hot(|| {
                let v: u64 = (0..10_000u64).into_par_iter().sum();
                (rayon::current_thread_index().is_some(), v)
            })
        });
        assert!(on_worker);
        assert_eq!(sum, 49_995_000);
        // From a thread outside any pool, `f` moves onto a global-pool worker
        // (unless that pool has one thread or polling is off, when `f` runs where
        // it is).
        let on_worker = run_hot(|| rayon::current_thread_index().is_some());
        assert_eq!(on_worker, rayon::current_num_threads() >= 2 && polling());
    }

    #[test]
    fn every_other_worker_polls_during_a_step() {
        if !polling() {
            return; // DUALPRIV_CPU_POLL=0: nothing polls, by request
        }
        let p = pool(4);
        for _ in 0..20 {
            let seen = p.install(|| {
                run_hot(|| {
                    // Other tests' steps may add to the count, never take from it.
                    let t0 = std::time::Instant::now();
                    while POLLING.load(Ordering::Relaxed) < 3 {
                        if t0.elapsed() > std::time::Duration::from_secs(5) {
                            return false;
                        }
                        std::hint::spin_loop();
                    }
                    true
                })
            });
            assert!(seen, "fewer than 3 of 4 workers polled during a step");
        }
    }

    #[test]
    fn nested_and_concurrent_steps_finish() {
        let p = pool(2);
        p.install(|| {
            let r: Vec<u64> = (0..8u64)
                .into_par_iter()
                .map(|i| run_hot(|| run_hot(|| (0..1000u64).into_par_iter().map(|j| i * j).sum())))
                .collect();
            assert_eq!(r[3], 3 * 499_500);
        });
        // Two outside threads stepping on the same pool at once.
        let p = std::sync::Arc::new(pool(2));
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|_| p.install(|| run_hot(|| (0..100u64).into_par_iter().sum::<u64>())))
                        .sum::<u64>()
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), 50 * 4950);
        }
    }

    #[test]
    fn a_panicking_step_stops_the_pollers() {
        let p = pool(2);
        let r = p.install(|| std::panic::catch_unwind(|| run_hot(|| panic!("step failed"))));
        assert!(r.is_err());
        // The pool is free again: a poller still spinning would hold a worker.
        assert_eq!(p.install(|| run_hot(|| 7)), 7);
    }
}
