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

}  // namespace pykern
