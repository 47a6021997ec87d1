// Shared device helpers of the model-layer kernels (norms.cu, rope.cu, attention.cu,
// activations.cu, embedding.cu, tensor.cu, rows.cu).
//
// Every kernel body is a template on the element type T of its buffers and
// computes in float (double where the CPU twin needs it); the `extern "C"`
// entry points instantiate it, `_f32` today. A bf16 entry point needs an
// overload of `to_float` and a specialisation of `from_float` here, and one
// wrapper line per kernel.
#pragma once
#include "common.cuh"

namespace layers {

__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// Row sum over a block; `scratch` holds 32 floats.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  return dp::block_sum(v, scratch);
}

// Row max over a block; `scratch` holds 32 floats; the result is valid in every thread.
__device__ __forceinline__ float row_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = lane < nwarps ? scratch[lane] : -INFINITY;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace layers

// Grid-stride loop over 64-bit indices, so no launch size limits the tensor size.
#define GRID_STRIDE(i, n)                                                           \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long long)gridDim.x * blockDim.x)
