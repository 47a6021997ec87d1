// Token embedding (forward and the accumulating backward) and the fused softmax
// cross-entropy of the LM head. CPU twin: src/backend/cpu/embedding.rs; launchers:
// src/gpu/embedding.rs. Ids and used targets were range-checked on the host
// (src/backend/check.rs).
#include "layers.cuh"

namespace layers {

template <typename T>
__device__ __forceinline__ void embedding_fwd(T* out, const T* table, const unsigned* ids,
                                              long long rows, int dim) {
  GRID_STRIDE(i, rows * dim) {
    long long r = i / dim;
    out[i] = table[(long long)ids[r] * dim + i % dim];
  }
}

// dtable[ids[r]] += dout[r], atomics for repeated ids.
template <typename T>
__device__ __forceinline__ void embedding_bwd(T* dtable, const T* dout, const unsigned* ids,
                                              long long rows, int dim) {
  GRID_STRIDE(i, rows * dim) {
    long long r = i / dim;
    atomicAdd(&dtable[(long long)ids[r] * dim + i % dim], dout[i]);
  }
}

// losses[r] = w_r (lse_r - logit[target]); dlogits[r] = w_r (softmax - onehot).
// Rows with w_r = 0 are zeroed and never read their target. One block per row.
template <typename T>
__device__ __forceinline__ void cross_entropy(T* losses, T* dlogits, const T* logits,
                                              const unsigned* targets, const T* weights,
                                              int vocab) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const float w = to_float(weights[row]);
  T* dl = dlogits + row * vocab;
  if (w == 0.f) {
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) dl[j] = from_float<T>(0.f);
    if (threadIdx.x == 0) losses[row] = from_float<T>(0.f);
    return;
  }
  const T* lg = logits + row * vocab;
  const unsigned tg = targets[row];
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, to_float(lg[j]));
  mx = row_max(mx, scratch);
  float s = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(to_float(lg[j]) - mx);
  const float lse = mx + logf(row_sum(s, scratch));
  for (int j = threadIdx.x; j < vocab; j += blockDim.x)
    dl[j] = from_float<T>(w * (expf(to_float(lg[j]) - lse) - (j == (int)tg ? 1.f : 0.f)));
  if (threadIdx.x == 0) losses[row] = from_float<T>(w * (lse - to_float(lg[tg])));
}

}  // namespace layers

// ---------------------------------------------------------------------------
// f32 entry points

extern "C" __global__ void embedding_fwd_f32(float* out, const float* table, const unsigned* ids,
                                             long long rows, int dim) {
  layers::embedding_fwd(out, table, ids, rows, dim);
}

extern "C" __global__ void embedding_bwd_f32(float* dtable, const float* dout,
                                             const unsigned* ids, long long rows, int dim) {
  layers::embedding_bwd(dtable, dout, ids, rows, dim);
}

extern "C" __global__ void cross_entropy_f32(float* losses, float* dlogits, const float* logits,
                                             const unsigned* targets, const float* weights,
                                             int vocab) {
  layers::cross_entropy(losses, dlogits, logits, targets, weights, vocab);
}
