// Philox4x32-10 counter-based RNG and the regenerable Gaussian noise built on it.
// The CPU twin is src/dp/noise.rs; both must produce the same normals for the same
// (seed, tensor_id, step, i), so any kernel on any grid can regenerate noise(i)
// and the noise tensor is never stored.
#pragma once
#include <stdint.h>

namespace dp {

struct u32x4 { uint32_t x, y, z, w; };

__device__ __forceinline__ u32x4 philox4x32_10(u32x4 c, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
    uint32_t hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
    c = u32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += W0;
    k1 += W1;
  }
  return c;
}

// Uniform in (0, 1]: 32 random bits scaled so 0 is never produced (log(0) = -inf).
__device__ __forceinline__ double uniform_open0(uint32_t x) {
  return ((double)x + 1.0) * (1.0 / 4294967296.0);
}

// The four standard normals of group g = i / 4, i.e. elements 4g .. 4g+3.
// Box-Muller runs in double so the rounded f32 results match the CPU bit for bit
// (f32 transcendentals differ by an ulp between libm and CUDA).
__device__ __forceinline__ float4 normal4(uint64_t seed, uint32_t tensor_id, uint32_t step,
                                          uint64_t group) {
  u32x4 ctr{(uint32_t)group, (uint32_t)(group >> 32), tensor_id, step};
  u32x4 r = philox4x32_10(ctr, (uint32_t)seed, (uint32_t)(seed >> 32));
  const double TWO_PI = 6.283185307179586476925286766559;
  double r0 = sqrt(-2.0 * log(uniform_open0(r.x)));
  double r1 = sqrt(-2.0 * log(uniform_open0(r.z)));
  double s0, c0, s1, c1;
  sincos(TWO_PI * uniform_open0(r.y), &s0, &c0);
  sincos(TWO_PI * uniform_open0(r.w), &s1, &c1);
  return make_float4((float)(r0 * c0), (float)(r0 * s0), (float)(r1 * c1), (float)(r1 * s1));
}

__device__ __forceinline__ float pick(const float4& v, int lane) {
  return lane == 0 ? v.x : lane == 1 ? v.y : lane == 2 ? v.z : v.w;
}

// The standard normal for element i alone (recomputes its whole group).
__device__ __forceinline__ float normal_at(uint64_t seed, uint32_t tensor_id, uint32_t step,
                                           uint64_t i) {
  return pick(normal4(seed, tensor_id, step, i >> 2), (int)(i & 3));
}

}  // namespace dp
