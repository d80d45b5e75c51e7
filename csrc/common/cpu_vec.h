// GCC vector types for the CPU hot loops (csrc/cpu/norm.cpp, attention.cpp, pooling.cpp): 32 bytes, one AVX2
// register (two SSE registers in the default clone, see cpu_hot_loop.h), with unaligned loads
// and stores. They only travel between always-inline functions, so no ABI is involved.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "common/cpu_hot_loop.h"

// GCC notes that 32-byte vectors change the default target's ABI; these functions are always
// inline, so no call passes one.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// The lanes of a and b (b's lane i numbered lanes + i) picked by constant indices into a vector
// of a's type; Mask: the integer vector type of as many lanes of the same size. clang has
// __builtin_shufflevector, GCC __builtin_shuffle (its __builtin_shufflevector came in GCC 12).
#if defined(__clang__)
#define PK_SHUFFLE(a, b, Mask, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PK_SHUFFLE(a, b, Mask, ...) __builtin_shuffle(a, b, Mask{__VA_ARGS__})
#endif

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

// 8 bfloat16 <-> a float vector. bfloat16 is the top half of a float's bits (widening is
// exact); narrowing rounds to nearest even and makes every NaN 0x7FC0, as c10::BFloat16 does.
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

// Widening interleaves the halves with zero halves (little endian: the zero first) and takes
// the bits as floats (a cast keeps them): two unpacks and a lane permute in AVX2, where a
// zero-extension and shift compile to six instructions. (That needs a shuffle of two 8-lane
// vectors into 16 lanes, which GCC before 12 cannot write: there, the shift.)
PK_INLINE vec_t<float> vload_bf16(const c10::BFloat16* p) {
  u16x8 h;
  __builtin_memcpy(&h, p, sizeof(h));
#if defined(__clang__) || __GNUC__ >= 12
  const u16x8 zero{};
  return (vec_t<float>)__builtin_shufflevector(zero, h, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13,
                                               6, 14, 7, 15);
#else
  return (vec_t<float>)(__builtin_convertvector(h, u32x8) << 16);
#endif
}

// v's bits rounded to bfloat16 in the upper half of each lane.
PK_INLINE u32x8 bf16_round_bits(vec_t<float> v) {
  const u32x8 u = (u32x8)v;
  return v == v ? u + (((u >> 16) & 1u) + 0x7FFFu) : u32x8{} + 0x7FC00000u;
}

PK_INLINE void vstore_bf16(c10::BFloat16* p, vec_t<float> v) {
  const u16x8 h = __builtin_convertvector(bf16_round_bits(v) >> 16, u16x8);
  __builtin_memcpy(p, &h, sizeof(h));
}

// 16 bfloat16 <-> two float vectors a, b in a lane order of their own: channels 0-3 and 8-11 in
// a, 4-7 and 12-15 in b (what AVX2's in-lane unpacks give: one instruction a vector). For
// lane-wise work (sums, scaling) whose results go back through vstore2_bf16, which restores
// the order (its in-lane packing is the inverse).
PK_INLINE void vload2_bf16(const c10::BFloat16* p, vec_t<float>& a, vec_t<float>& b) {
  u16x16 h;
  __builtin_memcpy(&h, p, sizeof(h));
  const u16x16 zero{};
  a = (vec_t<float>)PK_SHUFFLE(zero, h, u16x16, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26,
                               11, 27);
  b = (vec_t<float>)PK_SHUFFLE(zero, h, u16x16, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30,
                               15, 31);
}

PK_INLINE void vstore2_bf16(c10::BFloat16* p, vec_t<float> a, vec_t<float> b) {
  const u16x16 x = (u16x16)bf16_round_bits(a), y = (u16x16)bf16_round_bits(b);
  const u16x16 h =
      PK_SHUFFLE(x, y, u16x16, 1, 3, 5, 7, 17, 19, 21, 23, 9, 11, 13, 15, 25, 27, 29, 31);
  __builtin_memcpy(p, &h, sizeof(h));
}

// v with lane i exchanged for lane i ^ D (D a power of two below the lane count): the step of
// a horizontal reduction, which combines v with swap_lanes<half>, then <quarter>, ... <1>, so
// that every lane (lane 0 included) ends up holding the result, in a fixed order.
template <int D, typename V>
PK_INLINE V swap_lanes(const V& v) {
  constexpr int kCount = sizeof(V) / sizeof(v[0]);
  static_assert(kCount == 4 || kCount == 8, "32-byte vectors of 4- or 8-byte lanes");
  static_assert(D > 0 && D < kCount && (D & (D - 1)) == 0, "D: a power of two below the lanes");
  using M = typename VecOf<std::conditional_t<kCount == 8, float, double>>::mask;
  if constexpr (kCount == 8) {
    return PK_SHUFFLE(v, v, M, 0 ^ D, 1 ^ D, 2 ^ D, 3 ^ D, 4 ^ D, 5 ^ D, 6 ^ D, 7 ^ D);
  } else {
    return PK_SHUFFLE(v, v, M, 0 ^ D, 1 ^ D, 2 ^ D, 3 ^ D);
  }
}

// All lanes of v combined by combine(a, b) (in place into a) in log2(lanes) swap_lanes steps,
// as lane 0's value. combine must be order-insensitive per pair (a sum, an or).
template <typename V, typename Combine>
PK_INLINE auto fold_all_lanes(const V& in, Combine combine) {
  constexpr int kCount = sizeof(V) / sizeof(in[0]);
  V v = in;
  if constexpr (kCount == 8) combine(v, swap_lanes<4>(v));
  combine(v, swap_lanes<2>(v));
  combine(v, swap_lanes<1>(v));
  return v[0];
}

}  // namespace pykern

#pragma GCC diagnostic pop
