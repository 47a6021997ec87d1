// Visual token selection (VisionZip-style). CPU twin: src/vision/tokens.rs; launcher:
// src/gpu/tokens.rs; tests: tests/tokens.rs.
//
// Three kernels, none of which needs B x N x N memory:
//   tokens_key_metric   one warp per token: head-averaged, L2-normalised keys [B, N, hd]
//   tokens_select       one block per image: scores, top-K by rank counting, the
//                       remaining list, centers and each remaining token's argmax center
//   tokens_gather_fuse  one thread per (image, output token, d): copies kept tokens,
//                       forms center + mean(members), adds the optional noise
//
// Bit-exact agreement with the CPU: every reduction is a sequential f32 sum in the
// CPU's order, and products go through __fmul_rn / __fadd_rn so nvcc cannot contract
// them into FMAs (the CPU rounds each product). Division and sqrtf are IEEE-rounded
// (no --use_fast_math), so scores, similarities and therefore all selections match.
#include "abi.h"  // TOKENS_MAX_PATCHES, TOKENS_NOT_A_MEMBER, TOKENS_KEY_NORM_EPS
#include "common.cuh"
#include "gaussian.cuh"

namespace {
constexpr int TOKENS_MAX_PATCHES = dp::TOKENS_MAX_PATCHES;
constexpr unsigned TOKENS_NOT_A_MEMBER = dp::TOKENS_NOT_A_MEMBER;
constexpr float TOKENS_KEY_NORM_EPS = dp::TOKENS_KEY_NORM_EPS;
}  // namespace

// The kernel bodies, templated on the element type E of the attention rows, keys and
// hidden states (the metric and all arithmetic are f32); the extern "C" entry points
// below instantiate them.
namespace body {

// metric[t, e] = mean_h keys[t, h*hd + e], then metric[t] /= max(||metric[t]||, eps).
// keys: [BN, H*hd]; metric: [BN, hd]. One warp per token, grid-stride over tokens;
// blockDim.x is a multiple of 32.
template <typename E>
__device__ __forceinline__ void tokens_key_metric(const dp::TokensKeyMetricArgs<E> a) {
  const E* __restrict__ keys = a.keys;
  float* __restrict__ metric = a.metric;
  const int BN = a.bn, H = a.h, hd = a.hd;
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31;
  // tok is uniform across a warp, so every lane runs the same iterations and the
  // warp-wide __syncwarp / __shfl_sync below always see all 32 lanes.
  for (long long tok = (long long)blockIdx.x * warps + (threadIdx.x >> 5); tok < BN;
       tok += (long long)gridDim.x * warps) {
    const E* k = keys + (size_t)tok * H * hd;
    float* m = metric + (size_t)tok * hd;
    for (int e = lane; e < hd; e += 32) {
      float acc = 0.0f;
      for (int h = 0; h < H; ++h) acc += dp::to_float(k[(size_t)h * hd + e]);
      m[e] = acc / (float)H;
    }
    // The sum of squares must run in the CPU's order (e = 0, 1, ...), so one lane
    // does it; hd is small (64 for CLIP). __syncwarp orders the lanes' stores before
    // lane 0's loads.
    __syncwarp();
    float norm = 0.0f;
    if (lane == 0) {
      float ss = 0.0f;
      for (int e = 0; e < hd; ++e) {
        const float x = m[e];
        ss = __fadd_rn(ss, __fmul_rn(x, x));
      }
      norm = fmaxf(sqrtf(ss), TOKENS_KEY_NORM_EPS);
    }
    norm = __shfl_sync(0xffffffffu, norm, 0);
    // Each lane rescales only the elements it wrote itself.
    for (int e = lane; e < hd; e += 32) m[e] = m[e] / norm;
  }
}

// One block per image b, blockDim.x = max(32, P rounded up to 32) <= 1024, thread j
// owns patch j (token j + 1).
//   attn:      [B, H, N]   CLS attention rows
//   metric:    [B, N, hd]  from tokens_key_metric (not read when M == 0)
//   kept:      [B, 1+K]    out: 0, then the dominant token indices ascending
//   remaining: [B, R]      out: the other patch token indices ascending
//   centers:   [B, M]      out: token index of each center
//   assign:    [B, R]      out: center slot of each remaining token, or NOT_A_MEMBER
template <typename E>
__device__ __forceinline__ void tokens_select(const dp::TokensSelectArgs<E> args) {
  const E* __restrict__ attn = args.attn;
  const float* __restrict__ metric = args.metric;
  unsigned* __restrict__ kept = args.kept;
  unsigned* __restrict__ remaining = args.remaining;
  unsigned* __restrict__ centers = args.centers;
  unsigned* __restrict__ assign = args.assign;
  const int N = args.n, H = args.h, hd = args.hd, K = args.k, M = args.m;
  __shared__ float score[TOKENS_MAX_PATCHES];
  __shared__ unsigned rem[TOKENS_MAX_PATCHES];
  __shared__ int warp_selected[32];
  const int P = N - 1, R = P - K;
  const size_t b = blockIdx.x;
  const int j = threadIdx.x;
  const int lane = j & 31, warp = j >> 5;

  // 1. score_j = (sum over heads in order) / H; NaN ranks lowest, as on the CPU.
  if (j < P) {
    const E* a = attn + b * (size_t)H * N + 1 + j;
    float acc = 0.0f;
    for (int h = 0; h < H; ++h) acc += dp::to_float(__ldg(&a[(size_t)h * N]));
    float s = acc / (float)H;
    if (isnan(s)) s = __int_as_float(0xff800000);  // -inf
    score[j] = s;
  }
  __syncthreads();

  // 2. rank_j = #patches ahead of j (higher score, or equal score and lower index).
  // The order is total, so ranks are a permutation of 0..P-1 and exactly K are kept.
  bool sel = false;
  if (j < P) {
    const float sj = score[j];
    int rank = 0;
    for (int i = 0; i < P; ++i) {
      const float si = score[i];
      rank += (si > sj || (si == sj && i < j)) ? 1 : 0;
    }
    sel = rank < K;
  }

  // 3. Exclusive prefix count of kept patches before j: ballot within the warp, plus
  // the totals of the warps before. Every lane of every warp is here (no early exit).
  const unsigned ballot = __ballot_sync(0xffffffffu, sel);
  if (lane == 0) warp_selected[warp] = __popc(ballot);
  __syncthreads();
  int before = __popc(ballot & ((1u << lane) - 1u));
  for (int w = 0; w < warp; ++w) before += warp_selected[w];

  unsigned* kept_b = kept + b * (size_t)(1 + K);
  unsigned* remaining_b = remaining + b * (size_t)R;
  if (j == 0) kept_b[0] = 0u;
  if (j < P) {
    if (sel) {
      kept_b[1 + before] = (unsigned)(j + 1);
    } else {
      const int r = j - before;  // non-kept patches before j
      rem[r] = (unsigned)(j + 1);
      remaining_b[r] = (unsigned)(j + 1);
    }
  }
  __syncthreads();

  // 4. Centers at remaining positions 0, step, 2 step, ...; each other remaining token
  // joins the center of highest cosine similarity (strict > keeps the lowest on ties).
  unsigned* assign_b = assign + b * (size_t)R;
  if (M == 0) {
    for (int r = j; r < R; r += blockDim.x) assign_b[r] = TOKENS_NOT_A_MEMBER;
    return;
  }
  const int step = R / M;  // M <= R is checked by the launcher, so step >= 1
  for (int c = j; c < M; c += blockDim.x) centers[b * (size_t)M + c] = rem[c * step];
  const float* metric_b = metric + b * (size_t)N * hd;
  for (int r = j; r < R; r += blockDim.x) {
    unsigned best = TOKENS_NOT_A_MEMBER;
    if (r % step != 0 || r / step >= M) {
      const float* t = metric_b + (size_t)rem[r] * hd;
      float best_sim = 0.0f;
      for (int c = 0; c < M; ++c) {
        const float* ct = metric_b + (size_t)rem[c * step] * hd;
        float sim = 0.0f;
        for (int e = 0; e < hd; ++e) sim = __fadd_rn(sim, __fmul_rn(__ldg(&t[e]), __ldg(&ct[e])));
        if (c == 0 || sim > best_sim) {
          best = (unsigned)c;
          best_sim = sim;
        }
      }
    }
    assign_b[r] = best;
  }
}

// out[b, o, d] for o < 1+K: hidden[b, kept[b, o], d]; for o = 1+K+m:
// hidden[b, centers[b, m], d] + (sum of members' hidden[., d]) / max(count, 1), then,
// when noise_std > 0, (float)(v + (double)noise_std * normal_at(noise, (b*M + m)*D + d))
// in f64 (plain product and sum), as the CPU's add_scaled. `noise` carries the key,
// generator, tensor id and step of TokenSelectConfig::noise_key().
// Grid: (ceil(D / blockDim.x), 1+K+M, B); coalesced over d.
template <typename E>
__device__ __forceinline__ void tokens_gather_fuse(const dp::TokensGatherFuseArgs<E> a) {
  const E* __restrict__ hidden = a.hidden;
  const unsigned* __restrict__ kept = a.kept;
  const unsigned* __restrict__ remaining = a.remaining;
  const unsigned* __restrict__ centers = a.centers;
  const unsigned* __restrict__ assign = a.assign;
  E* __restrict__ out = a.out;
  const int N = a.n, D = a.d, K = a.k, M = a.m;
  const float noise_std = a.noise_std;
  const dp::StreamArgs& noise = a.noise;
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  const int o = blockIdx.y;
  const size_t b = blockIdx.z;
  if (d >= D) return;
  const int R = N - 1 - K, O = 1 + K + M;
  const E* hb = hidden + b * (size_t)N * D;
  float v;
  if (o <= K) {
    v = dp::to_float(__ldg(&hb[(size_t)__ldg(&kept[b * (size_t)(1 + K) + o]) * D + d]));
  } else {
    const int m = o - 1 - K;
    const unsigned* asg = assign + b * (size_t)R;
    const unsigned* rem = remaining + b * (size_t)R;
    // Members in original token order, as the CPU sums them.
    float acc = 0.0f;
    int count = 0;
    for (int r = 0; r < R; ++r) {
      if (__ldg(&asg[r]) == (unsigned)m) {
        acc += dp::to_float(__ldg(&hb[(size_t)__ldg(&rem[r]) * D + d]));
        ++count;
      }
    }
    const float center =
        dp::to_float(__ldg(&hb[(size_t)__ldg(&centers[b * (size_t)M + m]) * D + d]));
    v = __fadd_rn(center, acc / (float)max(count, 1));
    if (noise_std > 0.0f) {
      const unsigned long long i = ((unsigned long long)b * M + m) * D + d;
      v = dp::add_scaled(v, (double)noise_std, dp::normal_at(noise, i));
    }
  }
  out[(b * O + o) * (size_t)D + d] = dp::from_float<E>(v);
}

}  // namespace body

// Entry points: one line per kernel and element type (a `_bf16` set is one more line
// each).
extern "C" __global__ void tokens_key_metric(const dp::TokensKeyMetricArgs<float> a) {
  body::tokens_key_metric(a);
}
extern "C" __global__ void tokens_select(const dp::TokensSelectArgs<float> a) {
  body::tokens_select(a);
}
extern "C" __global__ void tokens_gather_fuse(const dp::TokensGatherFuseArgs<float> a) {
  body::tokens_gather_fuse(a);
}
