// Regenerable Gaussian noise as standalone kernels (the fused DP path regenerates it
// inside prune.cu instead). CPU twin: NoiseKey::add_scaled in src/dp/noise.rs.
#include "gaussian.cuh"

// y[j] = (float)((accumulate ? y[j] : 0) + a * noise(offset + j)) for j < n, the sum
// and product in f64 (plain, no FMA). One thread per group of eight normals.
extern "C" __global__ void noise_axpy_f32(dp::StreamArgs s, unsigned long long offset,
                                          unsigned long long n, double a, int accumulate,
                                          float* __restrict__ y) {
  const unsigned long long first = offset >> 3, last = (offset + n + 7) >> 3;
  for (unsigned long long q = first + blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
       q < last; q += (unsigned long long)gridDim.x * blockDim.x) {
    double z[8];
    dp::normal8(s, q, z);
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      unsigned long long e = q * 8 + l;
      if (e < offset || e >= offset + n) continue;
      float* dst = y + (e - offset);
      *dst = dp::add_scaled(accumulate ? *dst : 0.0f, a, z[l]);
    }
  }
}

// Test kernel: the raw ChaCha20 block function, out[16 * b ..] = block(key,
// counter[b], nonce[b]) for b < nblocks. Lets the GPU tests check RFC 8439 directly.
extern "C" __global__ void chacha20_blocks_test(dp::StreamArgs s,
                                                const unsigned long long* __restrict__ counter,
                                                const unsigned long long* __restrict__ nonce,
                                                int nblocks, unsigned int* __restrict__ out) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= nblocks) return;
  unsigned int w[16];
  dp::chacha20_block(s.key, counter[b], nonce[b], w);
#pragma unroll
  for (int i = 0; i < 16; ++i) out[16 * b + i] = w[i];
}
