// Runs the real kernels/prune.cu under shim.h, in the launch sequence of
// PrunePlan::run (src/gpu/prune.rs: hist/pick x3, tie count/scan, apply; one
// dp::PruneArgs for all, geometry from abi.h), and checks it bit for bit against a
// reference written from src/dp/prune.rs: noisy values (float)(std * z + grad) in f64,
// the k largest magnitude keys with ties broken by position in the set, the masked
// SGD / momentum / AdamW update (Optimizer::update's operation order), the threshold,
// the kept count, and a NaN that stops the step with nothing written. Segment lengths
// sit around the 8192-coordinate chunk; sets of one and of several tensors.
#include "shim.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>

#include "prune_emu.cu"

#include "check.h"

// One tensor: gradient (clipped sum), parameters and moments.
struct Tensor {
  unsigned id;
  std::vector<float> grad, param, m, v;
};

enum Opt { SGD, MOMENTUM, ADAMW };

static dp::OptArgs opt_args(Opt o) {
  dp::OptArgs a{};
  a.inv_batch = 1.0f / 64;
  a.bias_corr1 = a.bias_corr2 = 1.0f;
  if (o == ADAMW) {
    a.kind = 1;
    a.lr = 1e-3f;
    a.beta1 = 0.9f;
    a.beta2 = 0.999f;
    a.eps = 1e-8f;
    a.weight_decay = 0.01f;
    a.bias_corr1 = (float)(1.0 - std::pow(0.9, 3));  // t = 3, as bias_corrections
    a.bias_corr2 = (float)(1.0 - std::pow(0.999, 3));
  } else {
    a.lr = 0.05f;
    a.weight_decay = 1e-4f;
    a.momentum = o == MOMENTUM ? 0.9f : 0.0f;
  }
  return a;
}

// Optimizer::update in src/dp/prune.rs.
static void update_ref(const dp::OptArgs& o, float noisy, float* p, float* m, float* v) {
  const float g = noisy * o.inv_batch, w = *p;
  if (o.kind == 0) {
    float gg = std::fmaf(o.weight_decay, w, g);
    if (o.momentum != 0.0f) {
      *m = std::fmaf(o.momentum, *m, gg);
      gg = *m;
    }
    *p = std::fmaf(-o.lr, gg, w);
  } else {
    *m = std::fmaf(o.beta1, *m, (1.0f - o.beta1) * g);
    *v = std::fmaf(o.beta2, *v, (1.0f - o.beta2) * g * g);
    const float upd = (*m / o.bias_corr1) / (std::sqrt(*v / o.bias_corr2) + o.eps);
    *p = std::fmaf(-o.lr, std::fmaf(o.weight_decay, w, upd), w);
  }
}

struct Report {
  unsigned long long kept, nonfinite;
  float threshold;
};

// PrunePlan::run on the emulator: a selection set of `ts`, keeping k coordinates.
static Report run_kernels(std::vector<Tensor>& ts, const dp::NoiseArgs& na, const dp::OptArgs& oa,
                          unsigned long long k) {
  std::vector<dp::Segment<float>> segs;
  unsigned long long n = 0, chunks = 0;
  for (Tensor& t : ts) {
    if (t.grad.empty()) continue;
    dp::Segment<float> s{};
    s.grad = t.grad.data();
    s.param = t.param.data();
    s.m = t.m.empty() ? nullptr : t.m.data();
    s.v = t.v.empty() ? nullptr : t.v.data();
    s.len = t.grad.size();
    s.chunk_base = chunks;
    s.tensor_id = t.id;
    segs.push_back(s);
    n += s.len;
    chunks += (s.len + dp::PRUNE_CHUNK - 1) / dp::PRUNE_CHUNK;
  }
  const bool keep_all = k == n, selecting = k > 0 && !keep_all;
  auto st = std::make_unique<dp::SelectState>();
  memset(st.get(), 0, sizeof *st);
  st->k = st->rank = k;
  st->keep_all = keep_all;
  std::vector<unsigned> ties(chunks + 1, 0xdeadbeefu);
  std::vector<unsigned long long> offs(chunks + 1, 0xdeadbeefull);
  dp::PruneArgs<float> a{.segs = segs.data(), .st = st.get(), .chunk_ties = ties.data(),
                         .chunk_offset = offs.data(), .nchunks = chunks, .noise = na, .opt = oa,
                         .nsegs = (int)segs.size(), .pass = 0};
  const unsigned hist_grid = 3;  // the launcher uses 4 * SMs; 3 makes the grid-stride wrap
  for (int pass = 0; pass < (selecting ? 3 : 1); ++pass) {
    a.pass = pass;
    launch(prune_hist, hist_grid, dp::PRUNE_THREADS, a);
    if (selecting) launch(prune_pick, 1, dp::PRUNE_PICK_THREADS, a);
  }
  if (selecting) {
    launch(prune_tie_count, (unsigned)chunks, dp::PRUNE_THREADS, a);
    launch(prune_tie_scan, 1, dp::PRUNE_SCAN_THREADS, a);
  }
  if (k > 0) launch(prune_apply, (unsigned)chunks, dp::PRUNE_THREADS, a);
  return {st->kept, st->nonfinite, selecting ? __uint_as_float(st->prefix) : 0.0f};
}

// The reference on copies of the tensors.
static Report run_reference(std::vector<Tensor>& ts, const dp::NoiseArgs& na, const dp::OptArgs& oa,
                            unsigned long long k) {
  struct Coord { size_t t, j; float noisy; unsigned key; };
  std::vector<Coord> cs;
  unsigned long long nonfinite = 0;
  for (size_t ti = 0; ti < ts.size(); ++ti) {
    const Tensor& t = ts[ti];
    for (size_t j = 0; j < t.grad.size(); ++j) {
      float noisy = t.grad[j];
      if (na.std != 0.0) {
        double z[8];
        dp::normal8(na.rng, na.key, t.id, na.step, j / 8, z);
        noisy = (float)(na.std * z[j % 8] + (double)t.grad[j]);
      }
      nonfinite += !std::isfinite(noisy);
      unsigned bits;
      memcpy(&bits, &noisy, 4);
      cs.push_back({ti, j, noisy, std::isfinite(noisy) ? bits & 0x7fffffffu : 0u});
    }
  }
  if (nonfinite || k == 0) return {0, nonfinite, 0.0f};
  const unsigned long long n = cs.size();
  // Stable sort by key, descending: equal keys stay in set order, so the first k win.
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return cs[x].key > cs[y].key; });
  for (unsigned long long r = 0; r < k; ++r) {
    const Coord& c = cs[order[r]];
    Tensor& t = ts[c.t];
    update_ref(oa, c.noisy, &t.param[c.j], t.m.empty() ? nullptr : &t.m[c.j],
               t.v.empty() ? nullptr : &t.v[c.j]);
  }
  float thr = 0.0f;
  if (k < n) memcpy(&thr, &cs[order[k - 1]].key, 4);
  return {k, 0, thr};
}

static bool same(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || memcmp(a.data(), b.data(), 4 * a.size()) == 0);
}

static std::vector<Tensor> make(Rng& R, const std::vector<size_t>& lens, Opt o, int fill) {
  std::vector<Tensor> ts;
  for (size_t i = 0; i < lens.size(); ++i) {
    Tensor t;
    t.id = 3 + 2 * (unsigned)i;
    for (size_t j = 0; j < lens[i]; ++j) {
      // fill 0: random; 1: a few distinct values (many ties); 2: zeros.
      t.grad.push_back(fill == 0 ? R.uni(-4, 4) : fill == 1 ? (float)((int)(R.next() % 5) - 2) : 0.0f);
      t.param.push_back(R.uni(-1, 1));
    }
    if (o != SGD) t.m.assign(lens[i], 0.0f);
    if (o != SGD)
      for (auto& x : t.m) x = R.uni(-0.1, 0.1);
    if (o == ADAMW) {
      t.v.assign(lens[i], 0.0f);
      for (auto& x : t.v) x = R.uni(0, 0.01);
    }
    ts.push_back(std::move(t));
  }
  return ts;
}

static int g_cases = 0, g_bad = 0;
static void one_case(const std::vector<size_t>& lens, Opt o, int fill, double std_, unsigned rng,
                     unsigned long long k, bool report_each) {
  Rng R(1000 + g_cases);
  std::vector<Tensor> dev = make(R, lens, o, fill), ref = dev;
  dp::NoiseArgs na{};
  for (int i = 0; i < 8; ++i) na.key[i] = 0x9e3779b9u * (i + 1);
  na.rng = rng;
  na.step = 17;
  na.std = std_;
  const dp::OptArgs oa = opt_args(o);
  const Report got = run_kernels(dev, na, oa, k), want = run_reference(ref, na, oa, k);
  bool ok = got.kept == want.kept && (got.nonfinite > 0) == (want.nonfinite > 0) &&
            memcmp(&got.threshold, &want.threshold, 4) == 0;
  for (size_t i = 0; i < dev.size(); ++i)
    ok &= same(dev[i].param, ref[i].param) && same(dev[i].m, ref[i].m) && same(dev[i].v, ref[i].v);
  ++g_cases;
  if (!ok) ++g_bad;
  if (!ok || report_each) {
    std::string l;
    for (size_t x : lens) l += std::to_string(x) + ",";
    char what[256];
    snprintf(what, sizeof what, "prune lens=[%s] opt=%d fill=%d std=%g rng=%u k=%llu: kept %llu/%llu thr %a/%a",
             l.c_str(), (int)o, fill, std_, rng, k, got.kept, want.kept, got.threshold, want.threshold);
    check(ok, what);
  }
}

int main() {
  const bool small = getenv("EMU_SMALL") != nullptr;
  // One tensor around the chunk size, and a global set of several (one empty).
  std::vector<std::vector<size_t>> sets = {{1}, {7}, {8191}, {8192}, {8193}, {5000, 0, 8192, 3, 9001}};
  if (small) sets = {{7}, {8193}, {50, 0, 8200}};
  for (const auto& lens : sets) {
    const unsigned long long n = std::accumulate(lens.begin(), lens.end(), 0ull);
    std::vector<unsigned long long> ks = {0, 1, n / 3, n / 2, n - 1, n};
    std::sort(ks.begin(), ks.end());
    ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
    const int before = g_bad;
    for (unsigned long long k : ks) {
      one_case(lens, SGD, 0, 0.7, dp::RNG_CHACHA20, k, false);
      one_case(lens, MOMENTUM, 1, 0.0, dp::RNG_CHACHA20, k, false);  // ties, no noise
      one_case(lens, ADAMW, 0, 1.3, dp::RNG_PHILOX, k, false);
      if (!small) one_case(lens, SGD, 2, 0.0, dp::RNG_CHACHA20, k, false);  // all keys 0
    }
    std::string l;
    for (size_t x : lens) l += std::to_string(x) + ",";
    check(g_bad == before, "prune pipeline bit for bit, lens=[" + l + "], k in {0, 1, n/3, n/2, n-1, n}, "
                           "SGD / momentum (ties) / AdamW (philox) / zeros");
  }
  // A NaN gradient: the step reports it and writes nothing.
  {
    Rng R(9);
    std::vector<Tensor> dev = make(R, {300, 9000}, ADAMW, 0), ref = dev;
    dev[1].grad[4321] = NAN;
    dp::NoiseArgs na{};
    na.std = 0.5;
    const Report got = run_kernels(dev, na, opt_args(ADAMW), 1000);
    bool untouched = true;
    for (size_t i = 0; i < dev.size(); ++i)
      untouched &= same(dev[i].param, ref[i].param) && same(dev[i].m, ref[i].m) && same(dev[i].v, ref[i].v);
    check(got.nonfinite == 1 && got.kept == 0 && untouched, "a NaN noisy value: counted, nothing written");
  }
  printf("DONE cases=%d failures=%d reports=%zu\n", g_cases, g_fail, g_reports.size());
  return g_fail || !g_reports.empty();
}
