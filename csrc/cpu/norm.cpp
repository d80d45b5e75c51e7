// Normalization family, CPU reference. CUDA twin: csrc/cuda/norm.cu; Triton twin:
// triton_kernels/norm.py.
//
// Every big tensor is a contiguous (B, C, K) view (pykern/ops/norm.py builds it), so each
// kernel has two walks: K == 1, where the C elements of a row are contiguous (LayerNorm/RMSNorm
// rows, LayerNorm2d and BatchNorm of NHWC), and K > 1, where C is strided by K and K is
// contiguous (LayerNorm2d and BatchNorm of NCHW).
//
// Row norm (LayerNorm, RMSNorm, LayerNorm2d) normalizes each (b, k) over C.
//   K == 1, a row at a time. Forward: one pass for the mean and variance (sums around the
//   row's first element, plus an exact second pass over the row in cache where that would
//   lose accuracy), one write pass. Backward: one pass for xhat and the two row sums, one for
//   dx and the dweight/dbias partials.
//   K > 1, a tile of C x T elements (T consecutive k) at a time, every pass vectorized over k.
//   dweight/dbias: partial sums per group (a fixed partition of the rows or tiles), added in
//   group order.
// BatchNorm normalizes each channel c over (b, k).
//   Stats: per plane (NCHW) or per chunk of rows (NHWC), a mean and M2 from data in cache,
//   merged with Chan's formula in a fixed order, the means kept as offsets from a pivot per
//   channel (a mean of 1e4 with a spread of 1 keeps its variance in float32).
//   Forward and backward are elementwise with per-channel coefficients; the backward's two
//   channel sums use the stats' partition.
// Every partition depends on the shape only, never on the thread count: results are bitwise
// reproducible. Math in at::opmath_type (float for float, half and bfloat16); reductions in
// GCC vector types (lane_sum); float16 staged through float buffers (kStage).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_hot_loop.h"
#include "common/cpu_vec.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Work sizes (elements): a K > 1 tile (C x T) and an NHWC row chunk both fit in L2; below
// kParallelGrain elements one thread is faster.
constexpr int64_t kTileElems = 16384;
constexpr int64_t kChunkElems = 16384;
constexpr int64_t kParallelGrain = 1 << 15;
constexpr int64_t kMaxGroups = 64;  // partial-sum groups of the reductions over rows

// ---------------------------------------------------------------------------------------------
// Element conversion. float16 goes through branch-free bit arithmetic (c10's, with selects
// written as masks) because c10::Half's own conversion does not vectorize; both directions are
// exact (round to nearest even), as c10's. bfloat16's c10 conversion vectorizes as it is.

PK_INLINE float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
PK_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

PK_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t normal =
      float_to_bits(bits_to_float((two_w >> 4) + (0xE0u << 23)) * bits_to_float(15u << 23));
  const uint32_t denormal = float_to_bits(bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f);
  const uint32_t is_denormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));
  return bits_to_float(sign | (denormal & is_denormal) | (normal & ~is_denormal));
}

PK_INLINE uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * bits_to_float(239u << 23)) * bits_to_float(17u << 23);
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);
  return static_cast<uint16_t>((sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan));
}

template <typename T>
PK_INLINE acc_type<T> ld(T v) {
  return static_cast<acc_type<T>>(v);
}
template <>
PK_INLINE float ld<c10::Half>(c10::Half v) {
  return half_to_float(v.x);
}
template <typename T>
PK_INLINE T rnd(acc_type<T> v) {  // round once to the storage type
  return static_cast<T>(v);
}
template <>
PK_INLINE c10::Half rnd<c10::Half>(float v) {
  return c10::Half(float_to_half(v), c10::Half::from_bits());
}

// Whole runs of float16 <-> float, for the float16 staging below: F16C instructions where the
// CPU has them (every AVX2 CPU does), picked at load time (function multiversioning), else the
// bit arithmetic above. Both round to nearest even.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("default"))) void half_to_float_n(const c10::Half* in, float* out,
                                                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(in[i].x);
}
__attribute__((target("avx2,f16c"))) void half_to_float_n(const c10::Half* in, float* out,
                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(in + i))));
  }
  for (; i < n; ++i) out[i] = _cvtsh_ss(in[i].x);
}
__attribute__((target("default"))) void float_to_half_n(const float* in, c10::Half* out,
                                                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i].x = float_to_half(in[i]);
}
__attribute__((target("avx2,f16c"))) void float_to_half_n(const float* in, c10::Half* out,
                                                         int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) out[i].x = _cvtss_sh(in[i], _MM_FROUND_TO_NEAREST_INT);
}
#else
void half_to_float_n(const c10::Half* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(in[i].x);
}
void float_to_half_n(const float* in, c10::Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i].x = float_to_half(in[i]);
}
#endif

// float16 staging: the K == 1 row kernels and the batch-norm kernels run their float version on
// float copies of kStage-element pieces (whole rows where rows are needed, so up to C) and
// convert the results back with F16C: converting element by element inside the loops (bit
// arithmetic, since the hot loops' AVX2 clone has no F16C) costs more than the memory
// traffic. Per-thread buffers, grown on demand and kept.
constexpr int64_t kStage = 1024;

// A software prefetch kPrefetchAhead bytes ahead of a streamed input. In the BatchNorm walks
// over planes and elements: on a cold bfloat16 input the hardware prefetcher alone left the
// forward at a third of copy bandwidth (Xeon, 2026-11-26; 2.3x slower than with this). In the
// row-norm backward's first pass (rows are often a page each, where the hardware prefetcher
// starts over): 6-8% faster for float32, 20-25% for bfloat16.
constexpr int64_t kPrefetchAhead = 2048;

template <typename T>
PK_INLINE void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchAhead);
}

inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> bufs[8];
  std::vector<float>& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// A float copy of n float16 elements at p in scratch slot `slot`; null for a null p.
inline const float* staged(const c10::Half* p, int64_t n, int slot) {
  if (p == nullptr) return nullptr;
  float* out = scratch(slot, n);
  half_to_float_n(p, out, n);
  return out;
}

// Float copies of the planes b..b+planes of channel c (K elements each, of a (B, C, K) tensor),
// one after another, in scratch slot `slot`.
inline const float* staged_planes(const c10::Half* x, int64_t C, int64_t K, int64_t c, int64_t b,
                                  int64_t planes, int slot) {
  float* out = scratch(slot, planes * K);
  for (int64_t j = 0; j < planes; ++j) half_to_float_n(x + ((b + j) * C + c) * K, out + j * K, K);
  return out;
}

template <typename scalar_t>
constexpr bool kIsHalf = std::is_same_v<scalar_t, c10::Half>;

// ---------------------------------------------------------------------------------------------
// Reductions over contiguous acc rows, written with GCC vector types (32 bytes: one AVX2
// register, two SSE registers in the default clone) because the auto-vectorizer turns arrays
// of lane partials into shuffles and stack traffic. Two vectors of independent partials
// (16 float lanes) hide the add latency on rows in L1; they restart every kBlock elements and
// the block sums go into a second pair (a short error chain: 65536-element rows in float keep
// about 1e-7 relative error); the lanes are folded in a fixed order, the same in both clones.

// The vector types are only passed between always-inline functions: no ABI is involved (the
// warning fires where templates are instantiated, at the end of the file: left off for all).
#pragma GCC diagnostic ignored "-Wpsabi"

constexpr int64_t kBlock = 1024;

// Variance from one pass around a pivot: s1 = sum d and s2 = sum d^2 (d = v - pivot) give
// M2 = s2 - s1 * mean, which loses log2(s2 / M2) bits to cancellation. Up to kMaxCancel = 16
// (4 bits: the pivot within about 3.9 standard deviations of the mean, nearly always so, as the
// pivot is one of the values) the result is kept; past it, or on NaN, M2 is summed again
// exactly in a second pass over the data while it is in cache.
constexpr int kMaxCancel = 16;

// Horizontal sums, pairwise in a fixed order.
template <typename V>
PK_INLINE void add_into(V& a, const V& b) {
  a += b;
}
PK_INLINE float hsum(const vec_t<float>& v) { return fold_all_lanes(v, add_into<vec_t<float>>); }
PK_INLINE double hsum(const vec_t<double>& v) { return fold_all_lanes(v, add_into<vec_t<double>>); }

// kLanes<acc> elements of any input dtype as an acc vector: float16 and bfloat16 widened with
// the same bit arithmetic as ld() (exact), in vector registers.
template <typename scalar_t>
PK_INLINE vec_t<acc_type<scalar_t>> vload_acc(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return vload(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return vload_bf16(p);
  } else {  // float16: half_to_float, lane by lane
    using VF = vec_t<float>;
    u16x8 h;
    __builtin_memcpy(&h, p, sizeof(h));
    const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    const u32x8 sign = w & 0x80000000u;
    const u32x8 two_w = w + w;
    const u32x8 nbits = (two_w >> 4) + (0xE0u << 23);
    const VF normal = (VF)nbits * bits_to_float(15u << 23);
    const u32x8 dbits = (two_w >> 17) | (126u << 23);
    const VF denormal = (VF)dbits - 0.5f;
    const u32x8 is_denormal = (u32x8)(two_w < (1u << 27));  // all ones where true
    return (VF)(sign | ((u32x8)denormal & is_denormal) | ((u32x8)normal & ~is_denormal));
  }
}

// kLanes<acc> acc values stored as scalar_t, each rounded as rnd() rounds it, in vector
// registers. float16 never comes here (its kernels run on staged float copies).
template <typename scalar_t>
PK_INLINE void vstore_acc(scalar_t* p, vec_t<acc_type<scalar_t>> v) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    vstore(p, v);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::BFloat16>, "float16 is staged through float");
    vstore_bf16(p, v);
  }
}

// bfloat16 two vectors at a time (cpu_vec.h's vload2_bf16 / vstore2_bf16: half the instructions
// of vload_acc + vstore_acc) hold elements 0-3 and 8-11 in the first and 4-7 and 12-15 in the
// second ("pair order"). Per-element coefficients must be in pair order too (in_pair_order).
constexpr int kPairOrder[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

// The sum over i in [0, n) of a term: vterm(i) gives the terms i..i+kLanes as a vector,
// sterm(i) the term i alone (for the tail).
template <typename acc_t, typename VTerm, typename STerm>
PK_INLINE acc_t lane_sum(int64_t n, const VTerm& vterm, const STerm& sterm) {
  using V = vec_t<acc_t>;
  constexpr int W = kLanes<acc_t>;
  V t0{}, t1{};
  for (int64_t i = 0; i < n;) {
    const int64_t end = std::min(n, i + kBlock);
    V a0{}, a1{};
    for (; i + 2 * W <= end; i += 2 * W) {
      a0 += vterm(i);
      a1 += vterm(i + W);
    }
    if (i < end) {  // the last block's tail, as zero-padded vectors
      acc_t tail[2 * W] = {};
      for (int l = 0; i < end; ++i, ++l) tail[l] = sterm(i);
      a0 += vload(tail);
      a1 += vload(tail + W);
    }
    t0 += a0;
    t1 += a1;
  }
  return hsum(t0 + t1);
}

// Two sums in one pass: vstep(i, a, b) adds the terms i..i+kLanes into the vectors a and b,
// sstep(i, a, b) sets the scalars a and b to the terms i alone.
template <typename acc_t, typename VStep, typename SStep>
PK_INLINE void lane_sum2(int64_t n, const VStep& vstep, const SStep& sstep, acc_t& sum_a,
                         acc_t& sum_b) {
  using V = vec_t<acc_t>;
  constexpr int W = kLanes<acc_t>;
  V ta0{}, ta1{}, tb0{}, tb1{};
  for (int64_t i = 0; i < n;) {
    const int64_t end = std::min(n, i + kBlock);
    V a0{}, a1{}, b0{}, b1{};
    for (; i + 2 * W <= end; i += 2 * W) {
      vstep(i, a0, b0);
      vstep(i + W, a1, b1);
    }
    if (i < end) {
      acc_t ta[2 * W] = {}, tb[2 * W] = {};
      for (int l = 0; i < end; ++i, ++l) sstep(i, ta[l], tb[l]);
      a0 += vload(ta);
      a1 += vload(ta + W);
      b0 += vload(tb);
      b1 += vload(tb + W);
    }
    ta0 += a0;
    ta1 += a1;
    tb0 += b0;
    tb1 += b1;
  }
  sum_a = hsum(ta0 + ta1);
  sum_b = hsum(tb0 + tb1);
}

// Two sums over the planes b0..b1 of K elements each (plane b at base + b * stride), for planes
// short enough (K < kBlock, callers pass at most kBlock elements in all) that a horizontal sum
// per plane would cost more than the plane: vstep(o, a, b) sets the vectors a and b to the
// terms of elements o..o+kLanes, sstep(o, a, b) the scalars to the term of element o. A plane's
// ragged end is one more vector ending at its last element, the lanes summed already masked
// off (a bit mask: NaN there is dropped too); planes shorter than a vector go term by term.
template <typename acc_t, typename VStep, typename SStep>
PK_INLINE void plane_sum2(int64_t b0, int64_t b1, int64_t base, int64_t stride, int64_t K,
                          const VStep& vstep, const SStep& sstep, acc_t& sum_a, acc_t& sum_b) {
  using V = vec_t<acc_t>;
  using M = typename VecOf<acc_t>::mask;
  constexpr int W = kLanes<acc_t>;
  const int64_t rem = K % W;
  M keep;  // the lanes of the end vector not summed yet
  for (int l = 0; l < W; ++l) keep[l] = l >= W - rem ? -1 : 0;
  V a0{}, a1{}, q0{}, q1{}, u, v;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = base + b * stride;
    int64_t i = 0;
    for (; i + 2 * W <= K; i += 2 * W) {
      vstep(o + i, u, v);
      a0 += u;
      q0 += v;
      vstep(o + i + W, u, v);
      a1 += u;
      q1 += v;
    }
    if (i + W <= K) {
      vstep(o + i, u, v);
      a0 += u;
      q0 += v;
      i += W;
    }
    if (i < K && K >= W) {
      vstep(o + K - W, u, v);
      a1 += (V)((M)u & keep);
      q1 += (V)((M)v & keep);
    } else if (i < K) {
      acc_t ta[W] = {}, tb[W] = {};
      for (int l = 0; l < K; ++l) sstep(o + l, ta[l], tb[l]);
      a1 += vload(ta);
      q1 += vload(tb);
    }
  }
  sum_a = hsum(a0 + a1);
  sum_b = hsum(q0 + q1);
}

#define PK_TERM [&](int64_t i) __attribute__((always_inline))
#define PK_STEP [&](int64_t i, auto& a, auto& b) __attribute__((always_inline))

// sum of (v - m) (m = 0: the sum)
template <typename acc_t>
PK_INLINE acc_t dev_sum(const acc_t* __restrict v, int64_t n, acc_t m) {
  return lane_sum<acc_t>(
      n, PK_TERM { return vload(v + i) - m; }, PK_TERM { return v[i] - m; });
}

// sum of ((v - p) - m)^2 (p = m = 0: the sum of squares)
template <typename acc_t>
PK_INLINE acc_t sq_dev_sum(const acc_t* __restrict v, int64_t n, acc_t p, acc_t m) {
  return lane_sum<acc_t>(
      n,
      PK_TERM {
        const vec_t<acc_t> d = (vload(v + i) - p) - m;
        return d * d;
      },
      PK_TERM {
        const acc_t d = (v[i] - p) - m;
        return d * d;
      });
}

// sum of a * (b - m) (m = 0: the dot product)
template <typename acc_t>
PK_INLINE acc_t dot_dev(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n, acc_t m) {
  return lane_sum<acc_t>(
      n, PK_TERM { return vload(a + i) * (vload(b + i) - m); },
      PK_TERM { return a[i] * (b[i] - m); });
}

// (sum of d, sum of d^2) for d = v - m, in one pass
template <typename acc_t>
PK_INLINE void dev_sums(const acc_t* __restrict v, int64_t n, acc_t m, acc_t& s1, acc_t& s2) {
  lane_sum2<acc_t>(
      n,
      PK_STEP {
        const vec_t<acc_t> d = vload(v + i) - m;
        a += d;
        b += d * d;
      },
      PK_STEP {
        const acc_t d = v[i] - m;
        a = d;
        b = d * d;
      },
      s1, s2);
}

#undef PK_TERM
#undef PK_STEP

// n elements as acc: x itself when it already is (and nothing is added), else converted into
// buf. With a residual, s = x + residual rounded to x's dtype is written out and its rounded
// value is what the norm sees (torch's x + residual, then the norm).
template <typename scalar_t>
PK_INLINE const acc_type<scalar_t>* acc_view(const scalar_t* __restrict x,
                                             const scalar_t* __restrict res,
                                             scalar_t* __restrict s,
                                             acc_type<scalar_t>* __restrict buf, int64_t n) {
  const scalar_t* src = x;
  if (res != nullptr) {  // two simple loops: one fused loop does not vectorize for half
    for (int64_t i = 0; i < n; ++i) s[i] = rnd<scalar_t>(ld(x[i]) + ld(res[i]));
    src = s;
  }
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = ld(src[i]);
    return buf;
  }
}

// v, or +0 where `zero` holds: a bit mask rather than a select, so that the loops around it
// vectorize for every dtype. (v < 0 ? 0 : v keeps NaN and -0, as torch.relu.)
template <typename acc_t>
PK_INLINE acc_t zero_where(bool zero, acc_t v) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  const bits_t mask = bits_t(0) - static_cast<bits_t>(zero);
  return __builtin_bit_cast(acc_t, static_cast<bits_t>(__builtin_bit_cast(bits_t, v) & ~mask));
}

// Chan's merge of (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a), for n_b > 0.
template <typename acc_t>
PK_INLINE void chan_merge(int64_t& n_a, acc_t& mean_a, acc_t& m2_a, int64_t n_b, acc_t mean_b,
                          acc_t m2_b) {
  const int64_t n = n_a + n_b;
  const acc_t f_b = static_cast<acc_t>(n_b) / static_cast<acc_t>(n);
  const acc_t f_ab = static_cast<acc_t>(n_a) * f_b;
  const acc_t delta = mean_b - mean_a;
  mean_a += delta * f_b;
  m2_a += m2_b + delta * delta * f_ab;
  n_a = n;
}

// Splits [0, n) into `parts` ranges, the same for any thread count.
inline int64_t part_begin(int64_t n, int64_t parts, int64_t i) { return n * i / parts; }

// Groups of the reductions over rows: enough to share among threads, few enough that their
// partial vectors (groups x C) stay small.
inline int64_t group_count(int64_t items, int64_t C) {
  const int64_t by_size = std::max<int64_t>(1, (int64_t(1) << 21) / std::max<int64_t>(C, 1));
  return std::max<int64_t>(1, std::min({items, kMaxGroups, by_size}));
}

// NHWC chunks: R rows of C near kChunkElems elements; at most 256 rows, which keeps the
// per-channel error chains short.
inline int64_t chunk_rows(int64_t C) {
  return std::clamp<int64_t>(kChunkElems / std::max<int64_t>(C, 1), 1, 256);
}

// Tile width T for K > 1: C x T elements near kTileElems, a multiple of 16, at most K.
inline int64_t tile_width(int64_t C, int64_t K) {
  const int64_t t = std::max<int64_t>(16, kTileElems / std::max<int64_t>(C, 1) / 16 * 16);
  return std::min(t, K);
}

// Sums parts x n partial rows in part order into out (n).
template <typename acc_t>
void sum_parts(const acc_t* parts, int64_t count, int64_t n, acc_t* out) {
  constexpr int64_t kCols = 1024;  // columns per work item; each column summed in part order
#pragma omp parallel for schedule(static) if (count * n > kParallelGrain)
  for (int64_t i0 = 0; i0 < n; i0 += kCols) {
    const int64_t i1 = std::min(n, i0 + kCols);
    for (int64_t i = i0; i < i1; ++i) out[i] = acc_t(0);
    for (int64_t g = 0; g < count; ++g) {
      const acc_t* p = parts + g * n;
      for (int64_t i = i0; i < i1; ++i) out[i] += p[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row norm forward.

template <typename scalar_t>
struct RowFwd {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* res;  // or null
  const acc_t* w;       // C (ones when absent)
  const acc_t* bias;    // C (zeros when absent)
  scalar_t* y;
  scalar_t* s;          // or null (no residual)
  acc_t* mean;          // (B, K) or null (rms)
  acc_t* rstd;          // (B, K)
  int64_t C, K;
  acc_t eps;
  bool rms;
};

// K == 1: rows r0..r1.
template <typename scalar_t>
PK_HOT_LOOP void row_fwd_rows(const RowFwd<scalar_t>& p, int64_t r0, int64_t r1,
                              acc_type<scalar_t>* buf) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = p.C;
  const acc_t* __restrict w = p.w;
  const acc_t* __restrict bias = p.bias;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* __restrict v = acc_view(p.x + r * C, p.res ? p.res + r * C : nullptr,
                                         p.s ? p.s + r * C : nullptr, buf, C);
    // LayerNorm: the mean as pivot + offset with pivot = v[0], so that sums and differences
    // stay at the scale of the spread (with a mean of 1e4 and spread 1 in float32 the variance
    // and y keep full accuracy; only the mean output is rounded to acc). One pass gives
    // s1 = sum d and s2 = sum d^2 (d = v - pivot), M2 = s2 - s1 * off, summed again exactly
    // when that lost too much (kMaxCancel).
    // RMSNorm: pivot = off = 0, M2 = the sum of squares.
    acc_t pivot = 0, off = 0, m2;
    if (p.rms) {
      m2 = sq_dev_sum(v, C, acc_t(0), acc_t(0));
    } else {
      pivot = v[0];
      acc_t s1, s2;
      dev_sums(v, C, pivot, s1, s2);
      off = s1 * inv_c;
      m2 = s2 - s1 * off;
      if (!(m2 * kMaxCancel >= s2)) m2 = sq_dev_sum(v, C, pivot, off);  // (NaN goes this way too)
    }
    const acc_t rstd = acc_t(1) / std::sqrt(m2 * inv_c + p.eps);
    if (p.mean) p.mean[r] = pivot + off;
    p.rstd[r] = rstd;
    scalar_t* __restrict y = p.y + r * C;
    for (int64_t c = 0; c < C; ++c) {
      y[c] = rnd<scalar_t>(((v[c] - pivot) - off) * rstd * w[c] + bias[c]);
    }
  }
}

// K > 1: the tile of batch b, columns k0..k0+T. buf holds C x T acc values, stat 4 x T.
// Sums over c run in blocks of kRowBlock rows, each block summed apart (a short error chain).
constexpr int64_t kRowBlock = 64;

template <typename scalar_t>
PK_HOT_LOOP void row_fwd_tile(const RowFwd<scalar_t>& p, int64_t b, int64_t k0, int64_t T,
                              acc_type<scalar_t>* __restrict buf,
                              acc_type<scalar_t>* __restrict stat) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = p.C, K = p.K;
  const int64_t base = b * C * K + k0;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  const scalar_t* src = p.x;  // x, or s = x + residual once written
  if (p.res) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = base + c * K;
      const scalar_t* __restrict x = p.x + at;
      const scalar_t* __restrict r = p.res + at;
      scalar_t* __restrict s = p.s + at;
      for (int64_t k = 0; k < T; ++k) s[k] = rnd<scalar_t>(ld(x[k]) + ld(r[k]));
    }
    src = p.s;
  }
  const acc_t* v = buf;  // the tile as acc, row stride ldv
  int64_t ldv = T;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v = src + base;
    ldv = K;
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* __restrict row = src + base + c * K;
      acc_t* __restrict out = buf + c * T;
      for (int64_t k = 0; k < T; ++k) out[k] = ld(row[k]);
    }
  }
  // the mean as pivot (row 0) + offset, as in row_fwd_rows; RMSNorm: 0 + 0
  acc_t* __restrict pivot = stat;
  acc_t* __restrict off = stat + T;
  acc_t* __restrict rstd = stat + 2 * T;
  acc_t* __restrict part = stat + 3 * T;
  for (int64_t k = 0; k < T; ++k) pivot[k] = off[k] = rstd[k] = acc_t(0);
  if (!p.rms) {
    for (int64_t k = 0; k < T; ++k) pivot[k] = v[k];
    for (int64_t c0 = 0; c0 < C; c0 += kRowBlock) {
      for (int64_t k = 0; k < T; ++k) part[k] = acc_t(0);
      for (int64_t c = c0; c < std::min(C, c0 + kRowBlock); ++c) {
        const acc_t* __restrict row = v + c * ldv;
        for (int64_t k = 0; k < T; ++k) part[k] += row[k] - pivot[k];
      }
      for (int64_t k = 0; k < T; ++k) off[k] += part[k];
    }
    for (int64_t k = 0; k < T; ++k) off[k] *= inv_c;
  }
  for (int64_t c0 = 0; c0 < C; c0 += kRowBlock) {
    for (int64_t k = 0; k < T; ++k) part[k] = acc_t(0);
    for (int64_t c = c0; c < std::min(C, c0 + kRowBlock); ++c) {
      const acc_t* __restrict row = v + c * ldv;
      for (int64_t k = 0; k < T; ++k) {
        const acc_t d = (row[k] - pivot[k]) - off[k];
        part[k] += d * d;
      }
    }
    for (int64_t k = 0; k < T; ++k) rstd[k] += part[k];
  }
  for (int64_t k = 0; k < T; ++k) rstd[k] = acc_t(1) / std::sqrt(rstd[k] * inv_c + p.eps);
  if (p.mean) {
    for (int64_t k = 0; k < T; ++k) p.mean[b * K + k0 + k] = pivot[k] + off[k];
  }
  for (int64_t k = 0; k < T; ++k) p.rstd[b * K + k0 + k] = rstd[k];
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* __restrict row = v + c * ldv;
    scalar_t* __restrict y = p.y + base + c * K;
    const acc_t wc = p.w[c], bc = p.bias[c];
    for (int64_t k = 0; k < T; ++k) {
      y[k] = rnd<scalar_t>(((row[k] - pivot[k]) - off[k]) * rstd[k] * wc + bc);
    }
  }
}

template <typename scalar_t>
void row_fwd_rows_any(const RowFwd<scalar_t>& p, int64_t r0, int64_t r1,
                      acc_type<scalar_t>* buf) {
  if constexpr (kIsHalf<scalar_t>) {
    const int64_t C = p.C, len = (r1 - r0) * C, off = r0 * C;
    float* xf = scratch(0, len);
    half_to_float_n(p.x + off, xf, len);
    if (p.res) {  // s = x + residual, rounded to float16; the norm sees the rounded s
      const float* rf = staged(p.res + off, len, 1);
      for (int64_t i = 0; i < len; ++i) xf[i] += rf[i];
      float_to_half_n(xf, p.s + off, len);
      half_to_float_n(p.s + off, xf, len);
    }
    float* yf = scratch(2, len);
    const RowFwd<float> q{xf,     nullptr,        p.w, p.bias, yf, nullptr,
                          p.mean ? p.mean + r0 : nullptr, p.rstd + r0, C, 1, p.eps, p.rms};
    row_fwd_rows(q, 0, r1 - r0, buf);
    float_to_half_n(yf, p.y + off, len);
  } else {
    row_fwd_rows(p, r0, r1, buf);
  }
}

template <typename scalar_t>
void row_fwd(const RowFwd<scalar_t>& p, int64_t B) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = p.C, K = p.K;
  const bool parallel = B * C * K > kParallelGrain;
  if (K == 1) {
    const int64_t rows = std::max<int64_t>(1, 4096 / C);  // rows per call
    const int64_t blocks = (B + rows - 1) / rows;
#pragma omp parallel if (parallel)
    {
      std::vector<acc_t> buf(C);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < blocks; ++i) {
        row_fwd_rows_any(p, i * rows, std::min(B, (i + 1) * rows), buf.data());
      }
    }
    return;
  }
  const int64_t T = tile_width(C, K);
  const int64_t tiles = (K + T - 1) / T;
#pragma omp parallel if (parallel)
  {
    std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : C * T), stat(4 * T);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * tiles; ++i) {
      const int64_t b = i / tiles, k0 = i % tiles * T;
      row_fwd_tile(p, b, k0, std::min(T, K - k0), buf.data(), stat.data());
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row norm backward.

template <typename scalar_t>
struct RowBwd {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* w;     // C (ones when absent)
  const acc_t* mean;  // (B, K); null for rms
  const acc_t* rstd;  // (B, K)
  const scalar_t* gs;  // grad_sum or null
  scalar_t* dx;
  int64_t C, K;
};

// K == 1: rows r0..r1; dw/db (C) accumulate this group's parameter sums when kDw/kDb. Two
// passes per row: xhat (into xh) with the sums of g = dy * w and g * xhat, then dx and the
// parameter sums. dyb/xb: rows converted to acc (low precision only).
template <typename scalar_t, bool kDw, bool kDb>
PK_HOT_LOOP void row_bwd_rows(const RowBwd<scalar_t>& p, int64_t r0, int64_t r1,
                              acc_type<scalar_t>* __restrict dyb,
                              acc_type<scalar_t>* __restrict xb,
                              acc_type<scalar_t>* __restrict xh, acc_type<scalar_t>* __restrict dw,
                              acc_type<scalar_t>* __restrict db) {
  using acc_t = acc_type<scalar_t>;
  using V = vec_t<acc_t>;
  const int64_t C = p.C;
  const acc_t* __restrict w = p.w;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t m = p.mean ? p.mean[r] : acc_t(0), rs = p.rstd[r];
    const acc_t* __restrict d = acc_view<scalar_t>(p.dy + r * C, nullptr, nullptr, dyb, C);
    const acc_t* __restrict xv = acc_view<scalar_t>(p.x + r * C, nullptr, nullptr, xb, C);
    acc_t sg, sgx;
    lane_sum2<acc_t>(
        C,
        [&](int64_t i, V& a, V& b) __attribute__((always_inline)) {
          prefetch_ahead(p.dy + r * C + i);  // on into the next rows (a row is often a page)
          prefetch_ahead(p.x + r * C + i);
          const V xhat = (vload(xv + i) - m) * rs;
          vstore(xh + i, xhat);
          const V g = vload(d + i) * vload(w + i);
          a += g;
          b += g * xhat;
        },
        [&](int64_t i, acc_t& a, acc_t& b) __attribute__((always_inline)) {
          const acc_t xhat = (xv[i] - m) * rs;
          xh[i] = xhat;
          a = d[i] * w[i];
          b = a * xhat;
        },
        sg, sgx);
    const acc_t mg = p.mean ? sg * inv_c : acc_t(0);  // RMSNorm: no mean term
    const acc_t mgx = sgx * inv_c;
    scalar_t* __restrict dx = p.dx + r * C;
    const scalar_t* __restrict gs = p.gs ? p.gs + r * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      if constexpr (kDw) dw[c] += d[c] * xh[c];
      if constexpr (kDb) db[c] += d[c];
      const acc_t v = rs * ((d[c] * w[c] - mg) - xh[c] * mgx);
      dx[c] = rnd<scalar_t>(gs ? v + ld(gs[c]) : v);
    }
  }
}

// K > 1: the tile of batch b, columns k0..k0+T. dyb and xh hold C x T, stat 4 x T.
template <typename scalar_t>
PK_HOT_LOOP void row_bwd_tile(const RowBwd<scalar_t>& p, int64_t b, int64_t k0, int64_t T,
                              acc_type<scalar_t>* __restrict dyb,
                              acc_type<scalar_t>* __restrict xh,
                              acc_type<scalar_t>* __restrict stat, acc_type<scalar_t>* __restrict dw,
                              acc_type<scalar_t>* __restrict db) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = p.C, K = p.K;
  const int64_t base = b * C * K + k0;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  acc_t* __restrict m = stat;
  acc_t* __restrict rs = stat + T;
  acc_t* __restrict sg = stat + 2 * T;
  acc_t* __restrict sgx = stat + 3 * T;
  for (int64_t k = 0; k < T; ++k) {
    m[k] = p.mean ? p.mean[b * K + k0 + k] : acc_t(0);
    rs[k] = p.rstd[b * K + k0 + k];
    sg[k] = sgx[k] = acc_t(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* __restrict dy = p.dy + base + c * K;
    const scalar_t* __restrict x = p.x + base + c * K;
    acc_t* __restrict drow = dyb + c * T;
    acc_t* __restrict xrow = xh + c * T;
    const acc_t wc = p.w[c];
    for (int64_t k = 0; k < T; ++k) {
      const acc_t d = ld(dy[k]);
      const acc_t xhat = (ld(x[k]) - m[k]) * rs[k];
      drow[k] = d;
      xrow[k] = xhat;
      const acc_t g = d * wc;
      sg[k] += g;
      sgx[k] += g * xhat;
    }
    if (dw) dw[c] += dot_dev(drow, xrow, T, acc_t(0));
    if (db) db[c] += dev_sum(drow, T, acc_t(0));
  }
  for (int64_t k = 0; k < T; ++k) {
    sg[k] = p.mean ? sg[k] * inv_c : acc_t(0);
    sgx[k] *= inv_c;
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* __restrict drow = dyb + c * T;
    const acc_t* __restrict xrow = xh + c * T;
    scalar_t* __restrict dx = p.dx + base + c * K;
    const acc_t wc = p.w[c];
    if (p.gs) {
      const scalar_t* __restrict gs = p.gs + base + c * K;
      for (int64_t k = 0; k < T; ++k) {
        dx[k] = rnd<scalar_t>(rs[k] * ((drow[k] * wc - sg[k]) - xrow[k] * sgx[k]) + ld(gs[k]));
      }
    } else {
      for (int64_t k = 0; k < T; ++k) {
        dx[k] = rnd<scalar_t>(rs[k] * ((drow[k] * wc - sg[k]) - xrow[k] * sgx[k]));
      }
    }
  }
}

template <typename scalar_t, bool kDw, bool kDb>
void row_bwd_rows_any(const RowBwd<scalar_t>& p, int64_t r0, int64_t r1,
                      acc_type<scalar_t>* dyb, acc_type<scalar_t>* xb, acc_type<scalar_t>* xh,
                      acc_type<scalar_t>* dw, acc_type<scalar_t>* db) {
  if constexpr (kIsHalf<scalar_t>) {
    const int64_t C = p.C, rows = std::max<int64_t>(1, kStage / C);
    for (int64_t a = r0; a < r1; a += rows) {
      const int64_t n = std::min(rows, r1 - a), len = n * C, off = a * C;
      float* dxf = scratch(3, len);
      const RowBwd<float> q{staged(p.dy + off, len, 0),
                            staged(p.x + off, len, 1),
                            p.w,
                            p.mean ? p.mean + a : nullptr,
                            p.rstd + a,
                            p.gs ? staged(p.gs + off, len, 2) : nullptr,
                            dxf,
                            C,
                            1};
      row_bwd_rows<float, kDw, kDb>(q, 0, n, nullptr, nullptr, xh, dw, db);
      float_to_half_n(dxf, p.dx + off, len);
    }
  } else {
    row_bwd_rows<scalar_t, kDw, kDb>(p, r0, r1, dyb, xb, xh, dw, db);
  }
}

template <typename scalar_t>
void row_bwd(const RowBwd<scalar_t>& p, int64_t B, at::Tensor& dweight, at::Tensor& dbias) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = p.C, K = p.K;
  const bool need_dw = dweight.numel() > 0, need_db = dbias.numel() > 0;
  const int64_t T = K == 1 ? 1 : tile_width(C, K);
  const int64_t tiles = (K + T - 1) / T;
  const int64_t items = B * tiles;  // rows (K == 1) or tiles
  const int64_t groups = group_count(items, C);
  std::vector<acc_t> dw_parts(need_dw ? groups * C : 0), db_parts(need_db ? groups * C : 0);
  const bool parallel = B * C * K > kParallelGrain;
#pragma omp parallel if (parallel)
  {
    std::vector<acc_t> dyb(C * T), xh(C * T), stat(K == 1 ? 0 : 4 * T);
    std::vector<acc_t> xb(K == 1 && !std::is_same_v<scalar_t, acc_t> ? C : 0);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      acc_t* dw = need_dw ? dw_parts.data() + g * C : nullptr;
      acc_t* db = need_db ? db_parts.data() + g * C : nullptr;
      const int64_t i0 = part_begin(items, groups, g), i1 = part_begin(items, groups, g + 1);
      if (K == 1) {
        auto* fn = need_dw ? (need_db ? &row_bwd_rows_any<scalar_t, true, true>
                                      : &row_bwd_rows_any<scalar_t, true, false>)
                           : (need_db ? &row_bwd_rows_any<scalar_t, false, true>
                                      : &row_bwd_rows_any<scalar_t, false, false>);
        fn(p, i0, i1, dyb.data(), xb.data(), xh.data(), dw, db);
      } else {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / tiles, k0 = i % tiles * T;
          row_bwd_tile(p, b, k0, std::min(T, K - k0), dyb.data(), xh.data(), stat.data(), dw, db);
        }
      }
    }
  }
  if (need_dw) sum_parts(dw_parts.data(), groups, C, dweight.data_ptr<acc_t>());
  if (need_db) sum_parts(db_parts.data(), groups, C, dbias.data_ptr<acc_t>());
}

// ---------------------------------------------------------------------------------------------
// BatchNorm statistics.

// Every mean here is an offset from a pivot P[c], the channel's first element x[0, c, 0]: the
// sums then stay at the scale of the spread, and so do Chan's deltas (a mean of 1e4 and a
// spread of 1 in float32 keeps an accurate variance). mean = P + offset at the end.

// NCHW (K > 1): channel c over planes b0..b1 in segments of whole planes, one plane when
// K >= kBlock, else up to kBlock elements (a per-plane mean would cost more than a short plane).
// Each segment's mean and M2 from one pass over it (read as it is stored, any dtype) as in
// row_fwd_rows: sums of d = x - x0 and d^2 around the segment's first element x0, then an exact
// second pass over the segment in cache when that lost too much (kMaxCancel). Segment results
// merged in b order, their means as offsets from P.
inline int64_t segment_planes(int64_t K) { return std::max<int64_t>(1, kBlock / K); }

template <typename scalar_t>
PK_HOT_LOOP void bn_stats_planes(const scalar_t* x, int64_t C, int64_t K, int64_t c, int64_t b0,
                                 int64_t b1, acc_type<scalar_t> P, int64_t& n_out,
                                 acc_type<scalar_t>& mean_out, acc_type<scalar_t>& m2_out) {
  using acc_t = acc_type<scalar_t>;
  using V = vec_t<acc_t>;
  const int64_t seg = segment_planes(K);
  int64_t n = 0;
  acc_t mean = 0, m2 = 0;
  for (int64_t b = b0; b < b1; b += seg) {
    const int64_t e = std::min(b1, b + seg), len = (e - b) * K;
    const scalar_t* __restrict v = x + (b * C + c) * K;  // the segment's first plane
    const acc_t x0 = ld(v[0]);
    // (sum of t, sum of t^2) for t = (x - x0) - m over the segment
    const auto sums = [&](acc_t m, acc_t& s1, acc_t& s2) __attribute__((always_inline)) {
      if (seg == 1) {
        lane_sum2<acc_t>(
            K,
            [&](int64_t i, V& a, V& q) __attribute__((always_inline)) {
              prefetch_ahead(v + i);
              const V d = (vload_acc(v + i) - x0) - m;
              a += d;
              q += d * d;
            },
            [&](int64_t i, acc_t& a, acc_t& q) __attribute__((always_inline)) {
              a = (ld(v[i]) - x0) - m;
              q = a * a;
            },
            s1, s2);
      } else {
        plane_sum2<acc_t>(
            b, e, c * K, C * K, K,
            [&](int64_t o, V& a, V& q) __attribute__((always_inline)) {
              prefetch_ahead(x + o);
              a = (vload_acc(x + o) - x0) - m;
              q = a * a;
            },
            [&](int64_t o, acc_t& a, acc_t& q) __attribute__((always_inline)) {
              a = (ld(x[o]) - x0) - m;
              q = a * a;
            },
            s1, s2);
      }
    };
    acc_t s1, s2;
    sums(acc_t(0), s1, s2);
    const acc_t off = s1 / static_cast<acc_t>(len);
    acc_t pm2 = s2 - s1 * off;
    if (!(pm2 * kMaxCancel >= s2)) sums(off, s1, pm2);
    chan_merge(n, mean, m2, len, (x0 - P) + off, pm2);
  }
  n_out = n;
  mean_out = mean;
  m2_out = m2;
}

// Merges (n_b, mean_b[c], m2_b[c]) into (n_a, mean_a[c], m2_a[c]) for every channel.
template <typename acc_t>
PK_INLINE void chan_merge_vec(int64_t& n_a, acc_t* __restrict mean_a, acc_t* __restrict m2_a,
                              int64_t n_b, const acc_t* __restrict mean_b,
                              const acc_t* __restrict m2_b, int64_t C) {
  const int64_t n = n_a + n_b;
  const acc_t f_b = static_cast<acc_t>(n_b) / static_cast<acc_t>(n);
  const acc_t f_ab = static_cast<acc_t>(n_a) * f_b;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t delta = mean_b[c] - mean_a[c];
    mean_a[c] += delta * f_b;
    m2_a[c] += m2_b[c] + delta * delta * f_ab;
  }
  n_a = n;
}

// Prefetches the kBytes at byte offset `at` from p. The NHWC channel blocks below walk rows with
// stride C, which the hardware prefetcher follows poorly; they ask for the next chunk in order.
template <int64_t kBytes>
PK_INLINE void prefetch_span(const void* p, int64_t at) {
  prefetch_bytes(static_cast<const char*>(p) + at, kBytes);
}

// For the block of channels from c of a chunk of nr rows at row q (of `rows`, C channels): the
// byte offset, from the block's start, of its share of the next nr rows (laid out as the blocks
// walk this chunk), or -1 when those rows are not all in the tensor.
template <typename scalar_t>
inline int64_t next_chunk_share(int64_t q, int64_t nr, int64_t rows, int64_t C, int64_t c) {
  return q + 2 * nr <= rows ? (nr * C + c * (nr - 1)) * int64_t(sizeof(scalar_t)) : -1;
}

// NHWC (K == 1), one chunk of nr rows (in cache), channels [0, NV * kLanes) of v, P, cm, cm2
// (the caller offsets them): per channel the offset mean and M2 of d = x - P[c], from the sums
// of d and d^2 in one pass with the block's accumulators in registers (rows walked with stride
// C). Where s2 - s1 * mean lost too much (kMaxCancel) in any channel, the block takes an exact
// second pass over the chunk. `ahead` >= 0: next_chunk_share's offset, prefetched.
template <int NV, typename scalar_t>
PK_INLINE void bn_chunk_block(const scalar_t* __restrict v, int64_t C, int64_t nr,
                              const acc_type<scalar_t>* __restrict P,
                              acc_type<scalar_t>* __restrict cm,
                              acc_type<scalar_t>* __restrict cm2, int64_t ahead) {
  using acc_t = acc_type<scalar_t>;
  using V = vec_t<acc_t>;
  using M = typename VecOf<acc_t>::mask;
  constexpr int64_t W = kLanes<acc_t>;
  constexpr int64_t kRowBytes = NV * W * sizeof(scalar_t);
  V p[NV], s1[NV], s2[NV];
  for (int j = 0; j < NV; ++j) p[j] = vload(P + j * W), s1[j] = s2[j] = V{};
  for (int64_t r = 0; r < nr; ++r) {
    if (ahead >= 0) prefetch_span<kRowBytes>(v, ahead + r * kRowBytes);
    for (int j = 0; j < NV; ++j) {
      const V d = vload_acc(v + r * C + j * W) - p[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
  const acc_t n = static_cast<acc_t>(nr);
  M lost{};
  for (int j = 0; j < NV; ++j) {
    const V mean = s1[j] / n;
    const V m2 = s2[j] - s1[j] * mean;
    lost |= ~(m2 * acc_t(kMaxCancel) >= s2[j]);  // NaN included
    s1[j] = mean;
    s2[j] = m2;
  }
  if (fold_all_lanes(lost, [](M& a, const M& b) PK_INLINE_LAMBDA { a |= b; }) != 0) {
    for (int j = 0; j < NV; ++j) s2[j] = V{};
    for (int64_t r = 0; r < nr; ++r) {
      for (int j = 0; j < NV; ++j) {
        const V d = (vload_acc(v + r * C + j * W) - p[j]) - s1[j];
        s2[j] += d * d;
      }
    }
  }
  for (int j = 0; j < NV; ++j) {
    vstore(cm + j * W, s1[j]);
    vstore(cm2 + j * W, s2[j]);
  }
}

// The same for one channel (the channels after the last whole vector).
template <typename scalar_t>
PK_INLINE void bn_chunk_channel(const scalar_t* __restrict v, int64_t C, int64_t nr,
                                acc_type<scalar_t> P, acc_type<scalar_t>& cm,
                                acc_type<scalar_t>& cm2) {
  using acc_t = acc_type<scalar_t>;
  acc_t s1 = 0, s2 = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const acc_t d = ld(v[r * C]) - P;
    s1 += d;
    s2 += d * d;
  }
  const acc_t mean = s1 / static_cast<acc_t>(nr);
  acc_t m2 = s2 - s1 * mean;
  if (!(m2 * kMaxCancel >= s2)) {
    m2 = 0;
    for (int64_t r = 0; r < nr; ++r) {
      const acc_t d = (ld(v[r * C]) - P) - mean;
      m2 += d * d;
    }
  }
  cm = mean;
  cm2 = m2;
}

// NHWC (K == 1): rows r0..r1 (of `rows`) in chunks of R rows; each chunk's per-channel offset
// mean and M2 (bn_chunk_block: blocks of 4 vectors of channels, then single vectors, then single
// channels) merged into mean/m2 (C) in chunk order. Returns the count.
template <typename scalar_t>
PK_HOT_LOOP int64_t bn_stats_rows(const scalar_t* __restrict x, int64_t C, int64_t r0, int64_t r1,
                                  int64_t rows, int64_t R,
                                  const acc_type<scalar_t>* __restrict P,
                                  acc_type<scalar_t>* __restrict cm,
                                  acc_type<scalar_t>* __restrict cm2,
                                  acc_type<scalar_t>* __restrict mean,
                                  acc_type<scalar_t>* __restrict m2) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t W = kLanes<acc_t>;
  int64_t n = 0;
  for (int64_t c = 0; c < C; ++c) mean[c] = m2[c] = acc_t(0);
  for (int64_t q = r0; q < r1; q += R) {
    const int64_t nr = std::min(R, r1 - q);
    const scalar_t* __restrict v = x + q * C;
    int64_t c = 0;
    for (; c + 4 * W <= C; c += 4 * W) {
      bn_chunk_block<4>(v + c, C, nr, P + c, cm + c, cm2 + c,
                        next_chunk_share<scalar_t>(q, nr, rows, C, c));
    }
    for (; c + W <= C; c += W) bn_chunk_block<1>(v + c, C, nr, P + c, cm + c, cm2 + c, -1);
    for (; c < C; ++c) bn_chunk_channel(v + c, C, nr, P[c], cm[c], cm2[c]);
    chan_merge_vec(n, mean, m2, nr, cm, cm2, C);
  }
  return n;
}

template <typename scalar_t>
void bn_stats_planes_any(const scalar_t* x, int64_t C, int64_t K, int64_t c, int64_t b0,
                         int64_t b1, acc_type<scalar_t> P, int64_t& n_out,
                         acc_type<scalar_t>& mean_out, acc_type<scalar_t>& m2_out) {
  if constexpr (kIsHalf<scalar_t>) {  // segment by segment, merged as bn_stats_planes does
    int64_t n = 0;
    float mean = 0, m2 = 0;
    const int64_t seg = segment_planes(K);
    for (int64_t b = b0; b < b1; b += seg) {
      const int64_t planes = std::min(seg, b1 - b);
      int64_t pn;
      float pmean, pm2;
      bn_stats_planes(staged_planes(x, C, K, c, b, planes, 0), 1, K, 0, 0, planes, P, pn, pmean,
                      pm2);
      chan_merge(n, mean, m2, pn, pmean, pm2);
    }
    n_out = n;
    mean_out = mean;
    m2_out = m2;
  } else {
    bn_stats_planes(x, C, K, c, b0, b1, P, n_out, mean_out, m2_out);
  }
}

template <typename scalar_t>
int64_t bn_stats_rows_any(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, int64_t rows,
                          int64_t R,
                          const acc_type<scalar_t>* P, acc_type<scalar_t>* cm,
                          acc_type<scalar_t>* cm2, acc_type<scalar_t>* mean,
                          acc_type<scalar_t>* m2) {
  if constexpr (kIsHalf<scalar_t>) {  // in pieces of kStage elements, merged in order
    int64_t n = 0;
    std::fill(mean, mean + C, 0.f);
    std::fill(m2, m2 + C, 0.f);
    float* tmean = scratch(1, C);
    float* tm2 = scratch(2, C);
    const int64_t piece = std::min(R, std::max<int64_t>(1, 4 * kStage / C));
    for (int64_t q = r0; q < r1; q += piece) {
      const int64_t nr = std::min(piece, r1 - q);
      const int64_t got = bn_stats_rows(staged(x + q * C, nr * C, 0), C, 0, nr, nr, nr, P, cm, cm2,
                                        tmean, tm2);
      chan_merge_vec(n, mean, m2, got, tmean, tm2, C);
    }
    return n;
  } else {
    return bn_stats_rows(x, C, r0, r1, rows, R, P, cm, cm2, mean, m2);
  }
}

template <typename scalar_t>
void bn_stats(const at::Tensor& xt, at::Tensor& mean_t, at::Tensor& var_t) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = xt.size(0), C = xt.size(1), K = xt.size(2);
  const scalar_t* x = xt.const_data_ptr<scalar_t>();
  acc_t* mean_out = mean_t.data_ptr<acc_t>();
  acc_t* var_out = var_t.data_ptr<acc_t>();
  const bool parallel = B * C * K > kParallelGrain;
  std::vector<acc_t> P(C);  // pivots: x[0, c, 0]
  for (int64_t c = 0; c < C; ++c) P[c] = ld(x[c * K]);
  if (K > 1) {
    // items: (channel, group of planes); enough groups for the threads when C is small.
    const int64_t groups = std::min<int64_t>(B, std::max<int64_t>(1, (kMaxGroups + C - 1) / C));
    std::vector<int64_t> pn(C * groups);
    std::vector<acc_t> pmean(C * groups), pm2(C * groups);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t i = 0; i < C * groups; ++i) {
      const int64_t c = i / groups, g = i % groups;
      bn_stats_planes_any(x, C, K, c, part_begin(B, groups, g), part_begin(B, groups, g + 1),
                          P[c], pn[i], pmean[i], pm2[i]);
    }
    for (int64_t c = 0; c < C; ++c) {
      int64_t n = 0;
      acc_t mean = 0, m2 = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = c * groups + g;
        if (pn[i] > 0) chan_merge(n, mean, m2, pn[i], pmean[i], pm2[i]);
      }
      mean_out[c] = P[c] + mean;
      var_out[c] = m2 / static_cast<acc_t>(n);
    }
    return;
  }
  const int64_t R = chunk_rows(C);
  const int64_t groups = std::max<int64_t>(1, std::min(kMaxGroups, (B + R - 1) / R));
  std::vector<int64_t> gn(groups);
  std::vector<acc_t> gmean(groups * C), gm2(groups * C);
#pragma omp parallel if (parallel)
  {
    std::vector<acc_t> cm(C), cm2(C);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      gn[g] = bn_stats_rows_any(x, C, part_begin(B, groups, g), part_begin(B, groups, g + 1), B, R,
                                P.data(), cm.data(), cm2.data(), gmean.data() + g * C,
                                gm2.data() + g * C);
    }
  }
  // Chan's merge of the groups in order, vectorized over channels.
  std::vector<acc_t> mean(C, acc_t(0)), m2(C, acc_t(0));
  int64_t n = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (gn[g] > 0) chan_merge_vec(n, mean.data(), m2.data(), gn[g], gmean.data() + g * C,
                                  gm2.data() + g * C, C);
  }
  for (int64_t c = 0; c < C; ++c) {
    mean_out[c] = P[c] + mean[c];
    var_out[c] = m2[c] / static_cast<acc_t>(n);
  }
}

// ---------------------------------------------------------------------------------------------
// BatchNorm forward and backward: elementwise with per-channel coefficients.
//   fwd: v = (x - mean[c]) * scale[c] + shift[c] (+ residual), relu; scale = invstd * weight.
//   bwd: dy masked by y > 0 (relu variants); train: dx = k[c] * ((dy - mdy[c]) - (x - mean[c])
//   * cx[c]) with k = weight * invstd, mdy = sum_dy / count, cx = sum_dy_xhat / count * invstd;
//   eval: dx = k[c] * dy.

template <typename acc_t>
struct ChannelCoef {
  const acc_t* mean;
  const acc_t* a;  // fwd: scale; bwd: k
  const acc_t* b;  // fwd: shift; bwd: mdy
  const acc_t* c;  // bwd: cx
};

template <typename scalar_t, bool kRes, bool kRelu>
PK_INLINE acc_type<scalar_t> bn_fwd_value(scalar_t x, const scalar_t* res, int64_t i,
                                          acc_type<scalar_t> m, acc_type<scalar_t> a,
                                          acc_type<scalar_t> s) {
  using acc_t = acc_type<scalar_t>;
  acc_t v = (ld(x) - m) * a + s;
  if constexpr (kRes) v += ld(res[i]);
  if constexpr (kRelu) v = zero_where(v < acc_t(0), v);
  return v;
}

// The walk of the elementwise kernels over planes p0..p1 of K elements each (plane p is channel
// p % C), or for K == 1 over C-long rows p0..p1 (one channel per element), a vector at a time.
// vec(i, at) handles the kLanes elements from i, at(coef) giving their channels' coefficients
// as a vector; one(i, c) the element i alone, of channel c. A ragged end is one more vector
// ending at the last element (elements written twice get the same value: outputs never alias
// inputs); runs shorter than a vector go element by element.
template <typename acc_t, typename Vec, typename One>
PK_INLINE void bn_walk(int64_t C, int64_t K, int64_t p0, int64_t p1, const Vec& vec,
                       const One& one) {
  using V = vec_t<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  if (K == 1) {  // rows of C
    for (int64_t r = p0; r < p1; ++r) {
      const int64_t o = r * C;
      if (C < W) {
        for (int64_t c = 0; c < C; ++c) one(o + c, c);
        continue;
      }
      int64_t c = 0;
      const auto at = [&](const acc_t* coef) PK_INLINE_LAMBDA { return vload(coef + c); };
      for (; c + W <= C; c += W) vec(o + c, at);
      if (c < C) {
        c = C - W;
        vec(o + c, at);
      }
    }
    return;
  }
  for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {  // no division per plane
    const int64_t o = p * K;
    if (K < W) {
      for (int64_t k = 0; k < K; ++k) one(o + k, c);
      continue;
    }
    const auto at = [&](const acc_t* coef) PK_INLINE_LAMBDA { return V{} + coef[c]; };
    int64_t k = 0;
    for (; k + W <= K; k += W) vec(o + k, at);
    if (k < K) vec(o + K - W, at);
  }
}

// bfloat16's walk: pairs of vectors (see vload2_bf16), pair(i, at) handling the 16 elements
// from i, at(coef, h) giving the coefficients of half h (0: lo, 1: hi); what pairs do not cover
// as bn_walk. Rows go by pairs when pair_rows(C, K), their coefficients in pair order.
inline bool pair_rows(int64_t C, int64_t K) { return K == 1 && C % 16 == 0; }

template <typename Pair, typename Vec, typename One>
PK_INLINE void bn_walk_bf16(int64_t C, int64_t K, int64_t p0, int64_t p1, const Pair& pair,
                            const Vec& vec, const One& one) {
  using V = vec_t<float>;
  constexpr int64_t W = kLanes<float>;
  if (pair_rows(C, K)) {
    for (int64_t r = p0; r < p1; ++r) {
      for (int64_t c = 0; c < C; c += 2 * W) {
        pair(r * C + c, [&](const float* coef, int h) PK_INLINE_LAMBDA {
          return vload(coef + c + h * W);
        });
      }
    }
    return;
  }
  if (K < 2 * W) {
    bn_walk<float>(C, K, p0, p1, vec, one);
    return;
  }
  for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {
    const int64_t o = p * K;
    const auto at = [&](const float* coef, int) PK_INLINE_LAMBDA { return V{} + coef[c]; };
    int64_t k = 0;
    for (; k + 2 * W <= K; k += 2 * W) pair(o + k, at);
    if (k < K) pair(o + K - 2 * W, at);  // the ragged end, as in bn_walk
  }
}

// Per-channel coefficients as the kernels read them: in pair order for bfloat16 rows that go by
// pairs (copies in `store`), else as they are.
template <typename scalar_t, typename acc_t>
ChannelCoef<acc_t> kernel_coef(const ChannelCoef<acc_t>& cf, int64_t C, int64_t K,
                               std::vector<acc_t>& store) {
  if (!std::is_same_v<scalar_t, c10::BFloat16> || !pair_rows(C, K)) return cf;
  store.resize(4 * C);
  const auto reorder = [&](const acc_t* v, int slot) -> const acc_t* {
    if (v == nullptr) return nullptr;
    acc_t* out = store.data() + slot * C;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      for (int j = 0; j < 16; ++j) out[c0 + j] = v[c0 + kPairOrder[j]];
    }
    return out;
  };
  return {reorder(cf.mean, 0), reorder(cf.a, 1), reorder(cf.b, 2), reorder(cf.c, 3)};
}

// cf: kernel_coef's.
template <typename scalar_t, bool kRes, bool kRelu>
PK_HOT_LOOP void bn_fwd_range(const scalar_t* __restrict x, const scalar_t* __restrict res,
                              scalar_t* __restrict y, ChannelCoef<acc_type<scalar_t>> cf,
                              int64_t C, int64_t K, int64_t p0, int64_t p1) {
  using acc_t = acc_type<scalar_t>;
  using V = vec_t<acc_t>;
  const auto ahead = [&](int64_t i) PK_INLINE_LAMBDA {  // the streamed inputs
    prefetch_ahead(x + i);
    if constexpr (kRes) prefetch_ahead(res + i);
  };
  const auto vec = [&](int64_t i, const auto& at) PK_INLINE_LAMBDA {
    ahead(i);
    V v = (vload_acc(x + i) - at(cf.mean)) * at(cf.a) + at(cf.b);
    if constexpr (kRes) v += vload_acc(res + i);
    if constexpr (kRelu) v = v < acc_t(0) ? V{} : v;  // as zero_where: keeps NaN and -0
    vstore_acc(y + i, v);
  };
  const auto one = [&](int64_t i, int64_t c) PK_INLINE_LAMBDA {
    y[i] = rnd<scalar_t>(
        bn_fwd_value<scalar_t, kRes, kRelu>(x[i], res, i, cf.mean[c], cf.a[c], cf.b[c]));
  };
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const auto pair = [&](int64_t i, const auto& at) PK_INLINE_LAMBDA {
      V v[2];
      ahead(i);
      vload2_bf16(x + i, v[0], v[1]);
      V r[2];
      if constexpr (kRes) vload2_bf16(res + i, r[0], r[1]);
      for (int h = 0; h < 2; ++h) {
        v[h] = (v[h] - at(cf.mean, h)) * at(cf.a, h) + at(cf.b, h);
        if constexpr (kRes) v[h] += r[h];
        if constexpr (kRelu) v[h] = v[h] < 0.f ? V{} : v[h];
      }
      vstore2_bf16(y + i, v[0], v[1]);
    };
    bn_walk_bf16(C, K, p0, p1, pair, vec, one);
  } else {
    bn_walk<acc_t>(C, K, p0, p1, vec, one);
  }
}

template <typename scalar_t, bool kMask>
PK_INLINE acc_type<scalar_t> masked_dy(const scalar_t* dy, const scalar_t* y, int64_t i) {
  using acc_t = acc_type<scalar_t>;
  const acc_t d = ld(dy[i]);
  if constexpr (kMask) return zero_where(ld(y[i]) <= acc_t(0), d);
  return d;
}

template <typename scalar_t, bool kMask, bool kTrain, bool kRes>
PK_INLINE void bn_bwd_value(const scalar_t* dy, const scalar_t* x, const scalar_t* y,
                            scalar_t* dx, scalar_t* dres, int64_t i, acc_type<scalar_t> m,
                            acc_type<scalar_t> k, acc_type<scalar_t> mdy,
                            acc_type<scalar_t> cx) {
  const acc_type<scalar_t> d = masked_dy<scalar_t, kMask>(dy, y, i);
  if constexpr (kTrain) {
    dx[i] = rnd<scalar_t>(k * ((d - mdy) - (ld(x[i]) - m) * cx));
  } else {
    dx[i] = rnd<scalar_t>(k * d);
  }
  if constexpr (kRes) dres[i] = rnd<scalar_t>(d);
}

// cf: kernel_coef's.
template <typename scalar_t, bool kMask, bool kTrain, bool kRes>
PK_HOT_LOOP void bn_bwd_range(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                              const scalar_t* __restrict y, scalar_t* __restrict dx,
                              scalar_t* __restrict dres, ChannelCoef<acc_type<scalar_t>> cf,
                              int64_t C, int64_t K, int64_t p0, int64_t p1) {
  using acc_t = acc_type<scalar_t>;
  using V = vec_t<acc_t>;
  const auto ahead = [&](int64_t i) PK_INLINE_LAMBDA {  // the streamed inputs
    prefetch_ahead(dy + i);
    if constexpr (kMask) prefetch_ahead(y + i);
    if constexpr (kTrain) prefetch_ahead(x + i);
  };
  const auto vec = [&](int64_t i, const auto& at) PK_INLINE_LAMBDA {
    ahead(i);
    V d = vload_acc(dy + i);
    if constexpr (kMask) d = vload_acc(y + i) <= acc_t(0) ? V{} : d;
    if constexpr (kTrain) {
      vstore_acc(dx + i,
                 at(cf.a) * ((d - at(cf.b)) - (vload_acc(x + i) - at(cf.mean)) * at(cf.c)));
    } else {
      vstore_acc(dx + i, at(cf.a) * d);
    }
    if constexpr (kRes) vstore_acc(dres + i, d);
  };
  const auto one = [&](int64_t i, int64_t c) PK_INLINE_LAMBDA {
    bn_bwd_value<scalar_t, kMask, kTrain, kRes>(dy, x, y, dx, dres, i, cf.mean[c], cf.a[c],
                                                cf.b[c], cf.c[c]);
  };
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const auto pair = [&](int64_t i, const auto& at) PK_INLINE_LAMBDA {
      V d[2], xv[2], yv[2], out[2];
      ahead(i);
      vload2_bf16(dy + i, d[0], d[1]);
      if constexpr (kMask) vload2_bf16(y + i, yv[0], yv[1]);
      if constexpr (kTrain) vload2_bf16(x + i, xv[0], xv[1]);
      for (int h = 0; h < 2; ++h) {
        if constexpr (kMask) d[h] = yv[h] <= 0.f ? V{} : d[h];
        if constexpr (kTrain) {
          out[h] = at(cf.a, h) * ((d[h] - at(cf.b, h)) - (xv[h] - at(cf.mean, h)) * at(cf.c, h));
        } else {
          out[h] = at(cf.a, h) * d[h];
        }
      }
      vstore2_bf16(dx + i, out[0], out[1]);
      if constexpr (kRes) vstore2_bf16(dres + i, d[0], d[1]);
    };
    bn_walk_bf16(C, K, p0, p1, pair, vec, one);
  } else {
    bn_walk<acc_t>(C, K, p0, p1, vec, one);
  }
}

// float16 staging of the elementwise kernels: pieces of up to kStage elements, whole rows of C
// for K == 1, runs within one plane (one channel) for K > 1.
template <typename acc_t>
ChannelCoef<acc_t> coef_at(const ChannelCoef<acc_t>& cf, int64_t c) {
  return {cf.mean + c, cf.a + c, cf.b + c, cf.c ? cf.c + c : nullptr};
}

// fn(o, len, C, K, cf): the piece of len elements at offset o, with the C, K and coefficients
// the float kernel sees for it.
template <typename acc_t, typename Fn>
void for_each_piece(int64_t C, int64_t K, int64_t p0, int64_t p1, const ChannelCoef<acc_t>& cf,
                    const Fn& fn) {
  if (K == 1) {
    const int64_t rows = std::max<int64_t>(1, kStage / C);
    for (int64_t r = p0; r < p1; r += rows) {
      const int64_t n = std::min(rows, p1 - r);
      fn(r * C, n * C, C, int64_t(1), n, cf);
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    const ChannelCoef<acc_t> one = coef_at(cf, p % C);
    for (int64_t k = 0; k < K; k += kStage) {
      const int64_t len = std::min(kStage, K - k);
      fn(p * K + k, len, int64_t(1), len, int64_t(1), one);
    }
  }
}

template <typename scalar_t, bool kRes, bool kRelu>
void bn_fwd_range_any(const scalar_t* x, const scalar_t* res, scalar_t* y,
                      ChannelCoef<acc_type<scalar_t>> cf, int64_t C, int64_t K, int64_t p0,
                      int64_t p1) {
  if constexpr (kIsHalf<scalar_t>) {
    for_each_piece(C, K, p0, p1, cf, [&](int64_t o, int64_t len, int64_t c, int64_t k,
                                         int64_t units, const ChannelCoef<float>& f) {
      float* yf = scratch(2, len);
      bn_fwd_range<float, kRes, kRelu>(staged(x + o, len, 0), kRes ? staged(res + o, len, 1) : nullptr,
                                       yf, f, c, k, 0, units);
      float_to_half_n(yf, y + o, len);
    });
  } else {
    bn_fwd_range<scalar_t, kRes, kRelu>(x, res, y, cf, C, K, p0, p1);
  }
}

template <typename scalar_t, bool kMask, bool kTrain, bool kRes>
void bn_bwd_range_any(const scalar_t* dy, const scalar_t* x, const scalar_t* y, scalar_t* dx,
                      scalar_t* dres, ChannelCoef<acc_type<scalar_t>> cf, int64_t C, int64_t K,
                      int64_t p0, int64_t p1) {
  if constexpr (kIsHalf<scalar_t>) {
    for_each_piece(C, K, p0, p1, cf, [&](int64_t o, int64_t len, int64_t c, int64_t k,
                                         int64_t units, const ChannelCoef<float>& f) {
      float* dxf = scratch(3, len);
      float* drf = kRes ? scratch(4, len) : nullptr;
      bn_bwd_range<float, kMask, kTrain, kRes>(staged(dy + o, len, 0),
                                               kTrain ? staged(x + o, len, 1) : nullptr,
                                               kMask ? staged(y + o, len, 2) : nullptr, dxf, drf,
                                               f, c, k, 0, units);
      float_to_half_n(dxf, dx + o, len);
      if (kRes) float_to_half_n(drf, dres + o, len);
    });
  } else {
    bn_bwd_range<scalar_t, kMask, kTrain, kRes>(dy, x, y, dx, dres, cf, C, K, p0, p1);
  }
}

// Runs fn(p0, p1) over B*C planes (K > 1) or B rows (K == 1), in calls of about 8K elements.
template <typename Fn>
void for_each_range(int64_t B, int64_t C, int64_t K, const Fn& fn) {
  const int64_t units = K == 1 ? B : B * C;
  const int64_t unit = K == 1 ? C : K;
  const int64_t per_call = std::max<int64_t>(1, 8192 / std::max<int64_t>(unit, 1));
  const int64_t calls = (units + per_call - 1) / per_call;
#pragma omp parallel for schedule(static) if (B * C * K > kParallelGrain)
  for (int64_t i = 0; i < calls; ++i) fn(i * per_call, std::min(units, (i + 1) * per_call));
}

// bwd_reduce, NCHW: channel c over planes b0..b1 in the segments of bn_stats_planes: sums of dy
// and dy * (x - mean), one pass over each segment read as it is stored, dy masked by y > 0 when
// kMask; segment sums added in b order.
template <typename scalar_t, bool kMask>
PK_HOT_LOOP void bn_reduce_planes(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                  const scalar_t* __restrict y, int64_t C, int64_t K, int64_t c,
                                  int64_t b0, int64_t b1, acc_type<scalar_t> m,
                                  acc_type<scalar_t>& sdy, acc_type<scalar_t>& sdxm) {
  using acc_t = acc_type<scalar_t>;
  using V = vec_t<acc_t>;
  const int64_t seg = segment_planes(K);
  // the terms at element offset o (of the whole tensors)
  const auto vterms = [&](int64_t o, V& a, V& q) __attribute__((always_inline)) {
    prefetch_ahead(dy + o);
    prefetch_ahead(x + o);
    if constexpr (kMask) prefetch_ahead(y + o);
    a = vload_acc(dy + o);
    if constexpr (kMask) a = vload_acc(y + o) <= acc_t(0) ? V{} : a;
    q = a * (vload_acc(x + o) - m);
  };
  const auto sterms = [&](int64_t o, acc_t& a, acc_t& q) __attribute__((always_inline)) {
    a = masked_dy<scalar_t, kMask>(dy, y, o);
    q = a * (ld(x[o]) - m);
  };
  acc_t s1 = 0, s2 = 0;
  for (int64_t b = b0; b < b1; b += seg) {
    const int64_t o = (b * C + c) * K;
    acc_t p1, p2;
    if (seg == 1) {
      lane_sum2<acc_t>(
          K,
          [&](int64_t i, V& a, V& q) __attribute__((always_inline)) {
            V u, v;
            vterms(o + i, u, v);
            a += u;
            q += v;
          },
          [&](int64_t i, acc_t& a, acc_t& q) __attribute__((always_inline)) {
            sterms(o + i, a, q);
          },
          p1, p2);
    } else {
      plane_sum2<acc_t>(b, std::min(b1, b + seg), c * K, C * K, K, vterms, sterms, p1, p2);
    }
    s1 += p1;
    s2 += p2;
  }
  sdy = s1;
  sdxm = s2;
}

// bwd_reduce, NHWC, one chunk of nr rows, channels [0, NV * kLanes) of dy, x, y, mean, sdy and
// sdxm (the caller offsets them): the sums of dy (masked when kMask) and dy * (x - mean) over
// the rows in registers (rows walked with stride C, channel by channel in row order as a
// scalar loop would), added into sdy/sdxm. `ahead`: as bn_chunk_block's, for each tensor.
template <int NV, typename scalar_t, bool kMask>
PK_INLINE void bn_reduce_block(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                               const scalar_t* __restrict y, int64_t C, int64_t nr,
                               const acc_type<scalar_t>* __restrict mean,
                               acc_type<scalar_t>* __restrict sdy,
                               acc_type<scalar_t>* __restrict sdxm, int64_t ahead) {
  using acc_t = acc_type<scalar_t>;
  using V = vec_t<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  constexpr int64_t kRowBytes = NV * W * sizeof(scalar_t);
  V m[NV], s1[NV], s2[NV];
  for (int j = 0; j < NV; ++j) m[j] = vload(mean + j * W), s1[j] = s2[j] = V{};
  for (int64_t r = 0; r < nr; ++r) {
    if (ahead >= 0) {
      prefetch_span<kRowBytes>(dy, ahead + r * kRowBytes);
      prefetch_span<kRowBytes>(x, ahead + r * kRowBytes);
      if constexpr (kMask) prefetch_span<kRowBytes>(y, ahead + r * kRowBytes);
    }
    for (int j = 0; j < NV; ++j) {
      const int64_t o = r * C + j * W;
      V d = vload_acc(dy + o);
      if constexpr (kMask) d = vload_acc(y + o) <= acc_t(0) ? V{} : d;
      s1[j] += d;
      s2[j] += d * (vload_acc(x + o) - m[j]);
    }
  }
  for (int j = 0; j < NV; ++j) {
    vstore(sdy + j * W, vload(sdy + j * W) + s1[j]);
    vstore(sdxm + j * W, vload(sdxm + j * W) + s2[j]);
  }
}

// bwd_reduce, NHWC: rows r0..r1 (of `rows`) in chunks of R rows, each chunk summed apart (a
// short error chain; bn_reduce_block, then channel by channel) and added into sdy/sdxm (C).
template <typename scalar_t, bool kMask>
PK_HOT_LOOP void bn_reduce_rows(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                const scalar_t* __restrict y, int64_t C, int64_t r0, int64_t r1,
                                int64_t rows, int64_t R,
                                const acc_type<scalar_t>* __restrict mean,
                                acc_type<scalar_t>* __restrict sdy,
                                acc_type<scalar_t>* __restrict sdxm) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t W = kLanes<acc_t>;
  for (int64_t c = 0; c < C; ++c) sdy[c] = sdxm[c] = acc_t(0);
  for (int64_t q = r0; q < r1; q += R) {
    const int64_t nr = std::min(R, r1 - q), o = q * C;
    int64_t c = 0;
    for (; c + 4 * W <= C; c += 4 * W) {
      bn_reduce_block<4, scalar_t, kMask>(dy + o + c, x + o + c, kMask ? y + o + c : nullptr, C,
                                          nr, mean + c, sdy + c, sdxm + c,
                                          next_chunk_share<scalar_t>(q, nr, rows, C, c));
    }
    for (; c + W <= C; c += W) {
      bn_reduce_block<1, scalar_t, kMask>(dy + o + c, x + o + c, kMask ? y + o + c : nullptr, C,
                                          nr, mean + c, sdy + c, sdxm + c, -1);
    }
    for (; c < C; ++c) {
      acc_t c1 = 0, c2 = 0;
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t d = masked_dy<scalar_t, kMask>(dy, y, o + r * C + c);
        c1 += d;
        c2 += d * (ld(x[o + r * C + c]) - mean[c]);
      }
      sdy[c] += c1;
      sdxm[c] += c2;
    }
  }
}

template <typename scalar_t, bool kMask>
void bn_reduce_planes_any(const scalar_t* dy, const scalar_t* x, const scalar_t* y, int64_t C,
                          int64_t K, int64_t c, int64_t b0, int64_t b1, acc_type<scalar_t> m,
                          acc_type<scalar_t>& sdy, acc_type<scalar_t>& sdxm) {
  if constexpr (kIsHalf<scalar_t>) {  // segment by segment, summed as bn_reduce_planes does
    float s1 = 0, s2 = 0;
    const int64_t seg = segment_planes(K);
    for (int64_t b = b0; b < b1; b += seg) {
      const int64_t planes = std::min(seg, b1 - b);
      float p1, p2;
      bn_reduce_planes<float, kMask>(staged_planes(dy, C, K, c, b, planes, 0),
                                     staged_planes(x, C, K, c, b, planes, 1),
                                     kMask ? staged_planes(y, C, K, c, b, planes, 2) : nullptr, 1,
                                     K, 0, 0, planes, m, p1, p2);
      s1 += p1;
      s2 += p2;
    }
    sdy = s1;
    sdxm = s2;
  } else {
    bn_reduce_planes<scalar_t, kMask>(dy, x, y, C, K, c, b0, b1, m, sdy, sdxm);
  }
}

template <typename scalar_t, bool kMask>
void bn_reduce_rows_any(const scalar_t* dy, const scalar_t* x, const scalar_t* y, int64_t C,
                        int64_t r0, int64_t r1, int64_t rows, int64_t R,
                        const acc_type<scalar_t>* mean, acc_type<scalar_t>* sdy,
                        acc_type<scalar_t>* sdxm) {
  if constexpr (kIsHalf<scalar_t>) {  // in pieces of kStage elements, summed in order
    std::fill(sdy, sdy + C, 0.f);
    std::fill(sdxm, sdxm + C, 0.f);
    float* t1 = scratch(3, C);
    float* t2 = scratch(4, C);
    const int64_t piece = std::min(R, std::max<int64_t>(1, kStage / C));
    for (int64_t q = r0; q < r1; q += piece) {
      const int64_t nr = std::min(piece, r1 - q), o = q * C, len = nr * C;
      bn_reduce_rows<float, kMask>(staged(dy + o, len, 0), staged(x + o, len, 1),
                                   kMask ? staged(y + o, len, 2) : nullptr, C, 0, nr, nr, nr,
                                   mean, t1, t2);
      for (int64_t c = 0; c < C; ++c) {
        sdy[c] += t1[c];
        sdxm[c] += t2[c];
      }
    }
  } else {
    bn_reduce_rows<scalar_t, kMask>(dy, x, y, C, r0, r1, rows, R, mean, sdy, sdxm);
  }
}

template <typename scalar_t, bool kMask>
void bn_reduce(const scalar_t* dy, const scalar_t* x, const scalar_t* y, int64_t B, int64_t C,
               int64_t K, const acc_type<scalar_t>* mean, acc_type<scalar_t>* sdy_out,
               acc_type<scalar_t>* sdxm_out) {
  using acc_t = acc_type<scalar_t>;
  const bool parallel = B * C * K > kParallelGrain;
  if (K > 1) {
    const int64_t groups = std::min<int64_t>(B, std::max<int64_t>(1, (kMaxGroups + C - 1) / C));
    std::vector<acc_t> p1(C * std::max<int64_t>(groups, 1)), p2(p1.size());
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t i = 0; i < C * groups; ++i) {
      const int64_t c = i / groups, g = i % groups;
      bn_reduce_planes_any<scalar_t, kMask>(dy, x, y, C, K, c, part_begin(B, groups, g),
                                            part_begin(B, groups, g + 1), mean[c], p1[i], p2[i]);
    }
    for (int64_t c = 0; c < C; ++c) {
      acc_t s1 = 0, s2 = 0;
      for (int64_t g = 0; g < groups; ++g) {
        s1 += p1[c * groups + g];
        s2 += p2[c * groups + g];
      }
      sdy_out[c] = s1;
      sdxm_out[c] = s2;
    }
    return;
  }
  const int64_t R = chunk_rows(C);
  const int64_t groups = std::max<int64_t>(1, std::min(kMaxGroups, (B + R - 1) / R));
  std::vector<acc_t> g1(groups * C), g2(groups * C);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t g = 0; g < groups; ++g) {
    bn_reduce_rows_any<scalar_t, kMask>(dy, x, y, C, part_begin(B, groups, g),
                                        part_begin(B, groups, g + 1), B, R, mean,
                                        g1.data() + g * C, g2.data() + g * C);
  }
  sum_parts(g1.data(), groups, C, sdy_out);
  sum_parts(g2.data(), groups, C, sdxm_out);
}

// ---------------------------------------------------------------------------------------------
// Argument checks.

void check_big(const char* fn, const char* name, const at::Tensor& t) {
  PK_CHECK_VALUE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  PK_CHECK_VALUE(t.dim() == 3, fn, ": ", name, " must be a (B, C, K) view, got ", t.dim(), "D");
  PK_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
  const auto st = t.scalar_type();
  PK_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                fn, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

// A big tensor that must match x (shape and dtype).
void check_like(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_big(fn, name, t);
  PK_CHECK_VALUE(t.sizes() == x.sizes(), fn, ": ", name, " must have x's shape ", x.sizes(),
                 ", got ", t.sizes());
  PK_CHECK_TYPE(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ",
                x.scalar_type(), ", got ", t.scalar_type());
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel or per-row acc vector of n elements; or_x_dtype: x's own dtype is accepted too
// (BatchNorm's weight, bias and statistics, read through channel_values).
void check_vec(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x,
               int64_t n, const char* what, bool or_x_dtype = false) {
  PK_CHECK_VALUE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  const bool own = or_x_dtype && t.scalar_type() == x.scalar_type();
  PK_CHECK_TYPE(t.scalar_type() == acc_dtype(x) || own, fn, ": ", name, " must be ", acc_dtype(x),
                " (the accumulation type of ", x.scalar_type(), ")",
                or_x_dtype ? " or x's dtype" : "", ", got ", t.scalar_type());
  PK_CHECK_VALUE(t.numel() == n, fn, ": ", name, " must have ", what, " = ", n,
                 " elements, got ", t.numel());
  PK_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

// A (C,) acc vector: the given one, or `fill` repeated when absent.
at::Tensor channel_vec_or(const std::optional<at::Tensor>& t, const at::Tensor& x, double fill) {
  if (t.has_value()) return *t;
  return at::empty({x.size(1)}, x.options().dtype(acc_dtype(x))).fill_(fill);
}

at::Tensor empty_vec(const at::Tensor& x) { return at::empty({0}, x.options().dtype(acc_dtype(x))); }

at::Tensor new_vec(const at::Tensor& x, int64_t n) {
  at::Tensor t = at::empty({n}, x.options().dtype(acc_dtype(x)));
  poison_cpu(t);
  return t;
}

// A BatchNorm (C,) vector (mean, var, weight, bias) as acc values, stored as acc or as x's
// scalar_t (a 16-bit model's parameters: converting them here spares the caller an op each).
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
std::vector<acc_t> channel_values(const at::Tensor& t) {
  std::vector<acc_t> out(t.numel());
  if (t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
    std::copy_n(t.const_data_ptr<acc_t>(), t.numel(), out.begin());
  } else {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < t.numel(); ++c) out[c] = static_cast<acc_t>(p[c]);
  }
  return out;
}

// invstd = 1 / sqrt(var + eps), per channel.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
std::vector<acc_t> invstd_of(const at::Tensor& var, double eps) {
  std::vector<acc_t> out = channel_values<scalar_t>(var);
  for (acc_t& v : out) v = acc_t(1) / std::sqrt(v + static_cast<acc_t>(eps));
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  constexpr const char* fn = "row_norm_fwd_cpu";
  check_big(fn, "x", x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  if (residual) check_like(fn, "residual", *residual, x);
  if (weight) check_vec(fn, "weight", *weight, x, C, "C");
  if (bias) check_vec(fn, "bias", *bias, x, C, "C");
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor s = residual ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = rms ? empty_vec(x) : at::empty({B, K}, x.options().dtype(acc_dtype(x)));
  at::Tensor rstd = at::empty({B, K}, x.options().dtype(acc_dtype(x)));
  poison_cpu(y);
  poison_cpu(s);
  poison_cpu(mean);
  poison_cpu(rstd);
  if (B * K == 0) return {y, s, mean, rstd};
  if (C == 0) {  // as torch: the mean of nothing is 0, its variance NaN
    if (!rms) mean.fill_(0.0);
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, s, mean, rstd};
  }
  const at::Tensor w = channel_vec_or(weight, x, 1.0), bb = channel_vec_or(bias, x, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    using acc_t = acc_type<scalar_t>;
    RowFwd<scalar_t> p{x.const_data_ptr<scalar_t>(),
                       residual ? residual->const_data_ptr<scalar_t>() : nullptr,
                       w.const_data_ptr<acc_t>(),
                       bb.const_data_ptr<acc_t>(),
                       y.data_ptr<scalar_t>(),
                       residual ? s.data_ptr<scalar_t>() : nullptr,
                       rms ? nullptr : mean.data_ptr<acc_t>(),
                       rstd.data_ptr<acc_t>(),
                       C,
                       K,
                       static_cast<acc_t>(eps),
                       rms};
    row_fwd(p, B);
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_norm_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& grad_sum,
    bool rms, bool need_dweight, bool need_dbias) {
  constexpr const char* fn = "row_norm_bwd_cpu";
  check_big(fn, "x", x);
  check_like(fn, "grad_y", grad_y, x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  if (grad_sum) check_like(fn, "grad_sum", *grad_sum, x);
  if (weight) check_vec(fn, "weight", *weight, x, C, "C");
  if (!rms) check_vec(fn, "mean", mean, x, B * K, "B * K");
  check_vec(fn, "rstd", rstd, x, B * K, "B * K");
  at::Tensor dx = at::empty(x.sizes(), x.options());
  poison_cpu(dx);
  at::Tensor dweight = need_dweight ? new_vec(x, C) : empty_vec(x);
  at::Tensor dbias = need_dbias ? new_vec(x, C) : empty_vec(x);
  if (B * K == 0 || C == 0) {  // no element: parameter sums are zeros
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const at::Tensor w = channel_vec_or(weight, x, 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    using acc_t = acc_type<scalar_t>;
    RowBwd<scalar_t> p{grad_y.const_data_ptr<scalar_t>(),
                       x.const_data_ptr<scalar_t>(),
                       w.const_data_ptr<acc_t>(),
                       rms ? nullptr : mean.const_data_ptr<acc_t>(),
                       rstd.const_data_ptr<acc_t>(),
                       grad_sum ? grad_sum->const_data_ptr<scalar_t>() : nullptr,
                       dx.data_ptr<scalar_t>(),
                       C,
                       K};
    row_bwd(p, B, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x) {
  constexpr const char* fn = "batch_norm_stats_cpu";
  check_big(fn, "x", x);
  PK_CHECK_VALUE(x.size(0) * x.size(2) > 0, fn, ": x has no element per channel (B * K = 0)");
  at::Tensor mean = new_vec(x, x.size(1)), var = new_vec(x, x.size(1));
  if (x.size(1) == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn,
                                  [&] { bn_stats<scalar_t>(x, mean, var); });
  return {mean, var};
}

void batch_norm_update_running_cpu(const at::Tensor& mean, const at::Tensor& var,
                                   const std::optional<at::Tensor>& running_mean,
                                   const std::optional<at::Tensor>& running_var, double momentum,
                                   double var_factor) {
  constexpr const char* fn = "batch_norm_update_running_cpu";
  // running = (1 - momentum) * running + momentum * batch, per channel, in the running stats'
  // dtype (float math for 16-bit ones); the variance scaled by var_factor (unbiasing) first.
  const auto check = [&](const at::Tensor& running, const at::Tensor& batch, const char* name) {
    PK_CHECK_VALUE(running.device().is_cpu() && running.is_contiguous() &&
                       running.numel() == batch.numel(),
                   fn, ": ", name, " must be a contiguous CPU tensor of ", batch.numel(),
                   " elements");
    PK_CHECK_VALUE(batch.device().is_cpu() && batch.is_contiguous() &&
                       batch.scalar_type() == (running.scalar_type() == at::kDouble ? at::kDouble
                                                                                     : at::kFloat),
                   fn, ": the batch statistics must be contiguous and in ", name,
                   "'s accumulation type");
  };
  const auto update = [&](const at::Tensor& running, const at::Tensor& batch, double factor) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), fn, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* r = running.data_ptr<scalar_t>();
      const acc_t* b = batch.const_data_ptr<acc_t>();
      const acc_t keep = static_cast<acc_t>(1 - momentum);
      const acc_t take = static_cast<acc_t>(momentum * factor);
      for (int64_t c = 0; c < running.numel(); ++c) {
        r[c] = static_cast<scalar_t>(keep * static_cast<acc_t>(r[c]) + take * b[c]);
      }
    });
  };
  // Both checked before either is written: a refused call leaves the running stats as they were.
  if (running_mean) check(*running_mean, mean, "running_mean");
  if (running_var) check(*running_var, var, "running_var");
  // An in-place update: autograd must see it, as it sees mul_ / add_ (and an inference tensor
  // outside inference mode is refused here, before any write, as torch refuses it).
  if (running_mean) running_mean->unsafeGetTensorImpl()->bump_version();
  if (running_var) running_var->unsafeGetTensorImpl()->bump_version();
  if (running_mean) update(*running_mean, mean, 1.0);
  if (running_var) update(*running_var, var, var_factor);
}

at::Tensor batch_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, double eps, bool relu) {
  constexpr const char* fn = "batch_norm_fwd_cpu";
  check_big(fn, "x", x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  check_vec(fn, "mean", mean, x, C, "C", true);
  check_vec(fn, "var", var, x, C, "C", true);
  if (weight) check_vec(fn, "weight", *weight, x, C, "C", true);
  if (bias) check_vec(fn, "bias", *bias, x, C, "C", true);
  if (residual) check_like(fn, "residual", *residual, x);
  at::Tensor y = at::empty(x.sizes(), x.options());
  poison_cpu(y);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> scale = invstd_of<scalar_t>(var, eps), shift(C, acc_t(0));
    if (weight) {
      const std::vector<acc_t> w = channel_values<scalar_t>(*weight);
      for (int64_t c = 0; c < C; ++c) scale[c] *= w[c];
    }
    if (bias) shift = channel_values<scalar_t>(*bias);
    const std::vector<acc_t> mean_v = channel_values<scalar_t>(mean);
    std::vector<acc_t> reordered;
    const ChannelCoef<acc_t> cf = kernel_coef<scalar_t>(
        ChannelCoef<acc_t>{mean_v.data(), scale.data(), shift.data(), nullptr}, C, K, reordered);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const auto run = [&](auto res_tag, auto relu_tag) {
      constexpr bool kRes = decltype(res_tag)::value, kRelu = decltype(relu_tag)::value;
      for_each_range(B, C, K, [&](int64_t p0, int64_t p1) {
        bn_fwd_range_any<scalar_t, kRes, kRelu>(xp, rp, yp, cf, C, K, p0, p1);
      });
    };
    using T = std::true_type;
    using F = std::false_type;
    if (rp) {
      relu ? run(T{}, T{}) : run(T{}, F{});
    } else {
      relu ? run(F{}, T{}) : run(F{}, F{});
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y,
    const at::Tensor& mean, const at::Tensor& var, double eps) {
  constexpr const char* fn = "batch_norm_bwd_reduce_cpu";
  check_big(fn, "x", x);
  check_like(fn, "grad_y", grad_y, x);
  if (y) check_like(fn, "y", *y, x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  check_vec(fn, "mean", mean, x, C, "C", true);
  check_vec(fn, "var", var, x, C, "C", true);
  at::Tensor sum_dy = new_vec(x, C), sum_dy_xhat = new_vec(x, C);
  if (B * K == 0 || C == 0) {  // no element: zero sums
    sum_dy.zero_();
    sum_dy_xhat.zero_();
    return {sum_dy, sum_dy_xhat};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* s1 = sum_dy.data_ptr<acc_t>();
    acc_t* s2 = sum_dy_xhat.data_ptr<acc_t>();
    const std::vector<acc_t> mean_v = channel_values<scalar_t>(mean);
    if (y) {
      bn_reduce<scalar_t, true>(dyp, xp, y->const_data_ptr<scalar_t>(), B, C, K, mean_v.data(),
                                s1, s2);
    } else {
      bn_reduce<scalar_t, false>(dyp, xp, nullptr, B, C, K, mean_v.data(), s1, s2);
    }
    const std::vector<acc_t> invstd = invstd_of<scalar_t>(var, eps);
    for (int64_t c = 0; c < C; ++c) s2[c] *= invstd[c];  // sum dy * (x - mean) * invstd
  });
  return {sum_dy, sum_dy_xhat};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, double eps, int64_t count,
    bool want_grad_residual) {
  constexpr const char* fn = "batch_norm_bwd_cpu";
  check_big(fn, "x", x);
  check_like(fn, "grad_y", grad_y, x);
  if (y) check_like(fn, "y", *y, x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  check_vec(fn, "mean", mean, x, C, "C", true);
  check_vec(fn, "var", var, x, C, "C", true);
  if (weight) check_vec(fn, "weight", *weight, x, C, "C", true);
  const bool train = count > 0;
  if (train) {
    check_vec(fn, "sum_dy", sum_dy, x, C, "C");
    check_vec(fn, "sum_dy_xhat", sum_dy_xhat, x, C, "C");
  }
  PK_CHECK_VALUE(count >= 0, fn, ": count must be >= 0, got ", count);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dres = want_grad_residual ? at::empty(x.sizes(), x.options())
                                       : at::empty({0}, x.options());
  poison_cpu(dx);
  poison_cpu(dres);
  if (dx.numel() == 0) return {dx, dres};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    using acc_t = acc_type<scalar_t>;
    const std::vector<acc_t> invstd = invstd_of<scalar_t>(var, eps);
    std::vector<acc_t> k(C), mdy(C, acc_t(0)), cx(C, acc_t(0));
    const std::vector<acc_t> w = weight ? channel_values<scalar_t>(*weight) : std::vector<acc_t>();
    const acc_t inv_n = train ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      k[c] = weight ? w[c] * invstd[c] : invstd[c];
      if (train) {
        mdy[c] = sum_dy.const_data_ptr<acc_t>()[c] * inv_n;
        cx[c] = sum_dy_xhat.const_data_ptr<acc_t>()[c] * inv_n * invstd[c];
      }
    }
    std::vector<acc_t> reordered;
    const std::vector<acc_t> mean_v = channel_values<scalar_t>(mean);
    const ChannelCoef<acc_t> cf = kernel_coef<scalar_t>(
        ChannelCoef<acc_t>{mean_v.data(), k.data(), mdy.data(), cx.data()}, C, K, reordered);
    const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y ? y->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* drp = want_grad_residual ? dres.data_ptr<scalar_t>() : nullptr;
    const auto run = [&](auto mask_tag, auto train_tag, auto res_tag) {
      constexpr bool kMask = decltype(mask_tag)::value, kTrain = decltype(train_tag)::value,
                     kRes = decltype(res_tag)::value;
      for_each_range(B, C, K, [&](int64_t p0, int64_t p1) {
        bn_bwd_range_any<scalar_t, kMask, kTrain, kRes>(dyp, xp, yp, dxp, drp, cf, C, K, p0,
                                                        p1);
      });
    };
    using T = std::true_type;
    using F = std::false_type;
    const auto with_res = [&](auto mask_tag, auto train_tag) {
      want_grad_residual ? run(mask_tag, train_tag, T{}) : run(mask_tag, train_tag, F{});
    };
    const auto with_train = [&](auto mask_tag) {
      train ? with_res(mask_tag, T{}) : with_res(mask_tag, F{});
    };
    yp ? with_train(T{}) : with_train(F{});
  });
  return {dx, dres};
}

}  // namespace pykern
