// Every entry point of pykern._C, grouped by family. Naming: <op>_<cpu|cuda>; each is a pure
// function (tensors in, new tensors out). csrc/pykern.cpp binds them all.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace pykern {

// layout: out = x.permute(perm).contiguous(), any dtype, any input strides.
at::Tensor permute_copy_cpu(const at::Tensor& x, const std::vector<int64_t>& perm);
#ifdef PYKERN_WITH_CUDA
at::Tensor permute_copy_cuda(const at::Tensor& x, const std::vector<int64_t>& perm);
#endif

// pooling: x is a (B, R, K) strided view reduced over R (mean, or max with the index of the max
// in R); backward spreads (B, K) gradients back to a contiguous (B, R, K).
std::tuple<at::Tensor, at::Tensor> pool_reduce_fwd_cpu(const at::Tensor& x, bool is_max);
at::Tensor pool_reduce_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& indices, int64_t R,
                               bool is_max);
#ifdef PYKERN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> pool_reduce_fwd_cuda(const at::Tensor& x, bool is_max);
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

}  // namespace pykern
