// The launch ABI of the DP kernels (clip.cu, noise.cu, prune.cu, tokens.cu): every
// constant a launcher relies on, and one argument struct per kernel (or kernel family),
// taken by value, so each kernel's argument order is declared once, here. The Rust
// mirrors are in src/gpu/abi.rs; the CPU emulator (tools/cuda-emu) fills the same
// structs.
//
// build.rs reads this file: every `constexpr` becomes a constant of crate::gpu::abi, and
// every struct's C layout (size, alignment, each field's offset and size) becomes a table
// that the Rust mirrors are checked against at compile time, while nvcc checks the same
// table with static_asserts. So that a small parser can read it, the file keeps to:
//   - `constexpr TYPE NAME = LITERAL;` on one line, after a comment (its rustdoc);
//   - structs, optionally `template <typename E>` (E: the element type of the float
//     tensors; the Rust mirrors and the checks are for E = float), one field
//     declaration per line, after a comment;
//   - field types int, unsigned int, long long, unsigned long long, (u)int32_t,
//     (u)int64_t, float, double, any pointer (one per line), a struct declared above;
//     arrays of a literal or constant length.
// Pointers are device addresses (u64 in Rust). Padding is spelled out as `pad` fields.
#pragma once
#include <stdint.h>

namespace dp {

// ---------------------------------------------------------------- noise streams

// Generator code of ChaCha20 (RFC 8439), the default and cryptographic one.
constexpr uint32_t RNG_CHACHA20 = 0;
// Generator code of Philox4x32-10 (Salmon et al., SC'11): fast, NOT cryptographic.
constexpr uint32_t RNG_PHILOX = 1;
// Standard normals per generator call: one 16-word block gives four Box-Muller pairs.
constexpr uint32_t NOISE_GROUP = 8;

// One noise stream: a domain key, its generator, a tensor and a step (NoiseKey in
// src/dp/noise.rs).
struct StreamArgs {
  // The domain key words.
  uint32_t key[8];
  // RNG_CHACHA20 or RNG_PHILOX.
  uint32_t rng;
  // The tensor's stream index.
  uint32_t tensor_id;
  // The training step.
  uint32_t step;
  // Padding.
  uint32_t pad;
};

// ---------------------------------------------------------------- clip.cu

// Threads per block of the norm kernels (16 x 16 threads, 2 x 2 tile outputs each; the
// rounding bound runs one warp per token) and the block the launcher gives the others.
constexpr uint32_t CLIP_THREADS = 256;
// Edge of the norm kernels' output tiles: the grids count tiles of this size.
constexpr uint32_t CLIP_TILE = 32;

// ghost_sq_norm_f32 and inst_sq_norm_f32: out[b] += example b's squared weight-gradient
// norm of one linear layer.
template <typename E>
struct SqNormArgs {
  // Inputs X, B x t x d, row-major.
  const E* x;
  // Output gradients G, B x t x p, row-major.
  const E* g;
  // Per-example totals [B], added into.
  double* out;
  // Tokens per example.
  int t;
  // Input features.
  int d;
  // Output features.
  int p;
  // Padding.
  int pad;
};

// bias_sq_norm_f32: out[b] += ||sum_t G_b,t||^2.
template <typename E>
struct BiasSqNormArgs {
  // Output gradients G, B x t x p.
  const E* g;
  // Per-example totals [B], added into.
  double* out;
  // Tokens per example.
  int t;
  // Output features.
  int p;
};

// rounding_bound_f32: out[b] += gamma * sum_t ||x_b,t|| (||g_b,t|| (+ 1 with a bias)).
template <typename E>
struct RoundingBoundArgs {
  // Inputs X, B x t x d.
  const E* x;
  // Output gradients G, B x t x p.
  const E* g;
  // Per-example bounds [B], added into.
  double* out;
  // The layer's rounding factor (clip::layer_gamma).
  double gamma;
  // Tokens per example.
  int t;
  // Input features.
  int d;
  // Output features.
  int p;
  // 1 when the layer has a bias.
  int has_bias;
};

// clip_factors_f32: c[b] from the squared norms and rounding bounds.
struct ClipFactorsArgs {
  // Total squared norms [B].
  const double* sq;
  // Rounding bounds [B].
  const double* bound;
  // Clip factors [B], written.
  float* c;
  // [non-finite norms, zero factors], added into.
  unsigned long long* counts;
  // Batch size.
  int b;
  // The clip norm C.
  float clip_norm;
};

// scale_examples_f32 (y = c * x) and mask_examples_f32 (y = x, absent examples zeroed)
// over a B x per_example tensor.
template <typename E>
struct ExamplesArgs {
  // The source tensor.
  const E* x;
  // Per-example factors [B].
  const float* c;
  // The output, `total` values.
  E* y;
  // Values per example.
  long long per_example;
  // Values in all.
  long long total;
};

// clipped_bias_sum_f32: out[col] (+)= sum over present examples of c_b sum_t G_b,t,col.
template <typename E>
struct ClippedBiasSumArgs {
  // Output gradients G, B x t x p.
  const E* g;
  // Per-example factors [B].
  const float* c;
  // The sum [p].
  E* out;
  // Batch size.
  int b;
  // Tokens per example.
  int t;
  // Output features.
  int p;
  // 1: add into out; 0: overwrite it.
  int accumulate;
};

// ---------------------------------------------------------------- noise.cu

// Threads per block the launcher gives noise_axpy_f32 (any multiple of 32 works).
constexpr uint32_t NOISE_AXPY_THREADS = 256;
// Threads per block the launcher gives chacha20_blocks_test (any count works).
constexpr uint32_t CHACHA_TEST_THREADS = 64;

// noise_axpy_f32: y[j] = (accumulate ? y[j] : 0) + a * noise(offset + j) for j < n.
template <typename E>
struct NoiseAxpyArgs {
  // The noise stream.
  StreamArgs s;
  // Stream index of y[0].
  unsigned long long offset;
  // Length of y.
  unsigned long long n;
  // The scale.
  double a;
  // The output.
  E* y;
  // 1: add into y; 0: overwrite it.
  int accumulate;
  // Padding.
  int pad;
};

// chacha20_blocks_test: out[16 b ..] = ChaCha20 block (key, counter[b], nonce[b]).
struct ChachaBlocksArgs {
  // The key words.
  uint32_t key[8];
  // Block counters [nblocks].
  const unsigned long long* counter;
  // Nonces [nblocks].
  const unsigned long long* nonce;
  // Output words [16 nblocks].
  unsigned int* out;
  // Number of blocks.
  int nblocks;
  // Padding.
  int pad;
};

// ---------------------------------------------------------------- prune.cu

// Threads per block of prune_hist, prune_tie_count and prune_apply (their grid-stride
// loops and the apply scan assume exactly this many).
constexpr uint32_t PRUNE_THREADS = 256;
// Threads of prune_pick: exactly one warp.
constexpr uint32_t PRUNE_PICK_THREADS = 32;
// Threads of prune_tie_scan: a multiple of 32, at most 1024.
constexpr uint32_t PRUNE_SCAN_THREADS = 1024;
// Histogram bins of one radix pass (11 key bits).
constexpr uint32_t PRUNE_BINS = 2048;
// Coordinates per prune_apply / prune_tie_count block: a multiple of NOISE_GROUP (a
// group never straddles two chunks) and of 1024.
constexpr unsigned long long PRUNE_CHUNK = 8192;

// One tensor of the selection set.
template <typename E>
struct Segment {
  // The clipped sum.
  const E* grad;
  // The parameters, updated where kept.
  E* param;
  // Momentum (SGD) or first moment (AdamW); null for plain SGD.
  E* m;
  // Second moment (AdamW only); else null.
  E* v;
  // Number of coordinates.
  unsigned long long len;
  // Index of this tensor's first PRUNE_CHUNK in the set.
  unsigned long long chunk_base;
  // The tensor's noise stream index.
  unsigned int tensor_id;
  // Padding.
  unsigned int pad;
};

// The gradient noise of one step.
struct NoiseArgs {
  // The gradient-noise domain key words.
  unsigned int key[8];
  // RNG_CHACHA20 or RNG_PHILOX.
  unsigned int rng;
  // The training step.
  unsigned int step;
  // The noise standard deviation sigma * C.
  double std;
};

// The optimizer step: kind 0 = SGD (momentum may be 0), 1 = AdamW.
struct OptArgs {
  // 0: SGD; 1: AdamW.
  int kind;
  // Learning rate.
  float lr;
  // 1 / expected batch size.
  float inv_batch;
  // Decoupled (AdamW) or L2 (SGD) weight decay.
  float weight_decay;
  // SGD momentum.
  float momentum;
  // AdamW beta1.
  float beta1;
  // AdamW beta2.
  float beta2;
  // AdamW epsilon.
  float eps;
  // 1 - beta1^t.
  float bias_corr1;
  // 1 - beta2^t.
  float bias_corr2;
};

// The device-side state of one selection. Reset by the host before every call.
struct SelectState {
  // Histogram of the current pass (64-bit: a global set may exceed 2^32 coordinates).
  unsigned long long hist[PRUNE_BINS];
  // Key bits fixed so far (the threshold after the last pass).
  unsigned int prefix;
  // Which bits those are.
  unsigned int prefix_mask;
  // Coordinates to keep.
  unsigned long long k;
  // 1-based rank still sought within the current bucket.
  unsigned long long rank;
  // Coordinates whose key equals the threshold.
  unsigned long long count_eq;
  // How many of those are kept.
  unsigned long long ties_to_keep;
  // Non-finite noisy values seen in pass 0.
  unsigned long long nonfinite;
  // Coordinates updated.
  unsigned long long kept;
  // 1 when k == n: no selection.
  int keep_all;
  // Padding.
  int pad;
};

// Every prune_* kernel: one selection set's buffers and parameters.
template <typename E>
struct PruneArgs {
  // The segments [nsegs].
  const Segment<E>* segs;
  // The selection state.
  SelectState* st;
  // Threshold ties per chunk [nchunks].
  unsigned int* chunk_ties;
  // Exclusive prefix of chunk_ties [nchunks].
  unsigned long long* chunk_offset;
  // Chunks in the set.
  unsigned long long nchunks;
  // The gradient noise.
  NoiseArgs noise;
  // The optimizer step.
  OptArgs opt;
  // Number of segments.
  int nsegs;
  // The radix pass (0, 1, 2) of prune_hist and prune_pick.
  int pass;
};

// ---------------------------------------------------------------- tokens.cu

// The largest P = N - 1 that tokens_select handles: one thread per patch in one block.
constexpr uint32_t TOKENS_MAX_PATCHES = 1024;
// Marks a remaining token that joins no cluster (a center, or every token when M = 0).
constexpr uint32_t TOKENS_NOT_A_MEMBER = 0xFFFFFFFFu;
// Keys are normalised by max(||k||, this), as KEY_NORM_EPS in src/vision/tokens.rs.
constexpr float TOKENS_KEY_NORM_EPS = 1e-12f;
// Threads per block of tokens_key_metric (a multiple of 32: one warp per token).
constexpr uint32_t TOKENS_METRIC_THREADS = 256;
// Largest block of tokens_gather_fuse (over the hidden dimension).
constexpr uint32_t TOKENS_GATHER_THREADS = 256;

// tokens_key_metric: metric[t] = normalised head mean of keys[t].
template <typename E>
struct TokensKeyMetricArgs {
  // Keys [bn, h * hd].
  const E* keys;
  // The metric [bn, hd], written.
  float* metric;
  // Tokens in all (B * N).
  int bn;
  // Heads.
  int h;
  // Head dimension.
  int hd;
  // Padding.
  int pad;
};

// tokens_select: one image's scores, top-K, centers and assignments per block.
template <typename E>
struct TokensSelectArgs {
  // CLS attention rows [B, h, n].
  const E* attn;
  // The key metric [B, n, hd] (not read when m == 0).
  const float* metric;
  // Out: 0, then the dominant token indices ascending [B, 1 + k].
  unsigned int* kept;
  // Out: the other patch token indices ascending [B, R].
  unsigned int* remaining;
  // Out: token index of each center [B, m].
  unsigned int* centers;
  // Out: center slot of each remaining token, or TOKENS_NOT_A_MEMBER [B, R].
  unsigned int* assign;
  // Tokens per image (CLS + patches).
  int n;
  // Heads.
  int h;
  // Head dimension.
  int hd;
  // Dominant patches kept.
  int k;
  // Contextual (merged) tokens.
  int m;
  // Padding.
  int pad;
};

// tokens_gather_fuse: the output tokens [B, 1 + k + m, d].
template <typename E>
struct TokensGatherFuseArgs {
  // Hidden states [B, n, d].
  const E* hidden;
  // From tokens_select [B, 1 + k].
  const unsigned int* kept;
  // From tokens_select [B, R].
  const unsigned int* remaining;
  // From tokens_select [B, m].
  const unsigned int* centers;
  // From tokens_select [B, R].
  const unsigned int* assign;
  // The output [B, 1 + k + m, d].
  E* out;
  // The noise stream of the contextual tokens.
  StreamArgs noise;
  // Tokens per image.
  int n;
  // Hidden dimension.
  int d;
  // Dominant patches kept.
  int k;
  // Contextual tokens.
  int m;
  // Noise standard deviation (0: none).
  float noise_std;
  // Padding.
  int pad;
};

}  // namespace dp
