// Convolution family, CUDA. Twin of csrc/cpu/conv.cpp (Triton twin: triton_kernels/conv.py):
// im2col / col2im kernels of our own and cuBLAS GEMMs through ATen, one GEMM per group.
//
// Column layouts for a chunk of nc images (L = Ho * Wo, CRS = C * R * S, CgRS = Cg * R * S):
//   NCHW: cols (nc, CRS, L), rows ordered (c, r, s). Group g is the row block
//     [g * CgRS, (g + 1) * CgRS); y_n[g] = W_g (Kg, CgRS) @ cols_n[g] is one batched GEMM over
//     the images (the weight repeated with batch stride 0). bwd_weight uses (CRS, nc, L)
//     instead, so that one GEMM also sums over the images.
//   NHWC: cols (nc * L, CRS), columns ordered (g, r, s, cg): group g is a column block whose
//     (r, s, cg) order is the channels_last weight's memory, so y (nc * L, K) = cols @ W^T is
//     NHWC output directly.
// A pointwise conv (1x1, stride 1, padding 0) needs no columns: x itself is the column matrix
// in both layouts (and dx the one bwd_input's GEMM writes).
//
// Batches are processed in chunks of images whose column buffer fits workspace_bytes (at least
// one image per chunk); the buffer is allocated once per call and reused by every chunk.
// col2im is a gather per input element, so dx is deterministic; bwd_weight accumulates the
// chunks with GEMMs in chunk order (deterministic for a given cuBLAS algorithm).
//
// Depthwise convs (Cg == 1) and the ops of a depthwise conv_transpose2d (Kg == 1, Cg small)
// skip columns and GEMMs: direct kernels (direct_conv) compute each element from the image, the
// weight gradient as per-block partials over pieces of pixels summed in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/conv_geometry.h"
#include "common/cuda_divmod.h"
#include "common/dispatch.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

#define PK_GRID_STRIDE_LOOP(i, total)                                                      \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (total); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// im2col, NCHW: cols[n * image_stride + row * row_stride + l] for image n of the chunk, row
// (c, r, s), output position l = ho * Wo + wo; x at the tap, or 0 in the padding. A thread per
// column element, consecutive threads along l (coalesced writes). Byte copies: scalar_t is a
// storage type of the element's width, whose zero is +0.0 in every float format.
template <typename scalar_t>
__global__ void im2col_nchw_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ cols,
                                   int64_t total, ConvGeometry g, int64_t image_stride,
                                   int64_t row_stride) {
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * CRS + row) * Ho + ho) * Wo + wo
    const DivMod a = divmod(i, g.Wo);     // a.r = wo
    const DivMod b = divmod(a.q, g.Ho);   // b.r = ho
    const DivMod t = divmod(b.q, g.CRS);  // t.r = row, t.q = n
    const DivMod u = divmod(t.r, g.S);    // u.r = s
    const DivMod v = divmod(u.q, g.R);    // v.r = r, v.q = c
    const int64_t h = b.r * g.sh - g.ph + v.r * g.dh;
    const int64_t w = a.r * g.sw - g.pw + u.r * g.dw;
    const bool inside = h >= 0 && h < g.H && w >= 0 && w < g.W;
    cols[t.q * image_stride + t.r * row_stride + b.r * g.Wo + a.r] =
        inside ? x[((t.q * g.C + v.q) * g.H + h) * g.W + w] : scalar_t{};
  }
}

// im2col, NHWC: cols[(n * L + l) * CRS + col] with col = ((grp * R + r) * S + s) * Cg + cg.
// A thread per column element, consecutive threads along cg (coalesced on both sides).
template <typename scalar_t>
__global__ void im2col_nhwc_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ cols,
                                   int64_t total, ConvGeometry g) {
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * Ho + ho) * Wo + wo) * CRS + col
    const DivMod a = divmod(i, g.CRS);   // a.r = col
    const DivMod b = divmod(a.q, g.Wo);  // b.r = wo
    const DivMod c = divmod(b.q, g.Ho);  // c.r = ho, c.q = n
    const DivMod d = divmod(a.r, g.Cg);  // d.r = cg
    const DivMod e = divmod(d.q, g.S);   // e.r = s
    const DivMod f = divmod(e.q, g.R);   // f.r = r, f.q = grp
    const int64_t h = c.r * g.sh - g.ph + f.r * g.dh;
    const int64_t w = b.r * g.sw - g.pw + e.r * g.dw;
    const bool inside = h >= 0 && h < g.H && w >= 0 && w < g.W;
    cols[i] = inside ? x[((c.q * g.H + h) * g.W + w) * g.C + f.q * g.Cg + d.r] : scalar_t{};
  }
}

// Output coordinate that reads image coordinate x through tap t on one axis (x = o * s - p +
// t * d), or -1 when none does.
__device__ __forceinline__ int64_t reader_of(int64_t x, int64_t t, int64_t s, int64_t p,
                                             int64_t d, int64_t out) {
  const int64_t shifted = x + p - t * d;
  if (shifted < 0) return -1;
  const DivMod q = divmod(shifted, s);
  return q.r == 0 && q.q < out ? q.q : -1;
}

// col2im, NCHW, cols (nc, CRS, L): dx[i] for image element i = (n, c, h, w) of the chunk sums,
// in (r, s) order, the column entries of the taps that read it, plus bias[c] when given. A
// thread per dx element, consecutive threads along w; every element is written.
template <typename scalar_t>
__global__ void col2im_nchw_kernel(const scalar_t* __restrict__ cols,
                                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ dx,
                                   int64_t total, ConvGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * C + c) * H + h) * W + w
    const DivMod a = divmod(i, g.W);    // a.r = w
    const DivMod b = divmod(a.q, g.H);  // b.r = h
    const DivMod c = divmod(b.q, g.C);  // c.r = channel, c.q = n
    const scalar_t* image = cols + c.q * g.CRS * g.L;
    acc_t sum = bias != nullptr ? static_cast<acc_t>(bias[c.r]) : acc_t(0);
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t ho = reader_of(b.r, r, g.sh, g.ph, g.dh, g.Ho);
      if (ho < 0) continue;
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t wo = reader_of(a.r, s, g.sw, g.pw, g.dw, g.Wo);
        if (wo < 0) continue;
        sum += static_cast<acc_t>(image[((c.r * g.R + r) * g.S + s) * g.L + ho * g.Wo + wo]);
      }
    }
    dx[i] = static_cast<scalar_t>(sum);
  }
}

// col2im, NHWC, cols (nc * L, CRS) as im2col_nhwc_kernel writes them: dx[i] for image element
// i = (n, h, w, c) of the chunk, as col2im_nchw_kernel. Consecutive threads along c.
template <typename scalar_t>
__global__ void col2im_nhwc_kernel(const scalar_t* __restrict__ cols,
                                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ dx,
                                   int64_t total, ConvGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  PK_GRID_STRIDE_LOOP(i, total) {  // i = ((n * H + h) * W + w) * C + c
    const DivMod a = divmod(i, g.C);     // a.r = c
    const DivMod b = divmod(a.q, g.W);   // b.r = w
    const DivMod d = divmod(b.q, g.H);   // d.r = h, d.q = n
    const DivMod e = divmod(a.r, g.Cg);  // e.q = group, e.r = cg
    // Column (group, r, s, cg) of row n * L + l is at base + (n * L + l) * CRS + (r * S + s) * Cg.
    const scalar_t* base = cols + e.q * g.CgRS + e.r;
    acc_t sum = bias != nullptr ? static_cast<acc_t>(bias[a.r]) : acc_t(0);
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t ho = reader_of(d.r, r, g.sh, g.ph, g.dh, g.Ho);
      if (ho < 0) continue;
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t wo = reader_of(b.r, s, g.sw, g.pw, g.dw, g.Wo);
        if (wo < 0) continue;
        const int64_t row = d.q * g.L + ho * g.Wo + wo;
        sum += static_cast<acc_t>(base[row * g.CRS + (r * g.S + s) * g.Cg]);
      }
    }
    dx[i] = static_cast<scalar_t>(sum);
  }
}

// Direct kernels. A depthwise conv (Cg == 1, Kg = the multiplier m) and the three ops of a
// depthwise conv_transpose2d (weight (C, m, R, S): Kg == 1, Cg = m) reduce over at most a few
// channels, so their per-group GEMMs are slivers and the columns cost more than the math: these
// kernels compute each element directly from the image, in either layout. A thread per output
// element (consecutive threads along w in NCHW, along c in NHWC: coalesced); the weights, read
// by many threads, through the read-only cache.

// Offset of element (n, c, h, w) of an (N, C, H, W) image, NHWC in memory when kChannelsLast.
template <bool kChannelsLast>
__device__ __forceinline__ int64_t image_offset(int64_t n, int64_t c, int64_t h, int64_t w,
                                                int64_t C, int64_t H, int64_t W) {
  return kChannelsLast ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

struct ImageCoord {
  int64_t n, c, h, w;
};

// The inverse of image_offset: (n, c, h, w) of element i.
template <bool kChannelsLast>
__device__ __forceinline__ ImageCoord image_coord(int64_t i, int64_t C, int64_t H, int64_t W) {
  if (kChannelsLast) {
    const DivMod a = divmod(i, C);    // a.r = c
    const DivMod b = divmod(a.q, W);  // b.r = w
    const DivMod d = divmod(b.q, H);  // d.r = h, d.q = n
    return {d.q, a.r, d.r, b.r};
  }
  const DivMod a = divmod(i, W);    // a.r = w
  const DivMod b = divmod(a.q, H);  // b.r = h
  const DivMod d = divmod(b.q, C);  // d.r = c, d.q = n
  return {d.q, d.r, b.r, a.r};
}

// Offset of w[k, cg, r, s] of a (K, Cg, R, S) weight, (K, R, S, Cg) in memory when kChannelsLast.
template <bool kChannelsLast>
__device__ __forceinline__ int64_t weight_offset(int64_t k, int64_t cg, int64_t r, int64_t s,
                                                 const ConvGeometry& g) {
  return kChannelsLast ? ((k * g.R + r) * g.S + s) * g.Cg + cg
                       : ((k * g.Cg + cg) * g.R + r) * g.S + s;
}

// *p through the read-only data cache (__ldg has no overload for c10's 16-bit types: load
// their bits).
template <typename scalar_t>
__device__ __forceinline__ scalar_t load_readonly(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    return scalar_t(__ldg(reinterpret_cast<const unsigned short*>(p)), scalar_t::from_bits());
  } else {
    return __ldg(p);
  }
}

// y[n, k, p, q] = bias[k] + sum over (cg, r, s) of w[k, cg, r, s]
//     * x[n, (k / Kg) * Cg + cg, p * sh - ph + r * dh, q * sw - pw + s * dw]; taps in the padding
// add nothing.
template <typename scalar_t, bool kChannelsLast>
__global__ void direct_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                  const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                                  int64_t total, ConvGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  PK_GRID_STRIDE_LOOP(i, total) {
    const ImageCoord o = image_coord<kChannelsLast>(i, g.K, g.Ho, g.Wo);  // (n, k, p, q)
    const int64_t c0 = (o.c / g.Kg) * g.Cg;
    acc_t sum = bias != nullptr ? static_cast<acc_t>(load_readonly(bias + o.c)) : acc_t(0);
    for (int64_t cg = 0; cg < g.Cg; ++cg) {
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t h = o.h * g.sh - g.ph + r * g.dh;
        if (h < 0 || h >= g.H) continue;
        for (int64_t s = 0; s < g.S; ++s) {
          const int64_t col = o.w * g.sw - g.pw + s * g.dw;
          if (col < 0 || col >= g.W) continue;
          const acc_t xv = static_cast<acc_t>(
              x[image_offset<kChannelsLast>(o.n, c0 + cg, h, col, g.C, g.H, g.W)]);
          const acc_t wv =
              static_cast<acc_t>(load_readonly(w + weight_offset<kChannelsLast>(o.c, cg, r, s, g)));
          sum += xv * wv;
        }
      }
    }
    y[i] = static_cast<scalar_t>(sum);
  }
}

// dx[n, c, i, j] = bias[c] + sum over the Kg output channels k of c's group and the taps (r, s)
// whose output (ho, wo) reads (i, j) (reader_of) of dy[n, k, ho, wo] * w[k, c % Cg, r, s]: a
// gather, every dx element written once by its own thread (no atomics).
template <typename scalar_t, bool kChannelsLast>
__global__ void direct_bwd_input_kernel(const scalar_t* __restrict__ dy,
                                        const scalar_t* __restrict__ w,
                                        const scalar_t* __restrict__ bias,
                                        scalar_t* __restrict__ dx, int64_t total, ConvGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  PK_GRID_STRIDE_LOOP(i, total) {
    const ImageCoord e = image_coord<kChannelsLast>(i, g.C, g.H, g.W);
    const DivMod grp = divmod(e.c, g.Cg);  // grp.q = group, grp.r = cg
    acc_t sum = bias != nullptr ? static_cast<acc_t>(load_readonly(bias + e.c)) : acc_t(0);
    for (int64_t j = 0; j < g.Kg; ++j) {
      const int64_t k = grp.q * g.Kg + j;
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t ho = reader_of(e.h, r, g.sh, g.ph, g.dh, g.Ho);
        if (ho < 0) continue;
        for (int64_t s = 0; s < g.S; ++s) {
          const int64_t wo = reader_of(e.w, s, g.sw, g.pw, g.dw, g.Wo);
          if (wo < 0) continue;
          const acc_t dyv =
              static_cast<acc_t>(dy[image_offset<kChannelsLast>(e.n, k, ho, wo, g.K, g.Ho, g.Wo)]);
          const acc_t wv = static_cast<acc_t>(
              load_readonly(w + weight_offset<kChannelsLast>(k, grp.r, r, s, g)));
          sum += dyv * wv;
        }
      }
    }
    dx[i] = static_cast<scalar_t>(sum);
  }
}

// Threads of a direct_bwd_weight_kernel block: kLanesK output channels (threadIdx.x) by
// kLanesP pixel lanes (threadIdx.y). NHWC: 32 channels, contiguous in memory; NCHW: one channel,
// whose pixels are contiguous.
template <bool kChannelsLast>
struct WeightGradLanes {
  static constexpr int kLanesK = kChannelsLast ? 32 : 1;
  static constexpr int kLanesP = kThreads / kLanesK;
};

// Partial weight gradients: part[piece][o] for element o (in dw's memory order) of
// dw[k, cg, r, s] = sum over pixels (n, p, q) of dy[n, k, p, q]
//     * x[n, (k / Kg) * Cg + cg, p * sh - ph + r * dh, q * sw - pw + s * dw],
// over the pixels [piece * chunk, (piece + 1) * chunk) of all N * Ho * Wo (blockIdx.y = piece).
// blockIdx.x = ((k tile * Cg + cg) * R + r) * S + s. Each thread sums its pixel lane in order,
// then the block adds its lanes in a fixed tree: deterministic, no atomics.
template <typename scalar_t, bool kChannelsLast>
__global__ void direct_bwd_weight_kernel(const scalar_t* __restrict__ dy,
                                         const scalar_t* __restrict__ x,
                                         at::opmath_type<scalar_t>* __restrict__ part,
                                         int64_t pixels, int64_t chunk, ConvGeometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  using Lanes = WeightGradLanes<kChannelsLast>;
  __shared__ acc_t lanes[Lanes::kLanesP][Lanes::kLanesK];
  const DivMod a = divmod(blockIdx.x, g.S);  // a.r = s
  const DivMod b = divmod(a.q, g.R);         // b.r = r
  const DivMod d = divmod(b.q, g.Cg);        // d.r = cg, d.q = k tile
  const int64_t k = d.q * Lanes::kLanesK + threadIdx.x;
  const int64_t c = (k / g.Kg) * g.Cg + d.r;
  const int64_t begin = blockIdx.y * chunk;
  const int64_t end = std::min(begin + chunk, pixels);
  acc_t sum = 0;
  if (k < g.K) {
    for (int64_t pix = begin + threadIdx.y; pix < end; pix += Lanes::kLanesP) {
      const DivMod u = divmod(pix, g.Wo);  // u.r = q
      const DivMod v = divmod(u.q, g.Ho);  // v.r = p, v.q = n
      const int64_t h = v.r * g.sh - g.ph + b.r * g.dh;
      const int64_t col = u.r * g.sw - g.pw + a.r * g.dw;
      if (h < 0 || h >= g.H || col < 0 || col >= g.W) continue;
      const acc_t dyv =
          static_cast<acc_t>(dy[image_offset<kChannelsLast>(v.q, k, v.r, u.r, g.K, g.Ho, g.Wo)]);
      const acc_t xv =
          static_cast<acc_t>(x[image_offset<kChannelsLast>(v.q, c, h, col, g.C, g.H, g.W)]);
      sum += dyv * xv;
    }
  }
  lanes[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  for (int half = Lanes::kLanesP / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
      lanes[threadIdx.y][threadIdx.x] += lanes[threadIdx.y + half][threadIdx.x];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && k < g.K) {
    part[blockIdx.y * g.K * g.CgRS + weight_offset<kChannelsLast>(k, d.r, b.r, a.r, g)] =
        lanes[0][threadIdx.x];
  }
}

// dw[o] = sum over pieces of part[piece][o], in piece order.
template <typename scalar_t>
__global__ void sum_pieces_kernel(const at::opmath_type<scalar_t>* __restrict__ part,
                                  scalar_t* __restrict__ dw, int64_t total, int64_t pieces) {
  PK_GRID_STRIDE_LOOP(i, total) {
    at::opmath_type<scalar_t> sum = part[i];
    for (int64_t piece = 1; piece < pieces; ++piece) sum += part[piece * total + i];
    dw[i] = static_cast<scalar_t>(sum);
  }
}

#undef PK_GRID_STRIDE_LOOP

// host side

at::MemoryFormat conv_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// t is 4D, on x's device and dtype, and laid out as channels_last says.
void check_operand(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x,
                   bool channels_last) {
  PK_CHECK_VALUE(t.dim() == 4, fn, ": ", name, " must be 4D, got ", t.dim(), "D");
  PK_CHECK_VALUE(t.device() == x.device(), fn, ": ", name, " must be on ", x.device(), ", got ",
                 t.device());
  PK_CHECK_TYPE(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must be ", x.scalar_type(),
                ", got ", t.scalar_type());
  PK_CHECK_VALUE(t.is_contiguous(conv_format(channels_last)), fn, ": ", name, " must be ",
                 channels_last ? "channels_last-contiguous" : "contiguous",
                 " as channels_last=", channels_last, " says, got strides ", t.strides());
}

void check_bias(const char* fn, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                int64_t size) {
  if (!bias.has_value()) return;
  PK_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == size && bias->is_contiguous(), fn,
                 ": bias must be a contiguous vector of ", size, " entries, got sizes ",
                 bias->sizes());
  PK_CHECK_VALUE(bias->device() == x.device(), fn, ": bias must be on ", x.device());
  PK_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), fn, ": bias must be ", x.scalar_type(),
                ", got ", bias->scalar_type());
}

// Images per chunk: as many as fit the workspace, at least one.
int64_t chunk_images(int64_t bytes_per_image, int64_t N, int64_t workspace_bytes) {
  return std::clamp<int64_t>(workspace_bytes / bytes_per_image, 1, N);
}

int64_t blocks_for(int64_t total) {
  return std::min((total + kThreads - 1) / kThreads, kMaxBlocks);
}

void poison_output(const at::Tensor& t, cudaStream_t stream) {
  if (poison_outputs() && t.numel() > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0xFF, t.nbytes(), stream));
  }
}

// Matrix views of dense tensors in their memory order (both layouts keep the weight's memory
// as (K, Cg * R * S) row-major: (c, r, s) or (r, s, c) per filter).
at::Tensor matrix(const at::Tensor& t, int64_t rows, int64_t cols) {
  return t.as_strided({rows, cols}, {cols, 1});
}

// (N, C, L) view of an NCHW tensor.
at::Tensor planes(const at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1), L = t.size(2) * t.size(3);
  return t.as_strided({N, C, L}, {C * L, L, 1});
}

// Rows (N * H * W, C) view of an NHWC tensor.
at::Tensor pixels(const at::Tensor& t) {
  return matrix(t, t.size(0) * t.size(2) * t.size(3), t.size(1));
}

// im2col of images [n0, n0 + nc) of x into buffer. NCHW columns are (nc, CRS, L) when
// batch_major, else (CRS, nc, L); NHWC columns are always (nc * L, CRS).
void launch_im2col(const at::Tensor& x, int64_t n0, int64_t nc, const at::Tensor& buffer,
                   const ConvGeometry& g, bool channels_last, bool batch_major, cudaStream_t stream) {
  const int64_t total = nc * g.CRS * g.L;
  const int64_t blocks = blocks_for(total);
  const int64_t image_stride = batch_major ? g.CRS * g.L : g.L;
  const int64_t row_stride = batch_major ? g.L : nc * g.L;
  PK_DISPATCH_BY_ELEMENT_SIZE("conv2d im2col", x.element_size(), [&] {
    const auto* in = static_cast<const scalar_t*>(x.const_data_ptr()) + n0 * g.C * g.H * g.W;
    auto* out = static_cast<scalar_t*>(buffer.data_ptr());
    if (channels_last) {
      im2col_nhwc_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(in, out, total, g);
    } else {
      im2col_nchw_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(in, out, total, g,
                                                                   image_stride, row_stride);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_col2im(const at::Tensor& buffer, const std::optional<at::Tensor>& bias,
                   const at::Tensor& dx, int64_t n0, int64_t nc, const ConvGeometry& g,
                   bool channels_last, cudaStream_t stream) {
  const int64_t total = nc * g.C * g.H * g.W;
  const int64_t blocks = blocks_for(total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "conv2d col2im",
                                  [&] {
    const auto* cols = buffer.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    auto* out = dx.data_ptr<scalar_t>() + n0 * g.C * g.H * g.W;
    if (channels_last) {
      col2im_nhwc_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(cols, b, out, total, g);
    } else {
      col2im_nchw_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(cols, b, out, total, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The direct kernels serve a conv when its groups reduce over one channel, or over a few.
constexpr int64_t kDirectMaxCg = 8;

bool direct_conv(const ConvGeometry& g) { return g.Cg == 1 || (g.Kg == 1 && g.Cg <= kDirectMaxCg); }

void launch_direct_fwd(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& y,
                       const ConvGeometry& g, bool channels_last, cudaStream_t stream) {
  const int64_t total = y.numel();
  const int64_t blocks = blocks_for(total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv2d direct",
                                  [&] {
    const auto* in = x.const_data_ptr<scalar_t>();
    const auto* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    auto* out = y.data_ptr<scalar_t>();
    if (channels_last) {
      direct_fwd_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(in, w, b, out, total, g);
    } else {
      direct_fwd_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(in, w, b, out, total, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_direct_bwd_input(const at::Tensor& grad_y, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& dx,
                             const ConvGeometry& g, bool channels_last, cudaStream_t stream) {
  const int64_t total = dx.numel();
  const int64_t blocks = blocks_for(total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(),
                                  "conv2d direct bwd_input", [&] {
    const auto* dy = grad_y.const_data_ptr<scalar_t>();
    const auto* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    auto* out = dx.data_ptr<scalar_t>();
    if (channels_last) {
      direct_bwd_input_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(dy, w, b, out,
                                                                               total, g);
    } else {
      direct_bwd_input_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(dy, w, b, out,
                                                                                total, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dweight in pieces of pixels: as many blocks as fill the device (8 of kThreads per SM), each
// piece at least kMinPiecePixels, then the pieces' float partials summed in order.
void launch_direct_bwd_weight(const at::Tensor& grad_y, const at::Tensor& x,
                              const at::Tensor& dweight, const ConvGeometry& g, bool channels_last,
                              cudaStream_t stream) {
  constexpr int64_t kMinPiecePixels = 4096;
  const int64_t pixels = x.size(0) * g.L;
  const int lanes_k =
      channels_last ? WeightGradLanes<true>::kLanesK : WeightGradLanes<false>::kLanesK;
  const int64_t blocks = (g.K + lanes_k - 1) / lanes_k * g.CgRS;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t wanted = (8 * sms + blocks - 1) / blocks;
  int64_t pieces = std::clamp<int64_t>(
      std::min(wanted, (pixels + kMinPiecePixels - 1) / kMinPiecePixels), 1, 65535);
  const int64_t chunk = (pixels + pieces - 1) / pieces;
  pieces = (pixels + chunk - 1) / chunk;
  const int64_t total = dweight.numel();
  const at::Tensor part = at::empty({pieces * total},
                                    x.options().dtype(at::toOpMathType(x.scalar_type())));
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(pieces));
  const dim3 block(lanes_k, kThreads / lanes_k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "conv2d direct bwd_weight", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* dy = grad_y.const_data_ptr<scalar_t>();
    const auto* in = x.const_data_ptr<scalar_t>();
    auto* partials = part.data_ptr<acc_t>();
    if (channels_last) {
      direct_bwd_weight_kernel<scalar_t, true><<<grid, block, 0, stream>>>(dy, in, partials,
                                                                           pixels, chunk, g);
    } else {
      direct_bwd_weight_kernel<scalar_t, false><<<grid, block, 0, stream>>>(dy, in, partials,
                                                                            pixels, chunk, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_pieces_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        partials, dweight.data_ptr<scalar_t>(), total, pieces);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor conv2d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                           const std::vector<int64_t>& dilation, int64_t groups,
                           bool channels_last, int64_t workspace_bytes) {
  constexpr const char* fn = "conv2d_fwd_cuda";
  PK_CHECK_CUDA("conv2d_fwd_cuda", x);
  check_operand(fn, "x", x, x, channels_last);
  check_operand(fn, "weight", weight, x, channels_last);
  PK_CHECK_VALUE(workspace_bytes > 0, fn, ": workspace_bytes must be > 0");
  const ConvGeometry g =
      make_conv_geometry(fn, x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0),
                         weight.size(2), weight.size(3), stride, padding, dilation, groups);
  PK_CHECK_VALUE(weight.size(1) == g.Cg, fn, ": weight must have C / groups = ", g.Cg,
                 " input channels, got ", weight.size(1));
  check_bias(fn, bias, x, g.K);
  const c10::cuda::CUDAGuard guard(x.device());
  // ATen's out= GEMMs refuse operands that require grad while grad mode is on.
  const at::NoGradGuard no_grad;
  const int64_t N = x.size(0);
  at::Tensor y =
      at::empty({N, g.K, g.Ho, g.Wo}, x.options().memory_format(conv_format(channels_last)));
  if (y.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison_output(y, stream);
  if (direct_conv(g)) {
    launch_direct_fwd(x, weight, bias, y, g, channels_last, stream);
    return y;
  }

  const bool direct = g.im2col_is_identity();
  const int64_t nb =
      direct ? N : chunk_images(g.CRS * g.L * x.element_size(), N, workspace_bytes);
  const at::Tensor buffer = direct ? at::Tensor() : at::empty({nb * g.CRS * g.L}, x.options());
  const at::Tensor w = matrix(weight, g.K, g.CgRS);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nc = std::min(nb, N - n0);
    if (!direct) launch_im2col(x, n0, nc, buffer, g, channels_last, true, stream);
    if (channels_last) {
      // y (nc * L, K) = cols (nc * L, CRS) @ W^T, a GEMM per group.
      const at::Tensor cols = direct ? pixels(x).narrow(0, n0 * g.L, nc * g.L)
                                     : matrix(buffer, nc * g.L, g.CRS);
      const at::Tensor out = pixels(y).narrow(0, n0 * g.L, nc * g.L);
      for (int64_t grp = 0; grp < groups; ++grp) {
        const at::Tensor a = cols.narrow(1, grp * g.CgRS, g.CgRS);
        const at::Tensor b = w.narrow(0, grp * g.Kg, g.Kg).t();
        at::Tensor o = out.narrow(1, grp * g.Kg, g.Kg);
        if (bias.has_value()) {
          at::addmm_out(o, bias->narrow(0, grp * g.Kg, g.Kg), a, b);
        } else {
          at::mm_out(o, a, b);
        }
      }
    } else {
      // y_n (K, L) = W (K, CRS) @ cols_n (CRS, L), batched over the chunk's images per group.
      const at::Tensor cols = direct ? planes(x).narrow(0, n0, nc)
                                     : buffer.as_strided({nc, g.CRS, g.L}, {g.CRS * g.L, g.L, 1});
      const at::Tensor out = planes(y).narrow(0, n0, nc);
      for (int64_t grp = 0; grp < groups; ++grp) {
        const at::Tensor a = w.narrow(0, grp * g.Kg, g.Kg).unsqueeze(0).expand({nc, g.Kg, g.CgRS});
        const at::Tensor b = cols.narrow(1, grp * g.CgRS, g.CgRS);
        at::Tensor o = out.narrow(1, grp * g.Kg, g.Kg);
        if (bias.has_value()) {
          at::baddbmm_out(o, bias->narrow(0, grp * g.Kg, g.Kg).view({1, g.Kg, 1}), a, b);
        } else {
          at::bmm_out(o, a, b);
        }
      }
    }
  }
  return y;
}

at::Tensor conv2d_bwd_input_cuda(const at::Tensor& grad_y, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::vector<int64_t>& in_size,
                                 const std::vector<int64_t>& stride,
                                 const std::vector<int64_t>& padding,
                                 const std::vector<int64_t>& dilation, int64_t groups,
                                 bool channels_last, int64_t workspace_bytes) {
  constexpr const char* fn = "conv2d_bwd_input_cuda";
  PK_CHECK_CUDA("conv2d_bwd_input_cuda", grad_y);
  check_operand(fn, "grad_y", grad_y, grad_y, channels_last);
  check_operand(fn, "weight", weight, grad_y, channels_last);
  PK_CHECK_VALUE(workspace_bytes > 0, fn, ": workspace_bytes must be > 0");
  check_conv_pair(fn, "in_size", in_size, 1);
  const int64_t C = weight.size(1) * groups;
  const ConvGeometry g =
      make_conv_geometry(fn, grad_y.size(0), C, in_size[0], in_size[1], weight.size(0),
                         weight.size(2), weight.size(3), stride, padding, dilation, groups);
  PK_CHECK_VALUE(grad_y.size(1) == g.K && grad_y.size(2) == g.Ho && grad_y.size(3) == g.Wo, fn,
                 ": grad_y must be (N, ", g.K, ", ", g.Ho, ", ", g.Wo, "), got ", grad_y.sizes());
  check_bias(fn, bias, grad_y, C);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::NoGradGuard no_grad;  // see conv2d_fwd_cuda
  const int64_t N = grad_y.size(0);
  at::Tensor dx =
      at::empty({N, C, g.H, g.W}, grad_y.options().memory_format(conv_format(channels_last)));
  if (dx.numel() == 0) return dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison_output(dx, stream);
  if (direct_conv(g)) {
    launch_direct_bwd_input(grad_y, weight, bias, dx, g, channels_last, stream);
    return dx;
  }

  // Pointwise: the GEMM writes dx itself (with the bias); else cols, then col2im.
  const bool direct = g.im2col_is_identity();
  const int64_t nb =
      direct ? N : chunk_images(g.CRS * g.L * grad_y.element_size(), N, workspace_bytes);
  const at::Tensor buffer =
      direct ? at::Tensor() : at::empty({nb * g.CRS * g.L}, grad_y.options());
  const at::Tensor w = matrix(weight, g.K, g.CgRS);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nc = std::min(nb, N - n0);
    if (channels_last) {
      // cols (nc * L, CRS) = dY (nc * L, K) @ W, a GEMM per group.
      const at::Tensor dy = pixels(grad_y).narrow(0, n0 * g.L, nc * g.L);
      const at::Tensor cols = direct ? pixels(dx).narrow(0, n0 * g.L, nc * g.L)
                                     : matrix(buffer, nc * g.L, g.CRS);
      for (int64_t grp = 0; grp < groups; ++grp) {
        const at::Tensor a = dy.narrow(1, grp * g.Kg, g.Kg);
        const at::Tensor b = w.narrow(0, grp * g.Kg, g.Kg);
        at::Tensor o = cols.narrow(1, grp * g.CgRS, g.CgRS);
        if (direct && bias.has_value()) {
          at::addmm_out(o, bias->narrow(0, grp * g.Cg, g.Cg), a, b);
        } else {
          at::mm_out(o, a, b);
        }
      }
    } else {
      // cols_n (CRS, L) = W^T (CRS, K) @ dY_n (K, L), batched over the chunk's images per group.
      const at::Tensor dy = planes(grad_y).narrow(0, n0, nc);
      const at::Tensor cols = direct ? planes(dx).narrow(0, n0, nc)
                                     : buffer.as_strided({nc, g.CRS, g.L}, {g.CRS * g.L, g.L, 1});
      for (int64_t grp = 0; grp < groups; ++grp) {
        const at::Tensor a =
            w.narrow(0, grp * g.Kg, g.Kg).t().unsqueeze(0).expand({nc, g.CgRS, g.Kg});
        const at::Tensor b = dy.narrow(1, grp * g.Kg, g.Kg);
        at::Tensor o = cols.narrow(1, grp * g.CgRS, g.CgRS);
        if (direct && bias.has_value()) {
          at::baddbmm_out(o, bias->narrow(0, grp * g.Cg, g.Cg).view({1, g.Cg, 1}), a, b);
        } else {
          at::bmm_out(o, a, b);
        }
      }
    }
    if (!direct) launch_col2im(buffer, bias, dx, n0, nc, g, channels_last, stream);
  }
  return dx;
}

at::Tensor conv2d_bwd_weight_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                  const std::vector<int64_t>& kernel_size,
                                  const std::vector<int64_t>& stride,
                                  const std::vector<int64_t>& padding,
                                  const std::vector<int64_t>& dilation, int64_t groups,
                                  bool channels_last, int64_t workspace_bytes) {
  constexpr const char* fn = "conv2d_bwd_weight_cuda";
  PK_CHECK_CUDA("conv2d_bwd_weight_cuda", x);
  check_operand(fn, "x", x, x, channels_last);
  check_operand(fn, "grad_y", grad_y, x, channels_last);
  PK_CHECK_VALUE(workspace_bytes > 0, fn, ": workspace_bytes must be > 0");
  check_conv_pair(fn, "kernel_size", kernel_size, 1);
  const ConvGeometry g =
      make_conv_geometry(fn, x.size(0), x.size(1), x.size(2), x.size(3), grad_y.size(1),
                         kernel_size[0], kernel_size[1], stride, padding, dilation, groups);
  PK_CHECK_VALUE(grad_y.size(0) == x.size(0) && grad_y.size(2) == g.Ho && grad_y.size(3) == g.Wo,
                 fn, ": grad_y must be (", x.size(0), ", K, ", g.Ho, ", ", g.Wo, "), got ",
                 grad_y.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::NoGradGuard no_grad;  // see conv2d_fwd_cuda
  const int64_t N = x.size(0);
  at::Tensor dweight =
      at::empty({g.K, g.Cg, g.R, g.S}, x.options().memory_format(conv_format(channels_last)));
  if (N == 0) return dweight.zero_();  // a sum over no images
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison_output(dweight, stream);
  if (direct_conv(g)) {
    launch_direct_bwd_weight(grad_y, x, dweight, g, channels_last, stream);
    return dweight;
  }

  // dW_g (Kg, CgRS) = sum over images of dY_g @ cols_g^T: the first chunk's GEMM writes every
  // element, later chunks add theirs. NCHW: cols (CRS, nc * L) and dY copied to (K, nc * L),
  // so one GEMM covers the chunk; that copy counts against the workspace too. NHWC: both are
  // already (nc * L, .) matrices; pointwise NHWC needs no columns.
  const bool direct = channels_last && g.im2col_is_identity();
  const int64_t per_image = (g.CRS + (channels_last ? 0 : g.K)) * g.L * x.element_size();
  const int64_t nb = direct ? N : chunk_images(per_image, N, workspace_bytes);
  const at::Tensor buffer = direct ? at::Tensor() : at::empty({nb * g.CRS * g.L}, x.options());
  const at::Tensor dy_buffer =
      channels_last || nb == 1 ? at::Tensor() : at::empty({g.K * nb * g.L}, x.options());
  const at::Tensor dw = matrix(dweight, g.K, g.CgRS);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t nc = std::min(nb, N - n0);
    at::Tensor cols, dy;  // (CRS, nc * L) and (K, nc * L) views
    if (channels_last) {
      if (!direct) launch_im2col(x, n0, nc, buffer, g, true, true, stream);
      cols = (direct ? pixels(x).narrow(0, n0 * g.L, nc * g.L) : matrix(buffer, nc * g.L, g.CRS))
                 .t();
      dy = pixels(grad_y).narrow(0, n0 * g.L, nc * g.L).t();
    } else {
      launch_im2col(x, n0, nc, buffer, g, false, false, stream);
      cols = matrix(buffer, g.CRS, nc * g.L);
      if (nc == 1) {
        dy = planes(grad_y)[n0];
      } else {
        dy = matrix(dy_buffer, g.K, nc * g.L);
        dy.view({g.K, nc, g.L}).copy_(planes(grad_y).narrow(0, n0, nc).permute({1, 0, 2}));
      }
    }
    for (int64_t grp = 0; grp < groups; ++grp) {
      const at::Tensor a = dy.narrow(0, grp * g.Kg, g.Kg);
      const at::Tensor b = cols.narrow(0, grp * g.CgRS, g.CgRS).t();
      at::Tensor o = dw.narrow(0, grp * g.Kg, g.Kg);
      if (n0 == 0) {
        at::mm_out(o, a, b);
      } else {
        o.addmm_(a, b);
      }
    }
  }
  return dweight;
}

}  // namespace pykern
