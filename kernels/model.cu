// The model's non-GEMM ops for the CUDA backend. CPU twin: src/backend/cpu.rs,
// which documents each op's math; shapes and semantics here match it exactly
// (outputs overwritten unless the op "accumulates", masked rows zeroed).
//
// Row ops (norms, softmax, cross-entropy) use one block per row and reduce in
// f32 with warp shuffles; the CPU reference reduces in f64, and the tests state
// the resulting tolerances. Elementwise ops use grid-stride loops over 64-bit
// indices so no launch size limits the tensor size.
#include "common.cuh"

namespace {

constexpr int ROW_THREADS = 256;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// Row sum over a block; `scratch` holds 32 floats.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  return dp::block_sum(v, scratch);
}

__device__ __forceinline__ float row_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = lane < nwarps ? scratch[lane] : -INFINITY;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

#define GRID_STRIDE(i, n)                                                           \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (long long)gridDim.x * blockDim.x)

}  // namespace

// ---------------------------------------------------------------------------
// bias, residual, copies, patches

// y[r, j] += bias[j]
extern "C" __global__ void add_bias_f32(float* y, const float* bias, long long rows, long long cols) {
  GRID_STRIDE(i, rows * cols) { y[i] += bias[i % cols]; }
}

// y += alpha * x
extern "C" __global__ void axpy_f32(float* y, float alpha, const float* x, long long n) {
  GRID_STRIDE(i, n) { y[i] = fmaf(alpha, x[i], y[i]); }
}

// dst[dst_off + b*dst_stride + j] = src[src_off + b*src_stride + j], j < len, b < count
extern "C" __global__ void copy_blocks_f32(float* dst, const float* src, long long count,
                                           long long len, long long src_off, long long src_stride,
                                           long long dst_off, long long dst_stride) {
  GRID_STRIDE(i, count * len) {
    long long b = i / len, j = i % len;
    dst[dst_off + b * dst_stride + j] = src[src_off + b * src_stride + j];
  }
}

// images [b, c, s, s] -> patches [b, (s/p)^2, c*p*p], (channel, row, column) order
extern "C" __global__ void patchify_f32(float* out, const float* images, int b, int c, int s,
                                        int p) {
  const int np = s / p;
  const long long pdim = (long long)c * p * p;
  const long long n = (long long)b * np * np * pdim;
  GRID_STRIDE(i, n) {
    long long patch = i / pdim;
    int j = (int)(i % pdim);
    int bi = (int)(patch / (np * np)), pi = (int)(patch % (np * np));
    int py = pi / np, px = pi % np;
    int ch = j / (p * p), ky = (j / p) % p, kx = j % p;
    int y = py * p + ky, x = px * p + kx;
    out[i] = images[(((long long)bi * c + ch) * s + y) * s + x];
  }
}

// ---------------------------------------------------------------------------
// LayerNorm: one block per row

extern "C" __global__ void layernorm_fwd_f32(float* out, float* mean, float* rstd, const float* x,
                                             const float* w, const float* b, int dim, float eps) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const float* xr = x + row * dim;
  float s = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) s += xr[j];
  const float mu = row_sum(s, scratch) / dim;
  float v = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float d = xr[j] - mu;
    v += d * d;
  }
  const float inv = rsqrtf(row_sum(v, scratch) / dim + eps);
  float* o = out + row * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) o[j] = (xr[j] - mu) * inv * w[j] + b[j];
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = inv;
  }
}

// dx overwritten; dw, db accumulated (atomics across rows).
extern "C" __global__ void layernorm_bwd_f32(float* dx, float* dw, float* db, const float* dout,
                                             const float* x, const float* w, const float* mean,
                                             const float* rstd, int dim) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const float* xr = x + row * dim;
  const float* go = dout + row * dim;
  const float mu = mean[row], inv = rstd[row];
  float m1 = 0.f, m2 = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float xhat = (xr[j] - mu) * inv;
    float dxhat = go[j] * w[j];
    m1 += dxhat;
    m2 += dxhat * xhat;
    atomicAdd(&dw[j], go[j] * xhat);
    atomicAdd(&db[j], go[j]);
  }
  m1 = row_sum(m1, scratch) / dim;
  m2 = row_sum(m2, scratch) / dim;
  float* d = dx + row * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float xhat = (xr[j] - mu) * inv;
    d[j] = inv * (go[j] * w[j] - m1 - xhat * m2);
  }
}

// ---------------------------------------------------------------------------
// RMSNorm: one block per row

extern "C" __global__ void rmsnorm_fwd_f32(float* out, float* rstd, const float* x, const float* w,
                                           int dim, float eps) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const float* xr = x + row * dim;
  float s = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) s += xr[j] * xr[j];
  const float inv = rsqrtf(row_sum(s, scratch) / dim + eps);
  float* o = out + row * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) o[j] = xr[j] * inv * w[j];
  if (threadIdx.x == 0) rstd[row] = inv;
}

extern "C" __global__ void rmsnorm_bwd_f32(float* dx, float* dw, const float* dout, const float* x,
                                           const float* w, const float* rstd, int dim) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const float* xr = x + row * dim;
  const float* go = dout + row * dim;
  const float inv = rstd[row];
  float m = 0.f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float xhat = xr[j] * inv;
    m += go[j] * w[j] * xhat;
    atomicAdd(&dw[j], go[j] * xhat);
  }
  m = row_sum(m, scratch) / dim;
  float* d = dx + row * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float xhat = xr[j] * inv;
    d[j] = inv * (go[j] * w[j] - xhat * m);
  }
}

// ---------------------------------------------------------------------------
// RoPE, rotate-half, in place on [b, t, heads, hd]; sign = -1 is the backward.
// Angles in f64 as the CPU does: positions reach thousands of radians, where f32
// sin/cos arguments lose digits.

extern "C" __global__ void rope_f32(float* x, long long rows, int t, int heads, int hd,
                                    double theta, double sign) {
  const int half = hd / 2;
  GRID_STRIDE(i, rows * half) {
    long long row = i / half;
    int k = (int)(i % half);
    double pos = (double)(row % t);
    double freq = pow(theta, -2.0 * k / hd);
    double sn, cs;
    sincos(sign * pos * freq, &sn, &cs);
    float* xr = x + row * (long long)heads * hd;
    for (int h = 0; h < heads; ++h) {
      float* hp = xr + (long long)h * hd;
      double x1 = hp[k], x2 = hp[k + half];
      hp[k] = (float)(x1 * cs - x2 * sn);
      hp[k + half] = (float)(x2 * cs + x1 * sn);
    }
  }
}

// ---------------------------------------------------------------------------
// Attention helpers: the GEMMs run in cuBLAS on a head-major layout.

// dst [b, hq, t, hd] <- src [b, t, hs, hd], query head h reading source head h / rep.
extern "C" __global__ void split_heads_f32(float* dst, const float* src, int b, int t, int hq,
                                           int hs, int hd, int rep) {
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
extern "C" __global__ void merge_heads_f32(float* dst, const float* src, int b, int t, int hkv,
                                           int hd, int rep) {
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
      acc += src[((bi * hq + h) * t + ti) * hd + j];
    }
    dst[i] = acc;
  }
}

// In-place row softmax over [rows, t] scores (already scaled); causal rows keep
// entries j <= i (i = row % t) and zero the rest. One block per row.
extern "C" __global__ void softmax_fwd_f32(float* p, int t, int causal) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  float* pr = p + row * t;
  const int n = causal ? (int)(row % t) + 1 : t;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, pr[j]);
  mx = row_max(mx, scratch);
  float s = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float e = expf(pr[j] - mx);
    pr[j] = e;
    s += e;
  }
  const float inv = 1.f / row_sum(s, scratch);
  for (int j = threadIdx.x; j < t; j += blockDim.x) pr[j] = j < n ? pr[j] * inv : 0.f;
}

// dP -> dS in place: dS = P * (dP - sum_j dP*P), scaled by `scale`.
extern "C" __global__ void softmax_bwd_f32(float* dp, const float* p, int t, float scale) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  float* dr = dp + row * t;
  const float* pr = p + row * t;
  float dot = 0.f;
  for (int j = threadIdx.x; j < t; j += blockDim.x) dot += dr[j] * pr[j];
  dot = row_sum(dot, scratch);
  for (int j = threadIdx.x; j < t; j += blockDim.x) dr[j] = scale * pr[j] * (dr[j] - dot);
}

// ---------------------------------------------------------------------------
// Activations

extern "C" __global__ void quick_gelu_fwd_f32(float* out, const float* x, long long n) {
  GRID_STRIDE(i, n) { out[i] = x[i] * sigmoidf_(1.702f * x[i]); }
}

#define GELU_C 0.7978845608028654f  // sqrt(2/pi)

extern "C" __global__ void gelu_fwd_f32(float* out, const float* x, long long n) {
  GRID_STRIDE(i, n) {
    float v = x[i];
    out[i] = 0.5f * v * (1.f + tanhf(GELU_C * (v + 0.044715f * v * v * v)));
  }
}

extern "C" __global__ void gelu_bwd_f32(float* dx, const float* dout, const float* x, long long n) {
  GRID_STRIDE(i, n) {
    float v = x[i];
    float th = tanhf(GELU_C * (v + 0.044715f * v * v * v));
    float g = 0.5f * (1.f + th) +
              0.5f * v * (1.f - th * th) * GELU_C * (1.f + 3.f * 0.044715f * v * v);
    dx[i] = dout[i] * g;
  }
}

extern "C" __global__ void swiglu_fwd_f32(float* out, const float* gate, const float* up,
                                          long long n) {
  GRID_STRIDE(i, n) {
    float g = gate[i];
    out[i] = g * sigmoidf_(g) * up[i];
  }
}

extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* dout,
                                          const float* gate, const float* up, long long n) {
  GRID_STRIDE(i, n) {
    float g = gate[i], u = up[i], go = dout[i];
    float sg = sigmoidf_(g);
    dgate[i] = go * u * sg * (1.f + g * (1.f - sg));
    dup[i] = go * g * sg;
  }
}

// ---------------------------------------------------------------------------
// Embedding and the loss (ids were range-checked on the host)

extern "C" __global__ void embedding_fwd_f32(float* out, const float* table, const unsigned* ids,
                                             long long rows, int dim) {
  GRID_STRIDE(i, rows * dim) {
    long long r = i / dim;
    out[i] = table[(long long)ids[r] * dim + i % dim];
  }
}

extern "C" __global__ void embedding_bwd_f32(float* dtable, const float* dout,
                                             const unsigned* ids, long long rows, int dim) {
  GRID_STRIDE(i, rows * dim) {
    long long r = i / dim;
    atomicAdd(&dtable[(long long)ids[r] * dim + i % dim], dout[i]);
  }
}

// losses[r] = w_r (lse_r - logit[target]); dlogits[r] = w_r (softmax - onehot).
// Rows with w_r = 0 are zeroed and never read their target. One block per row.
extern "C" __global__ void cross_entropy_f32(float* losses, float* dlogits, const float* logits,
                                             const unsigned* targets, const float* weights,
                                             int vocab) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  const float w = weights[row];
  float* dl = dlogits + row * vocab;
  if (w == 0.f) {
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) dl[j] = 0.f;
    if (threadIdx.x == 0) losses[row] = 0.f;
    return;
  }
  const float* lg = logits + row * vocab;
  const unsigned tg = targets[row];
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, lg[j]);
  mx = row_max(mx, scratch);
  float s = 0.f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(lg[j] - mx);
  const float lse = mx + logf(row_sum(s, scratch));
  for (int j = threadIdx.x; j < vocab; j += blockDim.x)
    dl[j] = w * (expf(lg[j] - lse) - (j == (int)tg ? 1.f : 0.f));
  if (threadIdx.x == 0) losses[row] = w * (lse - lg[tg]);
}

// ---------------------------------------------------------------------------
// DP-SGD helpers for materialised per-example gradients

// out[i, j] = sum_t g[i, t, j] for g [b, t, p]
extern "C" __global__ void sum_over_tokens_f32(float* out, const float* g, int b, int t, int p) {
  GRID_STRIDE(i, (long long)b * p) {
    long long bi = i / p;
    int j = (int)(i % p);
    float acc = 0.f;
    for (int k = 0; k < t; ++k) acc += g[(bi * t + k) * p + j];
    out[i] = acc;
  }
}

// total[r] += sum_j rows[r, j]^2 and bound[r] += gamma * sqrt(that), the rounding
// bound of their weighted sum (clip::row_gamma); one block per row, f64 accumulation
// as the CPU.
extern "C" __global__ void add_row_sq_norms_f32(const float* rows, long long cols, double gamma,
                                                double* total, double* bound) {
  __shared__ double scratch[32];
  const long long r = blockIdx.x;
  const float* x = rows + r * cols;
  double s = 0.0;
  for (long long j = threadIdx.x; j < cols; j += blockDim.x) s += (double)x[j] * x[j];
  s = dp::block_sum(s, scratch);
  if (threadIdx.x == 0) {
    total[r] += s;
    bound[r] += gamma * sqrt(s);
  }
}

// c *= beta (a GEMM with an empty inner dimension)
extern "C" __global__ void scale_f32(float* c, float beta, long long n) {
  GRID_STRIDE(i, n) { c[i] *= beta; }
}
