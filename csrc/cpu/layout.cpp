// Layout family, CPU reference: out = x.permute(perm).contiguous() for NCHW <-> NHWC (and any
// other permutation). CUDA twin: csrc/cuda/layout.cu; Triton twin: triton_kernels/layout.py.
// All three execute the PermutePlan of common/index.h.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/index.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

constexpr int64_t kTileEdge = 32;
constexpr int64_t kTileElems = 1024;  // 4 KiB of float: input and output tiles stay in L1
constexpr int64_t kParallelGrain = 1 << 15;  // below this many elements one thread is faster

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Input walks rows fastest: copy tiles, reading down columns of the input, writing along rows
// of the output. Tiles are 32x32, stretched along the other dim when rows or cols is short
// (C=3 images): a 512x2 tile, not 32x2, keeps the per-tile overhead small.
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
    const int64_t r0 = row_tile * tile_rows, r1 = std::min(r0 + tile_rows, p.rows);
    const int64_t c0 = col_tile * tile_cols, c1 = std::min(c0 + tile_cols, p.cols);
    const T* src = in + base.in;
    T* dst = out + base.out;
    for (int64_t r = r0; r < r1; ++r) {
      const T* src_row = src + r * p.row_in;
      T* dst_row = dst + r * p.row_out;
      for (int64_t c = c0; c < c1; ++c) dst_row[c] = src_row[c * p.col_in];
    }
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
