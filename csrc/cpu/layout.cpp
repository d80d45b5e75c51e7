// Layout family, CPU reference: out = x.permute(perm).contiguous() for NCHW <-> NHWC (and any
// other permutation). CUDA twin: csrc/cuda/layout.cu; Triton twin: triton_kernels/layout.py.
// All three execute the PermutePlan of common/index.h.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/index.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

constexpr int64_t kTileEdge = 64;
constexpr int64_t kTileElems = 4096;  // 16 KiB of float: input and output tiles stay in L1
constexpr int64_t kParallelGrain = 1 << 15;  // below this many elements one thread is faster

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A K x K block transposed in registers, for the common unit-stride case (row_in == 1): K loads
// of K rows (one input column each), K stores of K cols (one output row each). K = 0: none.
template <typename T>
struct RegisterBlock {
  static constexpr int64_t K = 0;
};

#if defined(__SSE2__)
template <>
struct RegisterBlock<uint32_t> {  // float, int32: 4x4
  static constexpr int64_t K = 4;
  static void run(const uint32_t* src, int64_t col_in, uint32_t* dst, int64_t row_out) {
    // Shuffles only: the bits of NaN payloads and integers pass through unchanged.
    __m128 c0 = _mm_loadu_ps(reinterpret_cast<const float*>(src));
    __m128 c1 = _mm_loadu_ps(reinterpret_cast<const float*>(src + col_in));
    __m128 c2 = _mm_loadu_ps(reinterpret_cast<const float*>(src + 2 * col_in));
    __m128 c3 = _mm_loadu_ps(reinterpret_cast<const float*>(src + 3 * col_in));
    _MM_TRANSPOSE4_PS(c0, c1, c2, c3);
    _mm_storeu_ps(reinterpret_cast<float*>(dst), c0);
    _mm_storeu_ps(reinterpret_cast<float*>(dst + row_out), c1);
    _mm_storeu_ps(reinterpret_cast<float*>(dst + 2 * row_out), c2);
    _mm_storeu_ps(reinterpret_cast<float*>(dst + 3 * row_out), c3);
  }
};

// 8x8 with AVX2, compiled for AVX2 alone and chosen at run time (the wheel targets plain x86-64).
struct RegisterBlockAvx2 {
  static constexpr int64_t K = 8;
  __attribute__((target("avx2"))) static void run(const uint32_t* src, int64_t col_in,
                                                   uint32_t* dst, int64_t row_out) {
    const auto* in = reinterpret_cast<const float*>(src);
    auto* out = reinterpret_cast<float*>(dst);
    __m256 c[8], t[8], s[8];
    for (int k = 0; k < 8; ++k) c[k] = _mm256_loadu_ps(in + k * col_in);
    // Per 128-bit lane: pair columns, then gather 4 columns per element, then join lanes.
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm256_unpacklo_ps(c[2 * k], c[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_ps(c[2 * k], c[2 * k + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // h = 0: columns 0-3, h = 1: columns 4-7
      s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
      s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {  // s[j] holds rows j (low lane) and j + 4 (high lane)
      _mm256_storeu_ps(out + j * row_out, _mm256_permute2f128_ps(s[j], s[j + 4], 0x20));
      _mm256_storeu_ps(out + (j + 4) * row_out, _mm256_permute2f128_ps(s[j], s[j + 4], 0x31));
    }
  }
};

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

template <>
struct RegisterBlock<uint16_t> {  // bfloat16, float16, int16: 8x8
  static constexpr int64_t K = 8;
  static void run(const uint16_t* src, int64_t col_in, uint16_t* dst, int64_t row_out) {
    __m128i a[8];
    for (int k = 0; k < 8; ++k) {
      a[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k * col_in));
    }
    // Interleave 16-, then 32-, then 64-bit lanes: row j gathers element j of every column.
    __m128i t[8], u[8];
    for (int k = 0; k < 4; ++k) {
      t[k] = _mm_unpacklo_epi16(a[2 * k], a[2 * k + 1]);
      t[k + 4] = _mm_unpackhi_epi16(a[2 * k], a[2 * k + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // h = 0: elements 0-3, h = 1: elements 4-7
      u[4 * h + 0] = _mm_unpacklo_epi32(t[4 * h + 0], t[4 * h + 1]);
      u[4 * h + 1] = _mm_unpackhi_epi32(t[4 * h + 0], t[4 * h + 1]);
      u[4 * h + 2] = _mm_unpacklo_epi32(t[4 * h + 2], t[4 * h + 3]);
      u[4 * h + 3] = _mm_unpackhi_epi32(t[4 * h + 2], t[4 * h + 3]);
    }
    for (int h = 0; h < 2; ++h) {
      for (int q = 0; q < 2; ++q) {
        const __m128i lo = u[4 * h + q], hi = u[4 * h + q + 2];
        const int64_t row = 4 * h + 2 * q;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + row * row_out),
                         _mm_unpacklo_epi64(lo, hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (row + 1) * row_out),
                         _mm_unpackhi_epi64(lo, hi));
      }
    }
  }
};
#endif

template <typename T>
void copy_tile_scalar(const T* src, T* dst, const PermutePlan& p, int64_t r0, int64_t r1,
                      int64_t c0, int64_t c1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* src_row = src + r * p.row_in;
    T* dst_row = dst + r * p.row_out;
    for (int64_t c = c0; c < c1; ++c) dst_row[c] = src_row[c * p.col_in];
  }
}

// A short side known at compile time (C = 2, 3, 4 of an image): the loop over it unrolls, and
// the compiler vectorizes the long side with interleaving loads or stores.
template <typename T, int64_t S>
void copy_tile_short_cols(const T* src, T* dst, const PermutePlan& p, int64_t r0, int64_t r1) {
  const int64_t col_in = p.col_in, row_out = p.row_out;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < S; ++c) dst[r * row_out + c] = src[r + c * col_in];
  }
}

template <typename T, int64_t S>
void copy_tile_short_rows(const T* src, T* dst, const PermutePlan& p, int64_t c0, int64_t c1) {
  const int64_t col_in = p.col_in, row_out = p.row_out;
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = 0; r < S; ++r) dst[r * row_out + c] = src[c * col_in + r];
  }
}

// Runs body.template operator()<S>() for S = side in 2..4; false for other sides.
template <typename Body>
bool with_short_side(int64_t side, Body&& body) {
  switch (side) {
    case 2: body.template operator()<2>(); return true;
    case 3: body.template operator()<3>(); return true;
    case 4: body.template operator()<4>(); return true;
    default: return false;
  }
}

// Full K x K blocks through Block::run, the ragged edges element by element (row_in == 1).
template <typename Block, typename T>
void copy_tile_blocked(const T* src, T* dst, const PermutePlan& p, int64_t r0, int64_t r1,
                       int64_t c0, int64_t c1) {
  constexpr int64_t K = Block::K;
  const int64_t rk = r0 + (r1 - r0) / K * K, ck = c0 + (c1 - c0) / K * K;
  for (int64_t r = r0; r < rk; r += K) {
    for (int64_t c = c0; c < ck; c += K) {
      Block::run(src + r + c * p.col_in, p.col_in, dst + r * p.row_out + c, p.row_out);
    }
  }
  copy_tile_scalar(src, dst, p, r0, rk, ck, c1);  // right edge
  copy_tile_scalar(src, dst, p, rk, r1, c0, c1);  // bottom edge
}

template <typename T>
void copy_tile(const T* src, T* dst, const PermutePlan& p, int64_t r0, int64_t r1, int64_t c0,
               int64_t c1) {
  if (p.row_in == 1 && c0 == 0 && c1 == p.cols &&
      with_short_side(p.cols, [&]<int64_t S>() { copy_tile_short_cols<T, S>(src, dst, p, r0, r1); })) {
    return;
  }
  if (p.row_in == 1 && r0 == 0 && r1 == p.rows &&
      with_short_side(p.rows, [&]<int64_t S>() { copy_tile_short_rows<T, S>(src, dst, p, c0, c1); })) {
    return;
  }
  if (p.row_in == 1) {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, uint32_t>) {
      if (cpu_has_avx2()) return copy_tile_blocked<RegisterBlockAvx2>(src, dst, p, r0, r1, c0, c1);
    }
#endif
    if constexpr (RegisterBlock<T>::K > 0) {
      return copy_tile_blocked<RegisterBlock<T>>(src, dst, p, r0, r1, c0, c1);
    }
  }
  copy_tile_scalar(src, dst, p, r0, r1, c0, c1);
}

// Input walks rows fastest: copy tiles, reading down columns of the input, writing along rows
// of the output. Tiles are 64x64 (measured faster than 32x32 and 16x16 here), stretched along
// the other dim when rows or cols is short (C=3 images): 2048x2, not 64x2.
template <typename T>
void permute_copy_transposed(const T* in, T* out, const PermutePlan& p) {
  int64_t tile_cols = std::min(p.cols, kTileEdge);
  const int64_t tile_rows = std::min(p.rows, std::max(kTileEdge, kTileElems / tile_cols));
  if (tile_rows < kTileEdge) tile_cols = std::min(p.cols, kTileElems / tile_rows);
  const int64_t row_tiles = ceil_div(p.rows, tile_rows);
  const int64_t col_tiles = ceil_div(p.cols, tile_cols);
  const int64_t tiles = p.batch_count * row_tiles * col_tiles;
#pragma omp parallel for schedule(static) if (p.numel > kParallelGrain)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t col_tile = t % col_tiles;
    const int64_t row_tile = (t / col_tiles) % row_tiles;
    const BatchOffsets base = batch_offsets(p, t / (col_tiles * row_tiles));
    const int64_t r0 = row_tile * tile_rows, c0 = col_tile * tile_cols;
    copy_tile(in + base.in, out + base.out, p, r0, std::min(r0 + tile_rows, p.rows), c0,
              std::min(c0 + tile_cols, p.cols));
  }
}

// Input walks cols fastest (or nothing is transposed): copy whole rows.
template <typename T>
void permute_copy_rows(const T* in, T* out, const PermutePlan& p) {
  const int64_t nrows = p.batch_count * p.rows;
#pragma omp parallel for schedule(static) if (p.numel > kParallelGrain)
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t r = i % p.rows;
    const BatchOffsets base = batch_offsets(p, i / p.rows);
    const T* src = in + base.in + r * p.row_in;
    T* dst = out + base.out + r * p.row_out;
    if (p.col_in == 1) {
      std::memcpy(dst, src, sizeof(T) * p.cols);
    } else {
      for (int64_t c = 0; c < p.cols; ++c) dst[c] = src[c * p.col_in];
    }
  }
}

}  // namespace

at::Tensor permute_copy_cpu(const at::Tensor& x, const std::vector<int64_t>& perm) {
  PK_CHECK_CPU("permute_copy_cpu", x);
  const PermutePlan plan = make_permute_plan(x.sizes().vec(), x.strides().vec(), perm);
  std::vector<int64_t> out_sizes;
  for (int64_t p : perm) out_sizes.push_back(x.size(p));
  at::Tensor out = at::empty(out_sizes, x.options());
  if (plan.numel == 0) return out;
  poison_cpu(out);
  PK_DISPATCH_BY_ELEMENT_SIZE("permute_copy_cpu", x.element_size(), [&] {
    const auto* in = static_cast<const scalar_t*>(x.const_data_ptr());
    auto* dst = static_cast<scalar_t*>(out.data_ptr());
    if (plan.transposed()) {
      permute_copy_transposed(in, dst, plan);
    } else {
      permute_copy_rows(in, dst, plan);
    }
  });
  return out;
}

}  // namespace pykern
