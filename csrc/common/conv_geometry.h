// The geometry of one conv2d, shared by the CPU and CUDA convolution kernels (csrc/cpu/conv.cpp,
// csrc/cuda/conv.cu; triton_kernels/conv.py spells out the same rules): sizes, window, groups
// and the output size, checked once on the host. A plain struct, passed by value to CUDA kernels.
//
// conv_transpose2d is the transpose of a conv2d: its ops build the geometry of that conv2d
// (input = the transposed conv's output).
#pragma once

#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/host_device.h"

namespace pykern {

struct ConvGeometry {
  int64_t N, C, H, W;  // input images
  int64_t K, R, S;     // weight (K, C / groups, R, S)
  int64_t Ho, Wo;      // output images
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t groups, Cg, Kg;  // Cg = C / groups input and Kg = K / groups output channels a group
  // The column matrix: L = Ho * Wo output pixels of an image, CRS = C * R * S entries per pixel
  // (CgRS = Cg * R * S of them a group).
  int64_t L, CRS, CgRS;

  PK_HOST_DEVICE int64_t taps() const { return R * S; }
  // 1x1, stride 1, no padding: the columns are the image itself.
  PK_HOST_DEVICE bool im2col_is_identity() const {
    return R == 1 && S == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  }
};

inline void check_conv_pair(const char* fn, const char* name, const std::vector<int64_t>& v,
                            int64_t lo) {
  PK_CHECK_VALUE(v.size() == 2, fn, ": ", name, " must be an (H, W) pair, got ", v.size(),
                 " values");
  PK_CHECK_VALUE(v[0] >= lo && v[1] >= lo, fn, ": ", name, " must be >= ", lo, ", got (", v[0],
                 ", ", v[1], ")");
}

// Checks the window arguments and the shapes that must agree, and derives the output size.
inline ConvGeometry make_conv_geometry(const char* fn, int64_t N, int64_t C, int64_t H, int64_t W,
                                       int64_t K, int64_t R, int64_t S,
                                       const std::vector<int64_t>& stride,
                                       const std::vector<int64_t>& padding,
                                       const std::vector<int64_t>& dilation, int64_t groups) {
  check_conv_pair(fn, "stride", stride, 1);
  check_conv_pair(fn, "padding", padding, 0);
  check_conv_pair(fn, "dilation", dilation, 1);
  PK_CHECK_VALUE(groups >= 1 && C % groups == 0 && K % groups == 0, fn, ": groups (", groups,
                 ") must divide the input channels (", C, ") and the output channels (", K, ")");
  PK_CHECK_VALUE(R >= 1 && S >= 1, fn, ": kernel size must be positive, got (", R, ", ", S, ")");
  ConvGeometry g{};
  g.N = N, g.C = C, g.H = H, g.W = W, g.K = K, g.R = R, g.S = S;
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1];
  g.dh = dilation[0], g.dw = dilation[1];
  g.groups = groups, g.Cg = C / groups, g.Kg = K / groups;
  PK_CHECK_VALUE(H + 2 * g.ph >= g.dh * (R - 1) + 1 && W + 2 * g.pw >= g.dw * (S - 1) + 1, fn,
                 ": the dilated kernel (", g.dh * (R - 1) + 1, ", ", g.dw * (S - 1) + 1,
                 ") is larger than the padded input (", H + 2 * g.ph, ", ", W + 2 * g.pw, ")");
  g.Ho = (H + 2 * g.ph - g.dh * (R - 1) - 1) / g.sh + 1;
  g.Wo = (W + 2 * g.pw - g.dw * (S - 1) - 1) / g.sw + 1;
  g.L = g.Ho * g.Wo;
  g.CRS = C * R * S;
  g.CgRS = g.Cg * R * S;
  return g;
}

}  // namespace pykern
