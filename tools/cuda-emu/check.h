// What every DP-kernel harness (clip.cpp, prune.cpp, tokens.cpp) shares: the
// PASS/FAIL reporter and a seeded xorshift generator.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

static int g_fail = 0;
static void check(bool ok, const std::string& what) {
  printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  fflush(stdout);
  if (!ok) ++g_fail;
}

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  float uni(double lo, double hi) { return (float)(lo + (hi - lo) * ((next() >> 11) * 0x1p-53)); }
};
