// Runs the real model kernels (kernels/{tensor,norms,rope,attention,activations,embedding,rows}.cu)
// under shim.h and compares with f64 references
// written from the CPU twins in src/backend/cpu/ (rows.rs for the DP row helpers).
#include "shim.h"
#include "model_emu.cu"

#include <cstdarg>
#include <cstdint>
#include <functional>

using V = std::vector<float>;
using D = std::vector<double>;

static const unsigned ROW = 256, EW = 256;
static unsigned EW_GRID = 3;
static bool g_small = getenv("EMU_SMALL") != nullptr;  // fewer/lighter shapes for sanitizer builds  // a small grid so the grid-stride loops wrap

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  double uni(double lo, double hi) { return lo + (hi - lo) * ((next() >> 11) * (1.0 / 9007199254740992.0)); }
};
static V randv(Rng& r, size_t n, double lo = -2, double hi = 2) {
  V v(n);
  for (auto& x : v) x = (float)r.uni(lo, hi);
  return v;
}

// error relative to the output's scale
struct Err {
  double maxabs = 0, scale = 0;
  bool bad = false;  // NaN or exactness violation
  void add(double g, double r) {
    if (!std::isfinite(g) && std::isfinite(r)) bad = true;
    maxabs = std::max(maxabs, std::fabs(g - r));
    scale = std::max(scale, std::fabs(r));
  }
  void addv(const V& g, const D& r) {
    if (g.size() != r.size()) {
      bad = true;
      return;
    }
    for (size_t i = 0; i < g.size(); ++i) add(g[i], r[i]);
  }
  void merge(const Err& o) {
    // combine as relative errors of separate outputs
    double a = rel(), b = o.rel();
    maxabs = std::max(a, b);
    scale = 1;
    bad |= o.bad;
  }
  double rel() const { return scale > 0 ? maxabs / scale : maxabs; }
};

static int g_fail = 0;
static void result(const char* kernel, const std::string& shape, const Err& e, double tol) {
  bool ok = !e.bad && e.rel() <= tol;
  if (!ok) g_fail++;
  printf("RESULT %-22s %-44s rel=%.3e %s\n", kernel, shape.c_str(), e.rel(), ok ? "PASS" : "FAIL");
  fflush(stdout);
}
static unsigned ewgrid(size_t n) {
  // 0: the launcher's grid_for(n, 256, sm_count*16) with 132 SMs
  return EW_GRID ? EW_GRID : (unsigned)std::min<size_t>(std::max<size_t>((n + 255) / 256, 1), 132 * 16);
}

static std::string fmt(const char* f, ...) {
  char b[256];
  va_list ap;
  va_start(ap, f);
  vsnprintf(b, sizeof b, f, ap);
  va_end(ap);
  return b;
}

// ---------------------------------------------------------------- tests
static void t_layernorm(Rng& R) {
  for (int rows : {1, 5})
    for (int dim : {1, 7, 300, 1000}) {
      float eps = 1e-5f;
      V x = randv(R, (size_t)rows * dim, -3, 3), w = randv(R, dim), b = randv(R, dim);
      for (int j = 0; j < dim; ++j) x[j] += 5.0f;  // offset row 0 to exercise the centring
      V out(rows * dim), mean(rows), rstd(rows);
      launch(layernorm_fwd_f32, rows, ROW, out.data(), mean.data(), rstd.data(), x.data(), w.data(),
             b.data(), dim, eps);
      D ro(rows * dim), rm(rows), rr(rows);
      for (int r = 0; r < rows; ++r) {
        double mu = 0, var = 0;
        for (int j = 0; j < dim; ++j) mu += x[r * dim + j];
        mu /= dim;
        for (int j = 0; j < dim; ++j) var += std::pow(x[r * dim + j] - mu, 2);
        var /= dim;
        double inv = 1 / std::sqrt(var + (double)eps);
        for (int j = 0; j < dim; ++j) ro[r * dim + j] = (x[r * dim + j] - mu) * inv * w[j] + b[j];
        rm[r] = mu;
        rr[r] = inv;
      }
      Err e1, e2, e3;
      e1.addv(out, ro);
      e2.addv(mean, rm);
      e3.addv(rstd, rr);
      e1.merge(e2);
      e1.merge(e3);
      result("layernorm_fwd_f32", fmt("rows=%d dim=%d", rows, dim), e1, 2e-5);

      // backward, with the forward's f32 statistics as inputs
      V dout = randv(R, rows * dim), dx(rows * dim, NAN), dw = randv(R, dim), db = randv(R, dim);
      D rdw(dw.begin(), dw.end()), rdb(db.begin(), db.end()), rdx(rows * dim);
      launch(layernorm_bwd_f32, rows, ROW, dx.data(), dw.data(), db.data(), dout.data(), x.data(),
             w.data(), mean.data(), rstd.data(), dim);
      for (int r = 0; r < rows; ++r) {
        double mu = mean[r], inv = rstd[r], m1 = 0, m2 = 0;
        for (int j = 0; j < dim; ++j) {
          double xh = (x[r * dim + j] - mu) * inv, dxh = (double)dout[r * dim + j] * w[j];
          m1 += dxh;
          m2 += dxh * xh;
          rdw[j] += dout[r * dim + j] * xh;
          rdb[j] += dout[r * dim + j];
        }
        m1 /= dim;
        m2 /= dim;
        for (int j = 0; j < dim; ++j) {
          double xh = (x[r * dim + j] - mu) * inv, dxh = (double)dout[r * dim + j] * w[j];
          rdx[r * dim + j] = inv * (dxh - m1 - xh * m2);
        }
      }
      Err f1, f2, f3;
      f1.addv(dx, rdx);
      f2.addv(dw, rdw);
      f3.addv(db, rdb);
      f1.merge(f2);
      f1.merge(f3);
      result("layernorm_bwd_f32", fmt("rows=%d dim=%d (dw,db accumulate)", rows, dim), f1, 2e-5);
    }
}

static void t_rmsnorm(Rng& R) {
  for (int rows : {1, 5})
    for (int dim : {1, 7, 300, 1000}) {
      float eps = 1e-6f;
      V x = randv(R, (size_t)rows * dim, -3, 3), w = randv(R, dim);
      V out(rows * dim), rstd(rows);
      launch(rmsnorm_fwd_f32, rows, ROW, out.data(), rstd.data(), x.data(), w.data(), dim, eps);
      D ro(rows * dim), rr(rows);
      for (int r = 0; r < rows; ++r) {
        double ms = 0;
        for (int j = 0; j < dim; ++j) ms += std::pow((double)x[r * dim + j], 2);
        double inv = 1 / std::sqrt(ms / dim + (double)eps);
        for (int j = 0; j < dim; ++j) ro[r * dim + j] = x[r * dim + j] * inv * w[j];
        rr[r] = inv;
      }
      Err e1, e2;
      e1.addv(out, ro);
      e2.addv(rstd, rr);
      e1.merge(e2);
      result("rmsnorm_fwd_f32", fmt("rows=%d dim=%d", rows, dim), e1, 2e-5);

      V dout = randv(R, rows * dim), dx(rows * dim, NAN), dw = randv(R, dim);
      D rdw(dw.begin(), dw.end()), rdx(rows * dim);
      launch(rmsnorm_bwd_f32, rows, ROW, dx.data(), dw.data(), dout.data(), x.data(), w.data(),
             rstd.data(), dim);
      for (int r = 0; r < rows; ++r) {
        double inv = rstd[r], m = 0;
        for (int j = 0; j < dim; ++j) {
          double xh = x[r * dim + j] * inv;
          m += (double)dout[r * dim + j] * w[j] * xh;
          rdw[j] += dout[r * dim + j] * xh;
        }
        m /= dim;
        for (int j = 0; j < dim; ++j)
          rdx[r * dim + j] = inv * ((double)dout[r * dim + j] * w[j] - x[r * dim + j] * inv * m);
      }
      Err f1, f2;
      f1.addv(dx, rdx);
      // At dim 1 dx cancels to ~eps/x^2 (x_hat^2 ~ 1): f32 can only be judged against the
      // scale of the terms it subtracts, inv*dout*w, not against the tiny result.
      if (dim == 1)
        for (int r = 0; r < rows; ++r)
          f1.scale = std::max(f1.scale, std::fabs((double)rstd[r] * dout[r] * w[0]));
      f2.addv(dw, rdw);
      f1.merge(f2);
      result("rmsnorm_bwd_f32", fmt("rows=%d dim=%d (dw accumulates)", rows, dim), f1, 2e-5);
    }
}

static void t_rope(Rng& R) {
  for (int b : {1, 2})
    for (int t : {1, 17, 65})
      for (int heads : {1, 3})
        for (int hd : {2, 8, 64})
          for (double sign : {1.0, -1.0}) {
            float theta = 10000.0f;
            long long rows = (long long)b * t;
            size_t n = rows * heads * hd;
            V x = randv(R, n), x0 = x;
            launch(rope_f32, ewgrid(rows * hd / 2), EW, x.data(), rows, t, heads, hd, (double)theta,
                   sign);
            D ref(n);
            int half = hd / 2;
            for (long long r = 0; r < rows; ++r) {
              double pos = r % t;
              for (int i = 0; i < half; ++i) {
                double fr = std::pow((double)theta, -2.0 * i / hd), a = sign * pos * fr;
                for (int h = 0; h < heads; ++h) {
                  size_t o = (r * heads + h) * hd;
                  double x1 = x0[o + i], x2 = x0[o + i + half];
                  ref[o + i] = x1 * std::cos(a) - x2 * std::sin(a);
                  ref[o + i + half] = x2 * std::cos(a) + x1 * std::sin(a);
                }
              }
            }
            Err e;
            e.addv(x, ref);
            result("rope_f32", fmt("b=%d t=%d heads=%d hd=%d sign=%+.0f", b, t, heads, hd, sign), e,
                   1e-6);
          }
}

static void t_heads(Rng& R) {
  for (int b : {1, 2})
    for (int t : {1, 17, 65})
      for (int hd : {7, 8})
        for (auto [hq, hkv] : {std::pair{6, 6}, {6, 3}, {6, 2}, {6, 1}, {1, 1}}) {
          int rep = hq / hkv;
          // split: source [b, t, hs, hd] -> [b, hq, t, hd]; hs = hq (rep 1) or hkv (rep)
          for (int pass = 0; pass < 2; ++pass) {
            int hs = pass == 0 ? hq : hkv, rp = pass == 0 ? 1 : rep;
            if (pass == 1 && rep == 1) continue;
            V src = randv(R, (size_t)b * t * hs * hd), dst((size_t)b * hq * t * hd, NAN);
            launch(split_heads_f32, ewgrid(dst.size()), EW, dst.data(), (const float*)src.data(), b,
                   t, hq, hs, hd, rp);
            D ref(dst.size());
            for (int bi = 0; bi < b; ++bi)
              for (int h = 0; h < hq; ++h)
                for (int ti = 0; ti < t; ++ti)
                  for (int j = 0; j < hd; ++j)
                    ref[(((size_t)bi * hq + h) * t + ti) * hd + j] =
                        src[(((size_t)bi * t + ti) * hs + h / rp) * hd + j];
            Err e;
            e.addv(dst, ref);
            if (e.maxabs != 0) e.bad = true;
            result("split_heads_f32", fmt("b=%d t=%d hq=%d hs=%d hd=%d rep=%d", b, t, hq, hs, hd, rp),
                   e, 0);
          }
          // merge: [b, hq, t, hd] -> [b, t, heads, hd] summing rep heads
          for (int pass = 0; pass < 2; ++pass) {
            int heads = pass == 0 ? hq : hkv, rp = pass == 0 ? 1 : rep;
            if (pass == 1 && rep == 1) continue;
            V src = randv(R, (size_t)b * hq * t * hd), dst((size_t)b * t * heads * hd, NAN);
            launch(merge_heads_f32, ewgrid(dst.size()), EW, dst.data(), (const float*)src.data(), b,
                   t, heads, hd, rp);
            D ref(dst.size(), 0.0);
            for (int bi = 0; bi < b; ++bi)
              for (int h = 0; h < hq; ++h)
                for (int ti = 0; ti < t; ++ti)
                  for (int j = 0; j < hd; ++j)
                    ref[(((size_t)bi * t + ti) * heads + h / rp) * hd + j] +=
                        src[(((size_t)bi * hq + h) * t + ti) * hd + j];
            Err e;
            e.addv(dst, ref);
            result("merge_heads_f32", fmt("b=%d t=%d heads=%d hd=%d rep=%d", b, t, heads, hd, rp), e,
                   1e-6);
          }
        }
}

static void t_softmax(Rng& R) {
  for (int bh : {1, 3})
    for (int t : {1, 17, 65, 300})
      for (int causal : {0, 1}) {
        if (g_small && (bh == 3 || t == 65 || (t == 300 && !causal))) continue;
        int rows = bh * t;
        V p = randv(R, (size_t)rows * t, -6, 6), p0 = p;
        launch(softmax_fwd_f32, rows, ROW, p.data(), t, causal);
        D ref((size_t)rows * t, 0.0);
        Err e;
        for (int r = 0; r < rows; ++r) {
          int n = causal ? r % t + 1 : t;
          double mx = -INFINITY, s = 0;
          for (int j = 0; j < n; ++j) mx = std::max(mx, (double)p0[(size_t)r * t + j]);
          for (int j = 0; j < n; ++j) s += std::exp(p0[(size_t)r * t + j] - mx);
          for (int j = 0; j < n; ++j) ref[(size_t)r * t + j] = std::exp(p0[(size_t)r * t + j] - mx) / s;
          for (int j = n; j < t; ++j)
            if (p[(size_t)r * t + j] != 0.0f) e.bad = true;  // masked entries exactly 0
        }
        e.addv(p, ref);
        result("softmax_fwd_f32", fmt("rows=%d t=%d causal=%d", rows, t, causal), e, 2e-6);

        // backward on these probabilities
        float scale = 0.125f;
        V dp = randv(R, (size_t)rows * t), dp0 = dp;
        launch(softmax_bwd_f32, rows, ROW, dp.data(), (const float*)p.data(), t, scale);
        D rd((size_t)rows * t);
        for (int r = 0; r < rows; ++r) {
          double dot = 0;
          for (int j = 0; j < t; ++j) dot += (double)dp0[(size_t)r * t + j] * p[(size_t)r * t + j];
          for (int j = 0; j < t; ++j)
            rd[(size_t)r * t + j] = scale * (double)p[(size_t)r * t + j] * (dp0[(size_t)r * t + j] - dot);
        }
        Err f;
        f.addv(dp, rd);
        result("softmax_bwd_f32", fmt("rows=%d t=%d (P causal=%d)", rows, t, causal), f, 2e-6);
      }
}

static double sigm(double x) { return 1 / (1 + std::exp(-x)); }
static const double GC = 0.7978845608028654;

static void t_act(Rng& R) {
  for (size_t n : {1, 7, 300, 1000, 5000}) {
    V x = randv(R, n, -8, 8), up = randv(R, n), dout = randv(R, n);
    if (n > 1) x[0] = -100.f;
    if (n == 1) x[0] = 0.75f;
    V o(n, NAN), o2(n, NAN);
    D r(n), r2(n);
    Err e;
    launch(quick_gelu_fwd_f32, ewgrid(n), EW, o.data(), (const float*)x.data(), (long long)n);
    for (size_t i = 0; i < n; ++i) r[i] = x[i] * sigm(1.702 * x[i]);
    e.addv(o, r);
    result("quick_gelu_fwd_f32", fmt("n=%zu", n), e, 2e-6);

    e = Err();
    launch(gelu_fwd_f32, ewgrid(n), EW, o.data(), (const float*)x.data(), (long long)n);
    for (size_t i = 0; i < n; ++i) {
      double v = x[i];
      r[i] = 0.5 * v * (1 + std::tanh(GC * (v + 0.044715 * v * v * v)));
    }
    e.addv(o, r);
    result("gelu_fwd_f32", fmt("n=%zu", n), e, 2e-6);

    e = Err();
    launch(gelu_bwd_f32, ewgrid(n), EW, o.data(), (const float*)dout.data(), (const float*)x.data(),
           (long long)n);
    for (size_t i = 0; i < n; ++i) {
      double v = x[i], th = std::tanh(GC * (v + 0.044715 * v * v * v));
      r[i] = dout[i] * (0.5 * (1 + th) + 0.5 * v * (1 - th * th) * GC * (1 + 3 * 0.044715 * v * v));
    }
    e.addv(o, r);
    result("gelu_bwd_f32", fmt("n=%zu", n), e, 2e-6);

    e = Err();
    launch(swiglu_fwd_f32, ewgrid(n), EW, o.data(), (const float*)x.data(), (const float*)up.data(),
           (long long)n);
    for (size_t i = 0; i < n; ++i) r[i] = x[i] * sigm(x[i]) * up[i];
    e.addv(o, r);
    result("swiglu_fwd_f32", fmt("n=%zu", n), e, 2e-6);

    e = Err();
    Err e2;
    launch(swiglu_bwd_f32, ewgrid(n), EW, o.data(), o2.data(), (const float*)dout.data(),
           (const float*)x.data(), (const float*)up.data(), (long long)n);
    for (size_t i = 0; i < n; ++i) {
      double g = x[i], u = up[i], go = dout[i], sg = sigm(g);
      r[i] = go * u * sg * (1 + g * (1 - sg));
      r2[i] = go * g * sg;
    }
    e.addv(o, r);
    e2.addv(o2, r2);
    e.merge(e2);
    result("swiglu_bwd_f32", fmt("n=%zu", n), e, 2e-6);
  }
}

// f32 tail of the tanh form: absolute error for x in [-12, -3]
static void t_gelu_tail(Rng& R) {
  size_t n = 2000;
  V x(n), o(n), ob(n), one(n, 1.0f);
  for (size_t i = 0; i < n; ++i) x[i] = -3.0f - 9.0f * i / n;
  launch(gelu_fwd_f32, 3, EW, o.data(), (const float*)x.data(), (long long)n);
  launch(gelu_bwd_f32, 3, EW, ob.data(), (const float*)one.data(), (const float*)x.data(), (long long)n);
  double ma = 0, mb = 0, xa = 0, xb = 0;
  for (size_t i = 0; i < n; ++i) {
    double v = x[i], th = std::tanh(GC * (v + 0.044715 * v * v * v));
    double r = 0.5 * v * (1 + th), rb = 0.5 * (1 + th) + 0.5 * v * (1 - th * th) * GC * (1 + 3 * 0.044715 * v * v);
    if (std::fabs(o[i] - r) > ma) ma = std::fabs(o[i] - r), xa = v;
    if (std::fabs(ob[i] - rb) > mb) mb = std::fabs(ob[i] - rb), xb = v;
  }
  printf("TAIL gelu_fwd max abs err %.3e at x=%.3f; gelu_bwd max abs err %.3e at x=%.3f\n", ma, xa, mb, xb);
}

static void t_embedding(Rng& R) {
  for (int vocab : {3, 1000})
    for (long long rows : {1, 5, 17})
      for (int dim : {1, 7, 300}) {
        std::vector<unsigned> ids(rows);
        for (auto& i : ids) i = (unsigned)(R.next() % vocab);
        if (rows > 2) ids[rows - 1] = ids[0];  // a repeated id at least
        V table = randv(R, (size_t)vocab * dim), out((size_t)rows * dim, NAN);
        launch(embedding_fwd_f32, ewgrid(out.size()), EW, out.data(), (const float*)table.data(),
               (const unsigned*)ids.data(), rows, dim);
        D ref(out.size());
        for (long long r = 0; r < rows; ++r)
          for (int j = 0; j < dim; ++j) ref[r * dim + j] = table[(size_t)ids[r] * dim + j];
        Err e;
        e.addv(out, ref);
        if (e.maxabs != 0) e.bad = true;
        result("embedding_fwd_f32", fmt("vocab=%d rows=%lld dim=%d", vocab, rows, dim), e, 0);

        V dtab = randv(R, (size_t)vocab * dim), dout = randv(R, (size_t)rows * dim);
        D rt(dtab.begin(), dtab.end());
        launch(embedding_bwd_f32, ewgrid(dout.size()), EW, dtab.data(), (const float*)dout.data(),
               (const unsigned*)ids.data(), rows, dim);
        for (long long r = 0; r < rows; ++r)
          for (int j = 0; j < dim; ++j) rt[(size_t)ids[r] * dim + j] += dout[r * dim + j];
        Err f;
        f.addv(dtab, rt);
        result("embedding_bwd_f32", fmt("vocab=%d rows=%lld dim=%d (repeats)", vocab, rows, dim), f,
               2e-6);
      }
}

static void t_xent(Rng& R) {
  for (int vocab : {1, 7, 300, 1000})
    for (int rows : {1, 5}) {
      V logits = randv(R, (size_t)rows * vocab, -8, 8);
      std::vector<unsigned> tg(rows);
      V w(rows);
      const float ws[5] = {1.0f, 0.0f, 0.5f, 2.0f, 0.0f};
      for (int r = 0; r < rows; ++r) {
        w[r] = ws[r];
        tg[r] = w[r] == 0 ? 0xFFFFFFFFu : (unsigned)(R.next() % vocab);  // masked: garbage target
      }
      V loss(rows, NAN), dl((size_t)rows * vocab, NAN);
      launch(cross_entropy_f32, rows, ROW, loss.data(), dl.data(), (const float*)logits.data(),
             (const unsigned*)tg.data(), (const float*)w.data(), vocab);
      D rl(rows), rd((size_t)rows * vocab);
      Err e1, e2;
      for (int r = 0; r < rows; ++r) {
        if (w[r] == 0) {
          rl[r] = 0;
          for (int j = 0; j < vocab; ++j) rd[(size_t)r * vocab + j] = 0;
          if (loss[r] != 0.0f) e1.bad = true;
          for (int j = 0; j < vocab; ++j)
            if (dl[(size_t)r * vocab + j] != 0.0f) e2.bad = true;
          continue;
        }
        const float* lg = &logits[(size_t)r * vocab];
        double mx = -INFINITY, s = 0;
        for (int j = 0; j < vocab; ++j) mx = std::max(mx, (double)lg[j]);
        for (int j = 0; j < vocab; ++j) s += std::exp(lg[j] - mx);
        double lse = mx + std::log(s);
        rl[r] = w[r] * (lse - lg[tg[r]]);
        for (int j = 0; j < vocab; ++j)
          rd[(size_t)r * vocab + j] = w[r] * (std::exp(lg[j] - lse) - (j == (int)tg[r] ? 1.0 : 0.0));
      }
      e1.addv(loss, rl);
      e2.addv(dl, rd);
      e1.merge(e2);
      result("cross_entropy_f32", fmt("rows=%d vocab=%d (w=0 rows masked)", rows, vocab), e1, 2e-6);
    }
}

static void t_patchify(Rng& R) {
  struct S {
    int b, c, s, p;
  };
  for (S sh : {S{2, 3, 8, 1}, S{2, 3, 8, 2}, S{2, 3, 8, 4}, S{1, 3, 8, 8}, S{2, 1, 6, 3}, S{1, 3, 14, 7}}) {
    int np = sh.s / sh.p;
    size_t pdim = (size_t)sh.c * sh.p * sh.p, n = (size_t)sh.b * np * np * pdim;
    V img = randv(R, (size_t)sh.b * sh.c * sh.s * sh.s), out(n, NAN);
    launch(patchify_f32, ewgrid(n), EW, out.data(), (const float*)img.data(), sh.b, sh.c, sh.s, sh.p);
    D ref(n);
    for (int bi = 0; bi < sh.b; ++bi)
      for (int py = 0; py < np; ++py)
        for (int px = 0; px < np; ++px) {
          size_t o = ((size_t)bi * np * np + py * np + px) * pdim, j = 0;
          for (int c = 0; c < sh.c; ++c)
            for (int ky = 0; ky < sh.p; ++ky)
              for (int kx = 0; kx < sh.p; ++kx)
                ref[o + j++] = img[(((size_t)bi * sh.c + c) * sh.s + py * sh.p + ky) * sh.s + px * sh.p + kx];
        }
    Err e;
    e.addv(out, ref);
    if (e.maxabs != 0) e.bad = true;
    result("patchify_f32", fmt("b=%d c=%d s=%d p=%d", sh.b, sh.c, sh.s, sh.p), e, 0);
  }
}

static void t_copy(Rng& R) {
  struct S {
    long long count, len, so, ss, dof, ds;
  };
  for (S s : {S{1, 1, 0, 1, 0, 1}, S{5, 7, 3, 9, 2, 11}, S{5, 300, 10, 300, 0, 310}, S{4, 7, 0, 7, 5, 20},
              S{3, 1000, 0, 1000, 1, 1001}}) {
    size_t sl = s.so + (s.count - 1) * s.ss + s.len + 3, dl = s.dof + (s.count - 1) * s.ds + s.len + 2;
    V src = randv(R, sl), dst = randv(R, dl);
    D ref(dst.begin(), dst.end());
    launch(copy_blocks_f32, ewgrid(s.count * s.len), EW, dst.data(), (const float*)src.data(), s.count,
           s.len, s.so, s.ss, s.dof, s.ds);
    for (long long b = 0; b < s.count; ++b)
      for (long long j = 0; j < s.len; ++j) ref[s.dof + b * s.ds + j] = src[s.so + b * s.ss + j];
    Err e;
    e.addv(dst, ref);
    if (e.maxabs != 0) e.bad = true;
    result("copy_blocks_f32",
           fmt("count=%lld len=%lld src(%lld,%lld) dst(%lld,%lld)", s.count, s.len, s.so, s.ss, s.dof, s.ds),
           e, 0);
  }
}

static void t_misc(Rng& R) {
  for (long long rows : {1, 5})
    for (long long cols : {1, 7, 300, 1000}) {
      V y = randv(R, rows * cols), bias = randv(R, cols);
      D ref(y.begin(), y.end());
      for (long long i = 0; i < rows * cols; ++i) ref[i] = (double)(y[i] + bias[i % cols]);
      launch(add_bias_f32, ewgrid(rows * cols), EW, y.data(), (const float*)bias.data(), rows, cols);
      Err e;
      e.addv(y, ref);
      if (e.maxabs != 0) e.bad = true;
      result("add_bias_f32", fmt("rows=%lld cols=%lld", rows, cols), e, 0);
    }
  for (long long n : {1, 7, 300, 1000, 5000}) {
    V y = randv(R, n), x = randv(R, n);
    float a = -0.37f;
    D ref(n);
    for (long long i = 0; i < n; ++i) ref[i] = (double)y[i] + (double)a * x[i];
    launch(axpy_f32, ewgrid(n), EW, y.data(), a, (const float*)x.data(), n);
    Err e;
    e.addv(y, ref);
    result("axpy_f32", fmt("n=%lld", n), e, 1e-6);

    V c = randv(R, n);
    float beta = 1.7f;
    D rc(n);
    for (long long i = 0; i < n; ++i) rc[i] = (double)c[i] * beta;
    launch(scale_f32, ewgrid(n), EW, c.data(), beta, n);
    Err f;
    f.addv(c, rc);
    result("scale_f32", fmt("n=%lld", n), f, 1e-6);
  }
  for (int b : {1, 3})
    for (int t : {1, 17, 65})
      for (int p : {1, 7, 300}) {
        V g = randv(R, (size_t)b * t * p), out((size_t)b * p, NAN);
        launch(sum_over_tokens_f32, ewgrid(out.size()), EW, out.data(), (const float*)g.data(), b, t, p);
        D ref((size_t)b * p, 0.0);
        for (int i = 0; i < b; ++i)
          for (int k = 0; k < t; ++k)
            for (int j = 0; j < p; ++j) ref[(size_t)i * p + j] += g[((size_t)i * t + k) * p + j];
        Err e;
        e.addv(out, ref);
        result("sum_over_tokens_f32", fmt("b=%d t=%d p=%d", b, t, p), e, 2e-6);
      }
  for (long long rows : {1, 5})
    for (long long cols : {1, 7, 300, 1000, 3000}) {
      V x = randv(R, rows * cols);
      D total(rows), ref(rows), bound(rows), ref_bound(rows);
      const double gamma = 3.1e-7;
      for (long long r = 0; r < rows; ++r) ref[r] = total[r] = R.uni(0, 10);
      for (long long r = 0; r < rows; ++r) ref_bound[r] = bound[r] = R.uni(0, 1e-6);
      launch(add_row_sq_norms_f32, rows, ROW, (const float*)x.data(), cols, gamma, total.data(),
             bound.data());
      for (long long r = 0; r < rows; ++r) {
        double s = 0;
        for (long long j = 0; j < cols; ++j) s += (double)x[r * cols + j] * x[r * cols + j];
        ref[r] += s;
        ref_bound[r] += gamma * std::sqrt(s);
      }
      Err e, eb;
      for (long long r = 0; r < rows; ++r) e.add(total[r], ref[r]), eb.add(bound[r], ref_bound[r]);
      e.merge(eb);
      result("add_row_sq_norms_f32", fmt("rows=%lld cols=%lld (accumulates, f64, bound)", rows, cols), e, 1e-13);
    }
}

int main(int argc, char** argv) {
  std::map<std::string, std::function<void(Rng&)>> tests = {
      {"layernorm", t_layernorm}, {"rmsnorm", t_rmsnorm}, {"rope", t_rope},       {"heads", t_heads},
      {"softmax", t_softmax},     {"act", t_act}, {"gelu_tail", t_gelu_tail},         {"embedding", t_embedding},
      {"xent", t_xent},           {"patchify", t_patchify}, {"copy", t_copy},     {"misc", t_misc}};
  if (argc < 2) {
    for (auto& [k, _] : tests) printf("%s\n", k.c_str());
    return 0;
  }
  if (argc > 2) g_conc = atoi(argv[2]);
  if (argc > 3) EW_GRID = atoi(argv[3]);
  if (getenv("EMU_TIMEOUT")) g_timeout_s = atof(getenv("EMU_TIMEOUT"));
  for (int a = 1; a < 2; ++a) {
    std::string name = argv[a];
    Rng R(std::hash<std::string>{}(name));
    if (name == "all")
      for (auto& [k, f] : tests) f(R);
    else
      tests.at(name)(R);
  }
  printf("DONE failures=%d reports=%zu\n", g_fail, g_reports.size());
  return g_fail || !g_reports.empty();
}
