// Noisy-gradient top-k update pruning, fused: noise + exact magnitude threshold +
// masked optimizer update. CPU twin: src/dp/prune.rs.
//
// For every coordinate j of a set of tensors (one tensor: per-tensor scope; many:
// global scope), the released gradient is  n_j = (float)(sum_j + sigma*C * z_j) in f64
// (plain product and sum, as the CPU), with the Gaussian z_j (ChaCha20 by default,
// or Philox; gaussian.cuh) regenerated on the fly in every pass, never stored. The k
// coordinates with the largest |n_j| are updated; the rest keep their parameters
// and optimizer moments. The threshold is exact: a three-pass radix select on the
// magnitude key bits(n) & 0x7fffffff (11, 11, 10 bits), with ties at the
// threshold broken by lowest position in the set's order (tensor order, then index).
//
// The whole step is device-side: every kernel reads its parameters from the
// SelectState, so the host issues hist/pick x3, tie count/scan, apply, and reads
// one small struct at the end.
#include "abi.h"
#include "common.cuh"
#include "gaussian.cuh"

namespace {
constexpr int BINS = dp::PRUNE_BINS;
constexpr int THREADS = dp::PRUNE_THREADS;
constexpr long long CHUNK = dp::PRUNE_CHUNK;  // elements per apply block
constexpr int GROUP = dp::NOISE_GROUP;        // normals per generator call (one ChaCha20 block)
static_assert(CHUNK % GROUP == 0 && CHUNK % 1024 == 0, "CHUNK");
static_assert(dp::PRUNE_PICK_THREADS == 32, "prune_pick is one warp");
}  // namespace

using dp::NoiseArgs;
using dp::OptArgs;
using dp::SelectState;

// The kernel bodies, templated on the element type E of the gradients, parameters and
// moments (the noisy values and the update arithmetic are f32/f64); the extern "C"
// entry points below instantiate them.
namespace body {

__device__ __forceinline__ unsigned int mag_key(float x) { return __float_as_uint(x) & 0x7fffffffu; }

// The eight noisy values of group q (elements 8q..8q+7) of a segment; `n` of them valid.
// noisy = (float)(std * z + (double)grad), plain f64 product and sum: the CPU's
// `(f64(S) + noise_std * z) as f32`.
template <typename E>
__device__ __forceinline__ void noisy8(const dp::Segment<E>& s, const NoiseArgs& na,
                                       unsigned long long q, float out[GROUP], int* n) {
  unsigned long long e = q * GROUP;
  *n = (int)min((unsigned long long)GROUP, s.len - e);
  if (na.std == 0.0) {  // no noise: pass the sum through untouched (keeps -0.0, as the CPU does)
#pragma unroll
    for (int l = 0; l < GROUP; ++l) out[l] = l < *n ? dp::to_float(s.grad[e + l]) : 0.f;
    return;
  }
  double z[GROUP];
  dp::normal8(na.rng, na.key, s.tensor_id, na.step, q, z);
#pragma unroll
  for (int l = 0; l < GROUP; ++l)
    out[l] = l < *n ? (float)__dadd_rn(__dmul_rn(na.std, z[l]), (double)dp::to_float(s.grad[e + l])) : 0.f;
}

// Histogram pass `pass` (0, 1, 2) over keys matching the prefix fixed so far.
// Pass 0 also counts non-finite values. Grid-stride over every segment.
template <typename E>
__device__ __forceinline__ void prune_hist(const dp::PruneArgs<E> a) {
  const dp::Segment<E>* __restrict__ segs = a.segs;
  const int nsegs = a.nsegs, pass = a.pass;
  const NoiseArgs& na = a.noise;
  SelectState* st = a.st;
  __shared__ unsigned int h[BINS];
  const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
  const unsigned int width_mask = pass == 2 ? 0x3ffu : 0x7ffu;
  const unsigned int prefix = st->prefix, pmask = st->prefix_mask;
  const bool selecting = !st->keep_all && st->k > 0;
  if (pass > 0 && !selecting) return;
  for (int i = threadIdx.x; i < BINS; i += THREADS) h[i] = 0;
  __syncthreads();
  unsigned long long bad = 0;
  for (int si = 0; si < nsegs; ++si) {
    const dp::Segment<E> s = segs[si];
    const unsigned long long groups = (s.len + GROUP - 1) / GROUP;
    for (unsigned long long q = blockIdx.x * (unsigned long long)THREADS + threadIdx.x; q < groups;
         q += (unsigned long long)gridDim.x * THREADS) {
      float v[GROUP];
      int n;
      noisy8(s, na, q, v, &n);
      for (int l = 0; l < n; ++l) {
        if (pass == 0 && !isfinite(v[l])) ++bad;
        unsigned int key = isfinite(v[l]) ? mag_key(v[l]) : 0u;
        if (selecting && (key & pmask) == prefix) atomicAdd(&h[(key >> shift) & width_mask], 1u);
      }
    }
  }
  if (bad) atomicAdd(&st->nonfinite, bad);
  __syncthreads();
  if (selecting)
    for (int i = threadIdx.x; i < BINS; i += THREADS)
      if (h[i]) atomicAdd(&st->hist[i], (unsigned long long)h[i]);
}

// Picks the bucket holding the rank-th largest key, fixes its bits and clears the
// histogram for the next pass. One warp: each lane scans a contiguous slice of
// bins from the top, then the lanes combine their counts. Reads no segment, so one
// instance serves every E (the PruneArgs layout does not depend on E).
__device__ __forceinline__ void prune_pick(const dp::PruneArgs<float> a) {
  SelectState* st = a.st;
  const int pass = a.pass;
  if (st->keep_all || st->k == 0) return;
  const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
  const int nb = pass == 2 ? 1024 : 2048;
  const int lane = threadIdx.x;  // 32 lanes; lane 0 owns the highest bins
  const int per = nb / 32;
  const int hi = nb - 1 - lane * per;  // this lane's bins: hi, hi-1, ..., hi-per+1
  unsigned long long mine = 0;
  for (int i = 0; i < per; ++i) mine += st->hist[hi - i];
  // Exclusive prefix over lanes in descending-bin order.
  unsigned long long above = mine;
  for (int o = 1; o < 32; o <<= 1) {
    unsigned long long t = __shfl_up_sync(0xffffffffu, above, o);
    if (lane >= o) above += t;
  }
  above -= mine;
  const unsigned long long rank = st->rank;
  const bool here = above < rank && rank <= above + mine;
  const unsigned int who = __ballot_sync(0xffffffffu, here);
  const int owner = __ffs(who) - 1;
  if (lane == owner) {
    unsigned long long r = rank - above;
    int b = hi;
    for (;; --b) {
      unsigned long long c = st->hist[b];
      if (r <= c) break;
      r -= c;
    }
    st->prefix |= (unsigned int)b << shift;
    st->prefix_mask |= (unsigned int)(nb - 1) << shift;
    st->rank = r;
    if (pass == 2) {
      st->count_eq = st->hist[b];
      st->ties_to_keep = r;
    }
  }
  __syncwarp();
  for (int i = lane; i < BINS; i += 32) st->hist[i] = 0;
}

__device__ __forceinline__ bool need_tie_break(const SelectState* st) {
  return !st->keep_all && st->k > 0 && st->ties_to_keep < st->count_eq;
}

template <typename E>
__device__ __forceinline__ void chunk_of(const dp::Segment<E>* segs, int nsegs, unsigned long long c,
                                         int* si, unsigned long long* start,
                                         unsigned long long* end) {
  int lo = 0, hi = nsegs - 1;  // last segment with chunk_base <= c
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (segs[mid].chunk_base <= c) lo = mid; else hi = mid - 1;
  }
  *si = lo;
  *start = (c - segs[lo].chunk_base) * CHUNK;
  *end = min(*start + CHUNK, segs[lo].len);
}

// Number of threshold ties in each chunk, only when ties must be broken.
template <typename E>
__device__ __forceinline__ void prune_tie_count(const dp::PruneArgs<E> a) {
  const dp::Segment<E>* __restrict__ segs = a.segs;
  const int nsegs = a.nsegs;
  const NoiseArgs& na = a.noise;
  const SelectState* st = a.st;
  unsigned int* __restrict__ chunk_ties = a.chunk_ties;
  if (!need_tie_break(st)) return;
  __shared__ unsigned int scratch[32];
  int si;
  unsigned long long start, end;
  chunk_of(segs, nsegs, blockIdx.x, &si, &start, &end);
  const dp::Segment<E> s = segs[si];
  const unsigned int thr = st->prefix;
  unsigned int c = 0;
  for (unsigned long long e = start + threadIdx.x * (unsigned long long)GROUP; e < end;
       e += THREADS * (unsigned long long)GROUP) {
    float v[GROUP];
    int n;
    noisy8(s, na, e / GROUP, v, &n);
    for (int l = 0; l < n; ++l) c += mag_key(v[l]) == thr;
  }
  c = dp::block_sum(c, scratch);
  if (threadIdx.x == 0) chunk_ties[blockIdx.x] = c;
}

// Exclusive scan of chunk_ties into chunk_offset (one block; sequential over
// 1024-chunk tiles, so it scales to ~1e6 chunks = 8e9 coordinates). Reads no segment:
// one instance serves every E.
__device__ __forceinline__ void prune_tie_scan(const dp::PruneArgs<float> a) {
  const SelectState* st = a.st;
  const unsigned int* __restrict__ chunk_ties = a.chunk_ties;
  const unsigned long long nchunks = a.nchunks;
  unsigned long long* __restrict__ chunk_offset = a.chunk_offset;
  if (!need_tie_break(st)) return;
  __shared__ unsigned long long warp_tot[32];
  __shared__ unsigned long long carry;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) carry = 0;
  for (unsigned long long base = 0; base < nchunks; base += blockDim.x) {
    __syncthreads();
    unsigned long long i = base + threadIdx.x;
    unsigned long long v = i < nchunks ? __ldg(&chunk_ties[i]) : 0, x = v;
    for (int o = 1; o < 32; o <<= 1) {
      unsigned long long t = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += t;
    }
    if (lane == 31) warp_tot[warp] = x;
    __syncthreads();
    unsigned long long before = carry;
    for (int w = 0; w < warp; ++w) before += warp_tot[w];
    if (i < nchunks) chunk_offset[i] = before + x - v;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry = before + x;
  }
}

template <typename E>
__device__ __forceinline__ void update_one(const OptArgs& o, float noisy, E* p, E* m, E* v,
                                           unsigned long long j) {
  float g = noisy * o.inv_batch;
  float w = dp::to_float(p[j]);
  if (o.kind == 0) {
    g = __fmaf_rn(o.weight_decay, w, g);
    if (m && o.momentum != 0.f) {  // as the CPU: no momentum buffer when momentum is 0
      float mj = __fmaf_rn(o.momentum, dp::to_float(m[j]), g);
      m[j] = dp::from_float<E>(mj);
      g = mj;
    }
    p[j] = dp::from_float<E>(__fmaf_rn(-o.lr, g, w));
  } else {
    float mj = __fmaf_rn(o.beta1, dp::to_float(m[j]), (1.f - o.beta1) * g);
    float vj = __fmaf_rn(o.beta2, dp::to_float(v[j]), (1.f - o.beta2) * g * g);
    m[j] = dp::from_float<E>(mj);
    v[j] = dp::from_float<E>(vj);
    float mhat = mj / o.bias_corr1, vhat = vj / o.bias_corr2;
    float upd = mhat / (sqrtf(vhat) + o.eps);
    p[j] = dp::from_float<E>(__fmaf_rn(-o.lr, __fmaf_rn(o.weight_decay, w, upd), w));
  }
}

// The masked update. One block per CHUNK; when ties must be broken, each block
// walks its chunk in order so a tie's rank is chunk offset + block-local prefix.
// Refuses to touch anything when a non-finite value was seen in pass 0.
template <typename E>
__device__ __forceinline__ void prune_apply(const dp::PruneArgs<E> a) {
  const dp::Segment<E>* __restrict__ segs = a.segs;
  const int nsegs = a.nsegs;
  const NoiseArgs& na = a.noise;
  const OptArgs& o = a.opt;
  SelectState* st = a.st;
  const unsigned long long* __restrict__ chunk_offset = a.chunk_offset;
  if (st->nonfinite || st->k == 0) return;
  __shared__ unsigned int scan[THREADS];
  __shared__ unsigned int scratch[32];
  int si;
  unsigned long long start, end;
  chunk_of(segs, nsegs, blockIdx.x, &si, &start, &end);
  const dp::Segment<E> s = segs[si];
  const bool all = st->keep_all;
  const bool ties = need_tie_break(st);
  const unsigned int thr = st->prefix;
  unsigned long long tie_base = ties ? __ldg(&chunk_offset[blockIdx.x]) : 0;
  const unsigned long long tie_quota = st->ties_to_keep;
  unsigned int kept = 0;
  // Every thread runs the same number of iterations so the scan's barriers match.
  for (unsigned long long e0 = start; e0 < end; e0 += THREADS * (unsigned long long)GROUP) {
    const unsigned long long e = e0 + threadIdx.x * (unsigned long long)GROUP;
    float v[GROUP];
    int n = 0;
    if (e < end) noisy8(s, na, e / GROUP, v, &n);
    bool keep[GROUP] = {false, false, false, false, false, false, false, false};
    unsigned int my_ties = 0;
    for (int l = 0; l < n; ++l) {
      unsigned int key = mag_key(v[l]);
      keep[l] = all || key > thr || (key == thr && !ties);
      my_ties += (ties && key == thr);
    }
    if (ties) {
      // Block-wide inclusive scan of tie counts (Hillis-Steele in shared memory).
      scan[threadIdx.x] = my_ties;
      __syncthreads();
      for (int off = 1; off < THREADS; off <<= 1) {
        unsigned int t = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
        __syncthreads();
        scan[threadIdx.x] += t;
        __syncthreads();
      }
      unsigned long long r = tie_base + scan[threadIdx.x] - my_ties;
      for (int l = 0; l < n; ++l)
        if (mag_key(v[l]) == thr) keep[l] = (r++ < tie_quota);
      tie_base += scan[THREADS - 1];
      __syncthreads();
    }
    for (int l = 0; l < n; ++l)
      if (keep[l]) {
        update_one(o, v[l], s.param, s.m, s.v, e + l);
        ++kept;
      }
  }
  kept = dp::block_sum(kept, scratch);
  if (threadIdx.x == 0 && kept) atomicAdd(&st->kept, (unsigned long long)kept);
}

}  // namespace body

// Entry points: one line per kernel and element type (a `_bf16` set adds hist,
// tie_count and apply; pick and tie_scan serve every E).
extern "C" __global__ void __launch_bounds__(THREADS) prune_hist(const dp::PruneArgs<float> a) {
  body::prune_hist(a);
}
extern "C" __global__ void prune_pick(const dp::PruneArgs<float> a) { body::prune_pick(a); }
extern "C" __global__ void __launch_bounds__(THREADS)
    prune_tie_count(const dp::PruneArgs<float> a) { body::prune_tie_count(a); }
extern "C" __global__ void prune_tie_scan(const dp::PruneArgs<float> a) { body::prune_tie_scan(a); }
extern "C" __global__ void __launch_bounds__(THREADS) prune_apply(const dp::PruneArgs<float> a) {
  body::prune_apply(a);
}
