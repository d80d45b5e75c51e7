// Argument checks shared by every C++/CUDA entry point. Each message names the argument, so a
// Python caller sees e.g. "ValueError: permute_copy_cuda: x must be a CUDA tensor, got cpu".
// TORCH_CHECK_VALUE / _TYPE surface in Python as ValueError / TypeError.
#pragma once

#include <c10/util/Exception.h>

#define PK_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#define PK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define PK_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)

#define PK_CHECK_CPU(fn, t) \
  PK_CHECK_VALUE((t).device().is_cpu(), fn ": " #t " must be a CPU tensor, got ", (t).device())

#define PK_CHECK_CUDA(fn, t) \
  PK_CHECK_VALUE((t).device().is_cuda(), fn ": " #t " must be a CUDA tensor, got ", (t).device())

#define PK_CHECK_DIM_RANGE(fn, t, lo, hi)                                                     \
  PK_CHECK_VALUE((t).dim() >= (lo) && (t).dim() <= (hi), fn ": " #t " must have ", (lo), \
                 " to ", (hi), " dimensions, got ", (t).dim())
