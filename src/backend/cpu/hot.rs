//! A training step on a rayon pool whose idle workers stay awake.
//!
//! A step is a few hundred ops, many of them tens of microseconds long. Rayon
//! puts a worker to sleep shortly after it runs out of work, and waking it again
//! (a futex, and on a VM an inter-processor interrupt to a halted vCPU) costs
//! about as much as such an op. [`run_hot`] runs the step on a worker and keeps
//! the other workers (every one that is idle when the step starts) polling for
//! work until it returns, as OpenMP runtimes do with their spin-wait time
//! (`KMP_BLOCKTIME`, `GOMP_SPINCOUNT`) under PyTorch. The price is CPU time burnt
//! between ops, only while a step runs.
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
/// the stack (`spawn_broadcast`, which reaches each worker for certain,
/// allocates its job on the heap every step). Idle workers steal them oldest
/// first, before any job of `f`. A poller taken by a thread that is busy already
/// (this one, out of `f`'s jobs before a worker stole it) returns at once; that
/// step then has fewer pollers, which costs wake-ups, not results. A poller
/// runs no job until every poller is taken or [`GATE`] has passed (see [`poll`]),
/// so a step during which some worker is busy elsewhere starts that much slower.
pub fn run_hot<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    run_hot_gated(GATE, f)
}

/// How long a poller waits for the other pollers to be taken before it runs
/// jobs anyway: a few times a sleeping worker's wake-up.
const GATE: Duration = Duration::from_micros(200);

/// Pollers one thread queues at most: crossbeam's deque holds 64 jobs before it
/// grows, which allocates. More are queued as a tree (see [`queue`]).
const QUEUE_MAX: usize = 16;

/// [`run_hot`] with the pollers' [`GATE`] given (the tests hold it open).
fn run_hot_gated<R: Send>(gate: Duration, f: impl FnOnce() -> R + Send) -> R {
    let n = rayon::current_num_threads();
    if n < 2 || BUSY.with(Cell::get) || !polling() {
        return f();
    }
    let polls = Polls {
        done: AtomicBool::new(false),
        taken: AtomicUsize::new(0),
        count: n - 1,
        gate,
    };
    queue(polls.count, &polls, || {
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
    /// Pollers started or given up so far.
    taken: AtomicUsize,
    /// Pollers in all.
    count: usize,
    /// See [`GATE`].
    gate: Duration,
}

/// Threads polling now, over every [`run_hot`] step.
#[cfg(test)]
static POLLING: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with `k` pollers queued under it on this worker's deque, as at most
/// [`QUEUE_MAX`] jobs: a job that stands for several pollers queues the rest
/// under itself on the worker that takes it.
fn queue<R: Send>(k: usize, polls: &Polls, f: impl FnOnce() -> R + Send) -> R {
    queue_jobs(k, k.div_ceil(QUEUE_MAX).max(1), polls, f)
}

fn queue_jobs<R: Send>(k: usize, per: usize, polls: &Polls, f: impl FnOnce() -> R + Send) -> R {
    if k == 0 {
        return f();
    }
    let m = per.min(k);
    rayon::join(|| queue_jobs(k - m, per, polls, f), || poller(m, polls)).0
}

/// A queued job standing for `m` pollers: this thread polls, and queues the
/// other `m − 1` for idle workers to steal. On a thread that is busy with a step
/// or a poller already, all `m` are given up.
fn poller(m: usize, polls: &Polls) {
    if BUSY.with(|b| b.replace(true)) {
        polls.taken.fetch_add(m, Ordering::AcqRel);
        return;
    }
    polls.taken.fetch_add(1, Ordering::AcqRel);
    queue(m - 1, polls, || poll(polls));
    BUSY.with(|b| b.set(false));
}

/// Runs the pool's jobs until the step is done.
fn poll(polls: &Polls) {
    // Until every poller is taken (or the gate passes), spin without running
    // jobs: `yield_now` would steal the next queued poller (oldest first), given
    // up at once on this busy thread instead of keeping an idle worker awake.
    let t0 = Instant::now();
    while polls.taken.load(Ordering::Acquire) < polls.count
        && !polls.done.load(Ordering::Acquire)
        && t0.elapsed() < polls.gate
    {
        std::hint::spin_loop();
    }
    #[cfg(test)]
    POLLING.fetch_add(1, Ordering::Relaxed);
    while !polls.done.load(Ordering::Acquire) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            std::hint::spin_loop();
        }
    }
    #[cfg(test)]
    POLLING.fetch_sub(1, Ordering::Relaxed);
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

    /// Runs `f` as a step on `p` with the gate held open, and says whether
    /// `want` threads were polling at once during it (within 5 s).
    fn polled(p: &rayon::ThreadPool, want: usize) -> bool {
        p.install(|| {
            run_hot_gated(Duration::MAX, || {
                // Other tests' steps may add to the count, never take from it.
                let t0 = Instant::now();
                while POLLING.load(Ordering::Relaxed) < want {
                    if t0.elapsed() > Duration::from_secs(5) {
                        return false;
                    }
                    std::hint::spin_loop();
                }
                true
            })
        })
    }

    #[test]
    fn every_other_worker_polls_during_a_step() {
        if !polling() {
            return; // DUALPRIV_CPU_POLL=0: nothing polls, by request
        }
        let p = pool(4);
        for _ in 0..20 {
            assert!(polled(&p, 3), "fewer than 3 of 4 workers polled");
        }
        // More workers than one thread queues pollers for: the tree.
        let p = pool(QUEUE_MAX + 6);
        assert!(polled(&p, QUEUE_MAX + 5), "not every worker polled");
    }

    #[test]
    fn a_worker_busy_elsewhere_does_not_serialise_the_step() {
        if !polling() {
            return;
        }
        let p = pool(4);
        let (started, release) = (AtomicBool::new(false), AtomicBool::new(false));
        p.in_place_scope(|s| {
            s.spawn(|_| {
                started.store(true, Ordering::Release);
                while !release.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
            });
            // Running, not queued: a poller must not pick it up (the step would
            // then wait for it, and it for the step).
            while !started.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            // One worker spins in that job: one poller is never taken, and
            // the others must still run the step's jobs once the gate passes.
            let threads = p.install(|| {
                run_hot(|| {
                    let t: std::collections::BTreeSet<_> = (0..64)
                        .into_par_iter()
                        .map(|_| {
                            let t0 = Instant::now();
                            while t0.elapsed() < Duration::from_millis(2) {
                                std::hint::spin_loop();
                            }
                            rayon::current_thread_index()
                        })
                        .collect();
                    t.len()
                })
            });
            release.store(true, Ordering::Release);
            assert!(threads >= 2, "the step's jobs ran on {threads} thread(s)");
        });
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
