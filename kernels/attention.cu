// Attention's non-GEMM kernels: the head-major relayouts around cuBLAS's batched
// GEMMs, and the row softmax with its backward. CPU twin: src/backend/cpu/attention.rs
// (which computes the whole attention); launchers: src/gpu/attention.rs.
//
// The softmax uses one block per row and reduces in f32 (the CPU twin in f64).
#include "layers.cuh"

namespace layers {

// dst [b, hq, t, hd] <- src [b, t, hs, hd], query head h reading source head h / rep.
template <typename T>
__device__ __forceinline__ void split_heads(T* dst, const T* src, int b, int t, int hq, int hs,
                                            int hd, int rep) {
  const long long n = (long long)b * hq * t * hd;
  GRID_STRIDE(i, n) {
    int j = (int)(i % hd);
    long long r = i / hd;
    int ti = (int)(r % t);
    r /= t;
    int h = (int)(r % hq);
    long long bi = r / hq;
    dst[i] = src[((bi * t + ti) * hs + h / rep) * hd + j];
  }
}

// dst [b, t, hkv, hd] = sum over the rep query heads of src [b, hq, t, hd]
// (rep = 1 is the plain inverse of split_heads).
template <typename T>
__device__ __forceinline__ void merge_heads(T* dst, const T* src, int b, int t, int hkv, int hd,
                                            int rep) {
  const long long n = (long long)b * t * hkv * hd;
  const int hq = hkv * rep;
  GRID_STRIDE(i, n) {
    int j = (int)(i % hd);
    long long r = i / hd;
    int g = (int)(r % hkv);
    r /= hkv;
    int ti = (int)(r % t);
    long long bi = r / t;
    float acc = 0.f;
    for (int k = 0; k < rep; ++k) {
      int h = g * rep + k;
      acc += to_float(src[((bi * hq + h) * t + ti) * hd + j]);
    }
    dst[i] = from_float<T>(acc);
  }
}

// In-place row softmax over [rows, t] scores (already scaled); causal rows keep
// entries j <= i (i = row % t) and zero the rest. One block per row.
template <typename T>
__device__ __forceinline__ void softmax_fwd(T* p, int t, int causal) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  T* pr = p + row * t;
  const int n = causal ? (int)(row % t) + 1 : t;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, to_float(pr[j]));
  mx = row_max(mx, scratch);
  float s = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float e = expf(to_float(pr[j]) - mx);
    pr[j] = from_float<T>(e);
    s += e;
  }
  const float inv = 1.f / row_sum(s, scratch);
  for (int j = threadIdx.x; j < t; j += blockDim.x)
    pr[j] = from_float<T>(j < n ? to_float(pr[j]) * inv : 0.f);
}

// dP -> dS in place: dS = P * (dP - sum_j dP*P), scaled by `scale`.
template <typename T>
__device__ __forceinline__ void softmax_bwd(T* dp, const T* p, int t, float scale) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  T* dr = dp + row * t;
  const T* pr = p + row * t;
  float dot = 0.f;
  for (int j = threadIdx.x; j < t; j += blockDim.x) dot += to_float(dr[j]) * to_float(pr[j]);
  dot = row_sum(dot, scratch);
  for (int j = threadIdx.x; j < t; j += blockDim.x)
    dr[j] = from_float<T>(scale * to_float(pr[j]) * (to_float(dr[j]) - dot));
}

}  // namespace layers

// ---------------------------------------------------------------------------
// f32 entry points

extern "C" __global__ void split_heads_f32(float* dst, const float* src, int b, int t, int hq,
                                           int hs, int hd, int rep) {
  layers::split_heads(dst, src, b, t, hq, hs, hd, rep);
}

extern "C" __global__ void merge_heads_f32(float* dst, const float* src, int b, int t, int hkv,
                                           int hd, int rep) {
  layers::merge_heads(dst, src, b, t, hkv, hd, rep);
}

extern "C" __global__ void softmax_fwd_f32(float* p, int t, int causal) {
  layers::softmax_fwd(p, t, causal);
}

extern "C" __global__ void softmax_bwd_f32(float* dp, const float* p, int t, float scale) {
  layers::softmax_bwd(dp, p, t, scale);
}
