//! Wall time per backend op, for `dualpriv bench --profile`.
//!
//! Every checked op of [`super::Backend`] and [`super::dp::DpBackend`] opens an
//! [`op`] scope. Profiling is off unless [`start`] was called, and then only
//! outermost scopes record: anything an op runs, on any thread, is part of its
//! time, and an op's time is what the step waits for. Time outside every scope is the model
//! and training code between ops (collation, bookkeeping, the optimizer's host
//! side), reported by the caller as the step minus the ops.
//!
//! Off, a scope costs one relaxed atomic load. On, each scope reads the clock twice
//! and takes a mutex once. CUDA ops return before the device has finished, so the
//! table is only meaningful for the CPU backend, where `bench --profile` is offered.
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Whether an outermost scope is open (on any thread): scopes opened meanwhile,
/// nested or from the op's own parallel jobs, are part of its time.
static BUSY: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<OpTime>> = Mutex::new(Vec::new());

/// Calls and total wall time of one op name.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The op (the checked method's name).
    pub name: &'static str,
    /// Outermost calls recorded.
    pub calls: u64,
    /// Their total wall time, seconds.
    pub seconds: f64,
}

/// An open op scope; records its wall time when dropped.
pub struct Scope {
    name: &'static str,
    start: Instant,
}

/// Opens a scope for op `name`: `None` (nothing recorded) unless profiling is on
/// and no other scope is open.
#[inline]
pub fn op(name: &'static str) -> Option<Scope> {
    if !ENABLED.load(Relaxed) || BUSY.swap(true, Relaxed) {
        return None;
    }
    Some(Scope {
        name,
        start: Instant::now(),
    })
}

impl Drop for Scope {
    fn drop(&mut self) {
        let seconds = self.start.elapsed().as_secs_f64();
        let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
        match t.iter_mut().find(|o| o.name == self.name) {
            Some(o) => {
                o.calls += 1;
                o.seconds += seconds;
            }
            None => t.push(OpTime {
                name: self.name,
                calls: 1,
                seconds,
            }),
        }
        drop(t);
        BUSY.store(false, Relaxed);
    }
}

/// Clears the table and starts recording. Ops are assumed to run one at a time
/// (a training step's are): a scope opened while another is open is not recorded.
pub fn start() {
    TABLE.lock().unwrap_or_else(|p| p.into_inner()).clear();
    ENABLED.store(true, Relaxed);
}

/// Stops recording and returns the table, largest total time first.
pub fn stop() -> Vec<OpTime> {
    ENABLED.store(false, Relaxed);
    let mut t = std::mem::take(&mut *TABLE.lock().unwrap_or_else(|p| p.into_inner()));
    t.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_outermost_scopes_only() {
        assert!(op("off").is_none(), "nothing is recorded before start");
        start();
        {
            let _a = op("outer");
            assert!(op("inner").is_none());
            std::thread::spawn(|| assert!(op("other thread").is_none()))
                .join()
                .unwrap();
        }
        std::thread::spawn(|| drop(op("outer"))).join().unwrap();
        drop(op("outer"));
        let t = stop();
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!((t[0].name, t[0].calls), ("outer", 3));
        assert!(op("after").is_none());
    }
}
