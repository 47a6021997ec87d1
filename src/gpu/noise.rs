//! Launcher for `kernels/noise.cu`: ChaCha20 / Philox Gaussian noise written or
//! added into a buffer. CPU twin: [`crate::dp::noise::NoiseKey::add_scaled`].
use crate::gpu::kernels::noise as K;
use cudarc::driver::{DevicePtrMut, DeviceRepr, PushKernelArg};

use super::{dptr_mut, grid_for, launch, launch_cfg, Gpu};
use crate::dp::noise::NoiseKey;
use crate::{Error, Result};

/// One noise stream as the kernels take it. Mirrors `dp::StreamArgs` in
/// `kernels/gaussian.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamArgs {
    key: [u32; 8],
    rng: u32,
    tensor_id: u32,
    step: u32,
    pad: u32,
}

const _: () = assert!(std::mem::size_of::<StreamArgs>() == 48);
const _: () = assert!(std::mem::align_of::<StreamArgs>() == 4);
const _: () = assert!(std::mem::offset_of!(StreamArgs, rng) == 32);
const _: () = assert!(std::mem::offset_of!(StreamArgs, tensor_id) == 36);
const _: () = assert!(std::mem::offset_of!(StreamArgs, step) == 40);

// SAFETY: a plain #[repr(C)] struct of u32s, mirrored in the kernel.
unsafe impl DeviceRepr for StreamArgs {}

impl StreamArgs {
    pub(crate) fn new(key: &NoiseKey) -> Self {
        Self {
            key: key.stream.key,
            rng: key.stream.rng.code(),
            tensor_id: key.tensor_id,
            step: key.step,
            pad: 0,
        }
    }
}

/// `y = f32(a·noise(offset ..))`, or with `accumulate` `y = f32(f64(y) + a·noise(..))`:
/// the same values as [`NoiseKey::add_scaled`] (on zeros, without `accumulate`).
pub fn noise_axpy<Y: DevicePtrMut<f32>>(
    gpu: &Gpu,
    key: NoiseKey,
    offset: u64,
    a: f64,
    accumulate: bool,
    y: &mut Y,
) -> Result<()> {
    let n = y.len() as u64;
    if n == 0 {
        return Ok(());
    }
    if offset.checked_add(n + 7).is_none() {
        return Err(Error::Shape(format!(
            "noise offset {offset} + length {n} overflows the 64-bit index"
        )));
    }
    let yp = dptr_mut(y, gpu.stream());
    let acc = accumulate as i32;
    let args = StreamArgs::new(&key);
    let f = gpu.func(K::NOISE_AXPY_F32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&args).arg(&offset).arg(&n).arg(&a).arg(&acc).arg(&yp);
    let grid = grid_for((n as usize).div_ceil(8) + 1, 256, gpu.sm_count() * 8);
    // SAFETY: argument types mirror the kernel; the kernel writes y[0..n).
    unsafe { launch(&mut l, launch_cfg((grid, 1, 1), 256, 0), K::NOISE_AXPY_F32) }
}

/// Runs the raw ChaCha20 block function on the device (a test hook for the RFC 8439
/// vectors): block b is `chacha20_block(key, counter[b], nonce[b])`.
pub fn chacha20_blocks(
    gpu: &Gpu,
    key: &[u32; 8],
    counter: &[u64],
    nonce: &[u64],
) -> Result<Vec<[u32; 16]>> {
    if counter.len() != nonce.len() {
        return Err(Error::Shape(format!(
            "{} counters but {} nonces",
            counter.len(),
            nonce.len()
        )));
    }
    let nb = counter.len();
    if nb == 0 {
        return Ok(Vec::new());
    }
    let nblocks = i32::try_from(nb).map_err(|_| Error::Shape("too many blocks".into()))?;
    let args = StreamArgs {
        key: *key,
        rng: 0,
        tensor_id: 0,
        step: 0,
        pad: 0,
    };
    let dc = gpu.upload(counter)?;
    let dn = gpu.upload(nonce)?;
    let mut out = gpu.zeros::<u32>(16 * nb)?;
    let f = gpu.func(K::CHACHA20_BLOCKS_TEST)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&args).arg(&dc).arg(&dn).arg(&nblocks).arg(&mut out);
    let grid = (nb as u32).div_ceil(64);
    // SAFETY: argument types mirror the kernel; out holds 16 words per block.
    unsafe {
        launch(
            &mut l,
            launch_cfg((grid, 1, 1), 64, 0),
            K::CHACHA20_BLOCKS_TEST,
        )
    }?;
    let w = gpu.download(&out)?;
    Ok(w.chunks_exact(16)
        .map(|c| c.try_into().expect("16 words"))
        .collect())
}
