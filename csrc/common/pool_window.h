// Pooling windows along one spatial axis, shared by the CPU and CUDA kernels of max_pool2d,
// avg_pool2d and their adaptive forms (triton_kernels/pooling.py spells out the same rules).
//
// Output index o of an axis with input size `in` and output size `out` reads input positions:
//   strided:  start = o * stride - pad, then `kernel` taps `dilation` apart, those in [0, in)
//   adaptive: [floor(o * in / out), ceil((o + 1) * in / out)), every position (dilation 1)
// pykern/ops/pooling.py computes the output sizes (ceil_mode included); kernels only read them.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/host_device.h"

namespace pykern {

struct PoolAxis {
  int64_t in, out;                      // input and output sizes
  int64_t kernel, stride, pad, dilation;  // ignored when adaptive
  bool adaptive;
};

// The taps of output o that fall inside the input: positions first, first + step, ... < end.
struct Taps {
  int64_t first, end, step;
};

PK_HOST_DEVICE int64_t adaptive_start(int64_t o, int64_t in, int64_t out) { return o * in / out; }
PK_HOST_DEVICE int64_t adaptive_end(int64_t o, int64_t in, int64_t out) {
  return ((o + 1) * in + out - 1) / out;
}

PK_HOST_DEVICE Taps taps_of(const PoolAxis& a, int64_t o) {
  if (a.adaptive) return {adaptive_start(o, a.in, a.out), adaptive_end(o, a.in, a.out), 1};
  int64_t first = o * a.stride - a.pad;
  const int64_t end = std::min(first + (a.kernel - 1) * a.dilation + 1, a.in);
  if (first < 0) first += ((-first + a.dilation - 1) / a.dilation) * a.dilation;  // first tap >= 0
  return {first, end, a.dilation};
}

// avg_pool2d's divisor along one axis before clipping to the input (count_include_pad): the
// window clipped to the padded input [-pad, in + pad), as torch counts it.
PK_HOST_DEVICE int64_t padded_window(const PoolAxis& a, int64_t o) {
  const int64_t start = o * a.stride - a.pad;
  return std::min(start + a.kernel, a.in + a.pad) - start;
}

// The outputs whose windows may hold input position i: a contiguous range [lo, hi) that
// contains every such output (and, with dilation, maybe others: callers test membership).
struct OutRange {
  int64_t lo, hi;
};

PK_HOST_DEVICE OutRange outputs_reading(const PoolAxis& a, int64_t i) {
  if (a.adaptive) {
    return {i * a.out / a.in, std::min(((i + 1) * a.out + a.in - 1) / a.in, a.out)};
  }
  // o * stride - pad <= i  and  o * stride - pad + (kernel - 1) * dilation >= i
  const int64_t span = (a.kernel - 1) * a.dilation;
  const int64_t top = i + a.pad;  // >= 0
  const int64_t lo = top < span ? 0 : (top - span + a.stride - 1) / a.stride;
  return {lo, std::min(top / a.stride + 1, a.out)};
}

// Whether input position i is one of output o's taps.
PK_HOST_DEVICE bool tap_of(const PoolAxis& a, int64_t o, int64_t i) {
  const Taps t = taps_of(a, o);
  return i >= t.first && i < t.end && (i - t.first) % t.step == 0;
}

// The (H, W) axes of one call, from the (H, W) pairs every pooling entry point takes.
inline std::array<PoolAxis, 2> pool_axes(const char* fn, const std::vector<int64_t>& in_size,
                                         const std::vector<int64_t>& out_size,
                                         const std::vector<int64_t>& kernel,
                                         const std::vector<int64_t>& stride,
                                         const std::vector<int64_t>& padding,
                                         const std::vector<int64_t>& dilation, bool adaptive) {
  for (const auto* v : {&in_size, &out_size, &kernel, &stride, &padding, &dilation}) {
    PK_CHECK_VALUE(v->size() == 2, fn, ": window arguments must be (H, W) pairs");
  }
  std::array<PoolAxis, 2> axes;
  for (int d = 0; d < 2; ++d) {
    axes[d] = {in_size[d], out_size[d], kernel[d], stride[d], padding[d], dilation[d], adaptive};
    PK_CHECK_VALUE(adaptive || (kernel[d] > 0 && stride[d] > 0 && dilation[d] > 0 &&
                                padding[d] >= 0),
                   fn, ": kernel, stride and dilation must be positive and padding >= 0");
    PK_CHECK_VALUE(!adaptive || (in_size[d] > 0 || out_size[d] == 0), fn,
                   ": adaptive pooling of an empty input");
  }
  return axes;
}

}  // namespace pykern
