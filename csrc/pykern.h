// Every entry point of pykern._C, grouped by family. Naming: <op>_<cpu|cuda>; each is a pure
// function (tensors in, new tensors out). csrc/pykern.cpp binds them all.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace pykern {

// layout: out = x.permute(perm).contiguous(), any dtype, any input strides.
at::Tensor permute_copy_cpu(const at::Tensor& x, const std::vector<int64_t>& perm);
#ifdef PYKERN_WITH_CUDA
at::Tensor permute_copy_cuda(const at::Tensor& x, const std::vector<int64_t>& perm);
#endif

}  // namespace pykern
