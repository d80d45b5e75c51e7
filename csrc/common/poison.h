// Output poisoning for tests: when enabled (pykern._C.set_poison_outputs(True)), every output a
// kernel allocates is first filled with 0xFF bytes (NaN for floats, -1 for ints), so an element
// a kernel forgets to write fails the comparison instead of passing on lucky zeros.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstring>

namespace pykern {

// One flag for the whole extension (an inline function's static is shared across TUs).
inline std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline bool poison_outputs() { return poison_outputs_flag().load(std::memory_order_relaxed); }

// CPU outputs; CUDA code uses cudaMemsetAsync on its stream (csrc/cuda/*.cu).
inline void poison_cpu(at::Tensor& out) {
  if (poison_outputs() && out.numel() > 0) {
    std::memset(out.data_ptr(), 0xFF, out.numel() * out.element_size());
  }
}

}  // namespace pykern
