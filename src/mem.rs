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

/// A shared, reference-counted value, like [`std::sync::Arc`], whose allocation is
/// recycled: when the last reference drops, the value is dropped and its block
/// kept for the next [`Shared::new`] of the same layout, so a steady-state
/// training step boxes its shared activations without allocating (there were
/// ~54 `Arc` boxes per tiny step, two thirds of its allocations).
///
/// The kept blocks are bounded by the most values of one layout alive at once
/// (a few dozen per step); they are reported as cached bytes ([`cache_add`]).
pub struct Shared<T> {
    ptr: std::ptr::NonNull<SharedInner<T>>,
    _owns: std::marker::PhantomData<SharedInner<T>>,
}

struct SharedInner<T> {
    count: AtomicUsize,
    value: T,
}

// SAFETY: as `Arc`: the value is shared between threads (Sync) and may be dropped
// on any of them (Send).
unsafe impl<T: Send + Sync> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for Shared<T> {}

/// Kept blocks, by layout (addresses as `usize`, so the lists are `Send`).
static FREE_BLOCKS: std::sync::Mutex<Vec<(Layout, Vec<usize>)>> = std::sync::Mutex::new(Vec::new());

impl<T> Shared<T> {
    /// Shares `value` (count 1), in a kept block when one of its layout is free.
    pub fn new(value: T) -> Self {
        let l = Layout::new::<SharedInner<T>>();
        let kept = {
            let mut free = FREE_BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
            free.iter_mut()
                .find(|(fl, _)| *fl == l)
                .and_then(|(_, v)| v.pop())
        };
        let raw = match kept {
            Some(a) => {
                cache_take(l.size());
                a as *mut u8
            }
            // SAFETY: `l` has a non-zero size (it holds the counter).
            None => unsafe { std::alloc::alloc(l) },
        };
        let Some(ptr) = std::ptr::NonNull::new(raw.cast::<SharedInner<T>>()) else {
            std::alloc::handle_alloc_error(l)
        };
        let inner = SharedInner {
            count: AtomicUsize::new(1),
            value,
        };
        // SAFETY: `ptr` is a fresh or kept block of this layout, not in use.
        unsafe { ptr.as_ptr().write(inner) };
        Self {
            ptr,
            _owns: std::marker::PhantomData,
        }
    }

    fn inner(&self) -> &SharedInner<T> {
        // SAFETY: the block stays valid while any reference (this one) lives.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        // Relaxed, as `Arc`: a new reference is made from an existing one.
        let old = self.inner().count.fetch_add(1, Relaxed);
        if old > isize::MAX as usize {
            std::process::abort();
        }
        Self {
            ptr: self.ptr,
            _owns: std::marker::PhantomData,
        }
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner().value
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        use std::sync::atomic::{fence, Ordering};
        // Release/Acquire, as `Arc`: every use through another reference happens
        // before the value is dropped.
        if self.inner().count.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        fence(Ordering::Acquire);
        let l = Layout::new::<SharedInner<T>>();
        // SAFETY: this was the last reference: nobody else reads the value.
        unsafe { std::ptr::drop_in_place(&mut (*self.ptr.as_ptr()).value) };
        cache_add(l.size());
        let mut free = FREE_BLOCKS.lock().unwrap_or_else(|e| e.into_inner());
        let a = self.ptr.as_ptr() as usize;
        match free.iter_mut().find(|(fl, _)| *fl == l) {
            Some((_, v)) => v.push(a),
            None => free.push((l, vec![a])),
        }
    }
}

impl<T: PartialEq> PartialEq for Shared<T> {
    /// Compares the values, as `Arc` does.
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// A `Vec<T>` whose buffer goes back to a process-wide free list when dropped
/// (its values dropped first), to be handed out again by the next [`Recycled::with_capacity`]
/// (or `filled`, `from_slice`, `zeros`) of a type with T's size and alignment: the
/// host-side bookkeeping of a training step (token ids, norm accumulators, loss
/// weights, downloads, clip factors, token-selection plans, micro-batch lists,
/// layer caches) reuses its buffers instead of allocating them each step.
///
/// Per element layout, at most [`RECYCLED_KEEP`] buffers and [`RECYCLED_KEEP_BYTES`]
/// are kept, none over [`RECYCLED_MAX_BYTES`]; a buffer that does not fit is freed.
/// Kept buffers are reported as cached bytes ([`cache_add`]). Derefs to the
/// `Vec`, so it is used like one; a reused buffer starts empty (length 0).
pub struct Recycled<T> {
    v: Vec<T>,
}

/// Buffers kept per element layout by [`Recycled`].
pub const RECYCLED_KEEP: usize = 64;

/// Largest buffer [`Recycled`] keeps, in bytes: a larger one is freed on drop
/// rather than held for the rest of the process.
pub const RECYCLED_MAX_BYTES: usize = 16 << 20;

/// Bytes [`Recycled`] keeps per element layout, at most (a burst of one-off
/// buffers, such as a checkpoint's downloads, must not stay held).
pub const RECYCLED_KEEP_BYTES: usize = 64 << 20;

/// Kept buffers of one element layout: the layout, and (address, capacity in
/// elements) of each.
type KeptVecs = (Layout, Vec<(usize, usize)>);

/// Kept buffers by element layout.
static FREE_VECS: std::sync::Mutex<Vec<KeptVecs>> = std::sync::Mutex::new(Vec::new());

impl<T> Recycled<T> {
    /// An empty vector with room for `n` values: a kept buffer (the smallest large
    /// enough) when there is one.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            v: Self::kept_buffer(n).unwrap_or_else(|| Vec::with_capacity(n)),
        }
    }

    /// The smallest kept buffer with room for `n` values, emptied, if any.
    fn kept_buffer(n: usize) -> Option<Vec<T>> {
        let l = Layout::new::<T>();
        if l.size() == 0 || n == 0 {
            return None;
        }
        let (ptr, cap) = {
            let mut free = FREE_VECS.lock().unwrap_or_else(|e| e.into_inner());
            let (_, v) = free.iter_mut().find(|(fl, _)| *fl == l)?;
            // Best fit: a small request must not take the buffer a large one
            // would reuse, or the large one allocates every step.
            let at = (0..v.len())
                .filter(|&i| v[i].1 >= n)
                .min_by_key(|&i| v[i].1)?;
            v.swap_remove(at)
        };
        cache_take(cap * l.size());
        // SAFETY: the buffer was a Vec's of `cap` values of a type with T's size
        // and alignment (so the same allocation layout), emptied and given up by
        // `Drop` below and owned by nobody since; length 0 needs no initialised
        // values.
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, 0, cap) })
    }

    /// `n` copies of `value`.
    pub fn filled(n: usize, value: T) -> Self
    where
        T: Clone,
    {
        let mut r = Self::with_capacity(n);
        r.v.resize(n, value);
        r
    }

    /// The plain `Vec`, for a caller that keeps it (its buffer is then not recycled).
    pub fn into_vec(mut self) -> Vec<T> {
        std::mem::take(&mut self.v)
    }

    /// A copy of `values`.
    pub fn from_slice(values: &[T]) -> Self
    where
        T: Clone,
    {
        let mut r = Self::with_capacity(values.len());
        r.v.extend_from_slice(values);
        r
    }
}

impl<T> Drop for Recycled<T> {
    fn drop(&mut self) {
        let l = Layout::new::<T>();
        let mut v = std::mem::take(&mut self.v);
        v.clear(); // the values are dropped here, the buffer kept
        let size = v.capacity() * l.size();
        if size == 0 || size > RECYCLED_MAX_BYTES {
            return; // `v` is freed
        }
        let mut free = FREE_VECS.lock().unwrap_or_else(|e| e.into_inner());
        let i = match free.iter().position(|(fl, _)| *fl == l) {
            Some(i) => i,
            None => {
                free.push((l, Vec::with_capacity(RECYCLED_KEEP)));
                free.len() - 1
            }
        };
        let list = &mut free[i].1;
        let kept: usize = list.iter().map(|&(_, cap)| cap * l.size()).sum();
        if list.len() >= RECYCLED_KEEP || kept + size > RECYCLED_KEEP_BYTES {
            return; // `v` is freed
        }
        list.push((v.as_mut_ptr() as usize, v.capacity()));
        std::mem::forget(v);
        cache_add(size);
    }
}

impl Recycled<f32> {
    /// `n` zeros: a kept buffer zero-filled, or else fresh zeroed memory (whose
    /// pages the OS zeroes lazily, so a large buffer that a parallel loop then
    /// overwrites is not first zeroed on one thread).
    pub fn zeros(n: usize) -> Self {
        let v = match Self::kept_buffer(n) {
            Some(mut v) => {
                v.resize(n, 0.0);
                v
            }
            None => vec![0.0; n],
        };
        Self { v }
    }
}

/// Buffers kept for element layout `l`, and their bytes (for the tests).
#[cfg(test)]
fn kept(l: Layout) -> (usize, usize) {
    let free = FREE_VECS.lock().unwrap_or_else(|e| e.into_inner());
    free.iter()
        .find(|(fl, _)| *fl == l)
        .map_or((0, 0), |(_, v)| {
            (v.len(), v.iter().map(|&(_, cap)| cap * l.size()).sum())
        })
}

impl<T> std::ops::Deref for Recycled<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.v
    }
}

impl<T> std::ops::DerefMut for Recycled<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.v
    }
}

impl<T> Default for Recycled<T> {
    fn default() -> Self {
        Self { v: Vec::new() }
    }
}

impl<T: Clone> Clone for Recycled<T> {
    fn clone(&self) -> Self {
        Self::from_slice(&self.v)
    }
}

impl<T: PartialEq> PartialEq for Recycled<T> {
    fn eq(&self, other: &Self) -> bool {
        self.v == other.v
    }
}

impl<T: Eq> Eq for Recycled<T> {}

impl<T: PartialEq, const N: usize> PartialEq<[T; N]> for Recycled<T> {
    fn eq(&self, other: &[T; N]) -> bool {
        self.v == other
    }
}

impl<T: PartialEq> PartialEq<[T]> for Recycled<T> {
    fn eq(&self, other: &[T]) -> bool {
        self.v == other
    }
}

impl<T: PartialEq> PartialEq<Vec<T>> for Recycled<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        self.v == *other
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Recycled<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.v.fmt(f)
    }
}

impl<'a, T> IntoIterator for &'a Recycled<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.v.iter()
    }
}

impl<T> From<Vec<T>> for Recycled<T> {
    /// Adopts `v`'s buffer (recycled when this drops).
    fn from(v: Vec<T>) -> Self {
        Self { v }
    }
}

impl<T> FromIterator<T> for Recycled<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let it = iter.into_iter();
        let mut r = Self::with_capacity(it.size_hint().0);
        r.v.extend(it);
        r
    }
}

#[cfg(test)]
mod shared_tests {
    use super::Shared;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    static DROPS: AtomicUsize = AtomicUsize::new(0);

    /// Counts its drops; its block (`SharedInner<Probe>`, 240 bytes) has a layout
    /// nothing else in this binary shares, so no test running meanwhile takes it.
    struct Probe([u64; 29]);
    impl Drop for Probe {
        fn drop(&mut self) {
            DROPS.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn drops_once_after_the_last_reference_on_any_thread_and_reuses_the_block() {
        let a = Shared::new(Probe([7; 29]));
        let b = a.clone();
        let c = b.clone();
        let addr = &*a as *const Probe as usize;
        std::thread::spawn(move || drop(c)).join().unwrap();
        drop(a);
        assert_eq!(DROPS.load(SeqCst), 0);
        assert_eq!(b.0, [7; 29]);
        drop(b);
        assert_eq!(DROPS.load(SeqCst), 1);
        // The block is kept and handed to the next value of its layout.
        let d = Shared::new(Probe([9; 29]));
        assert_eq!(&*d as *const Probe as usize, addr);
        assert_eq!(d.0, [9; 29]);
        drop(d);
        assert_eq!(DROPS.load(SeqCst), 2);
    }

    #[test]
    fn recycled_buffers_are_reused_and_hold_what_was_put_in() {
        use super::Recycled;
        // A layout nothing else in this binary recycles: ([u8; 24], align 1).
        type P = [u8; 24];
        let a = Recycled::<P>::filled(10, [3; 24]);
        let addr = a.as_ptr() as usize;
        drop(a);
        // A request the kept buffer fits gets it (length 0, then filled anew).
        let b = Recycled::<P>::from_slice(&[[1; 24]; 7]);
        assert_eq!(b.as_ptr() as usize, addr);
        assert_eq!(b.len(), 7);
        assert!(b.iter().all(|x| *x == [1; 24]));
        // One larger than any kept buffer is allocated fresh.
        let c = Recycled::<P>::filled(11, [5; 24]);
        assert_ne!(c.as_ptr() as usize, addr);
        assert_eq!(c.iter().collect::<Vec<_>>().len(), 11);
        let d: Recycled<P> = (0..3u8).map(|i| [i; 24]).collect();
        assert_eq!(d[2], [2; 24]);
        assert_eq!(Recycled::<P>::default().capacity(), 0);
        // Values with drop glue are dropped when the vector is, not recycled.
        static COUNTED: AtomicUsize = AtomicUsize::new(0);
        struct Counted(#[allow(dead_code)] [u16; 9]);
        impl Drop for Counted {
            fn drop(&mut self) {
                COUNTED.fetch_add(1, SeqCst);
            }
        }
        let mut e: Recycled<Counted> = Recycled::with_capacity(2);
        e.push(Counted([1; 9]));
        e.push(Counted([2; 9]));
        drop(e);
        assert_eq!(COUNTED.load(SeqCst), 2);
    }

    #[test]
    fn recycled_keeps_no_buffer_over_its_caps() {
        use super::{kept, Recycled, RECYCLED_KEEP_BYTES, RECYCLED_MAX_BYTES};
        use std::alloc::Layout;
        // A layout nothing else in this binary recycles: ([u8; 4093], align 1).
        type Q = [u8; 4093];
        let l = Layout::new::<Q>();
        let fits = RECYCLED_MAX_BYTES / 4093;
        let over = Recycled::<Q>::with_capacity(fits + 1);
        drop(over);
        assert_eq!(kept(l), (0, 0), "a buffer over RECYCLED_MAX_BYTES was kept");
        // Buffers at the size cap are kept until RECYCLED_KEEP_BYTES is reached.
        let all: Vec<_> = (0..RECYCLED_KEEP_BYTES / RECYCLED_MAX_BYTES + 1)
            .map(|_| Recycled::<Q>::with_capacity(fits))
            .collect();
        drop(all);
        let (n, bytes) = kept(l);
        assert_eq!(n, RECYCLED_KEEP_BYTES / RECYCLED_MAX_BYTES);
        assert!(bytes <= RECYCLED_KEEP_BYTES);
        // They are handed out again (so the count drops).
        let again = Recycled::<Q>::with_capacity(1);
        assert_eq!(again.capacity(), fits);
        assert_eq!(kept(l).0, n - 1);
    }

    #[test]
    fn recycled_zeros_are_zero_whether_reused_or_fresh() {
        use super::Recycled;
        let mut a = Recycled::<f32>::zeros(1000);
        assert!(a.iter().all(|&x| x == 0.0));
        a.iter_mut().for_each(|x| *x = 7.0);
        drop(a);
        // Whichever kept f32 buffer this gets (other tests recycle f32 too), it
        // holds zeros and only zeros.
        let b = Recycled::<f32>::zeros(999);
        assert_eq!(b.len(), 999);
        assert!(b.iter().all(|&x| x == 0.0));
    }
}
