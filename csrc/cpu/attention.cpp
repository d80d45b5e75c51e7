// Attention family, CPU reference. CUDA twin: csrc/cuda/attention.cu; Triton twin:
// triton_kernels/attention.py. The op's contract is in csrc/pykern.h.
//
// The same flash algorithm as the GPU kernels, so memory stays O(L + S) per worker: nothing
// of size (L, S) ever exists (except in attention_materialized_cpu, the tests' second opinion).
//   fwd: a task per (query head, tile of kBlockQ query rows) walks the key tiles (kBlockK keys)
//     keeping the running row max m, the running sum l and the output accumulator; key tiles
//     entirely above the causal diagonal are never visited. Scores live as S^T (keys x queries)
//     so the softmax statistics are vectors over the query rows.
//   bwd: D_i = dO_i . O_i first; then one task per (z, kv head, key tile) accumulates dK, dV
//     over the group's query heads and every query tile below the diagonal, recomputing
//     P = exp(s - lse); then one task per (query head, query tile) accumulates dQ over the key
//     tiles. Every output element is summed by one task in a fixed order: no shared
//     accumulation, results are bitwise reproducible whatever the thread count.
// Tile products: our own register-blocked GEMM (gemm_acc below: 6 rows x 2 vectors of
// accumulators, the broadcast operand read through two strides so transposed tiles need no
// copy). The operand a product reuses across a task is packed once per task (Q^T, dO^T in fwd
// and dQ; K^T, V^T in dK/dV), so no product ever transposes a tile in its inner loop.
// Scores come out of the products in the same summation order in all three passes (no FMA
// contraction), so the backward recomputes the forward's scores bit for bit.
// Math in the accumulation type acc (float for float16, bfloat16 and float32; double for
// float64): 16-bit tiles are upcast once per tile; exp is a vectorized polynomial for float
// (about 1 ulp) and std::exp for double.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_hot_loop.h"
#include "common/cpu_vec.h"
#include "common/philox.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

// The vector types only travel between always-inline functions: no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Tiles: a query tile's Q^T (E x 64) stays in L1 while the key tiles stream by; a score tile
// (128 x 64 acc) and the K, V tiles fit in L2 with room to spare up to E = 256.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 128;
constexpr int64_t kPad = 16;  // packed tile widths: whole pairs of float vectors

constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
template <typename acc_t>
constexpr acc_t kPosInf = std::numeric_limits<acc_t>::infinity();

// ---------------------------------------------------------------------------------------------
// Vectors (GCC vector types, 32 bytes: one AVX2 register; two SSE registers in the default clone).

typedef int32_t i32x8 __attribute__((vector_size(32)));

// x in every lane (x - 0 is x exactly, and GCC turns a scalar operand into a broadcast).
PK_INLINE vec_t<float> splat(float x) { return x - vec_t<float>{}; }
PK_INLINE vec_t<double> splat(double x) { return x - vec_t<double>{}; }

// exp(x) for float lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial
// for exp(r), 2^n built in the exponent bits). Exactly 0 below the smallest normal (this is
// where -inf goes: masked scores), exactly 1 at 0.
PK_INLINE vec_t<float> exp_vec(vec_t<float> x) {
  using V = vec_t<float>;
  const auto underflow = x < -87.33654f;
  x = x > 88.37626f ? splat(88.37626f) : x;
  x = x < -87.33654f ? splat(-87.33654f) : x;
  const V shifted = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
  const V n = shifted - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i32x8 n_int = (i32x8)shifted - 0x4B400000;
  const i32x8 pow2_bits = (n_int + 127) << 23;
  const V result = p * (V)pow2_bits;
  return underflow ? splat(0.0f) : result;
}

// row[i] = exp(row[i] - shift[i]) for i < n.
PK_INLINE void exp_minus(float* row, const float* shift, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vstore(row + i, exp_vec(vload(row + i) - vload(shift + i)));
  for (; i < n; ++i) row[i] = std::exp(row[i] - shift[i]);
}
PK_INLINE void exp_minus(double* row, const double* shift, int64_t n) {
  for (int64_t i = 0; i < n; ++i) row[i] = std::exp(row[i] - shift[i]);
}

// row[i] = exp(row[i] - shift) for i < n.
PK_INLINE void exp_minus(float* row, float shift, int64_t n) {
  int64_t i = 0;
  const vec_t<float> s = splat(shift);
  for (; i + 8 <= n; i += 8) vstore(row + i, exp_vec(vload(row + i) - s));
  for (; i < n; ++i) row[i] = std::exp(row[i] - shift);
}
PK_INLINE void exp_minus(double* row, double shift, int64_t n) {
  for (int64_t i = 0; i < n; ++i) row[i] = std::exp(row[i] - shift);
}

// ---------------------------------------------------------------------------------------------
// Tile products in acc: C (M x N, row stride ldc) = or += A (M x K) B (K x N, row stride ldb,
// unit column stride), A's element (r, kk) at A[r * ars + kk * acs] (so A may be a transposed
// tile). Blocks of kRows rows x two vectors of columns kept in registers: each step loads two
// vectors of a B row and broadcasts kRows A elements (12 independent sums, enough to hide the
// add latency). Each C element is the sum over kk in increasing order, starting from C or 0.

constexpr int kRows = 6;

template <typename acc_t, int MR, int NV>
PK_INLINE void gemm_block(int64_t K, const acc_t* __restrict A, int64_t ars, int64_t acs,
                          const acc_t* __restrict B, int64_t ldb, acc_t* __restrict C,
                          int64_t ldc, bool accumulate) {
  using V = vec_t<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  V c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? vload(C + r * ldc + v * W) : V{};
  }
  const acc_t* a[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) a[r] = A + r * ars;
  int64_t a_off = 0;
  for (int64_t kk = 0; kk < K; ++kk, B += ldb, a_off += acs) {
    V b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = vload(B + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const acc_t ar = a[r][a_off];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[r][v] += ar * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, c[r][v]);
  }
}

template <typename acc_t, int NV>
PK_INLINE void gemm_rows(int64_t rows, int64_t K, const acc_t* A, int64_t ars, int64_t acs,
                         const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc, bool accumulate) {
  switch (rows) {
    case 6: return gemm_block<acc_t, 6, NV>(K, A, ars, acs, B, ldb, C, ldc, accumulate);
    case 5: return gemm_block<acc_t, 5, NV>(K, A, ars, acs, B, ldb, C, ldc, accumulate);
    case 4: return gemm_block<acc_t, 4, NV>(K, A, ars, acs, B, ldb, C, ldc, accumulate);
    case 3: return gemm_block<acc_t, 3, NV>(K, A, ars, acs, B, ldb, C, ldc, accumulate);
    case 2: return gemm_block<acc_t, 2, NV>(K, A, ars, acs, B, ldb, C, ldc, accumulate);
    default: return gemm_block<acc_t, 1, NV>(K, A, ars, acs, B, ldb, C, ldc, accumulate);
  }
}

template <typename acc_t>
PK_HOT_LOOP void gemm_acc(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t ars,
                          int64_t acs, const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc,
                          bool accumulate) {
  constexpr int64_t W = kLanes<acc_t>;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, M - m0);
    const acc_t* Am = A + m0 * ars;
    acc_t* Cm = C + m0 * ldc;
    int64_t n0 = 0;
    for (; n0 + 2 * W <= N; n0 += 2 * W) {
      gemm_rows<acc_t, 2>(rows, K, Am, ars, acs, B + n0, ldb, Cm + n0, ldc, accumulate);
    }
    for (; n0 + W <= N; n0 += W) {
      gemm_rows<acc_t, 1>(rows, K, Am, ars, acs, B + n0, ldb, Cm + n0, ldc, accumulate);
    }
    for (; n0 < N; ++n0) {  // the last N % W columns (odd head sizes only)
      for (int64_t r = 0; r < rows; ++r) {
        acc_t sum = accumulate ? Cm[r * ldc + n0] : acc_t(0);
        for (int64_t kk = 0; kk < K; ++kk) sum += Am[r * ars + kk * acs] * B[kk * ldb + n0];
        Cm[r * ldc + n0] = sum;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions to acc. float16 runs go through F16C where the CPU has it (picked at load time);
// bfloat16 is the top half of a float.

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("default"))) void half_to_float_n(const c10::Half* in, float* out,
                                                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
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
#else
void half_to_float_n(const c10::Half* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}
#endif

PK_HOT_LOOP void bf16_to_float_n(const c10::BFloat16* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = __builtin_bit_cast(float, static_cast<uint32_t>(in[i].x) << 16);
  }
}

// n contiguous elements as acc: the input itself when it already is acc, else a copy in buf.
template <typename scalar_t>
const acc_type<scalar_t>* as_acc(const scalar_t* src, int64_t n, acc_type<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    half_to_float_n(src, buf, n);
    return buf;
  } else {
    static_assert(std::is_same_v<scalar_t, c10::BFloat16>);
    bf16_to_float_n(src, buf, n);
    return buf;
  }
}

// dst (cols x ld, row stride ld) = the transpose of src (rows x cols, contiguous), in acc,
// columns rows..ld-1 zero.
template <typename scalar_t>
PK_HOT_LOOP void pack_transposed(const scalar_t* src, int64_t rows, int64_t cols,
                                 acc_type<scalar_t>* dst, int64_t ld) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t c = 0; c < cols; ++c) {
    acc_t* d = dst + c * ld;
    for (int64_t r = 0; r < rows; ++r) d[r] = static_cast<acc_t>(src[r * cols + c]);
    for (int64_t r = rows; r < ld; ++r) d[r] = acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Shapes and arguments.

struct Dims {
  int64_t Z, Hq, Hk, L, S, E, Ev;
  int64_t group() const { return Hq / Hk; }  // query heads per kv head
};

template <typename scalar_t>
struct Problem {
  using acc_t = acc_type<scalar_t>;
  Dims d;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const acc_t* bias;  // null: none
  int64_t bias_z, bias_h, bias_l, bias_s;
  acc_t scale;
  bool causal;
  bool dropout;
  uint32_t drop_threshold;
  acc_t keep_scale;  // 1 / (1 - dropout_p)
  uint64_t seed;

  const acc_t* bias_of(int64_t zh) const {
    return bias + (zh / d.Hq) * bias_z + (zh % d.Hq) * bias_h;
  }
  int64_t kv_head(int64_t zh) const {  // flat (z, kv head) index of query head zh
    return (zh / d.Hq) * d.Hk + (zh % d.Hq) / d.group();
  }
};

template <typename scalar_t>
Problem<scalar_t> make_problem(const Dims& d, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const std::optional<at::Tensor>& bias,
                               double scale, bool is_causal, double dropout_p, int64_t seed) {
  using acc_t = acc_type<scalar_t>;
  Problem<scalar_t> p{};
  p.d = d;
  p.q = q.const_data_ptr<scalar_t>();
  p.k = k.const_data_ptr<scalar_t>();
  p.v = v.const_data_ptr<scalar_t>();
  if (bias) {
    p.bias = bias->const_data_ptr<acc_t>();
    p.bias_z = bias->stride(0);
    p.bias_h = bias->stride(1);
    p.bias_l = bias->stride(2);
    p.bias_s = bias->stride(3);
  }
  p.scale = static_cast<acc_t>(scale);
  p.causal = is_causal;
  p.dropout = dropout_p > 0.0;
  p.drop_threshold = dropout_threshold(dropout_p);
  p.keep_scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
  return p;
}

// Dropout factors (keep_scale where the element survives, else 0) of n elements of one head:
// rows i0.. of key j (over_rows), or keys j0.. of row i (over_keys). Vectorized loops (the
// Philox rounds in vector lanes): drawing the numbers is most of dropout's cost.
template <typename acc_t>
PK_HOT_LOOP void keep_factors_over_rows(acc_t* f, uint64_t seed, uint64_t zh, uint32_t i0,
                                        uint32_t j, uint32_t threshold, acc_t keep_scale,
                                        int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    f[t] = dropout_keep(seed, zh, i0 + static_cast<uint32_t>(t), j, threshold) ? keep_scale
                                                                                 : acc_t(0);
  }
}
template <typename acc_t>
PK_HOT_LOOP void keep_factors_over_keys(acc_t* f, uint64_t seed, uint64_t zh, uint32_t i,
                                        uint32_t j0, uint32_t threshold, acc_t keep_scale,
                                        int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    f[t] = dropout_keep(seed, zh, i, j0 + static_cast<uint32_t>(t), threshold) ? keep_scale
                                                                                 : acc_t(0);
  }
}

// Runs body(task, workspace) for every task in [0, n_tasks), handing tasks out one at a time
// (the causal tiles differ in cost) to at most one worker per thread, each with its own
// workspace of ws_elems. Tasks write disjoint outputs, so the order they run in does not matter.
template <typename acc_t, typename Body>
void for_each_task(int64_t n_tasks, int64_t ws_elems, const Body& body) {
  if (n_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<acc_t> workspace(ws_elems);
    for (int64_t task = next.fetch_add(1); task < n_tasks; task = next.fetch_add(1)) {
      body(task, workspace.data());
    }
  });
}

// Scores of one S^T tile (keys j0.. x queries i0.., row stride ld, from the product) made
// final: times scale, plus bias, -inf where causal masks; tile_max (when given) gets the
// elementwise max over the tile's rows. Columns bm..ld-1 are padding (finite, never used).
template <typename scalar_t>
PK_INLINE void finish_scores_t(const Problem<scalar_t>& p, const acc_type<scalar_t>* bias_zh,
                               int64_t i0, int64_t bm, int64_t j0, int64_t bn,
                               acc_type<scalar_t>* st, int64_t ld,
                               acc_type<scalar_t>* tile_max) {
  using acc_t = acc_type<scalar_t>;
  const acc_t scale = p.scale;
  for (int64_t j = 0; j < bn; ++j) {
    acc_t* row = st + j * ld;
    if (bias_zh != nullptr) {
      const acc_t* brow = bias_zh + (j0 + j) * p.bias_s + i0 * p.bias_l;
      const int64_t bl = p.bias_l;
      for (int64_t i = 0; i < bm; ++i) row[i] = row[i] * scale + brow[i * bl];
      for (int64_t i = bm; i < ld; ++i) row[i] *= scale;
    } else {
      for (int64_t i = 0; i < ld; ++i) row[i] *= scale;
    }
    // Causal: query i sees keys j <= i, so rows i < j0 + j - i0 are masked.
    const int64_t masked = p.causal ? std::clamp<int64_t>(j0 + j - i0, 0, bm) : 0;
    for (int64_t i = 0; i < masked; ++i) row[i] = kNegInf<acc_t>;
    if (tile_max != nullptr) {
      for (int64_t i = 0; i < ld; ++i) tile_max[i] = row[i] > tile_max[i] ? row[i] : tile_max[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t>
struct FwdWorkspace {
  using acc_t = acc_type<scalar_t>;
  static int64_t elems(const Dims& d) {
    return d.E * kBlockQ + kBlockK * kBlockQ + kBlockQ * d.Ev + kBlockK * (d.E + d.Ev) +
           7 * kBlockQ;
  }
  acc_t *qt, *st, *acc, *kbuf, *vbuf, *m, *l, *alpha, *shift, *tile_max, *tile_sum, *keep;
  FwdWorkspace(const Dims& d, acc_t* ws) {
    qt = ws;
    st = qt + d.E * kBlockQ;
    acc = st + kBlockK * kBlockQ;
    kbuf = acc + kBlockQ * d.Ev;
    vbuf = kbuf + kBlockK * d.E;
    m = vbuf + kBlockK * d.Ev;
    l = m + kBlockQ;
    alpha = l + kBlockQ;
    shift = alpha + kBlockQ;
    tile_max = shift + kBlockQ;
    tile_sum = tile_max + kBlockQ;
    keep = tile_sum + kBlockQ;
  }
};

template <typename scalar_t>
PK_HOT_LOOP void fwd_tile(const Problem<scalar_t>& p, int64_t zh, int64_t i0,
                          acc_type<scalar_t>* ws_mem, scalar_t* out, acc_type<scalar_t>* lse) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = p.d;
  const int64_t E = d.E, Ev = d.Ev;
  const int64_t bm = std::min(kBlockQ, d.L - i0), ld = round_up(bm, kPad);
  FwdWorkspace<scalar_t> w(d, ws_mem);
  const scalar_t* kp = p.k + p.kv_head(zh) * d.S * E;
  const scalar_t* vp = p.v + p.kv_head(zh) * d.S * Ev;
  const acc_t* bias_zh = p.bias != nullptr ? p.bias_of(zh) : nullptr;

  pack_transposed(p.q + (zh * d.L + i0) * E, bm, E, w.qt, ld);
  for (int64_t i = 0; i < ld; ++i) {
    w.m[i] = kNegInf<acc_t>;
    w.l[i] = acc_t(0);
  }
  std::fill(w.acc, w.acc + bm * Ev, acc_t(0));

  // Causal: keys past the tile's last row are masked for every row of it.
  const int64_t j_end = p.causal ? std::min(d.S, i0 + bm) : d.S;
  for (int64_t j0 = 0; j0 < j_end; j0 += kBlockK) {
    const int64_t bn = std::min(kBlockK, j_end - j0);
    const acc_t* kt = as_acc(kp + j0 * E, bn * E, w.kbuf);
    gemm_acc(bn, ld, E, kt, E, 1, w.qt, ld, w.st, ld, false);  // S^T = K Q^T
    for (int64_t i = 0; i < ld; ++i) w.tile_max[i] = kNegInf<acc_t>;
    finish_scores_t(p, bias_zh, i0, bm, j0, bn, w.st, ld, w.tile_max);

    // Online softmax: new running max, the factor that rescales what came before, and the
    // shift subtracted before exp (0 while a row has seen only -inf, so no -inf - -inf).
    for (int64_t i = 0; i < ld; ++i) {
      const acc_t m_new = std::max(w.m[i], w.tile_max[i]);
      w.shift[i] = m_new == kNegInf<acc_t> ? acc_t(0) : m_new;
      w.alpha[i] = w.m[i] - w.shift[i];  // exp below
      w.m[i] = m_new;
      w.tile_sum[i] = acc_t(0);
    }
    exp_minus(w.alpha, acc_t(0), ld);
    for (int64_t j = 0; j < bn; ++j) {
      acc_t* row = w.st + j * ld;
      exp_minus(row, w.shift, ld);
      for (int64_t i = 0; i < ld; ++i) w.tile_sum[i] += row[i];
    }
    for (int64_t i = 0; i < ld; ++i) w.l[i] = w.l[i] * w.alpha[i] + w.tile_sum[i];
    if (p.dropout) {  // the sum above is of the undropped probabilities (lse ignores dropout)
      for (int64_t j = 0; j < bn; ++j) {
        acc_t* row = w.st + j * ld;
        keep_factors_over_rows(w.keep, p.seed, zh, static_cast<uint32_t>(i0),
                               static_cast<uint32_t>(j0 + j), p.drop_threshold, p.keep_scale,
                               bm);
        for (int64_t i = 0; i < bm; ++i) row[i] *= w.keep[i];
      }
    }
    for (int64_t i = 0; i < bm; ++i) {
      const acc_t a = w.alpha[i];
      if (a != acc_t(1)) {
        acc_t* acc_row = w.acc + i * Ev;
        for (int64_t e = 0; e < Ev; ++e) acc_row[e] *= a;
      }
    }
    const acc_t* vt = as_acc(vp + j0 * Ev, bn * Ev, w.vbuf);
    gemm_acc(bm, Ev, bn, w.st, 1, ld, vt, Ev, w.acc, Ev, true);  // acc += P V
  }

  // l == 0 exactly when every key of the row is masked: output 0, lse -inf.
  for (int64_t i = 0; i < bm; ++i) {
    const acc_t li = w.l[i];
    const acc_t* acc_row = w.acc + i * Ev;
    scalar_t* out_row = out + (zh * d.L + i0 + i) * Ev;
    if (li > acc_t(0)) {
      for (int64_t e = 0; e < Ev; ++e) out_row[e] = static_cast<scalar_t>(acc_row[e] / li);
      // In double: lse is rounded once, the backward's exp(s - lse) errs by that rounding.
      lse[zh * d.L + i0 + i] =
          static_cast<acc_t>(static_cast<double>(w.m[i]) + std::log(static_cast<double>(li)));
    } else {
      for (int64_t e = 0; e < Ev; ++e) out_row[e] = static_cast<scalar_t>(acc_t(0));
      lse[zh * d.L + i0 + i] = kNegInf<acc_t>;
    }
  }
}

template <typename scalar_t>
void fwd_impl(const Problem<scalar_t>& p, at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = p.d;
  const int64_t ZH = d.Z * d.Hq, tiles = (d.L + kBlockQ - 1) / kBlockQ;
  scalar_t* outp = out.data_ptr<scalar_t>();
  acc_t* lsep = lse.data_ptr<acc_t>();
  for_each_task<acc_t>(ZH * tiles, FwdWorkspace<scalar_t>::elems(d),
                       [&](int64_t task, acc_t* ws) {
                         // Causal: the last (costliest) tiles first, for the load balance.
                         const int64_t zh = p.causal ? task % ZH : task / tiles;
                         const int64_t t = p.causal ? tiles - 1 - task / ZH : task % tiles;
                         fwd_tile(p, zh, t * kBlockQ, ws, outp, lsep);
                       });
}

// ---------------------------------------------------------------------------------------------
// Backward.

// D_i = dO_i . O_i in acc.
template <typename scalar_t>
void row_dots(const scalar_t* grad_out, const scalar_t* out, int64_t rows, int64_t Ev,
              acc_type<scalar_t>* dst) {
  using acc_t = acc_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(Ev, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      acc_t sum = 0;
      for (int64_t e = 0; e < Ev; ++e) {
        sum += static_cast<acc_t>(grad_out[r * Ev + e]) * static_cast<acc_t>(out[r * Ev + e]);
      }
      dst[r] = sum;
    }
  });
}

template <typename scalar_t>
struct BwdArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* grad_out;
  const acc_t* lse;
  const acc_t* delta;  // D, (Z * Hq, L)
};

// dK and dV of one key tile, over the query heads of its kv head's group and every query tile
// at or below the diagonal. Scores as S (queries x keys) against K^T and V^T packed once.
template <typename scalar_t>
struct KvWorkspace {
  using acc_t = acc_type<scalar_t>;
  static int64_t elems(const Dims& d) {
    return (d.E + d.Ev) * kBlockK + 2 * kBlockQ * kBlockK + kBlockQ * (d.E + d.Ev) +
           kBlockK * (d.E + d.Ev) + kBlockK;
  }
  acc_t *kt, *vt, *s, *dp, *qbuf, *dobuf, *dk, *dv, *keep;
  KvWorkspace(const Dims& d, acc_t* ws) {
    kt = ws;
    vt = kt + d.E * kBlockK;
    s = vt + d.Ev * kBlockK;
    dp = s + kBlockQ * kBlockK;
    qbuf = dp + kBlockQ * kBlockK;
    dobuf = qbuf + kBlockQ * d.E;
    dk = dobuf + kBlockQ * d.Ev;
    dv = dk + kBlockK * d.E;
    keep = dv + kBlockK * d.Ev;
  }
};

template <typename scalar_t>
PK_HOT_LOOP void dkdv_tile(const Problem<scalar_t>& p, const BwdArgs<scalar_t>& b,
                           int64_t zhk, int64_t j0, acc_type<scalar_t>* ws_mem, scalar_t* dk,
                           scalar_t* dv) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = p.d;
  const int64_t E = d.E, Ev = d.Ev;
  const int64_t bn = std::min(kBlockK, d.S - j0), ld = round_up(bn, kPad);
  KvWorkspace<scalar_t> w(d, ws_mem);
  pack_transposed(p.k + (zhk * d.S + j0) * E, bn, E, w.kt, ld);
  pack_transposed(p.v + (zhk * d.S + j0) * Ev, bn, Ev, w.vt, ld);
  std::fill(w.dk, w.dk + bn * E, acc_t(0));
  std::fill(w.dv, w.dv + bn * Ev, acc_t(0));

  const int64_t z = zhk / d.Hk, hk = zhk % d.Hk, G = d.group();
  const int64_t i_start = p.causal ? j0 : 0;  // causal: rows above the tile's first key see none
  for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
    const int64_t zh = z * d.Hq + h;
    const acc_t* bias_zh = p.bias != nullptr ? p.bias_of(zh) : nullptr;
    for (int64_t i0 = i_start; i0 < d.L; i0 += kBlockQ) {
      const int64_t bm = std::min(kBlockQ, d.L - i0);
      const acc_t* qa = as_acc(p.q + (zh * d.L + i0) * E, bm * E, w.qbuf);
      const acc_t* doa = as_acc(b.grad_out + (zh * d.L + i0) * Ev, bm * Ev, w.dobuf);
      gemm_acc(bm, ld, E, qa, E, 1, w.kt, ld, w.s, ld, false);     // S = Q K^T
      gemm_acc(bm, ld, Ev, doa, Ev, 1, w.vt, ld, w.dp, ld, false);  // dP = dO V^T
      for (int64_t i = 0; i < bm; ++i) {
        acc_t* row = w.s + i * ld;
        acc_t* drow = w.dp + i * ld;
        const acc_t lse_i = b.lse[zh * d.L + i0 + i];
        if (lse_i == kNegInf<acc_t>) {  // every key masked: P = 0, no gradient
          std::fill(row, row + ld, acc_t(0));
          std::fill(drow, drow + ld, acc_t(0));
          continue;
        }
        for (int64_t j = 0; j < ld; ++j) row[j] *= p.scale;
        if (bias_zh != nullptr) {
          const acc_t* brow = bias_zh + (i0 + i) * p.bias_l + j0 * p.bias_s;
          const int64_t bs = p.bias_s;
          for (int64_t j = 0; j < bn; ++j) row[j] += brow[j * bs];
        }
        // Causal masks keys j0 + j > i0 + i; the padding columns are masked too.
        const int64_t visible =
            p.causal ? std::clamp<int64_t>(i0 + i - j0 + 1, 0, bn) : bn;
        for (int64_t j = visible; j < ld; ++j) row[j] = kNegInf<acc_t>;
        exp_minus(row, lse_i, ld);  // P
        const acc_t delta_i = b.delta[zh * d.L + i0 + i];
        if (p.dropout) {
          keep_factors_over_keys(w.keep, p.seed, zh, static_cast<uint32_t>(i0 + i),
                                 static_cast<uint32_t>(j0), p.drop_threshold, p.keep_scale, bn);
          for (int64_t j = 0; j < bn; ++j) {
            drow[j] = row[j] * (drow[j] * w.keep[j] - delta_i);  // dS
            row[j] *= w.keep[j];                                 // P with dropout, for dV
          }
        } else {
          for (int64_t j = 0; j < ld; ++j) drow[j] = row[j] * (drow[j] - delta_i);
        }
      }
      gemm_acc(bn, Ev, bm, w.s, 1, ld, doa, Ev, w.dv, Ev, true);  // dV += P^T dO
      gemm_acc(bn, E, bm, w.dp, 1, ld, qa, E, w.dk, E, true);     // dK += dS^T Q
    }
  }
  scalar_t* dk_tile = dk + (zhk * d.S + j0) * E;
  scalar_t* dv_tile = dv + (zhk * d.S + j0) * Ev;
  for (int64_t n = 0; n < bn * E; ++n) dk_tile[n] = static_cast<scalar_t>(w.dk[n] * p.scale);
  for (int64_t n = 0; n < bn * Ev; ++n) dv_tile[n] = static_cast<scalar_t>(w.dv[n]);
}

// dQ of one query tile over the key tiles at or left of the diagonal. Scores as S^T against
// Q^T and dO^T packed once.
template <typename scalar_t>
struct QWorkspace {
  using acc_t = acc_type<scalar_t>;
  static int64_t elems(const Dims& d) {
    return (d.E + d.Ev) * kBlockQ + 2 * kBlockK * kBlockQ + kBlockK * (d.E + d.Ev) +
           kBlockQ * d.E + 3 * kBlockQ;
  }
  acc_t *qt, *dot, *st, *dpt, *kbuf, *vbuf, *dq, *lse, *delta, *keep;
  QWorkspace(const Dims& d, acc_t* ws) {
    qt = ws;
    dot = qt + d.E * kBlockQ;
    st = dot + d.Ev * kBlockQ;
    dpt = st + kBlockK * kBlockQ;
    kbuf = dpt + kBlockK * kBlockQ;
    vbuf = kbuf + kBlockK * d.E;
    dq = vbuf + kBlockK * d.Ev;
    lse = dq + kBlockQ * d.E;
    delta = lse + kBlockQ;
    keep = delta + kBlockQ;
  }
};

template <typename scalar_t>
PK_HOT_LOOP void dq_tile(const Problem<scalar_t>& p, const BwdArgs<scalar_t>& b, int64_t zh,
                         int64_t i0, acc_type<scalar_t>* ws_mem, scalar_t* dq) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = p.d;
  const int64_t E = d.E, Ev = d.Ev;
  const int64_t bm = std::min(kBlockQ, d.L - i0), ld = round_up(bm, kPad);
  QWorkspace<scalar_t> w(d, ws_mem);
  const scalar_t* kp = p.k + p.kv_head(zh) * d.S * E;
  const scalar_t* vp = p.v + p.kv_head(zh) * d.S * Ev;
  const acc_t* bias_zh = p.bias != nullptr ? p.bias_of(zh) : nullptr;
  pack_transposed(p.q + (zh * d.L + i0) * E, bm, E, w.qt, ld);
  pack_transposed(b.grad_out + (zh * d.L + i0) * Ev, bm, Ev, w.dot, ld);
  // A fully masked row (lse -inf) shifts by +inf instead: every P of it is exp(-inf) = 0.
  // The padding rows too.
  for (int64_t i = 0; i < ld; ++i) {
    const acc_t lse_i = i < bm ? b.lse[zh * d.L + i0 + i] : kNegInf<acc_t>;
    w.lse[i] = lse_i == kNegInf<acc_t> ? kPosInf<acc_t> : lse_i;
    w.delta[i] = i < bm ? b.delta[zh * d.L + i0 + i] : acc_t(0);
  }
  std::fill(w.dq, w.dq + bm * E, acc_t(0));

  const int64_t j_end = p.causal ? std::min(d.S, i0 + bm) : d.S;
  for (int64_t j0 = 0; j0 < j_end; j0 += kBlockK) {
    const int64_t bn = std::min(kBlockK, j_end - j0);
    const acc_t* ka = as_acc(kp + j0 * E, bn * E, w.kbuf);
    const acc_t* va = as_acc(vp + j0 * Ev, bn * Ev, w.vbuf);
    gemm_acc(bn, ld, E, ka, E, 1, w.qt, ld, w.st, ld, false);     // S^T = K Q^T
    gemm_acc(bn, ld, Ev, va, Ev, 1, w.dot, ld, w.dpt, ld, false);  // dP^T = V dO^T
    finish_scores_t(p, bias_zh, i0, bm, j0, bn, w.st, ld, nullptr);
    for (int64_t j = 0; j < bn; ++j) {
      acc_t* row = w.st + j * ld;
      acc_t* drow = w.dpt + j * ld;
      exp_minus(row, w.lse, ld);  // P^T
      if (p.dropout) {
        keep_factors_over_rows(w.keep, p.seed, zh, static_cast<uint32_t>(i0),
                               static_cast<uint32_t>(j0 + j), p.drop_threshold, p.keep_scale,
                               bm);
        for (int64_t i = 0; i < bm; ++i) drow[i] *= w.keep[i];
      }
      for (int64_t i = 0; i < ld; ++i) drow[i] = row[i] * (drow[i] - w.delta[i]);  // dS^T
    }
    gemm_acc(bm, E, bn, w.dpt, 1, ld, ka, E, w.dq, E, true);  // dQ += dS K
  }
  scalar_t* dq_tile_out = dq + (zh * d.L + i0) * E;
  for (int64_t n = 0; n < bm * E; ++n) {
    dq_tile_out[n] = static_cast<scalar_t>(w.dq[n] * p.scale);
  }
}

template <typename scalar_t>
void bwd_impl(const Problem<scalar_t>& p, const at::Tensor& grad_out, const at::Tensor& out,
              const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = acc_type<scalar_t>;
  const Dims& d = p.d;
  const int64_t ZH = d.Z * d.Hq, ZHk = d.Z * d.Hk;
  std::vector<acc_t> delta(ZH * d.L);
  row_dots(grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), ZH * d.L, d.Ev,
           delta.data());
  const BwdArgs<scalar_t> b{grad_out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
                            delta.data()};

  const int64_t k_tiles = (d.S + kBlockK - 1) / kBlockK;
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();
  for_each_task<acc_t>(ZHk * k_tiles, KvWorkspace<scalar_t>::elems(d),
                       [&](int64_t task, acc_t* ws) {
                         // Causal: the first (costliest) key tiles first.
                         const int64_t zhk = p.causal ? task % ZHk : task / k_tiles;
                         const int64_t t = p.causal ? task / ZHk : task % k_tiles;
                         dkdv_tile(p, b, zhk, t * kBlockK, ws, dkp, dvp);
                       });

  const int64_t q_tiles = (d.L + kBlockQ - 1) / kBlockQ;
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  for_each_task<acc_t>(ZH * q_tiles, QWorkspace<scalar_t>::elems(d),
                       [&](int64_t task, acc_t* ws) {
                         const int64_t zh = p.causal ? task % ZH : task / q_tiles;
                         const int64_t t = p.causal ? q_tiles - 1 - task / ZH : task % q_tiles;
                         dq_tile(p, b, zh, t * kBlockQ, ws, dqp);
                       });
}

// ---------------------------------------------------------------------------------------------
// Checks.

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_tensor(const char* fn, const char* name, const at::Tensor& t, int64_t dim) {
  PK_CHECK_VALUE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ",
                 t.device());
  PK_CHECK_VALUE(t.dim() == dim, fn, ": ", name, " must have ", dim, " dimensions, got ",
                 t.dim());
  PK_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

void check_same_dtype(const char* fn, const char* name, const at::Tensor& t,
                      const at::Tensor& q) {
  PK_CHECK_TYPE(t.scalar_type() == q.scalar_type(), fn, ": ", name,
                " must have q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
}

void check_shape(const char* fn, const char* name, const at::Tensor& t,
                 at::IntArrayRef expected) {
  PK_CHECK_VALUE(t.sizes() == expected, fn, ": ", name, " must have shape ", expected,
                 ", got ", t.sizes());
}

// Checks q, k, v, bias and dropout_p; returns the dimensions.
Dims check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const std::optional<at::Tensor>& bias,
                  double dropout_p) {
  check_tensor(fn, "q", q, 4);
  check_tensor(fn, "k", k, 4);
  check_tensor(fn, "v", v, 4);
  const auto dtype = q.scalar_type();
  PK_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                    dtype == at::kBFloat16,
                fn, ": q must be float16, bfloat16, float32 or float64, got ", dtype);
  check_same_dtype(fn, "k", k, q);
  check_same_dtype(fn, "v", v, q);
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  PK_CHECK_VALUE(k.size(0) == d.Z && v.size(0) == d.Z, fn,
                 ": q, k and v must have the same batch size, got ", d.Z, ", ", k.size(0),
                 " and ", v.size(0));
  PK_CHECK_VALUE(v.size(1) == d.Hk && v.size(2) == d.S, fn,
                 ": v must have k's heads and length ", k.sizes().slice(1, 2), ", got ",
                 v.sizes().slice(1, 2));
  PK_CHECK_VALUE(d.Hk >= 1 && d.Hq % d.Hk == 0, fn, ": q's heads (", d.Hq,
                 ") must be a multiple of k's heads (", d.Hk, ")");
  PK_CHECK_VALUE(k.size(3) == d.E, fn, ": k must have q's head size ", d.E, ", got ",
                 k.size(3));
  if (bias) {
    PK_CHECK_VALUE(bias->device().is_cpu(), fn, ": bias must be a CPU tensor, got ",
                   bias->device());
    PK_CHECK_TYPE(bias->scalar_type() == acc_dtype(dtype), fn, ": bias must have dtype ",
                  acc_dtype(dtype), " for ", dtype, " q, got ", bias->scalar_type());
    check_shape(fn, "bias", *bias, {d.Z, d.Hq, d.L, d.S});
  }
  PK_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ",
                 dropout_p);
  // The dropout counter holds a row and a column in 32 bits each.
  PK_CHECK_VALUE(dropout_p == 0.0 || (d.L <= (int64_t{1} << 32) && d.S <= (int64_t{1} << 32)),
                 fn, ": dropout needs L and S <= 2^32, got ", d.L, " and ", d.S);
  return d;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& bias,
                                                     double scale, bool is_causal,
                                                     double dropout_p, int64_t seed) {
  constexpr const char* fn = "attention_fwd_cpu";
  const Dims d = check_inputs(fn, q, k, v, bias, dropout_p);
  at::Tensor out = at::empty({d.Z, d.Hq, d.L, d.Ev}, q.options());
  at::Tensor lse = at::empty({d.Z, d.Hq, d.L}, q.options().dtype(acc_dtype(q.scalar_type())));
  poison_cpu(out);
  poison_cpu(lse);
  if (d.Z * d.Hq * d.L == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), fn, [&] {
    const auto p = make_problem<scalar_t>(d, q, k, v, bias, scale, is_causal, dropout_p, seed);
    fwd_impl(p, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    double scale, bool is_causal, double dropout_p, int64_t seed) {
  constexpr const char* fn = "attention_bwd_cpu";
  const Dims d = check_inputs(fn, q, k, v, bias, dropout_p);
  check_tensor(fn, "grad_out", grad_out, 4);
  check_tensor(fn, "out", out, 4);
  check_same_dtype(fn, "grad_out", grad_out, q);
  check_same_dtype(fn, "out", out, q);
  check_shape(fn, "grad_out", grad_out, {d.Z, d.Hq, d.L, d.Ev});
  check_shape(fn, "out", out, {d.Z, d.Hq, d.L, d.Ev});
  check_tensor(fn, "lse", lse, 3);
  PK_CHECK_TYPE(lse.scalar_type() == acc_dtype(q.scalar_type()), fn, ": lse must have dtype ",
                acc_dtype(q.scalar_type()), " for ", q.scalar_type(), " q, got ",
                lse.scalar_type());
  check_shape(fn, "lse", lse, {d.Z, d.Hq, d.L});
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  poison_cpu(dq);
  poison_cpu(dk);
  poison_cpu(dv);
  if (d.L == 0) {  // no query: no gradient reaches the keys and values
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), fn, [&] {
    const auto p = make_problem<scalar_t>(d, q, k, v, bias, scale, is_causal, dropout_p, seed);
    bwd_impl(p, grad_out, out, lse, dq, dk, dv);
  });
  return {dq, dk, dv};
}

// The plain definition, a (L, S) score matrix per head in acc with ATen ops: for tests only.
at::Tensor attention_materialized_cpu(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                      double scale, bool is_causal, double dropout_p,
                                      int64_t seed) {
  constexpr const char* fn = "attention_materialized_cpu";
  const Dims d = check_inputs(fn, q, k, v, bias, dropout_p);
  at::NoGradGuard no_grad;
  at::Tensor out = at::empty({d.Z, d.Hq, d.L, d.Ev}, q.options());
  poison_cpu(out);
  if (d.S == 0) {  // no key: every row fully masked
    out.zero_();
    return out;
  }
  const auto acc = acc_dtype(q.scalar_type());
  const auto acc_options = q.options().dtype(acc);
  const at::Tensor causal_mask = at::ones({d.L, d.S}, q.options().dtype(at::kBool)).triu(1);
  const uint32_t threshold = dropout_threshold(dropout_p);
  for (int64_t z = 0; z < d.Z; ++z) {
    for (int64_t h = 0; h < d.Hq; ++h) {
      const int64_t hk = h / d.group();
      const at::Tensor qa = q[z][h].to(acc), ka = k[z][hk].to(acc), va = v[z][hk].to(acc);
      at::Tensor s = qa.matmul(ka.t()) * scale;
      if (bias) s = s + (*bias)[z][h];
      if (is_causal) s = s.masked_fill(causal_mask, -std::numeric_limits<double>::infinity());
      // Softmax with fully masked rows giving 0: shift those rows by 0 (exp(-inf) = 0) and
      // divide them by 1.
      at::Tensor row_max = s.amax(-1, true);
      row_max = row_max.masked_fill(row_max == -std::numeric_limits<double>::infinity(), 0.0);
      at::Tensor prob = (s - row_max).exp();
      at::Tensor row_sum = prob.sum(-1, true);
      prob = prob / row_sum.masked_fill(row_sum == 0.0, 1.0);
      if (dropout_p > 0.0) {
        at::Tensor keep = at::empty({d.L, d.S}, acc_options);
        AT_DISPATCH_FLOATING_TYPES(acc, fn, [&] {
          scalar_t* kp = keep.data_ptr<scalar_t>();
          const uint64_t zh = static_cast<uint64_t>(z * d.Hq + h);
          for (int64_t i = 0; i < d.L; ++i) {
            for (int64_t j = 0; j < d.S; ++j) {
              kp[i * d.S + j] = dropout_keep(static_cast<uint64_t>(seed), zh,
                                             static_cast<uint32_t>(i), static_cast<uint32_t>(j),
                                             threshold)
                                    ? scalar_t(1)
                                    : scalar_t(0);
            }
          }
        });
        prob = prob * keep * (1.0 / (1.0 - dropout_p));
      }
      out[z][h].copy_(prob.matmul(va));
    }
  }
  return out;
}

}  // namespace pykern
