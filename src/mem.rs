//! Host memory accounting: a counting global allocator, so the CPU backend reports
//! the real peak bytes of a training run (install it in a binary with
//! `#[global_allocator] static A: dualpriv::mem::CountingAlloc = dualpriv::mem::CountingAlloc;`).
//!
//! Bytes the CPU backend's buffer pool holds for reuse are allocated but not in
//! use: the pool reports them ([`cache_add`], [`cache_take`]) and the peak counts
//! bytes in use only, the figure comparable with another framework's live tensors.
//!
//! Allocation calls made inside a GEMM ([`gemm_scope`]: `matrixmultiply`'s
//! packing buffer, one per call, and `linalg`'s split of a large product over the
//! rayon threads) are also counted apart ([`gemm_allocation_calls`]), so a
//! steady-state step can show that everything else allocates nothing
//! (`tests/alloc.rs`, `dualpriv bench`'s `allocs/step` columns).
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicUsize = AtomicUsize::new(0);
static CACHED: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);
static GEMM_CALLS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread is inside [`gemm_scope`]. `const`: reading it from the
    /// allocator allocates nothing.
    static IN_GEMM: Cell<bool> = const { Cell::new(false) };
}

/// The system allocator, counting live and peak bytes.
pub struct CountingAlloc;

// SAFETY: forwards every call to `System` unchanged; only counts sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as System.alloc.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as System.dealloc.
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as System.alloc_zeroed.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: same contract as System.realloc.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            CURRENT.fetch_sub(l.size(), Relaxed);
            grow(new);
        }
        q
    }
}

fn grow(n: usize) {
    INSTALLED.store(1, Relaxed);
    CALLS.fetch_add(1, Relaxed);
    // `try_with`: a thread being torn down has no thread-locals left.
    if IN_GEMM.try_with(Cell::get).unwrap_or(false) {
        GEMM_CALLS.fetch_add(1, Relaxed);
    }
    let now = CURRENT.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now.saturating_sub(CACHED.load(Relaxed)), Relaxed);
}

/// Records `n` bytes moved into a reuse cache (still allocated, no longer in use).
pub fn cache_add(n: usize) {
    CACHED.fetch_add(n, Relaxed);
}

/// Records `n` cached bytes handed out again (in use once more).
pub fn cache_take(n: usize) {
    let cached = CACHED.fetch_sub(n, Relaxed).saturating_sub(n);
    PEAK.fetch_max(CURRENT.load(Relaxed).saturating_sub(cached), Relaxed);
}

/// Records `n` cached bytes freed (after the cache released them).
pub fn cache_forget(n: usize) {
    CACHED.fetch_sub(n, Relaxed);
}

/// Heap allocation calls (`alloc`, `alloc_zeroed`, `realloc`) so far.
pub fn allocation_calls() -> usize {
    CALLS.load(Relaxed)
}

/// The allocation calls of [`allocation_calls`] made inside a [`gemm_scope`].
pub fn gemm_allocation_calls() -> usize {
    GEMM_CALLS.load(Relaxed)
}

/// Runs `f`, a GEMM, counting the allocation calls this thread makes inside it as
/// the GEMM's ([`gemm_allocation_calls`]). `linalg` wraps every block of every
/// product in it (the blocks other threads run included), so callers need not.
pub fn gemm_scope<R>(f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_GEMM.with(|g| g.set(false));
        }
    }
    if IN_GEMM.with(|g| g.replace(true)) {
        return f(); // nested: the outer scope resets
    }
    let _reset = Reset;
    f()
}

/// Heap bytes currently in use: allocated and not held by a reuse cache (0 when
/// the allocator is not installed).
pub fn current_bytes() -> usize {
    CURRENT.load(Relaxed).saturating_sub(CACHED.load(Relaxed))
}

/// Heap bytes held by reuse caches (allocated, not in use).
pub fn cached_bytes() -> usize {
    CACHED.load(Relaxed)
}

/// Peak heap bytes in use since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Relaxed)
}

/// Starts a new peak measurement from the current usage.
pub fn reset_peak() {
    PEAK.store(current_bytes(), Relaxed);
}

/// Whether [`CountingAlloc`] is the global allocator of this process.
pub fn tracking() -> bool {
    INSTALLED.load(Relaxed) == 1
}
