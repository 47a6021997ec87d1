// CUDA-on-CPU emulation shim: one std::thread per CUDA thread, real barriers.
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

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
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
      wbar[w].kind = "__shfl_xor_sync";
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

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

// Launch: grid blocks of `block` threads, at most `conc` blocks alive at once.
static int g_conc = 4;
template <class... P, class... A>
void launch(void (*k)(P...), unsigned grid, unsigned block, A... args) {
  for (unsigned b0 = 0; b0 < grid; b0 += g_conc) {
    unsigned b1 = std::min(grid, b0 + (unsigned)g_conc);
    std::vector<std::unique_ptr<BlockCtx>> ctx;
    for (unsigned b = b0; b < b1; ++b) ctx.emplace_back(new BlockCtx(b, block));
    std::vector<std::thread> th;
    th.reserve((b1 - b0) * block);
    for (unsigned b = b0; b < b1; ++b)
      for (unsigned t = 0; t < block; ++t)
        th.emplace_back([=, &ctx] {
          g_ctx = ctx[b - b0].get();
          threadIdx.x = t;
          blockIdx.x = b;
          blockDim.x = block;
          gridDim.x = grid;
          k(static_cast<P>(args)...);
          g_ctx->wbar[t >> 5].leave();
          g_ctx->bar.leave();
        });
    for (auto& t : th) t.join();
  }
}
