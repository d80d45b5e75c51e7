// Layout family, CUDA: out = x.permute(perm).contiguous(). Twin of csrc/cpu/layout.cpp; both
// execute the PermutePlan of common/index.h (batch x rows x cols, 64-bit offsets).
//
// Only ATen's narrow headers here (no <torch/extension.h>): this file compiles in seconds.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/index.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

constexpr int kTile = 32;          // tile edge, elements
constexpr int kTileRowsPerPass = 8;  // block is kTile x 8 threads; each thread moves 4 elements
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest
constexpr int64_t kMinTileSide = 8;  // below this, tiles waste threads: go elementwise

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The input walks rows fastest, the output cols: stage a kTile x kTile tile in shared memory
// so that reads (threadIdx.x along rows) and writes (threadIdx.x along cols) both coalesce.
// One block per tile, grid-stride over batch x row tiles x col tiles.
template <typename T>
__global__ void permute_copy_kernel_transposed(const T* __restrict__ in, T* __restrict__ out,
                                               const PermutePlan p, const int64_t row_tiles,
                                               const int64_t col_tiles) {
  __shared__ T tile[kTile][kTile + 1];  // +1: column reads hit different banks
  const int64_t tiles = p.batch_count * row_tiles * col_tiles;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t col_tile = t % col_tiles;
    const int64_t row_tile = (t / col_tiles) % row_tiles;
    const BatchOffsets base = batch_offsets(p, t / (col_tiles * row_tiles));
    const int64_t r0 = row_tile * kTile, c0 = col_tile * kTile;
    {
      const int64_t r = r0 + threadIdx.x;
      for (int j = threadIdx.y; j < kTile; j += kTileRowsPerPass) {
        const int64_t c = c0 + j;
        if (r < p.rows && c < p.cols) tile[j][threadIdx.x] = in[base.in + r * p.row_in + c * p.col_in];
      }
    }
    __syncthreads();
    {
      const int64_t c = c0 + threadIdx.x;
      for (int j = threadIdx.y; j < kTile; j += kTileRowsPerPass) {
        const int64_t r = r0 + j;
        if (r < p.rows && c < p.cols) out[base.out + r * p.row_out + c] = tile[threadIdx.x][j];
      }
    }
    __syncthreads();  // the tile is reused by the next iteration
  }
}

// One thread per output element, in output order: for plans where the input walks cols fastest
// too (plain row copies), and for transposes with a short side (C=3 images), where a 32x32
// tile would leave most threads idle while a warp's reads still land in a few segments.
template <typename T>
__global__ void permute_copy_kernel_elementwise(const T* __restrict__ in, T* __restrict__ out,
                                                const PermutePlan p) {
  const int64_t total = p.batch_count * p.rows * p.cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t c = i % p.cols;
    const int64_t rb = i / p.cols;
    const int64_t r = rb % p.rows;
    const BatchOffsets base = batch_offsets(p, rb / p.rows);
    out[base.out + r * p.row_out + c] = in[base.in + r * p.row_in + c * p.col_in];
  }
}

// A row-copy plan moving `factor` elements of the original type as one wider element: valid when the
// rows are unit-stride and every stride and base address is a multiple of the factor.
bool widen_rows_plan(PermutePlan& p, int64_t factor, const void* in, const void* out,
                     int64_t elem_bytes) {
  const auto aligned = [&](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % (factor * elem_bytes) == 0;
  };
  if (p.col_in != 1 || p.cols % factor != 0 || !aligned(in) || !aligned(out)) return false;
  if (p.row_in % factor != 0 || p.row_out % factor != 0) return false;
  for (int d = 0; d < p.nbatch; ++d) {
    if (p.batch_in[d] % factor != 0 || p.batch_out[d] % factor != 0) return false;
  }
  p.cols /= factor;
  p.row_in /= factor;
  p.row_out /= factor;
  for (int d = 0; d < p.nbatch; ++d) {
    p.batch_in[d] /= factor;
    p.batch_out[d] /= factor;
  }
  return true;
}

template <typename T>
void launch_elementwise(const void* in, void* out, const PermutePlan& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = p.batch_count * p.rows * p.cols;
  const int64_t blocks = std::min(ceil_div(total, kThreads), kMaxBlocks);
  permute_copy_kernel_elementwise<T><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(in), static_cast<T*>(out), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor permute_copy_cuda(const at::Tensor& x, const std::vector<int64_t>& perm) {
  PK_CHECK_CUDA("permute_copy_cuda", x);
  PermutePlan plan = make_permute_plan(x.sizes().vec(), x.strides().vec(), perm);
  std::vector<int64_t> out_sizes;
  for (int64_t p : perm) out_sizes.push_back(x.size(p));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(out_sizes, x.options());
  if (plan.numel == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (poison_outputs()) {
    C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0xFF, out.nbytes(), stream));
  }
  const void* in = x.const_data_ptr();
  void* dst = out.data_ptr();
  const int64_t elem_bytes = x.element_size();

  if (!plan.transposed()) {
    // Wide loads: 16-byte elements where alignment allows, else the element's own width.
    const int64_t factor = 16 / std::min<int64_t>(elem_bytes, 16);
    if (factor > 1 && widen_rows_plan(plan, factor, in, dst, elem_bytes)) {
      launch_elementwise<Bytes16>(in, dst, plan, stream);
      return out;
    }
  }
  if (!plan.transposed() || std::min(plan.rows, plan.cols) < kMinTileSide) {
    PK_DISPATCH_BY_ELEMENT_SIZE("permute_copy_cuda", elem_bytes,
                                [&] { launch_elementwise<scalar_t>(in, dst, plan, stream); });
    return out;
  }

  const int64_t row_tiles = ceil_div(plan.rows, kTile);
  const int64_t col_tiles = ceil_div(plan.cols, kTile);
  const int64_t blocks = std::min(plan.batch_count * row_tiles * col_tiles, kMaxBlocks);
  const dim3 threads(kTile, kTileRowsPerPass);
  PK_DISPATCH_BY_ELEMENT_SIZE("permute_copy_cuda", elem_bytes, [&] {
    permute_copy_kernel_transposed<scalar_t><<<blocks, threads, 0, stream>>>(
        static_cast<const scalar_t*>(in), static_cast<scalar_t*>(dst), plan, row_tiles,
        col_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace pykern
