//! The CPU backend's buffer pool: [`HostBuf`]s hand their storage back to a
//! per-element-type free list when dropped, and [`CpuOf::zeros`](super::CpuOf)
//! takes from it, so a training step that repeats the previous step's shapes makes
//! no heap allocation at all once warm (no `malloc`, no fresh pages to fault in).
//!
//! Why a pool rather than a planned arena: the model code is written once over
//! the [`Backend`](crate::backend::Backend) trait and allocates as it goes, which
//! the CUDA backend already serves from a caching pool (`backend/cuda/pool.rs`);
//! the same shape here keeps one model code path. Reuse is best-fit within 2× of
//! the request, so buffers freed by one phase (the vision tower) serve the next
//! (the decoder) instead of each phase holding its own set.
//!
//! Steady state is exact but for parallel jobs: a step that repeats the previous
//! step's sizes is served wholly from the free lists (0 misses, `dualpriv bench`'s
//! "pool misses/step" and `tests/alloc.rs`). Each miss adds a buffer of the
//! requested size, best fit takes an exact size first, and the step's sequence of
//! requests and drops repeats, so after a warm-up step or two every request finds
//! its size free; and free lists stay once made (until more than 256 sizes exist,
//! when a miss drops the empty ones), so a `put` allocates nothing either. Jobs
//! that take buffers in parallel (attention's per-(example, head) scratch) are the
//! exception: how many are live at once, and which best fit each gets, depends on
//! how the threads run, so an order first seen after warm-up costs one more
//! buffer, once.
//!
//! Privacy: `Pool::zeros` clears a reused buffer before handing it out. An
//! `output` buffer ([`Backend::output`](crate::backend::Backend::output)) keeps
//! its last use's values, so it goes only to ops that overwrite every value
//! (GEMMs with β = 0, norms, attention's forward, SwiGLU); `tests/pool.rs` runs
//! each of them on an output buffer full of NaN and finds none left, so stale
//! values of another example or step cannot reach a result.
use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use super::{alloc, Real};
use crate::Result;

/// Bytes the free lists of one element type may hold; a buffer dropped while the
/// pool is this full is freed instead.
pub const POOL_LIMIT_BYTES: usize = 1 << 30;

/// Free-list sizes kept before a miss drops the empty lists.
const MAX_LISTS: usize = 256;

#[derive(Default)]
struct State<T> {
    /// Free storage by capacity.
    free: BTreeMap<usize, Vec<Vec<T>>>,
    cached_bytes: usize,
    allocations: u64,
    reuses: u64,
}

/// A free list of host buffers of one element type.
pub struct Pool<T> {
    state: Mutex<State<T>>,
}

/// Counters of a [`Pool`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes held for reuse (not handed out).
    pub cached_bytes: usize,
    /// Buffers the pool had to allocate (misses) since the process started.
    pub allocations: u64,
    /// Buffers served from the free lists.
    pub reuses: u64,
}

impl<T: Real> Pool<T> {
    /// An empty pool (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                free: BTreeMap::new(),
                cached_bytes: 0,
                allocations: 0,
                reuses: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // The state is a cache: a panic while it was held leaves at worst a stale
        // counter, so a poisoned lock is recovered.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A zero-filled buffer of `n` values, reused when a free one of capacity
    /// `n ..= 2n` exists.
    pub(super) fn zeros(&'static self, n: usize) -> Result<HostBuf<T>> {
        self.take(n, true)
    }

    /// A buffer of `n` values, reused when a free one of capacity `n ..= 2n`
    /// exists; a reused buffer is zero-filled when `clear`, and otherwise keeps the
    /// values of its last use (for outputs the next op overwrites entirely,
    /// [`Backend::output`](crate::backend::Backend::output)).
    pub(super) fn take(&'static self, n: usize, clear: bool) -> Result<HostBuf<T>> {
        if n == 0 {
            return Ok(HostBuf::detached(Vec::new()));
        }
        let reused = {
            let mut st = self.lock();
            // The smallest free capacity in n ..= 2n: the exact one when a step
            // repeats the previous step's sizes. Empty lists stay in the map, so
            // their storage is kept for the next `put` (no allocation there).
            let found = st
                .free
                .range_mut(n..=n.saturating_mul(2))
                .find_map(|(&c, list)| list.pop().map(|v| (c, v)));
            found.map(|(c, v)| {
                st.cached_bytes -= c * std::mem::size_of::<T>();
                crate::mem::cache_take(c * std::mem::size_of::<T>());
                st.reuses += 1;
                v
            })
        };
        let data = match reused {
            Some(mut v) => {
                if clear {
                    v.clear();
                }
                // Shrinks, or zero-fills only the values beyond the old length.
                v.resize(n, T::default());
                v
            }
            None => {
                let mut st = self.lock();
                st.allocations += 1;
                // Emptied lists stay (re-creating one allocates), but shapes that
                // vary from step to step would grow the map without bound and slow
                // every lookup: past MAX_LISTS sizes, a miss drops the empty ones.
                if st.free.len() > MAX_LISTS {
                    st.free.retain(|_, l| !l.is_empty());
                }
                drop(st);
                alloc(n)?
            }
        };
        Ok(HostBuf {
            data,
            pool: Some(self),
        })
    }

    fn put(&self, v: Vec<T>) {
        let cap = v.capacity();
        let bytes = cap * std::mem::size_of::<T>();
        if cap == 0 {
            return;
        }
        let mut st = self.lock();
        if st.cached_bytes + bytes > POOL_LIMIT_BYTES {
            return; // `v` is freed here, after the lock (dropped in reverse order).
        }
        st.cached_bytes += bytes;
        crate::mem::cache_add(bytes);
        st.free.entry(cap).or_default().push(v);
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            cached_bytes: st.cached_bytes,
            allocations: st.allocations,
            reuses: st.reuses,
        }
    }

    /// Frees every cached buffer (live buffers still return when dropped).
    pub fn trim(&self) {
        let (free, bytes) = {
            let mut st = self.lock();
            (
                std::mem::take(&mut st.free),
                std::mem::take(&mut st.cached_bytes),
            )
        };
        drop(free);
        crate::mem::cache_forget(bytes);
    }
}

impl<T: Real> Default for Pool<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A CPU buffer: a `Vec<T>` that returns its storage to its [`Pool`] when dropped.
/// It dereferences to the slice of its values.
pub struct HostBuf<T: Real> {
    data: Vec<T>,
    pool: Option<&'static Pool<T>>,
}

impl<T: Real> HostBuf<T> {
    /// A buffer over `data` that is freed normally when dropped.
    pub fn detached(data: Vec<T>) -> Self {
        Self { data, pool: None }
    }

    /// The values as a `Vec` (copied; the buffer keeps its storage).
    pub fn to_vec(&self) -> Vec<T> {
        self.data.clone()
    }
}

impl<T: Real> Deref for HostBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

impl<T: Real> DerefMut for HostBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

impl<T: Real> Drop for HostBuf<T> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool {
            pool.put(std::mem::take(&mut self.data));
        }
    }
}

impl<T: Real> std::fmt::Debug for HostBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.data.iter()).finish()
    }
}

impl<T: Real> PartialEq for HostBuf<T> {
    fn eq(&self, other: &Self) -> bool {
        self.data == other.data
    }
}

impl<T: Real> PartialEq<Vec<T>> for HostBuf<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        self.data == *other
    }
}

impl<T: Real> Clone for HostBuf<T> {
    /// A copy in a buffer of the same pool (an allocation failure aborts, as
    /// `Vec::clone`'s does).
    fn clone(&self) -> Self {
        let data = self.data.clone();
        Self {
            data,
            pool: self.pool,
        }
    }
}

impl<T: Real> From<Vec<T>> for HostBuf<T> {
    /// Wraps `v` without the pool (tests and one-off buffers).
    fn from(v: Vec<T>) -> Self {
        Self::detached(v)
    }
}
