// Regenerable Gaussian noise as standalone kernels (the fused DP path regenerates it
// inside noise_prune.cu instead). CPU twin: src/dp/noise.rs.
#include "philox.cuh"

// y[j] = a * noise(offset + j) + (accumulate ? y[j] : 0), for j < n.
// Each thread handles whole Philox groups of four, so one call per group.
extern "C" __global__ void noise_axpy_f32(unsigned long long seed, unsigned int tensor_id,
                                          unsigned int step, unsigned long long offset,
                                          unsigned long long n, float a, int accumulate,
                                          float* __restrict__ y) {
  const unsigned long long first = offset >> 2, last = (offset + n + 3) >> 2;
  for (unsigned long long q = first + blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
       q < last; q += (unsigned long long)gridDim.x * blockDim.x) {
    float4 z = dp::normal4(seed, tensor_id, step, q);
    const float zs[4] = {z.x, z.y, z.z, z.w};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      unsigned long long e = q * 4 + l;
      if (e < offset || e >= offset + n) continue;
      float* dst = y + (e - offset);
      *dst = accumulate ? __fmaf_rn(a, zs[l], *dst) : a * zs[l];
    }
  }
}
