// Pooling family, CPU reference. CUDA twin: csrc/cuda/pooling.cu; Triton twin:
// triton_kernels/pooling.py.
//
// Two kinds of kernel. Windowed pooling (max_pool2d, avg_pool2d, adaptive forms): each output
// reads the window that common/pool_window.h defines; the NCHW kernels walk planes, the NHWC
// kernels walk pixels with the channels as the contiguous inner loop. Backward gathers: each
// input element sums the gradients of the outputs whose windows hold it (deterministic).
//
// Global pooling (over H, W) and channel pooling (over C) are one reduction: x seen as a 3D
// strided view (B, R, K) is reduced over R into a contiguous (B, K). pykern/ops/pooling.py
// builds the view so that no layout is copied: global pooling of NCHW is (N*C, H*W, 1), of
// NHWC (N, H*W, C); channel pooling of NCHW is (N, C, H*W), of NHWC (N*H*W, C, 1).
// The vector types travel only between always-inline functions (cpu_vec.h): no ABI involved.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/cpu_hot_loop.h"
#include "common/cpu_vec.h"
#include "common/poison.h"
#include "common/pool_window.h"
#include "pykern.h"

namespace pykern {
namespace {

// Sums and maxima run in at::opmath_type (float for float, half and bfloat16, as torch's): sums
// in kShortLanes independent partials, which keeps the float error chain short over long
// reductions (112x112 planes) and vectorizes; maxima in vectors of running maxima.
template <typename scalar_t>
using max_t = at::opmath_type<scalar_t>;

// Independent partials: one AVX2 register of floats for short runs, whose combining at the end
// must stay cheap; four for long runs (kLongSum elements or more), so that their adds overlap
// instead of waiting on one register's latency. Combined pairwise at the end. Maxima: runs of
// kLongRun or more go one at a time, shorter ones 8 at a time (group_runs), as sums under
// kLongSum do (which measured faster than one at a time from 256 elements on).
constexpr int kShortLanes = 8;
constexpr int kLongLanes = 32;
constexpr int64_t kLongRun = 256;
constexpr int64_t kLongSum = 1024;

// Unit-stride runs (the common case) get a loop of their own, which the compiler vectorizes
// (a lambda forced inline with PK_INLINE_LAMBDA, see cpu_hot_loop.h).
#define PK_WITH_STRIDE(stride, ...)                                  \
  ((stride) == 1 ? __VA_ARGS__(std::integral_constant<int64_t, 1>{}) \
                 : __VA_ARGS__(stride))

// Below this many elements a reduction runs on one thread (a parallel region costs more).
constexpr int64_t kReduceGrain = 1 << 15;

// K == 1 (global pooling of NCHW, channel pooling of NHWC): the means of runs b0..b1 of n
// elements each, one call per thread's share so that short runs (7x7 planes) pay no call each.
// A tail of n % Lanes elements goes to the last lanes (element r to lane r - (n - Lanes)), where
// an 8-run group (group_means) adds it with one load of the run's last 8 elements: a run gives
// the same bits either way, whichever share of the runs a thread gets.
template <int Lanes, typename scalar_t>
PK_HOT_LOOP void run_means(const scalar_t* in, scalar_t* out, int64_t b0, int64_t b1, int64_t n,
                           int64_t sB, int64_t stride) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const int64_t tail_shift = n >= Lanes ? n - Lanes : 0;
  PK_WITH_STRIDE(stride, [&](auto st) PK_INLINE_LAMBDA {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* p = in + b * sB;
      acc_t lane[Lanes] = {};
      int64_t r = 0;
      for (; r + Lanes <= n; r += Lanes) {
        for (int l = 0; l < Lanes; ++l) lane[l] += static_cast<acc_t>(p[(r + l) * st]);
      }
      for (; r < n; ++r) lane[r - tail_shift] += static_cast<acc_t>(p[r * st]);  // the tail
      for (int width = Lanes / 2; width > 0; width /= 2) {
        for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
      }
      out[b] = static_cast<scalar_t>(lane[0] * inv_n);
    }
  });
}

// torch's serial max rule as a select: a later value wins if greater or NaN, so ties keep the
// earlier one and a NaN, once in, stays. Branch-free, so that it vectorizes.
template <typename acc_t>
PK_INLINE acc_t max_step(acc_t best, acc_t v) {
  return v > best || v != v ? v : best;
}

// The index of the last NaN among p[0], p[st], .. p[(end - 1) * st], or -1: what a run's
// maximum is under the serial rule when it holds one (a float cast keeps NaN, of any type).
template <typename scalar_t, typename St>
PK_INLINE int64_t last_nan(const scalar_t* p, int64_t end, St st) {
  int64_t i = end - 1;
  while (i >= 0 && !std::isnan(static_cast<float>(p[i * st]))) --i;
  return i;
}

// Lanes consecutive elements of a run as an opmath vector (float and double loaded as they are).
template <typename scalar_t, typename St>
PK_INLINE vec_t<max_t<scalar_t>> vload_run(const scalar_t* p, St st) {
  using acc_t = max_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t> &&
                std::is_same_v<St, std::integral_constant<int64_t, 1>>) {
    return vload(p);
  } else {
    acc_t lane[kLanes<acc_t>];
    for (int l = 0; l < kLanes<acc_t>; ++l) lane[l] = static_cast<acc_t>(p[l * st]);
    return vload(lane);
  }
}

// Whether candidate (v, i) beats (best, at) under torch's serial max rule, whichever of the two
// comes first: a NaN beats any number and an earlier NaN; among numbers the greater wins, a tie
// the earlier one (the tails of the runs).
template <typename T, typename I>
PK_INLINE auto beats(T v, I i, T best, I at) {
  const auto v_nan = v != v, best_nan = best != best;
  return (v_nan & ((best_nan == 0) | (i > at))) |
         (((v_nan | best_nan) == 0) & ((v > best) | ((v == best) & (i < at))));
}

// (best, at) = the winner of it and (v, i), lane by lane, where neither holds a NaN: the greater,
// or of equal values the earlier. (A function, not a lambda: a lambda may be left out of line,
// and 32-byte vectors must not cross a call between the two clones.)
template <typename V, typename M>
PK_INLINE void step(V& best, M& at, const V& v, const M& i) {
  const M take = (v > best) | ((v == best) & (i < at));
  best = take ? v : best;
  at = take ? i : at;
}

// The winner of all lanes of (best, at) by step(), in log2(lanes) swap_lanes steps, into lane 0.
template <int D, typename V, typename M>
PK_INLINE void fold_lanes_from(V& best, M& at) {
  step(best, at, swap_lanes<D>(best), swap_lanes<D>(at));
  if constexpr (D > 1) fold_lanes_from<D / 2>(best, at);
}

template <typename V, typename M>
PK_INLINE void fold_lanes(V& best, M& at) {
  fold_lanes_from<sizeof(V) / sizeof(best[0]) / 2>(best, at);
}

// Whether any lane of mask m is set.
template <typename M>
PK_INLINE bool any_lane(const M& mask) {  // by reference: no 32-byte by-value ABI note from gcc
  return fold_all_lanes(mask, [](M& a, const M& b) PK_INLINE_LAMBDA { a |= b; }) != 0;
}

// K == 1 maxima of runs b0..b1 in one pass: Vecs vector registers of running maxima, each lane
// with the index it came from (a strict > keeps a lane's first of equal values), folded at the
// end by step(). NaNs are only noted on the way (off the maxima's dependency chain); a run that
// holds one takes its last NaN, found by a scan from the end. The output is the element found,
// so that a -0.0 / +0.0 tie keeps the first one's sign.
template <int Vecs, typename scalar_t>
PK_HOT_LOOP void run_maxima(const scalar_t* in, scalar_t* out, int64_t* idx, int64_t b0,
                            int64_t b1, int64_t n, int64_t sB, int64_t stride) {
  using acc_t = max_t<scalar_t>;
  using V = vec_t<acc_t>;
  using M = typename VecOf<acc_t>::mask;
  using index_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;  // M's lanes
  constexpr int L = static_cast<int>(kLanes<acc_t>);
  M first{};  // lane l's index within a block of L
  for (int l = 0; l < L; ++l) first[l] = l;
  PK_WITH_STRIDE(stride, [&](auto st) PK_INLINE_LAMBDA {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* p = in + b * sB;
      // Lane l of vector v keeps the block (of Vecs * L elements) its maximum came from, a
      // broadcast per block; the index is rebuilt after the loop. NaNs are noted by a sum,
      // which turns NaN with them (and, harmlessly, with +inf and -inf: the scan then finds none).
      V best[Vecs], sum[2] = {};
      M block[Vecs];
      for (int v = 0; v < Vecs; ++v) {
        best[v] = V{} - std::numeric_limits<acc_t>::infinity();
        block[v] = M{};  // -inf runs keep each lane's first
      }
      int64_t r = 0;
      M current{};
      for (; r + Vecs * L <= n; r += Vecs * L, current += 1) {
        for (int v = 0; v < Vecs; ++v) {
          const V x = vload_run(p + (r + v * L) * st, st);
          const M take = x > best[v];
          best[v] = take ? x : best[v];
          block[v] = take ? current : block[v];
          sum[v % 2] += x;  // two sums: the registers run short with more
        }
      }
      // (-inf, 0) is right when every element is -inf; anything else beats it.
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      int64_t i = 0;
      if (r > 0) {
        sum[0] += sum[1];
        const bool maybe_nan = any_lane(sum[0] != sum[0]);
        i = maybe_nan ? last_nan(p, r, st) : r - 1;  // the last NaN wins
        if (maybe_nan && i >= 0) {
          m = static_cast<acc_t>(p[i * st]);
        } else {
          M at[Vecs];
          for (int v = 0; v < Vecs; ++v) {
            at[v] = block[v] * static_cast<index_t>(Vecs * L) + (first + v * L);
          }
          for (int v = 1; v < Vecs; ++v) step(best[0], at[0], best[v], at[v]);
          fold_lanes(best[0], at[0]);
          m = best[0][0], i = at[0][0];
        }
      }
      for (; r < n; ++r) {  // the tail
        const acc_t x = static_cast<acc_t>(p[r * st]);
        if (beats(x, r, m, i)) m = x, i = r;
      }
      out[b] = p[i * st];
      idx[b] = i;
    }
  });
}

template <typename acc_t, typename scalar_t>
PK_HOT_LOOP void add_row(acc_t* sum, const scalar_t* row, int64_t K, int64_t sK) {
  if (sK == 1) {
    for (int64_t k = 0; k < K; ++k) sum[k] += static_cast<acc_t>(row[k]);
  } else {
    for (int64_t k = 0; k < K; ++k) sum[k] += static_cast<acc_t>(row[k * sK]);
  }
}

// One step of torch's serial max-pool rule for K running maxima: a later element wins if
// greater or NaN, so ties keep the first index and NaNs propagate (the last NaN's index).
// Branch-free (selects), so that it vectorizes.
// Indices are int32 (R < 2^31 is checked), so they share the lanes of float comparisons.
template <typename scalar_t>
PK_HOT_LOOP void max_row(max_t<scalar_t>* best, int32_t* arg, const scalar_t* row, int32_t r,
                         int64_t K, int64_t sK) {
  const auto step = [&](int64_t k, max_t<scalar_t> v) {
    const bool take = v > best[k] || v != v;
    best[k] = take ? v : best[k];
    arg[k] = take ? r : arg[k];
  };
  if (sK == 1) {
    for (int64_t k = 0; k < K; ++k) step(k, static_cast<max_t<scalar_t>>(row[k]));
  } else {
    for (int64_t k = 0; k < K; ++k) step(k, static_cast<max_t<scalar_t>>(row[k * sK]));
  }
}

// float and bfloat16 elements as 8-float vectors (cpu_vec.h converts bfloat16 as c10 does), for
// the reductions below and the NHWC windowed kernels.
template <typename scalar_t>
constexpr bool kVecChannels =
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

template <typename scalar_t>
PK_INLINE vec_t<float> load8(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return vload(p);
  } else {
    return vload_bf16(p);
  }
}

template <typename scalar_t>
PK_INLINE void store8(scalar_t* p, const vec_t<float>& v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    vstore(p, v);
  } else {
    vstore_bf16(p, v);
  }
}

// Float-accumulated reductions in vector registers (float and bfloat16 input, unit stride):
// K == 1 runs of 8 to kLongRun (sums: kLongSum) elements 8 at a time, each run's lanes in a
// register of its own (8 independent chains instead of one), folded by one 8x8 transposing fold
// that leaves run j's result in lane j; K > 1 columns in blocks whose accumulators stay in
// registers over all rows.
using vf8 = vec_t<float>;
using vm8 = VecOf<float>::mask;

// a = the lane-wise larger of a and b; of equal lanes a's (the earlier, where a came first).
PK_INLINE void keep_larger(vf8& a, const vf8& b) { a = b > a ? b : a; }

// The lanes of a and b that a fold at distance D (4, 2, 1) combines, as x (combined with) y:
// for D = 4 a's lanes l and l + 4 go to lane l, b's to lane l + 4; D = 2 and D = 1 likewise
// within each half, so that after the three rounds of fold8 run j sits in lane j.
template <int D, typename V>
PK_INLINE void split_lanes(const V& a, const V& b, V& x, V& y) {
  static_assert(D == 4 || D == 2 || D == 1, "fold distances");
  if constexpr (D == 4) {
    x = PK_SHUFFLE(a, b, vm8, 0, 1, 2, 3, 8, 9, 10, 11);
    y = PK_SHUFFLE(a, b, vm8, 4, 5, 6, 7, 12, 13, 14, 15);
  } else if constexpr (D == 2) {
    x = PK_SHUFFLE(a, b, vm8, 0, 1, 8, 9, 4, 5, 12, 13);
    y = PK_SHUFFLE(a, b, vm8, 2, 3, 10, 11, 6, 7, 14, 15);
  } else {
    x = PK_SHUFFLE(a, b, vm8, 0, 2, 8, 10, 4, 6, 12, 14);
    y = PK_SHUFFLE(a, b, vm8, 1, 3, 9, 11, 5, 7, 13, 15);
  }
}

// Combiners for fold8, applied to (value, index) vectors: (x, xi) becomes x combined with y.
struct AddLanes {
  PK_INLINE void operator()(vf8& x, vm8&, const vf8& y, const vm8&) const { x += y; }
};
struct MaxLanes {  // no NaN in either: the greater, or of equal values the earlier
  PK_INLINE void operator()(vf8& x, vm8& xi, const vf8& y, const vm8& yi) const {
    step(x, xi, y, yi);
  }
};

template <int D, typename Combine>
PK_INLINE void fold_join(vf8& a, vm8& ai, const vf8& b, const vm8& bi, Combine combine) {
  vf8 x, y;
  vm8 xi, yi;
  split_lanes<D>(a, b, x, y);
  split_lanes<D>(ai, bi, xi, yi);
  combine(x, xi, y, yi);
  a = x, ai = xi;
}

// Runs 0..7, each as the 8 lanes of v[j] (with indices at[j]), combined lane pairs at distance
// 4, then 2, then 1 (run_means's order), into v[0] (and at[0]) with run j in lane j.
template <typename Combine>
PK_INLINE void fold8(vf8 v[8], vm8 at[8], Combine combine) {
  for (int j = 0; j < 4; ++j) fold_join<4>(v[j], at[j], v[j + 4], at[j + 4], combine);
  fold_join<2>(v[0], at[0], v[1], at[1], combine);  // runs 0, 1, 4, 5
  fold_join<2>(v[2], at[2], v[3], at[3], combine);  // runs 2, 3, 6, 7
  fold_join<1>(v[0], at[0], v[2], at[2], combine);
}

// Lanes 8 - n % 8 .. 7: where the last 8 elements of a run of n hold its tail.
PK_INLINE vm8 tail_lanes(int64_t n) {
  vm8 lane{};
  for (int l = 0; l < 8; ++l) lane[l] = l;
  return lane >= static_cast<int32_t>(8 - n % 8);
}

// The means of the 8 unit-stride runs p + j * sB (j < 8) of n >= 8 elements, into out[0..8):
// lane by lane as run_means<8> adds them, so the bits are the same.
template <typename scalar_t>
PK_INLINE void group_means(const scalar_t* p, int64_t sB, int64_t n, float inv_n, vm8 tail,
                           scalar_t* out) {
  vf8 acc[8] = {};
  vm8 unused[8] = {};
  int64_t r = 0;
  for (; r + 8 <= n; r += 8) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] += load8(p + j * sB + r);
  }
  if (r < n) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) acc[j] = tail ? acc[j] + load8(p + j * sB + n - 8) : acc[j];
  }
  fold8(acc, unused, AddLanes{});
  store8(out, acc[0] * inv_n);
}

// The maxima (torch's serial rule) of the 8 unit-stride runs p + j * sB (j < 8) of n >= 8
// elements, into out[0..8) and idx[0..8). As run_maxima: per lane the block of the first
// maximum (4 runs at a time, so that the registers suffice), NaNs only noted on the way; a
// group that holds one has its runs with a NaN take their last NaN, found by a scan.
template <typename scalar_t>
PK_INLINE void group_maxima(const scalar_t* p, int64_t sB, int64_t n, vm8 tail, scalar_t* out,
                            int64_t* idx) {
  vm8 lane_ids{};
  for (int l = 0; l < 8; ++l) lane_ids[l] = l;
  vf8 best[8];
  vm8 at[8], nan{};
  for (int half = 0; half < 8; half += 4) {
    const scalar_t* q = p + half * sB;
    vf8 b4[4];
    vm8 block[4];
    for (int j = 0; j < 4; ++j) {
      b4[j] = vf8{} - std::numeric_limits<float>::infinity();
      block[j] = vm8{};  // -inf runs keep each lane's first
    }
    int64_t r = 0;
    vm8 current{};
    for (; r + 8 <= n; r += 8, current += 1) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const vf8 x = load8(q + j * sB + r);
        const vm8 take = x > b4[j];
        b4[j] = take ? x : b4[j];
        block[j] = take ? current : block[j];
        nan |= x != x;
      }
    }
    for (int j = 0; j < 4; ++j) {
      best[half + j] = b4[j];
      at[half + j] = (block[j] << 3) + lane_ids;
    }
    if (r < n) {  // the tail: later than every lane's elements, so a tie keeps the earlier
      const vm8 tail_at = lane_ids + static_cast<int32_t>(n - 8);
      for (int j = 0; j < 4; ++j) {
        const vf8 x = load8(q + j * sB + n - 8);
        const vm8 take = tail & (x > best[half + j]);
        best[half + j] = take ? x : best[half + j];
        at[half + j] = take ? tail_at : at[half + j];
        nan |= tail & (x != x);
      }
    }
  }
  fold8(best, at, MaxLanes{});
  store8(out, best[0]);
  for (int j = 0; j < 8; ++j) idx[j] = at[0][j];
  if (any_lane(nan)) {
    for (int j = 0; j < 8; ++j) {
      const scalar_t* run = p + j * sB;
      const int64_t i = last_nan(run, n, 1);
      if (i >= 0) out[j] = run[i], idx[j] = i;
    }
  }
}

// K == 1, unit stride, n >= kLongRun: per step of 32 elements, their lane-wise maximum (3 plain
// selects) against the running maxima, whose lanes keep the step of their first maximum (the
// index costs 2 ops a step, not 2 a vector as in run_maxima). A last, overlapping step covers
// the tail: its lanes may meet elements seen before, which is harmless, as only a strictly
// greater value moves a lane and the index is the least among the lanes that hold the maximum.
// NaNs are noted by sums; a run that holds one takes its last NaN, found by a scan.
template <typename scalar_t>
PK_HOT_LOOP void long_run_maxima(const scalar_t* in, scalar_t* out, int64_t* idx, int64_t b0,
                                 int64_t b1, int64_t n, int64_t sB) {
  const int64_t steps = (n + 31) / 32;
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* p = in + b * sB;
    vf8 best = vf8{} - std::numeric_limits<float>::infinity(), sum[2] = {};
    vm8 step_of{}, current{};  // -inf runs keep each lane's first
    for (int64_t s = 0; s < steps; ++s, current += 1) {
      const scalar_t* q = p + std::min(s * 32, n - 32);
      vf8 m = load8(q), x1 = load8(q + 8), x2 = load8(q + 16), x3 = load8(q + 24);
      sum[0] += m + x1, sum[1] += x2 + x3;
      keep_larger(m, x1), keep_larger(x2, x3), keep_larger(m, x2);
      const vm8 take = m > best;
      best = take ? m : best;
      step_of = take ? current : step_of;
    }
    sum[0] += sum[1];
    int64_t i = -1;
    if (any_lane(sum[0] != sum[0])) {  // the last NaN wins (none, if the sum met inf - inf)
      i = last_nan(p, n, 1);
    }
    if (i < 0) {  // the first element of the maximum, among the lanes that hold it
      vf8 all = best;
      const float m = fold_all_lanes(all, keep_larger);
      i = n;
      for (int l = 0; l < 8; ++l) {
        if (!(best[l] == m)) continue;
        const scalar_t* q = p + std::min<int64_t>(step_of[l] * int64_t{32}, n - 32) + l;
        int v = 0;
        while (static_cast<float>(q[v * 8]) != m) ++v;
        i = std::min(i, q + v * 8 - p);
      }
    }
    out[b] = p[i];
    idx[b] = i;
  }
}

// K == 1, unit stride, 8 <= n < kLongRun (sums: kLongSum): runs b0.. in groups of 8; returns the
// first run left (fewer than 8) for run_means / run_maxima.
template <typename scalar_t>
PK_HOT_LOOP int64_t group_runs(const scalar_t* in, scalar_t* out, int64_t* idx, int64_t b0,
                               int64_t b1, int64_t n, int64_t sB, bool is_max) {
  const vm8 tail = tail_lanes(n);
  const float inv_n = 1.0f / static_cast<float>(n);
  int64_t b = b0;
  for (; b + 8 <= b1; b += 8) {
    if (is_max) {
      group_maxima(in + b * sB, sB, n, tail, out + b, idx + b);
    } else {
      group_means(in + b * sB, sB, n, inv_n, tail, out + b);
    }
  }
  return b;
}

// Values only (a forward whose indices nobody keeps, e.g. under no_grad): K == 1 maxima without
// the index bookkeeping, which is most of the index path's work. The element stored is the one
// the index path picks: a run with a NaN gives its last NaN, and a maximum of zero the first
// zero (the only equal values whose bits differ, -0.0 and +0.0), each found by a scan in that
// rare case. A plain maximum meets no other ties, so the lanes may see elements twice. NaNs are
// noted by sums, which also turn NaN on inf - inf: the scan then finds none, harmlessly.

// out[0] holds run p's maximum as the vectors found it; settles the two rare cases above.
template <typename scalar_t>
PK_INLINE void settle_max_value(const scalar_t* p, int64_t n, bool maybe_nan, scalar_t* out) {
  if (maybe_nan) {
    const int64_t i = last_nan(p, n, 1);
    if (i >= 0) {
      *out = p[i];
      return;
    }
  }
  if (static_cast<float>(*out) == 0.0f) {
    int64_t i = 0;
    while (static_cast<float>(p[i]) != 0.0f) ++i;
    *out = p[i];
  }
}

struct LargerLanes {
  PK_INLINE void operator()(vf8& x, vm8&, const vf8& y, const vm8&) const { keep_larger(x, y); }
};

// Runs b0..b1 of n >= 32 unit-stride elements, one at a time: 4 vectors of running maxima over
// steps of 32 elements, the last step overlapping the one before to cover the tail.
template <typename scalar_t>
PK_HOT_LOOP void long_run_max_values(const scalar_t* in, scalar_t* out, int64_t b0, int64_t b1,
                                     int64_t n, int64_t sB) {
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* p = in + b * sB;
    vf8 best[4], sum[2] = {};
    for (int v = 0; v < 4; ++v) best[v] = vf8{} - std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < n; r += 32) {
      const scalar_t* q = p + std::min(r, n - 32);
      const vf8 x0 = load8(q), x1 = load8(q + 8), x2 = load8(q + 16), x3 = load8(q + 24);
      keep_larger(best[0], x0), keep_larger(best[1], x1);
      keep_larger(best[2], x2), keep_larger(best[3], x3);
      sum[0] += x0 + x1, sum[1] += x2 + x3;  // NaN notes: an add a vector, not a compare and an or
    }
    keep_larger(best[0], best[1]), keep_larger(best[2], best[3]), keep_larger(best[0], best[2]);
    out[b] = static_cast<scalar_t>(fold_all_lanes(best[0], keep_larger));
    sum[0] += sum[1];
    settle_max_value(p, n, any_lane(sum[0] != sum[0]), out + b);
  }
}

// Runs b0.. of 8 <= n unit-stride elements in groups of 8, run j's maxima in a register of its
// own, folded by fold8; returns the first run left (fewer than 8).
template <typename scalar_t>
PK_HOT_LOOP int64_t group_max_values(const scalar_t* in, scalar_t* out, int64_t b0, int64_t b1,
                                     int64_t n, int64_t sB) {
  int64_t b = b0;
  for (; b + 8 <= b1; b += 8) {
    const scalar_t* p = in + b * sB;
    vf8 best[8], sum[2] = {};
    vm8 unused[8] = {};
    for (int j = 0; j < 8; ++j) best[j] = vf8{} - std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < n; r += 8) {
      const int64_t at = std::min(r, n - 8);  // the last step overlaps, covering the tail
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const vf8 x = load8(p + j * sB + at);
        keep_larger(best[j], x);
        sum[j % 2] += x;
      }
    }
    fold8(best, unused, LargerLanes{});
    store8(out + b, best[0]);
    sum[0] += sum[1];
    const bool maybe_nan = any_lane(sum[0] != sum[0]);
    for (int j = 0; j < 8; ++j) settle_max_value(p + j * sB, n, maybe_nan, out + b + j);
  }
  return b;
}

// K > 1, unit-stride columns, in registers Vecs vectors of columns at a time, over one chunk of
// rows: column blocks inner, their running sums / maxima waiting in L1 between chunks.

// Rows r0..r1 added to the sums acc[0 .. 8 Vecs), in add_row's order (one serial sum a column).
template <int Vecs, typename scalar_t>
PK_INLINE void column_sums(const scalar_t* base, int64_t r0, int64_t r1, int64_t sR, float* acc) {
  vf8 sum[Vecs];
  for (int v = 0; v < Vecs; ++v) sum[v] = vload(acc + v * 8);
  for (int64_t r = r0; r < r1; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < Vecs; ++v) sum[v] += load8(base + r * sR + v * 8);
  }
  for (int v = 0; v < Vecs; ++v) vstore(acc + v * 8, sum[v]);
}

// The maxima of the columns (max_row's rule) in registers over all R rows, NaN test included:
// the slow path, for blocks that hold a NaN, and for R < 4.
template <int Vecs, typename scalar_t>
PK_INLINE void column_maxima_exact(const scalar_t* base, int64_t R, int64_t sR, scalar_t* out,
                                   int64_t* idx) {
  vf8 best[Vecs];
  vm8 at[Vecs];
  for (int v = 0; v < Vecs; ++v) {
    best[v] = vf8{} - std::numeric_limits<float>::infinity();
    at[v] = vm8{};
  }
  vm8 row{};
  for (int64_t r = 0; r < R; ++r, row += 1) {
#pragma GCC unroll 4
    for (int v = 0; v < Vecs; ++v) {
      const vf8 x = load8(base + r * sR + v * 8);
      const vm8 take = (x > best[v]) | (x != x);
      best[v] = take ? x : best[v];
      at[v] = take ? row : at[v];
    }
  }
  for (int v = 0; v < Vecs; ++v) {
    store8(out + v * 8, best[v]);
    for (int l = 0; l < 8; ++l) idx[v * 8 + l] = at[v][l];
  }
}

// Steps s0..s1 of 4 rows each (step s: rows 4s.., the last one R - 4.. so that it overlaps the
// one before instead of running past R) against the running maxima best[] and the steps of
// their first maxima step_of[]: per step the rows' lane-wise maximum (3 plain selects), one
// compare and two selects; the row within the step is found after. A row met twice cannot move
// a lane (only a strictly greater value does). NaNs are only noted, in sum.
template <int Vecs, typename scalar_t>
PK_INLINE void column_max_steps(const scalar_t* base, int64_t s0, int64_t s1, int64_t R,
                                int64_t sR, float* best_at, int32_t* step_at, vf8& sum_all) {
  vf8 best[Vecs], sum[2] = {};
  vm8 step_of[Vecs];
  for (int v = 0; v < Vecs; ++v) {
    best[v] = vload(best_at + v * 8);
    __builtin_memcpy(&step_of[v], step_at + v * 8, sizeof(vm8));
  }
  vm8 current = vm8{} + static_cast<int32_t>(s0);
  for (int64_t s = s0; s < s1; ++s, current += 1) {
    const scalar_t* q = base + std::min(s * 4, R - 4) * sR;
#pragma GCC unroll 4
    for (int v = 0; v < Vecs; ++v) {
      vf8 m = load8(q + v * 8), x1 = load8(q + sR + v * 8);
      vf8 x2 = load8(q + 2 * sR + v * 8), x3 = load8(q + 3 * sR + v * 8);
      sum[v % 2] += (m + x1) + (x2 + x3);
      keep_larger(m, x1), keep_larger(x2, x3), keep_larger(m, x2);  // ties: the earlier
      const vm8 take = m > best[v];
      best[v] = take ? m : best[v];
      step_of[v] = take ? current : step_of[v];
    }
  }
  for (int v = 0; v < Vecs; ++v) {
    vstore(best_at + v * 8, best[v]);
    __builtin_memcpy(step_at + v * 8, &step_of[v], sizeof(vm8));
  }
  sum_all += sum[0] + sum[1];
}

// f(std::integral_constant<int, n>{}) for 1 <= n <= Max: a block's last n < Max vectors of
// columns in one pass over the rows, not n passes of one vector.
template <int Max, typename F>
PK_INLINE void with_vecs(int64_t n, const F& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_vecs<Max - 1>(n, f);
  }
  f(std::integral_constant<int, Max>{});
}

// Columns 0..cols of one (R, cols) block with unit-stride columns, the vector columns (all but
// the last cols % 8, which add_row / max_row take; returns how many were done): sums in blocks
// of 64 columns, maxima of 32, then of 8; acc and arg: scratch of cols floats and int32.
template <typename scalar_t>
PK_HOT_LOOP int64_t column_blocks(const scalar_t* base, int64_t cols, int64_t R, int64_t sR,
                                  scalar_t* out, int64_t* idx, bool is_max, float* acc,
                                  int32_t* arg) {
  const int64_t vcols = cols / 8 * 8;
  // One block spanning the row reads the rows in order as they are; wider rows go 4 at a time
  // (4 streams in order), the blocks' state waiting in L1 (strided column passes cost more).
  // Maxima of rows wider than 64 columns: max_row, row by row, measured faster.
  const int64_t chunk_steps = vcols <= 64 ? (R + 3) / 4 : 1;
  if (vcols == 0 || (is_max && vcols > 64)) return 0;
  if (!is_max) {
    std::fill(acc, acc + vcols, 0.0f);
    for (int64_t r0 = 0; r0 < R; r0 += 4 * chunk_steps) {
      const int64_t r1 = std::min(R, r0 + 4 * chunk_steps);
      int64_t k = 0;
      for (; k + 64 <= vcols; k += 64) column_sums<8>(base + k, r0, r1, sR, acc + k);
      if (k < vcols) {
        with_vecs<7>((vcols - k) / 8, [&](auto v) PK_INLINE_LAMBDA {
          column_sums<decltype(v)::value>(base + k, r0, r1, sR, acc + k);
        });
      }
    }
    const float inv_r = 1.0f / static_cast<float>(R);
    for (int64_t k = 0; k < vcols; k += 8) store8(out + k, vload(acc + k) * inv_r);
    return vcols;
  }
  vf8 sum{};
  if (R >= 4) {
    std::fill(acc, acc + vcols, -std::numeric_limits<float>::infinity());
    std::fill(arg, arg + vcols, 0);
    const int64_t steps = (R + 3) / 4;
    for (int64_t s0 = 0; s0 < steps; s0 += chunk_steps) {
      const int64_t s1 = std::min(steps, s0 + chunk_steps);
      int64_t k = 0;
      for (; k + 32 <= vcols; k += 32) {
        column_max_steps<4>(base + k, s0, s1, R, sR, acc + k, arg + k, sum);
      }
      if (k < vcols) {
        with_vecs<3>((vcols - k) / 8, [&](auto v) PK_INLINE_LAMBDA {
          column_max_steps<decltype(v)::value>(base + k, s0, s1, R, sR, acc + k, arg + k, sum);
        });
      }
    }
  }
  if (R < 4 || any_lane(sum != sum)) {  // a NaN (or inf - inf): the rule row by row
    int64_t k = 0;
    for (; k + 32 <= vcols; k += 32) column_maxima_exact<4>(base + k, R, sR, out + k, idx + k);
    if (k < vcols) {
      with_vecs<3>((vcols - k) / 8, [&](auto v) PK_INLINE_LAMBDA {
        column_maxima_exact<decltype(v)::value>(base + k, R, sR, out + k, idx + k);
      });
    }
    return vcols;
  }
  for (int64_t k = 0; k < vcols; ++k) {  // the first row of each maximum, within its step
    int64_t r = std::min<int64_t>(int64_t{arg[k]} * 4, R - 4);
    while (static_cast<float>(base[r * sR + k]) != acc[k]) ++r;
    out[k] = static_cast<scalar_t>(acc[k]);
    idx[k] = r;
  }
  return vcols;
}

// values_only: the caller drops the indices, so the K == 1 maxima may skip them (indices is
// still a (B, K) buffer, which the other paths fill).
template <typename scalar_t>
void reduce_fwd(const at::Tensor& x, at::Tensor& out, at::Tensor& indices, bool is_max,
                bool values_only) {
  const int64_t B = x.size(0), R = x.size(1), K = x.size(2);
  const int64_t sB = x.stride(0), sR = x.stride(1), sK = x.stride(2);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  int64_t* idx = is_max ? indices.data_ptr<int64_t>() : nullptr;
  // K == 1: each thread an even share of the runs; short unit-stride ones 8 at a time.
  if (K == 1) {
    const int64_t grain = std::max<int64_t>(1, kReduceGrain / R);
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      if constexpr (kVecChannels<scalar_t>) {
        if (is_max && values_only && sR == 1 && R >= 8) {
          if (R >= kLongRun) return long_run_max_values(in, o, b0, b1, R, sB);
          b0 = group_max_values(in, o, b0, b1, R, sB);
        }
        if (sR == 1 && R >= 8 && R < (is_max ? kLongRun : kLongSum)) {
          b0 = group_runs(in, o, idx, b0, b1, R, sB, is_max);
        }
        if (sR == 1 && R >= kLongRun && is_max) return long_run_maxima(in, o, idx, b0, b1, R, sB);
      }
      if (is_max) {
        (R >= kLongRun ? run_maxima<4, scalar_t> : run_maxima<2, scalar_t>)(in, o, idx, b0, b1,
                                                                           R, sB, sR);
      } else {
        (R >= kLongSum ? run_means<kLongLanes, scalar_t> : run_means<kShortLanes, scalar_t>)(
            in, o, b0, b1, R, sB, sR);
      }
    });
    return;
  }
  // K > 1: columns reduced side by side, r outer, one accumulator per column, so that when K
  // is the unit-stride dim (NHWC global, NCHW channel pooling) every r step reads one
  // contiguous row. Columns go in blocks of kColumnBlock; within one, unit-stride float and
  // bfloat16 columns keep their accumulators in registers (column_blocks), the rest (other
  // types, strides, the last columns) in memory, in L1.
  constexpr int64_t kColumnBlock = 2048;
  const int64_t blocks = (K + kColumnBlock - 1) / kColumnBlock;
  const int64_t grain = std::max<int64_t>(1, kReduceGrain / (R * std::min(K, kColumnBlock)));
  at::parallel_for(0, B * blocks, grain, [&](int64_t g0, int64_t g1) {
    const int64_t width = std::min(K, kColumnBlock);
    std::vector<max_t<scalar_t>> acc(width);
    std::vector<int32_t> arg(is_max ? width : 0);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / blocks, k0 = g % blocks * kColumnBlock;
      int64_t cols = std::min(kColumnBlock, K - k0);
      const scalar_t* base = in + b * sB + k0 * sK;
      scalar_t* o_row = o + b * K + k0;
      int64_t* idx_row = is_max ? idx + b * K + k0 : nullptr;
      if constexpr (kVecChannels<scalar_t>) {
        if (sK == 1) {
          const int64_t done =
              column_blocks(base, cols, R, sR, o_row, idx_row, is_max, acc.data(), arg.data());
          base += done, o_row += done, idx_row = is_max ? idx_row + done : nullptr;
          cols -= done;
        }
      }
      if (cols == 0) continue;
      if (is_max) {
        std::fill(acc.begin(), acc.end(), -std::numeric_limits<max_t<scalar_t>>::infinity());
        std::fill(arg.begin(), arg.end(), 0);
        for (int64_t r = 0; r < R; ++r) {
          max_row(acc.data(), arg.data(), base + r * sR, static_cast<int32_t>(r), cols, sK);
        }
        for (int64_t k = 0; k < cols; ++k) {
          o_row[k] = static_cast<scalar_t>(acc[k]);
          idx_row[k] = arg[k];
        }
      } else {
        std::fill(acc.begin(), acc.end(), max_t<scalar_t>(0));
        for (int64_t r = 0; r < R; ++r) add_row(acc.data(), base + r * sR, cols, sK);
        const max_t<scalar_t> inv_r = max_t<scalar_t>(1) / static_cast<max_t<scalar_t>>(R);
        for (int64_t k = 0; k < cols; ++k) o_row[k] = static_cast<scalar_t>(acc[k] * inv_r);
      }
    }
  });
}

template <typename scalar_t>
void reduce_bwd(const at::Tensor& dy, const at::Tensor& indices, at::Tensor& dx, bool is_max) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = dx.size(0), R = dx.size(1), K = dx.size(2);
  const int64_t sB = dy.stride(0), sK = dy.stride(1);
  const scalar_t* g = dy.const_data_ptr<scalar_t>();
  const int64_t* idx = is_max ? indices.const_data_ptr<int64_t>() : nullptr;
  scalar_t* d = dx.data_ptr<scalar_t>();
  const acc_t inv_r = acc_t(1) / static_cast<acc_t>(R);
#pragma omp parallel for schedule(static) if (B * R * K > (1 << 15))
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = 0; r < R; ++r) {
      scalar_t* row = d + (b * R + r) * K;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t grad = static_cast<acc_t>(g[b * sB + k * sK]);
        row[k] = is_max ? static_cast<scalar_t>(idx[b * K + k] == r ? grad : acc_t(0))
                        : static_cast<scalar_t>(grad * inv_r);
      }
    }
  }
}

// Windowed pooling.
//
// Forward, NCHW: a strided window is walked tap by tap over a whole output row, so the inner
// loop runs along ow and vectorizes (stride-s loads); an adaptive window per output. NHWC: one
// output pixel at a time, every tap updating C accumulators from one contiguous channel row.
// Taps are visited h outer, w inner for every output, as torch's serial rule needs.
// Backward scatters each output's gradient into its window; a thread owns whole planes (NCHW)
// or whole images x a block of channels (NHWC), so the sums run in a fixed order.

template <typename scalar_t>
using sum_t = std::conditional_t<std::is_integral_v<scalar_t>, int64_t, at::opmath_type<scalar_t>>;

template <typename acc_t>
constexpr acc_t lowest() {
  return std::numeric_limits<acc_t>::has_infinity ? -std::numeric_limits<acc_t>::infinity()
                                                  : std::numeric_limits<acc_t>::lowest();
}

struct Window2d {
  Taps h, w;
};

inline Window2d window_of(const std::array<PoolAxis, 2>& ax, int64_t oh, int64_t ow) {
  return {taps_of(ax[0], oh), taps_of(ax[1], ow)};
}

// The outputs ow of a strided axis whose tap j falls inside the input: [lo, hi).
inline OutRange outputs_with_tap(const PoolAxis& a, int64_t j) {
  const int64_t shift = j * a.dilation - a.pad;  // input position = ow * stride + shift
  const int64_t lo = shift >= 0 ? 0 : (-shift + a.stride - 1) / a.stride;
  const int64_t hi = a.in - shift <= 0 ? 0 : (a.in - shift - 1) / a.stride + 1;
  return {lo, std::min(hi, a.out)};
}

struct Sizes {
  int64_t N, C, H, W;
  explicit Sizes(const at::Tensor& t) : N(t.size(0)), C(t.size(1)), H(t.size(2)), W(t.size(3)) {}
};

constexpr int64_t kPoolGrain = 1 << 14;  // below this many elements one thread is faster
constexpr int64_t kChannelBlock = 64;    // NHWC backward: channels one thread owns at a time

// What a forward pass computes: a sum (avg), a max, or a max with its index. Without indices
// the max loops carry one accumulator, which vectorizes cleanly; indices are tracked as int32
// (H * W < 2^31 is checked) so that they share the lanes of float comparisons.
enum class Reduce { kSum, kMax, kArgMax };

template <typename acc_t, Reduce kReduce>
constexpr acc_t start_value() {
  return kReduce == Reduce::kSum ? acc_t(0) : lowest<acc_t>();
}

// Folds v (at flat index `here`) into one accumulator: torch's serial max rule (a later value
// wins if greater or NaN: ties keep the first, the last NaN wins), or a sum. Branch-free.
template <Reduce kReduce, typename acc_t>
inline void fold(acc_t& acc, int32_t& arg, acc_t v, int32_t here) {
  if constexpr (kReduce == Reduce::kSum) {
    acc += v;
  } else {
    const bool take = v > acc || v != v;
    acc = take ? v : acc;
    if constexpr (kReduce == Reduce::kArgMax) arg = take ? here : arg;
  }
}

// avg_pool2d's divisors of one call, per axis once (every rule is a product of an H and a W
// factor, or divisor_override): get(oh, ow) is the divisor, 0 for a window with no tap.
struct AvgDivisors {
  std::vector<int64_t> h, w;  // per-axis factor; 0 where the axis has no tap
  int64_t override_value = 0;
  AvgDivisors(const std::array<PoolAxis, 2>& ax, bool count_include_pad, int64_t divisor_override)
      : h(ax[0].out), w(ax[1].out), override_value(ax[0].adaptive ? 0 : divisor_override) {
    for (int d = 0; d < 2; ++d) {
      std::vector<int64_t>& factor = d == 0 ? h : w;
      for (int64_t o = 0; o < ax[d].out; ++o) {
        const Taps t = taps_of(ax[d], o);  // avg windows have dilation 1
        const int64_t taps = std::max<int64_t>(t.end - t.first, 0);
        const bool padded = count_include_pad && !ax[d].adaptive;
        factor[o] = taps == 0 ? 0 : padded ? padded_window(ax[d], o) : taps;
      }
    }
  }
  int64_t get(int64_t oh, int64_t ow) const {
    if (h[oh] == 0 || w[ow] == 0) return 0;
    return override_value != 0 ? override_value : h[oh] * w[ow];
  }
};

// Writes n results: maxima (and their indices) as they are, sums scaled by 1 / divisor (one
// rounding more than a division: under 1 ulp), integer sums divided (truncating, as torch).
template <typename scalar_t, Reduce kReduce>
inline void store(scalar_t* out, int64_t* idx, const sum_t<scalar_t>* acc, const int32_t* arg,
                  int64_t n, sum_t<scalar_t> divisor) {
  using acc_t = sum_t<scalar_t>;
  if constexpr (kReduce == Reduce::kSum && std::is_integral_v<acc_t>) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(acc[i] / divisor);
  } else if constexpr (kReduce == Reduce::kSum) {
    const acc_t scale = acc_t(1) / divisor;
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(acc[i] * scale);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(acc[i]);
    if constexpr (kReduce == Reduce::kArgMax) {
      for (int64_t i = 0; i < n; ++i) idx[i] = arg[i];
    }
  }
}

// What a forward pass reads, per call: everything that depends only on oh, ow or the tap j
// (integer divisions included), shared by every plane and image instead of redone per row.
template <typename acc_t>
struct FwdPlan {
  std::array<PoolAxis, 2> ax;
  std::vector<Taps> h_taps, w_taps;  // per oh, per ow
  std::vector<OutRange> tap_outputs;  // strided W axis, per tap j: the outputs it falls inside
  std::vector<acc_t> divisor;         // kSum: per (oh, ow); 1 for a window with no tap
  bool w_runs_of_8 = false;  // the W windows: whole runs of a multiple of 8, one after another
  bool w_windows_overlap = false;  // some input column is in more than one W window
  FwdPlan(const std::array<PoolAxis, 2>& axes, const AvgDivisors* divisors)
      : ax(axes), h_taps(ax[0].out), w_taps(ax[1].out) {
    for (int64_t oh = 0; oh < ax[0].out; ++oh) h_taps[oh] = taps_of(ax[0], oh);
    for (int64_t ow = 0; ow < ax[1].out; ++ow) {
      w_taps[ow] = taps_of(ax[1], ow);
      w_windows_overlap |= ow > 0 && w_taps[ow].first < w_taps[ow - 1].end;
    }
    if (!ax[1].adaptive) {
      for (int64_t j = 0; j < ax[1].kernel; ++j) tap_outputs.push_back(outputs_with_tap(ax[1], j));
      const PoolAxis& a = ax[1];
      w_runs_of_8 = a.kernel == a.stride && a.kernel % 8 == 0 && a.pad == 0 && a.dilation == 1 &&
                    a.out * a.kernel <= a.in;
    }
    if (divisors) {
      divisor.resize(ax[0].out * ax[1].out);
      for (int64_t oh = 0; oh < ax[0].out; ++oh) {
        for (int64_t ow = 0; ow < ax[1].out; ++ow) {
          const int64_t d = divisors->get(oh, ow);
          divisor[oh * ax[1].out + ow] = static_cast<acc_t>(d == 0 ? 1 : d);
        }
      }
    }
  }
};

// 16 float or bfloat16 channels as two float vectors (bfloat16's in vload2_bf16's lane order).
template <typename scalar_t>
PK_INLINE void load16(const scalar_t* p, vec_t<float>& a, vec_t<float>& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a = vload(p);
    b = vload(p + 8);
  } else {
    vload2_bf16(p, a, b);
  }
}

template <typename scalar_t>
PK_INLINE void store16(scalar_t* p, const vec_t<float>& a, const vec_t<float>& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    vstore(p, a);
    vstore(p + 8, b);
  } else {
    vstore2_bf16(p, a, b);
  }
}

// Output rows oh0..oh1 of one NCHW plane. A strided window goes tap by tap, each tap a strided
// pass along the row (vectorized), so every output still sees its taps in order; an adaptive
// window goes output by output.
template <typename scalar_t, Reduce kReduce>
PK_HOT_LOOP void pool_rows_nchw(const scalar_t* plane, scalar_t* out, int64_t* idx,
                                const FwdPlan<sum_t<scalar_t>>& plan, int64_t oh0, int64_t oh1,
                                sum_t<scalar_t>* acc, int32_t* arg) {
  using acc_t = sum_t<scalar_t>;
  const PoolAxis& aw = plan.ax[1];
  const int64_t W = aw.in, OW = aw.out;
  const Taps* w_taps = plan.w_taps.data();
  if constexpr (kReduce == Reduce::kSum && kVecChannels<scalar_t>) {
    // Windows of whole runs of 8k along W (112 -> 7): each output's taps summed in one vector,
    // run by run, then across its lanes (a sum's order, not a max's, may change).
    if (plan.w_runs_of_8) {
      using V = vec_t<float>;
      const int64_t k = aw.kernel;
      const auto add = [](V& a, const V& b) PK_INLINE_LAMBDA { a += b; };
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const Taps th = plan.h_taps[oh];
        for (int64_t ow = 0; ow < OW; ++ow) {
          V sum{};
          for (int64_t h = th.first; h < th.end; h += th.step) {
            const scalar_t* run = plane + h * W + ow * k;
            for (int64_t j = 0; j < k; j += 8) sum += load8(run + j);
          }
          const float total = fold_all_lanes(sum, add);
          out[oh * OW + ow] = static_cast<scalar_t>(total / plan.divisor[oh * OW + ow]);
        }
      }
      return;
    }
  }
  PK_WITH_STRIDE(aw.stride, [&](auto s) PK_INLINE_LAMBDA {
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const Taps th = plan.h_taps[oh];
      for (int64_t ow = 0; ow < OW; ++ow) {
        acc[ow] = start_value<acc_t, kReduce>();
        if constexpr (kReduce == Reduce::kArgMax) {
          arg[ow] = static_cast<int32_t>(th.first * W + w_taps[ow].first);
        }
      }
      if (aw.adaptive) {
        for (int64_t ow = 0; ow < OW; ++ow) {
          const Taps tw = w_taps[ow];
          for (int64_t h = th.first; h < th.end; ++h) {
            for (int64_t w = tw.first; w < tw.end; ++w) {
              fold<kReduce>(acc[ow], arg[ow], static_cast<acc_t>(plane[h * W + w]),
                            static_cast<int32_t>(h * W + w));
            }
          }
        }
      } else {
        for (int64_t h = th.first; h < th.end; h += th.step) {
          for (int64_t j = 0; j < aw.kernel; ++j) {
            const OutRange r = plan.tap_outputs[j];
            const int64_t shift = j * aw.dilation - aw.pad;
            const scalar_t* row = plane + h * W + shift;
            const int32_t here = static_cast<int32_t>(h * W + shift);
            for (int64_t ow = r.lo; ow < r.hi; ++ow) {
              fold<kReduce>(acc[ow], arg[ow], static_cast<acc_t>(row[ow * s]),
                            here + static_cast<int32_t>(ow * s));
            }
          }
        }
      }
      scalar_t* o = out + oh * OW;
      if constexpr (kReduce == Reduce::kSum) {  // each output its own divisor
        const acc_t* d = plan.divisor.data() + oh * OW;
        for (int64_t ow = 0; ow < OW; ++ow) o[ow] = static_cast<scalar_t>(acc[ow] / d[ow]);
      } else {
        store<scalar_t, kReduce>(o, idx ? idx + oh * OW : nullptr, acc, arg, OW, acc_t(1));
      }
    }
  });
}

// The channels c0..c0 + n of one output pixel over an NHWC image, n <= kBlock (n == kBlock
// when kFull): accumulators in a fixed-size local array, which stays in registers through all
// the taps of the window, instead of C of them in memory updated tap by tap.
constexpr int64_t kNhwcBlock = 32;

template <bool kFull, typename scalar_t, Reduce kReduce>
PK_INLINE void pool_pixel_block(const scalar_t* image, scalar_t* out, int64_t* idx,
                                const Window2d& win, int64_t h0, int64_t W, int64_t C,
                                int64_t n, sum_t<scalar_t> divisor) {
  using acc_t = sum_t<scalar_t>;
  const int64_t count = kFull ? kNhwcBlock : n;
  acc_t acc[kNhwcBlock];
  int32_t arg[kNhwcBlock];
  const int32_t first = static_cast<int32_t>(win.h.first * W + win.w.first);
  for (int64_t c = 0; c < count; ++c) {
    acc[c] = start_value<acc_t, kReduce>();
    arg[c] = first;
  }
  for (int64_t h = win.h.first; h < win.h.end; h += win.h.step) {
    for (int64_t w = win.w.first; w < win.w.end; w += win.w.step) {
      const scalar_t* row = image + ((h - h0) * W + w) * C;
      const int32_t here = static_cast<int32_t>(h * W + w);
      for (int64_t c = 0; c < count; ++c) {
        fold<kReduce>(acc[c], arg[c], static_cast<acc_t>(row[c]), here);
      }
    }
  }
  store<scalar_t, kReduce>(out, idx, acc, arg, count, divisor);
}

// pool_pixel_block for kNhwcBlock float or bfloat16 channels, in explicit vectors (the
// compiler leaves the generic block's bfloat16 conversions scalar).
template <typename scalar_t, Reduce kReduce>
PK_INLINE void pool_pixel_vec(const scalar_t* image, scalar_t* out, int64_t* idx,
                              const Window2d& win, int64_t h0, int64_t W, int64_t C,
                              float divisor) {
  using V = vec_t<float>;
  using M = VecOf<float>::mask;
  constexpr int kVecs = kNhwcBlock / 8;
  V acc[kVecs];
  M arg[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    acc[v] = V{} + start_value<float, kReduce>();
    arg[v] = M{} + static_cast<int32_t>(win.h.first * W + win.w.first);
  }
  for (int64_t h = win.h.first; h < win.h.end; h += win.h.step) {
    for (int64_t w = win.w.first; w < win.w.end; w += win.w.step) {
      const scalar_t* row = image + ((h - h0) * W + w) * C;
      const int32_t here = static_cast<int32_t>(h * W + w);
      if constexpr (kReduce == Reduce::kSum) {  // lanes in load16's order, store16 undoes it
        for (int v = 0; v < kVecs; v += 2) {
          V x, y;
          load16(row + 8 * v, x, y);
          acc[v] += x;
          acc[v + 1] += y;
        }
        continue;
      }
      for (int v = 0; v < kVecs; ++v) {
        const V x = load8(row + 8 * v);
        // torch's serial rule: a later value wins if greater or NaN
        const M take = (x > acc[v]) | (x != x);
        acc[v] = take ? x : acc[v];
        if constexpr (kReduce == Reduce::kArgMax) arg[v] = take ? M{} + here : arg[v];
      }
    }
  }
  if constexpr (kReduce == Reduce::kSum) {
    const float scale = 1.0f / divisor;  // as store(): one rounding more than a division
    for (int v = 0; v < kVecs; v += 2) store16(out + 8 * v, acc[v] * scale, acc[v + 1] * scale);
    return;
  }
  for (int v = 0; v < kVecs; ++v) {
    store8(out + 8 * v, acc[v]);
    if constexpr (kReduce == Reduce::kArgMax) {
      for (int l = 0; l < 8; ++l) idx[8 * v + l] = arg[v][l];
    }
  }
}

// NHWC bfloat16 sums whose windows overlap along W (3x3 stride 1), separably: per output row,
// the window's input rows summed column by column into a float row, then each output's columns
// summed from that row. Each input element is converted once per output row instead of once
// per tap of every window that holds it, and the row's float loads replace the rest. (float
// input measured faster tap by tap. A sum's order may change, a max's may not.)
constexpr int64_t kSumGroup = 16;            // channels a step: two float vectors
constexpr int64_t kColumnFloats = 64 << 10;  // the largest float row: 256 KiB, within L2

template <typename scalar_t>
PK_INLINE void sum_rows_nhwc(const scalar_t* image, scalar_t* out, const FwdPlan<float>& plan,
                             int64_t oh0, int64_t oh1, int64_t C, int64_t h0, int64_t channels,
                             float* cols) {
  using V = vec_t<float>;
  const int64_t W = plan.ax[1].in, OW = plan.ax[1].out;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const Taps th = plan.h_taps[oh];
    for (int64_t w = 0; w < W; ++w) {
      const scalar_t* column = image + w * C;
      float* col = cols + w * channels;
      for (int64_t g = 0; g < channels; g += kSumGroup) {
        V a{}, b{};
        for (int64_t h = th.first; h < th.end; ++h) {
          V x, y;
          load16(column + (h - h0) * W * C + g, x, y);
          a += x;
          b += y;
        }
        vstore(col + g, a);
        vstore(col + g + 8, b);
      }
    }
    for (int64_t ow = 0; ow < OW; ++ow) {
      const Taps tw = plan.w_taps[ow];
      const float scale = 1.0f / plan.divisor[oh * OW + ow];  // as store()
      scalar_t* o = out + (oh * OW + ow) * C;
      for (int64_t g = 0; g < channels; g += kSumGroup) {
        V a{}, b{};
        for (int64_t w = tw.first; w < tw.end; ++w) {
          a += vload(cols + w * channels + g);
          b += vload(cols + w * channels + g + 8);
        }
        store16(o + g, a * scale, b * scale);
      }
    }
  }
}

// The window of an NHWC output pixel, prefetched (each window row one span of its columns'
// channels, up to kPrefetchRowBytes of it): pool_rows_nhwc asks for the window kPrefetchPixels
// ahead of the one it pools. The hardware prefetcher alone left 2x2 average and adaptive max
// pooling of cold NHWC input 1.3-1.5x slower (Xeon, 2026-11-26: bfloat16 16x256x28x28 average
// 0.48 -> 0.29 ms, adaptive max to 7x7 0.84 -> 0.49 ms).
constexpr int64_t kPrefetchRowBytes = 32768;
constexpr int64_t kPrefetchPixels = 2;

template <typename scalar_t>
PK_INLINE void prefetch_window(const scalar_t* image, const Window2d& win, int64_t h0, int64_t W,
                               int64_t C) {
  const int64_t bytes = std::min<int64_t>((win.w.end - win.w.first) * C * sizeof(scalar_t),
                                          kPrefetchRowBytes);
  for (int64_t h = win.h.first; h < win.h.end; h += win.h.step) {
    prefetch_bytes(image + ((h - h0) * W + win.w.first) * C, bytes);
  }
}

// Output rows oh0..oh1 of one NHWC image, pixel by pixel, channels in blocks of kNhwcBlock
// (after sum_rows_nhwc, for the channels it takes); `image` holds the input rows from h0 on.
template <typename scalar_t, Reduce kReduce>
PK_HOT_LOOP void pool_rows_nhwc(const scalar_t* image, scalar_t* out, int64_t* idx,
                                const FwdPlan<sum_t<scalar_t>>& plan, int64_t oh0, int64_t oh1,
                                int64_t C, int64_t h0 = 0) {
  using acc_t = sum_t<scalar_t>;
  const int64_t W = plan.ax[1].in, OW = plan.ax[1].out;
  int64_t c_first = 0;  // the channels sum_rows_nhwc leaves, from here on
  if constexpr (kReduce == Reduce::kSum && std::is_same_v<scalar_t, c10::BFloat16>) {
    const int64_t channels = C / kSumGroup * kSumGroup;
    if (plan.w_windows_overlap && channels > 0 && W * channels <= kColumnFloats) {
      std::vector<float> cols(W * channels);
      sum_rows_nhwc(image, out, plan, oh0, oh1, C, h0, channels, cols.data());
      c_first = channels;
    }
  }
  if (c_first == C) return;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    for (int64_t ow = 0; ow < OW; ++ow) {
      const Window2d win = {plan.h_taps[oh], plan.w_taps[ow]};
      if (ow + kPrefetchPixels < OW) {
        prefetch_window(image, {win.h, plan.w_taps[ow + kPrefetchPixels]}, h0, W, C);
      }
      const acc_t divisor = kReduce == Reduce::kSum ? plan.divisor[oh * OW + ow] : acc_t(1);
      const int64_t at = (oh * OW + ow) * C;
      int64_t c = c_first;
      for (; c + kNhwcBlock <= C; c += kNhwcBlock) {
        if constexpr (kVecChannels<scalar_t>) {
          pool_pixel_vec<scalar_t, kReduce>(image + c, out + at + c, idx ? idx + at + c : nullptr,
                                            win, h0, W, C, divisor);
          continue;
        }
        pool_pixel_block<true, scalar_t, kReduce>(image + c, out + at + c,
                                                  idx ? idx + at + c : nullptr, win, h0, W,
                                                  C, kNhwcBlock, divisor);
      }
      if (c < C) {
        pool_pixel_block<false, scalar_t, kReduce>(image + c, out + at + c,
                                                   idx ? idx + at + c : nullptr, win, h0, W,
                                                   C, C - c, divisor);
      }
    }
  }
}

// NCHW planes whose output rows are narrower than a vector (7 x 7): a pass per tap and row
// costs more than its few outputs. `count` <= kNhwcBlock planes are interleaved into a
// channels-last block instead, pooled by the NHWC kernel (the planes as its channels, every tap
// in registers), and the results written back plane by plane. Same taps, same order. The block
// holds the whole planes when they fit in kInterleaveBytes, else the input rows of one output
// row at a time (112 -> 7).
constexpr int64_t kInterleaveBytes = 256 << 10;

// The elements of the block: whole planes, or the most input rows of one output row.
template <typename acc_t>
inline int64_t interleaved_size(const FwdPlan<acc_t>& plan, bool whole) {
  int64_t rows = plan.ax[0].in;
  if (!whole) {
    rows = 0;
    for (const Taps& t : plan.h_taps) rows = std::max(rows, t.end - t.first);
  }
  return rows * plan.ax[1].in * kNhwcBlock;
}

template <typename scalar_t, Reduce kReduce>
void pool_planes_interleaved(const scalar_t* src, scalar_t* dst, int64_t* idx,
                             const FwdPlan<sum_t<scalar_t>>& plan, bool whole, int64_t count,
                             scalar_t* in_block, scalar_t* out_block, int64_t* idx_block) {
  const int64_t W = plan.ax[1].in, plane = plan.ax[0].in * W;
  const int64_t OH = plan.ax[0].out, out_plane = OH * plan.ax[1].out;
  // Input rows h0..h1 of the planes into the block, in spans of 64 positions: each plane read
  // in runs, the block written within L1.
  const auto interleave = [&](int64_t h0, int64_t h1) {
    for (int64_t i0 = h0 * W; i0 < h1 * W; i0 += 64) {
      const int64_t i1 = std::min(h1 * W, i0 + 64);
      for (int64_t c = 0; c < count; ++c) {
        for (int64_t i = i0; i < i1; ++i) in_block[(i - h0 * W) * count + c] = src[c * plane + i];
      }
    }
  };
  int64_t* idx_out = idx ? idx_block : nullptr;
  if (whole) {
    interleave(0, plan.ax[0].in);
    pool_rows_nhwc<scalar_t, kReduce>(in_block, out_block, idx_out, plan, 0, OH, count);
  } else {
    for (int64_t oh = 0; oh < OH; ++oh) {
      const Taps t = plan.h_taps[oh];
      if (t.end > t.first) interleave(t.first, t.end);
      pool_rows_nhwc<scalar_t, kReduce>(in_block, out_block, idx_out, plan, oh, oh + 1, count,
                                        t.first);
    }
  }
  for (int64_t c = 0; c < count; ++c) {
    for (int64_t o = 0; o < out_plane; ++o) dst[c * out_plane + o] = out_block[o * count + c];
  }
  if (idx) {
    for (int64_t c = 0; c < count; ++c) {
      for (int64_t o = 0; o < out_plane; ++o) idx[c * out_plane + o] = idx_block[o * count + c];
    }
  }
}

// An adaptive axis whose input size is a multiple of its output size has windows of in / out
// taps, in / out apart: a strided axis's windows, whose loops vectorize across outputs (same taps
// in the same order, so the same results and indices; 112 -> 7 averages 1.5x faster).
inline PoolAxis strided_if_uniform(PoolAxis a) {
  if (a.adaptive && a.out > 0 && a.in % a.out == 0) {
    a.kernel = a.stride = a.in / a.out;
    a.pad = 0;
    a.dilation = 1;
    a.adaptive = false;
  }
  return a;
}

// Whether every window is the one input position under its output (kernel 1, stride 1, no
// padding, or adaptive in == out): the output is the input.
inline bool is_identity(const PoolAxis& a) {
  return a.in == a.out && !a.adaptive && a.kernel == 1 && a.stride == 1 && a.pad == 0;
}

template <typename scalar_t, Reduce kReduce>
void pool_fwd(const at::Tensor& x, at::Tensor& out, at::Tensor* indices,
              const std::array<PoolAxis, 2>& axes, const AvgDivisors* divisors,
              bool channels_last) {
  using acc_t = sum_t<scalar_t>;
  const std::array<PoolAxis, 2> ax = {strided_if_uniform(axes[0]), strided_if_uniform(axes[1])};
  const Sizes in(x), o(out);
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  int64_t* idx = kReduce == Reduce::kArgMax ? indices->data_ptr<int64_t>() : nullptr;
  const bool parallel = x.numel() + out.numel() > kPoolGrain;
  // Identity windows (adaptive 7 -> 7): a copy, and a max's indices are the positions.
  if (is_identity(ax[0]) && is_identity(ax[1]) &&
      (kReduce != Reduce::kSum || divisors->override_value == 0)) {
    out.copy_(x);
    if (idx) {
      // NCHW: each plane's positions in order; NHWC: position i as the C channels of pixel i.
      const int64_t plane = in.H * in.W, C = in.C;
      const int64_t runs = channels_last ? in.N * plane : in.N * C;
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t r = 0; r < runs; ++r) {
        if (channels_last) {
          std::fill(idx + r * C, idx + (r + 1) * C, r % plane);
        } else {
          for (int64_t i = 0; i < plane; ++i) idx[r * plane + i] = i;
        }
      }
    }
    return;
  }
  const FwdPlan<acc_t> plan(ax, divisors);
  // NCHW output rows under a vector wide: kNhwcBlock planes at a time pooled as channels
  // (pool_planes_interleaved), the block within L2.
  // Sums run faster by rows (pool_rows_nchw) where the windows are too tall for whole planes,
  // or 4 or more columns apart (28 -> 7: 16 inputs an output, each interleaved at a cost).
  const int64_t budget = kInterleaveBytes / static_cast<int64_t>(sizeof(scalar_t));
  const bool whole = interleaved_size(plan, true) <= budget || kReduce == Reduce::kSum;
  const int64_t block_size = interleaved_size(plan, whole);
  const bool sum_by_rows = kReduce == Reduce::kSum && !ax[1].adaptive && ax[1].stride >= 4;
  if (!channels_last && o.W < 8 && block_size <= budget && !sum_by_rows) {
    const int64_t planes = in.N * in.C, in_plane = in.H * in.W, out_plane = o.H * o.W;
    const int64_t groups = (planes + kNhwcBlock - 1) / kNhwcBlock;
    at::parallel_for(0, groups, parallel ? 1 : groups, [&](int64_t g0, int64_t g1) {
      std::vector<scalar_t> in_block(block_size);
      std::vector<scalar_t> out_block(out_plane * kNhwcBlock);
      std::vector<int64_t> idx_block(idx ? out_plane * kNhwcBlock : 0);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t p = g * kNhwcBlock, count = std::min(kNhwcBlock, planes - p);
        pool_planes_interleaved<scalar_t, kReduce>(
            src + p * in_plane, dst + p * out_plane, idx ? idx + p * out_plane : nullptr, plan,
            whole, count, in_block.data(), out_block.data(), idx_block.data());
      }
    });
    return;
  }
  // Work items are output rows, (plane, oh) for NCHW, (image, oh) for NHWC, each thread a
  // contiguous range of them, walked plane by plane: small planes (7 x 7) pay per plane.
  const int64_t planes = channels_last ? in.N : in.N * in.C;
  const int64_t in_plane = in.H * in.W * (channels_last ? in.C : 1);
  const int64_t out_plane = o.H * o.W * (channels_last ? in.C : 1);
  const int64_t rows = planes * o.H;
  const auto run = [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(channels_last ? 0 : o.W);
    std::vector<int32_t> arg(acc.size());
    for (int64_t r = r0; r < r1;) {
      const int64_t p = r / o.H, oh0 = r % o.H, oh1 = std::min(o.H, oh0 + (r1 - r));
      const scalar_t* image = src + p * in_plane;
      int64_t* idx_plane = idx ? idx + p * out_plane : nullptr;
      if (channels_last) {
        pool_rows_nhwc<scalar_t, kReduce>(image, dst + p * out_plane, idx_plane, plan, oh0, oh1,
                                          in.C);
      } else {
        pool_rows_nchw<scalar_t, kReduce>(image, dst + p * out_plane, idx_plane, plan, oh0, oh1,
                                          acc.data(), arg.data());
      }
      r += oh1 - oh0;
    }
  };
  at::parallel_for(0, rows, parallel ? 1 : rows, run);  // a contiguous share per thread
}

// Whether a max index names an element of its plane. One that does not is dropped: a dilated
// window can lie wholly in the padding (torch then reports the index of its first tap past
// the padding, which can be past the plane; its output is -inf, a constant, so no input has a
// gradient from it), and the CUDA and Triton kernels, which gather, never match such an index.
inline bool in_plane(int64_t index, int64_t plane) { return index >= 0 && index < plane; }

// Backward: dx = 0, then each output's gradient added into its window (max: at its index;
// avg: grad / divisor at every tap). Sums in opmath: dx itself for float and double, else a
// float buffer per plane (NCHW) or per image block (NHWC), converted at the end.
template <typename scalar_t, bool kMax>
void pool_bwd(const at::Tensor& dy, const at::Tensor* indices, at::Tensor& dx,
              const std::array<PoolAxis, 2>& ax, bool count_include_pad, int64_t divisor_override,
              bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kInPlace = std::is_same_v<acc_t, scalar_t>;
  const Sizes g(dy), in(dx);
  const scalar_t* grad = dy.const_data_ptr<scalar_t>();
  const int64_t* idx = kMax ? indices->const_data_ptr<int64_t>() : nullptr;
  scalar_t* d = dx.data_ptr<scalar_t>();
  const int64_t plane = in.H * in.W, out_plane = g.H * g.W;
  // The factor grad_out is scaled by for each tap of output (oh, ow): 1 / divisor (a window
  // with no tap has none to scale).
  const AvgDivisors divisors(ax, count_include_pad, divisor_override);
  const auto inv_divisor = [&](int64_t oh, int64_t ow) {
    const int64_t d = divisors.get(oh, ow);
    return d == 0 ? acc_t(0) : acc_t(1) / static_cast<acc_t>(d);
  };
  const bool parallel = dx.numel() + dy.numel() > kPoolGrain;
  if (!channels_last) {
#pragma omp parallel if (parallel)
    {
      std::vector<acc_t> buffer(kInPlace ? 0 : plane);
#pragma omp for schedule(static)
      for (int64_t p = 0; p < in.N * in.C; ++p) {
        acc_t* sum = kInPlace ? reinterpret_cast<acc_t*>(d + p * plane) : buffer.data();
        std::fill(sum, sum + plane, acc_t(0));
        const scalar_t* gp = grad + p * out_plane;
        if constexpr (kMax) {
          const int64_t* ip = idx + p * out_plane;
          for (int64_t o = 0; o < out_plane; ++o) {
            if (in_plane(ip[o], plane)) sum[ip[o]] += static_cast<acc_t>(gp[o]);
          }
        } else {
          for (int64_t oh = 0; oh < g.H; ++oh) {
            for (int64_t ow = 0; ow < g.W; ++ow) {
              const Window2d win = window_of(ax, oh, ow);
              const acc_t share = static_cast<acc_t>(gp[oh * g.W + ow]) * inv_divisor(oh, ow);
              for (int64_t h = win.h.first; h < win.h.end; ++h) {
                for (int64_t w = win.w.first; w < win.w.end; ++w) sum[h * in.W + w] += share;
              }
            }
          }
        }
        if constexpr (!kInPlace) {
          for (int64_t i = 0; i < plane; ++i) d[p * plane + i] = static_cast<scalar_t>(sum[i]);
        }
      }
    }
    return;
  }
  const int64_t blocks = (in.C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel if (parallel)
  {
    std::vector<acc_t> buffer(plane * std::min(in.C, kChannelBlock));
#pragma omp for schedule(static)
    for (int64_t nb = 0; nb < in.N * blocks; ++nb) {
      const int64_t n = nb / blocks, c0 = nb % blocks * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, in.C - c0);
      acc_t* sum = buffer.data();  // (H * W, cb)
      std::fill(sum, sum + plane * cb, acc_t(0));
      for (int64_t o = 0; o < out_plane; ++o) {
        const scalar_t* g_row = grad + (n * out_plane + o) * in.C + c0;
        if constexpr (kMax) {
          const int64_t* i_row = idx + (n * out_plane + o) * in.C + c0;
          for (int64_t c = 0; c < cb; ++c) {
            if (in_plane(i_row[c], plane)) sum[i_row[c] * cb + c] += static_cast<acc_t>(g_row[c]);
          }
        } else {
          const int64_t oh = o / g.W, ow = o % g.W;
          const Window2d win = window_of(ax, oh, ow);
          const acc_t factor = inv_divisor(oh, ow);
          for (int64_t h = win.h.first; h < win.h.end; ++h) {
            for (int64_t w = win.w.first; w < win.w.end; ++w) {
              acc_t* s = sum + (h * in.W + w) * cb;
              for (int64_t c = 0; c < cb; ++c) s[c] += static_cast<acc_t>(g_row[c]) * factor;
            }
          }
        }
      }
      for (int64_t i = 0; i < plane; ++i) {
        scalar_t* d_row = d + (n * plane + i) * in.C + c0;
        for (int64_t c = 0; c < cb; ++c) d_row[c] = static_cast<scalar_t>(sum[i * cb + c]);
      }
    }
  }
}

// Checks shared by the windowed entry points; returns the output's memory format.
at::MemoryFormat pool_format(const char* fn, const at::Tensor& t, bool channels_last) {
  PK_CHECK_VALUE(t.device().is_cpu(), fn, ": expected a CPU tensor, got ", t.device());
  PK_CHECK_VALUE(t.dim() == 4, fn, ": expected a 4D (N, C, H, W) tensor, got ", t.dim(), "D");
  const at::MemoryFormat format =
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  PK_CHECK_VALUE(t.is_contiguous(format), fn, ": tensor must be ",
                 channels_last ? "channels_last" : "contiguous", " (channels_last=",
                 channels_last, ")");
  return format;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd_cpu(
    const at::Tensor& x, const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
    const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
    const std::vector<int64_t>& out_size, bool adaptive, bool channels_last, bool with_indices) {
  const at::MemoryFormat format = pool_format("max_pool2d_fwd_cpu", x, channels_last);
  const auto ax = pool_axes("max_pool2d_fwd_cpu", {x.size(2), x.size(3)}, out_size, kernel,
                            stride, padding, dilation, adaptive);
  PK_CHECK_VALUE(x.size(2) * x.size(3) <= std::numeric_limits<int32_t>::max(),
                 "max_pool2d_fwd_cpu: planes of 2^31 or more elements are not supported, got ",
                 x.size(2), " x ", x.size(3));
  const auto options = x.options().memory_format(format);
  at::Tensor out = at::empty({x.size(0), x.size(1), out_size[0], out_size[1]}, options);
  at::Tensor indices = with_indices ? at::empty(out.sizes(), options.dtype(at::kLong))
                                    : at::empty({0}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, indices};
  poison_cpu(out);
  poison_cpu(indices);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_fwd_cpu", [&] {
    if (with_indices) {
      pool_fwd<scalar_t, Reduce::kArgMax>(x, out, &indices, ax, nullptr, channels_last);
    } else {
      pool_fwd<scalar_t, Reduce::kMax>(x, out, nullptr, ax, nullptr, channels_last);
    }
  });
  return {out, indices};
}

at::Tensor max_pool2d_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& indices,
                              const std::vector<int64_t>& in_size,
                              const std::vector<int64_t>& kernel,
                              const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& dilation, bool adaptive,
                              bool channels_last) {
  const at::MemoryFormat format = pool_format("max_pool2d_bwd_cpu", grad_out, channels_last);
  pool_format("max_pool2d_bwd_cpu", indices, channels_last);
  PK_CHECK_VALUE(indices.sizes() == grad_out.sizes() && indices.scalar_type() == at::kLong,
                 "max_pool2d_bwd_cpu: indices must be int64 with grad_out's shape");
  const auto ax = pool_axes("max_pool2d_bwd_cpu", in_size, {grad_out.size(2), grad_out.size(3)},
                            kernel, stride, padding, dilation, adaptive);
  at::Tensor dx = at::empty({grad_out.size(0), grad_out.size(1), in_size[0], in_size[1]},
                            grad_out.options().memory_format(format));
  if (dx.numel() == 0) return dx;
  poison_cpu(dx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "max_pool2d_bwd_cpu", [&] {
    pool_bwd<scalar_t, true>(grad_out, &indices, dx, ax, false, 0, channels_last);
  });
  return dx;
}

at::Tensor avg_pool2d_fwd_cpu(const at::Tensor& x, const std::vector<int64_t>& kernel,
                              const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding,
                              const std::vector<int64_t>& out_size, bool adaptive,
                              bool count_include_pad, int64_t divisor_override,
                              bool channels_last) {
  const at::MemoryFormat format = pool_format("avg_pool2d_fwd_cpu", x, channels_last);
  const auto ax = pool_axes("avg_pool2d_fwd_cpu", {x.size(2), x.size(3)}, out_size, kernel,
                            stride, padding, {1, 1}, adaptive);
  at::Tensor out = at::empty({x.size(0), x.size(1), out_size[0], out_size[1]},
                             x.options().memory_format(format));
  if (out.numel() == 0) return out;
  poison_cpu(out);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kLong, x.scalar_type(),
                                  "avg_pool2d_fwd_cpu", [&] {
    const AvgDivisors divisors(ax, count_include_pad, divisor_override);
    pool_fwd<scalar_t, Reduce::kSum>(x, out, nullptr, ax, &divisors, channels_last);
  });
  return out;
}

at::Tensor avg_pool2d_bwd_cpu(const at::Tensor& grad_out, const std::vector<int64_t>& in_size,
                              const std::vector<int64_t>& kernel,
                              const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding, bool adaptive,
                              bool count_include_pad, int64_t divisor_override,
                              bool channels_last) {
  const at::MemoryFormat format = pool_format("avg_pool2d_bwd_cpu", grad_out, channels_last);
  const auto ax = pool_axes("avg_pool2d_bwd_cpu", in_size, {grad_out.size(2), grad_out.size(3)},
                            kernel, stride, padding, {1, 1}, adaptive);
  at::Tensor dx = at::empty({grad_out.size(0), grad_out.size(1), in_size[0], in_size[1]},
                            grad_out.options().memory_format(format));
  if (dx.numel() == 0) return dx;
  poison_cpu(dx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "avg_pool2d_bwd_cpu", [&] {
    pool_bwd<scalar_t, false>(grad_out, nullptr, dx, ax, count_include_pad, divisor_override,
                              channels_last);
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor> pool_reduce_fwd_cpu(const at::Tensor& x, bool is_max,
                                                       bool with_indices) {
  PK_CHECK_CPU("pool_reduce_fwd_cpu", x);
  PK_CHECK_VALUE(x.dim() == 3, "pool_reduce_fwd_cpu: x must be a (B, R, K) view, got ", x.dim(),
                 "D");
  PK_CHECK_VALUE(x.size(1) > 0, "pool_reduce_fwd_cpu: nothing to pool over (R = 0)");
  PK_CHECK_VALUE(x.size(1) <= std::numeric_limits<int32_t>::max(),
                 "pool_reduce_fwd_cpu: reductions over 2^31 or more elements are not supported");
  at::Tensor out = at::empty({x.size(0), x.size(2)}, x.options());
  at::Tensor indices = at::empty({is_max ? x.size(0) : 0, x.size(2)}, x.options().dtype(at::kLong));
  const at::Tensor returned = with_indices ? indices : indices.narrow(0, 0, 0);
  if (out.numel() == 0) return {out, returned};
  poison_cpu(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "pool_reduce_fwd_cpu",
      [&] { reduce_fwd<scalar_t>(x, out, indices, is_max, !with_indices); });
  return {out, returned};
}

at::Tensor pool_reduce_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& indices, int64_t R,
                               bool is_max) {
  PK_CHECK_CPU("pool_reduce_bwd_cpu", grad_out);
  PK_CHECK_VALUE(grad_out.dim() == 2, "pool_reduce_bwd_cpu: grad_out must be (B, K)");
  PK_CHECK_VALUE(!is_max || indices.sizes() == grad_out.sizes(),
                 "pool_reduce_bwd_cpu: indices must have grad_out's shape");
  at::Tensor dx = at::empty({grad_out.size(0), R, grad_out.size(1)}, grad_out.options());
  if (dx.numel() == 0) return dx;
  poison_cpu(dx);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "pool_reduce_bwd_cpu",
                                  [&] { reduce_bwd<scalar_t>(grad_out, indices, dx, is_max); });
  return dx;
}

}  // namespace pykern
