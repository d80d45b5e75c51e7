// PK_HOST_DEVICE: a small function that both host code and CUDA kernels call (shared headers
// such as conv_geometry.h, pool_window.h and philox.h are compiled by nvcc and by the C++
// compiler).
#pragma once

#if defined(__CUDACC__)
#define PK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PK_HOST_DEVICE inline
#endif
