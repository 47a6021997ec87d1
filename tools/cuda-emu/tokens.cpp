// Runs the real kernels/tokens.cu under shim.h, launched as src/gpu/tokens.rs launches
// them (one dp:: argument struct each, geometry from abi.h), and checks the plan
// (kept, remaining, centers, assign) and the output tokens bit for bit against a
// reference written from src/vision/tokens.rs: head-mean scores with NaN ranked lowest
// and ties to the lower index, the normalised key metric summed in order without FMA,
// centers every floor(R / M) remaining tokens, argmax cosine assignment (strict >),
// center + mean(members), and the optional f64 noise add at index (b M + m) D + d.
#include "shim.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>

#include "tokens_emu.cu"

#include "check.h"

struct Case { int b, n, h, hd, d, k, m; float noise_std; };

struct Plan {
  std::vector<unsigned> kept, remaining, centers, assign;
};

static float dot(const float* a, const float* b, int n) {
  float acc = 0.0f;
  for (int e = 0; e < n; ++e) acc += a[e] * b[e];  // each product rounded (no FMA)
  return acc;
}

// plan_tokens and gather_fuse of src/vision/tokens.rs.
static void reference(const Case& c, const std::vector<float>& attn, const std::vector<float>& keys,
                      const std::vector<float>& hidden, const dp::StreamArgs& noise, Plan& plan,
                      std::vector<float>& out) {
  const int P = c.n - 1, R = P - c.k, O = 1 + c.k + c.m;
  std::vector<float> metric((size_t)c.b * c.n * c.hd);
  for (size_t tok = 0; tok < (size_t)c.b * c.n; ++tok) {
    float* m = &metric[tok * c.hd];
    for (int e = 0; e < c.hd; ++e) {
      float acc = 0.0f;
      for (int h = 0; h < c.h; ++h) acc += keys[tok * c.h * c.hd + (size_t)h * c.hd + e];
      m[e] = acc / (float)c.h;
    }
    const float norm = std::max(std::sqrt(dot(m, m, c.hd)), dp::TOKENS_KEY_NORM_EPS);
    for (int e = 0; e < c.hd; ++e) m[e] /= norm;
  }
  for (int b = 0; b < c.b; ++b) {
    std::vector<float> score(P);
    for (int j = 0; j < P; ++j) {
      float acc = 0.0f;
      for (int h = 0; h < c.h; ++h) acc += attn[((size_t)b * c.h + h) * c.n + 1 + j];
      const float s = acc / (float)c.h;
      score[j] = std::isnan(s) ? -INFINITY : s == 0.0f ? 0.0f : s;  // rank_key
    }
    std::vector<int> order(P);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return score[x] > score[y]; });
    std::vector<int> top(order.begin(), order.begin() + c.k);
    std::sort(top.begin(), top.end());
    plan.kept.push_back(0);
    for (int j : top) plan.kept.push_back(j + 1);
    std::vector<unsigned> rem;
    for (int t = 1; t < c.n; ++t)
      if (!std::binary_search(top.begin(), top.end(), t - 1)) rem.push_back(t);
    plan.remaining.insert(plan.remaining.end(), rem.begin(), rem.end());
    std::vector<unsigned> asg(R, dp::TOKENS_NOT_A_MEMBER), cen;
    if (c.m > 0) {
      const int step = R / c.m;
      for (int i = 0; i < c.m; ++i) cen.push_back(rem[i * step]);
      auto row = [&](unsigned t) { return &metric[((size_t)b * c.n + t) * c.hd]; };
      for (int r = 0; r < R; ++r) {
        if (r % step == 0 && r / step < c.m) continue;
        int best = 0;
        float best_sim = dot(row(rem[r]), row(cen[0]), c.hd);
        for (int i = 1; i < c.m; ++i) {
          const float sim = dot(row(rem[r]), row(cen[i]), c.hd);
          if (sim > best_sim) best = i, best_sim = sim;
        }
        asg[r] = best;
      }
    }
    plan.centers.insert(plan.centers.end(), cen.begin(), cen.end());
    plan.assign.insert(plan.assign.end(), asg.begin(), asg.end());
    const float* img = &hidden[(size_t)b * c.n * c.d];
    float* dst = &out[(size_t)b * O * c.d];
    for (int o = 0; o <= c.k; ++o)
      memcpy(dst + (size_t)o * c.d, img + (size_t)plan.kept[(size_t)b * (1 + c.k) + o] * c.d, 4 * c.d);
    for (int i = 0; i < c.m; ++i)
      for (int e = 0; e < c.d; ++e) {
        float sum = 0.0f;
        int count = 0;
        for (int r = 0; r < R; ++r)
          if (asg[r] == (unsigned)i) sum += img[(size_t)rem[r] * c.d + e], ++count;
        float v = img[(size_t)cen[i] * c.d + e] + sum / (float)std::max(count, 1);
        if (c.noise_std > 0.0f) {
          const unsigned long long idx = ((unsigned long long)b * c.m + i) * c.d + e;
          double z[8];
          dp::normal8(noise, idx / 8, z);
          v = (float)((double)v + (double)c.noise_std * z[idx % 8]);
        }
        dst[(size_t)(1 + c.k + i) * c.d + e] = v;
      }
  }
}

static void one(const Case& c, int fill) {
  Rng R(c.n * 131 + c.k * 7 + c.m + fill);
  const int P = c.n - 1, Rm = P - c.k, O = 1 + c.k + c.m;
  std::vector<float> attn((size_t)c.b * c.h * c.n), keys((size_t)c.b * c.n * c.h * c.hd),
      hidden((size_t)c.b * c.n * c.d);
  for (auto& x : attn) x = fill == 1 ? (float)(R.next() % 3) * 0.25f : R.uni(0, 1);  // fill 1: ties
  if (fill == 2) attn[1 + (c.n - 1) / 2] = NAN;  // a NaN score (image 0, head 0) ranks lowest
  // fill 1: keys of a few values, so metric rows repeat and similarities tie.
  for (auto& x : keys) x = fill == 1 ? (float)((int)(R.next() % 3) - 1) : R.uni(-1, 1);
  for (auto& x : hidden) x = R.uni(-3, 3);
  dp::StreamArgs noise{};
  for (int i = 0; i < 8; ++i) noise.key[i] = 0x01020304u * (i + 1);
  noise.rng = fill == 2 ? dp::RNG_PHILOX : dp::RNG_CHACHA20;
  noise.tensor_id = 0x70000001u;
  Plan want;
  std::vector<float> want_out((size_t)c.b * O * c.d);
  reference(c, attn, keys, hidden, noise, want, want_out);

  // The device buffers hold at least one element (zero-length allocations are invalid).
  std::vector<float> metric(std::max<size_t>(1, c.m > 0 ? (size_t)c.b * c.n * c.hd : 0), NAN);
  std::vector<unsigned> kept((size_t)c.b * (1 + c.k), 7u), rem(std::max(1, c.b * Rm), 7u),
      cen(std::max(1, c.b * c.m), 7u), asg(std::max(1, c.b * Rm), 7u);
  std::vector<float> out((size_t)c.b * O * c.d, NAN);
  if (c.m > 0) {
    const unsigned warps = dp::TOKENS_METRIC_THREADS / 32;
    const unsigned grid = std::min<unsigned>((c.b * c.n + warps - 1) / warps, 1u << 16);
    launch(tokens_key_metric, grid, dp::TOKENS_METRIC_THREADS,
           dp::TokensKeyMetricArgs<float>{.keys = keys.data(), .metric = metric.data(), .bn = c.b * c.n,
                                          .h = c.h, .hd = c.hd});
  }
  const unsigned threads = std::max(1, (P + 31) / 32) * 32;
  launch(tokens_select, c.b, threads,
         dp::TokensSelectArgs<float>{.attn = attn.data(), .metric = metric.data(), .kept = kept.data(),
                                     .remaining = rem.data(), .centers = cen.data(), .assign = asg.data(),
                                     .n = c.n, .h = c.h, .hd = c.hd, .k = c.k, .m = c.m});
  const unsigned gt = std::min<unsigned>((c.d + 31) / 32 * 32, dp::TOKENS_GATHER_THREADS);
  launch(tokens_gather_fuse, dim3{(c.d + gt - 1) / gt, (unsigned)O, (unsigned)c.b}, gt,
         dp::TokensGatherFuseArgs<float>{.hidden = hidden.data(), .kept = kept.data(), .remaining = rem.data(),
                                         .centers = cen.data(), .assign = asg.data(), .out = out.data(),
                                         .noise = noise, .n = c.n, .d = c.d, .k = c.k, .m = c.m,
                                         .noise_std = c.noise_std});
  auto prefix = [](const std::vector<unsigned>& v, size_t n) { return std::vector<unsigned>(v.begin(), v.begin() + n); };
  const bool plan_ok = kept == want.kept && prefix(rem, c.b * Rm) == want.remaining &&
                       prefix(cen, c.b * c.m) == want.centers && prefix(asg, c.b * Rm) == want.assign;
  const bool out_ok = memcmp(out.data(), want_out.data(), 4 * out.size()) == 0;
  char what[200];
  snprintf(what, sizeof what, "tokens b=%d n=%d h=%d hd=%d d=%d k=%d m=%d std=%g fill=%d: plan %s, tokens %s",
           c.b, c.n, c.h, c.hd, c.d, c.k, c.m, c.noise_std, fill, plan_ok ? "bit for bit" : "DIFFERS",
           out_ok ? "bit for bit" : "DIFFER");
  check(plan_ok && out_ok, what);
}

int main() {
  const bool small = getenv("EMU_SMALL") != nullptr;
  std::vector<Case> cases = {
      {1, 2, 1, 1, 1, 0, 0, 0.0f},      // one patch, nothing kept or merged
      {2, 2, 2, 3, 5, 1, 0, 0.0f},      // K = P
      {2, 5, 3, 7, 33, 1, 2, 0.0f},     // M = R - 1
      {2, 5, 1, 4, 9, 0, 4, 0.5f},      // K = 0, M = R: every remaining token a center
      {2, 50, 3, 7, 33, 10, 5, 0.25f},  // several warps in tokens_select
      {1, 200, 2, 64, 300, 40, 16, 0.0f},
      {3, 65, 4, 9, 260, 7, 0, 0.0f},   // M = 0: no metric launch; D over two gather blocks
  };
  if (small) cases.resize(4);
  for (const Case& c : cases)
    for (int fill = 0; fill < 3; ++fill) one(c, fill);
  printf("DONE failures=%d reports=%zu\n", g_fail, g_reports.size());
  return g_fail || !g_reports.empty();
}
