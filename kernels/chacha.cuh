// ChaCha20 block function (RFC 8439 section 2.3: 20 rounds, output = working state
// + input state), in djb's original layout: words 0-3 "expand 32-byte k", 4-11 the
// key, 12-13 the 64-bit block counter (lo, hi), 14-15 the 64-bit nonce (lo, hi).
// This is the layout rand_chacha uses. CPU twin: chacha20_block in src/dp/noise.rs.
#pragma once
#include <stdint.h>

namespace dp {

__device__ __forceinline__ uint32_t rotl32(uint32_t x, int n) {
  return (x << n) | (x >> (32 - n));
}

#define DP_CHACHA_QR(a, b, c, d)      \
  a += b; d = rotl32(d ^ a, 16);      \
  c += d; b = rotl32(b ^ c, 12);      \
  a += b; d = rotl32(d ^ a, 8);       \
  c += d; b = rotl32(b ^ c, 7);

// out[0..16] = ChaCha20(key, counter, nonce).
__device__ __forceinline__ void chacha20_block(const uint32_t key[8], uint64_t counter,
                                               uint64_t nonce, uint32_t out[16]) {
  const uint32_t in[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                           key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
                           (uint32_t)counter, (uint32_t)(counter >> 32),
                           (uint32_t)nonce, (uint32_t)(nonce >> 32)};
  uint32_t x0 = in[0], x1 = in[1], x2 = in[2], x3 = in[3], x4 = in[4], x5 = in[5],
           x6 = in[6], x7 = in[7], x8 = in[8], x9 = in[9], x10 = in[10], x11 = in[11],
           x12 = in[12], x13 = in[13], x14 = in[14], x15 = in[15];
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    DP_CHACHA_QR(x0, x4, x8, x12)
    DP_CHACHA_QR(x1, x5, x9, x13)
    DP_CHACHA_QR(x2, x6, x10, x14)
    DP_CHACHA_QR(x3, x7, x11, x15)
    DP_CHACHA_QR(x0, x5, x10, x15)
    DP_CHACHA_QR(x1, x6, x11, x12)
    DP_CHACHA_QR(x2, x7, x8, x13)
    DP_CHACHA_QR(x3, x4, x9, x14)
  }
  out[0] = x0 + in[0];   out[1] = x1 + in[1];   out[2] = x2 + in[2];   out[3] = x3 + in[3];
  out[4] = x4 + in[4];   out[5] = x5 + in[5];   out[6] = x6 + in[6];   out[7] = x7 + in[7];
  out[8] = x8 + in[8];   out[9] = x9 + in[9];   out[10] = x10 + in[10]; out[11] = x11 + in[11];
  out[12] = x12 + in[12]; out[13] = x13 + in[13]; out[14] = x14 + in[14]; out[15] = x15 + in[15];
}

#undef DP_CHACHA_QR

}  // namespace dp
