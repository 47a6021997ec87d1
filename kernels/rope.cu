// Rotary embeddings, rotate-half (HF Llama), in place on [b, t, heads, hd]; sign = -1
// is the backward (the rotation by the opposite angle). CPU twin:
// src/backend/cpu/rope.rs; launcher: src/gpu/rope.rs.
//
// Angles in f64 as the CPU does: positions reach thousands of radians, where f32
// sin/cos arguments lose digits.
#include "layers.cuh"

namespace layers {

template <typename T>
__device__ __forceinline__ void rope(T* x, long long rows, int t, int heads, int hd, double theta,
                                     double sign) {
  const int half = hd / 2;
  GRID_STRIDE(i, rows * half) {
    long long row = i / half;
    int k = (int)(i % half);
    double pos = (double)(row % t);
    double freq = pow(theta, -2.0 * k / hd);
    double sn, cs;
    sincos(sign * pos * freq, &sn, &cs);
    T* xr = x + row * (long long)heads * hd;
    for (int h = 0; h < heads; ++h) {
      T* hp = xr + (long long)h * hd;
      double x1 = to_float(hp[k]), x2 = to_float(hp[k + half]);
      hp[k] = from_float<T>((float)(x1 * cs - x2 * sn));
      hp[k + half] = from_float<T>((float)(x2 * cs + x1 * sn));
    }
  }
}

}  // namespace layers

// ---------------------------------------------------------------------------
// f32 entry points

extern "C" __global__ void rope_f32(float* x, long long rows, int t, int heads, int hd,
                                    double theta, double sign) {
  layers::rope(x, rows, t, heads, hd, theta, sign);
}
