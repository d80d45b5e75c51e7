// Normalization family, CUDA. Twin of csrc/cpu/norm.cpp (Triton twin: triton_kernels/norm.py).
// Every big tensor is a contiguous (B, C, K) view; "acc" is float (double for double x); the
// six functions and their exact math are summarized in pykern.h ("normalization").
//
// Row norm (LayerNorm/RMSNorm of each (b, k) over C):
//   K == 1 (rows): a group of T threads per row (T = 1..32 lanes of a warp, or 64..512
//     threads), the row held in registers so global memory is read once, 16-byte accesses when
//     C and the pointers allow. Rows too long for registers: a block per row that re-reads it
//     (from L2). Backward parameter sums: per-block partials in shared memory -> (blocks, C).
//   K > 1 (LayerNorm2d on NCHW): a block takes a (C x W) slab, threads along k, the slab
//     cached in shared memory when it fits.
// BatchNorm: per-channel reductions over the rows of a (rows, C) matrix (NHWC, threads along C)
//   or over the planes of (N, C, HW) (NCHW), one partial per chunk -> (chunks, C), then a
//   second kernel combines them in a fixed order (Welford/Chan for the statistics). Forward and
//   backward are elementwise given the per-channel vectors.
// Determinism: no atomics; every sum has a fixed order given the shape and the device's SM count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_divmod.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;        // every kernel but the row kernels and the finalizers
constexpr int kRowThreads = 512;     // row kernels: groups of up to 512 threads
constexpr int kMaxWarps = kRowThreads / kWarp;
constexpr int kFinalThreads = 1024;  // finalizers: 32 channels x 32 partial lanes
constexpr int kUnroll = 4;           // loads in flight per thread and array in streaming loops

// Vector widths (elements per access). Double is only checked against, never timed: scalar.
// Row kernels (K == 1) and plane kernels keep one row or channel per thread: 16 bytes.
// Channel-parallel kernels (BN over (rows, C), LayerNorm2d columns) keep per-element state for
// each of their VEC channels or columns: 8 bytes for 16-bit types keeps that state in registers.
template <typename scalar_t>
constexpr int kWideVec =
    std::is_same_v<scalar_t, double> ? 1 : 16 / static_cast<int>(sizeof(scalar_t));
template <typename scalar_t>
constexpr int kChanVec = std::is_same_v<scalar_t, double> ? 1 : 4;
// Loads per thread and array per batch: fewer for the widest vectors (registers).
template <int VEC>
constexpr int kLoads = VEC >= 8 ? 2 : kUnroll;
constexpr int64_t kMaxBlocks = 1 << 20;
constexpr int64_t kMaxGridY = 65535;

// ---------------------------------------------------------------------------------------------
// Device helpers

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// N consecutive elements as one access (16 bytes in the vector paths; the host checked alignment).
template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// N acc values (weights, statistics) in 16-byte pieces when N fills whole pieces: N is the
// vector width of the big tensor, so p is then 16-byte aligned too.
template <int N, typename T>
__device__ __forceinline__ void load_acc(const T* p, T (&out)[N]) {
  constexpr int kPiece = 16 / static_cast<int>(sizeof(T));
  if constexpr (N % kPiece == 0) {
#pragma unroll
    for (int q = 0; q < N / kPiece; ++q) {
      const Vec<T, kPiece> w = reinterpret_cast<const Vec<T, kPiece>*>(p)[q];
#pragma unroll
      for (int i = 0; i < kPiece; ++i) out[q * kPiece + i] = w.v[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

template <int N, typename T>
__device__ __forceinline__ void add_acc(T* p, const T (&d)[N]) {
  constexpr int kPiece = 16 / static_cast<int>(sizeof(T));
  if constexpr (N % kPiece == 0) {
#pragma unroll
    for (int q = 0; q < N / kPiece; ++q) {
      Vec<T, kPiece> w = reinterpret_cast<Vec<T, kPiece>*>(p)[q];
#pragma unroll
      for (int i = 0; i < kPiece; ++i) w.v[i] += d[q * kPiece + i];
      reinterpret_cast<Vec<T, kPiece>*>(p)[q] = w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] += d[i];
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// A BatchNorm (C,) vector (mean, var, weight, bias), stored as acc or as x's own scalar_t: a
// 16-bit model's parameters and running statistics are read as stored, with no conversion
// launches before the kernel. Read once per channel and thread (or tile): the dtype test is
// off the hot loop.
template <typename scalar_t>
struct ChanVec {
  using acc_t = at::opmath_type<scalar_t>;
  const void* p = nullptr;  // null: absent
  bool narrow = false;      // stored as scalar_t (never when scalar_t is acc_t)
  __device__ __forceinline__ bool given() const { return p != nullptr; }
  __device__ __forceinline__ acc_t operator[](int64_t c) const {
    return narrow ? to_acc(static_cast<const scalar_t*>(p)[c]) : static_cast<const acc_t*>(p)[c];
  }
};

// s = x + residual in acc, rounded to x's dtype (what torch's x + residual gives).
template <typename scalar_t>
__device__ __forceinline__ scalar_t add_round(scalar_t x, scalar_t r) {
  return static_cast<scalar_t>(to_acc(x) + to_acc(r));
}

// The statistics are taken around a shift (the first element): s - shift is exact for values
// of similar size, so a mean of 1e4 with a spread of 1 keeps its digits in float32.
template <typename acc_t>
__device__ __forceinline__ acc_t finite_or_zero(acc_t v) {
  return isfinite(v) ? v : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t inv_std(acc_t var, acc_t eps) {
  return acc_t(1) / sqrt(var + eps);
}

// Sums N values over each group of T consecutive threads (T a power of two dividing blockDim,
// blockDim a multiple of 32): xor shuffles inside a warp, then shared memory across the group's
// warps in warp order. Every thread of a group ends with the same bits (each butterfly step
// adds the same two halves, only in the other order), so all may use the result. Every thread
// of the block must call it; red holds N * kMaxWarps values.
template <int N, typename acc_t>
__device__ __forceinline__ void group_sum(acc_t (&v)[N], const int T, acc_t* red) {
  const int width = T < kWarp ? T : kWarp;
  for (int o = width / 2; o > 0; o /= 2) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] += __shfl_xor_sync(0xffffffffu, v[n], o);
  }
  if (T > kWarp) {
    const int warp = threadIdx.x / kWarp;
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) red[n * kMaxWarps + warp] = v[n];
    }
    __syncthreads();
    const int nw = T / kWarp, first = (threadIdx.x / T) * nw;
#pragma unroll
    for (int n = 0; n < N; ++n) {
      acc_t s = red[n * kMaxWarps + first];
      for (int w = 1; w < nw; ++w) s += red[n * kMaxWarps + first + w];
      v[n] = s;
    }
    __syncthreads();  // red is reused by the next call
  }
}

// Sums N values over threadIdx.x / TX (the TY threads sharing tx = threadIdx.x % TX), in order
// of ty; every thread gets its column's total. red holds N * blockDim.x values.
template <int N, typename acc_t>
__device__ __forceinline__ void column_sum(acc_t (&v)[N], const int TX, acc_t* red) {
  const int TY = blockDim.x / TX, tx = threadIdx.x % TX;
#pragma unroll
  for (int n = 0; n < N; ++n) red[n * blockDim.x + threadIdx.x] = v[n];
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) {
    acc_t s = red[n * blockDim.x + tx];
    for (int y = 1; y < TY; ++y) s += red[n * blockDim.x + y * TX + tx];
    v[n] = s;
  }
  __syncthreads();
}

// Chan's merge of (nb, mb, m2b) into (n, mean, m2): counts, means and sums of squared
// deviations of two disjoint sets. Empty sides are skipped (no 0/0).
template <typename acc_t>
__device__ __forceinline__ void chan_merge(int64_t& n, acc_t& mean, acc_t& m2, int64_t nb, acc_t mb,
                                           acc_t m2b) {
  if (nb == 0) return;
  if (n == 0) {
    n = nb;
    mean = mb;
    m2 = m2b;
    return;
  }
  const int64_t nn = n + nb;
  const acc_t ratio = static_cast<acc_t>(nb) / static_cast<acc_t>(nn);
  const acc_t delta = mb - mean;
  mean += delta * ratio;
  m2 += m2b + delta * delta * static_cast<acc_t>(n) * ratio;
  n = nn;
}

// ---------------------------------------------------------------------------------------------
// Row norm: arguments

template <typename scalar_t>
struct RowFwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* residual;  // null: s is x
  const acc_t* weight;       // null: 1
  const acc_t* bias;         // null: 0
  scalar_t* y;
  scalar_t* s;               // written when residual is given
  acc_t* mean;               // null for RMSNorm
  acc_t* rstd;
  int64_t B, C, K;
  acc_t eps;
  bool rms;
};

template <typename scalar_t>
struct RowBwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;         // the forward's s
  const acc_t* weight;       // null: 1
  const acc_t* mean;         // null for RMSNorm
  const acc_t* rstd;
  const scalar_t* grad_sum;  // null: none
  scalar_t* dx;
  acc_t* part_dw;            // (gridDim.x, C) partial parameter sums; null when not fused here
  acc_t* part_db;
  int64_t B, C, K;
  bool rms;
};

// y for one normalized value n (already times rstd).
template <typename acc_t>
__device__ __forceinline__ acc_t affine(acc_t n, const acc_t* w, const acc_t* b, acc_t wv,
                                        acc_t bv) {
  if (w != nullptr) n *= wv;
  if (b != nullptr) n += bv;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Row norm, K == 1, row in registers. Group of T threads per row (G = blockDim / T rows per
// block step); lane l holds the vectors it*T + l, it < ITERS (column offsets fit 32 bits: the
// row fits in registers). The loop over rows is uniform across the block (inactive groups ride
// along) so shuffles and barriers see every thread. kResidual is a template argument: x and
// residual in flight together double the registers, which the plain case should not pay for.

template <typename scalar_t, int VEC, int ITERS, bool kResidual>
__global__ void __launch_bounds__(kRowThreads)
    row_fwd_regs_kernel(const RowFwd<scalar_t> a, const int T) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  __shared__ acc_t red[kMaxWarps];
  const int lane = threadIdx.x & (T - 1);
  const int G = blockDim.x / T;
  const int C = static_cast<int>(a.C);
  const acc_t cf = static_cast<acc_t>(C);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * G; base < a.B;
       base += static_cast<int64_t>(gridDim.x) * G) {
    const int64_t row = base + threadIdx.x / T;
    const bool active = row < a.B;
    const int64_t off = row * a.C;
    const auto ok = [&](int it) { return active && (it * T + lane) * VEC < C; };
    // All loads first, then the stores: a store to s between them would hold later loads back.
    V v[ITERS], r[kResidual ? ITERS : 1];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (ok(it)) {
        const int col = (it * T + lane) * VEC;
        v[it] = load_vec<VEC>(a.x + off + col);
        if constexpr (kResidual) r[it] = load_vec<VEC>(a.residual + off + col);
      }
    }
    acc_t shift = 0;
    if (!a.rms && active) {
      const scalar_t s0 = kResidual ? add_round(a.x[off], a.residual[off]) : a.x[off];
      shift = finite_or_zero(to_acc(s0));
    }
    if constexpr (kResidual) {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        if (ok(it)) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) v[it].v[j] = add_round(v[it].v[j], r[it].v[j]);
          store_vec<VEC>(a.s + off + (it * T + lane) * VEC, v[it]);
        }
      }
    }
    acc_t sum[1] = {0};
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (ok(it)) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t d = to_acc(v[it].v[j]) - shift;
          sum[0] += a.rms ? d * d : d;
        }
      }
    }
    group_sum(sum, T, red);
    acc_t mean = 0, rstd;
    if (a.rms) {
      rstd = inv_std(sum[0] / cf, a.eps);
    } else {
      mean = sum[0] / cf;  // around the shift
      acc_t sq[1] = {0};
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        if (ok(it)) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t d = (to_acc(v[it].v[j]) - shift) - mean;
            sq[0] += d * d;
          }
        }
      }
      group_sum(sq, T, red);
      rstd = inv_std(sq[0] / cf, a.eps);
    }
    if (active && lane == 0) {
      if (a.mean != nullptr) a.mean[row] = shift + mean;
      a.rstd[row] = rstd;
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (ok(it)) {
        const int col = (it * T + lane) * VEC;
        acc_t w[VEC], b[VEC];
        if (a.weight != nullptr) load_acc<VEC>(a.weight + col, w);
        if (a.bias != nullptr) load_acc<VEC>(a.bias + col, b);
        V o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t n = ((to_acc(v[it].v[j]) - shift) - mean) * rstd;
          o.v[j] = static_cast<scalar_t>(affine(n, a.weight, a.bias, w[j], b[j]));
        }
        store_vec<VEC>(a.y + off + col, o);
      }
    }
  }
}

// Row norm, K == 1, rows too long for registers: a block per row, three passes (sum, squared
// deviations, output) re-reading the row, which the block's other passes left in L2. With a
// residual the later passes read back s, which this same thread wrote.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kRowThreads) row_fwd_stream_kernel(const RowFwd<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  constexpr int U = kLoads<VEC>;
  __shared__ acc_t red[kMaxWarps];
  const int64_t C = a.C;
  const acc_t cf = static_cast<acc_t>(C);
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const scalar_t* src = a.residual != nullptr ? a.s : a.x;
  for (int64_t row = blockIdx.x; row < a.B; row += gridDim.x) {
    const int64_t off = row * C;
    acc_t shift = 0;
    if (!a.rms) {
      const scalar_t s0 = a.residual != nullptr ? add_round(a.x[off], a.residual[off]) : a.x[off];
      shift = finite_or_zero(to_acc(s0));
    }
    acc_t sum[1] = {0};
    for (int64_t c0 = static_cast<int64_t>(threadIdx.x) * VEC; c0 < C; c0 += step * U) {
      V v[U], r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = c0 + u * step;
        if (col < C) {
          v[u] = load_vec<VEC>(a.x + off + col);
          if (a.residual != nullptr) r[u] = load_vec<VEC>(a.residual + off + col);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = c0 + u * step;
        if (col < C) {
          if (a.residual != nullptr) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[u].v[j] = add_round(v[u].v[j], r[u].v[j]);
            store_vec<VEC>(a.s + off + col, v[u]);
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t d = to_acc(v[u].v[j]) - shift;
            sum[0] += a.rms ? d * d : d;
          }
        }
      }
    }
    group_sum(sum, blockDim.x, red);
    acc_t mean = 0, rstd;
    if (a.rms) {
      rstd = inv_std(sum[0] / cf, a.eps);
    } else {
      mean = sum[0] / cf;
      acc_t sq[1] = {0};
      for (int64_t c0 = static_cast<int64_t>(threadIdx.x) * VEC; c0 < C; c0 += step * U) {
        V v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (c0 + u * step < C) v[u] = load_vec<VEC>(src + off + c0 + u * step);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (c0 + u * step < C) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const acc_t d = (to_acc(v[u].v[j]) - shift) - mean;
              sq[0] += d * d;
            }
          }
        }
      }
      group_sum(sq, blockDim.x, red);
      rstd = inv_std(sq[0] / cf, a.eps);
    }
    if (threadIdx.x == 0) {
      if (a.mean != nullptr) a.mean[row] = shift + mean;
      a.rstd[row] = rstd;
    }
    for (int64_t c0 = static_cast<int64_t>(threadIdx.x) * VEC; c0 < C; c0 += step * U) {
      V v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c0 + u * step < C) v[u] = load_vec<VEC>(src + off + c0 + u * step);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = c0 + u * step;
        if (col < C) {
          acc_t w[VEC], b[VEC];
          if (a.weight != nullptr) load_acc<VEC>(a.weight + col, w);
          if (a.bias != nullptr) load_acc<VEC>(a.bias + col, b);
          V o;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t n = ((to_acc(v[u].v[j]) - shift) - mean) * rstd;
            o.v[j] = static_cast<scalar_t>(affine(n, a.weight, a.bias, w[j], b[j]));
          }
          store_vec<VEC>(a.y + off + col, o);
        }
      }
    }
  }
}

// Row norm backward, K == 1, x and dy rows in registers (raw, converted on use). dx in one pass
// after one reduction of (sum g, sum g * xhat). Parameter sums, when fused here, go to this
// thread's own slots of its group's slice [g][C] of shared memory (no other thread touches
// them until the end), then the block adds the G slices pairwise (fixed tree) and writes its
// partial row of (gridDim.x, C).
template <typename scalar_t, int VEC, int ITERS>
__global__ void __launch_bounds__(kRowThreads)
    row_bwd_regs_kernel(const RowBwd<scalar_t> a, const int T) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ acc_t red[2 * kMaxWarps];
  const int lane = threadIdx.x & (T - 1);
  const int g = threadIdx.x / T;
  const int G = blockDim.x / T;
  const int64_t C = a.C;
  const acc_t cf = static_cast<acc_t>(C);
  acc_t* pdw = a.part_dw != nullptr ? reinterpret_cast<acc_t*>(smem) : nullptr;
  acc_t* pdb = a.part_db != nullptr
                   ? reinterpret_cast<acc_t*>(smem) + (pdw != nullptr ? G * C : 0)
                   : nullptr;
  const auto col_of = [&](int it) { return (static_cast<int64_t>(it) * T + lane) * VEC; };
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t col = col_of(it);
    if (col < C) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (pdw != nullptr) pdw[g * C + col + j] = acc_t(0);
        if (pdb != nullptr) pdb[g * C + col + j] = acc_t(0);
      }
    }
  }
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * G; base < a.B;
       base += static_cast<int64_t>(gridDim.x) * G) {
    const int64_t row = base + g;
    const bool active = row < a.B;
    const int64_t off = row * C;
    const auto ok = [&](int it) { return active && col_of(it) < C; };
    V xv[ITERS], gv[ITERS];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (ok(it)) {
        xv[it] = load_vec<VEC>(a.x + off + col_of(it));
        gv[it] = load_vec<VEC>(a.dy + off + col_of(it));
      }
    }
    acc_t mu = 0, rs = 0;
    if (active) {
      mu = a.mean != nullptr ? a.mean[row] : acc_t(0);
      rs = a.rstd[row];
    }
    acc_t sums[2] = {0, 0};  // sum g, sum g * xhat
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (ok(it)) {
        const int64_t col = col_of(it);
        acc_t w[VEC], dw[VEC], db[VEC];
        if (a.weight != nullptr) load_acc<VEC>(a.weight + col, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t xh = (to_acc(xv[it].v[j]) - mu) * rs;
          const acc_t d = to_acc(gv[it].v[j]);
          const acc_t gg = a.weight != nullptr ? d * w[j] : d;
          sums[0] += gg;
          sums[1] += gg * xh;
          dw[j] = d * xh;
          db[j] = d;
        }
        if (pdw != nullptr) add_acc<VEC>(pdw + g * C + col, dw);
        if (pdb != nullptr) add_acc<VEC>(pdb + g * C + col, db);
      }
    }
    group_sum(sums, T, red);
    const acc_t mg = a.rms ? acc_t(0) : sums[0] / cf;
    const acc_t mgx = sums[1] / cf;
    V gs[ITERS];
    if (a.grad_sum != nullptr) {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        if (ok(it)) gs[it] = load_vec<VEC>(a.grad_sum + off + col_of(it));
      }
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (ok(it)) {
        const int64_t col = col_of(it);
        acc_t w[VEC];
        if (a.weight != nullptr) load_acc<VEC>(a.weight + col, w);
        V o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t xh = (to_acc(xv[it].v[j]) - mu) * rs;
          const acc_t d = to_acc(gv[it].v[j]);
          const acc_t gg = a.weight != nullptr ? d * w[j] : d;
          acc_t r = rs * (gg - mg - xh * mgx);
          if (a.grad_sum != nullptr) r += to_acc(gs[it].v[j]);
          o.v[j] = static_cast<scalar_t>(r);
        }
        store_vec<VEC>(a.dx + off + col, o);
      }
    }
  }
  if (pdw != nullptr || pdb != nullptr) {
    __syncthreads();
    for (int s = G / 2; s > 0; s /= 2) {  // slice i += slice i + s, for i < s
      for (int64_t i = threadIdx.x; i < s * C; i += blockDim.x) {
        if (pdw != nullptr) pdw[i] += pdw[i + s * C];
        if (pdb != nullptr) pdb[i] += pdb[i + s * C];
      }
      __syncthreads();
    }
    for (int64_t col = threadIdx.x; col < C; col += blockDim.x) {
      if (pdw != nullptr) a.part_dw[blockIdx.x * C + col] = pdw[col];
      if (pdb != nullptr) a.part_db[blockIdx.x * C + col] = pdb[col];
    }
  }
}

// Row norm backward, K == 1, rows too long for registers: a block per row, two passes (sums,
// dx). Parameter sums are left to the channel reduction (sum2 kernels below).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kRowThreads) row_bwd_stream_kernel(const RowBwd<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  constexpr int U = kLoads<VEC>;
  __shared__ acc_t red[2 * kMaxWarps];
  const int64_t C = a.C;
  const acc_t cf = static_cast<acc_t>(C);
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t row = blockIdx.x; row < a.B; row += gridDim.x) {
    const int64_t off = row * C;
    const acc_t mu = a.mean != nullptr ? a.mean[row] : acc_t(0);
    const acc_t rs = a.rstd[row];
    acc_t sums[2] = {0, 0};
    for (int64_t c0 = static_cast<int64_t>(threadIdx.x) * VEC; c0 < C; c0 += step * U) {
      V xv[U], gv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = c0 + u * step;
        if (col < C) {
          xv[u] = load_vec<VEC>(a.x + off + col);
          gv[u] = load_vec<VEC>(a.dy + off + col);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = c0 + u * step;
        if (col < C) {
          acc_t w[VEC];
          if (a.weight != nullptr) load_acc<VEC>(a.weight + col, w);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t xh = (to_acc(xv[u].v[j]) - mu) * rs;
            const acc_t d = to_acc(gv[u].v[j]);
            const acc_t gg = a.weight != nullptr ? d * w[j] : d;
            sums[0] += gg;
            sums[1] += gg * xh;
          }
        }
      }
    }
    group_sum(sums, blockDim.x, red);
    const acc_t mg = a.rms ? acc_t(0) : sums[0] / cf;
    const acc_t mgx = sums[1] / cf;
    for (int64_t c0 = static_cast<int64_t>(threadIdx.x) * VEC; c0 < C; c0 += step * U) {
      V xv[U], gv[U], gs[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = c0 + u * step;
        if (col < C) {
          xv[u] = load_vec<VEC>(a.x + off + col);
          gv[u] = load_vec<VEC>(a.dy + off + col);
          if (a.grad_sum != nullptr) gs[u] = load_vec<VEC>(a.grad_sum + off + col);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = c0 + u * step;
        if (col < C) {
          acc_t w[VEC];
          if (a.weight != nullptr) load_acc<VEC>(a.weight + col, w);
          V o;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t xh = (to_acc(xv[u].v[j]) - mu) * rs;
            const acc_t d = to_acc(gv[u].v[j]);
            const acc_t gg = a.weight != nullptr ? d * w[j] : d;
            acc_t r = rs * (gg - mg - xh * mgx);
            if (a.grad_sum != nullptr) r += to_acc(gs[u].v[j]);
            o.v[j] = static_cast<scalar_t>(r);
          }
          store_vec<VEC>(a.dx + off + col, o);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row norm, K > 1 (LayerNorm2d on NCHW): block = TX threads along k (VEC consecutive k each,
// W = TX * VEC) x TY along C; a tile is (b, W consecutive k), grid-stride over B x ceil(K / W).
// Thread (tx, ty) owns channels ty, ty + TY, ...; with kCached its values stay in shared
// memory [C][TX] between passes (only it reads them back), else the passes re-read global memory.

template <typename scalar_t, int VEC, bool kCached>
__global__ void __launch_bounds__(kThreads) col_fwd_kernel(const RowFwd<scalar_t> a, const int TX) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  constexpr int U = kLoads<2 * VEC>;  // channels per batch: VEC columns of state each
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ acc_t red[kThreads * VEC];
  V* cache = reinterpret_cast<V*>(smem);
  const int TY = blockDim.x / TX, tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const int64_t C = a.C, K = a.K, W = static_cast<int64_t>(TX) * VEC;
  const int64_t ktiles = (K + W - 1) / W, tiles = a.B * ktiles;
  const int64_t cstep = static_cast<int64_t>(TY) * U;
  const acc_t cf = static_cast<acc_t>(C);
  const scalar_t* src = a.residual != nullptr ? a.s : a.x;  // for the uncached re-reads
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t b = t / ktiles;
    const int64_t k = (t - b * ktiles) * W + static_cast<int64_t>(tx) * VEC;
    const bool valid = k < K;
    const int64_t base = b * C * K + k;
    const auto ok = [&](int64_t c) { return valid && c < C; };
    acc_t shift[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) shift[j] = 0;
    if (!a.rms && valid) {
      V s0 = load_vec<VEC>(a.x + base);
      if (a.residual != nullptr) {
        const V r0 = load_vec<VEC>(a.residual + base);
#pragma unroll
        for (int j = 0; j < VEC; ++j) s0.v[j] = add_round(s0.v[j], r0.v[j]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) shift[j] = finite_or_zero(to_acc(s0.v[j]));
    }
    acc_t sum[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum[j] = 0;
    for (int64_t c0 = ty; c0 < C; c0 += cstep) {
      V v[U], r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * TY;
        if (ok(c)) {
          v[u] = load_vec<VEC>(a.x + base + c * K);
          if (a.residual != nullptr) r[u] = load_vec<VEC>(a.residual + base + c * K);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * TY;
        if (ok(c)) {
          if (a.residual != nullptr) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[u].v[j] = add_round(v[u].v[j], r[u].v[j]);
            store_vec<VEC>(a.s + base + c * K, v[u]);
          }
          if constexpr (kCached) cache[c * TX + tx] = v[u];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t d = to_acc(v[u].v[j]) - shift[j];
            sum[j] += a.rms ? d * d : d;
          }
        }
      }
    }
    column_sum(sum, TX, red);
    acc_t mean[VEC], rstd[VEC];
    if (a.rms) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        mean[j] = 0;
        rstd[j] = inv_std(sum[j] / cf, a.eps);
      }
    } else {
      acc_t sq[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        mean[j] = sum[j] / cf;
        sq[j] = 0;
      }
      for (int64_t c0 = ty; c0 < C; c0 += cstep) {
        V v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t c = c0 + u * TY;
          if (ok(c)) v[u] = kCached ? cache[c * TX + tx] : load_vec<VEC>(src + base + c * K);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (ok(c0 + u * TY)) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              const acc_t d = (to_acc(v[u].v[j]) - shift[j]) - mean[j];
              sq[j] += d * d;
            }
          }
        }
      }
      column_sum(sq, TX, red);
#pragma unroll
      for (int j = 0; j < VEC; ++j) rstd[j] = inv_std(sq[j] / cf, a.eps);
    }
    if (ty == 0 && valid) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (a.mean != nullptr) a.mean[b * K + k + j] = shift[j] + mean[j];
        a.rstd[b * K + k + j] = rstd[j];
      }
    }
    for (int64_t c0 = ty; c0 < C; c0 += cstep) {
      V v[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * TY;
        if (ok(c)) v[u] = kCached ? cache[c * TX + tx] : load_vec<VEC>(src + base + c * K);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * TY;
        if (ok(c)) {
          const acc_t w = a.weight != nullptr ? a.weight[c] : acc_t(1);
          const acc_t bb = a.bias != nullptr ? a.bias[c] : acc_t(0);
          V o;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t n = ((to_acc(v[u].v[j]) - shift[j]) - mean[j]) * rstd[j];
            o.v[j] = static_cast<scalar_t>(affine(n, a.weight, a.bias, w, bb));
          }
          store_vec<VEC>(a.y + base + c * K, o);
        }
      }
    }
  }
}

// Bytes before the slab caches in col_bwd_kernel's shared memory: the parameter slots.
__host__ __device__ inline int64_t col_bwd_param_bytes(int64_t nparam, int64_t C, int64_t TX,
                                                       int64_t acc_size) {
  return (nparam * C * TX * acc_size + 15) / 16 * 16;
}

// Backward of the above. Parameter sums, when fused, go to this thread's slot [c][tx] of
// shared memory (its VEC columns added in order), summed over tx at the end into the block's
// partial row.
template <typename scalar_t, int VEC, bool kCached>
__global__ void __launch_bounds__(kThreads) col_bwd_kernel(const RowBwd<scalar_t> a, const int TX) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  constexpr int U = kLoads<2 * VEC>;  // channels per batch: VEC columns of state each
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ acc_t red[kThreads * 2 * VEC];
  const int TY = blockDim.x / TX, tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const int64_t C = a.C, K = a.K, W = static_cast<int64_t>(TX) * VEC;
  const int64_t ktiles = (K + W - 1) / W, tiles = a.B * ktiles;
  const int64_t cstep = static_cast<int64_t>(TY) * U;
  const acc_t cf = static_cast<acc_t>(C);
  acc_t* pdw = a.part_dw != nullptr ? reinterpret_cast<acc_t*>(smem) : nullptr;
  acc_t* pdb = a.part_db != nullptr
                   ? reinterpret_cast<acc_t*>(smem) + (pdw != nullptr ? C * TX : 0)
                   : nullptr;
  const int64_t nparam = (pdw != nullptr ? 1 : 0) + (pdb != nullptr ? 1 : 0);
  V* cx = reinterpret_cast<V*>(smem + col_bwd_param_bytes(nparam, C, TX, sizeof(acc_t)));
  V* cd = cx + C * TX;
  for (int64_t c = ty; c < C; c += TY) {
    if (pdw != nullptr) pdw[c * TX + tx] = acc_t(0);
    if (pdb != nullptr) pdb[c * TX + tx] = acc_t(0);
  }
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t b = t / ktiles;
    const int64_t k = (t - b * ktiles) * W + static_cast<int64_t>(tx) * VEC;
    const bool valid = k < K;
    const int64_t base = b * C * K + k;
    const auto ok = [&](int64_t c) { return valid && c < C; };
    acc_t mu[VEC], rs[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      mu[j] = valid && a.mean != nullptr ? a.mean[b * K + k + j] : acc_t(0);
      rs[j] = valid ? a.rstd[b * K + k + j] : acc_t(0);
    }
    acc_t sums[2 * VEC];  // [j]: sum g, [VEC + j]: sum g * xhat
#pragma unroll
    for (int j = 0; j < 2 * VEC; ++j) sums[j] = 0;
    for (int64_t c0 = ty; c0 < C; c0 += cstep) {
      V xv[U], gv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * TY;
        if (ok(c)) {
          xv[u] = load_vec<VEC>(a.x + base + c * K);
          gv[u] = load_vec<VEC>(a.dy + base + c * K);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * TY;
        if (ok(c)) {
          if constexpr (kCached) {
            cx[c * TX + tx] = xv[u];
            cd[c * TX + tx] = gv[u];
          }
          const acc_t w = a.weight != nullptr ? a.weight[c] : acc_t(1);
          acc_t pw = 0, pb = 0;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t xh = (to_acc(xv[u].v[j]) - mu[j]) * rs[j];
            const acc_t d = to_acc(gv[u].v[j]);
            const acc_t gg = a.weight != nullptr ? d * w : d;
            sums[j] += gg;
            sums[VEC + j] += gg * xh;
            pw += d * xh;
            pb += d;
          }
          if (pdw != nullptr) pdw[c * TX + tx] += pw;
          if (pdb != nullptr) pdb[c * TX + tx] += pb;
        }
      }
    }
    column_sum(sums, TX, red);
    acc_t mg[VEC], mgx[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      mg[j] = a.rms ? acc_t(0) : sums[j] / cf;
      mgx[j] = sums[VEC + j] / cf;
    }
    for (int64_t c0 = ty; c0 < C; c0 += cstep) {
      V xv[U], gv[U], gs[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * TY;
        if (ok(c)) {
          if constexpr (kCached) {
            xv[u] = cx[c * TX + tx];
            gv[u] = cd[c * TX + tx];
          } else {
            xv[u] = load_vec<VEC>(a.x + base + c * K);
            gv[u] = load_vec<VEC>(a.dy + base + c * K);
          }
          if (a.grad_sum != nullptr) gs[u] = load_vec<VEC>(a.grad_sum + base + c * K);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t c = c0 + u * TY;
        if (ok(c)) {
          const acc_t w = a.weight != nullptr ? a.weight[c] : acc_t(1);
          V o;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t xh = (to_acc(xv[u].v[j]) - mu[j]) * rs[j];
            const acc_t d = to_acc(gv[u].v[j]);
            const acc_t gg = a.weight != nullptr ? d * w : d;
            acc_t r = rs[j] * (gg - mg[j] - xh * mgx[j]);
            if (a.grad_sum != nullptr) r += to_acc(gs[u].v[j]);
            o.v[j] = static_cast<scalar_t>(r);
          }
          store_vec<VEC>(a.dx + base + c * K, o);
        }
      }
    }
  }
  if (nparam > 0) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      if (pdw != nullptr) {
        acc_t s = pdw[c * TX];
        for (int i = 1; i < TX; ++i) s += pdw[c * TX + i];
        a.part_dw[blockIdx.x * C + c] = s;
      }
      if (pdb != nullptr) {
        acc_t s = pdb[c * TX];
        for (int i = 1; i < TX; ++i) s += pdb[c * TX + i];
        a.part_db[blockIdx.x * C + c] = s;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-channel reductions over (b, k), one partial per (chunk p, channel c) at [p * C + c].
//   rows layout (K == 1): x is (rows, C); block (TX, TY): threadIdx.x along channel vectors
//     (coalesced), threadIdx.y along the rows of chunk blockIdx.y; grid (ceil(C / (TX*VEC)), P).
//   planes layout (K > 1): block = one channel blockIdx.x and a chunk blockIdx.y of its B*K/VEC
//     vectors (b, k), VEC consecutive k each; grid (C, P).
// Partials within a block are combined in a fixed tree; the finalizers combine the P partials.

// Welford statistics of (x - shift[c]), shift[c] = x[0, c, 0] (finite, else 0); a thread
// takes kUnroll loads at a time, takes their mean and squared deviations directly and merges
// that batch (Chan): one division per batch.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    welford_rows_kernel(const scalar_t* __restrict__ x,
                        at::opmath_type<scalar_t>* __restrict__ part_mean,
                        at::opmath_type<scalar_t>* __restrict__ part_m2, const int64_t rows,
                        const int64_t C, const int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  __shared__ int64_t sn[kThreads];
  __shared__ acc_t smean[kThreads * VEC], sm2[kThreads * VEC];
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = threadIdx.y * TX + threadIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * TX + threadIdx.x) * VEC;
  const bool valid = c < C;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r1 = std::min(rows, r0 + chunk);
  int64_t n = 0;
  acc_t mean[VEC], m2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = 0;
  if (valid) {
    acc_t shift[VEC];
    const V s0 = load_vec<VEC>(x + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) shift[j] = finite_or_zero(to_acc(s0.v[j]));
    for (int64_t r = r0 + threadIdx.y; r < r1; r += static_cast<int64_t>(TY) * kUnroll) {
      V v[kUnroll];
      int nb = 0;  // the valid loads are a prefix
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t rr = r + static_cast<int64_t>(u) * TY;
        if (rr < r1) {
          v[u] = load_vec<VEC>(x + rr * C + c);
          ++nb;
        }
      }
      const int64_t nn = n + nb;
      const acc_t inv_nb = acc_t(1) / static_cast<acc_t>(nb);
      const acc_t ratio = static_cast<acc_t>(nb) / static_cast<acc_t>(nn);
      const acc_t cross = static_cast<acc_t>(n) * ratio;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc_t s = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (u < nb) s += to_acc(v[u].v[j]) - shift[j];
        }
        const acc_t bm = s * inv_nb;
        acc_t q = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (u < nb) {
            const acc_t e = (to_acc(v[u].v[j]) - shift[j]) - bm;
            q += e * e;
          }
        }
        const acc_t delta = bm - mean[j];
        mean[j] += delta * ratio;
        m2[j] += q + delta * delta * cross;
      }
      n = nn;
    }
  }
  // Tree over threadIdx.y: row y takes row y + s, s = TY/2, TY/4, ...
  sn[tid] = n;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    smean[j * kThreads + tid] = mean[j];
    sm2[j * kThreads + tid] = m2[j];
  }
  __syncthreads();
  for (int s = TY / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.y) < s) {
      const int o = tid + s * TX;
      const int64_t nb = sn[o];
      if (nb > 0) {
        if (n == 0) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            mean[j] = smean[j * kThreads + o];
            m2[j] = sm2[j * kThreads + o];
          }
          n = nb;
        } else {
          const int64_t nn = n + nb;
          const acc_t ratio = static_cast<acc_t>(nb) / static_cast<acc_t>(nn);
          const acc_t cross = static_cast<acc_t>(n) * ratio;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t delta = smean[j * kThreads + o] - mean[j];
            mean[j] += delta * ratio;
            m2[j] += sm2[j * kThreads + o] + delta * delta * cross;
          }
          n = nn;
        }
        sn[tid] = n;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          smean[j * kThreads + tid] = mean[j];
          sm2[j * kThreads + tid] = m2[j];
        }
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && valid) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      part_mean[blockIdx.y * C + c + j] = mean[j];
      part_m2[blockIdx.y * C + c + j] = m2[j];
    }
  }
}

// Merges a block's per-thread Welford states (1D block of kThreads) into thread 0: shuffles
// down within each warp (fixed tree), then warp 0's lane 0 takes the warps in order.
template <typename acc_t>
__device__ __forceinline__ void block_welford(int64_t& n, acc_t& mean, acc_t& m2) {
  __shared__ int64_t sn[kThreads / kWarp];
  __shared__ acc_t smean[kThreads / kWarp], sm2[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const int64_t nb = __shfl_down_sync(0xffffffffu, n, o);
    const acc_t mb = __shfl_down_sync(0xffffffffu, mean, o);
    const acc_t m2b = __shfl_down_sync(0xffffffffu, m2, o);
    if (lane + o < kWarp) chan_merge(n, mean, m2, nb, mb, m2b);
  }
  if (lane == 0) {
    sn[warp] = n;
    smean[warp] = mean;
    sm2[warp] = m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) {
      chan_merge(n, mean, m2, sn[w], smean[w], sm2[w]);
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    welford_planes_kernel(const scalar_t* __restrict__ x,
                          at::opmath_type<scalar_t>* __restrict__ part_mean,
                          at::opmath_type<scalar_t>* __restrict__ part_m2, const int64_t B,
                          const int64_t C, const int64_t K, const int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  constexpr int U = kLoads<VEC>;
  const int64_t c = blockIdx.x;
  const int64_t nvk = K / VEC, nv = B * nvk;
  const int64_t v0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t v1 = std::min(nv, v0 + chunk);
  const int64_t step = static_cast<int64_t>(blockDim.x);
  const acc_t shift = finite_or_zero(to_acc(x[c * K]));
  int64_t n = 0;
  acc_t mean = 0, m2 = 0;
  for (int64_t v = v0 + threadIdx.x; v < v1; v += step * U) {
    V vals[U];
    int nu = 0;  // the valid loads are a prefix
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t vv = v + u * step;
      if (vv < v1) {
        const DivMod bk = divmod(vv, nvk);
        vals[u] = load_vec<VEC>(x + (bk.q * C + c) * K + bk.r * VEC);
        ++nu;
      }
    }
    const int64_t nb = static_cast<int64_t>(nu) * VEC;
    acc_t s = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nu) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += to_acc(vals[u].v[j]) - shift;
      }
    }
    const acc_t bm = s / static_cast<acc_t>(nb);
    acc_t q = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < nu) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t e = (to_acc(vals[u].v[j]) - shift) - bm;
          q += e * e;
        }
      }
    }
    chan_merge(n, mean, m2, nb, bm, q);
  }
  block_welford(n, mean, m2);
  if (threadIdx.x == 0) {
    part_mean[blockIdx.y * C + c] = mean;
    part_m2[blockIdx.y * C + c] = m2;
  }
}

// Channel c's partials p = 0..P-1 -> mean[c], var[c] (biased). Partial p counts
// (min(units, (p + 1) * chunk) - p * chunk) * per_unit values. Block (32 channels, 32 lanes
// over p), then a tree over the lanes.
template <typename scalar_t>
__global__ void __launch_bounds__(kFinalThreads)
    welford_finalize_kernel(const at::opmath_type<scalar_t>* __restrict__ part_mean,
                            const at::opmath_type<scalar_t>* __restrict__ part_m2,
                            const scalar_t* __restrict__ x, const int64_t C, const int64_t K,
                            const int64_t P, const int64_t units, const int64_t chunk,
                            const int64_t per_unit,
                            at::opmath_type<scalar_t>* __restrict__ mean_out,
                            at::opmath_type<scalar_t>* __restrict__ var_out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int64_t sn[kFinalThreads];
  __shared__ acc_t smean[kFinalThreads], sm2[kFinalThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t n = 0;
  acc_t mean = 0, m2 = 0;
  if (c < C) {
    for (int64_t p = threadIdx.y; p < P; p += blockDim.y) {
      const int64_t nb = (std::min(units, (p + 1) * chunk) - p * chunk) * per_unit;
      chan_merge(n, mean, m2, nb, part_mean[p * C + c], part_m2[p * C + c]);
    }
  }
  sn[tid] = n;
  smean[tid] = mean;
  sm2[tid] = m2;
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.y) < s) {
      const int o = tid + s * blockDim.x;
      chan_merge(n, mean, m2, sn[o], smean[o], sm2[o]);
      sn[tid] = n;
      smean[tid] = mean;
      sm2[tid] = m2;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) {
    const acc_t shift = finite_or_zero(to_acc(x[c * K]));
    mean_out[c] = shift + mean;
    var_out[c] = m2 / static_cast<acc_t>(n);
  }
}

// Two sums per channel: s1 = sum dy', s2 = sum dy' * (x - m) * r, where dy' = grad_y, or 0
// where y <= 0 when y is given (torch's threshold_backward: a NaN y passes the gradient).
//   BatchNorm bwd_reduce: m = mean[c], r = 1 / sqrt(var[c] + eps)    (kRowStats false)
//   row-norm parameter gradients: m = mean[b, k] (0 for RMSNorm), r = rstd[b, k]  (kRowStats)
//     -> s1 = dbias, s2 = dweight.
template <typename scalar_t>
struct Sum2 {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* y;  // null: no mask
  const acc_t* m;     // kRowStats: (B, K) mean or null
  const acc_t* r;     // kRowStats: (B, K) rstd
  ChanVec<scalar_t> mean, var;  // not kRowStats: (C,) each
  acc_t eps;
  acc_t* part1;
  acc_t* part2;
  int64_t B, C, K;
};

template <typename acc_t>
__device__ __forceinline__ acc_t masked(acc_t d, bool has_y, acc_t yv) {
  return has_y && yv <= acc_t(0) ? acc_t(0) : d;
}

template <typename scalar_t, int VEC, bool kRowStats>
__global__ void __launch_bounds__(kThreads)
    sum2_rows_kernel(const Sum2<scalar_t> a, const int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  __shared__ acc_t s_1[kThreads * VEC], s_2[kThreads * VEC];
  const int TX = blockDim.x, TY = blockDim.y;
  const int tid = threadIdx.y * TX + threadIdx.x;
  const int64_t C = a.C;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * TX + threadIdx.x) * VEC;
  const bool valid = c < C;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r1 = std::min(a.B, r0 + chunk);
  acc_t s1[VEC], s2[VEC], cm[VEC], cr[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s1[j] = s2[j] = cm[j] = cr[j] = 0;
  if (valid) {
    if constexpr (!kRowStats) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        cm[j] = a.mean[c + j];
        cr[j] = inv_std(a.var[c + j], a.eps);
      }
    }
    for (int64_t r = r0 + threadIdx.y; r < r1; r += static_cast<int64_t>(TY) * kUnroll) {
      V dv[kUnroll], xv[kUnroll], yv[kUnroll];
      acc_t rm[kUnroll], rr[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + static_cast<int64_t>(u) * TY;
        if (row < r1) {
          dv[u] = load_vec<VEC>(a.dy + row * C + c);
          xv[u] = load_vec<VEC>(a.x + row * C + c);
          if (a.y != nullptr) yv[u] = load_vec<VEC>(a.y + row * C + c);
          if constexpr (kRowStats) {
            rm[u] = a.m != nullptr ? a.m[row] : acc_t(0);
            rr[u] = a.r[row];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + static_cast<int64_t>(u) * TY < r1) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t d = masked(to_acc(dv[u].v[j]), a.y != nullptr,
                                   a.y != nullptr ? to_acc(yv[u].v[j]) : acc_t(0));
            const acc_t m = kRowStats ? rm[u] : cm[j];
            const acc_t rs = kRowStats ? rr[u] : cr[j];
            s1[j] += d;
            s2[j] += d * ((to_acc(xv[u].v[j]) - m) * rs);
          }
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s_1[j * kThreads + tid] = s1[j];
    s_2[j * kThreads + tid] = s2[j];
  }
  __syncthreads();
  for (int s = TY / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.y) < s) {
      const int o = tid + s * TX;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        s1[j] += s_1[j * kThreads + o];
        s2[j] += s_2[j * kThreads + o];
        s_1[j * kThreads + tid] = s1[j];
        s_2[j * kThreads + tid] = s2[j];
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && valid) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      a.part1[blockIdx.y * C + c + j] = s1[j];
      a.part2[blockIdx.y * C + c + j] = s2[j];
    }
  }
}

// Sums a value over a 1D block of kThreads into thread 0 (shuffle-down tree, warps in order).
template <int N, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[N]) {
  __shared__ acc_t red[N][kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int o = kWarp / 2; o > 0; o /= 2) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] += __shfl_down_sync(0xffffffffu, v[n], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) red[n][warp] = v[n];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
      acc_t s = red[n][0];
      for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) s += red[n][w];
      v[n] = s;
    }
  }
}

template <typename scalar_t, int VEC, bool kRowStats>
__global__ void __launch_bounds__(kThreads)
    sum2_planes_kernel(const Sum2<scalar_t> a, const int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  constexpr int U = kLoads<VEC>;
  const int64_t C = a.C, K = a.K;
  const int64_t c = blockIdx.x;
  const int64_t nvk = K / VEC, nv = a.B * nvk;
  const int64_t v0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t v1 = std::min(nv, v0 + chunk);
  const int64_t step = static_cast<int64_t>(blockDim.x);
  acc_t cm = 0, cr = 0;
  if constexpr (!kRowStats) {
    cm = a.mean[c];
    cr = inv_std(a.var[c], a.eps);
  }
  acc_t s[2] = {0, 0};
  for (int64_t v = v0 + threadIdx.x; v < v1; v += step * U) {
    V dv[U], xv[U], yv[U];
    acc_t rm[U][VEC], rr[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t vv = v + u * step;
      if (vv < v1) {
        const DivMod bk = divmod(vv, nvk);
        const int64_t off = (bk.q * C + c) * K + bk.r * VEC;
        dv[u] = load_vec<VEC>(a.dy + off);
        xv[u] = load_vec<VEC>(a.x + off);
        if (a.y != nullptr) yv[u] = load_vec<VEC>(a.y + off);
        if constexpr (kRowStats) {
          const int64_t st = bk.q * K + bk.r * VEC;
          if (a.m != nullptr) {
            load_acc<VEC>(a.m + st, rm[u]);
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) rm[u][j] = 0;
          }
          load_acc<VEC>(a.r + st, rr[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (v + u * step < v1) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t d = masked(to_acc(dv[u].v[j]), a.y != nullptr,
                                 a.y != nullptr ? to_acc(yv[u].v[j]) : acc_t(0));
          const acc_t m = kRowStats ? rm[u][j] : cm;
          const acc_t rs = kRowStats ? rr[u][j] : cr;
          s[0] += d;
          s[1] += d * ((to_acc(xv[u].v[j]) - m) * rs);
        }
      }
    }
  }
  block_sum(s);
  if (threadIdx.x == 0) {
    a.part1[blockIdx.y * C + c] = s[0];
    a.part2[blockIdx.y * C + c] = s[1];
  }
}

// out[c] = sum over p of part[p * C + c] for each non-null (part, out) pair, in a fixed order:
// block (32 channels, 32 lanes over p), then a tree over the lanes.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    sum_finalize_kernel(const acc_t* __restrict__ part1, const acc_t* __restrict__ part2,
                        acc_t* __restrict__ out1, acc_t* __restrict__ out2, const int64_t P,
                        const int64_t C) {
  __shared__ acc_t s_1[kFinalThreads], s_2[kFinalThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  acc_t a1 = 0, a2 = 0;
  if (c < C) {
    for (int64_t p = threadIdx.y; p < P; p += blockDim.y) {
      if (out1 != nullptr) a1 += part1[p * C + c];
      if (out2 != nullptr) a2 += part2[p * C + c];
    }
  }
  s_1[tid] = a1;
  s_2[tid] = a2;
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.y) < s) {
      a1 += s_1[tid + s * blockDim.x];
      a2 += s_2[tid + s * blockDim.x];
      s_1[tid] = a1;
      s_2[tid] = a2;
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) {
    if (out1 != nullptr) out1[c] = a1;
    if (out2 != nullptr) out2[c] = a2;
  }
}

// ---------------------------------------------------------------------------------------------
// BatchNorm elementwise. Per-channel values are computed where a thread needs them:
//   rows (K == 1): block (TX, TY) as in the rows reductions, a thread's channels fixed, so once
//     per thread; grid-stride over rows.
//   tiles (K > 1): kTile = kThreads * VEC * U consecutive elements per tile; the tile's data is
//     loaded first, then its planes' values (at most kTile / K + 2 planes) are put in shared
//     memory, then each vector finds its plane. K % VEC == 0, so a vector never straddles two.

template <typename scalar_t>
struct BnFwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  ChanVec<scalar_t> mean, var;
  ChanVec<scalar_t> weight;  // absent: 1
  ChanVec<scalar_t> bias;    // absent: 0
  const scalar_t* residual;
  scalar_t* y;
  int64_t B, C, K;
  acc_t eps;
  bool relu;
};

template <typename scalar_t>
struct BnBwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* y;  // null: no relu mask
  ChanVec<scalar_t> mean, var;
  ChanVec<scalar_t> weight;  // absent: 1
  const acc_t* sum_dy;
  const acc_t* sum_dy_xhat;
  scalar_t* dx;
  scalar_t* dres;  // null: not asked
  int64_t B, C, K;
  acc_t eps;
  acc_t count;  // 0: eval (the statistics were constants)
};

// Running statistics: running[i] = keep * running[i] + take[i] * batch[i] per channel, in acc,
// rounded once to the running stats' dtype; blockIdx.y picks the tensor (mean 0, var 1).
template <typename scalar_t>
struct RunningUpdate {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* running[2];
  const acc_t* batch[2];
  acc_t take[2];
  acc_t keep;
  int64_t C;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) update_running_kernel(const RunningUpdate<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  scalar_t* r = a.running[blockIdx.y];
  r[c] = static_cast<scalar_t>(a.keep * to_acc(r[c]) + a.take[blockIdx.y] * a.batch[blockIdx.y][c]);
}

// BatchNorm forward of one value: v = (x - mean) * invstd * w + b (+ residual), relu keeps NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t bn_fwd_value(acc_t x, acc_t m, acc_t is, acc_t w, acc_t b,
                                              bool has_w, bool has_b) {
  acc_t v = (x - m) * is;
  if (has_w) v *= w;
  if (has_b) v += b;
  return v;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_fwd_rows_kernel(const BnFwd<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t C = a.C;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;  // no barriers below
  acc_t m[VEC], is[VEC], w[VEC], b[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    m[j] = a.mean[c + j];
    is[j] = inv_std(a.var[c + j], a.eps);
    w[j] = a.weight.given() ? a.weight[c + j] : acc_t(1);
    b[j] = a.bias.given() ? a.bias[c + j] : acc_t(0);
  }
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < a.B;
       r += step * kUnroll) {
    V xv[kUnroll], rv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * step;
      if (row < a.B) {
        xv[u] = load_vec<VEC>(a.x + row * C + c);
        if (a.residual != nullptr) rv[u] = load_vec<VEC>(a.residual + row * C + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * step;
      if (row < a.B) {
        V o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_t v = bn_fwd_value(to_acc(xv[u].v[j]), m[j], is[j], w[j], b[j], a.weight.given(),
                                 a.bias.given());
          if (a.residual != nullptr) v += to_acc(rv[u].v[j]);
          if (a.relu) v = v < acc_t(0) ? acc_t(0) : v;
          o.v[j] = static_cast<scalar_t>(v);
        }
        store_vec<VEC>(a.y + row * C + c, o);
      }
    }
  }
}

template <typename scalar_t, int VEC, int U>
__global__ void __launch_bounds__(kThreads) bn_fwd_tiles_kernel(const BnFwd<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  constexpr int64_t kTile = static_cast<int64_t>(kThreads) * VEC * U;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t C = a.C, K = a.K, N = a.B * C * K;
  const int64_t np_max = std::min(a.B * C, kTile / K + 2);
  acc_t* pm = reinterpret_cast<acc_t*>(smem);
  acc_t* pis = pm + np_max;
  acc_t* pw = pis + np_max;
  acc_t* pb = pw + np_max;
  const int64_t tiles = (N + kTile - 1) / kTile;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t start = t * kTile, end = std::min(N, start + kTile);
    const int64_t p0 = start / K, np = (end - 1) / K - p0 + 1;
    V xv[U], rv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = start + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * VEC;
      if (i < end) {
        xv[u] = load_vec<VEC>(a.x + i);
        if (a.residual != nullptr) rv[u] = load_vec<VEC>(a.residual + i);
      }
    }
    __syncthreads();  // the previous tile's readers are done with the plane values
    for (int64_t q = threadIdx.x; q < np; q += blockDim.x) {
      const int64_t c = (p0 + q) % C;
      pm[q] = a.mean[c];
      pis[q] = inv_std(a.var[c], a.eps);
      pw[q] = a.weight.given() ? a.weight[c] : acc_t(1);
      pb[q] = a.bias.given() ? a.bias[c] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = start + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * VEC;
      if (i < end) {
        const int64_t q = divmod(i, K).q - p0;
        V o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_t v = bn_fwd_value(to_acc(xv[u].v[j]), pm[q], pis[q], pw[q], pb[q],
                                 a.weight.given(), a.bias.given());
          if (a.residual != nullptr) v += to_acc(rv[u].v[j]);
          if (a.relu) v = v < acc_t(0) ? acc_t(0) : v;
          o.v[j] = static_cast<scalar_t>(v);
        }
        store_vec<VEC>(a.y + i, o);
      }
    }
  }
}

// BatchNorm backward of one value, given the channel's invstd, a = w * invstd and the means
// of the two sums (mdy = sum_dy / count, mdyx = sum_dy_xhat / count).
template <typename acc_t>
__device__ __forceinline__ acc_t bn_bwd_value(acc_t d, acc_t x, acc_t m, acc_t is, acc_t aw,
                                              acc_t mdy, acc_t mdyx, bool train) {
  if (!train) return aw * d;
  const acc_t xh = (x - m) * is;
  return aw * (d - mdy - xh * mdyx);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) bn_bwd_rows_kernel(const BnBwd<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t C = a.C;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;  // no barriers below
  const bool train = a.count != acc_t(0);
  acc_t m[VEC], is[VEC], aw[VEC], mdy[VEC], mdyx[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    m[j] = a.mean[c + j];
    is[j] = inv_std(a.var[c + j], a.eps);
    aw[j] = a.weight.given() ? a.weight[c + j] * is[j] : is[j];
    mdy[j] = train ? a.sum_dy[c + j] / a.count : acc_t(0);
    mdyx[j] = train ? a.sum_dy_xhat[c + j] / a.count : acc_t(0);
  }
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < a.B;
       r += step * kUnroll) {
    V dv[kUnroll], xv[kUnroll], yv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * step;
      if (row < a.B) {
        dv[u] = load_vec<VEC>(a.dy + row * C + c);
        if (train) xv[u] = load_vec<VEC>(a.x + row * C + c);
        if (a.y != nullptr) yv[u] = load_vec<VEC>(a.y + row * C + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = r + u * step;
      if (row < a.B) {
        V o, dr;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t d = masked(to_acc(dv[u].v[j]), a.y != nullptr,
                                 a.y != nullptr ? to_acc(yv[u].v[j]) : acc_t(0));
          dr.v[j] = static_cast<scalar_t>(d);
          const acc_t xx = train ? to_acc(xv[u].v[j]) : acc_t(0);
          o.v[j] = static_cast<scalar_t>(
              bn_bwd_value(d, xx, m[j], is[j], aw[j], mdy[j], mdyx[j], train));
        }
        store_vec<VEC>(a.dx + row * C + c, o);
        if (a.dres != nullptr) store_vec<VEC>(a.dres + row * C + c, dr);
      }
    }
  }
}

template <typename scalar_t, int VEC, int U>
__global__ void __launch_bounds__(kThreads) bn_bwd_tiles_kernel(const BnBwd<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  constexpr int64_t kTile = static_cast<int64_t>(kThreads) * VEC * U;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t C = a.C, K = a.K, N = a.B * C * K;
  const int64_t np_max = std::min(a.B * C, kTile / K + 2);
  const bool train = a.count != acc_t(0);
  acc_t* pm = reinterpret_cast<acc_t*>(smem);
  acc_t* pis = pm + np_max;
  acc_t* paw = pis + np_max;
  acc_t* pmdy = paw + np_max;
  acc_t* pmdyx = pmdy + np_max;
  const int64_t tiles = (N + kTile - 1) / kTile;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t start = t * kTile, end = std::min(N, start + kTile);
    const int64_t p0 = start / K, np = (end - 1) / K - p0 + 1;
    V dv[U], xv[U], yv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = start + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * VEC;
      if (i < end) {
        dv[u] = load_vec<VEC>(a.dy + i);
        if (train) xv[u] = load_vec<VEC>(a.x + i);
        if (a.y != nullptr) yv[u] = load_vec<VEC>(a.y + i);
      }
    }
    __syncthreads();  // the previous tile's readers are done with the plane values
    for (int64_t q = threadIdx.x; q < np; q += blockDim.x) {
      const int64_t c = (p0 + q) % C;
      const acc_t is = inv_std(a.var[c], a.eps);
      pm[q] = a.mean[c];
      pis[q] = is;
      paw[q] = a.weight.given() ? a.weight[c] * is : is;
      pmdy[q] = train ? a.sum_dy[c] / a.count : acc_t(0);
      pmdyx[q] = train ? a.sum_dy_xhat[c] / a.count : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = start + (static_cast<int64_t>(u) * kThreads + threadIdx.x) * VEC;
      if (i < end) {
        const int64_t q = divmod(i, K).q - p0;
        V o, dr;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t d = masked(to_acc(dv[u].v[j]), a.y != nullptr,
                                 a.y != nullptr ? to_acc(yv[u].v[j]) : acc_t(0));
          dr.v[j] = static_cast<scalar_t>(d);
          const acc_t xx = train ? to_acc(xv[u].v[j]) : acc_t(0);
          o.v[j] = static_cast<scalar_t>(
              bn_bwd_value(d, xx, pm[q], pis[q], paw[q], pmdy[q], pmdyx[q], train));
        }
        store_vec<VEC>(a.dx + i, o);
        if (a.dres != nullptr) store_vec<VEC>(a.dres + i, dr);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side plans (pure functions of the shape and the device's numbers)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t pow2_ceil(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// K == 1 row kernels: T threads per row, ITERS vectors of VEC per thread. Prefer pref_iters
// vectors per thread (loads in flight) with up to max_threads threads per row, then up to
// max_iters; beyond that the row does not fit registers (regs false: streaming kernel).
struct RowPlan {
  bool regs = false;
  int T = 0, iters = 0, threads = 0;
};

RowPlan plan_row(int64_t nvec, int pref_iters, int max_iters, int max_threads, int min_threads) {
  RowPlan p;
  if (nvec <= static_cast<int64_t>(kWarp) * pref_iters) {
    p.T = static_cast<int>(std::min<int64_t>(kWarp, pow2_ceil(nvec)));
  } else if (nvec <= static_cast<int64_t>(max_threads) * pref_iters) {
    p.T = static_cast<int>(pow2_ceil(ceil_div(nvec, pref_iters)));
  } else if (nvec <= static_cast<int64_t>(max_threads) * max_iters) {
    p.T = max_threads;
  } else {
    p.threads = kRowThreads;
    return p;
  }
  p.regs = true;
  p.iters = static_cast<int>(pow2_ceil(ceil_div(nvec, p.T)));
  p.threads = std::max(p.T, min_threads);
  return p;
}

// K > 1 column kernels: TY threads along C, TX along k, TX * TY = 256; TX as small as keeps
// 128 contiguous bytes per channel row of a tile (TX * bytes >= 128), so TY covers more of C.
struct ColPlan {
  int TX = 0, TY = 0;
};

ColPlan plan_col(int64_t C, int bytes_per_thread) {
  const int min_tx = std::clamp(128 / bytes_per_thread, 1, kThreads);
  ColPlan p;
  p.TY = static_cast<int>(std::min<int64_t>(kThreads / min_tx, pow2_ceil(C)));
  p.TX = kThreads / p.TY;
  return p;
}

// Rows-layout reductions and elementwise kernels: TX lanes along channel vectors, TY rows.
struct RowsGrid {
  int TX = 0, TY = 0;
  int64_t ctiles = 0, chunks = 0, chunk = 0;
};

RowsGrid plan_rows_grid(int64_t rows, int64_t C, int vec, int64_t target_blocks) {
  RowsGrid g;
  const int64_t nvc = ceil_div(C, vec);
  g.TX = static_cast<int>(std::min<int64_t>(kWarp, pow2_ceil(nvc)));
  g.TY = kThreads / g.TX;
  g.ctiles = ceil_div(nvc, g.TX);
  const int64_t most = std::min(kMaxGridY, std::max<int64_t>(1, ceil_div(rows, g.TY * kUnroll)));
  g.chunks = std::clamp<int64_t>(target_blocks / g.ctiles, 1, most);
  g.chunk = ceil_div(rows, g.chunks);
  g.chunks = ceil_div(rows, g.chunk);  // every chunk non-empty
  return g;
}

// Planes-layout reductions: per channel, nv vectors split into chunks (grid.y).
struct PlanesGrid {
  int64_t chunks = 0, chunk = 0;
};

PlanesGrid plan_planes_grid(int64_t nv, int64_t C, int64_t target_blocks) {
  PlanesGrid g;
  const int64_t most = std::min(
      kMaxGridY, std::max<int64_t>(1, ceil_div(nv, static_cast<int64_t>(kThreads) * kUnroll)));
  g.chunks = std::clamp<int64_t>(target_blocks / C, 1, most);
  g.chunk = ceil_div(nv, g.chunks);
  g.chunks = ceil_div(nv, g.chunk);
  return g;
}

// BatchNorm elementwise tiles: vectors per thread per tile (tile = 2 * 256 * 16 bytes).
constexpr int kTileUnroll = 2;

int64_t bn_tile_planes(int64_t tile, int64_t K, int64_t planes) {
  return std::min(planes, tile / K + 2);
}

// ---------------------------------------------------------------------------------------------
// host side

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename... P>
bool all_aligned16(const P*... p) {
  return (aligned16(p) && ...);
}

// Calls f with std::integral_constant<int, kV> when vec, else with <int, 1>.
template <int kV, typename F>
void with_vec(bool vec, F&& f) {
  if (vec) {
    f(std::integral_constant<int, kV>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// A device attribute, looked up once per device (0 means not yet known: both attributes used
// here are positive).
int device_attr(cudaDeviceAttr attr, int slot, int device) {
  static std::atomic<int> cache[2][64];
  const bool cached = device >= 0 && device < 64;
  if (cached) {
    const int v = cache[slot][device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, attr, device));
  if (cached) cache[slot][device].store(n, std::memory_order_relaxed);
  return n;
}

int sm_count(int device) { return device_attr(cudaDevAttrMultiProcessorCount, 0, device); }

// Dynamic shared memory a kernel of ours may ask for: the device's opt-in limit less room for
// the kernels' static shared memory (at most 24 KiB).
int64_t smem_cap(int device) {
  return static_cast<int64_t>(device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, 1, device)) -
         32 * 1024;
}

// Dynamic shared memory above the default 48 KiB must be asked for per kernel.
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// Blocks that fill the device once (resident blocks per SM x SMs).
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, int64_t smem, int device) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads,
                                                               static_cast<size_t>(smem)));
  return static_cast<int64_t>(std::max(per_sm, 1)) * sm_count(device);
}

void poison(const at::Tensor& t, cudaStream_t stream) {
  if (poison_outputs() && t.numel() > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0xFF, t.nbytes(), stream));
  }
}

void check_x(const char* fn, const at::Tensor& x) {
  PK_CHECK_VALUE(x.dim() == 3, fn, ": x must be a (B, C, K) view, got ", x.dim(), "D");
  PK_CHECK_VALUE(x.is_contiguous(), fn, ": x must be contiguous, got strides ", x.strides());
  const auto t = x.scalar_type();
  PK_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, fn,
                ": x must be float32, float64, float16 or bfloat16, got ", t);
  // grid.x carries channels in some kernels; no real C comes near
  PK_CHECK_VALUE(x.size(1) <= std::numeric_limits<int32_t>::max(), fn, ": C = ", x.size(1),
                 " is too large");
}

// A big tensor next to x: same device, dtype, shape; contiguous.
void check_big(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x) {
  PK_CHECK_VALUE(t.device() == x.device(), fn, ": ", name, " must be on x's device (", x.device(),
                 "), got ", t.device());
  PK_CHECK_TYPE(t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's dtype ",
                x.scalar_type(), ", got ", t.scalar_type());
  PK_CHECK_VALUE(t.sizes() == x.sizes(), fn, ": ", name, " must have x's shape ", x.sizes(),
                 ", got ", t.sizes());
  PK_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous, got strides ",
                 t.strides());
}

// An acc-dtype vector of n elements (what: "C" or "B*K", for the message).
void check_acc(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& x,
               const char* what, int64_t n, bool or_x_dtype = false) {
  PK_CHECK_VALUE(t.device() == x.device(), fn, ": ", name, " must be on x's device (", x.device(),
                 "), got ", t.device());
  const bool own = or_x_dtype && t.scalar_type() == x.scalar_type();
  PK_CHECK_TYPE(t.scalar_type() == acc_type(x) || own, fn, ": ", name, " must be ", acc_type(x),
                or_x_dtype ? " or x's dtype" : "", " for x of dtype ", x.scalar_type(), ", got ",
                t.scalar_type());
  PK_CHECK_VALUE(t.numel() == n, fn, ": ", name, " must have ", what, " = ", n,
                 " elements, got ", t.numel());
  PK_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// A (C,) vector checked by check_acc(..., or_x_dtype = true); absent when t is.
template <typename scalar_t>
ChanVec<scalar_t> chan_vec(const std::optional<at::Tensor>& t) {
  using acc_t = at::opmath_type<scalar_t>;
  if (!t.has_value()) return {};
  return {t->const_data_ptr(), t->scalar_type() != c10::CppTypeToScalarType<acc_t>::value};
}

// Partials (P, C) -> out (either pair may be null).
template <typename acc_t>
void launch_sum_finalize(const acc_t* part1, const acc_t* part2, acc_t* out1, acc_t* out2,
                         int64_t P, int64_t C, cudaStream_t stream) {
  const dim3 threads(kWarp, kFinalThreads / kWarp);
  sum_finalize_kernel<acc_t><<<ceil_div(C, kWarp), threads, 0, stream>>>(part1, part2, out1, out2,
                                                                         P, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Channel sums s1 = sum dy', s2 = sum dy' * (x - m) * r over (b, k) -> out1, out2 (either may
// be null): the rows layout (threads along C) when K == 1, the planes layout otherwise.
template <typename scalar_t, bool kRowStats>
void channel_sums(Sum2<scalar_t> a, at::opmath_type<scalar_t>* out1,
                  at::opmath_type<scalar_t>* out2, const at::TensorOptions& acc_opts, int device,
                  cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool aligned = all_aligned16(a.dy, a.x, a.y) && (!kRowStats || all_aligned16(a.m, a.r));
  at::Tensor part;
  int64_t P = 0;
  if (a.K == 1) {
    with_vec<kChanVec<scalar_t>>(a.C % kChanVec<scalar_t> == 0 && aligned, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const auto kernel = sum2_rows_kernel<scalar_t, V, kRowStats>;
      const RowsGrid g = plan_rows_grid(a.B, a.C, V, resident_blocks(kernel, kThreads, 0, device));
      part = at::empty({2, g.chunks, a.C}, acc_opts);
      a.part1 = part.data_ptr<acc_t>();
      a.part2 = a.part1 + g.chunks * a.C;
      kernel<<<dim3(g.ctiles, g.chunks), dim3(g.TX, g.TY), 0, stream>>>(a, g.chunk);
      P = g.chunks;
    });
  } else {
    with_vec<kWideVec<scalar_t>>(a.K % kWideVec<scalar_t> == 0 && aligned, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const auto kernel = sum2_planes_kernel<scalar_t, V, kRowStats>;
      const PlanesGrid g =
          plan_planes_grid(a.B * a.K / V, a.C, resident_blocks(kernel, kThreads, 0, device));
      part = at::empty({2, g.chunks, a.C}, acc_opts);
      a.part1 = part.data_ptr<acc_t>();
      a.part2 = a.part1 + g.chunks * a.C;
      kernel<<<dim3(a.C, g.chunks), kThreads, 0, stream>>>(a, g.chunk);
      P = g.chunks;
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_sum_finalize<acc_t>(a.part1, a.part2, out1, out2, P, a.C, stream);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// row norm

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  constexpr const char* fn = "row_norm_fwd_cuda";
  PK_CHECK_CUDA("row_norm_fwd_cuda", x);
  check_x(fn, x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  if (residual.has_value()) check_big(fn, "residual", *residual, x);
  if (weight.has_value()) check_acc(fn, "weight", *weight, x, "C", C);
  if (bias.has_value()) check_acc(fn, "bias", *bias, x, "C", C);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc_opts = x.options().dtype(acc_type(x));
  at::Tensor y = at::empty({B, C, K}, x.options());
  at::Tensor s =
      residual.has_value() ? at::empty({B, C, K}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = rms ? at::empty({0}, acc_opts) : at::empty({B, K}, acc_opts);
  at::Tensor rstd = at::empty({B, K}, acc_opts);
  if (B * K == 0) return {y, s, mean, rstd};
  if (C == 0) {  // as torch: mean 0, rstd of 0/0
    if (!rms) mean.zero_();
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, s, mean, rstd};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const at::Tensor* t : {&y, &s, &mean, &rstd}) poison(*t, stream);
  const int device = x.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_norm_fwd_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RowFwd<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.residual = opt_ptr<scalar_t>(residual);
    a.weight = opt_ptr<acc_t>(weight);
    a.bias = opt_ptr<acc_t>(bias);
    a.y = y.data_ptr<scalar_t>();
    a.s = residual.has_value() ? s.data_ptr<scalar_t>() : nullptr;
    a.mean = rms ? nullptr : mean.data_ptr<acc_t>();
    a.rstd = rstd.data_ptr<acc_t>();
    a.B = B;
    a.C = C;
    a.K = K;
    a.eps = static_cast<acc_t>(eps);
    a.rms = rms;
    const bool aligned = all_aligned16(a.x, a.residual, static_cast<const scalar_t*>(a.y),
                                       static_cast<const scalar_t*>(a.s));
    if (K == 1) {
      // The row as 16-byte vectors when C and every pointer allow it.
      constexpr int kV = kWideVec<scalar_t>;
      const bool vec = C % kV == 0 && aligned && all_aligned16(a.weight, a.bias);
      with_vec<kV>(vec, [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        // Up to 4 vectors of 16 bytes (8 of narrower ones) per thread in registers.
        const RowPlan p = plan_row(C / V, 4, V >= 8 ? 4 : 8, kRowThreads, kThreads);
        if (!p.regs) {
          row_fwd_stream_kernel<scalar_t, V><<<std::min(B, kMaxBlocks), p.threads, 0, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        const int64_t blocks = std::min(ceil_div(B, p.threads / p.T), kMaxBlocks);
        const auto launch = [&](auto kernel) {
          kernel<<<blocks, p.threads, 0, stream>>>(a, p.T);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        const auto pick = [&](auto res_tag) {
          constexpr bool R = decltype(res_tag)::value;
          if (p.iters == 1) {
            launch(row_fwd_regs_kernel<scalar_t, V, 1, R>);
          } else if (p.iters == 2) {
            launch(row_fwd_regs_kernel<scalar_t, V, 2, R>);
          } else if (p.iters == 4) {
            launch(row_fwd_regs_kernel<scalar_t, V, 4, R>);
          } else if constexpr (V < 8) {
            launch(row_fwd_regs_kernel<scalar_t, V, 8, R>);
          } else {
            PK_CHECK(false, "row_norm_fwd_cuda: no kernel for ", p.iters, " vectors per thread");
          }
        };
        if (a.residual != nullptr) {
          pick(std::true_type{});
        } else {
          pick(std::false_type{});
        }
      });
      return;
    }
    // K > 1: VEC consecutive k per thread when K and the pointers allow it; the (C x W) slab in
    // shared memory when it fits.
    constexpr int kV = kChanVec<scalar_t>;
    with_vec<kV>(K % kV == 0 && aligned, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const ColPlan p = plan_col(C, V * static_cast<int>(sizeof(scalar_t)));
      const int64_t cache = C * p.TX * V * static_cast<int64_t>(sizeof(scalar_t));
      const int64_t blocks = std::min(B * ceil_div(K, static_cast<int64_t>(p.TX) * V), kMaxBlocks);
      if (cache <= std::min<int64_t>(smem_cap(device), 96 * 1024)) {
        const auto kernel = col_fwd_kernel<scalar_t, V, true>;
        allow_smem(kernel, cache);
        kernel<<<blocks, kThreads, cache, stream>>>(a, p.TX);
      } else {
        col_fwd_kernel<scalar_t, V, false><<<blocks, kThreads, 0, stream>>>(a, p.TX);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_norm_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& grad_sum,
    bool rms, bool need_dweight, bool need_dbias) {
  constexpr const char* fn = "row_norm_bwd_cuda";
  PK_CHECK_CUDA("row_norm_bwd_cuda", x);
  check_x(fn, x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  check_big(fn, "grad_y", grad_y, x);
  if (grad_sum.has_value()) check_big(fn, "grad_sum", *grad_sum, x);
  if (weight.has_value()) check_acc(fn, "weight", *weight, x, "C", C);
  if (!rms) check_acc(fn, "mean", mean, x, "B*K", B * K);
  check_acc(fn, "rstd", rstd, x, "B*K", B * K);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc_opts = x.options().dtype(acc_type(x));
  at::Tensor dx = at::empty({B, C, K}, x.options());
  if (B * K == 0 || C == 0) {
    return {dx, need_dweight ? at::zeros({C}, acc_opts) : at::empty({0}, acc_opts),
            need_dbias ? at::zeros({C}, acc_opts) : at::empty({0}, acc_opts)};
  }
  at::Tensor dweight = need_dweight ? at::empty({C}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor dbias = need_dbias ? at::empty({C}, acc_opts) : at::empty({0}, acc_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const at::Tensor* t : {&dx, &dweight, &dbias}) poison(*t, stream);
  const int device = x.get_device();
  const bool params = need_dweight || need_dbias;
  const int64_t nparam = (need_dweight ? 1 : 0) + (need_dbias ? 1 : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_norm_bwd_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RowBwd<scalar_t> a;
    a.dy = grad_y.const_data_ptr<scalar_t>();
    a.x = x.const_data_ptr<scalar_t>();
    a.weight = opt_ptr<acc_t>(weight);
    a.mean = rms ? nullptr : mean.const_data_ptr<acc_t>();
    a.rstd = rstd.const_data_ptr<acc_t>();
    a.grad_sum = opt_ptr<scalar_t>(grad_sum);
    a.dx = dx.data_ptr<scalar_t>();
    a.part_dw = nullptr;
    a.part_db = nullptr;
    a.B = B;
    a.C = C;
    a.K = K;
    a.rms = rms;
    acc_t* dw = need_dweight ? dweight.data_ptr<acc_t>() : nullptr;
    acc_t* db = need_dbias ? dbias.data_ptr<acc_t>() : nullptr;
    const bool aligned = all_aligned16(a.dy, a.x, a.grad_sum, static_cast<const scalar_t*>(a.dx));
    at::Tensor part;  // (2, blocks, C) fused parameter partials, alive until the finalizer ran
    // The fused partials as the kernel's parameter sums: dweight first, then dbias.
    const auto set_parts = [&](int64_t blocks) {
      part = at::empty({2, blocks, C}, acc_opts);
      a.part_dw = dw != nullptr ? part.data_ptr<acc_t>() : nullptr;
      a.part_db = db != nullptr ? part.data_ptr<acc_t>() + blocks * C : nullptr;
    };
    // Parameter sums by the channel reduction when the fused kernel cannot hold them:
    // s1 = sum dy -> dbias, s2 = sum dy * xhat -> dweight.
    const auto separate_params = [&] {
      Sum2<scalar_t> s{a.dy, a.x, nullptr, a.mean, a.rstd, {}, {}, acc_t(0), nullptr, nullptr,
                       B, C, K};
      channel_sums<scalar_t, true>(s, db, dw, acc_opts, device, stream);
    };
    if (K == 1) {
      constexpr int kV = kWideVec<scalar_t>;
      const bool vec = C % kV == 0 && aligned && all_aligned16(a.weight);
      with_vec<kV>(vec, [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        // Up to 2 vectors of 16 bytes (4 of narrower ones) per array and thread in registers.
        const RowPlan p = plan_row(C / V, 2, V >= 8 ? 2 : 4, kRowThreads, kRowThreads);
        if (!p.regs) {
          row_bwd_stream_kernel<scalar_t, V>
              <<<std::min(B, kMaxBlocks), kRowThreads, 0, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (params) separate_params();
          return;
        }
        const int G = p.threads / p.T;
        const int64_t smem = nparam * G * C * static_cast<int64_t>(sizeof(acc_t));
        const bool fused = params && smem <= smem_cap(device);
        const auto launch = [&](auto kernel) {
          int64_t blocks = std::min(ceil_div(B, G), kMaxBlocks);
          if (fused) {
            allow_smem(kernel, smem);
            blocks = std::min(blocks, resident_blocks(kernel, p.threads, smem, device));
            set_parts(blocks);
          }
          kernel<<<blocks, p.threads, fused ? smem : 0, stream>>>(a, p.T);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (fused) launch_sum_finalize<acc_t>(a.part_dw, a.part_db, dw, db, blocks, C, stream);
        };
        if (p.iters == 1) {
          launch(row_bwd_regs_kernel<scalar_t, V, 1>);
        } else if (p.iters == 2) {
          launch(row_bwd_regs_kernel<scalar_t, V, 2>);
        } else if constexpr (V < 8) {
          launch(row_bwd_regs_kernel<scalar_t, V, 4>);
        } else {
          PK_CHECK(false, "row_norm_bwd_cuda: no kernel for ", p.iters, " vectors per thread");
        }
        if (params && !fused) separate_params();
      });
      return;
    }
    constexpr int kV = kChanVec<scalar_t>;
    with_vec<kV>(K % kV == 0 && aligned, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const ColPlan p = plan_col(C, V * static_cast<int>(sizeof(scalar_t)));
      const int64_t tiles = B * ceil_div(K, static_cast<int64_t>(p.TX) * V);
      const int64_t cache = 2 * C * p.TX * V * static_cast<int64_t>(sizeof(scalar_t));
      const int64_t smem =
          col_bwd_param_bytes(params ? nparam : 0, C, p.TX, sizeof(acc_t)) + cache;
      if (smem <= std::min<int64_t>(smem_cap(device), 96 * 1024)) {
        const auto kernel = col_bwd_kernel<scalar_t, V, true>;
        allow_smem(kernel, smem);
        int64_t blocks = std::min(tiles, kMaxBlocks);
        if (params) {
          blocks = std::min(blocks, resident_blocks(kernel, kThreads, smem, device));
          set_parts(blocks);
        }
        kernel<<<blocks, kThreads, smem, stream>>>(a, p.TX);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (params) launch_sum_finalize<acc_t>(a.part_dw, a.part_db, dw, db, blocks, C, stream);
      } else {
        col_bwd_kernel<scalar_t, V, false>
            <<<std::min(tiles, kMaxBlocks), kThreads, 0, stream>>>(a, p.TX);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (params) separate_params();
      }
    });
  });
  return {dx, dweight, dbias};
}

// ---------------------------------------------------------------------------------------------
// BatchNorm

// Launches one elementwise BatchNorm pass (forward or dx) over the (B, C, K) view a: for NHWC
// (K == 1) rows of C, each thread owning fixed channels; for NCHW tiles whose planes'
// parameters (params_per_plane acc values each) are staged in shared memory. rows_kernel_of and
// tiles_kernel_of map a vector-width tag to the kernel.
template <typename scalar_t, typename Args, typename RowsKernelOf, typename TilesKernelOf>
void launch_bn_elementwise(const Args& a, bool aligned, int params_per_plane, int device,
                           cudaStream_t stream, RowsKernelOf rows_kernel_of,
                           TilesKernelOf tiles_kernel_of) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = a.B, C = a.C, K = a.K;
  if (K == 1) {
    constexpr int kV = kChanVec<scalar_t>;
    with_vec<kV>(C % kV == 0 && aligned, [&](auto vec_tag) {
      const auto kernel = rows_kernel_of(vec_tag);
      const RowsGrid g = plan_rows_grid(B, C, decltype(vec_tag)::value, 1);  // TX, TY, ctiles
      const int64_t gy =
          std::clamp<int64_t>(resident_blocks(kernel, kThreads, 0, device) / g.ctiles, 1,
                              std::min(kMaxGridY, ceil_div(B, g.TY)));
      kernel<<<dim3(g.ctiles, gy), dim3(g.TX, g.TY), 0, stream>>>(a);
    });
  } else {
    constexpr int kV = kWideVec<scalar_t>;
    with_vec<kV>(K % kV == 0 && aligned, [&](auto vec_tag) {
      const auto kernel = tiles_kernel_of(vec_tag);
      const int64_t tile = static_cast<int64_t>(kThreads) * decltype(vec_tag)::value * kTileUnroll;
      const int64_t smem = params_per_plane * bn_tile_planes(tile, K, B * C) *
                           static_cast<int64_t>(sizeof(acc_t));
      const int64_t tiles = ceil_div(B * C * K, tile);
      const int64_t blocks = std::min(tiles, resident_blocks(kernel, kThreads, smem, device));
      kernel<<<blocks, kThreads, smem, stream>>>(a);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& x) {
  constexpr const char* fn = "batch_norm_stats_cuda";
  PK_CHECK_CUDA("batch_norm_stats_cuda", x);
  check_x(fn, x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  PK_CHECK_VALUE(B * K >= 1 || C == 0, fn, ": x must have at least one value per channel, got ",
                 "shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc_opts = x.options().dtype(acc_type(x));
  at::Tensor mean = at::empty({C}, acc_opts);
  at::Tensor var = at::empty({C}, acc_opts);
  if (C == 0) return {mean, var};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison(mean, stream);
  poison(var, stream);
  const int device = x.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::Tensor part;  // (2, P, C): means and M2 of the chunks
    int64_t P = 0, units = 0, chunk = 0, per_unit = 0;
    if (K == 1) {
      constexpr int kV = kChanVec<scalar_t>;
      with_vec<kV>(C % kV == 0 && aligned16(xp), [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        const auto kernel = welford_rows_kernel<scalar_t, V>;
        const RowsGrid g = plan_rows_grid(B, C, V, resident_blocks(kernel, kThreads, 0, device));
        part = at::empty({2, g.chunks, C}, acc_opts);
        acc_t* pm = part.data_ptr<acc_t>();
        kernel<<<dim3(g.ctiles, g.chunks), dim3(g.TX, g.TY), 0, stream>>>(xp, pm, pm + g.chunks * C,
                                                                        B, C, g.chunk);
        P = g.chunks;
        units = B;
        chunk = g.chunk;
        per_unit = 1;
      });
    } else {
      constexpr int kV = kWideVec<scalar_t>;
      with_vec<kV>(K % kV == 0 && aligned16(xp), [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        const auto kernel = welford_planes_kernel<scalar_t, V>;
        const int64_t nv = B * K / V;
        const PlanesGrid g = plan_planes_grid(nv, C, resident_blocks(kernel, kThreads, 0, device));
        part = at::empty({2, g.chunks, C}, acc_opts);
        acc_t* pm = part.data_ptr<acc_t>();
        kernel<<<dim3(C, g.chunks), kThreads, 0, stream>>>(xp, pm, pm + g.chunks * C, B, C, K,
                                                          g.chunk);
        P = g.chunks;
        units = nv;
        chunk = g.chunk;
        per_unit = V;
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const acc_t* pm = part.const_data_ptr<acc_t>();
    welford_finalize_kernel<scalar_t>
        <<<ceil_div(C, kWarp), dim3(kWarp, kFinalThreads / kWarp), 0, stream>>>(
            pm, pm + P * C, xp, C, K, P, units, chunk, per_unit, mean.data_ptr<acc_t>(),
            var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

void batch_norm_update_running_cuda(const at::Tensor& mean, const at::Tensor& var,
                                    const std::optional<at::Tensor>& running_mean,
                                    const std::optional<at::Tensor>& running_var, double momentum,
                                    double var_factor) {
  constexpr const char* fn = "batch_norm_update_running_cuda";
  PK_CHECK_CUDA("batch_norm_update_running_cuda", mean);
  const auto check = [&](const at::Tensor& running, const at::Tensor& batch, const char* name) {
    PK_CHECK_VALUE(running.device() == mean.device() && batch.device() == mean.device() &&
                       running.is_contiguous() && running.numel() == batch.numel(),
                   fn, ": ", name, " must be a contiguous tensor of ", batch.numel(),
                   " elements on ", mean.device(), ", as its batch statistics");
    PK_CHECK_VALUE(batch.is_contiguous() && batch.scalar_type() == acc_type(running), fn,
                   ": the batch statistics must be contiguous and in ", name,
                   "'s accumulation type");
  };
  // Both checked, and their versions bumped (autograd sees the write, as it sees mul_ / add_;
  // an inference tensor is refused here), before either is written.
  if (running_mean) check(*running_mean, mean, "running_mean");
  if (running_var) check(*running_var, var, "running_var");
  if (running_mean) running_mean->unsafeGetTensorImpl()->bump_version();
  if (running_var) running_var->unsafeGetTensorImpl()->bump_version();
  const c10::cuda::CUDAGuard guard(mean.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  struct Task {
    const at::Tensor& running;
    const at::Tensor& batch;
    double factor;
  };
  // One launch for both when they share a dtype (grid.y picks mean or var), else one each.
  const auto launch = [&](std::initializer_list<Task> tasks) {
    const at::Tensor& first = tasks.begin()->running;
    if (first.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), fn, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      RunningUpdate<scalar_t> a{};
      int n = 0;
      for (const Task& t : tasks) {
        a.running[n] = t.running.data_ptr<scalar_t>();
        a.batch[n] = t.batch.const_data_ptr<acc_t>();
        a.take[n] = static_cast<acc_t>(momentum * t.factor);
        ++n;
      }
      a.keep = static_cast<acc_t>(1 - momentum);
      a.C = first.numel();
      update_running_kernel<scalar_t>
          <<<dim3(ceil_div(a.C, kThreads), n), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  if (running_mean && running_var && running_mean->scalar_type() == running_var->scalar_type()) {
    launch({{*running_mean, mean, 1.0}, {*running_var, var, var_factor}});
  } else {
    if (running_mean) launch({{*running_mean, mean, 1.0}});
    if (running_var) launch({{*running_var, var, var_factor}});
  }
}

at::Tensor batch_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, double eps, bool relu) {
  constexpr const char* fn = "batch_norm_fwd_cuda";
  PK_CHECK_CUDA("batch_norm_fwd_cuda", x);
  check_x(fn, x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  check_acc(fn, "mean", mean, x, "C", C, true);
  check_acc(fn, "var", var, x, "C", C, true);
  if (weight.has_value()) check_acc(fn, "weight", *weight, x, "C", C, true);
  if (bias.has_value()) check_acc(fn, "bias", *bias, x, "C", C, true);
  if (residual.has_value()) check_big(fn, "residual", *residual, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({B, C, K}, x.options());
  if (y.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison(y, stream);
  const int device = x.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_fwd_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BnFwd<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.mean = chan_vec<scalar_t>(mean);
    a.var = chan_vec<scalar_t>(var);
    a.weight = chan_vec<scalar_t>(weight);
    a.bias = chan_vec<scalar_t>(bias);
    a.residual = opt_ptr<scalar_t>(residual);
    a.y = y.data_ptr<scalar_t>();
    a.B = B;
    a.C = C;
    a.K = K;
    a.eps = static_cast<acc_t>(eps);
    a.relu = relu;
    const bool aligned = all_aligned16(a.x, a.residual, static_cast<const scalar_t*>(a.y));
    launch_bn_elementwise<scalar_t>(
        a, aligned, 4, device, stream,
        [](auto vec) { return bn_fwd_rows_kernel<scalar_t, decltype(vec)::value>; },
        [](auto vec) { return bn_fwd_tiles_kernel<scalar_t, decltype(vec)::value, kTileUnroll>; });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y,
    const at::Tensor& mean, const at::Tensor& var, double eps) {
  constexpr const char* fn = "batch_norm_bwd_reduce_cuda";
  PK_CHECK_CUDA("batch_norm_bwd_reduce_cuda", x);
  check_x(fn, x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  check_big(fn, "grad_y", grad_y, x);
  if (y.has_value()) check_big(fn, "y", *y, x);
  check_acc(fn, "mean", mean, x, "C", C, true);
  check_acc(fn, "var", var, x, "C", C, true);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc_opts = x.options().dtype(acc_type(x));
  if (B * K == 0 || C == 0) return {at::zeros({C}, acc_opts), at::zeros({C}, acc_opts)};
  at::Tensor sum_dy = at::empty({C}, acc_opts);
  at::Tensor sum_dy_xhat = at::empty({C}, acc_opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison(sum_dy, stream);
  poison(sum_dy_xhat, stream);
  const int device = x.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_bwd_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Sum2<scalar_t> a{grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                     opt_ptr<scalar_t>(y), nullptr, nullptr, chan_vec<scalar_t>(mean),
                     chan_vec<scalar_t>(var), static_cast<acc_t>(eps), nullptr, nullptr,
                     B, C, K};
    channel_sums<scalar_t, false>(a, sum_dy.data_ptr<acc_t>(), sum_dy_xhat.data_ptr<acc_t>(),
                                  acc_opts, device, stream);
  });
  return {sum_dy, sum_dy_xhat};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& y,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, double eps, int64_t count,
    bool want_grad_residual) {
  constexpr const char* fn = "batch_norm_bwd_cuda";
  PK_CHECK_CUDA("batch_norm_bwd_cuda", x);
  check_x(fn, x);
  const int64_t B = x.size(0), C = x.size(1), K = x.size(2);
  check_big(fn, "grad_y", grad_y, x);
  if (y.has_value()) check_big(fn, "y", *y, x);
  check_acc(fn, "mean", mean, x, "C", C, true);
  check_acc(fn, "var", var, x, "C", C, true);
  if (weight.has_value()) check_acc(fn, "weight", *weight, x, "C", C, true);
  check_acc(fn, "sum_dy", sum_dy, x, "C", C);
  check_acc(fn, "sum_dy_xhat", sum_dy_xhat, x, "C", C);
  PK_CHECK_VALUE(count >= 0, fn, ": count must be >= 0, got ", count);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({B, C, K}, x.options());
  at::Tensor dres =
      want_grad_residual ? at::empty({B, C, K}, x.options()) : at::empty({0}, x.options());
  if (dx.numel() == 0) return {dx, dres};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison(dx, stream);
  poison(dres, stream);
  const int device = x.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_bwd_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BnBwd<scalar_t> a;
    a.dy = grad_y.const_data_ptr<scalar_t>();
    a.x = x.const_data_ptr<scalar_t>();
    a.y = opt_ptr<scalar_t>(y);
    a.mean = chan_vec<scalar_t>(mean);
    a.var = chan_vec<scalar_t>(var);
    a.weight = chan_vec<scalar_t>(weight);
    a.sum_dy = sum_dy.const_data_ptr<acc_t>();
    a.sum_dy_xhat = sum_dy_xhat.const_data_ptr<acc_t>();
    a.dx = dx.data_ptr<scalar_t>();
    a.dres = want_grad_residual ? dres.data_ptr<scalar_t>() : nullptr;
    a.B = B;
    a.C = C;
    a.K = K;
    a.eps = static_cast<acc_t>(eps);
    a.count = static_cast<acc_t>(count);
    const bool aligned = all_aligned16(a.dy, a.x, a.y, static_cast<const scalar_t*>(a.dx),
                                       static_cast<const scalar_t*>(a.dres));
    launch_bn_elementwise<scalar_t>(
        a, aligned, 5, device, stream,
        [](auto vec) { return bn_bwd_rows_kernel<scalar_t, decltype(vec)::value>; },
        [](auto vec) { return bn_bwd_tiles_kernel<scalar_t, decltype(vec)::value, kTileUnroll>; });
  });
  return {dx, dres};
}

}  // namespace pykern
