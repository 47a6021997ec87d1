// Runs the real kernels/clip.cu under shim.h, launched as src/gpu/clip.rs launches
// them (grids and blocks from abi.h, one dp:: argument struct each), and checks every
// kernel against references written from src/dp/clip.rs:
//   1. ghost_sq_norm_f32 / inst_sq_norm_f32 / bias_sq_norm_f32 against f64 brute force
//      ||X_b^T G_b||_F^2 and ||sum_t G_b,t||^2 (added into the buffer), and against each
//      other; a cancelling example stays near 0 (the f64 tile sums);
//   2. rounding_bound_f32 against gamma * sum_t ||x_t|| (||g_t|| + bias);
//   3. clip_factors_f32 bit for bit (round toward zero), with its two counts;
//   4. scale_examples_f32 / mask_examples_f32 bit for bit over a wrapping grid;
//   5. clipped_bias_sum_f32 bit for bit (the same f64 order), absent examples skipped.
#include "shim.h"

#include <cstdint>
#include <cstring>

#include "clip_emu.cu"

#include "check.h"
static std::vector<float> randv(Rng& r, size_t n) {
  std::vector<float> v(n);
  for (auto& x : v) x = r.uni(-2, 2);
  return v;
}

// The launcher's geometry (src/gpu/clip.rs), from abi.h.
static const unsigned NT = dp::CLIP_THREADS, TL = dp::CLIP_TILE;

struct Shape { int b, t, d, p; };

static void t_norms() {
  Rng R(1);
  const Shape shapes[] = {{1, 1, 1, 1}, {2, 5, 7, 3}, {3, 33, 17, 40}, {2, 70, 3, 65}, {1, 17, 100, 33}};
  for (const Shape& s : shapes) {
    std::vector<float> x = randv(R, (size_t)s.b * s.t * s.d), g = randv(R, (size_t)s.b * s.t * s.p);
    std::vector<double> ghost(s.b, 0.5), inst(s.b, 0.5), bias(s.b, 0.25);
    const unsigned tiles = (s.t + TL - 1) / TL;
    dp::SqNormArgs<float> a{.x = x.data(), .g = g.data(), .out = ghost.data(), .t = s.t, .d = s.d, .p = s.p};
    launch(ghost_sq_norm_f32, dim3{tiles * (tiles + 1) / 2, (unsigned)s.b, 1}, NT, a);
    a.out = inst.data();
    const unsigned blocks = ((s.d + TL - 1) / TL) * ((s.p + TL - 1) / TL);
    launch(inst_sq_norm_f32, dim3{blocks, (unsigned)s.b, 1}, NT, a);
    launch(bias_sq_norm_f32, dim3{(s.p + NT - 1) / NT, (unsigned)s.b, 1}, NT,
           dp::BiasSqNormArgs<float>{.g = g.data(), .out = bias.data(), .t = s.t, .p = s.p});
    double worst = 0, worst_pair = 0, worst_bias = 0;
    for (int b = 0; b < s.b; ++b) {
      double want = 0, want_bias = 0;
      for (int i = 0; i < s.d; ++i)
        for (int j = 0; j < s.p; ++j) {
          double acc = 0;
          for (int t = 0; t < s.t; ++t)
            acc += (double)x[((size_t)b * s.t + t) * s.d + i] * g[((size_t)b * s.t + t) * s.p + j];
          want += acc * acc;
        }
      for (int j = 0; j < s.p; ++j) {
        double acc = 0;
        for (int t = 0; t < s.t; ++t) acc += g[((size_t)b * s.t + t) * s.p + j];
        want_bias += acc * acc;
      }
      worst = std::max({worst, std::fabs(ghost[b] - 0.5 - want) / want, std::fabs(inst[b] - 0.5 - want) / want});
      worst_pair = std::max(worst_pair, std::fabs(ghost[b] - inst[b]) / want);
      worst_bias = std::max(worst_bias, std::fabs(bias[b] - 0.25 - want_bias) / want_bias);
    }
    char what[160];
    snprintf(what, sizeof what, "ghost/inst/bias sq norms b=%d t=%d d=%d p=%d: rel %.1e / %.1e / %.1e (< 1e-12)",
             s.b, s.t, s.d, s.p, worst, worst_pair, worst_bias);
    check(worst < 1e-12 && worst_pair < 1e-12 && worst_bias < 1e-12, what);
  }
  // Token rows that cancel: x_1 = x_2, g_1 = -g_2, so X^T G = 0 while the Gram entries are
  // O(1). f64 tile sums of exact f32 products keep the norm at (nearly) 0.
  {
    const int t = 2, d = 37, p = 29;
    std::vector<float> x(t * d), g(t * p);
    Rng R2(7);
    for (int i = 0; i < d; ++i) x[i] = x[d + i] = R2.uni(-2, 2);
    for (int j = 0; j < p; ++j) g[p + j] = -(g[j] = R2.uni(-2, 2));
    std::vector<double> ghost(1, 0.0), inst(1, 0.0);
    dp::SqNormArgs<float> a{.x = x.data(), .g = g.data(), .out = ghost.data(), .t = t, .d = d, .p = p};
    launch(ghost_sq_norm_f32, dim3{1, 1, 1}, NT, a);
    a.out = inst.data();
    launch(inst_sq_norm_f32, dim3{2, 1, 1}, NT, a);
    char what[128];
    snprintf(what, sizeof what, "cancelling rows: ghost %.1e, inst %.1e (|.| < 1e-12)", ghost[0], inst[0]);
    check(std::fabs(ghost[0]) < 1e-12 && inst[0] == 0.0, what);
  }
}

static void t_rounding_bound() {
  Rng R(2);
  const Shape shapes[] = {{1, 1, 1, 1}, {2, 9, 7, 3}, {3, 17, 70, 33}};
  for (const Shape& s : shapes)
    for (int has_bias = 0; has_bias < 2; ++has_bias) {
      std::vector<float> x = randv(R, (size_t)s.b * s.t * s.d), g = randv(R, (size_t)s.b * s.t * s.p);
      const double gamma = 3.7e-7;
      std::vector<double> out(s.b, gamma);  // added into; the bound's own scale
      launch(rounding_bound_f32, dim3{(s.t + NT / 32 - 1) / (NT / 32), (unsigned)s.b, 1},
             NT,
             dp::RoundingBoundArgs<float>{.x = x.data(), .g = g.data(), .out = out.data(), .gamma = gamma,
                                          .t = s.t, .d = s.d, .p = s.p, .has_bias = has_bias});
      double worst = 0;
      for (int b = 0; b < s.b; ++b) {
        double want = 0;
        for (int t = 0; t < s.t; ++t) {
          double sx = 0, sg = 0;
          for (int k = 0; k < s.d; ++k) sx += std::pow((double)x[((size_t)b * s.t + t) * s.d + k], 2);
          for (int k = 0; k < s.p; ++k) sg += std::pow((double)g[((size_t)b * s.t + t) * s.p + k], 2);
          want += gamma * (std::sqrt(sx) * std::sqrt(sg) + (has_bias ? std::sqrt(sg) : 0.0));
        }
        worst = std::max(worst, std::fabs(out[b] - (gamma + want)) / (gamma + want));
      }
      char what[128];
      snprintf(what, sizeof what, "rounding_bound_f32 b=%d t=%d d=%d p=%d bias=%d: rel %.1e (< 1e-12)", s.b,
               s.t, s.d, s.p, has_bias, worst);
      check(worst < 1e-12, what);
    }
}

// The reference factor: f64 min(1, C / (sqrt(max(s, 0)) + max(e, 0) + 1e-6)), rounded
// down to f32 (the value is positive); non-finite inputs give 0.
static float want_factor(double s, double e, float C) {
  if (!std::isfinite(s) || !std::isfinite(e)) return 0.0f;
  const double v = std::fmin(1.0, (double)C / (std::sqrt(std::fmax(s, 0.0)) + std::fmax(e, 0.0) + 1e-6));
  float f = (float)v;
  if ((double)f > v) f = std::nextafterf(f, -INFINITY);
  return f;
}

static void t_factors() {
  Rng R(3);
  const int B = 300;
  std::vector<double> sq(B), bound(B);
  for (int b = 0; b < B; ++b) {
    sq[b] = std::pow(10.0, R.uni(-8, 8));
    bound[b] = b % 3 ? 0.0 : 1e-7 * R.uni(0, 1);
  }
  sq[0] = 0.0;
  sq[1] = -1e-18;  // a slightly negative sum counts as 0
  sq[2] = NAN;
  sq[3] = INFINITY;
  bound[4] = NAN;
  bound[5] = INFINITY;
  sq[6] = 1e300;  // C / 1e150 underflows: a finite factor of 0
  sq[7] = 1.0 / 9.0;
  const float C = 1.7f;
  std::vector<float> c(B, -1.0f);
  unsigned long long counts[2] = {0, 0};
  launch(clip_factors_f32, (B + NT - 1) / NT, NT,
         dp::ClipFactorsArgs{.sq = sq.data(), .bound = bound.data(), .c = c.data(), .counts = counts, .b = B,
                             .clip_norm = C});
  bool ok = true;
  unsigned long long nonfinite = 0, zero = 0;
  for (int b = 0; b < B; ++b) {
    const float w = want_factor(sq[b], bound[b], C);
    ok &= memcmp(&w, &c[b], 4) == 0;
    nonfinite += !std::isfinite(sq[b]) || !std::isfinite(bound[b]);
    zero += w == 0.0f;
  }
  check(ok, "clip_factors_f32 bit for bit (round toward zero), 300 examples");
  char what[128];
  snprintf(what, sizeof what, "clip_factors_f32 counts: non-finite %llu (want %llu), zero %llu (want %llu)",
           counts[0], nonfinite, counts[1], zero);
  check(counts[0] == nonfinite && counts[1] == zero && nonfinite == 4 && zero == 5, what);
}

static void t_examples() {
  Rng R(4);
  const long long per = 37, B = 11, total = per * B;
  std::vector<float> x = randv(R, total), c(B);
  for (long long b = 0; b < B; ++b) c[b] = b % 4 == 1 ? 0.0f : R.uni(0, 1);
  x[per * 1 + 3] = NAN;  // rows of an absent example: never reach the output
  x[per * 5 + 2] = INFINITY;
  c[5] = 0.0f;
  std::vector<float> y(total, 9.0f), m(total, 9.0f);
  dp::ExamplesArgs<float> a{.x = x.data(), .c = c.data(), .y = y.data(), .per_example = per, .total = total};
  launch(scale_examples_f32, 3, NT, a);  // 3 blocks: the grid-stride loop wraps
  a.y = m.data();
  launch(mask_examples_f32, 3, NT, a);
  bool ok_s = true, ok_m = true;
  for (long long i = 0; i < total; ++i) {
    const float f = c[i / per];
    const float ws = f == 0.0f ? 0.0f : f * x[i], wm = f == 0.0f ? 0.0f : x[i];
    ok_s &= memcmp(&ws, &y[i], 4) == 0;
    ok_m &= memcmp(&wm, &m[i], 4) == 0;
  }
  check(ok_s, "scale_examples_f32 bit for bit, absent examples 0 (NaN rows too)");
  check(ok_m, "mask_examples_f32 bit for bit, absent examples 0 (NaN rows too)");
}

static void t_bias_sum() {
  Rng R(5);
  const int B = 5, T = 7, P = 300;
  std::vector<float> g = randv(R, (size_t)B * T * P), c(B);
  for (int b = 0; b < B; ++b) c[b] = R.uni(0, 1);
  c[2] = 0.0f;
  g[(size_t)2 * T * P + 11] = NAN;  // an absent example's NaN is skipped
  for (int acc = 0; acc < 2; ++acc) {
    std::vector<float> out(P), want(P);
    for (int j = 0; j < P; ++j) out[j] = want[j] = R.uni(-1, 1);
    launch(clipped_bias_sum_f32, (P + NT - 1) / NT, NT,
           dp::ClippedBiasSumArgs<float>{.g = g.data(), .c = c.data(), .out = out.data(), .b = B, .t = T, .p = P,
                                         .accumulate = acc});
    for (int j = 0; j < P; ++j) {
      double s = 0;
      for (int b = 0; b < B; ++b) {
        if (c[b] == 0.0f) continue;
        double e = 0;
        for (int t = 0; t < T; ++t) e += (double)g[((size_t)b * T + t) * P + j];
        s += (double)c[b] * e;
      }
      want[j] = (acc ? want[j] : 0.0f) + (float)s;
    }
    check(memcmp(out.data(), want.data(), 4 * P) == 0,
          std::string("clipped_bias_sum_f32 bit for bit, accumulate=") + (acc ? "1" : "0"));
  }
}

int main() {
  t_norms();
  t_rounding_bound();
  t_factors();
  t_examples();
  t_bias_sum();
  printf("DONE failures=%d reports=%zu\n", g_fail, g_reports.size());
  return g_fail || !g_reports.empty();
}
