// Counter-based random numbers for attention dropout: Philox4x32 with 10 rounds (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC 2011). Every implementation (CPU reference,
// CUDA, Triton, and the numpy twin pykern.ops.attention.dropout_keep_mask used by the tests)
// draws the same number for an element, so forward and backward recompute one mask and the
// backends agree bit for bit.
//
// The element (zh, i, j) of a (Z * Hq, L, S) score matrix (zh = z * Hq + h the flat query head,
// i the query row, j the key column) uses key (seed low 32 bits, seed high 32 bits) and counter
// (j, i, zh low 32 bits, zh high 32 bits); the first output word r decides: kept iff
// r >= drop_threshold, with drop_threshold = floor(dropout_p * 2^32) (dropout_threshold below).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace pykern {

constexpr uint32_t kPhiloxMulA = 0xD2511F53u;
constexpr uint32_t kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;  // key bumps (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

// The first output word of Philox4x32-10 at counter (c0, c1, c2, c3) under key (k0, k1).
PK_HOST_DEVICE uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                          uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxMulA) * c0;
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxMulB) * c2;
    const uint32_t hi_a = static_cast<uint32_t>(prod_a >> 32), lo_a = static_cast<uint32_t>(prod_a);
    const uint32_t hi_b = static_cast<uint32_t>(prod_b >> 32), lo_b = static_cast<uint32_t>(prod_b);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// Whether attention element (zh, i, j) survives dropout (see the top of this file).
PK_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t zh, uint32_t i, uint32_t j,
                                 uint32_t drop_threshold) {
  const uint32_t r = philox_first_word(j, i, static_cast<uint32_t>(zh),
                                       static_cast<uint32_t>(zh >> 32),
                                       static_cast<uint32_t>(seed),
                                       static_cast<uint32_t>(seed >> 32));
  return r >= drop_threshold;
}

// floor(p * 2^32) for p in [0, 1): exact in double, so every implementation gets the same value.
inline uint32_t dropout_threshold(double dropout_p) {
  return static_cast<uint32_t>(dropout_p * 4294967296.0);
}

}  // namespace pykern
