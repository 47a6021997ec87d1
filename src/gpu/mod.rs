//! The GPU runtime: one context and stream, the embedded kernel fatbins loaded once
//! with their functions cached, and cuBLAS with row-major helpers.
//!
//! cuBLAS has two handles on the one stream: the model handle, whose math mode
//! [`Gpu::set_tf32`] switches, and the DP handle, fixed at strict FP32 for the GEMMs
//! that form per-example norms and clipped sums ([`blas::Precision`]).
//!
//! cudarc panics on any driver call when libcuda is absent, so [`Gpu::new`] checks
//! `is_culib_present()` first and returns [`Error::NoCudaDriver`] instead.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchArgs, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::{Error, Result};

/// The cudarc version these APIs are built on, for callers that bring their own buffers.
pub use cudarc;

pub mod blas;
pub mod clip;
pub mod noise;
pub mod noise_prune;
pub mod tokens;

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Converts any displayable CUDA/cuBLAS error into [`Error::Cuda`] with context.
pub(crate) fn cuda_err<E: std::fmt::Debug>(context: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Cuda {
        context: context.to_string(),
        message: format!("{e:?}"),
    }
}

/// True when the CUDA driver library can be loaded. Calling any cudarc driver
/// function without it panics, so everything checks this first.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda; no driver state is touched.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One GPU: context, stream, cuBLAS handles and the loaded kernel modules.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    blas_strict: CudaBlas,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    sm_count: u32,
    funcs: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl Gpu {
    /// Opens device 0. Fails with [`Error::NoCudaDriver`] when no driver is present.
    pub fn new() -> Result<Self> {
        Self::with_device(0)
    }

    /// Opens the device with the given ordinal and loads every embedded fatbin.
    pub fn with_device(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::NoCudaDriver);
        }
        // SAFETY: as above, only a dlopen probe.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::NoCublas);
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("opening the CUDA device"))?;
        // One stream for everything: per-buffer event tracking only costs time.
        // SAFETY: all work of this Gpu is issued on the single stream below.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda_err("reading the SM count"))? as u32;
        let blas = CudaBlas::new(stream.clone()).map_err(cuda_err("creating cuBLAS handle"))?;
        let blas_strict =
            CudaBlas::new(stream.clone()).map_err(cuda_err("creating cuBLAS handle"))?;
        set_math_mode(&blas_strict, STRICT_MATH)?;
        let mut modules = HashMap::new();
        for (stem, bytes) in fatbins::FATBINS {
            let m = ctx
                .load_module(Ptx::from_binary(bytes.to_vec()))
                .map_err(cuda_err(&format!("loading kernels/{stem}.cu")))?;
            modules.insert(*stem, m);
        }
        Ok(Self {
            ctx,
            stream,
            blas,
            blas_strict,
            modules,
            sm_count,
            funcs: Mutex::new(HashMap::new()),
        })
    }

    /// The device name, e.g. "NVIDIA H200".
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(cuda_err("reading device name"))
    }

    /// Number of streaming multiprocessors, for sizing grid-stride launches.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The stream all work is issued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The model's cuBLAS handle bound to [`Self::stream`]: TF32 when
    /// [`Self::set_tf32`] turned it on.
    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// The cuBLAS handle for `precision`, both bound to [`Self::stream`].
    pub fn blas_for(&self, precision: blas::Precision) -> &CudaBlas {
        match precision {
            blas::Precision::Model => &self.blas,
            blas::Precision::Strict => &self.blas_strict,
        }
    }

    /// Kernel `name` from `kernels/<module>.cu`, loaded on first use and cached.
    pub fn func(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut funcs = self.funcs.lock().expect("kernel cache lock poisoned");
        if let Some(f) = funcs.get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = self.modules.get(module).ok_or_else(|| Error::Cuda {
            context: format!("looking up kernels/{module}.cu"),
            message: "module not embedded in this build".into(),
        })?;
        let f = m
            .load_function(name)
            .map_err(cuda_err(&format!("loading kernel {name}")))?;
        funcs.insert((module, name), f.clone());
        Ok(f)
    }

    /// Copies a host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(cuda_err("host-to-device copy"))
    }

    /// Copies a device buffer (or view) back to the host. Synchronises the stream.
    pub fn download<T: DeviceRepr, S: DevicePtr<T>>(&self, dev: &S) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(cuda_err("device-to-host copy"))
    }

    /// A zero-filled device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n)
            .map_err(cuda_err(&format!("allocating {n} elements")))
    }

    /// Makes this GPU's context current on the calling thread (cuBLAS calls do not
    /// do it themselves; kernel launches and copies do).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("binding the CUDA context"))
    }

    /// Waits for all queued work.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("stream sync"))
    }

    /// (free, total) device memory in bytes, from `cuMemGetInfo`.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(cuda_err("cuMemGetInfo"))
    }

    /// Device time of the work `f` queues, in milliseconds, from CUDA events.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .stream
            .record_event(flags)
            .map_err(cuda_err("recording an event"))?;
        f()?;
        let end = self
            .stream
            .record_event(flags)
            .map_err(cuda_err("recording an event"))?;
        start
            .elapsed_ms(&end)
            .map_err(cuda_err("reading event time"))
    }

    /// Switches the model handle's f32 GEMMs to TF32 tensor cores (`true`) or strict
    /// FP32. The DP handle ([`blas::Precision::Strict`]) stays strict either way.
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        let mode = if on {
            blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        set_math_mode(&self.blas, mode)
    }
}

/// The DP handle's math mode: PEDANTIC, not DEFAULT (why: [`blas`] module docs).
const STRICT_MATH: blas_sys::cublasMath_t = blas_sys::cublasMath_t::CUBLAS_PEDANTIC_MATH;

fn set_math_mode(blas: &CudaBlas, mode: blas_sys::cublasMath_t) -> Result<()> {
    // SAFETY: the handle is valid for the life of `blas`.
    let st = unsafe { blas_sys::cublasSetMathMode(*blas.handle(), mode) };
    if st == blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda {
            context: format!("cublasSetMathMode({mode:?})"),
            message: format!("{st:?}"),
        })
    }
}

/// Whether `DUALPRIV_REQUIRE_GPU=1` is set: then the `*_or_skip` helpers fail
/// instead of skipping when there is no CUDA driver (for GPU CI).
pub fn gpu_required() -> bool {
    std::env::var("DUALPRIV_REQUIRE_GPU").is_ok_and(|v| v.trim() == "1")
}

/// For GPU tests without a driver: prints `skipped: no CUDA driver` and returns,
/// unless `DUALPRIV_REQUIRE_GPU=1`, where a missing GPU fails the test (so a CI run
/// meant for the GPU cannot pass by skipping everything).
pub fn skip_without_driver(test: &str) {
    if gpu_required() {
        panic!("{test}: DUALPRIV_REQUIRE_GPU=1 but there is no CUDA driver");
    }
    println!("{test}: skipped: no CUDA driver");
}

/// For tests: a [`Gpu`], or `None` after [`skip_without_driver`] when this machine
/// has none. Any other failure to open the GPU is a real error.
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::new() {
        Ok(g) => Some(g),
        Err(Error::NoCudaDriver) => {
            skip_without_driver(test);
            None
        }
        Err(e) => panic!("{test}: a CUDA driver is present but the GPU failed to open: {e}"),
    }
}

/// The raw device address of a buffer or view, for kernels that take pointers in
/// structs or need views of any kind. Event tracking is disabled on the one stream,
/// so dropping the returned guard at once is sound.
pub(crate) fn dptr<T, S: DevicePtr<T>>(s: &S, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Mutable counterpart of [`dptr`].
pub(crate) fn dptr_mut<T, S: DevicePtrMut<T>>(s: &mut S, stream: &CudaStream) -> u64 {
    s.device_ptr_mut(stream).0
}

/// Launches a prepared kernel and maps the driver error to [`Error::Cuda`].
///
/// # Safety
/// The pushed arguments must match the kernel's parameter list, and every buffer
/// the kernel touches under `cfg` must be large enough.
pub(crate) unsafe fn launch(l: &mut LaunchArgs<'_>, cfg: LaunchConfig, name: &str) -> Result<()> {
    // SAFETY: forwarded to the caller.
    unsafe { l.launch(cfg) }.map(|_| ()).map_err(cuda_err(name))
}

/// A launch configuration with a 1-D block.
pub(crate) fn launch_cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Grid size for a grid-stride kernel over `n` items with `threads` per block,
/// capped so small inputs do not launch empty blocks and huge ones stay resident.
pub(crate) fn grid_for(n: usize, threads: u32, cap: u32) -> u32 {
    (n.div_ceil(threads as usize).max(1) as u64).min(cap as u64) as u32
}
