// Pooling family, CPU reference. CUDA twin: csrc/cuda/pooling.cu; Triton twin:
// triton_kernels/pooling.py.
//
// Global pooling (over H, W) and channel pooling (over C) are one reduction: x seen as a 3D
// strided view (B, R, K) is reduced over R into a contiguous (B, K). pykern/ops/pooling.py
// builds the view so that no layout is copied: global pooling of NCHW is (N*C, H*W, 1), of
// NHWC (N, H*W, C); channel pooling of NCHW is (N, C, H*W), of NHWC (N*H*W, C, 1).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

// Sums accumulate in double: the CPU reference must stay accurate over long reductions
// (112x112 planes). Max compares in the element's precision widened to float (exact).
template <typename scalar_t>
using max_t = at::opmath_type<scalar_t>;

constexpr int kLanes = 8;  // independent partials: vectorizable, and a shorter error chain

// The hot loops are compiled twice, for AVX2 and for plain x86-64, and picked at load time:
// the wheel must run on any x86-64, and AVX2 doubles the width of the double accumulators.
#if defined(__x86_64__) && defined(__GNUC__)
#define PK_HOT_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define PK_HOT_LOOP
#endif

// K == 1 (global pooling of NCHW, channel pooling of NHWC): one run of R elements per output.
template <typename scalar_t>
PK_HOT_LOOP double run_sum(const scalar_t* p, int64_t n, int64_t stride) {
  double lane[kLanes] = {};
  int64_t r = 0;
  for (; r + kLanes <= n; r += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += static_cast<double>(p[(r + l) * stride]);
  }
  double tail = 0;
  for (; r < n; ++r) tail += static_cast<double>(p[r * stride]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) +
         tail;
}

// Merges two partial maxima as torch's serial rule would: the greater wins, ties keep the
// earlier index, a NaN beats any number, and among NaNs the later index wins.
template <typename acc_t>
std::pair<acc_t, int64_t> merge_max(std::pair<acc_t, int64_t> a, std::pair<acc_t, int64_t> b) {
  const bool a_nan = std::isnan(a.first), b_nan = std::isnan(b.first);
  if (a_nan || b_nan) {
    if (a_nan && b_nan) return a.second > b.second ? a : b;
    return a_nan ? a : b;
  }
  if (a.first != b.first) return a.first > b.first ? a : b;
  return a.second < b.second ? a : b;
}

// One run, one pass: kLanes running maxima (branch-free, so it vectorizes), then merged.
template <typename scalar_t>
PK_HOT_LOOP std::pair<max_t<scalar_t>, int64_t> run_max(const scalar_t* p, int64_t n,
                                                        int64_t stride) {
  using acc_t = max_t<scalar_t>;
  acc_t best[kLanes];
  int64_t arg[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    best[l] = -std::numeric_limits<acc_t>::infinity();
    arg[l] = l;  // a lane of -inf keeps its first index, as the serial rule does
  }
  int64_t r = 0;
  for (; r + kLanes <= n; r += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(p[(r + l) * stride]);
      const bool take = v > best[l] || v != v;
      best[l] = take ? v : best[l];
      arg[l] = take ? r + l : arg[l];
    }
  }
  std::pair<acc_t, int64_t> result{-std::numeric_limits<acc_t>::infinity(), r < n ? r : 0};
  for (int64_t q = r; q < n; ++q) {  // the tail, serially
    const acc_t v = static_cast<acc_t>(p[q * stride]);
    if (v > result.first || v != v) result = {v, q};
  }
  if (r > 0) {
    for (int l = 0; l < kLanes; ++l) result = merge_max(result, {best[l], arg[l]});
  }
  return result;
}

template <typename scalar_t>
PK_HOT_LOOP void add_row(double* sum, const scalar_t* row, int64_t K, int64_t sK) {
  if (sK == 1) {
    for (int64_t k = 0; k < K; ++k) sum[k] += static_cast<double>(row[k]);
  } else {
    for (int64_t k = 0; k < K; ++k) sum[k] += static_cast<double>(row[k * sK]);
  }
}

// One step of torch's serial max-pool rule for K running maxima: a later element wins if
// greater or NaN, so ties keep the first index and NaNs propagate (the last NaN's index).
// Branch-free (selects), so that it vectorizes.
template <typename scalar_t>
PK_HOT_LOOP void max_row(max_t<scalar_t>* best, int64_t* arg, const scalar_t* row, int64_t r,
                         int64_t K, int64_t sK) {
  for (int64_t k = 0; k < K; ++k) {
    const max_t<scalar_t> v = static_cast<max_t<scalar_t>>(row[k * sK]);
    const bool take = v > best[k] || v != v;
    best[k] = take ? v : best[k];
    arg[k] = take ? r : arg[k];
  }
}

template <typename scalar_t>
void reduce_fwd(const at::Tensor& x, at::Tensor& out, at::Tensor& indices, bool is_max) {
  const int64_t B = x.size(0), R = x.size(1), K = x.size(2);
  const int64_t sB = x.stride(0), sR = x.stride(1), sK = x.stride(2);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  int64_t* idx = is_max ? indices.data_ptr<int64_t>() : nullptr;
  const bool parallel = B * R * K > (1 << 15);
  if (K == 1) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < B; ++b) {
      if (is_max) {
        const auto [best, r] = run_max(in + b * sB, R, sR);
        o[b] = static_cast<scalar_t>(best);
        idx[b] = r;
      } else {
        o[b] = static_cast<scalar_t>(run_sum(in + b * sB, R, sR) / static_cast<double>(R));
      }
    }
    return;
  }
  // K > 1: r outer, k inner, one accumulator per k, so that when K is the unit-stride dim
  // (NHWC global, NCHW channel pooling) every r step reads one contiguous row.
#pragma omp parallel if (parallel)
  {
    std::vector<double> sum(is_max ? 0 : K);
    std::vector<max_t<scalar_t>> best(is_max ? K : 0);
    std::vector<int64_t> arg(is_max ? K : 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* base = in + b * sB;
      if (is_max) {
        std::fill(best.begin(), best.end(), -std::numeric_limits<max_t<scalar_t>>::infinity());
        std::fill(arg.begin(), arg.end(), 0);
        for (int64_t r = 0; r < R; ++r) max_row(best.data(), arg.data(), base + r * sR, r, K, sK);
        for (int64_t k = 0; k < K; ++k) {
          o[b * K + k] = static_cast<scalar_t>(best[k]);
          idx[b * K + k] = arg[k];
        }
      } else {
        std::fill(sum.begin(), sum.end(), 0.0);
        for (int64_t r = 0; r < R; ++r) add_row(sum.data(), base + r * sR, K, sK);
        for (int64_t k = 0; k < K; ++k) {
          o[b * K + k] = static_cast<scalar_t>(sum[k] / static_cast<double>(R));
        }
      }
    }
  }
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> pool_reduce_fwd_cpu(const at::Tensor& x, bool is_max) {
  PK_CHECK_CPU("pool_reduce_fwd_cpu", x);
  PK_CHECK_VALUE(x.dim() == 3, "pool_reduce_fwd_cpu: x must be a (B, R, K) view, got ", x.dim(),
                 "D");
  PK_CHECK_VALUE(x.size(1) > 0, "pool_reduce_fwd_cpu: nothing to pool over (R = 0)");
  at::Tensor out = at::empty({x.size(0), x.size(2)}, x.options());
  at::Tensor indices = at::empty({is_max ? x.size(0) : 0, x.size(2)}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, indices};
  poison_cpu(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_reduce_fwd_cpu",
                                  [&] { reduce_fwd<scalar_t>(x, out, indices, is_max); });
  return {out, indices};
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
