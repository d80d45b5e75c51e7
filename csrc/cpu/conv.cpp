// Convolution family, CPU reference. CUDA twin: csrc/cuda/conv.cu; Triton twin:
// triton_kernels/conv.py.
//
// Every op is im2col + GEMM: our own im2col / col2im loops (OpenMP), at::mm / at::addmm (BLAS)
// for the products, one per group, on strided 2D views of the tensors (no copies).
//
// NCHW: the columns of one image are (C*R*S, Ho*Wo), rows ordered (c, r, s), so group g's rows
// are one block and y_n[g] (Kg, Ho*Wo) = W_g (Kg, Cg*R*S) @ cols_n[g]. The products are per
// image (the output of a product over several images would be (K, images, Ho*Wo), not NCHW);
// fwd and bwd_input run an image per thread (for_each_image), bwd_weight images in order (its
// sum over images then has a fixed order). A column buffer holds one image, in cache from
// im2col to the GEMMs.
// NHWC: the columns are one row per output pixel, (Ho*Wo, C*R*S) per image, ordered
// (g, r, s, c): group g's block of a row is (r, s, c) like the channels_last weight's rows, so
// y_g (pixels, Kg) = cols_g @ W_g^T lands in NHWC directly. The products span a chunk of
// images whose columns fit workspace_bytes.
// When R = S = 1, stride 1 and no padding, im2col is the identity: the GEMMs read x itself
// (NHWC: x seen as (N*H*W, C), a single GEMM for the batch when groups == 1).
//
// bwd_input: cols = W^T dY, then col2im. NCHW scatters each image plane's columns in a fixed
// order (a thread owns a plane); NHWC gathers, every input pixel summing the taps that read
// it. Both start from bias[c] or 0. bwd_weight: dW_g = sum over images of dY_g cols_g^T,
// accumulated by the GEMMs.
//
// Depthwise convolutions (one input or one output channel per group, fan <= kDirectMaxFan) skip
// im2col: direct loops over the taps (see "Direct kernels" below), in both layouts.
//
// float16 / bfloat16 run in float32 (inputs upcast, the result rounded once): at::mm in 16 bits
// would round every partial product of the chunked and per-image accumulations.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/conv_geometry.h"
// The vector types are only passed between always-inline functions: no ABI is involved (the
// warning fires where templates are instantiated, at the end of the file: left off for all).
#pragma GCC diagnostic ignored "-Wpsabi"
#include "common/cpu_vec.h"
#include "common/cpu_hot_loop.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

constexpr int64_t kParallelGrain = 1 << 15;  // below this many elements one thread is faster

// NHWC column rows are CRS entries padded to a multiple of 8: MKL's GEMM writing rows of an odd
// length (the stem's 147) runs 2-3x slower. The padding is never read. With an identity im2col
// the GEMMs read x, rows of C.
int64_t nhwc_ld(const ConvGeometry& g) {
  return g.im2col_is_identity() ? g.C : (g.CRS + 7) / 8 * 8;
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

void check_input(const char* fn, const char* name, const at::Tensor& t, bool channels_last) {
  PK_CHECK_VALUE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  PK_CHECK_VALUE(t.dim() == 4, fn, ": ", name, " must be 4D, got ", t.dim(), "D");
  PK_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                    t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                fn, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
                t.scalar_type());
  PK_CHECK_VALUE(t.is_contiguous(format_of(channels_last)), fn, ": ", name, " must be ",
                 channels_last ? "channels_last" : "contiguous", " (channels_last=",
                 channels_last, ")");
}

void check_same_dtype(const char* fn, const char* name, const at::Tensor& t,
                      const at::Tensor& ref) {
  PK_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " must have dtype ",
                ref.scalar_type(), ", got ", t.scalar_type());
}

void check_bias(const char* fn, const std::optional<at::Tensor>& bias, const at::Tensor& ref,
                int64_t channels) {
  if (!bias) return;
  PK_CHECK_VALUE(bias->device().is_cpu(), fn, ": bias must be a CPU tensor, got ",
                 bias->device());
  check_same_dtype(fn, "bias", *bias, ref);
  PK_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == channels, fn, ": bias must have shape (",
                 channels, "), got ", bias->sizes());
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                      bool channels_last) {
  at::Tensor out = at::empty(sizes, options.memory_format(format_of(channels_last)));
  poison_cpu(out);
  return out;
}

bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// float32 copies of 16-bit tensors, in the same memory format (.to keeps dense strides).
at::Tensor upcast(const at::Tensor& t) { return t.to(at::kFloat); }
std::optional<at::Tensor> upcast(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(upcast(*t)) : std::nullopt;
}

// A rows x cols matrix inside t's storage: element (i, j) at `offset + i * ld + j` elements
// from t's first element. Every GEMM operand and result is such a view.
at::Tensor matrix(const at::Tensor& t, int64_t offset, int64_t rows, int64_t cols, int64_t ld) {
  return t.as_strided({rows, cols}, {ld, 1}, t.storage_offset() + offset);
}

// The outputs o of one axis whose tap j reads inside the input: o in [lo, hi), where the
// input position is o * stride + shift.
struct TapRange {
  int64_t lo, hi, shift;
};

TapRange tap_range(int64_t in, int64_t out, int64_t stride, int64_t pad, int64_t dilation,
                   int64_t j) {
  const int64_t shift = j * dilation - pad;
  const int64_t lo = std::min(shift >= 0 ? 0 : (-shift + stride - 1) / stride, out);
  const int64_t hi = in - shift <= 0 ? 0 : (in - shift - 1) / stride + 1;
  return {lo, std::max(lo, std::min(hi, out)), shift};
}

// dst[i] = src[i * stride] for i < n.
template <typename scalar_t>
PK_HOT_LOOP void gather_run(scalar_t* dst, const scalar_t* src, int64_t n, int64_t stride) {
  if (stride == 1) {
    std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
  }
}

// dst[i * stride] += src[i] for i < n.
template <typename scalar_t>
PK_HOT_LOOP void scatter_add_run(scalar_t* dst, const scalar_t* src, int64_t n, int64_t stride) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] += src[i];
  }
}

// NCHW im2col of image n: cols (C*R*S, Ho*Wo), rows (c, r, s); out-of-input taps are 0.
// Over the channels in parallel unless the caller runs images in parallel.
template <typename scalar_t>
void im2col_nchw(const ConvGeometry& g, const scalar_t* x, int64_t n, scalar_t* cols,
                 bool parallel) {
  const int64_t plane = g.Ho * g.Wo;
#pragma omp parallel for schedule(static) if (parallel && g.CRS * plane > kParallelGrain)
  for (int64_t c = 0; c < g.C; ++c) {
    const scalar_t* src = x + (n * g.C + c) * g.H * g.W;
    for (int64_t r = 0; r < g.R; ++r) {
      const TapRange rh = tap_range(g.H, g.Ho, g.sh, g.ph, g.dh, r);
      for (int64_t s = 0; s < g.S; ++s) {
        const TapRange rw = tap_range(g.W, g.Wo, g.sw, g.pw, g.dw, s);
        scalar_t* dst = cols + ((c * g.R + r) * g.S + s) * plane;
        std::fill(dst, dst + rh.lo * g.Wo, scalar_t(0));
        for (int64_t ho = rh.lo; ho < rh.hi; ++ho) {
          scalar_t* row = dst + ho * g.Wo;
          std::fill(row, row + rw.lo, scalar_t(0));
          gather_run(row + rw.lo, src + (ho * g.sh + rh.shift) * g.W + rw.lo * g.sw + rw.shift,
                     rw.hi - rw.lo, g.sw);
          std::fill(row + rw.hi, row + g.Wo, scalar_t(0));
        }
        std::fill(dst + rh.hi * g.Wo, dst + plane, scalar_t(0));
      }
    }
  }
}

// NCHW col2im of image n: each plane of dx starts at bias[c] (or 0) and adds its columns'
// entries tap by tap; a thread owns whole planes, so the order of the sums is fixed.
template <typename scalar_t>
void col2im_nchw(const ConvGeometry& g, const scalar_t* cols, const scalar_t* bias, int64_t n,
                 scalar_t* dx, bool parallel) {
  const int64_t plane = g.Ho * g.Wo;
#pragma omp parallel for schedule(static) if (parallel && g.CRS * plane > kParallelGrain)
  for (int64_t c = 0; c < g.C; ++c) {
    scalar_t* dst = dx + (n * g.C + c) * g.H * g.W;
    std::fill(dst, dst + g.H * g.W, bias ? bias[c] : scalar_t(0));
    for (int64_t r = 0; r < g.R; ++r) {
      const TapRange rh = tap_range(g.H, g.Ho, g.sh, g.ph, g.dh, r);
      for (int64_t s = 0; s < g.S; ++s) {
        const TapRange rw = tap_range(g.W, g.Wo, g.sw, g.pw, g.dw, s);
        const scalar_t* src = cols + ((c * g.R + r) * g.S + s) * plane;
        for (int64_t ho = rh.lo; ho < rh.hi; ++ho) {
          scatter_add_run(dst + (ho * g.sh + rh.shift) * g.W + rw.lo * g.sw + rw.shift,
                          src + ho * g.Wo + rw.lo, rw.hi - rw.lo, g.sw);
        }
      }
    }
  }
}

// The taps s of an NHWC row that read inside it at output column wo, when dw == 1: s in
// [lo, hi), reading input columns w0 + s, whose channels are one run of (hi - lo) * C.
struct TapRun {
  int64_t lo, hi, w0;
};

TapRun tap_run(const ConvGeometry& g, int64_t wo) {
  const int64_t w0 = wo * g.sw - g.pw;
  const int64_t lo = std::clamp<int64_t>(-w0, 0, g.S);
  return {lo, std::clamp<int64_t>(g.W - w0, lo, g.S), w0};
}

// One group (groups == 1) and dw == 1: a row's taps (s, c) for one r are one run of x.
bool nhwc_runs(const ConvGeometry& g) { return g.groups == 1 && g.dw == 1; }

// NHWC im2col of one output row (image n, ho) into dst (Wo rows of ld), rows (g, r, s, c).
template <typename scalar_t>
PK_HOT_LOOP void im2col_row_nhwc(const ConvGeometry& g, const scalar_t* x, int64_t n, int64_t ho,
                                 int64_t ld, scalar_t* dst) {
  const int64_t group_width = g.CgRS, run = g.S * g.C;
  for (int64_t wo = 0; wo < g.Wo; ++wo, dst += ld) {
    const TapRun sr = tap_run(g, wo);
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t h = ho * g.sh - g.ph + r * g.dh;
      const bool inside = h >= 0 && h < g.H;
      if (nhwc_runs(g)) {  // C-element taps in one copy: the stem's are 3 long
        scalar_t* tap = dst + r * run;
        if (!inside) {
          std::fill(tap, tap + run, scalar_t(0));
          continue;
        }
        const scalar_t* src = x + ((n * g.H + h) * g.W + sr.w0 + sr.lo) * g.C;
        std::fill(tap, tap + sr.lo * g.C, scalar_t(0));
        scalar_t* taps = tap + sr.lo * g.C;
        for (int64_t i = 0; i < (sr.hi - sr.lo) * g.C; ++i) taps[i] = src[i];
        std::fill(tap + sr.hi * g.C, tap + run, scalar_t(0));
        continue;
      }
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t w = wo * g.sw - g.pw + s * g.dw;
        scalar_t* tap = dst + (r * g.S + s) * g.Cg;
        if (!inside || w < 0 || w >= g.W) {
          for (int64_t k = 0; k < g.groups; ++k) {
            std::fill(tap + k * group_width, tap + k * group_width + g.Cg, scalar_t(0));
          }
          continue;
        }
        const scalar_t* src = x + ((n * g.H + h) * g.W + w) * g.C;
        for (int64_t k = 0; k < g.groups; ++k) {
          std::copy(src + k * g.Cg, src + (k + 1) * g.Cg, tap + k * group_width);
        }
      }
    }
  }
}

// NHWC im2col of images [n0, n0 + nb): cols (nb*Ho*Wo, ld), each row (g, r, s, c).
template <typename scalar_t>
void im2col_nhwc(const ConvGeometry& g, const scalar_t* x, int64_t n0, int64_t nb,
                 scalar_t* cols) {
  const int64_t ld = nhwc_ld(g);
#pragma omp parallel for schedule(static) if (nb * g.Ho * g.Wo * ld > kParallelGrain)
  for (int64_t row = 0; row < nb * g.Ho; ++row) {  // (image, ho)
    im2col_row_nhwc(g, x, n0 + row / g.Ho, row % g.Ho, ld, cols + row * g.Wo * ld);
  }
}

// NHWC col2im of input row (image n of the chunk, h) into dst (W pixels of C), as a gather:
// each input pixel's C channels start at bias (or 0) and add the column entries of every
// (output pixel, tap) that reads the pixel. With runs (nhwc_runs), in the order (r, wo, s):
// each output pixel adds its run of taps for r to a run of the row; otherwise per pixel, in
// the order (r, s).
template <typename scalar_t>
PK_HOT_LOOP void col2im_row_nhwc(const ConvGeometry& g, const scalar_t* cols, int64_t ld,
                                 const scalar_t* bias, int64_t n, int64_t h, scalar_t* dst) {
  const int64_t group_width = g.CgRS;
  for (int64_t w = 0; w < g.W; ++w) {
    if (bias) {
      std::copy(bias, bias + g.C, dst + w * g.C);
    } else {
      std::fill(dst + w * g.C, dst + (w + 1) * g.C, scalar_t(0));
    }
  }
  if (nhwc_runs(g)) {
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t th = h + g.ph - r * g.dh;  // ho * sh
      if (th < 0 || th % g.sh != 0 || th / g.sh >= g.Ho) continue;
      const scalar_t* src = cols + (n * g.Ho + th / g.sh) * g.Wo * ld + r * g.S * g.C;
      for (int64_t wo = 0; wo < g.Wo; ++wo, src += ld) {
        const TapRun sr = tap_run(g, wo);
        scalar_t* out = dst + (sr.w0 + sr.lo) * g.C;
        const scalar_t* taps = src + sr.lo * g.C;
        for (int64_t i = 0; i < (sr.hi - sr.lo) * g.C; ++i) out[i] += taps[i];
      }
    }
    return;
  }
  for (int64_t w = 0; w < g.W; ++w) {
    scalar_t* pixel_dst = dst + w * g.C;
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t th = h + g.ph - r * g.dh;  // ho * sh
      if (th < 0 || th % g.sh != 0 || th / g.sh >= g.Ho) continue;
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t tw = w + g.pw - s * g.dw;  // wo * sw
        if (tw < 0 || tw % g.sw != 0 || tw / g.sw >= g.Wo) continue;
        const int64_t pixel = (n * g.Ho + th / g.sh) * g.Wo + tw / g.sw;
        const scalar_t* src = cols + pixel * ld + (r * g.S + s) * g.Cg;
        for (int64_t k = 0; k < g.groups; ++k) {
          for (int64_t c = 0; c < g.Cg; ++c) pixel_dst[k * g.Cg + c] += src[k * group_width + c];
        }
      }
    }
  }
}

// NHWC col2im of images [n0, n0 + nb): a thread owns whole rows of dx.
template <typename scalar_t>
void col2im_nhwc(const ConvGeometry& g, const scalar_t* cols, const scalar_t* bias, int64_t n0,
                 int64_t nb, scalar_t* dx) {
  const int64_t ld = nhwc_ld(g);
#pragma omp parallel for schedule(static) if (nb * g.H * g.W * g.C * g.taps() > kParallelGrain)
  for (int64_t row = 0; row < nb * g.H; ++row) {  // (image, h)
    col2im_row_nhwc(g, cols, ld, bias, row / g.H, row % g.H, dx + (n0 * g.H + row) * g.W * g.C);
  }
}

// Images per NHWC chunk: as many as the workspace holds columns for, at least one, and no more
// than kColumnBytes holds: columns written and read back from cache, and a buffer that the
// allocator reuses instead of mapping (and faulting in) fresh pages on every call.
constexpr int64_t kColumnBytes = 8 << 20;

int64_t images_per_chunk(const ConvGeometry& g, int64_t element_size, int64_t workspace_bytes) {
  if (g.im2col_is_identity()) return g.N;  // no column buffer
  const int64_t image_bytes = std::max<int64_t>(g.Ho * g.Wo * nhwc_ld(g) * element_size, 1);
  return std::clamp<int64_t>(std::min(workspace_bytes, kColumnBytes) / image_bytes, 1, g.N);
}

// NCHW images (fwd, bwd_input) run one per thread, each image's im2col / col2im and GEMMs on
// that thread as torch's slow_conv2d does, when there are several images and the workspace
// holds a column buffer per thread: one parallel region per call instead of one per loop and
// per GEMM. Otherwise (one slot) images go one at a time, the loops and GEMMs threaded.
// run(n, slot, parallel) processes image n with column buffer `slot`; slots split the images
// by a fixed rule, so which buffer an image uses does not depend on the thread count.
template <typename Body>
void for_each_image(const ConvGeometry& g, int64_t slots, const Body& run) {
  if (slots == 1) {
    for (int64_t n = 0; n < g.N; ++n) run(n, 0, true);
    return;
  }
  at::parallel_for(0, slots, 1, [&](int64_t first, int64_t last) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: the caller's guard stays on its thread
    for (int64_t slot = first; slot < last; ++slot) {
      for (int64_t n = slot; n < g.N; n += slots) run(n, slot, false);
    }
  });
}

int64_t image_slots(const ConvGeometry& g, int64_t element_size, int64_t workspace_bytes) {
  int64_t slots = std::min<int64_t>(at::get_num_threads(), g.N);
  if (!g.im2col_is_identity()) {
    const int64_t image_bytes = std::max<int64_t>(g.Ho * g.Wo * g.CRS * element_size, 1);
    slots = std::min(slots, workspace_bytes / image_bytes);
  }
  return std::max<int64_t>(slots, 1);
}

// The column buffer of one call, for `images` images of `ld` entries per output pixel (none
// when im2col is the identity).
at::Tensor column_buffer(const ConvGeometry& g, int64_t images, int64_t ld,
                         const at::TensorOptions& options) {
  const int64_t numel = g.im2col_is_identity() ? 0 : images * g.Ho * g.Wo * ld;
  return at::empty({numel}, options);
}

// bias[first : first + n] broadcast over the rows (along_rows) or the columns of a
// rows x cols matrix: the `self` of an addmm that adds it.
at::Tensor bias_matrix(const at::Tensor& bias, int64_t first, int64_t n, int64_t rows,
                       int64_t cols, bool along_rows) {
  const at::Tensor b = bias.narrow(0, first, n);
  return along_rows ? b.view({n, 1}).expand({rows, cols}) : b.view({1, n}).expand({rows, cols});
}

// out = a @ b (+ bias_self when given).
void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
          const std::optional<at::Tensor>& bias_self) {
  if (bias_self) {
    at::addmm_out(out, *bias_self, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// ---- Direct kernels: one input channel per group (Cg == 1, depthwise with multiplier Kg) or
// one output channel per group (Kg == 1: depthwise conv_transpose2d, whose three ops see the
// weight (C, m, R, S) as K = C groups of Cg = m). No column buffer: a GEMM per group of a
// Kg x Cg*R*S weight is mostly overhead.
//
// fwd and bwd_input write each destination channel d (fwd: k; bwd_input: c) from `fan`
// source channels (fwd: Cg; bwd_input: Kg); since one of Cg, Kg is 1, source f of d is channel
// (d * fan + f) / ratio (ratio: fwd Kg, bwd_input Cg) with weight entry e = d * fan + f, an
// index into the weight's K * Cg (k, i) pairs, e = k * Cg + i in both ops. bwd_weight's entry
// e pairs grad_y channel e / Cg with x channel e / Kg.
// Every output element is written by one thread, its terms summed in a fixed order.

constexpr int64_t kDirectMaxFan = 8;  // wider fans gather more like a GEMM: the general path

bool use_direct(const ConvGeometry& g) {
  return std::min(g.Cg, g.Kg) == 1 && std::max(g.Cg, g.Kg) <= kDirectMaxFan;
}

struct Fan {
  int64_t fan, ratio;
  int64_t source(int64_t d, int64_t f) const { return (d * fan + f) / ratio; }
};

Fan fwd_fan(const ConvGeometry& g) { return {g.Cg, g.Kg}; }
Fan bwd_input_fan(const ConvGeometry& g) { return {g.Kg, g.Cg}; }

// dst[i] += w * src[i * stride] for i < n.
template <typename scalar_t>
PK_INLINE void axpy_gather(scalar_t* dst, const scalar_t* src, scalar_t w, int64_t n,
                           int64_t stride) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i * stride];
  }
}

// dst[i * stride] += w * src[i] for i < n.
template <typename scalar_t>
PK_INLINE void axpy_scatter(scalar_t* dst, const scalar_t* src, scalar_t w, int64_t n,
                            int64_t stride) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] += w * src[i];
  }
}

// One term of a stride-1 NCHW row: dst[q] += w * src[q + offset], src a zero-padded row that
// holds every q + offset.
template <typename scalar_t>
struct RowTerm {
  const scalar_t* src;
  scalar_t w;
  int64_t offset;
};

// dst[q, q + NB * L) = init + the terms: NB vectors of outputs keep their sums in registers
// across all the terms, in two chains (even and odd terms) to hide the add latency.
template <int NB, typename scalar_t>
PK_INLINE void row_block(scalar_t* dst, int64_t q, scalar_t init, const RowTerm<scalar_t>* terms,
                         int64_t count) {
  using vec = vec_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  vec even[NB], odd[NB];
  for (int b = 0; b < NB; ++b) even[b] = vec{} + init, odd[b] = vec{};
  int64_t t = 0;
  for (; t + 1 < count; t += 2) {
    const scalar_t* a = terms[t].src + q + terms[t].offset;
    const scalar_t* c = terms[t + 1].src + q + terms[t + 1].offset;
    const vec wa = vec{} + terms[t].w, wc = vec{} + terms[t + 1].w;
    for (int b = 0; b < NB; ++b) {
      even[b] += wa * vload(a + b * L);
      odd[b] += wc * vload(c + b * L);
    }
  }
  if (t < count) {
    const scalar_t* a = terms[t].src + q + terms[t].offset;
    const vec wa = vec{} + terms[t].w;
    for (int b = 0; b < NB; ++b) even[b] += wa * vload(a + b * L);
  }
  for (int b = 0; b < NB; ++b) vstore(dst + q + b * L, even[b] + odd[b]);
}

// dst[q] = init + the terms for q < len, in blocks of NB vectors, the last one moved back to
// end at len (it recomputes some outputs, the same sums again).
template <int NB, typename scalar_t>
PK_INLINE void row_blocks(scalar_t* dst, int64_t len, scalar_t init,
                          const RowTerm<scalar_t>* terms, int64_t count) {
  constexpr int64_t width = NB * kLanes<scalar_t>;
  for (int64_t q = 0;; q += width) {
    q = std::min(q, len - width);
    row_block<NB>(dst, q, init, terms, count);
    if (q + width >= len) break;
  }
}

// dst[q] = init + the terms for q < len (the same two chains in the scalar path).
template <typename scalar_t>
PK_INLINE void sum_row_terms(scalar_t* dst, int64_t len, scalar_t init,
                             const RowTerm<scalar_t>* terms, int64_t count) {
  constexpr int64_t L = kLanes<scalar_t>;
  if (len >= 4 * L) return row_blocks<4>(dst, len, init, terms, count);
  if (len >= 2 * L) return row_blocks<2>(dst, len, init, terms, count);
  if (len >= L) return row_blocks<1>(dst, len, init, terms, count);
  for (int64_t q = 0; q < len; ++q) {
    scalar_t even = init, odd = 0;
    int64_t t = 0;
    for (; t + 1 < count; t += 2) {
      even += terms[t].w * terms[t].src[q + terms[t].offset];
      odd += terms[t + 1].w * terms[t + 1].src[q + terms[t + 1].offset];
    }
    if (t < count) even += terms[t].w * terms[t].src[q + terms[t].offset];
    dst[q] = even + odd;
  }
}

// The rows of a plane (rows x cols) copied with `left` zeros before and zeros after, to
// `width` per row: every tap of a row then reads inside it.
template <typename scalar_t>
PK_INLINE void pad_rows(const scalar_t* src, int64_t rows, int64_t cols, int64_t left,
                        int64_t width, scalar_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* row = dst + i * width;
    std::fill(row, row + left, scalar_t(0));
    std::copy(src + i * cols, src + (i + 1) * cols, row + left);
    std::fill(row + left + cols, row + width, scalar_t(0));
  }
}

// NCHW fwd of output plane (n, k). Stride 1 in w: each output row sums its valid taps' rows
// (sum_row_terms); otherwise row by row, tap by tap, each tap's q range clipped once per row.
template <typename scalar_t>
PK_HOT_LOOP void direct_fwd_plane(const ConvGeometry& g, const scalar_t* x, const scalar_t* w,
                                  scalar_t bias, int64_t n, int64_t k, scalar_t* y,
                                  std::vector<RowTerm<scalar_t>>& terms,
                                  std::vector<scalar_t>& padded) {
  const Fan fan = fwd_fan(g);
  if (g.sw == 1) {
    // Row h of source f at padded[(f * H + h) * width]: column w at w + pw.
    const int64_t width = std::max(g.W + g.pw, g.Wo + (g.S - 1) * g.dw) + g.pw;
    padded.resize(fan.fan * g.H * width);
    for (int64_t f = 0; f < fan.fan; ++f) {
      pad_rows(x + (n * g.C + fan.source(k, f)) * g.H * g.W, g.H, g.W, g.pw, width,
               padded.data() + f * g.H * width);
    }
    for (int64_t p = 0; p < g.Ho; ++p) {
      terms.clear();
      for (int64_t f = 0; f < fan.fan; ++f) {
        const scalar_t* taps = w + (k * fan.fan + f) * g.taps();
        for (int64_t r = 0; r < g.R; ++r) {
          const int64_t h = p * g.sh - g.ph + r * g.dh;
          if (h < 0 || h >= g.H) continue;
          for (int64_t s = 0; s < g.S; ++s) {
            terms.push_back({padded.data() + (f * g.H + h) * width, taps[r * g.S + s], s * g.dw});
          }
        }
      }
      sum_row_terms(y + p * g.Wo, g.Wo, bias, terms.data(), terms.size());
    }
    return;
  }
  std::fill(y, y + g.Ho * g.Wo, bias);
  for (int64_t p = 0; p < g.Ho; ++p) {
    scalar_t* row = y + p * g.Wo;
    for (int64_t f = 0; f < fan.fan; ++f) {
      const scalar_t* src = x + (n * g.C + fan.source(k, f)) * g.H * g.W;
      const scalar_t* taps = w + (k * fan.fan + f) * g.taps();
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t h = p * g.sh - g.ph + r * g.dh;
        if (h < 0 || h >= g.H) continue;
        for (int64_t s = 0; s < g.S; ++s) {
          const TapRange rw = tap_range(g.W, g.Wo, g.sw, g.pw, g.dw, s);
          axpy_gather(row + rw.lo, src + h * g.W + rw.lo * g.sw + rw.shift, taps[r * g.S + s],
                      rw.hi - rw.lo, g.sw);
        }
      }
    }
  }
}

// NCHW bwd_input of input plane (n, c): each dx row gathers the grad_y rows whose taps read
// it. Stride 1 in w: column j reads column j + pw - s * dw (sum_row_terms); otherwise the
// columns by a strided axpy into the row (the thread owns the plane).
template <typename scalar_t>
PK_HOT_LOOP void direct_bwd_input_plane(const ConvGeometry& g, const scalar_t* dy,
                                        const scalar_t* w, scalar_t bias, int64_t n, int64_t c,
                                        scalar_t* dx, std::vector<RowTerm<scalar_t>>& terms,
                                        std::vector<scalar_t>& padded) {
  const Fan fan = bwd_input_fan(g);
  // Stride 1: row p of source f at padded[(f * Ho + p) * width], column q at q + left; dx
  // column j reads q = j + pw - s * dw.
  const int64_t left = std::max<int64_t>(0, (g.S - 1) * g.dw - g.pw);
  const int64_t width = left + std::max(g.Wo, g.W + g.pw);
  if (g.sw == 1) {
    padded.resize(fan.fan * g.Ho * width);
    for (int64_t f = 0; f < fan.fan; ++f) {
      pad_rows(dy + (n * g.K + fan.source(c, f)) * g.Ho * g.Wo, g.Ho, g.Wo, left, width,
               padded.data() + f * g.Ho * width);
    }
  } else {
    std::fill(dx, dx + g.H * g.W, bias);
  }
  for (int64_t i = 0; i < g.H; ++i) {
    scalar_t* row = dx + i * g.W;
    terms.clear();
    for (int64_t f = 0; f < fan.fan; ++f) {
      const scalar_t* src = dy + (n * g.K + fan.source(c, f)) * g.Ho * g.Wo;
      const scalar_t* taps = w + (c * fan.fan + f) * g.taps();
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t th = i + g.ph - r * g.dh;  // p * sh
        if (th < 0 || th % g.sh != 0 || th / g.sh >= g.Ho) continue;
        const int64_t p = th / g.sh;
        for (int64_t s = 0; s < g.S; ++s) {
          if (g.sw == 1) {
            terms.push_back({padded.data() + (f * g.Ho + p) * width, taps[r * g.S + s],
                             left + g.pw - s * g.dw});
            continue;
          }
          const TapRange rw = tap_range(g.W, g.Wo, g.sw, g.pw, g.dw, s);
          axpy_scatter(row + rw.lo * g.sw + rw.shift, src + p * g.Wo + rw.lo, taps[r * g.S + s],
                       rw.hi - rw.lo, g.sw);
        }
      }
    }
    if (g.sw == 1) sum_row_terms(row, g.W, bias, terms.data(), terms.size());
  }
}

// NCHW bwd_weight of entry e: per tap a row of partial sums over q (the products of all images
// and output rows, added lane by lane so the loop vectorizes), summed in order at the end.
template <typename scalar_t>
PK_HOT_LOOP void direct_bwd_weight_entry(const ConvGeometry& g, const scalar_t* dy,
                                         const scalar_t* x, int64_t e, scalar_t* partial,
                                         scalar_t* out, int64_t out_stride) {
  std::fill(partial, partial + g.taps() * g.Wo, scalar_t(0));
  for (int64_t n = 0; n < g.N; ++n) {
    const scalar_t* dy_plane = dy + (n * g.K + e / g.Cg) * g.Ho * g.Wo;
    const scalar_t* x_plane = x + (n * g.C + e / g.Kg) * g.H * g.W;
    for (int64_t p = 0; p < g.Ho; ++p) {
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t h = p * g.sh - g.ph + r * g.dh;
        if (h < 0 || h >= g.H) continue;
        for (int64_t s = 0; s < g.S; ++s) {
          const TapRange rw = tap_range(g.W, g.Wo, g.sw, g.pw, g.dw, s);
          scalar_t* acc = partial + (r * g.S + s) * g.Wo + rw.lo;
          const scalar_t* dy_row = dy_plane + p * g.Wo + rw.lo;
          const scalar_t* x_row = x_plane + h * g.W + rw.lo * g.sw + rw.shift;
          const int64_t len = rw.hi - rw.lo;
          if (g.sw == 1) {
            for (int64_t q = 0; q < len; ++q) acc[q] += dy_row[q] * x_row[q];
          } else {
            for (int64_t q = 0; q < len; ++q) acc[q] += dy_row[q] * x_row[q * g.sw];
          }
        }
      }
    }
  }
  for (int64_t t = 0; t < g.taps(); ++t) {
    scalar_t sum = 0;
    for (int64_t q = 0; q < g.Wo; ++q) sum += partial[t * g.Wo + q];
    out[t * out_stride] = sum;
  }
}

// NHWC: dst[d] += sum over the fan of d of wt[d * fan + f] * src[source(d, f)], d < D.
template <typename scalar_t>
PK_INLINE void channel_axpy(scalar_t* dst, const scalar_t* src, const scalar_t* wt, int64_t D,
                            const Fan& fan) {
  if (fan.fan == 1 && fan.ratio == 1) {
    for (int64_t d = 0; d < D; ++d) dst[d] += wt[d] * src[d];
  } else if (fan.fan == 1) {  // each source channel feeds `ratio` consecutive destinations
    for (int64_t c = 0; c < D / fan.ratio; ++c) {
      const scalar_t v = src[c];
      for (int64_t j = 0; j < fan.ratio; ++j) dst[c * fan.ratio + j] += wt[c * fan.ratio + j] * v;
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      scalar_t sum = dst[d];
      for (int64_t f = 0; f < fan.fan; ++f) sum += wt[d * fan.fan + f] * src[d * fan.fan + f];
      dst[d] = sum;
    }
  }
}

// NHWC fwd of output row (n, p): each pixel's K channels start at the bias and add the valid
// taps' input pixels. wt is the weight as (R, S, K * Cg).
template <typename scalar_t>
PK_HOT_LOOP void direct_fwd_row_nhwc(const ConvGeometry& g, const scalar_t* x,
                                     const scalar_t* wt, const scalar_t* bias, int64_t n,
                                     int64_t p, scalar_t* y) {
  const Fan fan = fwd_fan(g);
  const int64_t entries = g.K * g.Cg;
  for (int64_t q = 0; q < g.Wo; ++q) {
    scalar_t* dst = y + ((n * g.Ho + p) * g.Wo + q) * g.K;
    if (bias) {
      std::copy(bias, bias + g.K, dst);
    } else {
      std::fill(dst, dst + g.K, scalar_t(0));
    }
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t h = p * g.sh - g.ph + r * g.dh;
      if (h < 0 || h >= g.H) continue;
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t w = q * g.sw - g.pw + s * g.dw;
        if (w < 0 || w >= g.W) continue;
        channel_axpy(dst, x + ((n * g.H + h) * g.W + w) * g.C, wt + (r * g.S + s) * entries, g.K,
                     fan);
      }
    }
  }
}

// NHWC bwd_input of input row (n, i): each pixel gathers the grad_y pixels whose taps read it.
template <typename scalar_t>
PK_HOT_LOOP void direct_bwd_input_row_nhwc(const ConvGeometry& g, const scalar_t* dy,
                                           const scalar_t* wt, const scalar_t* bias, int64_t n,
                                           int64_t i, scalar_t* dx) {
  const Fan fan = bwd_input_fan(g);
  const int64_t entries = g.K * g.Cg;
  for (int64_t j = 0; j < g.W; ++j) {
    scalar_t* dst = dx + ((n * g.H + i) * g.W + j) * g.C;
    if (bias) {
      std::copy(bias, bias + g.C, dst);
    } else {
      std::fill(dst, dst + g.C, scalar_t(0));
    }
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t th = i + g.ph - r * g.dh;  // p * sh
      if (th < 0 || th % g.sh != 0 || th / g.sh >= g.Ho) continue;
      for (int64_t s = 0; s < g.S; ++s) {
        const int64_t tw = j + g.pw - s * g.dw;  // q * sw
        if (tw < 0 || tw % g.sw != 0 || tw / g.sw >= g.Wo) continue;
        const int64_t pixel = (n * g.Ho + th / g.sh) * g.Wo + tw / g.sw;
        channel_axpy(dst, dy + pixel * g.K, wt + (r * g.S + s) * entries, g.C, fan);
      }
    }
  }
}

// NHWC bwd_weight works on blocks of kEntryVecs vectors of entries (16 floats: one cache line
// of dy and of x per pixel) and holds the sums of up to kTapsPerPass taps of one weight row in
// registers while it walks an output row.
constexpr int kEntryVecs = 2;
constexpr int kTapsPerPass = 4;

// Vector b of a block's lanes at one pixel: lane l is channel (e0 + b * L + l) / div of the
// pixel. kContiguous (div 1, a full block): a plain load; otherwise lanes past ne are 0.
template <bool kContiguous, typename scalar_t>
struct EntryLanes {
  int64_t e0, ne, div;
  PK_INLINE vec_t<scalar_t> operator()(const scalar_t* pixel, int b) const {
    constexpr int64_t L = kLanes<scalar_t>;
    if (kContiguous) return vload(pixel + e0 + b * L);
    vec_t<scalar_t> v{};
    for (int64_t l = 0; l < L && b * L + l < ne; ++l) v[l] = pixel[(e0 + b * L + l) / div];
    return v;
  }
};

// Adds tap s0 + t's products of output row dy_row with input row x_row to sums[t] for
// t < NT. Each tap's q range is split at the q where every tap of the pass reads inside the
// row: the taps alone before it, all NT together inside it, alone after it; per tap the
// products are added in q order.
template <int NT, bool kContiguous, typename scalar_t>
PK_INLINE void bwd_weight_pass_nhwc(const ConvGeometry& g, const scalar_t* dy_row,
                                    const scalar_t* x_row,
                                    const EntryLanes<kContiguous, scalar_t>& dy_lanes,
                                    const EntryLanes<kContiguous, scalar_t>& x_lanes,
                                    const TapRange* rw, scalar_t* sums) {
  using vec = vec_t<scalar_t>;
  constexpr int64_t L = kLanes<scalar_t>;
  constexpr int NB = kEntryVecs;
  vec acc[NT][NB];
  int64_t lo = 0, hi = g.Wo;
  for (int t = 0; t < NT; ++t) {
    for (int b = 0; b < NB; ++b) acc[t][b] = vload(sums + (t * NB + b) * L);
    lo = std::max(lo, rw[t].lo), hi = std::min(hi, rw[t].hi);
  }
  hi = std::max(hi, lo);
  for (int t = 0; t < NT; ++t) {
    for (int64_t q = rw[t].lo; q < std::min(lo, rw[t].hi); ++q) {
      const scalar_t* x_pix = x_row + (q * g.sw + rw[t].shift) * g.C;
      for (int b = 0; b < NB; ++b) acc[t][b] += dy_lanes(dy_row + q * g.K, b) * x_lanes(x_pix, b);
    }
  }
  for (int64_t q = lo; q < hi; ++q) {
    vec d[NB];
    for (int b = 0; b < NB; ++b) d[b] = dy_lanes(dy_row + q * g.K, b);
    for (int t = 0; t < NT; ++t) {
      const scalar_t* x_pix = x_row + (q * g.sw + rw[t].shift) * g.C;
      for (int b = 0; b < NB; ++b) acc[t][b] += d[b] * x_lanes(x_pix, b);
    }
  }
  for (int t = 0; t < NT; ++t) {
    for (int64_t q = std::max(hi, rw[t].lo); q < rw[t].hi; ++q) {
      const scalar_t* x_pix = x_row + (q * g.sw + rw[t].shift) * g.C;
      for (int b = 0; b < NB; ++b) acc[t][b] += dy_lanes(dy_row + q * g.K, b) * x_lanes(x_pix, b);
    }
  }
  for (int t = 0; t < NT; ++t) {
    for (int b = 0; b < NB; ++b) vstore(sums + (t * NB + b) * L, acc[t][b]);
  }
}

// The passes of weight row r over output row dy_row and input row x_row for one block:
// sums (R, S, kEntryVecs * L).
template <bool kContiguous, typename scalar_t>
PK_INLINE void bwd_weight_row_nhwc(const ConvGeometry& g, const scalar_t* dy_row,
                                   const scalar_t* x_row,
                                   const EntryLanes<kContiguous, scalar_t>& dy_lanes,
                                   const EntryLanes<kContiguous, scalar_t>& x_lanes,
                                   const TapRange* rw, int64_t r, scalar_t* sums) {
  const int64_t width = kEntryVecs * kLanes<scalar_t>;
  for (int64_t s = 0; s < g.S; s += kTapsPerPass) {
    scalar_t* at = sums + (r * g.S + s) * width;
    switch (std::min<int64_t>(kTapsPerPass, g.S - s)) {
      case 1: bwd_weight_pass_nhwc<1>(g, dy_row, x_row, dy_lanes, x_lanes, rw + s, at); break;
      case 2: bwd_weight_pass_nhwc<2>(g, dy_row, x_row, dy_lanes, x_lanes, rw + s, at); break;
      case 3: bwd_weight_pass_nhwc<3>(g, dy_row, x_row, dy_lanes, x_lanes, rw + s, at); break;
      default: bwd_weight_pass_nhwc<4>(g, dy_row, x_row, dy_lanes, x_lanes, rw + s, at); break;
    }
  }
}

// NHWC bwd_weight of entry blocks [b0, b1): sums (b1 - b0, taps, kEntryVecs * L) over every
// output pixel, in pixel order per tap and lane. Row by row, all the blocks of a row in turn:
// a row's pixels are read whole while in cache, and each input row stays in cache for the R
// output rows that read it. rw: the S taps' column ranges.
template <typename scalar_t>
PK_HOT_LOOP void direct_bwd_weight_blocks_nhwc(const ConvGeometry& g, const scalar_t* dy,
                                               const scalar_t* x, int64_t b0, int64_t b1,
                                               const TapRange* rw, scalar_t* sums) {
  const int64_t width = kEntryVecs * kLanes<scalar_t>, entries = g.K * g.Cg;
  const bool same_channel = g.Cg == 1 && g.Kg == 1;
  std::fill(sums, sums + (b1 - b0) * g.taps() * width, scalar_t(0));
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t p = 0; p < g.Ho; ++p) {
      const scalar_t* dy_row = dy + (n * g.Ho + p) * g.Wo * g.K;
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t h = p * g.sh - g.ph + r * g.dh;
        if (h < 0 || h >= g.H) continue;
        const scalar_t* x_row = x + (n * g.H + h) * g.W * g.C;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t e0 = b * width, ne = std::min(width, entries - e0);
          scalar_t* block_sums = sums + (b - b0) * g.taps() * width;
          if (same_channel && ne == width) {
            const EntryLanes<true, scalar_t> lanes{e0, ne, 1};
            bwd_weight_row_nhwc(g, dy_row, x_row, lanes, lanes, rw, r, block_sums);
          } else {
            // lane l: dy channel (e0 + l) / Cg, x channel (e0 + l) / Kg
            bwd_weight_row_nhwc(g, dy_row, x_row, EntryLanes<false, scalar_t>{e0, ne, g.Cg},
                                EntryLanes<false, scalar_t>{e0, ne, g.Kg}, rw, r, block_sums);
          }
        }
      }
    }
  }
}

// Work items (planes, rows, entries) per parallel_for chunk: about kParallelGrain elements.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(work_per_item, 1));
}

template <typename scalar_t>
void direct_fwd(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, bool channels_last, at::Tensor& y) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t work = g.Wo * g.taps() * g.Cg;
  if (!channels_last) {
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.K, grain_for(g.Ho * work), [&](int64_t first, int64_t last) {
      std::vector<RowTerm<scalar_t>> terms;
      std::vector<scalar_t> padded;
      for (int64_t plane = first; plane < last; ++plane) {
        const int64_t n = plane / g.K, k = plane % g.K;
        direct_fwd_plane(g, xp, wp, bp ? bp[k] : scalar_t(0), n, k,
                         yp + plane * g.Ho * g.Wo, terms, padded);
      }
    });
    return;
  }
  const at::Tensor wt = weight.permute({2, 3, 0, 1}).contiguous();  // (R, S, K, Cg)
  const scalar_t* wtp = wt.const_data_ptr<scalar_t>();
  at::parallel_for(0, g.N * g.Ho, grain_for(g.K * work), [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      direct_fwd_row_nhwc(g, xp, wtp, bp, row / g.Ho, row % g.Ho, yp);
    }
  });
}

template <typename scalar_t>
void direct_bwd_input(const ConvGeometry& g, const at::Tensor& grad_y, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, bool channels_last, at::Tensor& dx) {
  const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const int64_t work = g.W * g.taps() * g.Kg;
  if (!channels_last) {
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.C, grain_for(g.H * work), [&](int64_t first, int64_t last) {
      std::vector<RowTerm<scalar_t>> terms;
      std::vector<scalar_t> padded;
      for (int64_t plane = first; plane < last; ++plane) {
        const int64_t n = plane / g.C, c = plane % g.C;
        direct_bwd_input_plane(g, dyp, wp, bp ? bp[c] : scalar_t(0), n, c,
                               dxp + plane * g.H * g.W, terms, padded);
      }
    });
    return;
  }
  const at::Tensor wt = weight.permute({2, 3, 0, 1}).contiguous();  // (R, S, K, Cg)
  const scalar_t* wtp = wt.const_data_ptr<scalar_t>();
  at::parallel_for(0, g.N * g.H, grain_for(g.C * work), [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      direct_bwd_input_row_nhwc(g, dyp, wtp, bp, row / g.H, row % g.H, dxp);
    }
  });
}

template <typename scalar_t>
void direct_bwd_weight(const ConvGeometry& g, const at::Tensor& grad_y, const at::Tensor& x,
                       bool channels_last, at::Tensor& dw) {
  const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dwp = dw.data_ptr<scalar_t>();
  const int64_t entries = g.K * g.Cg, taps = g.taps();
  const int64_t work = g.N * g.Ho * g.Wo * taps;
  if (!channels_last) {
    at::parallel_for(0, entries, grain_for(work), [&](int64_t first, int64_t last) {
      std::vector<scalar_t> partial(taps * g.Wo);
      for (int64_t e = first; e < last; ++e) {
        direct_bwd_weight_entry(g, dyp, xp, e, partial.data(), dwp + e * taps, 1);
      }
    });
    return;
  }
  // dw is (K, R, S, Cg) in memory: entry e = k * Cg + i, tap t at (k * taps + t) * Cg + i.
  // Blocks of a fixed width (not split by thread count): each sum's order is fixed.
  const int64_t block = kEntryVecs * kLanes<scalar_t>;
  const int64_t blocks = (entries + block - 1) / block;
  std::vector<TapRange> rw(g.S);
  for (int64_t s = 0; s < g.S; ++s) rw[s] = tap_range(g.W, g.Wo, g.sw, g.pw, g.dw, s);
  at::parallel_for(0, blocks, grain_for(work * block), [&](int64_t first, int64_t last) {
    std::vector<scalar_t> sums((last - first) * taps * block);
    direct_bwd_weight_blocks_nhwc(g, dyp, xp, first, last, rw.data(), sums.data());
    for (int64_t e = first * block; e < std::min(last * block, entries); ++e) {
      const int64_t k = e / g.Cg, i = e % g.Cg;
      const int64_t b = e / block, lane = e % block;
      for (int64_t t = 0; t < taps; ++t) {
        dwp[(k * taps + t) * g.Cg + i] = sums[((b - first) * taps + t) * block + lane];
      }
    }
  });
}

at::Tensor fwd_impl(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const ConvGeometry& g,
                    bool channels_last, int64_t workspace_bytes) {
  at::Tensor y = new_output({g.N, g.K, g.Ho, g.Wo}, x.options(), channels_last);
  if (y.numel() == 0) return y;
  if (use_direct(g)) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_fwd_direct_cpu", [&] {
      direct_fwd<scalar_t>(g, x, weight, bias, channels_last, y);
    });
    return y;
  }
  const int64_t plane = g.Ho * g.Wo, gw = g.CgRS;
  const auto bias_of = [&](int64_t k, int64_t rows, int64_t cols, bool along_rows) {
    return bias ? std::optional<at::Tensor>(
                      bias_matrix(*bias, k * g.Kg, g.Kg, rows, cols, along_rows))
                : std::nullopt;
  };
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (!channels_last) {
      const int64_t slots = image_slots(g, x.element_size(), workspace_bytes);
      at::Tensor cols = column_buffer(g, slots, g.CRS, x.options());
      const int64_t image_cols = g.CRS * plane;
      for_each_image(g, slots, [&](int64_t n, int64_t slot, bool parallel) {
        if (!g.im2col_is_identity()) {
          im2col_nchw(g, xp, n, cols.data_ptr<scalar_t>() + slot * image_cols, parallel);
        }
        const at::Tensor& src = g.im2col_is_identity() ? x : cols;
        const int64_t base = g.im2col_is_identity() ? n * g.C * plane : slot * image_cols;
        for (int64_t k = 0; k < g.groups; ++k) {
          gemm(matrix(y, (n * g.K + k * g.Kg) * plane, g.Kg, plane, plane),
               matrix(weight, k * g.Kg * gw, g.Kg, gw, gw),
               matrix(src, base + k * gw * plane, gw, plane, plane),
               bias_of(k, g.Kg, plane, true));
        }
      });
      return;
    }
    const int64_t chunk = images_per_chunk(g, x.element_size(), workspace_bytes);
    at::Tensor cols = column_buffer(g, chunk, nhwc_ld(g), x.options());
    for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
      const int64_t nb = std::min(chunk, g.N - n0), rows = nb * plane;
      if (!g.im2col_is_identity()) im2col_nhwc(g, xp, n0, nb, cols.data_ptr<scalar_t>());
      const at::Tensor& src = g.im2col_is_identity() ? x : cols;
      const int64_t base = g.im2col_is_identity() ? n0 * plane * g.C : 0;
      for (int64_t k = 0; k < g.groups; ++k) {
        gemm(matrix(y, n0 * plane * g.K + k * g.Kg, rows, g.Kg, g.K),
             matrix(src, base + k * gw, rows, gw, nhwc_ld(g)),
             matrix(weight, k * g.Kg * gw, g.Kg, gw, gw).t(), bias_of(k, rows, g.Kg, false));
      }
    }
  });
  return y;
}

at::Tensor bwd_input_impl(const at::Tensor& grad_y, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const ConvGeometry& g,
                          bool channels_last, int64_t workspace_bytes) {
  at::Tensor dx = new_output({g.N, g.C, g.H, g.W}, grad_y.options(), channels_last);
  if (dx.numel() == 0) return dx;
  if (use_direct(g)) {
    AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "conv2d_bwd_input_direct_cpu", [&] {
      direct_bwd_input<scalar_t>(g, grad_y, weight, bias, channels_last, dx);
    });
    return dx;
  }
  const int64_t plane = g.Ho * g.Wo, gw = g.CgRS;
  const bool identity = g.im2col_is_identity();
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "conv2d_bwd_input_cpu", [&] {
    const scalar_t* bias_p = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    // With an identity im2col the GEMM writes dx itself, the bias added by the GEMM.
    const auto bias_of = [&](int64_t k, int64_t rows, int64_t cols, bool along_rows) {
      return bias && identity ? std::optional<at::Tensor>(
                                    bias_matrix(*bias, k * g.Cg, g.Cg, rows, cols, along_rows))
                              : std::nullopt;
    };
    if (!channels_last) {
      const int64_t slots = image_slots(g, grad_y.element_size(), workspace_bytes);
      at::Tensor cols = column_buffer(g, slots, g.CRS, grad_y.options());
      const int64_t image_cols = g.CRS * plane;
      for_each_image(g, slots, [&](int64_t n, int64_t slot, bool parallel) {
        const int64_t base = slot * image_cols;
        for (int64_t k = 0; k < g.groups; ++k) {
          const at::Tensor out = identity
                                     ? matrix(dx, (n * g.C + k * g.Cg) * plane, g.Cg, plane, plane)
                                     : matrix(cols, base + k * gw * plane, gw, plane, plane);
          gemm(out, matrix(weight, k * g.Kg * gw, g.Kg, gw, gw).t(),
               matrix(grad_y, (n * g.K + k * g.Kg) * plane, g.Kg, plane, plane),
               bias_of(k, g.Cg, plane, true));
        }
        if (!identity) {
          col2im_nchw(g, cols.const_data_ptr<scalar_t>() + base, bias_p, n,
                      dx.data_ptr<scalar_t>(), parallel);
        }
      });
      return;
    }
    const int64_t chunk = images_per_chunk(g, grad_y.element_size(), workspace_bytes);
    at::Tensor cols = column_buffer(g, chunk, nhwc_ld(g), grad_y.options());
    for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
      const int64_t nb = std::min(chunk, g.N - n0), rows = nb * plane;
      for (int64_t k = 0; k < g.groups; ++k) {
        const at::Tensor out = identity ? matrix(dx, n0 * plane * g.C + k * g.Cg, rows, g.Cg, g.C)
                                        : matrix(cols, k * gw, rows, gw, nhwc_ld(g));
        gemm(out, matrix(grad_y, n0 * plane * g.K + k * g.Kg, rows, g.Kg, g.K),
             matrix(weight, k * g.Kg * gw, g.Kg, gw, gw), bias_of(k, rows, g.Cg, false));
      }
      if (!identity) {
        col2im_nhwc(g, cols.const_data_ptr<scalar_t>(), bias_p, n0, nb, dx.data_ptr<scalar_t>());
      }
    }
  });
  return dx;
}

at::Tensor bwd_weight_impl(const at::Tensor& grad_y, const at::Tensor& x, const ConvGeometry& g,
                           bool channels_last, int64_t workspace_bytes) {
  at::Tensor dw = new_output({g.K, g.Cg, g.R, g.S}, x.options(), channels_last);
  if (dw.numel() == 0) return dw;
  if (grad_y.numel() == 0) return dw.zero_();  // an empty sum
  if (use_direct(g)) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_bwd_weight_direct_cpu", [&] {
      direct_bwd_weight<scalar_t>(g, grad_y, x, channels_last, dw);
    });
    return dw;
  }
  const int64_t plane = g.Ho * g.Wo, gw = g.CgRS;
  // The first product of each group writes dW_g, the later ones add to it.
  const auto accumulate = [](at::Tensor out, const at::Tensor& a, const at::Tensor& b,
                             bool first) {
    if (first) {
      at::mm_out(out, a, b);
    } else {
      out.addmm_(a, b);
    }
  };
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_bwd_weight_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (!channels_last) {
      at::Tensor cols = column_buffer(g, 1, g.CRS, x.options());
      for (int64_t n = 0; n < g.N; ++n) {
        if (!g.im2col_is_identity()) im2col_nchw(g, xp, n, cols.data_ptr<scalar_t>(), true);
        const at::Tensor& src = g.im2col_is_identity() ? x : cols;
        const int64_t base = g.im2col_is_identity() ? n * g.C * plane : 0;
        for (int64_t k = 0; k < g.groups; ++k) {
          accumulate(matrix(dw, k * g.Kg * gw, g.Kg, gw, gw),
                     matrix(grad_y, (n * g.K + k * g.Kg) * plane, g.Kg, plane, plane),
                     matrix(src, base + k * gw * plane, gw, plane, plane).t(), n == 0);
        }
      }
      return;
    }
    const int64_t chunk = images_per_chunk(g, x.element_size(), workspace_bytes);
    at::Tensor cols = column_buffer(g, chunk, nhwc_ld(g), x.options());
    for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
      const int64_t nb = std::min(chunk, g.N - n0), rows = nb * plane;
      if (!g.im2col_is_identity()) im2col_nhwc(g, xp, n0, nb, cols.data_ptr<scalar_t>());
      const at::Tensor& src = g.im2col_is_identity() ? x : cols;
      const int64_t base = g.im2col_is_identity() ? n0 * plane * g.C : 0;
      for (int64_t k = 0; k < g.groups; ++k) {
        accumulate(matrix(dw, k * g.Kg * gw, g.Kg, gw, gw),
                   matrix(grad_y, n0 * plane * g.K + k * g.Kg, rows, g.Kg, g.K).t(),
                   matrix(src, base + k * gw, rows, gw, nhwc_ld(g)), n0 == 0);
      }
    }
  });
  return dw;
}

// A 16-bit result computed in float32, rounded into a (poisoned) output of the input's dtype.
at::Tensor round_to(const at::Tensor& result, at::ScalarType dtype, bool channels_last) {
  at::Tensor out = new_output(result.sizes(), result.options().dtype(dtype), channels_last);
  out.copy_(result);
  return out;
}

}  // namespace

at::Tensor conv2d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias,
                          const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                          const std::vector<int64_t>& dilation, int64_t groups,
                          bool channels_last, int64_t workspace_bytes) {
  constexpr const char* fn = "conv2d_fwd_cpu";
  // A kernel, not a graph: the out= GEMMs refuse inputs that require grad.
  at::NoGradGuard no_grad;
  check_input(fn, "x", x, channels_last);
  check_input(fn, "weight", weight, channels_last);
  check_same_dtype(fn, "weight", weight, x);
  check_bias(fn, bias, x, weight.size(0));
  PK_CHECK_VALUE(workspace_bytes > 0, fn, ": workspace_bytes must be positive");
  const ConvGeometry g = make_conv_geometry(fn, x.size(0), x.size(1), x.size(2), x.size(3),
                                       weight.size(0), weight.size(2), weight.size(3), stride,
                                       padding, dilation, groups);
  PK_CHECK_VALUE(weight.size(1) == g.Cg, fn, ": weight must have C / groups = ", g.Cg,
                 " input channels, got ", weight.size(1));
  if (is_16bit(x)) {
    return round_to(fwd_impl(upcast(x), upcast(weight), upcast(bias), g, channels_last,
                             workspace_bytes),
                    x.scalar_type(), channels_last);
  }
  return fwd_impl(x, weight, bias, g, channels_last, workspace_bytes);
}

at::Tensor conv2d_bwd_input_cpu(const at::Tensor& grad_y, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::vector<int64_t>& in_size,
                                const std::vector<int64_t>& stride,
                                const std::vector<int64_t>& padding,
                                const std::vector<int64_t>& dilation, int64_t groups,
                                bool channels_last, int64_t workspace_bytes) {
  constexpr const char* fn = "conv2d_bwd_input_cpu";
  // A kernel, not a graph: the out= GEMMs refuse inputs that require grad.
  at::NoGradGuard no_grad;
  check_input(fn, "grad_y", grad_y, channels_last);
  check_input(fn, "weight", weight, channels_last);
  check_same_dtype(fn, "weight", weight, grad_y);
  check_conv_pair(fn, "in_size", in_size, 0);
  PK_CHECK_VALUE(workspace_bytes > 0, fn, ": workspace_bytes must be positive");
  PK_CHECK_VALUE(weight.size(0) == grad_y.size(1), fn, ": grad_y must have ", weight.size(0),
                 " channels (the weight's K), got ", grad_y.size(1));
  const ConvGeometry g = make_conv_geometry(fn, grad_y.size(0), weight.size(1) * groups, in_size[0],
                                       in_size[1], weight.size(0), weight.size(2),
                                       weight.size(3), stride, padding, dilation, groups);
  check_bias(fn, bias, grad_y, g.C);
  PK_CHECK_VALUE(grad_y.size(2) == g.Ho && grad_y.size(3) == g.Wo, fn, ": grad_y must be ", g.Ho,
                 " x ", g.Wo, " for in_size (", g.H, ", ", g.W, "), got ", grad_y.size(2), " x ",
                 grad_y.size(3));
  if (is_16bit(grad_y)) {
    return round_to(bwd_input_impl(upcast(grad_y), upcast(weight), upcast(bias), g,
                                   channels_last, workspace_bytes),
                    grad_y.scalar_type(), channels_last);
  }
  return bwd_input_impl(grad_y, weight, bias, g, channels_last, workspace_bytes);
}

at::Tensor conv2d_bwd_weight_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                 const std::vector<int64_t>& kernel_size,
                                 const std::vector<int64_t>& stride,
                                 const std::vector<int64_t>& padding,
                                 const std::vector<int64_t>& dilation, int64_t groups,
                                 bool channels_last, int64_t workspace_bytes) {
  constexpr const char* fn = "conv2d_bwd_weight_cpu";
  // A kernel, not a graph: the out= GEMMs refuse inputs that require grad.
  at::NoGradGuard no_grad;
  check_input(fn, "grad_y", grad_y, channels_last);
  check_input(fn, "x", x, channels_last);
  check_same_dtype(fn, "grad_y", grad_y, x);
  check_conv_pair(fn, "kernel_size", kernel_size, 1);
  PK_CHECK_VALUE(workspace_bytes > 0, fn, ": workspace_bytes must be positive");
  PK_CHECK_VALUE(grad_y.size(0) == x.size(0), fn, ": grad_y must have x's batch size ",
                 x.size(0), ", got ", grad_y.size(0));
  const ConvGeometry g = make_conv_geometry(fn, x.size(0), x.size(1), x.size(2), x.size(3),
                                       grad_y.size(1), kernel_size[0], kernel_size[1], stride,
                                       padding, dilation, groups);
  PK_CHECK_VALUE(grad_y.size(2) == g.Ho && grad_y.size(3) == g.Wo, fn, ": grad_y must be ", g.Ho,
                 " x ", g.Wo, ", got ", grad_y.size(2), " x ", grad_y.size(3));
  if (is_16bit(x)) {
    return round_to(bwd_weight_impl(upcast(grad_y), upcast(x), g, channels_last, workspace_bytes),
                    x.scalar_type(), channels_last);
  }
  return bwd_weight_impl(grad_y, x, g, channels_last, workspace_bytes);
}

}  // namespace pykern
