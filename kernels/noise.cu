// Regenerable Gaussian noise as standalone kernels (the fused DP path regenerates it
// inside prune.cu instead). CPU twin: NoiseKey::add_scaled in src/dp/noise.rs.
#include "common.cuh"
#include "gaussian.cuh"

namespace body {

// y[j] = (float)((accumulate ? y[j] : 0) + a * noise(offset + j)) for j < n, the sum
// and product in f64 (plain, no FMA). One thread per group of eight normals.
template <typename E>
__device__ __forceinline__ void noise_axpy(const dp::NoiseAxpyArgs<E> args) {
  const dp::StreamArgs& s = args.s;
  const unsigned long long offset = args.offset, n = args.n;
  const double a = args.a;
  const int accumulate = args.accumulate;
  E* __restrict__ y = args.y;
  const unsigned long long first = offset >> 3, last = (offset + n + 7) >> 3;
  for (unsigned long long q = first + blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
       q < last; q += (unsigned long long)gridDim.x * blockDim.x) {
    double z[8];
    dp::normal8(s, q, z);
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      unsigned long long e = q * 8 + l;
      if (e < offset || e >= offset + n) continue;
      E* dst = y + (e - offset);
      *dst = dp::from_float<E>(dp::add_scaled(accumulate ? dp::to_float(*dst) : 0.0f, a, z[l]));
    }
  }
}

// Test kernel: the raw ChaCha20 block function, out[16 * b ..] = block(key,
// counter[b], nonce[b]) for b < nblocks. Lets the GPU tests check RFC 8439 directly.
__device__ __forceinline__ void chacha20_blocks_test(const dp::ChachaBlocksArgs a) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= a.nblocks) return;
  unsigned int w[16];
  dp::chacha20_block(a.key, __ldg(&a.counter[b]), __ldg(&a.nonce[b]), w);
#pragma unroll
  for (int i = 0; i < 16; ++i) a.out[16 * b + i] = w[i];
}

}  // namespace body

// Entry points: one line per kernel and element type (a `_bf16` noise_axpy is one
// more line).
extern "C" __global__ void noise_axpy_f32(const dp::NoiseAxpyArgs<float> a) { body::noise_axpy(a); }
extern "C" __global__ void chacha20_blocks_test(const dp::ChachaBlocksArgs a) {
  body::chacha20_blocks_test(a);
}
