// Pooling family, CUDA. Twin of csrc/cpu/pooling.cpp: a (B, R, K) strided view reduced over R
// into a contiguous (B, K) (mean, or max with torch's index rule), and its backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "common/checks.h"
#include "common/poison.h"
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

std::tuple<at::Tensor, at::Tensor> pool_reduce_fwd_cuda(const at::Tensor& x, bool is_max) {
  PK_CHECK_CUDA("pool_reduce_fwd_cuda", x);
  PK_CHECK_VALUE(x.dim() == 3, "pool_reduce_fwd_cuda: x must be a (B, R, K) view, got ", x.dim(),
                 "D");
  PK_CHECK_VALUE(x.size(1) > 0, "pool_reduce_fwd_cuda: nothing to pool over (R = 0)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), R = x.size(1), K = x.size(2);
  at::Tensor out = at::empty({B, K}, x.options());
  at::Tensor indices = at::empty({is_max ? B : 0, K}, x.options().dtype(at::kLong));
  if (out.numel() == 0) return {out, indices};
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
  return {out, indices};
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

}  // namespace pykern
