// Regenerable Gaussian noise: 16 random words per group of 8 normals from ChaCha20
// (default, cryptographic) or Philox4x32-10 (`--rng philox`, not cryptographic),
// a radius uniform with >= 32 significant bits at every scale (tail block below 2^-32),
// an angle refined near the axes the same way, and Box-Muller in f64. CPU twin: src/dp/noise.rs, whose module doc
// gives the layout; both produce the same bits for the same (key, tensor_id, step, i),
// so any kernel on any grid regenerates noise(i) and the noise tensor is never stored.
//
// ln, sin and cos are NOT the CUDA math library's (its last ulp differs from glibc):
// they are the same sequence of correctly rounded IEEE operations as on the CPU,
// written with __dadd_rn / __dmul_rn / __ddiv_rn / __dsqrt_rn so nvcc cannot contract
// anything into an FMA. The constants are the CPU's bit patterns, as hex literals.
#pragma once
#include <stdint.h>

#include "abi.h"  // StreamArgs, RNG_CHACHA20, RNG_PHILOX, NOISE_GROUP
#include "chacha.cuh"
#include "philox.cuh"

namespace dp {

static_assert(NOISE_GROUP == 8, "normal8 draws one 16-word block per 8 normals");

// The 16 words of group g.
// `tail` is 0, or TAIL_BIT for the group's tail block (block_words in src/dp/noise.rs).
__device__ __forceinline__ void group_words(uint32_t rng, const uint32_t key[8],
                                            uint32_t tensor_id, uint32_t step, uint64_t g,
                                            uint32_t w[16], uint64_t tail = 0) {
  if (rng == RNG_PHILOX) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t c = (g * 4 + j) | tail;
      u32x4 r = philox4x32_10(u32x4{(uint32_t)c, (uint32_t)(c >> 32), tensor_id, step},
                              key[0], key[1]);
      w[4 * j] = r.x;
      w[4 * j + 1] = r.y;
      w[4 * j + 2] = r.z;
      w[4 * j + 3] = r.w;
    }
  } else {
    chacha20_block(key, g | tail, (uint64_t)tensor_id | ((uint64_t)step << 32), w);
  }
}

// ln u for a positive normal double (ln_pos in src/dp/noise.rs).
__device__ __forceinline__ double ln_pos(double u) {
  const double SQRT2 = 0x1.6a09e667f3bcdp+0;
  const double LN2_HI = 0x1.62e42fee00000p-1, LN2_LO = 0x1.a39ef35793c76p-33;
  const unsigned long long bits = (unsigned long long)__double_as_longlong(u);
  long long e = (long long)((bits >> 52) & 0x7ff) - 1023;
  double m = __longlong_as_double((long long)((bits & 0x000fffffffffffffull) |
                                              0x3ff0000000000000ull));
  if (m > SQRT2) {
    m = __dmul_rn(m, 0.5);
    e += 1;
  }
  const double f = __dadd_rn(m, -1.0);
  const double s = __ddiv_rn(f, __dadd_rn(2.0, f));
  const double z = __dmul_rn(s, s);
  double p = 0x1.8618618618618p-5;  // 1/21
  p = __dadd_rn(__dmul_rn(p, z), 0x1.af286bca1af28p-5);  // 1/19
  p = __dadd_rn(__dmul_rn(p, z), 0x1.e1e1e1e1e1e1ep-5);  // 1/17
  p = __dadd_rn(__dmul_rn(p, z), 0x1.1111111111111p-4);  // 1/15
  p = __dadd_rn(__dmul_rn(p, z), 0x1.3b13b13b13b14p-4);  // 1/13
  p = __dadd_rn(__dmul_rn(p, z), 0x1.745d1745d1746p-4);  // 1/11
  p = __dadd_rn(__dmul_rn(p, z), 0x1.c71c71c71c71cp-4);  // 1/9
  p = __dadd_rn(__dmul_rn(p, z), 0x1.2492492492492p-3);  // 1/7
  p = __dadd_rn(__dmul_rn(p, z), 0x1.999999999999ap-3);  // 1/5
  p = __dadd_rn(__dmul_rn(p, z), 0x1.5555555555555p-2);  // 1/3
  const double t = __dadd_rn(s, s);
  const double ln_m = __dadd_rn(t, __dmul_rn(t, __dmul_rn(z, p)));
  const double ef = (double)e;
  return __dadd_rn(__dmul_rn(ef, LN2_HI), __dadd_rn(__dmul_rn(ef, LN2_LO), ln_m));
}

// Whether the angle word k is within 2^32 of a quarter turn (needs_angle_tail).
__device__ __forceinline__ bool needs_angle_tail(uint64_t k) {
  const uint64_t q = (k + (1ull << 61)) >> 62;
  const long long m = (long long)(k - (q << 62));
  const unsigned long long a = m < 0 ? 0ull - (unsigned long long)m : (unsigned long long)m;
  return (a >> 32) == 0;
}

// (sin, cos) of the angle of word k (sincos_turn / angle_parts in src/dp/noise.rs):
// q the nearest quarter turn, the offset f = m*2^-62, refined by the tail word y near
// an axis.
__device__ __forceinline__ void sincos_turn(uint64_t k, uint64_t y, double* sn, double* cs) {
  const uint64_t q = (k + (1ull << 61)) >> 62;
  const long long m = (long long)(k - (q << 62));
  const double fm = __dmul_rn(__ll2double_rn(m), 0x1p-62);
  const double f = needs_angle_tail(k) ? __dadd_rn(fm, __dmul_rn(__ull2double_rn(y), 0x1p-126)) : fm;
  const double x = __dmul_rn(f, 0x1.921fb54442d18p+0);  // f * pi/2
  const double z = __dmul_rn(x, x);
  double ps = 0x1.952c77030ad4ap-49;                      // 1/17!
  ps = __dadd_rn(__dmul_rn(ps, z), -0x1.ae7f3e733b81fp-41);  // -1/15!
  ps = __dadd_rn(__dmul_rn(ps, z), 0x1.6124613a86d09p-33);   // 1/13!
  ps = __dadd_rn(__dmul_rn(ps, z), -0x1.ae64567f544e4p-26);  // -1/11!
  ps = __dadd_rn(__dmul_rn(ps, z), 0x1.71de3a556c734p-19);   // 1/9!
  ps = __dadd_rn(__dmul_rn(ps, z), -0x1.a01a01a01a01ap-13);  // -1/7!
  ps = __dadd_rn(__dmul_rn(ps, z), 0x1.1111111111111p-7);    // 1/5!
  ps = __dadd_rn(__dmul_rn(ps, z), -0x1.5555555555555p-3);   // -1/3!
  const double s = __dadd_rn(x, __dmul_rn(x, __dmul_rn(z, ps)));
  double pc = -0x1.6827863b97d97p-53;                     // -1/18!
  pc = __dadd_rn(__dmul_rn(pc, z), 0x1.ae7f3e733b81fp-45);   // 1/16!
  pc = __dadd_rn(__dmul_rn(pc, z), -0x1.93974a8c07c9dp-37);  // -1/14!
  pc = __dadd_rn(__dmul_rn(pc, z), 0x1.1eed8eff8d898p-29);   // 1/12!
  pc = __dadd_rn(__dmul_rn(pc, z), -0x1.27e4fb7789f5cp-22);  // -1/10!
  pc = __dadd_rn(__dmul_rn(pc, z), 0x1.a01a01a01a01ap-16);   // 1/8!
  pc = __dadd_rn(__dmul_rn(pc, z), -0x1.6c16c16c16c17p-10);  // -1/6!
  pc = __dadd_rn(__dmul_rn(pc, z), 0x1.5555555555555p-5);    // 1/4!
  pc = __dadd_rn(__dmul_rn(pc, z), -0x1.0000000000000p-1);   // -1/2!
  const double c = __dadd_rn(1.0, __dmul_rn(z, pc));
  switch (q & 3) {
    case 0: *sn = s; *cs = c; break;
    case 1: *sn = c; *cs = -s; break;
    case 2: *sn = -s; *cs = -c; break;
    default: *sn = -c; *cs = s; break;
  }
}

constexpr uint64_t TAIL_BIT = 1ull << 63;

// The radius uniform (radius_uniform in src/dp/noise.rs): (x + 1)·2^-64, or, when
// x < 2^32, (x·2^64 + y + 1)·2^-128 with y from the tail block; rounded once each.
__device__ __forceinline__ double radius_uniform(uint64_t x, uint64_t y) {
  if (x >> 32) return __dmul_rn(__dadd_rn(__ull2double_rn(x), 1.0), 0x1p-64);
  return __dadd_rn(__dmul_rn(__ull2double_rn(x), 0x1p-64),
                   __dmul_rn(__dadd_rn(__ull2double_rn(y), 1.0), 0x1p-128));
}

// r^2 = -2 ln u (radius_sq in src/dp/noise.rs): near u = 1 from v = 1 - u = (~x)*2^-64
// (refined by y below 2^-32) through the series -ln(1 - v) = v(1 + v/2 + ... + v^6/7).
__device__ __forceinline__ double radius_sq(uint64_t x, uint64_t y) {
  const uint64_t nx = ~x;
  if (nx >= (1ull << 53)) return __dmul_rn(-2.0, ln_pos(radius_uniform(x, y)));
  const double v = (nx >> 32) ? __dmul_rn(__ull2double_rn(nx), 0x1p-64)
                              : __dadd_rn(__dmul_rn(__ull2double_rn(nx), 0x1p-64),
                                          __dmul_rn(__ull2double_rn(y), 0x1p-128));
  const double inv_k[6] = {0x1.0000000000000p-1, 0x1.5555555555555p-2, 0x1.0000000000000p-2,
                           0x1.999999999999ap-3, 0x1.5555555555555p-3, 0x1.2492492492492p-3};
  double p = inv_k[5];
#pragma unroll
  for (int k = 4; k >= 0; --k) p = __dadd_rn(__dmul_rn(p, v), inv_k[k]);
  return __dmul_rn(2.0, __dmul_rn(v, __dadd_rn(__dmul_rn(p, v), 1.0)));
}

// Whether the pair whose radius word is x needs its tail word (needs_tail on the CPU).
__device__ __forceinline__ bool needs_tail(uint64_t x) { return (x >> 32) == 0 || (~x >> 32) == 0; }

// Box-Muller on two 64-bit words (box_muller in src/dp/noise.rs); y0, y1 are the tail
// words, read only when needs_tail(x0) / needs_angle_tail(x1).
__device__ __forceinline__ void box_muller(uint64_t x0, uint64_t x1, uint64_t y0, uint64_t y1,
                                           double* z0, double* z1) {
  const double r = __dsqrt_rn(radius_sq(x0, y0));
  double sn, cs;
  sincos_turn(x1, y1, &sn, &cs);
  *z0 = __dmul_rn(r, cs);
  *z1 = __dmul_rn(r, sn);
}

__device__ __forceinline__ uint64_t word64(const uint32_t w[16], int k) {
  return (uint64_t)w[2 * k] | ((uint64_t)w[2 * k + 1] << 32);
}

// The tail words of pair p of group g: only drawn (a second block) when the radius
// word x0 or the angle word x1 needs them, with probability ~2^-29.
__device__ __forceinline__ void tail_words(uint32_t rng, const uint32_t key[8],
                                           uint32_t tensor_id, uint32_t step, uint64_t g,
                                           uint64_t x0, uint64_t x1, int p, uint64_t* y0,
                                           uint64_t* y1) {
  *y0 = 0;
  *y1 = 0;
  if (!needs_tail(x0) && !needs_angle_tail(x1)) return;
  uint32_t t[16];
  group_words(rng, key, tensor_id, step, g, t, TAIL_BIT);
  *y0 = word64(t, 2 * p);
  *y1 = word64(t, 2 * p + 1);
}

// The eight standard normals of group g, i.e. elements 8g .. 8g+7.
__device__ __forceinline__ void normal8(uint32_t rng, const uint32_t key[8], uint32_t tensor_id,
                                        uint32_t step, uint64_t g, double out[8]) {
  uint32_t w[16];
  group_words(rng, key, tensor_id, step, g, w);
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const uint64_t x0 = word64(w, 2 * p), x1 = word64(w, 2 * p + 1);
    uint64_t y0, y1;
    tail_words(rng, key, tensor_id, step, g, x0, x1, p, &y0, &y1);
    box_muller(x0, x1, y0, y1, &out[2 * p], &out[2 * p + 1]);
  }
}

__device__ __forceinline__ void normal8(const StreamArgs& s, uint64_t g, double out[8]) {
  normal8(s.rng, s.key, s.tensor_id, s.step, g, out);
}

// The standard normal of element i alone: its group's words, but only its own pair's
// Box-Muller (the same bits as normal8).
__device__ __forceinline__ double normal_at(const StreamArgs& s, uint64_t i) {
  uint32_t w[16];
  const uint64_t g = i >> 3;
  group_words(s.rng, s.key, s.tensor_id, s.step, g, w);
  const int lane = (int)(i & 7), p = lane >> 1;
  const uint64_t x0 = word64(w, 2 * p), x1 = word64(w, 2 * p + 1);
  uint64_t y0, y1;
  tail_words(s.rng, s.key, s.tensor_id, s.step, g, x0, x1, p, &y0, &y1);
  double z0, z1;
  box_muller(x0, x1, y0, y1, &z0, &z1);
  return (lane & 1) ? z1 : z0;
}

// (float)(y + a*z) in f64 with a plain product then a plain sum: the CPU's
// `(f64(y) + a * z) as f32`.
__device__ __forceinline__ float add_scaled(float y, double a, double z) {
  return (float)__dadd_rn((double)y, __dmul_rn(a, z));
}

}  // namespace dp
