// Index division for CUDA kernels (pooling.cu, norm.cu).
#pragma once

#include <cstdint>

namespace pykern {

struct DivMod {
  int64_t q, r;
};

// a / b and a % b for a >= 0, b > 0. 64-bit division is a long software sequence on the GPU,
// so take the 32-bit one whenever both operands fit (nearly always): index math stays cheap.
__device__ __forceinline__ DivMod divmod(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) {
    const uint32_t q = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    return {static_cast<int64_t>(q), a - static_cast<int64_t>(q) * b};
  }
  const int64_t q = a / b;
  return {q, a - q * b};
}

}  // namespace pykern
