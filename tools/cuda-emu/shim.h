// CUDA-on-CPU emulation shim: one std::thread per CUDA thread, real barriers.
// Warp primitives (__shfl_*_sync, __ballot_sync, __syncwarp) are site-checked warp
// barriers; the IEEE intrinsics are plain operations, so the kernels' bit-exact paths
// need -ffp-contract=off (run.sh sets it for the DP kernels).
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
using std::isfinite;
using std::isnan;
using std::max;
using std::min;

// IEEE intrinsics: one correctly rounded operation each (no contraction with
// -ffp-contract=off).
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline double __ull2double_rn(unsigned long long x) { return (double)x; }  // round to nearest
inline double __ll2double_rn(long long x) { return (double)x; }            // round to nearest
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
// Round toward zero: the nearest float, stepped back toward 0 if it rounded away.
inline float __double2float_rz(double d) {
  float f = (float)d;
  if (std::isfinite(d) && std::fabs((double)f) > std::fabs(d)) f = std::nextafterf(f, 0.0f);
  return f;
}
inline long long __double_as_longlong(double x) { long long r; memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; memcpy(&r, &x, 8); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; memcpy(&r, &x, 4); return r; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
// A read-only load (the non-coherent cache on the GPU).
template <class T>
inline T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------- reports
static std::mutex g_rep_m;
static std::set<std::string> g_reports;
static double g_timeout_s = 60.0;
static void report(const std::string& s) {
  std::lock_guard<std::mutex> l(g_rep_m);
  if (g_reports.insert(s).second) fprintf(stderr, "REPORT: %s\n", s.c_str());
}

// A barrier that records the call site of every arrival, detects divergence
// (arrivals from different lines in one phase), completion that relied on
// exited threads, and deadlock (timeout).
struct SiteBarrier {
  std::mutex m;
  std::condition_variable cv;
  int expected = 0, arrived = 0, exited = 0;
  unsigned long gen = 0;
  int line = -1;
  const char* kind = "";
  const char* file = "";
  unsigned block = 0;

  void release_locked() {
    if (exited > 0) {
      char b[256];
      snprintf(b, sizeof b,
               "%s at %s:%d completed with %d of %d threads exited (UB on GPU)", kind,
               file, line, exited, expected);
      report(b);
    }
    arrived = 0;
    gen++;
    cv.notify_all();
  }
  void arrive(int ln, const char* fl) {
    std::unique_lock<std::mutex> lk(m);
    if (arrived == 0)
      line = ln, file = fl;
    else if (line != ln || strcmp(file, fl)) {
      char b[256];
      snprintf(b, sizeof b, "DIVERGENT %s: %s:%d and %s:%d in one phase", kind, file,
               line, fl, ln);
      report(b);
    }
    arrived++;
    if (arrived + exited == expected) {
      release_locked();
      return;
    }
    unsigned long g = gen;
    if (!cv.wait_for(lk, std::chrono::duration<double>(g_timeout_s), [&] { return gen != g; })) {
      char b[256];
      snprintf(b, sizeof b, "DEADLOCK %s at %s:%d block %u: %d arrived, %d exited, %d expected",
               kind, file, line, block, arrived, exited, expected);
      report(b);
      fflush(stderr);
      std::_Exit(3);
    }
  }
  void leave() {
    std::unique_lock<std::mutex> lk(m);
    exited++;
    if (arrived > 0 && arrived + exited == expected) release_locked();
  }
};

struct BlockCtx {
  SiteBarrier bar;
  SiteBarrier wbar[32];
  alignas(8) unsigned char wslot[32][32][8];
  std::mutex shm_m;
  std::map<int, std::vector<unsigned char>> shm;
  BlockCtx(unsigned b, unsigned threads) {
    bar.expected = threads;
    bar.kind = "__syncthreads";
    bar.block = b;
    for (unsigned w = 0; w < 32; ++w) {
      int n = (int)threads - (int)w * 32;
      wbar[w].expected = n < 0 ? 0 : (n > 32 ? 32 : n);
      wbar[w].kind = "warp primitive";
      wbar[w].block = b;
    }
  }
};
thread_local BlockCtx* g_ctx = nullptr;

// __shared__ arrays: per block, per declaration site, poisoned with 0xFF (NaN).
template <class T>
T* emu_shared(size_t n, int line) {
  std::lock_guard<std::mutex> l(g_ctx->shm_m);
  auto& v = g_ctx->shm[line];
  if (v.empty()) v.assign(n * sizeof(T), 0xFF);
  return reinterpret_cast<T*>(v.data());
}

#define __syncthreads() g_ctx->bar.arrive(__LINE__, __FILE__)

template <class T>
T emu_shfl_xor(unsigned mask, T v, int o, int line, const char* file) {
  static_assert(sizeof(T) <= 8, "slot");
  if (mask != 0xffffffffu) report("shuffle with partial mask at line " + std::to_string(line));
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  SiteBarrier& b = g_ctx->wbar[warp];
  if (b.expected != 32) report("full-mask shuffle in a partial warp at line " + std::to_string(line));
  memcpy(g_ctx->wslot[warp][lane], &v, sizeof(T));
  b.arrive(line, file);
  T r;
  memcpy(&r, g_ctx->wslot[warp][(lane ^ (unsigned)o) & 31], sizeof(T));
  b.arrive(line, file);
  return r;
}
#define __shfl_xor_sync(m, v, o) emu_shfl_xor((m), (v), (o), __LINE__, __FILE__)

// Every lane publishes v; after the warp barrier each lane reads lane src(lane).
template <class T, class Src>
T emu_warp_read(unsigned mask, T v, Src src, int line, const char* file) {
  static_assert(sizeof(T) <= 8, "slot");
  if (mask != 0xffffffffu) report("warp primitive with partial mask at line " + std::to_string(line));
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  SiteBarrier& b = g_ctx->wbar[warp];
  if (b.expected != 32) report("full-mask warp primitive in a partial warp at line " + std::to_string(line));
  memcpy(g_ctx->wslot[warp][lane], &v, sizeof(T));
  b.arrive(line, file);
  T r;
  memcpy(&r, g_ctx->wslot[warp][src(lane) & 31], sizeof(T));
  b.arrive(line, file);
  return r;
}
#define __shfl_sync(m, v, s) \
  emu_warp_read((m), (v), [&](unsigned) { return (unsigned)(s); }, __LINE__, __FILE__)
#define __shfl_up_sync(m, v, d) \
  emu_warp_read((m), (v), [&](unsigned l) { return l >= (unsigned)(d) ? l - (unsigned)(d) : l; }, \
                __LINE__, __FILE__)

inline unsigned emu_ballot(unsigned mask, bool pred, int line, const char* file) {
  if (mask != 0xffffffffu) report("ballot with partial mask at line " + std::to_string(line));
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  SiteBarrier& b = g_ctx->wbar[warp];
  if (b.expected != 32) report("full-mask ballot in a partial warp at line " + std::to_string(line));
  unsigned char p = pred;
  memcpy(g_ctx->wslot[warp][lane], &p, 1);
  b.arrive(line, file);
  unsigned r = 0;
  for (unsigned l = 0; l < 32; ++l) r |= (unsigned)g_ctx->wslot[warp][l][0] << l;
  b.arrive(line, file);
  return r;
}
#define __ballot_sync(m, p) emu_ballot((m), (p), __LINE__, __FILE__)
#define __syncwarp() g_ctx->wbar[threadIdx.x >> 5].arrive(__LINE__, __FILE__)

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}

// Launch: a grid of blocks of `block` threads (1-D blocks), at most `conc` blocks
// alive at once, in x-fastest order.
static int g_conc = 4;
template <class... P, class... A>
void launch(void (*k)(P...), dim3 grid, unsigned block, A... args) {
  const unsigned n = grid.x * grid.y * grid.z;
  for (unsigned b0 = 0; b0 < n; b0 += g_conc) {
    unsigned b1 = std::min(n, b0 + (unsigned)g_conc);
    std::vector<std::unique_ptr<BlockCtx>> ctx;
    for (unsigned b = b0; b < b1; ++b) ctx.emplace_back(new BlockCtx(b, block));
    std::vector<std::thread> th;
    th.reserve((b1 - b0) * block);
    for (unsigned b = b0; b < b1; ++b)
      for (unsigned t = 0; t < block; ++t)
        th.emplace_back([=, &ctx] {
          g_ctx = ctx[b - b0].get();
          threadIdx = dim3{t, 0, 0};
          blockIdx.x = b % grid.x;
          blockIdx.y = b / grid.x % grid.y;
          blockIdx.z = b / (grid.x * grid.y);
          blockDim.x = block;
          gridDim = grid;
          k(static_cast<P>(args)...);
          g_ctx->wbar[t >> 5].leave();
          g_ctx->bar.leave();
        });
    for (auto& t : th) t.join();
  }
}
template <class... P, class... A>
void launch(void (*k)(P...), unsigned grid, unsigned block, A... args) {
  launch(k, dim3{grid, 1, 1}, block, args...);
}
