// Multi-versioning of the CPU hot loops and their small shared helpers, used by csrc/cpu/*.cpp.
#pragma once

#include <cstdint>

// The hot loops are compiled twice, for AVX2 and for plain x86-64, and picked at load time:
// the wheel must run on any x86-64, and AVX2 doubles the width of the vector registers.
// (AVX2 without FMA: no contraction, so both versions round alike.)
#if defined(__x86_64__) && defined(__GNUC__)
#define PK_HOT_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define PK_HOT_LOOP
#endif

// Small helpers of the hot loops, forced inline so they vectorize inside them. Lambdas too
// (PK_INLINE_LAMBDA after the parameter list): out of line, a lambda is compiled for the default
// target only, not for the AVX2 clone of the function that holds it.
#if defined(__GNUC__)
#define PK_INLINE inline __attribute__((always_inline))
#define PK_INLINE_LAMBDA __attribute__((always_inline))
#else
#define PK_INLINE inline
#define PK_INLINE_LAMBDA
#endif

// Software prefetches of the `bytes` from p, a cache line (64 bytes) at a time: for walks the
// hardware prefetcher follows poorly (strided rows, a new page every row, windows).
PK_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}
