// LayerNorm (vision tower) and RMSNorm (decoder), forward and backward. CPU twin:
// src/backend/cpu/norms.rs, which documents the math; launchers: src/gpu/norms.rs.
//
// One block per row; the row statistics reduce in f32 with warp shuffles (the CPU
// twin reduces in f64; the tests state the tolerance). Weight gradients accumulate
// across rows with atomics; input gradients are overwritten.
#include "layers.cuh"

namespace layers {

template <typename T>
__device__ __forceinline__ void layernorm_fwd(T* out, T* mean, T* rstd, const T* x, const T* w,
                                              const T* b, int dim, float eps) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * dim;
  float s = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) s += to_float(xr[j]);
  const float mu = row_sum(s, scratch) / dim;
  float v = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float d = to_float(xr[j]) - mu;
    v += d * d;
  }
  const float inv = rsqrtf(row_sum(v, scratch) / dim + eps);
  T* o = out + row * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x)
    o[j] = from_float<T>((to_float(xr[j]) - mu) * inv * to_float(w[j]) + to_float(b[j]));
  if (threadIdx.x == 0) {
    mean[row] = from_float<T>(mu);
    rstd[row] = from_float<T>(inv);
  }
}

// dx overwritten; dw, db accumulated (atomics across rows).
template <typename T>
__device__ __forceinline__ void layernorm_bwd(T* dx, T* dw, T* db, const T* dout, const T* x,
                                              const T* w, const T* mean, const T* rstd, int dim) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * dim;
  const T* go = dout + row * dim;
  const float mu = to_float(mean[row]), inv = to_float(rstd[row]);
  float m1 = 0.f, m2 = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float xhat = (to_float(xr[j]) - mu) * inv;
    float dxhat = to_float(go[j]) * to_float(w[j]);
    m1 += dxhat;
    m2 += dxhat * xhat;
    atomicAdd(&dw[j], from_float<T>(to_float(go[j]) * xhat));
    atomicAdd(&db[j], go[j]);
  }
  m1 = row_sum(m1, scratch) / dim;
  m2 = row_sum(m2, scratch) / dim;
  T* d = dx + row * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float xhat = (to_float(xr[j]) - mu) * inv;
    d[j] = from_float<T>(inv * (to_float(go[j]) * to_float(w[j]) - m1 - xhat * m2));
  }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd(T* out, T* rstd, const T* x, const T* w, int dim,
                                            float eps) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * dim;
  float s = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) s += to_float(xr[j]) * to_float(xr[j]);
  const float inv = rsqrtf(row_sum(s, scratch) / dim + eps);
  T* o = out + row * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x)
    o[j] = from_float<T>(to_float(xr[j]) * inv * to_float(w[j]));
  if (threadIdx.x == 0) rstd[row] = from_float<T>(inv);
}

// dx overwritten; dw accumulated (atomics across rows).
template <typename T>
__device__ __forceinline__ void rmsnorm_bwd(T* dx, T* dw, const T* dout, const T* x, const T* w,
                                            const T* rstd, int dim) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * dim;
  const T* go = dout + row * dim;
  const float inv = to_float(rstd[row]);
  float m = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float xhat = to_float(xr[j]) * inv;
    m += to_float(go[j]) * to_float(w[j]) * xhat;
    atomicAdd(&dw[j], from_float<T>(to_float(go[j]) * xhat));
  }
  m = row_sum(m, scratch) / dim;
  T* d = dx + row * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float xhat = to_float(xr[j]) * inv;
    d[j] = from_float<T>(inv * (to_float(go[j]) * to_float(w[j]) - xhat * m));
  }
}

}  // namespace layers

// ---------------------------------------------------------------------------
// f32 entry points

extern "C" __global__ void layernorm_fwd_f32(float* out, float* mean, float* rstd, const float* x,
                                             const float* w, const float* b, int dim, float eps) {
  layers::layernorm_fwd(out, mean, rstd, x, w, b, dim, eps);
}

extern "C" __global__ void layernorm_bwd_f32(float* dx, float* dw, float* db, const float* dout,
                                             const float* x, const float* w, const float* mean,
                                             const float* rstd, int dim) {
  layers::layernorm_bwd(dx, dw, db, dout, x, w, mean, rstd, dim);
}

extern "C" __global__ void rmsnorm_fwd_f32(float* out, float* rstd, const float* x, const float* w,
                                           int dim, float eps) {
  layers::rmsnorm_fwd(out, rstd, x, w, dim, eps);
}

extern "C" __global__ void rmsnorm_bwd_f32(float* dx, float* dw, const float* dout, const float* x,
                                           const float* w, const float* rstd, int dim) {
  layers::rmsnorm_bwd(dx, dw, dout, x, w, rstd, dim);
}
