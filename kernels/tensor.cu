// The generic tensor ops: bias, residual (axpy), scale, strided block copies and
// the ViT's patch extraction. CPU twin: src/backend/cpu/tensor.rs (with matmul,
// which runs in cuBLAS); launchers: src/gpu/tensor.rs. Grid-stride loops over
// 64-bit indices.
#include "layers.cuh"

namespace layers {

// y[r, j] += bias[j]
template <typename T>
__device__ __forceinline__ void add_bias(T* y, const T* bias, long long rows, long long cols) {
  GRID_STRIDE(i, rows * cols) { y[i] = from_float<T>(to_float(bias[i % cols]) + to_float(y[i])); }
}

// y += alpha * x
template <typename T>
__device__ __forceinline__ void axpy(T* y, float alpha, const T* x, long long n) {
  GRID_STRIDE(i, n) { y[i] = from_float<T>(fmaf(alpha, to_float(x[i]), to_float(y[i]))); }
}

// c *= beta (a GEMM with an empty inner dimension)
template <typename T>
__device__ __forceinline__ void scale(T* c, float beta, long long n) {
  GRID_STRIDE(i, n) { c[i] = from_float<T>(to_float(c[i]) * beta); }
}

// dst[dst_off + b*dst_stride + j] = src[src_off + b*src_stride + j], j < len, b < count
template <typename T>
__device__ __forceinline__ void copy_blocks(T* dst, const T* src, long long count, long long len,
                                            long long src_off, long long src_stride,
                                            long long dst_off, long long dst_stride) {
  GRID_STRIDE(i, count * len) {
    long long b = i / len, j = i % len;
    dst[dst_off + b * dst_stride + j] = src[src_off + b * src_stride + j];
  }
}

// images [b, c, s, s] -> patches [b, (s/p)^2, c*p*p], (channel, row, column) order
template <typename T>
__device__ __forceinline__ void patchify(T* out, const T* images, int b, int c, int s, int p) {
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

}  // namespace layers

// ---------------------------------------------------------------------------
// f32 entry points

extern "C" __global__ void add_bias_f32(float* y, const float* bias, long long rows, long long cols) {
  layers::add_bias(y, bias, rows, cols);
}

extern "C" __global__ void axpy_f32(float* y, float alpha, const float* x, long long n) {
  layers::axpy(y, alpha, x, n);
}

extern "C" __global__ void scale_f32(float* c, float beta, long long n) {
  layers::scale(c, beta, n);
}

extern "C" __global__ void copy_blocks_f32(float* dst, const float* src, long long count,
                                           long long len, long long src_off, long long src_stride,
                                           long long dst_off, long long dst_stride) {
  layers::copy_blocks(dst, src, count, len, src_off, src_stride, dst_off, dst_stride);
}

extern "C" __global__ void patchify_f32(float* out, const float* images, int b, int c, int s,
                                        int p) {
  layers::patchify(out, images, b, c, s, p);
}
