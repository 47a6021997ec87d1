// Runs the real kernels/noise.cu (ChaCha20 / Philox + f64 Box-Muller of gaussian.cuh)
// on the CPU under shim.h, and checks
//   1. the device ChaCha20 block function (chacha20_blocks_test) against RFC 8439
//      section 2.3.2 and Appendix A.1 #1-#5;
//   2. dp::normal8, bit for bit, against the golden f64 normals of tests/noise.rs
//      (GOLDEN, computed by src/dp/noise.rs), for both generators;
//   3. dp::normal8 against libm's Box-Muller on the same uniforms (within
//      4e-15 * max(r, 1)) over many groups;
//   4. noise_axpy_f32 (grid-stride, offsets, accumulate) against (float)(y + a*z)
//      computed from dp::normal8 on the host, bit for bit.
// Intrinsics are plain IEEE operations (shim.h); build with -ffp-contract=off.
#include "shim.h"

#include <cstdint>
#include <cstring>

#include "noise_emu.cu"

// Generated from tests/noise.rs GOLDEN (RFC 8439 key, tensor 3, step 11).
struct Golden { unsigned rng; unsigned long long group; unsigned long long bits[8]; };
static const Golden GOLDEN[6] = {
    {0, 0ull, {0xbfd2a6cbad2d5167ull, 0x3fab15dd188d71d6ull, 0x3ff30e75ab250805ull, 0xbffe8105aacc7b46ull, 0x3ff3e21413dded6cull, 0x3febda44bc09f11eull, 0xbfbf3cc99b0237dbull, 0xbfdb275281f1a7c8ull}},
    {0, 1ull, {0xbfe01f46521370b2ull, 0x3fd98f188e70e7c1ull, 0x3feb6b54203d806aull, 0xbfe3e0e7c27871d0ull, 0x3fca011809a3e794ull, 0x3ff3f5649c14ffc9ull, 0x3ff01402e41743b1ull, 0x3ff44cc72cc94699ull}},
    {0, 4294967301ull, {0xbfea6d91d810c1c6ull, 0x3fe5c55da9ec8796ull, 0x3ff16d4b5c42194eull, 0xbff959a0c92a98ebull, 0xbfd0356ae26ddf84ull, 0xbfc1eb09eca12579ull, 0xbfe7bdddf07b83a7ull, 0x3fceec650131cdcfull}},
    {1, 0ull, {0xbff2d56f9be537a9ull, 0x3feda17d2644b448ull, 0xbffa25a59dfff315ull, 0x3ff033c2bfe8cb18ull, 0xbfd28499c25c744eull, 0xbfe694f4bce1954dull, 0x3ff1a9b335952537ull, 0x3fd97422e86f036aull}},
    {1, 1ull, {0x3ff4102dcf39c9cbull, 0x3ff53a8c18bd6e38ull, 0xbfc0a661cc00b041ull, 0xbfe39106f50617a6ull, 0xbfeeae20c5682b48ull, 0x3fefeb682a760fa0ull, 0x3fee91b8503ff9f0ull, 0x3ff19b6ec96fe0dbull}},
    {1, 4294967301ull, {0xbfd468d8ea6a5136ull, 0x3fca2c87c37a0bdcull, 0x3f27a5feefe65ceeull, 0x3fdab37ac0d5fd7bull, 0xbff4eb4e34d6b489ull, 0xbfd9db47fec53630ull, 0xbffaa4c5aaed8754ull, 0xc002a4537143568eull}},
};

static int g_fail = 0;
static void check(bool ok, const char* what) {
  printf("%s %s\n", ok ? "PASS" : "FAIL", what);
  if (!ok) ++g_fail;
}

static dp::StreamArgs stream(unsigned rng, const unsigned key[8], unsigned tensor_id, unsigned step) {
  dp::StreamArgs s{};
  memcpy(s.key, key, 32);
  s.rng = rng;
  s.tensor_id = tensor_id;
  s.step = step;
  return s;
}

static void le_words(const unsigned char* b, unsigned* w, int n) {
  for (int i = 0; i < n; ++i)
    w[i] = b[4 * i] | (b[4 * i + 1] << 8) | (b[4 * i + 2] << 16) | ((unsigned)b[4 * i + 3] << 24);
}

static void t_chacha() {
  unsigned rfc_key[8], zero[8] = {0}, k3[8], k4[8];
  unsigned char kb[32];
  for (int i = 0; i < 32; ++i) kb[i] = (unsigned char)i;
  le_words(kb, rfc_key, 8);
  memset(kb, 0, 32); kb[31] = 1; le_words(kb, k3, 8);
  memset(kb, 0, 32); kb[1] = 0xff; le_words(kb, k4, 8);
  struct Case { const unsigned* key; unsigned long long ctr, nonce; unsigned char first[16]; unsigned w15; const char* name; };
  const Case cases[] = {
      {rfc_key, 1ull | (0x09000000ull << 32), 0x4a000000ull,
       {0x10, 0xf1, 0xe7, 0xe4, 0xd1, 0x3b, 0x59, 0x15, 0x50, 0x0f, 0xdd, 0x1f, 0xa3, 0x20, 0x71, 0xc4}, 0x4e3c50a2u, "RFC 8439 2.3.2"},
      {zero, 0, 0, {0x76, 0xb8, 0xe0, 0xad, 0xa0, 0xf1, 0x3d, 0x90, 0x40, 0x5d, 0x6a, 0xe5, 0x53, 0x86, 0xbd, 0x28}, 0x8665eeb2u, "RFC 8439 A.1 #1"},
      {zero, 1, 0, {0x9f, 0x07, 0xe7, 0xbe, 0x55, 0x51, 0x38, 0x7a, 0x98, 0xba, 0x97, 0x7c, 0x73, 0x2d, 0x08, 0x0d}, 0x6f4d794bu, "RFC 8439 A.1 #2"},
      {k3, 1, 0, {0x3a, 0xeb, 0x52, 0x24, 0xec, 0xf8, 0x49, 0x92, 0x9b, 0x9d, 0x82, 0x8d, 0xb1, 0xce, 0xd4, 0xdd}, 0xa0136c00u, "RFC 8439 A.1 #3"},
      {k4, 2, 0, {0x72, 0xd5, 0x4d, 0xfb, 0xf1, 0x2e, 0xc4, 0x4b, 0x36, 0x26, 0x92, 0xdf, 0x94, 0x13, 0x7f, 0x32}, 0x96f0992eu, "RFC 8439 A.1 #4"},
      {zero, 0, 0x02000000ull << 32, {0xc2, 0xc6, 0x4d, 0x37, 0x8c, 0xd5, 0x36, 0x37, 0x4a, 0xe2, 0x04, 0xb9, 0xef, 0x93, 0x3f, 0xcd}, 0x6ded1b53u, "RFC 8439 A.1 #5"},
  };
  for (const Case& c : cases) {
    unsigned long long ctr = c.ctr, nonce = c.nonce;
    std::vector<unsigned> out(16, 0);
    dp::ChachaBlocksArgs a{};
    memcpy(a.key, c.key, 32);
    a.counter = &ctr;
    a.nonce = &nonce;
    a.out = out.data();
    a.nblocks = 1;
    launch(chacha20_blocks_test, 1, 32, a);
    unsigned char bytes[64];
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 4; ++j) bytes[4 * i + j] = (unsigned char)(out[i] >> (8 * j));
    check(memcmp(bytes, c.first, 16) == 0 && out[15] == c.w15, c.name);
  }
}

static void t_golden() {
  unsigned key[8];
  unsigned char kb[32];
  for (int i = 0; i < 32; ++i) kb[i] = (unsigned char)i;
  le_words(kb, key, 8);
  for (const Golden& g : GOLDEN) {
    double z[8];
    dp::normal8(g.rng, key, 3, 11, g.group, z);
    bool ok = true;
    for (int l = 0; l < 8; ++l) {
      unsigned long long b;
      memcpy(&b, &z[l], 8);
      ok &= b == g.bits[l];
      dp::StreamArgs s = stream(g.rng, key, 3, 11);
      double one = dp::normal_at(s, g.group * 8 + l);
      ok &= memcmp(&one, &z[l], 8) == 0;
    }
    char what[96];
    snprintf(what, sizeof what, "golden normals (%s, group %llu) bit for bit", g.rng ? "philox" : "chacha20", g.group);
    check(ok, what);
  }
}

static void t_libm() {
  unsigned key[8] = {0x9e3779b9u, 1, 2, 3, 4, 5, 6, 0xdeadbeefu};
  for (unsigned rng = 0; rng < 2; ++rng) {
    double worst = 0;
    for (unsigned long long g = 0; g < 200000; ++g) {
      unsigned long long q = g * 0x9E3779B97F4A7C15ull >> (g % 61);
      unsigned w[16];
      dp::group_words(rng, key, 7, 9, q, w);
      double z[8];
      dp::normal8(rng, key, 7, 9, q, z);
      for (int p = 0; p < 4; ++p) {
        unsigned long long x0 = dp::word64(w, 2 * p), x1 = dp::word64(w, 2 * p + 1);
        unsigned long long y = 0, y1 = 0;
        if (dp::needs_tail(x0) || dp::needs_angle_tail(x1)) {
          unsigned t[16];
          dp::group_words(rng, key, 7, 9, q, t, dp::TAIL_BIT);
          y = dp::word64(t, 2 * p);
          y1 = dp::word64(t, 2 * p + 1);
        }
        double u0 = (x0 >> 32) ? ((double)x0 + 1.0) * 0x1p-64
                               : (double)x0 * 0x1p-64 + ((double)y + 1.0) * 0x1p-128;
        // Near u = 1 the reference takes log1p of 1 - u, which the f64 u has lost.
        const unsigned long long nx = ~x0;
        const double v = (nx >> 32) ? (double)nx * 0x1p-64 : (double)nx * 0x1p-64 + (double)y * 0x1p-128;
        double r = std::sqrt(nx < (1ull << 53) ? -2.0 * std::log1p(-v) : -2.0 * std::log(u0));
        // The angle: libm sin/cos of the offset from the nearest axis, then the quarter turn.
        const unsigned long long qt = (x1 + (1ull << 61)) >> 62;
        const long long m = (long long)(x1 - (qt << 62));
        double f = (double)m * 0x1p-62;
        if (dp::needs_angle_tail(x1)) f += (double)y1 * 0x1p-126;
        const double xa = f * 1.5707963267948966;
        const double sa = std::sin(xa), ca = std::cos(xa);
        const double sn = qt == 0 ? sa : qt == 1 ? ca : qt == 2 ? -sa : -ca;
        const double cs = qt == 0 ? ca : qt == 1 ? -sa : qt == 2 ? -ca : sa;
        double e = std::max(std::fabs(z[2 * p] - r * cs), std::fabs(z[2 * p + 1] - r * sn));
        worst = std::max(worst, e / std::max(r, 1.0));
      }
    }
    char what[96];
    snprintf(what, sizeof what, "%s normals vs libm Box-Muller: worst %.2e (< 4e-15)", rng ? "philox" : "chacha20", worst);
    check(worst < 4e-15, what);
  }
}

// The radius uniform's tail regime (x0 < 2^32, probability 2^-32 per pair, so no
// sampled group reaches it): the same values as radius_uniform in src/dp/noise.rs.
static void t_tail() {
  check(dp::radius_uniform(0, ~0ull) == 0x1p-64, "radius_uniform(0, max) = 2^-64");
  check(dp::radius_uniform(0, 0) == 0x1p-128, "radius_uniform(0, 0) = 2^-128");
  check(dp::radius_uniform(~0ull, 0) == 1.0, "radius_uniform(max, 0) = 1");
  const double want = 5.0 * 0x1p-64 + 124.0 * 0x1p-128;
  check(dp::radius_uniform(5, 123) == want, "radius_uniform(5, 123) rounds once");
  check(dp::radius_uniform(1ull << 32, 99) == (0x1p32 + 1.0) * 0x1p-64, "radius_uniform(2^32, y) ignores y");
  // Near u = 1: r^2 from 1 - u directly (radius_sq), bit for bit with tests/noise.rs.
  const unsigned long long rsq[3][3] = {
      {0xfffffffffffffff8ull, 0x0ull, 0x3c2c000000000000ull},
      {0xfffffeffffffffffull, 0x0ull, 0x3e80000008000005ull},
      {0xfffffffffffffffcull, 0x9e3779b97f4a7c15ull, 0x3c1cf1bbcdcbfa54ull},
  };
  for (const auto& c : rsq) {
    const double got = dp::radius_sq(c[0], c[1]);
    char what[96];
    snprintf(what, sizeof what, "radius_sq(~%llu) bit for bit", ~c[0]);
    check((unsigned long long)__double_as_longlong(got) == c[2], what);
  }
  check(dp::needs_tail(~0ull - 5) && dp::needs_tail(5) && !dp::needs_tail(1ull << 40),
        "needs_tail at both ends only");
  check(dp::needs_angle_tail(~0ull) && dp::needs_angle_tail((1ull << 62) + 7) &&
            !dp::needs_angle_tail(1ull << 33),
        "needs_angle_tail near the axes only");
  double z0, z1;
  dp::box_muller(0, 0, 0, 0, &z0, &z1);
  check(std::fabs(z0 - std::sqrt(256.0 * std::log(2.0))) < 1e-13 && z1 == 0.0, "box_muller deepest tail: r = 13.32");
}

static void t_axpy() {
  unsigned key[8] = {11, 22, 33, 44, 55, 66, 77, 88};
  struct Case { unsigned long long offset, n; int acc; double a; unsigned grid; };
  const Case cases[] = {{0, 1000, 0, 1.0, 1}, {3, 1001, 1, -0.3, 2}, {(1ull << 35) + 5, 4099, 1, 0.7, 3}, {7, 1, 0, 2.0, 1}};
  for (unsigned rng = 0; rng < 2; ++rng)
    for (const Case& c : cases) {
      std::vector<float> y(c.n), want(c.n);
      for (unsigned long long j = 0; j < c.n; ++j) y[j] = (float)((double)(j % 17) * 0.125 - 1.0);
      dp::StreamArgs s = stream(rng, key, 5, 2);
      for (unsigned long long j = 0; j < c.n; ++j) {
        double z[8];
        unsigned long long e = c.offset + j;
        dp::normal8(s, e / 8, z);
        want[j] = dp::add_scaled(c.acc ? y[j] : 0.0f, c.a, z[e % 8]);
      }
      launch(noise_axpy_f32, c.grid, 64,
             dp::NoiseAxpyArgs<float>{.s = s, .offset = c.offset, .n = c.n, .a = c.a, .y = y.data(),
                                      .accumulate = c.acc});
      bool ok = memcmp(y.data(), want.data(), 4 * c.n) == 0;
      char what[128];
      snprintf(what, sizeof what, "noise_axpy_f32 %s offset=%llu n=%llu acc=%d grid=%u bit for bit",
               rng ? "philox" : "chacha20", c.offset, c.n, c.acc, c.grid);
      check(ok, what);
    }
}

int main() {
  t_chacha();
  t_golden();
  t_tail();
  t_libm();
  t_axpy();
  printf("DONE failures=%d reports=%zu\n", g_fail, g_reports.size());
  return g_fail || !g_reports.empty();
}
