// Per-example gradient norms of linear layers and the book-keeping clipped sum.
// CPU twin: src/dp/clip.rs. X is B x T x d, G is B x T x p, both row-major, of the
// element type E (float in the _f32 kernels).
//
// Both norm forms are "tile GEMM, then reduce the tile": the 32x32 tile of the
// product lives in registers (2x2 per thread), so neither the B x T x T Gram
// matrices nor the B x d x p per-example gradients ever touch global memory.
// Per-example results are added (double atomics) into a [B] total over layers.
//
// The tile products accumulate in f64 (each f32 x f32 product is exact in f64), as
// the CPU reference does. The norm decides the clip factor, so an underestimate
// releases more than C: with f32 accumulation an example whose token rows nearly
// cancel (‖X^T G‖ much smaller than the Gram entries) loses the norm to rounding.
#include "abi.h"
#include "common.cuh"

namespace {

constexpr int TILE = dp::CLIP_TILE;        // output tile edge
constexpr int KT = 32;                     // inner-dimension chunk
constexpr int THREADS = dp::CLIP_THREADS;  // 16 x 16 threads, 2 x 2 outputs each
static_assert(THREADS == 256 && TILE == 32, "the thread map covers a 32 x 32 tile");

// An operand as a function of (row r, inner index k): M[r * rs + k * ks].
// Row operands (k contiguous) are tokens x features; column operands (r contiguous)
// are the transposed view used by the instantiated form.
template <typename E>
struct Operand {
  const E* m;
  long long rs, ks;
  int rows, inner;
};

// Loads rows [r0, r0+32) x inner [k0, k0+32) into smem[r][k], zero-padded.
// `r_fast` picks which index consecutive threads walk, for coalescing.
template <typename E>
__device__ __forceinline__ void load_tile(float (*s)[KT + 1], const Operand<E>& a, int r0, int k0,
                                          bool r_fast) {
  for (int idx = threadIdx.x; idx < TILE * KT; idx += THREADS) {
    int r = r_fast ? idx % TILE : idx / KT;
    int k = r_fast ? idx / TILE : idx % KT;
    int gr = r0 + r, gk = k0 + k;
    s[r][k] = (gr < a.rows && gk < a.inner) ? dp::to_float(__ldg(&a.m[gr * a.rs + gk * a.ks])) : 0.f;
  }
}

// acc[i][j] = sum_k A[r0 + ty*2 + i][k] * B[c0 + tx*2 + j][k] over the whole inner dim,
// in f64.
template <typename E>
__device__ __forceinline__ void tile_product(const Operand<E>& a, const Operand<E>& b, int r0, int c0,
                                             bool r_fast, double acc[2][2]) {
  __shared__ float sa[TILE][KT + 1];
  __shared__ float sb[TILE][KT + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc[0][0] = acc[0][1] = acc[1][0] = acc[1][1] = 0.0;
  for (int k0 = 0; k0 < a.inner; k0 += KT) {
    __syncthreads();
    load_tile(sa, a, r0, k0, r_fast);
    load_tile(sb, b, c0, k0, r_fast);
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < KT; ++k) {
      const double a0 = sa[ty * 2][k], a1 = sa[ty * 2 + 1][k];
      const double b0 = sb[tx * 2][k], b1 = sb[tx * 2 + 1][k];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
  }
}

__device__ __forceinline__ void add_block_total(double v, double* out) {
  __shared__ double scratch[32];
  v = dp::block_sum(v, scratch);
  if (threadIdx.x == 0) atomicAdd(out, v);
}

// Maps a linear index over the lower triangle (including the diagonal) to (ti, tj).
__device__ __forceinline__ void tri_index(int lin, int* ti, int* tj) {
  int i = (int)((sqrt(8.0 * lin + 1.0) - 1.0) * 0.5);
  while ((i + 1) * (i + 2) / 2 <= lin) ++i;
  while (i * (i + 1) / 2 > lin) --i;
  *ti = i;
  *tj = lin - i * (i + 1) / 2;
}

}  // namespace

// The kernel bodies, templated on the element type E of X, G and the sums; the
// extern "C" entry points below instantiate them.
namespace body {

// Ghost norm: out[b] += <X_b X_b^T, G_b G_b^T>_F.
// grid = (tiles*(tiles+1)/2 lower-triangle tile pairs, B), block = 256.
// The Gram matrices are symmetric, so an off-diagonal tile pair counts twice.
template <typename E>
__device__ __forceinline__ void ghost_sq_norm(const dp::SqNormArgs<E> a) {
  const E* __restrict__ x = a.x;
  const E* __restrict__ g = a.g;
  double* __restrict__ out = a.out;
  const int T = a.t, d = a.d, p = a.p;
  const int b = blockIdx.y;
  int ti, tj;
  tri_index(blockIdx.x, &ti, &tj);
  const E* xb = x + (long long)b * T * d;
  const E* gb = g + (long long)b * T * p;
  Operand<E> xo{xb, d, 1, T, d}, go{gb, p, 1, T, p};
  double ax[2][2], ag[2][2];
  tile_product(xo, xo, ti * TILE, tj * TILE, false, ax);
  tile_product(go, go, ti * TILE, tj * TILE, false, ag);
  double v = 0.0;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) v += ax[i][j] * ag[i][j];
  if (ti != tj) v *= 2.0;
  add_block_total(v, out + b);
}

// Instantiated norm: out[b] += ||X_b^T G_b||_F^2.
// grid = (ceil(d/32) * ceil(p/32), B), block = 256.
template <typename E>
__device__ __forceinline__ void inst_sq_norm(const dp::SqNormArgs<E> args) {
  const E* __restrict__ x = args.x;
  const E* __restrict__ g = args.g;
  double* __restrict__ out = args.out;
  const int T = args.t, d = args.d, p = args.p;
  const int b = blockIdx.y;
  const int tiles_p = (p + TILE - 1) / TILE;
  const int r0 = (blockIdx.x / tiles_p) * TILE, c0 = (blockIdx.x % tiles_p) * TILE;
  // Column operands: row r is feature r, inner index k is token k.
  Operand<E> xo{x + (long long)b * T * d, 1, d, d, T}, go{g + (long long)b * T * p, 1, p, p, T};
  double a[2][2];
  tile_product(xo, go, r0, c0, true, a);
  double v = 0.0;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) v += a[i][j] * a[i][j];
  add_block_total(v, out + b);
}

// Bias norm: out[b] += ||sum_t G_b,t||^2. grid = (ceil(p/256), B), block = 256.
template <typename E>
__device__ __forceinline__ void bias_sq_norm(const dp::BiasSqNormArgs<E> a) {
  const E* __restrict__ g = a.g;
  double* __restrict__ out = a.out;
  const int T = a.t, p = a.p;
  const int b = blockIdx.y, c = blockIdx.x * THREADS + threadIdx.x;
  double s = 0.0;
  if (c < p) {
    const E* gb = g + (long long)b * T * p + c;
    for (int t = 0; t < T; ++t) s += (double)dp::to_float(__ldg(&gb[(long long)t * p]));
  }
  add_block_total(s * s, out + b);
}

// Rounding bound of a layer's clipped sums: out[b] += gamma * sum_t ||x_b,t|| *
// ||g_b,t|| (+ gamma * ||g_b,t|| when has_bias), f64 as the CPU
// (clip::layer_rounding_bounds). The clipped sums are f32 sums; this is what example
// b's own terms can add to them through rounding, so the clip norm pays for it.
// grid = (ceil(T / 8), B), block = 256: one warp per token.
template <typename E>
__device__ __forceinline__ void rounding_bound(const dp::RoundingBoundArgs<E> a) {
  const E* __restrict__ x = a.x;
  const E* __restrict__ g = a.g;
  double* __restrict__ out = a.out;
  const int T = a.t, d = a.d, p = a.p, has_bias = a.has_bias;
  const double gamma = a.gamma;
  const int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = blockIdx.x * (THREADS / 32) + warp;
  if (t >= T) return;  // whole warps only: no block-wide sync below
  const E* xt = x + ((long long)b * T + t) * d;
  const E* gt = g + ((long long)b * T + t) * p;
  double sx = 0.0, sg = 0.0;
  for (int k = lane; k < d; k += 32) {
    const double v = dp::to_float(__ldg(&xt[k]));
    sx += v * v;
  }
  for (int k = lane; k < p; k += 32) {
    const double v = dp::to_float(__ldg(&gt[k]));
    sg += v * v;
  }
  sx = dp::warp_sum(sx);
  sg = dp::warp_sum(sg);
  if (lane == 0) {
    const double gn = sqrt(sg);
    atomicAdd(out + b, gamma * (sqrt(sx) * gn + (has_bias ? gn : 0.0)));
  }
}

// c[b] = min(1, C / (sqrt(sq[b]) + bound[b] + 1e-6)), bound[b] the rounding bound
// of the clipped sums (clip::clip_factors: c_b (||g_b|| + bound_b) <= C bounds what
// the f32 sums release); a non-finite norm or bound gets factor 0 (the example drops
// out of the clipped sums) and bumps counts[0]; counts[1] counts every factor that
// is 0 (also a finite norm so large that C / norm underflows), so the host knows
// whether the sums must mask. A slightly negative squared norm counts as 0, as on
// the CPU.
__device__ __forceinline__ void clip_factors(const dp::ClipFactorsArgs a) {
  const double* __restrict__ sq = a.sq;
  const double* __restrict__ bound = a.bound;
  float* __restrict__ c = a.c;
  unsigned long long* __restrict__ counts = a.counts;
  const int B = a.b;
  const float C = a.clip_norm;
  int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  double s = sq[b], e = bound[b];
  float f = 0.f;
  if (isfinite(s) && isfinite(e)) {
    // Rounded toward zero (down), like the CPU: never above the exact factor.
    f = __double2float_rz(fmin(1.0, (double)C / (sqrt(fmax(s, 0.0)) + fmax(e, 0.0) + 1e-6)));
  } else {
    atomicAdd(&counts[0], 1ull);
  }
  if (f == 0.f) atomicAdd(&counts[1], 1ull);
  c[b] = f;
}

// y[b, t, :] = c[b] * x[b, t, :] for a B x T x n tensor: the diag(c) of the
// book-keeping GEMM, applied to the narrower of X and G. A factor-0 example is
// absent: its rows become 0 even when they hold NaN or Inf (0 * NaN = NaN).
template <typename E>
__device__ __forceinline__ void scale_examples(const dp::ExamplesArgs<E> a) {
  const E* __restrict__ x = a.x;
  const float* __restrict__ c = a.c;
  E* __restrict__ y = a.y;
  const long long per_example = a.per_example, total = a.total;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    float f = c[i / per_example];
    y[i] = dp::from_float<E>(f == 0.f ? 0.f : f * dp::to_float(x[i]));
  }
}

// y[i] = c[i / per_example] == 0 ? 0 : x[i]: the other GEMM operand with absent
// examples zeroed. Only launched when some factor is 0.
template <typename E>
__device__ __forceinline__ void mask_examples(const dp::ExamplesArgs<E> a) {
  const E* __restrict__ x = a.x;
  const float* __restrict__ c = a.c;
  E* __restrict__ y = a.y;
  const long long per_example = a.per_example, total = a.total;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x)
    y[i] = c[i / per_example] == 0.f ? dp::from_float<E>(0.f) : x[i];
}

// out[c] (+)= sum_{b: c_b != 0} c_b sum_t G_b,t,c. grid = ceil(p/256), block = 256.
template <typename E>
__device__ __forceinline__ void clipped_bias_sum(const dp::ClippedBiasSumArgs<E> a) {
  const E* __restrict__ g = a.g;
  const float* __restrict__ c = a.c;
  E* __restrict__ out = a.out;
  const int B = a.b, T = a.t, p = a.p, accumulate = a.accumulate;
  int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= p) return;
  double s = 0.0;
  for (int b = 0; b < B; ++b) {
    if (c[b] == 0.f) continue;  // absent, whatever its rows hold
    double e = 0.0;
    const E* gb = g + (long long)b * T * p + col;
    for (int t = 0; t < T; ++t) e += (double)dp::to_float(gb[(long long)t * p]);
    s += (double)c[b] * e;
  }
  out[col] = dp::from_float<E>((accumulate ? dp::to_float(out[col]) : 0.f) + (float)s);
}

}  // namespace body

// Entry points: one line per kernel and element type (a `_bf16` set is one more line
// each). clip_factors has no element type.
extern "C" __global__ void __launch_bounds__(THREADS)
    ghost_sq_norm_f32(const dp::SqNormArgs<float> a) { body::ghost_sq_norm(a); }
extern "C" __global__ void __launch_bounds__(THREADS)
    inst_sq_norm_f32(const dp::SqNormArgs<float> a) { body::inst_sq_norm(a); }
extern "C" __global__ void __launch_bounds__(THREADS)
    bias_sq_norm_f32(const dp::BiasSqNormArgs<float> a) { body::bias_sq_norm(a); }
extern "C" __global__ void __launch_bounds__(THREADS)
    rounding_bound_f32(const dp::RoundingBoundArgs<float> a) { body::rounding_bound(a); }
extern "C" __global__ void clip_factors_f32(const dp::ClipFactorsArgs a) { body::clip_factors(a); }
extern "C" __global__ void scale_examples_f32(const dp::ExamplesArgs<float> a) {
  body::scale_examples(a);
}
extern "C" __global__ void mask_examples_f32(const dp::ExamplesArgs<float> a) {
  body::mask_examples(a);
}
extern "C" __global__ void clipped_bias_sum_f32(const dp::ClippedBiasSumArgs<float> a) {
  body::clipped_bias_sum(a);
}
