// Type switches shared by CPU and CUDA code.
//
// Layout ops move bytes, not numbers, so they switch on the element size and use a plain
// storage type of that width: one instantiation covers every dtype torch has (bool, ints,
// floats, complex, float8 ...).
#pragma once

#include <cstdint>

#include "common/checks.h"

namespace pykern {

struct alignas(16) Bytes16 {
  uint64_t lo, hi;
};

template <int kBytes>
struct StorageOf;
template <>
struct StorageOf<1> { using type = uint8_t; };
template <>
struct StorageOf<2> { using type = uint16_t; };
template <>
struct StorageOf<4> { using type = uint32_t; };
template <>
struct StorageOf<8> { using type = uint64_t; };
template <>
struct StorageOf<16> { using type = Bytes16; };

}  // namespace pykern

// Runs the body with `scalar_t` a storage type of `element_size` bytes.
#define PK_DISPATCH_BY_ELEMENT_SIZE(fn, element_size, ...)                              \
  [&] {                                                                                 \
    switch (element_size) {                                                             \
      case 1: { using scalar_t = ::pykern::StorageOf<1>::type; return __VA_ARGS__(); }  \
      case 2: { using scalar_t = ::pykern::StorageOf<2>::type; return __VA_ARGS__(); }  \
      case 4: { using scalar_t = ::pykern::StorageOf<4>::type; return __VA_ARGS__(); }  \
      case 8: { using scalar_t = ::pykern::StorageOf<8>::type; return __VA_ARGS__(); }  \
      case 16: { using scalar_t = ::pykern::StorageOf<16>::type; return __VA_ARGS__(); } \
      default:                                                                          \
        PK_CHECK_TYPE(false, fn ": unsupported element size ", (element_size), " bytes"); \
    }                                                                                   \
  }()
