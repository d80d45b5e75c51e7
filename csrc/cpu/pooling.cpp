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

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

// torch's max-pool rule, serially: a later element wins if greater or NaN, so ties keep the
// first index and NaNs propagate (the last NaN's index).
template <typename acc_t>
inline bool max_pool_takes(acc_t value, acc_t best) {
  return value > best || std::isnan(value);
}

template <typename scalar_t>
void reduce_fwd(const at::Tensor& x, at::Tensor& out, at::Tensor& indices, bool is_max) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), R = x.size(1), K = x.size(2);
  const int64_t sB = x.stride(0), sR = x.stride(1), sK = x.stride(2);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  int64_t* idx = is_max ? indices.data_ptr<int64_t>() : nullptr;
#pragma omp parallel for schedule(static) if (B * R * K > (1 << 15))
  for (int64_t b = 0; b < B; ++b) {
    // r outer, k inner, one accumulator per k: when K is the unit-stride dim (NHWC global,
    // NCHW channel pooling) every r step reads one contiguous row.
    std::vector<acc_t> acc(K, is_max ? -std::numeric_limits<acc_t>::infinity() : acc_t(0));
    std::vector<int64_t> arg(is_max ? K : 0, 0);
    const scalar_t* base = in + b * sB;
    for (int64_t r = 0; r < R; ++r) {
      const scalar_t* row = base + r * sR;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t v = static_cast<acc_t>(row[k * sK]);
        if (!is_max) {
          acc[k] += v;
        } else if (max_pool_takes(v, acc[k])) {
          acc[k] = v;
          arg[k] = r;
        }
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      o[b * K + k] = static_cast<scalar_t>(is_max ? acc[k] : acc[k] / static_cast<acc_t>(R));
      if (is_max) idx[b * K + k] = arg[k];
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
