// Shared helpers for all kernels.
#pragma once
#include <stdint.h>

namespace dp {

// Element conversions: the kernels compute in f32 (and f64) and load and store their
// element type E. For E = float both are the identity, so the _f32 instantiations are
// the plain f32 code.
template <typename E>
__device__ __forceinline__ float to_float(E x) {
  return static_cast<float>(x);
}
template <typename E>
__device__ __forceinline__ E from_float(float x) {
  return static_cast<E>(x);
}

// Sum over a warp; every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024).
// `scratch` holds 32 values; the result is valid in every thread.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = lane < nwarps ? scratch[lane] : T(0);
  return warp_sum(v);
}

}  // namespace dp
