// DP-SGD helpers for materialised per-example gradients (rows of a [b, L] buffer,
// one row per example). CPU twin: src/backend/cpu/rows.rs; launchers: src/gpu/rows.rs.
#include "layers.cuh"

namespace layers {

// out[i, j] = sum_t g[i, t, j] for g [b, t, p]: every example's bias gradient.
template <typename T>
__device__ __forceinline__ void sum_over_tokens(T* out, const T* g, int b, int t, int p) {
  GRID_STRIDE(i, (long long)b * p) {
    long long bi = i / p;
    int j = (int)(i % p);
    float acc = 0.f;
    for (int k = 0; k < t; ++k) acc += to_float(g[(bi * t + k) * p + j]);
    out[i] = from_float<T>(acc);
  }
}

// total[r] += sum_j rows[r, j]^2 and bound[r] += gamma * sqrt(that), the rounding
// bound of their weighted sum (clip::row_gamma); one block per row, f64 accumulation
// as the CPU.
template <typename T>
__device__ __forceinline__ void add_row_sq_norms(const T* rows, long long cols, double gamma,
                                                 double* total, double* bound) {
  __shared__ double scratch[32];
  const long long r = blockIdx.x;
  const T* x = rows + r * cols;
  double s = 0.0;
  for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
    double v = to_float(x[j]);
    s += v * v;
  }
  s = dp::block_sum(s, scratch);
  if (threadIdx.x == 0) {
    total[r] += s;
    bound[r] += gamma * sqrt(s);
  }
}

}  // namespace layers

// ---------------------------------------------------------------------------
// f32 entry points

extern "C" __global__ void sum_over_tokens_f32(float* out, const float* g, int b, int t, int p) {
  layers::sum_over_tokens(out, g, b, t, p);
}

extern "C" __global__ void add_row_sq_norms_f32(const float* rows, long long cols, double gamma,
                                                double* total, double* bound) {
  layers::add_row_sq_norms(rows, cols, gamma, total, bound);
}
