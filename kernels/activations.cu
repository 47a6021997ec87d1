// Activations, elementwise over n values: CLIP's quick-GELU (forward only, the
// vision tower is frozen), GELU (tanh approximation), the exact (erf) GELU and SwiGLU,
// with backwards.
// CPU twin: src/backend/cpu/activations.rs; launchers: src/gpu/activations.rs.
#include "layers.cuh"

#define GELU_C 0.7978845608028654f  // sqrt(2/pi)
#define FRAC_1_SQRT_2PI 0.3989422804014327  // 1/sqrt(2 pi), double

namespace layers {

template <typename T>
__device__ __forceinline__ void quick_gelu_fwd(T* out, const T* x, long long n) {
  GRID_STRIDE(i, n) {
    float v = to_float(x[i]);
    out[i] = from_float<T>(v * sigmoidf_(1.702f * v));
  }
}

template <typename T>
__device__ __forceinline__ void gelu_fwd(T* out, const T* x, long long n) {
  GRID_STRIDE(i, n) {
    float v = to_float(x[i]);
    out[i] = from_float<T>(0.5f * v * (1.f + tanhf(GELU_C * (v + 0.044715f * v * v * v))));
  }
}

template <typename T>
__device__ __forceinline__ void gelu_bwd(T* dx, const T* dout, const T* x, long long n) {
  GRID_STRIDE(i, n) {
    float v = to_float(x[i]);
    float th = tanhf(GELU_C * (v + 0.044715f * v * v * v));
    float g = 0.5f * (1.f + th) +
              0.5f * v * (1.f - th * th) * GELU_C * (1.f + 3.f * 0.044715f * v * v);
    dx[i] = from_float<T>(to_float(dout[i]) * g);
  }
}

// The exact GELU x·Φ(x) and its derivative Φ(x) + x·φ(x) in double, as the CPU twin
// computes them, rounded once to T: normcdf (≤ 5 double ulp, CUDA math docs) keeps the
// negative tail's relative accuracy, which 1 + erff(x/√2) in float loses to
// cancellation; rounding the double result once leaves the f32 within 1 ulp of the
// exact value and of the CPU (tests/activations.rs judges the GPU by that ulp).
// Double costs little in this memory-bound op on sm_80/sm_90 (FP64 at half the FP32
// rate); on GPUs with 1/64-rate FP64 it would not.
template <typename T>
__device__ __forceinline__ void gelu_erf_fwd(T* out, const T* x, long long n) {
  GRID_STRIDE(i, n) {
    double v = to_float(x[i]);
    out[i] = from_float<T>(__double2float_rn(v * normcdf(v)));
  }
}

template <typename T>
__device__ __forceinline__ void gelu_erf_bwd(T* dx, const T* dout, const T* x, long long n) {
  GRID_STRIDE(i, n) {
    double v = to_float(x[i]);
    double g = normcdf(v) + v * FRAC_1_SQRT_2PI * exp(-0.5 * v * v);
    dx[i] = from_float<T>(__double2float_rn((double)to_float(dout[i]) * g));
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_fwd(T* out, const T* gate, const T* up, long long n) {
  GRID_STRIDE(i, n) {
    float g = to_float(gate[i]);
    out[i] = from_float<T>(g * sigmoidf_(g) * to_float(up[i]));
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd(T* dgate, T* dup, const T* dout, const T* gate,
                                           const T* up, long long n) {
  GRID_STRIDE(i, n) {
    float g = to_float(gate[i]), u = to_float(up[i]), go = to_float(dout[i]);
    float sg = sigmoidf_(g);
    dgate[i] = from_float<T>(go * u * sg * (1.f + g * (1.f - sg)));
    dup[i] = from_float<T>(go * g * sg);
  }
}

}  // namespace layers

// ---------------------------------------------------------------------------
// f32 entry points

extern "C" __global__ void quick_gelu_fwd_f32(float* out, const float* x, long long n) {
  layers::quick_gelu_fwd(out, x, n);
}

extern "C" __global__ void gelu_fwd_f32(float* out, const float* x, long long n) {
  layers::gelu_fwd(out, x, n);
}

extern "C" __global__ void gelu_bwd_f32(float* dx, const float* dout, const float* x, long long n) {
  layers::gelu_bwd(dx, dout, x, n);
}

extern "C" __global__ void gelu_erf_fwd_f32(float* out, const float* x, long long n) {
  layers::gelu_erf_fwd(out, x, n);
}

extern "C" __global__ void gelu_erf_bwd_f32(float* dx, const float* dout, const float* x,
                                            long long n) {
  layers::gelu_erf_bwd(dx, dout, x, n);
}

extern "C" __global__ void swiglu_fwd_f32(float* out, const float* gate, const float* up,
                                          long long n) {
  layers::swiglu_fwd(out, gate, up, n);
}

extern "C" __global__ void swiglu_bwd_f32(float* dgate, float* dup, const float* dout,
                                          const float* gate, const float* up, long long n) {
  layers::swiglu_bwd(dgate, dup, dout, gate, up, n);
}
