// Pooling family, CUDA. Twin of csrc/cpu/pooling.cpp (Triton twin: triton_kernels/pooling.py):
// global and channel pooling as a (B, R, K) strided view reduced over R into a contiguous
// (B, K) (mean, or max with torch's index rule), and its backward; then windowed pooling.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/cuda_divmod.h"
#include "common/poison.h"
#include "common/pool_window.h"
#include "pykern.h"

namespace pykern {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // block = 32 (along K or R) x 8
constexpr int64_t kMaxBlocks = 1 << 20;

// A partial max: value and its index in R.
template <typename acc_t>
struct ArgMax {
  acc_t value;
  int64_t index;
};

// Merges two partial maxima as torch's serial rule would have: the greater wins; on ties the
// earlier index; any NaN beats a number, and among NaNs the later index.
template <typename acc_t>
__device__ __forceinline__ ArgMax<acc_t> merge(ArgMax<acc_t> a, ArgMax<acc_t> b) {
  const bool a_nan = isnan(a.value), b_nan = isnan(b.value);
  if (a_nan || b_nan) {
    if (a_nan && b_nan) return a.index > b.index ? a : b;
    return a_nan ? a : b;
  }
  if (a.value != b.value) return a.value > b.value ? a : b;
  return a.index < b.index ? a : b;
}

// One output per block column: threadIdx.x runs along K (coalesced when K has unit stride:
// NHWC global pooling, NCHW channel pooling), threadIdx.y strides over R, then the 8 partials
// per column are merged through shared memory. Grid-stride over B x K-tiles.
template <typename scalar_t, bool kMax>
__global__ void pool_reduce_fwd_kernel_cols(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                            int64_t* __restrict__ indices, int64_t B, int64_t R,
                                            int64_t K, int64_t sB, int64_t sR, int64_t sK) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part_value[kRowsPerBlock][kWarp];
  __shared__ int64_t part_index[kRowsPerBlock][kWarp];
  const int64_t k_tiles = (K + kWarp - 1) / kWarp;
  for (int64_t t = blockIdx.x; t < B * k_tiles; t += gridDim.x) {
    const int64_t b = t / k_tiles;
    const int64_t k = (t % k_tiles) * kWarp + threadIdx.x;
    ArgMax<acc_t> best{kMax ? -INFINITY : acc_t(0), 0};
    if (k < K) {
      const scalar_t* p = x + b * sB + k * sK;
      for (int64_t r = threadIdx.y; r < R; r += kRowsPerBlock) {
        const acc_t v = static_cast<acc_t>(p[r * sR]);
        if constexpr (kMax) {
          // Start from the first element seen, not from (-inf, 0): with all -inf a fake
          // index 0 would win the tie over this thread's real first index.
          best = r == threadIdx.y ? ArgMax<acc_t>{v, r} : merge(best, ArgMax<acc_t>{v, r});
        } else {
          best.value += v;
        }
      }
    }
    part_value[threadIdx.y][threadIdx.x] = best.value;
    part_index[threadIdx.y][threadIdx.x] = best.index;
    __syncthreads();
    if (threadIdx.y == 0 && k < K) {
      for (int j = 1; j < kRowsPerBlock; ++j) {
        const ArgMax<acc_t> other{part_value[j][threadIdx.x], part_index[j][threadIdx.x]};
        if constexpr (kMax) {
          if (j < R) best = merge(best, other);  // row j saw elements only if j < R
        } else {
          best.value += other.value;
        }
      }
      out[b * K + k] = static_cast<scalar_t>(kMax ? best.value : best.value / static_cast<acc_t>(R));
      if constexpr (kMax) indices[b * K + k] = best.index;
    }
    __syncthreads();
  }
}

// One warp per output, lanes along R (coalesced when R has unit stride and K is short: NCHW
// global pooling, NHWC channel pooling), merged with warp shuffles.
template <typename scalar_t, bool kMax>
__global__ void pool_reduce_fwd_kernel_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                            int64_t* __restrict__ indices, int64_t B, int64_t R,
                                            int64_t K, int64_t sB, int64_t sR, int64_t sK) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; o < B * K;
       o += warps) {
    const scalar_t* p = x + (o / K) * sB + (o % K) * sK;
    ArgMax<acc_t> best{kMax ? -INFINITY : acc_t(0), 0};
    bool seen = false;
    for (int64_t r = threadIdx.x; r < R; r += kWarp) {
      const acc_t v = static_cast<acc_t>(p[r * sR]);
      if constexpr (kMax) {
        best = seen ? merge(best, ArgMax<acc_t>{v, r}) : ArgMax<acc_t>{v, r};
        seen = true;
      } else {
        best.value += v;
      }
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const acc_t other_value = __shfl_down_sync(0xffffffff, best.value, offset);
      const int64_t other_index = __shfl_down_sync(0xffffffff, best.index, offset);
      const bool other_seen = __shfl_down_sync(0xffffffff, static_cast<int>(seen), offset) != 0;
      if constexpr (kMax) {
        if (other_seen) best = seen ? merge(best, ArgMax<acc_t>{other_value, other_index})
                                    : ArgMax<acc_t>{other_value, other_index};
        seen = seen || other_seen;
      } else {
        best.value += other_value;
      }
    }
    if (threadIdx.x == 0) {
      out[o] = static_cast<scalar_t>(kMax ? best.value : best.value / static_cast<acc_t>(R));
      if constexpr (kMax) indices[o] = best.index;
    }
  }
}

// dx[b, r, k] (contiguous) from dy[b, k]: dy / R, or dy where r is the max's index, else 0.
template <typename scalar_t, bool kMax>
__global__ void pool_reduce_bwd_kernel(const scalar_t* __restrict__ dy,
                                       const int64_t* __restrict__ indices,
                                       scalar_t* __restrict__ dx, int64_t B, int64_t R, int64_t K,
                                       int64_t sB, int64_t sK) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * R * K;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t k = i % K;
    const int64_t r = (i / K) % R;
    const int64_t b = i / (K * R);
    const acc_t g = static_cast<acc_t>(dy[b * sB + k * sK]);
    if constexpr (kMax) {
      dx[i] = static_cast<scalar_t>(indices[b * K + k] == r ? g : acc_t(0));
    } else {
      dx[i] = static_cast<scalar_t>(g / static_cast<acc_t>(R));
    }
  }
}

}  // namespace

// with_indices false: the kernels still write the indices (a few % of the traffic), to a
// buffer that is not returned.
std::tuple<at::Tensor, at::Tensor> pool_reduce_fwd_cuda(const at::Tensor& x, bool is_max,
                                                        bool with_indices) {
  PK_CHECK_CUDA("pool_reduce_fwd_cuda", x);
  PK_CHECK_VALUE(x.dim() == 3, "pool_reduce_fwd_cuda: x must be a (B, R, K) view, got ", x.dim(),
                 "D");
  PK_CHECK_VALUE(x.size(1) > 0, "pool_reduce_fwd_cuda: nothing to pool over (R = 0)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), R = x.size(1), K = x.size(2);
  at::Tensor out = at::empty({B, K}, x.options());
  at::Tensor indices = at::empty({is_max ? B : 0, K}, x.options().dtype(at::kLong));
  const at::Tensor returned = with_indices ? indices : indices.narrow(0, 0, 0);
  if (out.numel() == 0) return {out, returned};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (poison_outputs()) {
    C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0xFF, out.nbytes(), stream));
  }
  // Short K with R walked contiguously: a warp per output; otherwise threads along K.
  const bool rows = K < kWarp / 2 || x.stride(1) == 1;
  const dim3 threads(kWarp, kRowsPerBlock);
  const int64_t blocks = rows ? std::min((B * K + kRowsPerBlock - 1) / kRowsPerBlock, kMaxBlocks)
                              : std::min(B * ((K + kWarp - 1) / kWarp), kMaxBlocks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_reduce_fwd_cuda",
                                  [&] {
    const auto* in = x.const_data_ptr<scalar_t>();
    auto* o = out.data_ptr<scalar_t>();
    int64_t* idx = is_max ? indices.data_ptr<int64_t>() : nullptr;
    const auto launch = [&](auto kernel) {
      kernel<<<blocks, threads, 0, stream>>>(in, o, idx, B, R, K, x.stride(0), x.stride(1),
                                             x.stride(2));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (rows) {
      is_max ? launch(pool_reduce_fwd_kernel_rows<scalar_t, true>)
             : launch(pool_reduce_fwd_kernel_rows<scalar_t, false>);
    } else {
      is_max ? launch(pool_reduce_fwd_kernel_cols<scalar_t, true>)
             : launch(pool_reduce_fwd_kernel_cols<scalar_t, false>);
    }
  });
  return {out, returned};
}

at::Tensor pool_reduce_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& indices, int64_t R,
                                bool is_max) {
  PK_CHECK_CUDA("pool_reduce_bwd_cuda", grad_out);
  PK_CHECK_VALUE(grad_out.dim() == 2, "pool_reduce_bwd_cuda: grad_out must be (B, K)");
  PK_CHECK_VALUE(!is_max || indices.sizes() == grad_out.sizes(),
                 "pool_reduce_bwd_cuda: indices must have grad_out's shape");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t B = grad_out.size(0), K = grad_out.size(1);
  at::Tensor dx = at::empty({B, R, K}, grad_out.options());
  if (dx.numel() == 0) return dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (poison_outputs()) {
    C10_CUDA_CHECK(cudaMemsetAsync(dx.data_ptr(), 0xFF, dx.nbytes(), stream));
  }
  constexpr int kThreads = 256;
  const int64_t blocks = std::min((dx.numel() + kThreads - 1) / kThreads, kMaxBlocks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "pool_reduce_bwd_cuda", [&] {
    const auto* g = grad_out.const_data_ptr<scalar_t>();
    const int64_t* idx = is_max ? indices.const_data_ptr<int64_t>() : nullptr;
    auto* d = dx.data_ptr<scalar_t>();
    if (is_max) {
      pool_reduce_bwd_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          g, idx, d, B, R, K, grad_out.stride(0), grad_out.stride(1));
    } else {
      pool_reduce_bwd_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          g, idx, d, B, R, K, grad_out.stride(0), grad_out.stride(1));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

// Windowed pooling: max_pool2d, avg_pool2d and their adaptive forms, NCHW or NHWC. The windows
// come from common/pool_window.h. Forward: one thread per output element; backward: one thread
// per input element gathering from the outputs that read it (deterministic, no atomics).
// Consecutive threads run along the unit-stride dim: ow (NCHW) or c (NHWC).

namespace {

constexpr int kPoolThreads = 256;

// max's starting value: -inf for floating types, the lowest value for integers.
template <typename acc_t>
__device__ __forceinline__ acc_t max_identity() {
  if constexpr (std::is_floating_point_v<acc_t>) {
    return -std::numeric_limits<acc_t>::infinity();
  } else {
    return std::numeric_limits<acc_t>::lowest();
  }
}

template <typename acc_t>
__device__ __forceinline__ bool nan_value(acc_t v) {
  if constexpr (std::is_floating_point_v<acc_t>) {
    return isnan(v);
  } else {
    return false;
  }
}

constexpr int kTapRows = 3, kTapCols = 3;  // taps loaded together (see for_each_tap)

// Calls f(v, h, w, ok) for the taps (h, w) of a window of plane p (element (h, w) at
// p[h * sh + w * sw]) in torch's order, h outer and w inner, with v the element in acc_t; f must
// ignore calls with ok false (slots past the window's end). Loads are issued in batches before
// any is consumed: when a row's taps fit kTapCols, kTapRows rows at a time (a 3x3 or 2x2 window
// is one round trip to memory, not one per tap); else kTapCols taps of one row at a time.
// f should select rather than branch: a branch lets ptxas sink the loads back between the uses.
template <typename acc_t, typename scalar_t, typename F>
__device__ __forceinline__ void for_each_tap(const scalar_t* __restrict__ p, int64_t sh,
                                             int64_t sw, Taps th, Taps tw, F&& f) {
  if (tw.first < tw.end && tw.end - tw.first <= kTapCols * tw.step) {
    for (int64_t h0 = th.first; h0 < th.end; h0 += kTapRows * th.step) {
      // Unconditional loads: a slot past the window reloads its first row or column (a cache
      // hit), so no predicate holds the loads back.
      acc_t v[kTapRows][kTapCols];
#pragma unroll
      for (int r = 0; r < kTapRows; ++r) {
        const int64_t h = h0 + r * th.step;
        const scalar_t* row = p + (h < th.end ? h : h0) * sh;
#pragma unroll
        for (int c = 0; c < kTapCols; ++c) {
          const int64_t w = tw.first + c * tw.step;
          v[r][c] = static_cast<acc_t>(row[(w < tw.end ? w : tw.first) * sw]);
        }
      }
#pragma unroll
      for (int r = 0; r < kTapRows; ++r) {
        const int64_t h = h0 + r * th.step;
#pragma unroll
        for (int c = 0; c < kTapCols; ++c) {
          const int64_t w = tw.first + c * tw.step;
          f(v[r][c], h, w, h < th.end && w < tw.end);
        }
      }
    }
  } else {
    for (int64_t h = th.first; h < th.end; h += th.step) {
      const scalar_t* row = p + h * sh;
      for (int64_t w0 = tw.first; w0 < tw.end; w0 += kTapCols * tw.step) {
        acc_t v[kTapCols];
#pragma unroll
        for (int c = 0; c < kTapCols; ++c) {
          const int64_t w = w0 + c * tw.step;
          v[c] = static_cast<acc_t>(row[(w < tw.end ? w : w0) * sw]);
        }
#pragma unroll
        for (int c = 0; c < kTapCols; ++c) {
          const int64_t w = w0 + c * tw.step;
          f(v[c], h, w, w < tw.end);
        }
      }
    }
  }
}

// torch's serial max over one window: a later tap wins if greater or NaN (ties keep the first,
// the last NaN wins). The index starts at the first tap, so a window of all -inf (or lowest,
// or no tap at all) reports it. Indices are flat h * W + w.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ ArgMax<acc_t> window_max(const scalar_t* __restrict__ p, int64_t sh,
                                                    int64_t sw, Taps th, Taps tw, int64_t W) {
  ArgMax<acc_t> best{max_identity<acc_t>(), th.first * W + tw.first};
  for_each_tap<acc_t>(p, sh, sw, th, tw, [&](acc_t v, int64_t h, int64_t w, bool ok) {
    const bool take = ok && (v > best.value || nan_value(v));
    best.value = take ? v : best.value;
    best.index = take ? h * W + w : best.index;
  });
  return best;
}

// Sum over one window, in torch's order.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ acc_t window_sum(const scalar_t* __restrict__ p, int64_t sh,
                                            int64_t sw, Taps th, Taps tw) {
  acc_t sum = acc_t(0);
  for_each_tap<acc_t>(p, sh, sw, th, tw,
                      [&](acc_t v, int64_t, int64_t, bool ok) { sum = ok ? sum + v : sum; });
  return sum;
}

// avg_pool2d's divisor of output (oh, ow) with taps th, tw (at least one in each axis).
// Adaptive: the taps counted. Strided: divisor_override if set, else the window clipped to the
// padded input (count_include_pad) or to the input.
struct AvgRule {
  bool count_include_pad;
  int64_t divisor_override;  // 0: none
};

__device__ __forceinline__ int64_t avg_divisor(const PoolAxis& ah, const PoolAxis& aw,
                                               const AvgRule& rule, int64_t oh, int64_t ow,
                                               Taps th, Taps tw) {
  const int64_t taps = (th.end - th.first) * (tw.end - tw.first);  // dilation 1
  if (ah.adaptive) return taps;
  if (rule.divisor_override != 0) return rule.divisor_override;
  if (rule.count_include_pad) return padded_window(ah, oh) * padded_window(aw, ow);
  return taps;
}

#define PK_GRID_STRIDE_LOOP(i, total)                                                      \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (total); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// max_pool2d forward: out[i] and indices[i] for output element i.

template <typename scalar_t>
__global__ void max_pool2d_fwd_kernel_nchw(const scalar_t* __restrict__ x,
                                           scalar_t* __restrict__ out,
                                           int64_t* __restrict__ indices, int64_t total,
                                           PoolAxis ah, PoolAxis aw) {
  const int64_t H = ah.in, W = aw.in;
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * C + c) * OH + oh) * OW + ow
    const DivMod a = divmod(i, aw.out);    // a.r = ow
    const DivMod b = divmod(a.q, ah.out);  // b.r = oh, b.q = n * C + c
    const auto best = window_max(x + b.q * H * W, W, 1, taps_of(ah, b.r), taps_of(aw, a.r), W);
    out[i] = static_cast<scalar_t>(best.value);
    if (indices != nullptr) indices[i] = best.index;
  }
}

template <typename scalar_t>
__global__ void max_pool2d_fwd_kernel_nhwc(const scalar_t* __restrict__ x,
                                           scalar_t* __restrict__ out,
                                           int64_t* __restrict__ indices, int64_t total,
                                           int64_t C, PoolAxis ah, PoolAxis aw) {
  const int64_t H = ah.in, W = aw.in;
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * OH + oh) * OW + ow) * C + c
    const DivMod a = divmod(i, C);         // a.r = c
    const DivMod b = divmod(a.q, aw.out);  // b.r = ow
    const DivMod d = divmod(b.q, ah.out);  // d.r = oh, d.q = n
    const auto best = window_max(x + d.q * H * W * C + a.r, W * C, C, taps_of(ah, d.r),
                                 taps_of(aw, b.r), W);
    out[i] = static_cast<scalar_t>(best.value);
    if (indices != nullptr) indices[i] = best.index;
  }
}

// max_pool2d backward: grad_in[i] for input element i (n, c, h, w) sums, in (oh, ow)
// order, grad_out over the outputs in its reach whose index is h * W + w. grad_out and
// indices are read through their strides (g*, k*: n, c, oh, ow).

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename scalar_t>
__device__ __forceinline__ scalar_t max_grad_at(const scalar_t* __restrict__ grad_out,
                                                const int64_t* __restrict__ indices, Strides4 gs,
                                                Strides4 ks, int64_t n, int64_t c, int64_t h,
                                                int64_t w, const PoolAxis& ah,
                                                const PoolAxis& aw) {
  using acc_t = at::opmath_type<scalar_t>;
  const OutRange rh = outputs_reading(ah, h), rw = outputs_reading(aw, w);
  const int64_t target = h * aw.in + w;
  const scalar_t* g = grad_out + n * gs.n + c * gs.c;
  const int64_t* k = indices + n * ks.n + c * ks.c;
  acc_t sum = acc_t(0);
  for (int64_t oh = rh.lo; oh < rh.hi; ++oh) {
    for (int64_t ow = rw.lo; ow < rw.hi; ++ow) {
      if (k[oh * ks.h + ow * ks.w] == target) sum += static_cast<acc_t>(g[oh * gs.h + ow * gs.w]);
    }
  }
  return static_cast<scalar_t>(sum);
}

template <typename scalar_t>
__global__ void max_pool2d_bwd_kernel_nchw(const scalar_t* __restrict__ grad_out,
                                           const int64_t* __restrict__ indices,
                                           scalar_t* __restrict__ grad_in, int64_t total,
                                           int64_t C, Strides4 gs, Strides4 ks, PoolAxis ah,
                                           PoolAxis aw) {
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * C + c) * H + h) * W + w
    const DivMod a = divmod(i, aw.in);    // a.r = w
    const DivMod b = divmod(a.q, ah.in);  // b.r = h
    const DivMod d = divmod(b.q, C);      // d.r = c, d.q = n
    grad_in[i] = max_grad_at(grad_out, indices, gs, ks, d.q, d.r, b.r, a.r, ah, aw);
  }
}

template <typename scalar_t>
__global__ void max_pool2d_bwd_kernel_nhwc(const scalar_t* __restrict__ grad_out,
                                           const int64_t* __restrict__ indices,
                                           scalar_t* __restrict__ grad_in, int64_t total,
                                           int64_t C, Strides4 gs, Strides4 ks, PoolAxis ah,
                                           PoolAxis aw) {
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * H + h) * W + w) * C + c
    const DivMod a = divmod(i, C);        // a.r = c
    const DivMod b = divmod(a.q, aw.in);  // b.r = w
    const DivMod d = divmod(b.q, ah.in);  // d.r = h, d.q = n
    grad_in[i] = max_grad_at(grad_out, indices, gs, ks, d.q, a.r, d.r, b.r, ah, aw);
  }
}

// avg_pool2d forward: out[i] for output element i; 0 for a window with no tap.

template <typename scalar_t>
__device__ __forceinline__ scalar_t window_avg(const scalar_t* __restrict__ p, int64_t sh,
                                               int64_t sw, const PoolAxis& ah,
                                               const PoolAxis& aw, const AvgRule& rule,
                                               int64_t oh, int64_t ow) {
  using acc_t = at::opmath_type<scalar_t>;
  const Taps th = taps_of(ah, oh), tw = taps_of(aw, ow);
  if (th.first >= th.end || tw.first >= tw.end) return static_cast<scalar_t>(acc_t(0));
  const acc_t sum = window_sum(p, sh, sw, th, tw);
  // int64: C++ division, truncating, as torch's.
  return static_cast<scalar_t>(sum / static_cast<acc_t>(avg_divisor(ah, aw, rule, oh, ow, th, tw)));
}

template <typename scalar_t>
__global__ void avg_pool2d_fwd_kernel_nchw(const scalar_t* __restrict__ x,
                                           scalar_t* __restrict__ out, int64_t total,
                                           PoolAxis ah, PoolAxis aw, AvgRule rule) {
  const int64_t H = ah.in, W = aw.in;
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * C + c) * OH + oh) * OW + ow
    const DivMod a = divmod(i, aw.out);    // a.r = ow
    const DivMod b = divmod(a.q, ah.out);  // b.r = oh, b.q = n * C + c
    out[i] = window_avg(x + b.q * H * W, W, 1, ah, aw, rule, b.r, a.r);
  }
}

template <typename scalar_t>
__global__ void avg_pool2d_fwd_kernel_nhwc(const scalar_t* __restrict__ x,
                                           scalar_t* __restrict__ out, int64_t total, int64_t C,
                                           PoolAxis ah, PoolAxis aw, AvgRule rule) {
  const int64_t H = ah.in, W = aw.in;
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * OH + oh) * OW + ow) * C + c
    const DivMod a = divmod(i, C);         // a.r = c
    const DivMod b = divmod(a.q, aw.out);  // b.r = ow
    const DivMod d = divmod(b.q, ah.out);  // d.r = oh, d.q = n
    out[i] = window_avg(x + d.q * H * W * C + a.r, W * C, C, ah, aw, rule, d.r, b.r);
  }
}

// avg_pool2d backward: grad_in[i] for input element i (n, c, h, w) sums, in (oh, ow)
// order, grad_out / divisor over the outputs that have (h, w) among their taps.

template <typename scalar_t>
__device__ __forceinline__ scalar_t avg_grad_at(const scalar_t* __restrict__ grad_out,
                                                Strides4 gs, int64_t n, int64_t c, int64_t h,
                                                int64_t w, const PoolAxis& ah,
                                                const PoolAxis& aw, const AvgRule& rule) {
  using acc_t = at::opmath_type<scalar_t>;
  const OutRange rh = outputs_reading(ah, h), rw = outputs_reading(aw, w);
  const scalar_t* g = grad_out + n * gs.n + c * gs.c;
  acc_t sum = acc_t(0);
  for (int64_t oh = rh.lo; oh < rh.hi; ++oh) {
    if (!tap_of(ah, oh, h)) continue;
    const Taps th = taps_of(ah, oh);
    for (int64_t ow = rw.lo; ow < rw.hi; ++ow) {
      if (!tap_of(aw, ow, w)) continue;
      const int64_t divisor = avg_divisor(ah, aw, rule, oh, ow, th, taps_of(aw, ow));
      sum += static_cast<acc_t>(g[oh * gs.h + ow * gs.w]) / static_cast<acc_t>(divisor);
    }
  }
  return static_cast<scalar_t>(sum);
}

template <typename scalar_t>
__global__ void avg_pool2d_bwd_kernel_nchw(const scalar_t* __restrict__ grad_out,
                                           scalar_t* __restrict__ grad_in, int64_t total,
                                           int64_t C, Strides4 gs, PoolAxis ah, PoolAxis aw,
                                           AvgRule rule) {
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * C + c) * H + h) * W + w
    const DivMod a = divmod(i, aw.in);    // a.r = w
    const DivMod b = divmod(a.q, ah.in);  // b.r = h
    const DivMod d = divmod(b.q, C);      // d.r = c, d.q = n
    grad_in[i] = avg_grad_at(grad_out, gs, d.q, d.r, b.r, a.r, ah, aw, rule);
  }
}

template <typename scalar_t>
__global__ void avg_pool2d_bwd_kernel_nhwc(const scalar_t* __restrict__ grad_out,
                                           scalar_t* __restrict__ grad_in, int64_t total,
                                           int64_t C, Strides4 gs, PoolAxis ah, PoolAxis aw,
                                           AvgRule rule) {
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * H + h) * W + w) * C + c
    const DivMod a = divmod(i, C);        // a.r = c
    const DivMod b = divmod(a.q, aw.in);  // b.r = w
    const DivMod d = divmod(b.q, ah.in);  // d.r = h, d.q = n
    grad_in[i] = avg_grad_at(grad_out, gs, d.q, a.r, d.r, b.r, ah, aw, rule);
  }
}

#undef PK_GRID_STRIDE_LOOP

// host side

at::MemoryFormat pool_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The layout precondition of x: NHWC-contiguous with channels_last, else NCHW-contiguous.
void check_pool_input(const char* fn, const at::Tensor& x, bool channels_last) {
  PK_CHECK_VALUE(x.dim() == 4, fn, ": x must be 4D (N, C, H, W), got ", x.dim(), "D");
  PK_CHECK_VALUE(x.is_contiguous(pool_format(channels_last)), fn, ": x must be ",
                 channels_last ? "channels_last-contiguous (NHWC in memory)"
                               : "contiguous (NCHW in memory)",
                 " as channels_last=", channels_last, " says, got strides ", x.strides());
}

void check_grad_out(const char* fn, const at::Tensor& grad_out,
                    const std::vector<int64_t>& in_size) {
  PK_CHECK_VALUE(grad_out.dim() == 4, fn, ": grad_out must be 4D (N, C, OH, OW), got ",
                 grad_out.dim(), "D");
  PK_CHECK_VALUE(in_size.size() == 2 && in_size[0] >= 0 && in_size[1] >= 0, fn,
                 ": in_size must be a non-negative (H, W) pair");
}

void check_out_size(const char* fn, const std::vector<int64_t>& out_size) {
  PK_CHECK_VALUE(out_size.size() == 2 && out_size[0] >= 0 && out_size[1] >= 0, fn,
                 ": out_size must be a non-negative (H, W) pair");
}

int64_t pool_blocks(int64_t total) {
  return std::min((total + kPoolThreads - 1) / kPoolThreads, kMaxBlocks);
}

void poison_output(const at::Tensor& t, cudaStream_t stream) {
  if (poison_outputs() && t.numel() > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0xFF, t.nbytes(), stream));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd_cuda(
    const at::Tensor& x, const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
    const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
    const std::vector<int64_t>& out_size, bool adaptive, bool channels_last, bool with_indices) {
  constexpr const char* fn = "max_pool2d_fwd_cuda";
  PK_CHECK_CUDA("max_pool2d_fwd_cuda", x);
  check_pool_input(fn, x, channels_last);
  check_out_size(fn, out_size);
  const auto axes =
      pool_axes(fn, {x.size(2), x.size(3)}, out_size, kernel, stride, padding, dilation, adaptive);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  const auto fmt = pool_format(channels_last);
  at::Tensor out = at::empty({N, C, out_size[0], out_size[1]}, x.options().memory_format(fmt));
  at::Tensor indices = with_indices
                           ? at::empty(out.sizes(), x.options().dtype(at::kLong).memory_format(fmt))
                           : at::empty({0}, x.options().dtype(at::kLong));
  const int64_t total = out.numel();
  if (total == 0) return {out, indices};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison_output(out, stream);
  poison_output(indices, stream);
  const int64_t blocks = pool_blocks(total);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_fwd_cuda",
                             [&] {
    const auto* in = x.const_data_ptr<scalar_t>();
    auto* o = out.data_ptr<scalar_t>();
    auto* idx = with_indices ? indices.data_ptr<int64_t>() : nullptr;  // null: values only
    if (channels_last) {
      // A thread per output element, consecutive threads along c; grid-stride over N*OH*OW*C.
      max_pool2d_fwd_kernel_nhwc<scalar_t><<<blocks, kPoolThreads, 0, stream>>>(
          in, o, idx, total, C, axes[0], axes[1]);
    } else {
      // A thread per output element, consecutive threads along ow; grid-stride over N*C*OH*OW.
      max_pool2d_fwd_kernel_nchw<scalar_t><<<blocks, kPoolThreads, 0, stream>>>(
          in, o, idx, total, axes[0], axes[1]);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, indices};
}

at::Tensor max_pool2d_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& indices,
                               const std::vector<int64_t>& in_size,
                               const std::vector<int64_t>& kernel,
                               const std::vector<int64_t>& stride,
                               const std::vector<int64_t>& padding,
                               const std::vector<int64_t>& dilation, bool adaptive,
                               bool channels_last) {
  constexpr const char* fn = "max_pool2d_bwd_cuda";
  PK_CHECK_CUDA("max_pool2d_bwd_cuda", grad_out);
  PK_CHECK_CUDA("max_pool2d_bwd_cuda", indices);
  check_grad_out(fn, grad_out, in_size);
  PK_CHECK_VALUE(indices.device() == grad_out.device(), fn,
                 ": indices must be on grad_out's device (", grad_out.device(), "), got ",
                 indices.device());
  PK_CHECK_VALUE(indices.sizes() == grad_out.sizes(), fn,
                 ": indices must have grad_out's shape ", grad_out.sizes(), ", got ",
                 indices.sizes());
  PK_CHECK_TYPE(indices.scalar_type() == at::kLong, fn, ": indices must be int64, got ",
                indices.scalar_type());
  const auto axes = pool_axes(fn, in_size, {grad_out.size(2), grad_out.size(3)}, kernel, stride,
                              padding, dilation, adaptive);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t N = grad_out.size(0), C = grad_out.size(1);
  at::Tensor grad_in = at::empty({N, C, in_size[0], in_size[1]},
                                 grad_out.options().memory_format(pool_format(channels_last)));
  const int64_t total = grad_in.numel();
  if (total == 0) return grad_in;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison_output(grad_in, stream);
  const int64_t blocks = pool_blocks(total);
  const Strides4 gs = strides4(grad_out), ks = strides4(indices);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "max_pool2d_bwd_cuda", [&] {
    const auto* g = grad_out.const_data_ptr<scalar_t>();
    const auto* idx = indices.const_data_ptr<int64_t>();
    auto* d = grad_in.data_ptr<scalar_t>();
    if (channels_last) {
      // A thread per input element, consecutive threads along c; grid-stride over N*H*W*C.
      max_pool2d_bwd_kernel_nhwc<scalar_t><<<blocks, kPoolThreads, 0, stream>>>(
          g, idx, d, total, C, gs, ks, axes[0], axes[1]);
    } else {
      // A thread per input element, consecutive threads along w; grid-stride over N*C*H*W.
      max_pool2d_bwd_kernel_nchw<scalar_t><<<blocks, kPoolThreads, 0, stream>>>(
          g, idx, d, total, C, gs, ks, axes[0], axes[1]);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
}

at::Tensor avg_pool2d_fwd_cuda(const at::Tensor& x, const std::vector<int64_t>& kernel,
                               const std::vector<int64_t>& stride,
                               const std::vector<int64_t>& padding,
                               const std::vector<int64_t>& out_size, bool adaptive,
                               bool count_include_pad, int64_t divisor_override,
                               bool channels_last) {
  constexpr const char* fn = "avg_pool2d_fwd_cuda";
  PK_CHECK_CUDA("avg_pool2d_fwd_cuda", x);
  check_pool_input(fn, x, channels_last);
  check_out_size(fn, out_size);
  const auto axes =
      pool_axes(fn, {x.size(2), x.size(3)}, out_size, kernel, stride, padding, {1, 1}, adaptive);
  const AvgRule rule{count_include_pad, divisor_override};
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({N, C, out_size[0], out_size[1]},
                             x.options().memory_format(pool_format(channels_last)));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison_output(out, stream);
  const int64_t blocks = pool_blocks(total);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kLong, x.scalar_type(),
                                  "avg_pool2d_fwd_cuda", [&] {
    const auto* in = x.const_data_ptr<scalar_t>();
    auto* o = out.data_ptr<scalar_t>();
    if (channels_last) {
      // A thread per output element, consecutive threads along c; grid-stride over N*OH*OW*C.
      avg_pool2d_fwd_kernel_nhwc<scalar_t><<<blocks, kPoolThreads, 0, stream>>>(
          in, o, total, C, axes[0], axes[1], rule);
    } else {
      // A thread per output element, consecutive threads along ow; grid-stride over N*C*OH*OW.
      avg_pool2d_fwd_kernel_nchw<scalar_t><<<blocks, kPoolThreads, 0, stream>>>(
          in, o, total, axes[0], axes[1], rule);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor avg_pool2d_bwd_cuda(const at::Tensor& grad_out, const std::vector<int64_t>& in_size,
                               const std::vector<int64_t>& kernel,
                               const std::vector<int64_t>& stride,
                               const std::vector<int64_t>& padding, bool adaptive,
                               bool count_include_pad, int64_t divisor_override,
                               bool channels_last) {
  constexpr const char* fn = "avg_pool2d_bwd_cuda";
  PK_CHECK_CUDA("avg_pool2d_bwd_cuda", grad_out);
  check_grad_out(fn, grad_out, in_size);
  const auto axes = pool_axes(fn, in_size, {grad_out.size(2), grad_out.size(3)}, kernel, stride,
                              padding, {1, 1}, adaptive);
  const AvgRule rule{count_include_pad, divisor_override};
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t N = grad_out.size(0), C = grad_out.size(1);
  at::Tensor grad_in = at::empty({N, C, in_size[0], in_size[1]},
                                 grad_out.options().memory_format(pool_format(channels_last)));
  const int64_t total = grad_in.numel();
  if (total == 0) return grad_in;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison_output(grad_in, stream);
  const int64_t blocks = pool_blocks(total);
  const Strides4 gs = strides4(grad_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "avg_pool2d_bwd_cuda", [&] {
    const auto* g = grad_out.const_data_ptr<scalar_t>();
    auto* d = grad_in.data_ptr<scalar_t>();
    if (channels_last) {
      // A thread per input element, consecutive threads along c; grid-stride over N*H*W*C.
      avg_pool2d_bwd_kernel_nhwc<scalar_t><<<blocks, kPoolThreads, 0, stream>>>(
          g, d, total, C, gs, axes[0], axes[1], rule);
    } else {
      // A thread per input element, consecutive threads along w; grid-stride over N*C*H*W.
      avg_pool2d_bwd_kernel_nchw<scalar_t><<<blocks, kPoolThreads, 0, stream>>>(
          g, d, total, C, gs, axes[0], axes[1], rule);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
}

}  // namespace pykern
