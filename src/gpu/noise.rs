//! Launcher for `kernels/noise.cu`: ChaCha20 / Philox Gaussian noise written or
//! added into a buffer. CPU twin: [`crate::dp::noise::NoiseKey::add_scaled`].
use crate::gpu::kernels::noise as K;
use cudarc::driver::{DevicePtrMut, PushKernelArg};

use super::abi::{self, ChachaBlocksArgs, NoiseAxpyArgs, StreamArgs};
use super::{dptr, dptr_mut, grid_for, launch, launch_cfg, Gpu};
use crate::dp::noise::NoiseKey;
use crate::{Error, Result};

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
    let args = NoiseAxpyArgs {
        s: StreamArgs::new(&key),
        offset,
        n,
        a,
        y: dptr_mut(y, gpu.stream()),
        accumulate: accumulate as i32,
        pad: 0,
    };
    let f = gpu.func(K::NOISE_AXPY_F32)?;
    let mut l = gpu.stream().launch_builder(&f);
    l.arg(&args);
    let threads = abi::NOISE_AXPY_THREADS;
    let groups = (n as usize).div_ceil(abi::NOISE_GROUP as usize) + 1;
    let grid = grid_for(groups, threads, gpu.sm_count() * 8);
    // SAFETY: the kernel takes this struct (abi.h) and writes y[0..n).
    unsafe {
        launch(
            &mut l,
            launch_cfg((grid, 1, 1), threads, 0),
            K::NOISE_AXPY_F32,
        )
    }
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
    let dc = gpu.upload(counter)?;
    let dn = gpu.upload(nonce)?;
    let mut out = gpu.zeros::<u32>(16 * nb)?;
    let st = gpu.stream();
    let args = ChachaBlocksArgs {
        key: *key,
        counter: dptr(&dc, st),
        nonce: dptr(&dn, st),
        out: dptr_mut(&mut out, st),
        nblocks,
        pad: 0,
    };
    let f = gpu.func(K::CHACHA20_BLOCKS_TEST)?;
    let mut l = st.launch_builder(&f);
    l.arg(&args);
    let threads = abi::CHACHA_TEST_THREADS;
    let grid = (nb as u32).div_ceil(threads);
    // SAFETY: the kernel takes this struct (abi.h); out holds 16 words per block.
    unsafe {
        launch(
            &mut l,
            launch_cfg((grid, 1, 1), threads, 0),
            K::CHACHA20_BLOCKS_TEST,
        )
    }?;
    let w = gpu.download(&out)?;
    Ok(w.chunks_exact(16)
        .map(|c| c.try_into().expect("16 words"))
        .collect())
}
