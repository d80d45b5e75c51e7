// Every entry point of pykern._C, grouped by family. Naming: <op>_<cpu|cuda>; each is a pure
// function (tensors in, new tensors out). csrc/pykern.cpp binds them all.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace pykern {

// layout: out = x.permute(perm).contiguous(), any dtype, any input strides.
at::Tensor permute_copy_cpu(const at::Tensor& x, const std::vector<int64_t>& perm);
#ifdef PYKERN_WITH_CUDA
at::Tensor permute_copy_cuda(const at::Tensor& x, const std::vector<int64_t>& perm);
#endif

// pooling: x is a (B, R, K) strided view reduced over R (mean, or max with the index of the max
// in R; with_indices false: indices come back empty, (0, K), which lets the CPU skip them);
// backward spreads (B, K) gradients back to a contiguous (B, R, K).
std::tuple<at::Tensor, at::Tensor> pool_reduce_fwd_cpu(const at::Tensor& x, bool is_max,
                                                       bool with_indices);
at::Tensor pool_reduce_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& indices, int64_t R,
                               bool is_max);
#ifdef PYKERN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> pool_reduce_fwd_cuda(const at::Tensor& x, bool is_max,
                                                        bool with_indices);
at::Tensor pool_reduce_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& indices, int64_t R,
                                bool is_max);
#endif

// pooling windows (max_pool2d, avg_pool2d and their adaptive forms; csrc/common/pool_window.h
// defines the windows). Window arguments are (H, W) pairs; with adaptive only out_size is
// read. channels_last: x, grad_out and every output are NHWC in memory, else NCHW-contiguous.
// Max indices are int64 flat offsets h * W + w into each (H, W) plane, as torch's; without
// with_indices none are computed and an empty tensor stands in for them.
// divisor_override 0 means none.
std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd_cpu(
    const at::Tensor& x, const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
    const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
    const std::vector<int64_t>& out_size, bool adaptive, bool channels_last, bool with_indices);
at::Tensor max_pool2d_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& indices,
                            const std::vector<int64_t>& in_size, const std::vector<int64_t>& kernel,
                            const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                            const std::vector<int64_t>& dilation, bool adaptive, bool channels_last);
at::Tensor avg_pool2d_fwd_cpu(const at::Tensor& x, const std::vector<int64_t>& kernel,
                            const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                            const std::vector<int64_t>& out_size, bool adaptive,
                            bool count_include_pad, int64_t divisor_override, bool channels_last);
at::Tensor avg_pool2d_bwd_cpu(const at::Tensor& grad_out, const std::vector<int64_t>& in_size,
                            const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
                            const std::vector<int64_t>& padding, bool adaptive,
                            bool count_include_pad, int64_t divisor_override, bool channels_last);
#ifdef PYKERN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd_cuda(
    const at::Tensor& x, const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
    const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
    const std::vector<int64_t>& out_size, bool adaptive, bool channels_last, bool with_indices);
at::Tensor max_pool2d_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& indices,
                            const std::vector<int64_t>& in_size, const std::vector<int64_t>& kernel,
                            const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                            const std::vector<int64_t>& dilation, bool adaptive, bool channels_last);
at::Tensor avg_pool2d_fwd_cuda(const at::Tensor& x, const std::vector<int64_t>& kernel,
                            const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                            const std::vector<int64_t>& out_size, bool adaptive,
                            bool count_include_pad, int64_t divisor_override, bool channels_last);
at::Tensor avg_pool2d_bwd_cuda(const at::Tensor& grad_out, const std::vector<int64_t>& in_size,
                            const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
                            const std::vector<int64_t>& padding, bool adaptive,
                            bool count_include_pad, int64_t divisor_override, bool channels_last);
#endif

// normalization. Every tensor argument x, residual, grad_y, y is a contiguous (B, C, K) view
// (pykern/ops/norm.py builds it: LayerNorm/RMSNorm (M, N, 1), LayerNorm2d NHWC (N*H*W, C, 1)
// and NCHW (N, C, H*W), BatchNorm NCHW (N, C, H*W) and NHWC (N*H*W, C, 1)). Every per-channel
// or per-row vector (weight, bias, mean, var, rstd, sums) is in the accumulation type "acc":
// float64 for float64 x, else float32; BatchNorm's mean, var, weight and bias may each be in x's
// dtype instead (a 16-bit model's, read as stored). Optional outputs not asked for are empty.
//
// Row norm (LayerNorm, RMSNorm, their residual-add forms, LayerNorm2d): each (b, k) is
// normalized over C; s = x + residual (rounded to x's dtype) when residual is given.
// fwd -> (y, s or empty, mean (B, K) or empty when rms, rstd (B, K)).
// bwd (x is s when there was a residual; grad_sum, the gradient reaching s directly, is added
// to dx) -> (dx, dweight (C,) or empty, dbias (C,) or empty), parameter sums deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms);
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_norm_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& grad_sum,
    bool rms, bool need_dweight, bool need_dbias);
// BatchNorm: each channel c is normalized over (b, k) with mean/var (C,): the batch's
// (batch_norm_stats: biased var, computed stably) or the running stats.
// fwd: y = [relu](((x - mean) * rsqrt(var + eps)) * weight + bias [+ residual]).
// bwd_reduce -> (sum of dy, sum of dy * xhat) per channel, dy masked by y > 0 when y is given.
// bwd -> (dx, d_residual (the masked dy) or empty); count > 0: training (batch statistics,
// count values per channel), count == 0: the stats were constants (eval).
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x);
// In place: running = (1 - momentum) * running + momentum * batch (var scaled by var_factor),
// the batch's mean/var in the running stats' acc type; both checked before either is written.
void batch_norm_update_running_cpu(const at::Tensor& mean, const at::Tensor& var,
                                   const std::optional<at::Tensor>& running_mean,
                                   const std::optional<at::Tensor>& running_var, double momentum,
                                   double var_factor);
at::Tensor batch_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, double eps, bool relu);
std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y,
    const at::Tensor& mean, const at::Tensor& var, double eps);
std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, double eps, int64_t count,
    bool want_grad_residual);
#ifdef PYKERN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms);
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_norm_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& grad_sum,
    bool rms, bool need_dweight, bool need_dbias);
std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& x);
void batch_norm_update_running_cuda(const at::Tensor& mean, const at::Tensor& var,
                                    const std::optional<at::Tensor>& running_mean,
                                    const std::optional<at::Tensor>& running_var, double momentum,
                                    double var_factor);
at::Tensor batch_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, double eps, bool relu);
std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y,
    const at::Tensor& mean, const at::Tensor& var, double eps);
std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, double eps, int64_t count,
    bool want_grad_residual);
#endif

// convolution (im2col + GEMM). x: (N, C, H, W); weight: (K, C / groups, R, S); both in the same
// memory format: channels_last true means NHWC memory for x, grad_y and outputs, and (K, R, S,
// C / groups) memory for weight and grad_weight; false means contiguous NCHW / KCRS. Window
// arguments are (H, W) pairs; padding is symmetric (pykern/ops/conv.py pre-pads for 'same' with
// an even window). workspace_bytes bounds each call's column buffer: images are processed in
// batch chunks whose columns fit it (at least one image per chunk).
// fwd -> y (N, K, Ho, Wo), + bias[k] when given.
// bwd_input -> dx (N, C, in_size...) = col2im(W^T dY) (+ bias[c]: conv_transpose2d's forward).
// bwd_weight -> dW (K, C / groups, kernel_size...) = sum over the batch of dY im2col(X)^T.
at::Tensor conv2d_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                           const std::vector<int64_t>& dilation, int64_t groups,
                           bool channels_last, int64_t workspace_bytes);
at::Tensor conv2d_bwd_input_cpu(const at::Tensor& grad_y, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::vector<int64_t>& in_size,
                                 const std::vector<int64_t>& stride,
                                 const std::vector<int64_t>& padding,
                                 const std::vector<int64_t>& dilation, int64_t groups,
                                 bool channels_last, int64_t workspace_bytes);
at::Tensor conv2d_bwd_weight_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                  const std::vector<int64_t>& kernel_size,
                                  const std::vector<int64_t>& stride,
                                  const std::vector<int64_t>& padding,
                                  const std::vector<int64_t>& dilation, int64_t groups,
                                  bool channels_last, int64_t workspace_bytes);
#ifdef PYKERN_WITH_CUDA
at::Tensor conv2d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                           const std::vector<int64_t>& dilation, int64_t groups,
                           bool channels_last, int64_t workspace_bytes);
at::Tensor conv2d_bwd_input_cuda(const at::Tensor& grad_y, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const std::vector<int64_t>& in_size,
                                 const std::vector<int64_t>& stride,
                                 const std::vector<int64_t>& padding,
                                 const std::vector<int64_t>& dilation, int64_t groups,
                                 bool channels_last, int64_t workspace_bytes);
at::Tensor conv2d_bwd_weight_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                  const std::vector<int64_t>& kernel_size,
                                  const std::vector<int64_t>& stride,
                                  const std::vector<int64_t>& padding,
                                  const std::vector<int64_t>& dilation, int64_t groups,
                                  bool channels_last, int64_t workspace_bytes);
#endif

// attention (flash-style: tiled online softmax, O(L + S) extra memory). q (Z, Hq, L, E),
// k (Z, Hk, S, E), v (Z, Hk, S, Ev), grad_out and out (Z, Hq, L, Ev): contiguous, one float
// dtype. Hq is a multiple of Hk (grouped-query attention): query head h reads key/value head
// h / (Hq / Hk). bias: an additive mask (Z, Hq, L, S) in the accumulation type "acc" (float64
// for float64 q, else float32) with any strides (0 where it broadcasts), -inf where masked;
// is_causal masks j > i (top-left aligned). Scores are (q k^T) * scale + bias.
// Dropout (dropout_p > 0): element (z * Hq + h, i, j) is kept by common/philox.h's rule with
// `seed`, kept probabilities scaled by 1 / (1 - dropout_p); the log-sum-exp ignores dropout.
// A row whose every key is masked has lse -inf, output 0 and zero gradients (torch's rule).
// fwd -> (out (Z, Hq, L, Ev) in q's dtype, lse (Z, Hq, L) in acc).
// bwd -> (dq, dk, dv) in q's dtype; dk and dv sum over the query heads of their group, in a
// fixed order (no atomics).
// materialized: softmax(scores) v with the whole (L, S) score matrix in memory, in acc; a
// second opinion for tests only.
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& bias,
                                                     double scale, bool is_causal,
                                                     double dropout_p, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    double scale, bool is_causal, double dropout_p, int64_t seed);
at::Tensor attention_materialized_cpu(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                      double scale, bool is_causal, double dropout_p,
                                      int64_t seed);
#ifdef PYKERN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& bias,
                                                      double scale, bool is_causal,
                                                      double dropout_p, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    double scale, bool is_causal, double dropout_p, int64_t seed);
#endif

}  // namespace pykern
