//! The CUDA backend's caching memory pool: size classes ([`size_class`]) and
//! [`GpuBuf`]s that return their allocation to the pool when dropped. Why a pool:
//! see the module docs of [`super`].
use std::collections::HashMap;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::Cuda;
use crate::gpu::cuda_err;
use crate::{Error, Result};

#[derive(Default)]
pub(super) struct PoolState {
    free: HashMap<usize, Vec<CudaSlice<f32>>>,
    live_bytes: u64,
    cached_bytes: u64,
    peak_bytes: u64,
    allocations: u64,
}

/// Byte counts of the backend's pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes in buffers currently handed out.
    pub live_bytes: u64,
    /// Bytes held for reuse (not handed out).
    pub cached_bytes: u64,
    /// Largest `live_bytes` since the last [`Cuda::reset_peak`].
    pub peak_bytes: u64,
    /// `cuMemAlloc` calls so far (constant once the memory plan is warm).
    pub allocations: u64,
}

pub(super) struct Pool {
    state: Mutex<PoolState>,
}

impl Pool {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(PoolState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding the lock cannot leave the counters inconsistent
        // enough to matter, so a poisoned lock is recovered.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A device buffer of f32 from the backend's pool. Its allocation is the buffer's
/// size class ([`size_class`]), at least its logical length; [`GpuBuf::view`] and
/// [`GpuBuf::view_mut`] expose exactly the logical `len` values.
pub struct GpuBuf {
    slice: Option<CudaSlice<f32>>,
    pub(super) len: usize,
    pool: Arc<Pool>,
    /// What is known about zeros among the values, for clip factors: `ZEROS_*`.
    /// Any mutable access resets it to unknown.
    pub(super) zeros: AtomicU8,
}

/// [`GpuBuf::zeros`] states: unknown, no value is 0, some value is 0.
pub(super) const ZEROS_UNKNOWN: u8 = 0;
pub(super) const ZEROS_NONE: u8 = 1;
pub(super) const ZEROS_SOME: u8 = 2;

impl GpuBuf {
    fn alloc(&self) -> &CudaSlice<f32> {
        self.slice
            .as_ref()
            .expect("GpuBuf slice present until drop")
    }

    fn bytes(&self) -> u64 {
        (self.alloc().len() * 4) as u64
    }

    /// The buffer's `len` values.
    pub fn view(&self) -> CudaView<'_, f32> {
        self.alloc().slice(0..self.len)
    }

    /// The buffer's `len` values, mutably.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, f32> {
        *self.zeros.get_mut() = ZEROS_UNKNOWN;
        let len = self.len;
        self.slice
            .as_mut()
            .expect("GpuBuf slice present until drop")
            .slice_mut(0..len)
    }
}

/// The allocation size for a request of `n` values: exact up to 4096, above that
/// rounded up to 4 significant bits (at most 1/8 extra). Poisson batches change the
/// batch size every step; the classes let neighbouring sizes share cached buffers
/// instead of growing the cache with every new size.
pub fn size_class(n: usize) -> usize {
    if n <= 4096 {
        return n.max(1);
    }
    let bits = usize::BITS - n.leading_zeros();
    let shift = bits - 4;
    n.div_ceil(1 << shift) << shift
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        let bytes = self.bytes();
        if let Some(s) = self.slice.take() {
            let mut st = self.pool.lock();
            st.live_bytes -= bytes;
            st.cached_bytes += bytes;
            st.free.entry(s.len()).or_default().push(s);
        }
    }
}

impl Cuda {
    /// The pool's byte counts.
    pub fn memory(&self) -> PoolStats {
        let st = self.pool.lock();
        PoolStats {
            live_bytes: st.live_bytes,
            cached_bytes: st.cached_bytes,
            peak_bytes: st.peak_bytes,
            allocations: st.allocations,
        }
    }

    /// Starts a new peak measurement at the current live bytes.
    pub fn reset_peak(&self) {
        let mut st = self.pool.lock();
        st.peak_bytes = st.live_bytes;
    }

    /// Frees every cached (not live) allocation back to the driver.
    pub fn trim(&self) {
        let mut st = self.pool.lock();
        st.free.clear();
        st.cached_bytes = 0;
    }

    /// A pooled buffer of `n` values with unspecified contents.
    pub(super) fn take(&self, n: usize) -> Result<GpuBuf> {
        let size = size_class(n);
        let bytes = (size * 4) as u64;
        let cached = {
            let mut st = self.pool.lock();
            let s = st.free.get_mut(&size).and_then(|v| v.pop());
            if s.is_some() {
                st.cached_bytes -= bytes;
            }
            s
        };
        let slice = match cached {
            Some(s) => s,
            None => {
                self.pool.lock().allocations += 1;
                // SAFETY: every caller writes the buffer before reading it, or zeroes it.
                let fresh = unsafe { self.gpu.stream().alloc::<f32>(size) };
                match fresh {
                    Ok(s) => s,
                    Err(_) => {
                        // Give the cache back to the driver and try once more.
                        self.trim();
                        // SAFETY: as above.
                        unsafe { self.gpu.stream().alloc::<f32>(size) }
                            .map_err(|e| self.oom(size, e))?
                    }
                }
            }
        };
        let mut st = self.pool.lock();
        st.live_bytes += bytes;
        st.peak_bytes = st.peak_bytes.max(st.live_bytes);
        drop(st);
        Ok(GpuBuf {
            slice: Some(slice),
            len: n,
            pool: self.pool.clone(),
            zeros: AtomicU8::new(ZEROS_UNKNOWN),
        })
    }

    fn oom(&self, values: usize, e: impl std::fmt::Debug) -> Error {
        let free = self.gpu.mem_info().map(|(f, _)| f).unwrap_or(0);
        Error::OutOfMemory(format!(
            "the GPU could not allocate {} MiB ({e:?}; {} MiB free, {} MiB live in dualpriv's pool); \
             use a smaller micro-batch (activations scale with it), fewer kept visual tokens, or a smaller model",
            (values * 4) >> 20,
            free >> 20,
            self.memory().live_bytes >> 20
        ))
    }

    /// Zeroes a buffer's `len` values.
    pub(super) fn memset0(&self, b: &mut GpuBuf) -> Result<()> {
        self.gpu
            .stream()
            .memset_zeros(&mut b.view_mut())
            .map_err(cuda_err("cuMemsetD8"))
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_requests_with_bounded_waste() {
        for n in (0..200_000usize).chain([1 << 30, (1 << 30) + 1, 3_000_000_007]) {
            let c = size_class(n);
            assert!(c >= n.max(1), "{n} -> {c}");
            assert!(c as f64 <= n.max(1) as f64 * 1.125 + 1.0, "{n} -> {c}");
        }
        assert_eq!(size_class(4096), 4096);
        assert_eq!(size_class(4097), 4608);
        // A Poisson batch of 256 ± 50 examples of a 16 × 128 activation needs only a
        // handful of distinct allocations.
        let classes: std::collections::BTreeSet<usize> =
            (206..=306).map(|b| size_class(b * 16 * 128)).collect();
        assert!(classes.len() <= 6, "{classes:?}");
    }
}
