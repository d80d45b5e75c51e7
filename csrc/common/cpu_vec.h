// GCC vector types for the CPU hot loops (csrc/cpu/norm.cpp, attention.cpp): 32 bytes, one AVX2
// register (two SSE registers in the default clone, see cpu_hot_loop.h), with unaligned loads
// and stores. They only travel between always-inline functions, so no ABI is involved.
#pragma once

#include <cstdint>

#include "common/cpu_hot_loop.h"

namespace pykern {

template <typename acc_t>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t mask __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t mask __attribute__((vector_size(32)));
};
template <typename acc_t>
using vec_t = typename VecOf<acc_t>::type;
template <typename acc_t>
constexpr int64_t kLanes = 32 / static_cast<int64_t>(sizeof(acc_t));

template <typename acc_t>
PK_INLINE vec_t<acc_t> vload(const acc_t* p) {
  vec_t<acc_t> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
PK_INLINE void vstore(acc_t* p, vec_t<acc_t> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

}  // namespace pykern
