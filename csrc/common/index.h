// 64-bit index helpers and the plan every layout kernel (CPU, CUDA, Triton) executes.
//
// out = x.permute(perm).contiguous() is reduced once, on the host, to a batched 2D tile copy:
//   out[b, r, c] = x[b, r, c]  over  batch dims (outermost) x rows x cols,
// where cols is the output's last (unit-stride) dim and rows is the dim the input walks
// fastest. Adjacent dims that are contiguous in the input are merged first and size-1 dims
// dropped, so an NCHW -> NHWC copy becomes (N) x (H*W rows, input stride 1) x (C cols).
// Then a tile that reads along rows and writes along cols is coalesced on both sides.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "common/checks.h"

namespace pykern {

constexpr int kMaxBatchDims = 6;

struct PermutePlan {
  int nbatch = 0;                            // batch dims, outermost first
  int64_t batch_size[kMaxBatchDims] = {};    // each > 1
  int64_t batch_in[kMaxBatchDims] = {};      // input stride (elements)
  int64_t batch_out[kMaxBatchDims] = {};     // output stride (elements)
  int64_t batch_count = 1;                   // product of batch_size
  int64_t rows = 1, row_in = 0, row_out = 0;  // the tile's row dim
  int64_t cols = 1, col_in = 0;               // the output's last dim (output stride 1)
  int64_t numel = 0;
  // True when the input's fastest dim is `rows`: the kernel must transpose through a tile.
  // Otherwise rows of `cols` elements are copied as they are.
  bool transposed() const { return rows > 1 && std::llabs(row_in) < std::llabs(col_in); }
};

inline PermutePlan make_permute_plan(const std::vector<int64_t>& sizes,
                                     const std::vector<int64_t>& strides,
                                     const std::vector<int64_t>& perm) {
  const int64_t ndim = static_cast<int64_t>(sizes.size());
  PK_CHECK_VALUE(static_cast<int64_t>(perm.size()) == ndim, "permute_copy: perm has ",
                 perm.size(), " entries for a tensor of ", ndim, " dimensions");
  std::vector<bool> seen(ndim, false);
  for (int64_t p : perm) {
    PK_CHECK_VALUE(p >= 0 && p < ndim && !seen[p], "permute_copy: perm must be a permutation of 0..",
                   ndim - 1);
    seen[p] = true;
  }

  PermutePlan plan;
  plan.numel = 1;
  for (int64_t s : sizes) plan.numel *= s;

  // Output-order dims, size-1 dims dropped; output strides are the contiguous ones.
  std::vector<int64_t> size, in;
  for (int64_t p : perm) {
    if (sizes[p] != 1) {
      size.push_back(sizes[p]);
      in.push_back(strides[p]);
    }
  }
  // Merge d into d-1 where the input already has them contiguous (one longer dim).
  std::vector<int64_t> msize, min;
  for (size_t d = 0; d < size.size(); ++d) {
    if (!msize.empty() && min.back() == in[d] * size[d]) {
      msize.back() *= size[d];
      min.back() = in[d];
    } else {
      msize.push_back(size[d]);
      min.push_back(in[d]);
    }
  }
  const int nd = static_cast<int>(msize.size());
  if (nd == 0 || plan.numel == 0) return plan;  // a single element, or nothing to copy

  std::vector<int64_t> out(nd);
  int64_t stride = 1;
  for (int d = nd - 1; d >= 0; --d) {
    out[d] = stride;
    stride *= msize[d];
  }

  const int col = nd - 1;
  plan.cols = msize[col];
  plan.col_in = min[col];
  int row = -1;
  if (nd >= 2) {
    // The row dim is the input's fastest among the rest; if the cols dim is already the
    // fastest, the dim just outside it (rows of cols are then plain copies).
    row = nd - 2;
    for (int d = 0; d < nd - 1; ++d) {
      if (std::llabs(min[d]) < std::llabs(min[row])) row = d;
    }
    if (std::llabs(min[col]) <= std::llabs(min[row])) row = nd - 2;
    plan.rows = msize[row];
    plan.row_in = min[row];
    plan.row_out = out[row];
  }
  for (int d = 0; d < nd - 1; ++d) {
    if (d == row) continue;
    PK_CHECK_VALUE(plan.nbatch < kMaxBatchDims, "permute_copy: the input's strides leave more than ",
                   kMaxBatchDims + 2, " dimensions that cannot be merged");
    plan.batch_size[plan.nbatch] = msize[d];
    plan.batch_in[plan.nbatch] = min[d];
    plan.batch_out[plan.nbatch] = out[d];
    plan.batch_count *= msize[d];
    ++plan.nbatch;
  }
  return plan;
}

// Input and output offsets (elements, 64-bit) of batch index b.
struct BatchOffsets {
  int64_t in = 0, out = 0;
};

#if defined(__CUDACC__)
__host__ __device__
#endif
inline BatchOffsets batch_offsets(const PermutePlan& plan, int64_t b) {
  BatchOffsets o;
  for (int d = plan.nbatch - 1; d >= 0; --d) {
    const int64_t i = b % plan.batch_size[d];
    b /= plan.batch_size[d];
    o.in += i * plan.batch_in[d];
    o.out += i * plan.batch_out[d];
  }
  return o;
}

}  // namespace pykern
