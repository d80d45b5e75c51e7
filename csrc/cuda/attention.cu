// Attention family, CUDA. Twin of csrc/cpu/attention.cpp (Triton twin:
// triton_kernels/attention.py); the op's contract is in pykern.h ("attention"). Flash-style:
// scores exist only as tiles, so the extra memory is O(L + S) (lse and the backward's
// D = rowsum(dO * O)).
//
// Two kernel sets, the same algorithm (FlashAttention-2: online softmax in the forward; the
// backward recomputes P = exp(s - lse) tile by tile):
//   float16 / bfloat16: tensor cores through mma.sync.m16n8k16 (fp32 accumulation), operands
//     staged in shared memory by cp.async (16-byte copies, double-buffered) and read with
//     ldmatrix. A CTA is 4 warps; each warp owns 16 rows of every score tile. Head dims are
//     padded (zero-filled) to a template size kD in {32, 64, 96, 128, 192, 256} >= max(E, Ev).
//       fwd:   CTA = 64 query rows of one (z, h); key tiles of 64 (32 when kD > 128).
//       dK/dV: CTA = 64 keys of one (z, kv head); steps over the group's query heads and their
//              query tiles of 64 or 32 rows. kD > 128 splits the output dims over two CTAs
//              (each recomputes the scores) so the dK, dV accumulators stay in registers.
//       dQ:    CTA = 64 query rows; key tiles as the forward.
//   float32 / float64: plain FMA (no TF32), the same tile shapes with lanes along keys (or
//     queries): a warp owns kR rows (8 float, 4 double), tiles of 32 along the lanes, head dims
//     padded to 32 * kN, kN in {1, 2, 4, 8}.
// Masks at tile edges: rows/keys past L/S are zero-filled in shared memory and masked to -inf
// (P = 0). Causal (j > i masked, top-left) skips key tiles past the diagonal in fwd and dQ and
// query tiles before it in dK/dV. Fully masked rows: the running max stays -inf, exponentials
// are taken against 0 instead (no -inf - -inf), so l = 0 -> out 0, lse -inf, P = 0 in backward.
// Dropout: common/philox.h's counter-based mask, recomputed per element in fwd and bwd.
// Determinism: no atomics; every sum has a fixed order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/philox.h"
#include "common/poison.h"
#include "pykern.h"

namespace pykern {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;  // every tile kernel
constexpr int kPad = 8;                   // 16-bit elements appended to each shared row
constexpr int kTcRows = 64;               // tensor-core kernels: rows per CTA (16 per warp)
constexpr unsigned kFullMask = 0xffffffffu;

// Every kernel's arguments (the ones a kernel does not use stay null / zero).
// Element (z, h, i, j) of bias is bias[z * bias_z + h * bias_h + i * bias_i + j * bias_j].
template <typename acc_t>
struct Attn {
  const void* q;         // (Z, Hq, L, E)
  const void* k;         // (Z, Hk, S, E)
  const void* v;         // (Z, Hk, S, Ev)
  const void* grad_out;  // (Z, Hq, L, Ev)
  const acc_t* bias;
  int64_t bias_z, bias_h, bias_i, bias_j;
  const acc_t* lse;    // bwd: (Z, Hq, L)
  const acc_t* delta;  // bwd: D = rowsum(dO * O), (Z, Hq, L)
  void* out;           // fwd: (Z, Hq, L, Ev)
  acc_t* lse_out;      // fwd: (Z, Hq, L)
  void* dq;            // (Z, Hq, L, E)
  void* dk;            // (Z, Hk, S, E)
  void* dv;            // (Z, Hk, S, Ev)
  int Hq, Hk, group;   // group = Hq / Hk: query head h reads kv head h / group
  int L, S, E, Ev;
  int n_tiles;   // row tiles per head of the launch (query tiles, or key tiles for dK/dV)
  int n_chunks;  // dK/dV tensor-core kernel: output-dim chunks per key tile
  acc_t scale;
  acc_t drop_scale;  // 1 / (1 - dropout_p)
  uint64_t seed;
  uint32_t drop_threshold;
  bool causal, dropout;
  bool vec;  // tensor-core loads: 16-byte cp.async (E, Ev % 8 == 0, 16-byte aligned bases)
};

// ---------------------------------------------------------------------------------------------
// Device helpers shared by both kernel sets

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Butterfly sum: every lane ends with the same bits.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Number of key tiles a block of query rows [q0, q0 + rows) visits: all, or under the causal
// mask only those holding a key j <= the block's last row (key 0 is always visible).
__device__ __forceinline__ int visible_key_tiles(int q0, int rows, int L, int S, int tile,
                                                 bool causal) {
  const int all = (S + tile - 1) / tile;
  if (!causal) return all;
  const int last_row = min(L, q0 + rows) - 1;
  return min(all, min(S - 1, last_row) / tile + 1);
}

// First query tile (of `tile` rows) that can see key k0 under the causal mask: every row of
// an earlier tile is < k0 <= every key of the block.
__device__ __forceinline__ int first_query_tile(int k0, int tile, int n_tiles, bool causal) {
  return causal ? min(k0 / tile, n_tiles) : 0;
}

// Score element (i, j) before the softmax: q.k * scale + bias, or -inf where masked (outside
// the L x S matrix, or above the causal diagonal).
template <typename acc_t>
__device__ __forceinline__ acc_t score(const Attn<acc_t>& a, const acc_t* bias_zh, acc_t dot, int i,
                                       int j) {
  if (i >= a.L || j >= a.S || (a.causal && j > i)) return neg_inf<acc_t>();
  acc_t x = dot * a.scale;
  if (bias_zh != nullptr) x += bias_zh[i * a.bias_i + j * a.bias_j];
  return x;
}

// Backward's P_ij = exp(s_ij - lse_i): 0 where masked or where the whole row is (lse = -inf).
template <typename acc_t>
__device__ __forceinline__ acc_t recomputed_p(const Attn<acc_t>& a, const acc_t* bias_zh,
                                              acc_t dot, int i, int j, acc_t lse_i) {
  if (lse_i == neg_inf<acc_t>()) return acc_t(0);
  const acc_t x = score(a, bias_zh, dot, i, j);
  return x == neg_inf<acc_t>() ? acc_t(0) : exp_acc(x - lse_i);
}

// Whether (zh, i, j) survives dropout (callers test a.dropout first).
template <typename acc_t>
__device__ __forceinline__ bool kept(const Attn<acc_t>& a, int64_t zh, int i, int j) {
  return dropout_keep(a.seed, static_cast<uint64_t>(zh), static_cast<uint32_t>(i),
                      static_cast<uint32_t>(j), a.drop_threshold);
}

// D_i = sum_e dO[i, e] * O[i, e] in acc: a warp per row (rows = Z * Hq * L).
template <typename scalar_t, typename acc_t>
__global__ void attention_bwd_delta_kernel(const scalar_t* __restrict__ grad_out,
                                           const scalar_t* __restrict__ out,
                                           acc_t* __restrict__ delta, int64_t rows, int Ev) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (row >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const scalar_t* dO = grad_out + row * Ev;
  const scalar_t* O = out + row * Ev;
  acc_t sum = 0;
  for (int e = lane; e < Ev; e += kWarp) {
    sum += static_cast<acc_t>(dO[e]) * static_cast<acc_t>(O[e]);
  }
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core helpers (sm_80+ PTX; compiled for sm_90)
//
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D (16x8) += A (16x16) B (16x8), per lane
// (g = lane / 4, t = lane % 4; each 32-bit register holds 2 16-bit values, the lower-indexed
// element in the low half):
//   A: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B: b0 = B[2t..2t+1][g] (two k values, one column), b1 = B[2t+8..2t+9][g]
//   C: c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// So the C fragments of two adjacent 8-column tiles (columns 16kc..16kc+15) are, packed to
// 16 bits pairwise, exactly the A fragment of a 16x16 block with k = those columns:
//   a0 = (c0, c1) of tile 2kc, a1 = (c2, c3) of tile 2kc, a2/a3 the same of tile 2kc + 1.
// That is how P (or dS) goes from one product's output straight into the next one's input.
//
// ldmatrix.x4 loads four 8x8 16-bit matrices; lanes 8m..8m+7 give the row addresses of
// matrix m (16-byte aligned), and register m of lane l receives matrix m's row l / 4, columns
// 2(l % 4), 2(l % 4) + 1 (with .trans: rows 2(l % 4), 2(l % 4) + 1 of column l / 4, i.e. the
// transposed matrix's fragment). Operand shapes used here, for a 16x16 block at (r0, c0) of a
// row-major shared tile:
//   A (rows m, cols k), and B^T stored as [k][n] with .trans: matrices (r0, c0), (r0 + 8, c0),
//     (r0, c0 + 8), (r0 + 8, c0 + 8) -> A: a0..a3; B^T: b0, b1 of n-tile c0, b0, b1 of c0 + 8.
//   B stored as [n][k] (no .trans): matrices (r0, c0), (r0, c0 + 8), (r0 + 8, c0),
//     (r0 + 8, c0 + 8) -> b0, b1 of n-tile r0, b0, b1 of n-tile r0 + 8.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; the bytes past src_bytes (0 or 16) are zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most n of this thread's committed groups are still in flight.
template <int n>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> one register of two 16-bit values, lo in the low half (round to nearest even).
template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (kBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return static_cast<uint32_t>(__bfloat16_as_ushort(v.x)) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(v.y)) << 16);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return static_cast<uint32_t>(__half_as_ushort(v.x)) |
           (static_cast<uint32_t>(__half_as_ushort(v.y)) << 16);
  }
}

template <bool kBf16>
__device__ __forceinline__ uint16_t to_bits(float x) {
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  } else {
    return __half_as_ushort(__float2half_rn(x));
  }
}

// The A fragment (16 rows x k 16..) made of the C fragments of 8-column tiles 2kc, 2kc + 1.
template <bool kBf16>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[4], const float (&lo)[4],
                                       const float (&hi)[4]) {
  a[0] = pack2<kBf16>(lo[0], lo[1]);
  a[1] = pack2<kBf16>(lo[2], lo[3]);
  a[2] = pack2<kBf16>(hi[0], hi[1]);
  a[3] = pack2<kBf16>(hi[2], hi[3]);
}

// Rows [row0, row0 + kRows) of a row-major (n_rows, n_cols) matrix of 16-bit values into a
// shared tile [kRows][kCols + kPad], zeros outside the matrix (columns n_cols..kCols too; the
// kPad columns are never read). vec: 16-byte cp.async, which needs n_cols % 8 == 0 (a chunk is
// then wholly inside or outside) and a 16-byte aligned matrix; the caller commits the group.
// Otherwise plain 2-byte copies, complete when the caller's next __syncthreads() returns.
// The shared row stride (kCols + 8) * 2 bytes is a multiple of 16 (ldmatrix/cp.async alignment)
// and moves 8 consecutive rows to 8 different 16-byte bank groups (conflict-free ldmatrix).
template <int kRows, int kCols>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* src, int64_t row0,
                                          int64_t n_rows, int n_cols, bool vec) {
  constexpr int kStride = kCols + kPad;
  if (vec) {
    constexpr int kChunks = kCols / 8;
    for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool inside = row0 + r < n_rows && col < n_cols;
      const uint16_t* from = inside ? src + (row0 + r) * n_cols + col : src;
      cp_async_16(tile + r * kStride + col, from, inside ? 16 : 0);
    }
  } else {
    for (int c = threadIdx.x; c < kRows * kCols; c += kThreads) {
      const int r = c / kCols, col = c % kCols;
      const bool inside = row0 + r < n_rows && col < n_cols;
      tile[r * kStride + col] = inside ? src[(row0 + r) * n_cols + col] : uint16_t{0};
    }
  }
}

// Lane offsets into a 16x16 block for the two ldmatrix.x4 patterns above.
struct LdmLane {
  int a_row, a_col;  // A operands and .trans B operands: quadrants (0,0) (8,0) (0,8) (8,8)
  int b_row, b_col;  // B stored [n][k]: quadrants (0,0) (0,8) (8,0) (8,8)
};

__device__ __forceinline__ LdmLane ldm_lane(int lane) {
  LdmLane o;
  o.a_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  o.a_col = (lane >> 4) * 8;
  o.b_row = (lane & 7) + (lane >> 4) * 8;
  o.b_col = ((lane >> 3) & 1) * 8;
  return o;
}

// acc[n-tile][4] (16 rows x 8 * kN8 columns) += A (16 rows, kK columns) x B^T where B is stored
// [n][k] (rows n of `b`, kK columns): A rows at a_tile (stride kStride), B rows n at b_tile.
// Used for S = Q K^T (A = Q rows, B = K rows) and dP = dO V^T.
template <bool kBf16, int kK, int kN8, int kStride>
__device__ __forceinline__ void mma_abt(float (&acc)[kN8][4], const uint16_t* a_tile,
                                        const uint16_t* b_tile, const LdmLane& ln) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_tile + ln.a_row * kStride + kk * 16 + ln.a_col);
#pragma unroll
    for (int np = 0; np < kN8 / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + (np * 16 + ln.b_row) * kStride + kk * 16 + ln.b_col);
      mma_16816<kBf16>(acc[2 * np], a, b[0], b[1]);
      mma_16816<kBf16>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[n-tile][4] (16 rows x 8 * kN8 columns starting at column col0 of b) += A B, where A is
// given as C fragments frag[kK / 8][4] (16 rows, kK columns) and B is stored [k][n] (rows k of
// `b`). Used for O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K.
template <bool kBf16, int kK, int kN8, int kStride>
__device__ __forceinline__ void mma_frag_b(float (&acc)[kN8][4], const float (&frag)[kK / 8][4],
                                           const uint16_t* b_tile, int col0, const LdmLane& ln) {
#pragma unroll
  for (int kc = 0; kc < kK / 16; ++kc) {
    uint32_t a[4];
    c_to_a<kBf16>(a, frag[2 * kc], frag[2 * kc + 1]);
#pragma unroll
    for (int np = 0; np < kN8 / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_tile + (kc * 16 + ln.a_row) * kStride + col0 + np * 16 + ln.a_col);
      mma_16816<kBf16>(acc[2 * np], a, b[0], b[1]);
      mma_16816<kBf16>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core forward: CTA = (64 query rows, zh); warp w owns rows 16w..16w+15, lane (g, t) the
// rows g and g + 8 of them (C-fragment rows). Shared: Q [64][kD+8], K and V [2][kBc][kD+8].
// Pipeline: Q and key tile 0 are requested up front; iteration kt requests tile kt + 1 into the
// other buffer, waits for tile kt (cp.async.wait_group 1), and a barrier publishes it to all
// warps; the barrier at the end of the iteration keeps tile kt's buffer from being refilled (by
// iteration kt + 1's request for tile kt + 2) while a warp still reads it.
template <bool kBf16, int kD, int kBc>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel_tc(const Attn<float> a) {
  constexpr int kStride = kD + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem);
  uint16_t* k_s = q_s + kTcRows * kStride;
  uint16_t* v_s = k_s + 2 * kBc * kStride;

  const int q_tile = static_cast<int>(blockIdx.x % a.n_tiles);
  const int64_t zh = blockIdx.x / a.n_tiles;
  const int64_t z = zh / a.Hq;
  const int h = static_cast<int>(zh % a.Hq);
  const int64_t zhk = z * a.Hk + h / a.group;
  const int q0 = q_tile * kTcRows;
  const auto* q = static_cast<const uint16_t*>(a.q) + zh * a.L * a.E;
  const auto* k = static_cast<const uint16_t*>(a.k) + zhk * a.S * a.E;
  const auto* v = static_cast<const uint16_t*>(a.v) + zhk * a.S * a.Ev;
  const float* bias_zh = a.bias == nullptr ? nullptr : a.bias + z * a.bias_z + h * a.bias_h;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4;
  const LdmLane ln = ldm_lane(lane);
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const int n_kt = visible_key_tiles(q0, kTcRows, a.L, a.S, kBc, a.causal);

  load_tile<kTcRows, kD>(q_s, q, q0, a.L, a.E, a.vec);
  cp_async_commit();
  load_tile<kBc, kD>(k_s, k, 0, a.S, a.E, a.vec);
  load_tile<kBc, kD>(v_s, v, 0, a.S, a.Ev, a.vec);
  cp_async_commit();

  float o[kD / 8][4] = {};
  float m[2] = {neg_inf<float>(), neg_inf<float>()};  // running row max
  float l[2] = {0.f, 0.f};  // running row sum, this lane's columns only (reduced at the end)

  for (int kt = 0; kt < n_kt; ++kt) {
    if (kt + 1 < n_kt) {
      const int nb = (kt + 1) & 1;
      load_tile<kBc, kD>(k_s + nb * kBc * kStride, k, (kt + 1) * kBc, a.S, a.E, a.vec);
      load_tile<kBc, kD>(v_s + nb * kBc * kStride, v, (kt + 1) * kBc, a.S, a.Ev, a.vec);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* kb = k_s + (kt & 1) * kBc * kStride;
    const uint16_t* vb = v_s + (kt & 1) * kBc * kStride;
    const int k0 = kt * kBc;

    float s[kBc / 8][4] = {};
    mma_abt<kBf16, kD, kBc / 8, kStride>(s, q_s + warp * 16 * kStride, kb, ln);

    // Scores and the row max; a row's 4 lanes (same g) hold all its columns.
    float row_max[2] = {neg_inf<float>(), neg_inf<float>()};
#pragma unroll
    for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int j = k0 + nt * 8 + 2 * t + (c & 1);
        s[nt][c] = score(a, bias_zh, s[nt][c], rows[c >> 1], j);
        row_max[c >> 1] = fmaxf(row_max[c >> 1], s[nt][c]);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(kFullMask, row_max[r], 1));
      row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(kFullMask, row_max[r], 2));
      const float m_new = fmaxf(m[r], row_max[r]);
      // All keys so far masked: exponentials against 0 give p = 0 (never -inf - -inf).
      m_use[r] = m_new == neg_inf<float>() ? 0.f : m_new;
      alpha[r] = expf(m[r] - m_use[r]);  // 0 when m was -inf; o and l are 0 then anyway
      m[r] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int r = c >> 1;
        float p = expf(s[nt][c] - m_use[r]);
        row_sum[r] += p;  // the normalizer ignores dropout
        if (a.dropout && p != 0.f) {
          p = kept(a, zh, rows[r], k0 + nt * 8 + 2 * t + (c & 1)) ? p * a.drop_scale : 0.f;
        }
        s[nt][c] = p;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + row_sum[r];
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
    // O += P V: P (16 x kBc) from the score fragments, V stored [key][dim] = [k][n].
    mma_frag_b<kBf16, kBc, kD / 8, kStride>(o, s, vb, 0, ln);
    __syncthreads();
  }

  auto* out = static_cast<uint16_t*>(a.out) + zh * a.L * a.Ev;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(kFullMask, l[r], 1);
    l[r] += __shfl_xor_sync(kFullMask, l[r], 2);
    const int i = rows[r];
    if (i >= a.L) continue;
    // l > 0 unless every key of the row was masked (then m = -inf and o = 0).
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    uint16_t* out_row = out + static_cast<int64_t>(i) * a.Ev;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
      const int col = dt * 8 + 2 * t;
      if (col < a.Ev) out_row[col] = to_bits<kBf16>(o[dt][2 * r] * inv);
      if (col + 1 < a.Ev) out_row[col + 1] = to_bits<kBf16>(o[dt][2 * r + 1] * inv);
    }
    if (t == 0) {
      a.lse_out[zh * a.L + i] = l[r] > 0.f ? m[r] + logf(l[r]) : neg_inf<float>();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core dK/dV: CTA = (64 keys k0.., kv head zhk, output-dim chunk [d0, d0 + kDO));
// warp w owns keys 16w..16w+15 and works on transposed tiles: S^T = K Q^T and dP^T = V dO^T
// (C-fragment rows = keys, columns = queries), so P^T and dS^T feed dV += P^T dO and
// dK += dS^T Q as A fragments. Steps run over the group's query heads, then their query tiles
// (from the first tile the causal mask lets see k0). Shared: K, V [64][kD+8] (loaded once),
// Q, dO [2][kBq][kD+8] and lse, D [2][kBq] per step, double-buffered as in the forward.
template <bool kBf16, int kD, int kDO, int kBq>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel_tc(const Attn<float> a) {
  constexpr int kStride = kD + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* k_s = reinterpret_cast<uint16_t*>(smem);
  uint16_t* v_s = k_s + kTcRows * kStride;
  uint16_t* q_s = v_s + kTcRows * kStride;  // [2][kBq][kStride]
  uint16_t* do_s = q_s + 2 * kBq * kStride;  // [2][kBq][kStride]
  float* lse_s = reinterpret_cast<float*>(do_s + 2 * kBq * kStride);  // [2][kBq]
  float* dd_s = lse_s + 2 * kBq;                                      // [2][kBq]

  const int chunk = static_cast<int>(blockIdx.x % a.n_chunks);
  const int64_t rest = blockIdx.x / a.n_chunks;
  const int k_tile = static_cast<int>(rest % a.n_tiles);
  const int64_t zhk = rest / a.n_tiles;
  const int64_t z = zhk / a.Hk;
  const int hk = static_cast<int>(zhk % a.Hk);
  const int k0 = k_tile * kTcRows;
  const int d0 = chunk * kDO;
  const auto* k = static_cast<const uint16_t*>(a.k) + zhk * a.S * a.E;
  const auto* v = static_cast<const uint16_t*>(a.v) + zhk * a.S * a.Ev;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4;
  const LdmLane ln = ldm_lane(lane);
  const int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};

  const int n_qt = (a.L + kBq - 1) / kBq;
  const int qt_first = first_query_tile(k0, kBq, n_qt, a.causal);
  const int per_head = n_qt - qt_first;
  const int steps = a.group * per_head;

  // Step s: query head hk * group + s / per_head, query tile qt_first + s % per_head.
  auto stage = [&](int step, int buf) {
    const int64_t zh = z * a.Hq + hk * a.group + step / per_head;
    const int i0 = (qt_first + step % per_head) * kBq;
    load_tile<kBq, kD>(q_s + buf * kBq * kStride,
                       static_cast<const uint16_t*>(a.q) + zh * a.L * a.E, i0, a.L, a.E, a.vec);
    load_tile<kBq, kD>(do_s + buf * kBq * kStride,
                       static_cast<const uint16_t*>(a.grad_out) + zh * a.L * a.Ev, i0, a.L, a.Ev,
                       a.vec);
    for (int r = threadIdx.x; r < kBq; r += kThreads) {
      const int i = i0 + r;
      lse_s[buf * kBq + r] = i < a.L ? a.lse[zh * a.L + i] : neg_inf<float>();
      dd_s[buf * kBq + r] = i < a.L ? a.delta[zh * a.L + i] : 0.f;
    }
  };

  load_tile<kTcRows, kD>(k_s, k, k0, a.S, a.E, a.vec);
  load_tile<kTcRows, kD>(v_s, v, k0, a.S, a.Ev, a.vec);
  cp_async_commit();
  if (steps > 0) stage(0, 0);
  cp_async_commit();

  float dk[kDO / 8][4] = {};
  float dv[kDO / 8][4] = {};
  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) {
      stage(step + 1, (step + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int buf = step & 1;
    const int h = hk * a.group + step / per_head;
    const int64_t zh = z * a.Hq + h;
    const int i0 = (qt_first + step % per_head) * kBq;
    const float* bias_zh = a.bias == nullptr ? nullptr : a.bias + z * a.bias_z + h * a.bias_h;
    const uint16_t* qb = q_s + buf * kBq * kStride;
    const uint16_t* dob = do_s + buf * kBq * kStride;

    float st[kBq / 8][4] = {};   // S^T, then P^T (dropped)
    float dpt[kBq / 8][4] = {};  // dP^T, then dS^T
    mma_abt<kBf16, kD, kBq / 8, kStride>(st, k_s + warp * 16 * kStride, qb, ln);
    mma_abt<kBf16, kD, kBq / 8, kStride>(dpt, v_s + warp * 16 * kStride, dob, ln);
#pragma unroll
    for (int nt = 0; nt < kBq / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int il = nt * 8 + 2 * t + (c & 1);  // C column = query
        const int i = i0 + il, j = keys[c >> 1];
        const float p = recomputed_p(a, bias_zh, st[nt][c], i, j, lse_s[buf * kBq + il]);
        float p_drop = p, dp = dpt[nt][c];
        if (a.dropout) {
          const bool keep = p != 0.f && kept(a, zh, i, j);  // p = 0 makes both products 0
          p_drop = keep ? p * a.drop_scale : 0.f;
          dp = keep ? dp * a.drop_scale : 0.f;
        }
        st[nt][c] = p_drop;
        dpt[nt][c] = p * (dp - dd_s[buf * kBq + il]);
      }
    }
    // dO and Q stored [query][dim] = [k][n]: this chunk's columns d0..d0+kDO.
    mma_frag_b<kBf16, kBq, kDO / 8, kStride>(dv, st, dob, d0, ln);
    mma_frag_b<kBf16, kBq, kDO / 8, kStride>(dk, dpt, qb, d0, ln);
    __syncthreads();
  }
  cp_async_wait<0>();  // nothing may stay in flight at exit (steps == 0 leaves K/V's group)

  auto* dk_out = static_cast<uint16_t*>(a.dk) + zhk * a.S * a.E;
  auto* dv_out = static_cast<uint16_t*>(a.dv) + zhk * a.S * a.Ev;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = keys[r];
    if (j >= a.S) continue;
    uint16_t* dk_row = dk_out + static_cast<int64_t>(j) * a.E;
    uint16_t* dv_row = dv_out + static_cast<int64_t>(j) * a.Ev;
#pragma unroll
    for (int dt = 0; dt < kDO / 8; ++dt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = d0 + dt * 8 + 2 * t + e;
        if (col < a.E) dk_row[col] = to_bits<kBf16>(dk[dt][2 * r + e] * a.scale);
        if (col < a.Ev) dv_row[col] = to_bits<kBf16>(dv[dt][2 * r + e]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core dQ: CTA = (64 query rows, zh) as the forward; per key tile S = Q K^T and
// dP = dO V^T, dS = P (dP - D), dQ += dS K (K stored [key][dim] = [k][n]). Shared: Q, dO
// [64][kD+8] (loaded once), K, V [2][kBc][kD+8] double-buffered as in the forward.
template <bool kBf16, int kD, int kBc>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel_tc(const Attn<float> a) {
  constexpr int kStride = kD + kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem);
  uint16_t* do_s = q_s + kTcRows * kStride;
  uint16_t* k_s = do_s + kTcRows * kStride;  // [2][kBc][kStride]
  uint16_t* v_s = k_s + 2 * kBc * kStride;   // [2][kBc][kStride]

  const int q_tile = static_cast<int>(blockIdx.x % a.n_tiles);
  const int64_t zh = blockIdx.x / a.n_tiles;
  const int64_t z = zh / a.Hq;
  const int h = static_cast<int>(zh % a.Hq);
  const int64_t zhk = z * a.Hk + h / a.group;
  const int q0 = q_tile * kTcRows;
  const auto* k = static_cast<const uint16_t*>(a.k) + zhk * a.S * a.E;
  const auto* v = static_cast<const uint16_t*>(a.v) + zhk * a.S * a.Ev;
  const float* bias_zh = a.bias == nullptr ? nullptr : a.bias + z * a.bias_z + h * a.bias_h;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4;
  const LdmLane ln = ldm_lane(lane);
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float lse_r[2], dd_r[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse_r[r] = rows[r] < a.L ? a.lse[zh * a.L + rows[r]] : neg_inf<float>();
    dd_r[r] = rows[r] < a.L ? a.delta[zh * a.L + rows[r]] : 0.f;
  }
  const int n_kt = visible_key_tiles(q0, kTcRows, a.L, a.S, kBc, a.causal);

  load_tile<kTcRows, kD>(q_s, static_cast<const uint16_t*>(a.q) + zh * a.L * a.E, q0, a.L, a.E,
                         a.vec);
  load_tile<kTcRows, kD>(do_s, static_cast<const uint16_t*>(a.grad_out) + zh * a.L * a.Ev, q0,
                         a.L, a.Ev, a.vec);
  cp_async_commit();
  load_tile<kBc, kD>(k_s, k, 0, a.S, a.E, a.vec);
  load_tile<kBc, kD>(v_s, v, 0, a.S, a.Ev, a.vec);
  cp_async_commit();

  float dq[kD / 8][4] = {};
  for (int kt = 0; kt < n_kt; ++kt) {
    if (kt + 1 < n_kt) {
      const int nb = (kt + 1) & 1;
      load_tile<kBc, kD>(k_s + nb * kBc * kStride, k, (kt + 1) * kBc, a.S, a.E, a.vec);
      load_tile<kBc, kD>(v_s + nb * kBc * kStride, v, (kt + 1) * kBc, a.S, a.Ev, a.vec);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* kb = k_s + (kt & 1) * kBc * kStride;
    const uint16_t* vb = v_s + (kt & 1) * kBc * kStride;
    const int k0 = kt * kBc;

    float s[kBc / 8][4] = {};   // S, then dS
    float dp[kBc / 8][4] = {};  // dP
    mma_abt<kBf16, kD, kBc / 8, kStride>(s, q_s + warp * 16 * kStride, kb, ln);
    mma_abt<kBf16, kD, kBc / 8, kStride>(dp, do_s + warp * 16 * kStride, vb, ln);
#pragma unroll
    for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int r = c >> 1;
        const int i = rows[r], j = k0 + nt * 8 + 2 * t + (c & 1);
        const float p = recomputed_p(a, bias_zh, s[nt][c], i, j, lse_r[r]);
        float dpv = dp[nt][c];
        if (a.dropout) dpv = p != 0.f && kept(a, zh, i, j) ? dpv * a.drop_scale : 0.f;
        s[nt][c] = p * (dpv - dd_r[r]);
      }
    }
    mma_frag_b<kBf16, kBc, kD / 8, kStride>(dq, s, kb, 0, ln);
    __syncthreads();
  }

  auto* dq_out = static_cast<uint16_t*>(a.dq) + zh * a.L * a.E;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = rows[r];
    if (i >= a.L) continue;
    uint16_t* dq_row = dq_out + static_cast<int64_t>(i) * a.E;
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = dt * 8 + 2 * t + e;
        if (col < a.E) dq_row[col] = to_bits<kBf16>(dq[dt][2 * r + e] * a.scale);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SIMT kernels (float32, float64; acc = the input type). A CTA is 4 warps; a warp owns kR rows
// (queries, or keys in dK/dV) and its 32 lanes run along the other side of a 32-wide tile, so
// a score element (row r, lane) lives in one lane and row reductions are warp shuffles. Head
// dims are padded to 32 * kN (zero-filled) so lane + 32c indexes them; shared rows have the odd
// stride 32 * kN + 1, so lanes reading 32 different rows at one column hit 32 different banks.
// Products that need another lane's P or dS go through a per-warp [kR][32] shared buffer
// (written, __syncwarp, read by the same warp).

// Rows [row0, row0 + rows) of a row-major (n_rows, n_cols) matrix into tile[rows][stride],
// columns 0..cols-1, zeros outside the matrix.
template <typename T>
__device__ __forceinline__ void load_rows(T* tile, int stride, int rows, int cols, const T* src,
                                          int64_t row0, int64_t n_rows, int n_cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, c = idx % cols;
    const int64_t gr = row0 + r;
    tile[r * stride + c] = gr < n_rows && c < n_cols ? src[gr * n_cols + c] : T(0);
  }
}

// Forward: CTA = (4 kR query rows, zh), key tiles of 32 (lane = key). Shared: Q [4kR][stride],
// K, V [32][stride], P [4kR][32].
template <typename T, int kR, int kN>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel_simt(const Attn<T> a) {
  constexpr int kBq = kWarps * kR, kBk = kWarp, kCols = kWarp * kN, kStride = kCols + 1;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* k_s = q_s + kBq * kStride;
  T* v_s = k_s + kBk * kStride;
  T* p_s = v_s + kBk * kStride;

  const int q_tile = static_cast<int>(blockIdx.x % a.n_tiles);
  const int64_t zh = blockIdx.x / a.n_tiles;
  const int64_t z = zh / a.Hq;
  const int h = static_cast<int>(zh % a.Hq);
  const int64_t zhk = z * a.Hk + h / a.group;
  const int q0 = q_tile * kBq;
  const T* k = static_cast<const T*>(a.k) + zhk * a.S * a.E;
  const T* v = static_cast<const T*>(a.v) + zhk * a.S * a.Ev;
  const T* bias_zh = a.bias == nullptr ? nullptr : a.bias + z * a.bias_z + h * a.bias_h;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int row0 = warp * kR;  // this warp's first row in the tile
  T* p_w = p_s + row0 * kWarp;

  load_rows(q_s, kStride, kBq, kCols, static_cast<const T*>(a.q) + zh * a.L * a.E, q0, a.L, a.E);
  T o[kR][kN] = {};
  T m[kR], l[kR];  // running max; running sum of this lane's column (reduced at the end)
#pragma unroll
  for (int r = 0; r < kR; ++r) m[r] = neg_inf<T>(), l[r] = T(0);

  const int n_kt = visible_key_tiles(q0, kBq, a.L, a.S, kBk, a.causal);
  for (int kt = 0; kt < n_kt; ++kt) {
    const int k0 = kt * kBk;
    __syncthreads();  // the previous tile's K, V reads are done (and Q is written)
    load_rows(k_s, kStride, kBk, kCols, k, k0, a.S, a.E);
    load_rows(v_s, kStride, kBk, kCols, v, k0, a.S, a.Ev);
    __syncthreads();

    T s[kR] = {};
    for (int e = 0; e < a.E; ++e) {
      const T kv = k_s[lane * kStride + e];
#pragma unroll
      for (int r = 0; r < kR; ++r) s[r] += q_s[(row0 + r) * kStride + e] * kv;
    }
    const int j = k0 + lane;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const int i = q0 + row0 + r;
      const T x = score(a, bias_zh, s[r], i, j);
      const T m_new = max(m[r], warp_max(x));
      const T m_use = m_new == neg_inf<T>() ? T(0) : m_new;  // fully masked so far: p = 0
      const T alpha = exp_acc(m[r] - m_use);
      m[r] = m_new;
      T p = exp_acc(x - m_use);
      l[r] = l[r] * alpha + p;
#pragma unroll
      for (int c = 0; c < kN; ++c) o[r][c] *= alpha;
      if (a.dropout && p != T(0)) p = kept(a, zh, i, j) ? p * a.drop_scale : T(0);
      p_w[r * kWarp + lane] = p;
    }
    __syncwarp();
    for (int jj = 0; jj < kBk; ++jj) {
#pragma unroll
      for (int c = 0; c < kN; ++c) {
        const T vv = v_s[jj * kStride + lane + kWarp * c];
#pragma unroll
        for (int r = 0; r < kR; ++r) o[r][c] += p_w[r * kWarp + jj] * vv;
      }
    }
  }

  T* out = static_cast<T*>(a.out) + zh * a.L * a.Ev;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const T l_row = warp_sum(l[r]);
    const int i = q0 + row0 + r;
    if (i >= a.L) continue;
    const T inv = l_row > T(0) ? T(1) / l_row : T(0);
#pragma unroll
    for (int c = 0; c < kN; ++c) {
      const int d = lane + kWarp * c;
      if (d < a.Ev) out[static_cast<int64_t>(i) * a.Ev + d] = o[r][c] * inv;
    }
    if (lane == 0) a.lse_out[zh * a.L + i] = l_row > T(0) ? m[r] + log_acc(l_row) : neg_inf<T>();
  }
}

// dK/dV: CTA = (4 kR keys, zhk); steps over the group's query heads and query tiles of 32
// (lane = query). Shared: K, V [4kR][stride]; Q, dO [32][stride]; P^T, dS^T [4kR][32];
// lse, D [32].
template <typename T, int kR, int kN>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel_simt(const Attn<T> a) {
  constexpr int kBk = kWarps * kR, kBq = kWarp, kCols = kWarp * kN, kStride = kCols + 1;
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kBk * kStride;
  T* q_s = v_s + kBk * kStride;
  T* do_s = q_s + kBq * kStride;
  T* pt_s = do_s + kBq * kStride;
  T* dst_s = pt_s + kBk * kWarp;
  T* lse_s = dst_s + kBk * kWarp;
  T* dd_s = lse_s + kBq;

  const int k_tile = static_cast<int>(blockIdx.x % a.n_tiles);
  const int64_t zhk = blockIdx.x / a.n_tiles;
  const int64_t z = zhk / a.Hk;
  const int hk = static_cast<int>(zhk % a.Hk);
  const int k0 = k_tile * kBk;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int row0 = warp * kR;
  T* pt_w = pt_s + row0 * kWarp;
  T* dst_w = dst_s + row0 * kWarp;

  load_rows(k_s, kStride, kBk, kCols, static_cast<const T*>(a.k) + zhk * a.S * a.E, k0, a.S, a.E);
  load_rows(v_s, kStride, kBk, kCols, static_cast<const T*>(a.v) + zhk * a.S * a.Ev, k0, a.S,
            a.Ev);
  T dk[kR][kN] = {};
  T dv[kR][kN] = {};

  const int n_qt = (a.L + kBq - 1) / kBq;
  const int qt_first = first_query_tile(k0, kBq, n_qt, a.causal);
  const int per_head = n_qt - qt_first;
  const int steps = a.group * per_head;
  for (int step = 0; step < steps; ++step) {
    const int h = hk * a.group + step / per_head;
    const int64_t zh = z * a.Hq + h;
    const int i0 = (qt_first + step % per_head) * kBq;
    const T* bias_zh = a.bias == nullptr ? nullptr : a.bias + z * a.bias_z + h * a.bias_h;
    __syncthreads();  // the previous step's Q, dO reads are done (and K, V are written)
    load_rows(q_s, kStride, kBq, kCols, static_cast<const T*>(a.q) + zh * a.L * a.E, i0, a.L, a.E);
    load_rows(do_s, kStride, kBq, kCols, static_cast<const T*>(a.grad_out) + zh * a.L * a.Ev, i0,
              a.L, a.Ev);
    if (threadIdx.x < kBq) {
      const int i = i0 + threadIdx.x;
      lse_s[threadIdx.x] = i < a.L ? a.lse[zh * a.L + i] : neg_inf<T>();
      dd_s[threadIdx.x] = i < a.L ? a.delta[zh * a.L + i] : T(0);
    }
    __syncthreads();

    T st[kR] = {}, dpt[kR] = {};
    for (int e = 0; e < a.E; ++e) {
      const T qv = q_s[lane * kStride + e];
#pragma unroll
      for (int r = 0; r < kR; ++r) st[r] += k_s[(row0 + r) * kStride + e] * qv;
    }
    for (int e = 0; e < a.Ev; ++e) {
      const T dov = do_s[lane * kStride + e];
#pragma unroll
      for (int r = 0; r < kR; ++r) dpt[r] += v_s[(row0 + r) * kStride + e] * dov;
    }
    const int i = i0 + lane;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const int j = k0 + row0 + r;
      const T p = recomputed_p(a, bias_zh, st[r], i, j, lse_s[lane]);
      T p_drop = p, dp = dpt[r];
      if (a.dropout) {
        const bool keep = p != T(0) && kept(a, zh, i, j);
        p_drop = keep ? p * a.drop_scale : T(0);
        dp = keep ? dp * a.drop_scale : T(0);
      }
      pt_w[r * kWarp + lane] = p_drop;
      dst_w[r * kWarp + lane] = p * (dp - dd_s[lane]);
    }
    __syncwarp();
    for (int ii = 0; ii < kBq; ++ii) {
#pragma unroll
      for (int c = 0; c < kN; ++c) {
        const T qv = q_s[ii * kStride + lane + kWarp * c];
        const T dov = do_s[ii * kStride + lane + kWarp * c];
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          dv[r][c] += pt_w[r * kWarp + ii] * dov;
          dk[r][c] += dst_w[r * kWarp + ii] * qv;
        }
      }
    }
  }

  T* dk_out = static_cast<T*>(a.dk) + zhk * a.S * a.E;
  T* dv_out = static_cast<T*>(a.dv) + zhk * a.S * a.Ev;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int j = k0 + row0 + r;
    if (j >= a.S) continue;
#pragma unroll
    for (int c = 0; c < kN; ++c) {
      const int d = lane + kWarp * c;
      if (d < a.E) dk_out[static_cast<int64_t>(j) * a.E + d] = dk[r][c] * a.scale;
      if (d < a.Ev) dv_out[static_cast<int64_t>(j) * a.Ev + d] = dv[r][c];
    }
  }
}

// dQ: CTA = (4 kR query rows, zh), key tiles of 32 (lane = key). Shared: Q, dO [4kR][stride];
// K, V [32][stride]; dS [4kR][32].
template <typename T, int kR, int kN>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel_simt(const Attn<T> a) {
  constexpr int kBq = kWarps * kR, kBk = kWarp, kCols = kWarp * kN, kStride = kCols + 1;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* do_s = q_s + kBq * kStride;
  T* k_s = do_s + kBq * kStride;
  T* v_s = k_s + kBk * kStride;
  T* ds_s = v_s + kBk * kStride;

  const int q_tile = static_cast<int>(blockIdx.x % a.n_tiles);
  const int64_t zh = blockIdx.x / a.n_tiles;
  const int64_t z = zh / a.Hq;
  const int h = static_cast<int>(zh % a.Hq);
  const int64_t zhk = z * a.Hk + h / a.group;
  const int q0 = q_tile * kBq;
  const T* k = static_cast<const T*>(a.k) + zhk * a.S * a.E;
  const T* v = static_cast<const T*>(a.v) + zhk * a.S * a.Ev;
  const T* bias_zh = a.bias == nullptr ? nullptr : a.bias + z * a.bias_z + h * a.bias_h;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int row0 = warp * kR;
  T* ds_w = ds_s + row0 * kWarp;

  load_rows(q_s, kStride, kBq, kCols, static_cast<const T*>(a.q) + zh * a.L * a.E, q0, a.L, a.E);
  load_rows(do_s, kStride, kBq, kCols, static_cast<const T*>(a.grad_out) + zh * a.L * a.Ev, q0,
            a.L, a.Ev);
  T lse_r[kR], dd_r[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int i = q0 + row0 + r;
    lse_r[r] = i < a.L ? a.lse[zh * a.L + i] : neg_inf<T>();
    dd_r[r] = i < a.L ? a.delta[zh * a.L + i] : T(0);
  }
  T dq[kR][kN] = {};

  const int n_kt = visible_key_tiles(q0, kBq, a.L, a.S, kBk, a.causal);
  for (int kt = 0; kt < n_kt; ++kt) {
    const int k0 = kt * kBk;
    __syncthreads();  // the previous tile's K reads are done (and Q, dO are written)
    load_rows(k_s, kStride, kBk, kCols, k, k0, a.S, a.E);
    load_rows(v_s, kStride, kBk, kCols, v, k0, a.S, a.Ev);
    __syncthreads();

    T s[kR] = {}, dp[kR] = {};
    for (int e = 0; e < a.E; ++e) {
      const T kv = k_s[lane * kStride + e];
#pragma unroll
      for (int r = 0; r < kR; ++r) s[r] += q_s[(row0 + r) * kStride + e] * kv;
    }
    for (int e = 0; e < a.Ev; ++e) {
      const T vv = v_s[lane * kStride + e];
#pragma unroll
      for (int r = 0; r < kR; ++r) dp[r] += do_s[(row0 + r) * kStride + e] * vv;
    }
    const int j = k0 + lane;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const int i = q0 + row0 + r;
      const T p = recomputed_p(a, bias_zh, s[r], i, j, lse_r[r]);
      T dpv = dp[r];
      if (a.dropout) dpv = p != T(0) && kept(a, zh, i, j) ? dpv * a.drop_scale : T(0);
      ds_w[r * kWarp + lane] = p * (dpv - dd_r[r]);
    }
    __syncwarp();
    for (int jj = 0; jj < kBk; ++jj) {
#pragma unroll
      for (int c = 0; c < kN; ++c) {
        const T kv = k_s[jj * kStride + lane + kWarp * c];
#pragma unroll
        for (int r = 0; r < kR; ++r) dq[r][c] += ds_w[r * kWarp + jj] * kv;
      }
    }
  }

  T* dq_out = static_cast<T*>(a.dq) + zh * a.L * a.E;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int i = q0 + row0 + r;
    if (i >= a.L) continue;
#pragma unroll
    for (int c = 0; c < kN; ++c) {
      const int d = lane + kWarp * c;
      if (d < a.E) dq_out[static_cast<int64_t>(i) * a.E + d] = dq[r][c] * a.scale;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host side

constexpr int64_t kMaxSeq = (int64_t{1} << 31) - 1024;  // row indices stay int (tile math)

at::ScalarType acc_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void poison(const at::Tensor& t, cudaStream_t stream) {
  if (poison_outputs() && t.numel() > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0xFF, t.nbytes(), stream));
  }
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// A contiguous 4D operand on q's device with q's dtype.
void check_operand(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q) {
  PK_CHECK_VALUE(t.device() == q.device(), fn, ": ", name, " must be on q's device (", q.device(),
                 "), got ", t.device());
  PK_CHECK_TYPE(t.scalar_type() == q.scalar_type(), fn, ": ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t.scalar_type());
  PK_CHECK_VALUE(t.dim() == 4, fn, ": ", name, " must be 4D, got ", t.dim(), "D");
  PK_CHECK_VALUE(t.is_contiguous(), fn, ": ", name, " must be contiguous, got strides ",
                 t.strides());
}

// Checks the shapes of q, k, v (already checked by check_q / check_operand), bias and the
// scalars against the op's contract.
void check_args(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& bias, double dropout_p) {
  PK_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ",
                 dropout_p);
  const int64_t Z = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hk = k.size(1), S = k.size(2), Ev = v.size(3);
  PK_CHECK_VALUE(k.size(0) == Z && v.size(0) == Z, fn, ": k and v must have q's batch Z = ", Z,
                 ", got k ", k.sizes(), ", v ", v.sizes());
  PK_CHECK_VALUE(Hk >= 1 && v.size(1) == Hk && Hq % Hk == 0, fn,
                 ": k and v must have the same number of heads Hk >= 1 dividing q's Hq = ", Hq,
                 ", got k ", k.sizes(), ", v ", v.sizes());
  PK_CHECK_VALUE(v.size(2) == S, fn, ": v must have k's length S = ", S, ", got ", v.sizes());
  PK_CHECK_VALUE(k.size(3) == E, fn, ": k must have q's head dim E = ", E, ", got ", k.sizes());
  PK_CHECK_VALUE(E >= 1 && E <= 256, fn, ": q's head dim E must be in 1..256, got ", E);
  PK_CHECK_VALUE(Ev >= 1 && Ev <= 256, fn, ": v's head dim Ev must be in 1..256, got ", Ev);
  PK_CHECK_VALUE(L <= kMaxSeq && S <= kMaxSeq, fn,
                 ": sequence lengths must be below 2^31 - 1024, got L = ", L, ", S = ", S);
  PK_CHECK_VALUE(Z * Hq <= std::numeric_limits<int32_t>::max(), fn, ": Z * Hq = ", Z * Hq,
                 " is too large");
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  PK_CHECK_VALUE(b.device() == q.device(), fn, ": bias must be on q's device (", q.device(),
                 "), got ", b.device());
  PK_CHECK_TYPE(b.scalar_type() == acc_type(q), fn, ": bias must be ", acc_type(q),
                " for q of dtype ", q.scalar_type(), ", got ", b.scalar_type());
  PK_CHECK_VALUE(b.dim() == 4 && b.size(0) == Z && b.size(1) == Hq && b.size(2) == L &&
                     b.size(3) == S,
                 fn, ": bias must have shape (Z, Hq, L, S) = (", Z, ", ", Hq, ", ", L, ", ", S,
                 "), got ", b.sizes());
}

// The kernels' argument block for checked inputs (outputs are filled in by the caller).
template <typename acc_t>
Attn<acc_t> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& bias, double scale, bool is_causal,
                      double dropout_p, int64_t seed) {
  Attn<acc_t> a{};
  if (bias.has_value() && bias->numel() > 0) {
    const at::Tensor& b = *bias;
    a.bias = b.const_data_ptr<acc_t>();
    a.bias_z = b.stride(0), a.bias_h = b.stride(1), a.bias_i = b.stride(2), a.bias_j = b.stride(3);
  }
  const int64_t Hq = q.size(1), Hk = k.size(1);
  a.Hq = static_cast<int>(Hq), a.Hk = static_cast<int>(Hk);
  a.group = static_cast<int>(Hq / Hk);
  a.L = static_cast<int>(q.size(2)), a.S = static_cast<int>(k.size(2));
  a.E = static_cast<int>(q.size(3)), a.Ev = static_cast<int>(v.size(3));
  a.scale = static_cast<acc_t>(scale);
  a.causal = is_causal;
  a.dropout = dropout_p > 0.0;
  a.drop_scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  a.drop_threshold = dropout_threshold(dropout_p);
  a.seed = static_cast<uint64_t>(seed);
  a.q = q.const_data_ptr(), a.k = k.const_data_ptr(), a.v = v.const_data_ptr();
  a.vec = a.E % 8 == 0 && a.Ev % 8 == 0 && aligned16(q) && aligned16(k) && aligned16(v);
  return a;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A 1D grid of n blocks (CTA index math is 32-bit friendly but n itself must fit gridDim.x).
unsigned grid_of(const char* fn, int64_t n) {
  PK_CHECK_VALUE(n <= std::numeric_limits<int32_t>::max(), fn, ": ", n,
                 " blocks do not fit one launch (shape too large)");
  return static_cast<unsigned>(n);
}

// Opts the kernel into `bytes` of dynamic shared memory (above the 48 KB default).
template <typename Kernel>
void set_smem(const char* fn, Kernel kernel, int64_t bytes) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  PK_CHECK(bytes <= limit, fn, ": needs ", bytes, " bytes of shared memory per block, the device "
           "allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// Calls f(std::integral_constant<int, kD>) with the padded head dim for max(E, Ev).
template <typename F>
void with_tc_head_dim(int E, int Ev, F&& f) {
  const int d = std::max(E, Ev);
  if (d <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (d <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (d <= 96) {
    f(std::integral_constant<int, 96>{});
  } else if (d <= 128) {
    f(std::integral_constant<int, 128>{});
  } else if (d <= 192) {
    f(std::integral_constant<int, 192>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

// Calls f(std::integral_constant<int, kN>) with 32 * kN >= max(E, Ev), kN in {1, 2, 4, 8}.
template <typename F>
void with_simt_head_dim(int E, int Ev, F&& f) {
  const int d = std::max(E, Ev);
  if (d <= 32) {
    f(std::integral_constant<int, 1>{});
  } else if (d <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (d <= 128) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// Key tile of the tensor-core fwd/dQ kernels, query tile of dK/dV, output-dim chunk of dK/dV:
// chosen so the per-warp accumulators (kD / 2 floats per lane for O or dQ; kDO for dK + dV)
// plus the score tiles fit the 255 registers a lane may have.
template <int kD>
constexpr int kTcKeyTile = kD <= 128 ? 64 : 32;
template <int kD>
constexpr int kTcOutChunk = kD <= 128 ? kD : kD / 2;
template <int kDO>
constexpr int kTcQueryTile = kDO <= 64 ? 64 : 32;
// Rows per warp of the SIMT kernels: 8 for float, 4 for double (shared memory at kN = 8).
template <typename T>
constexpr int kSimtRows = std::is_same_v<T, double> ? 4 : 8;

template <bool kBf16>
void launch_fwd_tc(Attn<float> a, int64_t ZH, cudaStream_t stream) {
  constexpr const char* fn = "attention_fwd_cuda";
  with_tc_head_dim(a.E, a.Ev, [&](auto dim) {
    constexpr int kD = decltype(dim)::value;
    constexpr int kBc = kTcKeyTile<kD>;
    const auto kernel = attention_fwd_kernel_tc<kBf16, kD, kBc>;
    const int64_t smem = int64_t{kTcRows + 4 * kBc} * (kD + kPad) * 2;
    set_smem(fn, kernel, smem);
    a.n_tiles = static_cast<int>(ceil_div(a.L, kTcRows));
    // one CTA per (64 query rows, z * Hq + h), tiles of one head adjacent (K, V shared in L2)
    kernel<<<grid_of(fn, a.n_tiles * ZH), kThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void launch_fwd_simt(Attn<T> a, int64_t ZH, cudaStream_t stream) {
  constexpr const char* fn = "attention_fwd_cuda";
  with_simt_head_dim(a.E, a.Ev, [&](auto n) {
    constexpr int kN = decltype(n)::value, kR = kSimtRows<T>;
    constexpr int kBq = kWarps * kR, kStride = kWarp * kN + 1;
    const auto kernel = attention_fwd_kernel_simt<T, kR, kN>;
    const int64_t smem = int64_t{(kBq + 2 * kWarp) * kStride + kBq * kWarp} * sizeof(T);
    set_smem(fn, kernel, smem);
    a.n_tiles = static_cast<int>(ceil_div(a.L, kBq));
    // one CTA per (4 kR query rows, z * Hq + h)
    kernel<<<grid_of(fn, a.n_tiles * ZH), kThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <bool kBf16>
void launch_bwd_tc(Attn<float> a, int64_t Z, cudaStream_t stream) {
  constexpr const char* fn = "attention_bwd_cuda";
  with_tc_head_dim(a.E, a.Ev, [&](auto dim) {
    constexpr int kD = decltype(dim)::value;
    constexpr int kDO = kTcOutChunk<kD>, kBq = kTcQueryTile<kDO>, kBc = kTcKeyTile<kD>;
    {
      const auto kernel = attention_bwd_dkdv_kernel_tc<kBf16, kD, kDO, kBq>;
      const int64_t smem =
          int64_t{2 * kTcRows + 4 * kBq} * (kD + kPad) * 2 + int64_t{4 * kBq} * sizeof(float);
      set_smem(fn, kernel, smem);
      Attn<float> b = a;
      b.n_tiles = static_cast<int>(ceil_div(a.S, kTcRows));
      b.n_chunks = kD / kDO;
      // one CTA per (output-dim chunk, 64 keys, z * Hk + kv head)
      kernel<<<grid_of(fn, int64_t{b.n_chunks} * b.n_tiles * Z * a.Hk), kThreads, smem,
               stream>>>(b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    {
      const auto kernel = attention_bwd_dq_kernel_tc<kBf16, kD, kBc>;
      const int64_t smem = int64_t{2 * kTcRows + 4 * kBc} * (kD + kPad) * 2;
      set_smem(fn, kernel, smem);
      Attn<float> b = a;
      b.n_tiles = static_cast<int>(ceil_div(a.L, kTcRows));
      // one CTA per (64 query rows, z * Hq + h)
      kernel<<<grid_of(fn, int64_t{b.n_tiles} * Z * a.Hq), kThreads, smem, stream>>>(b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

template <typename T>
void launch_bwd_simt(Attn<T> a, int64_t Z, cudaStream_t stream) {
  constexpr const char* fn = "attention_bwd_cuda";
  with_simt_head_dim(a.E, a.Ev, [&](auto n) {
    constexpr int kN = decltype(n)::value, kR = kSimtRows<T>;
    constexpr int kRows = kWarps * kR, kStride = kWarp * kN + 1;
    {
      const auto kernel = attention_bwd_dkdv_kernel_simt<T, kR, kN>;
      const int64_t smem =
          int64_t{2 * (kRows + kWarp) * kStride + 2 * kRows * kWarp + 2 * kWarp} * sizeof(T);
      set_smem(fn, kernel, smem);
      Attn<T> b = a;
      b.n_tiles = static_cast<int>(ceil_div(a.S, kRows));
      // one CTA per (4 kR keys, z * Hk + kv head)
      kernel<<<grid_of(fn, int64_t{b.n_tiles} * Z * a.Hk), kThreads, smem, stream>>>(b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    {
      const auto kernel = attention_bwd_dq_kernel_simt<T, kR, kN>;
      const int64_t smem = int64_t{2 * (kRows + kWarp) * kStride + kRows * kWarp} * sizeof(T);
      set_smem(fn, kernel, smem);
      Attn<T> b = a;
      b.n_tiles = static_cast<int>(ceil_div(a.L, kRows));
      // one CTA per (4 kR query rows, z * Hq + h)
      kernel<<<grid_of(fn, int64_t{b.n_tiles} * Z * a.Hq), kThreads, smem, stream>>>(b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

template <typename scalar_t>
void launch_delta(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& delta,
                  cudaStream_t stream) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr int kDeltaThreads = 256;
  const int64_t rows = delta.numel();
  const int Ev = static_cast<int>(out.size(3));
  // a warp per row (z, h, i)
  attention_bwd_delta_kernel<scalar_t, acc_t>
      <<<grid_of("attention_bwd_cuda", ceil_div(rows, kDeltaThreads / kWarp)), kDeltaThreads, 0,
         stream>>>(grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                   delta.data_ptr<acc_t>(), rows, Ev);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_q(const char* fn, const at::Tensor& q) {
  PK_CHECK_VALUE(q.device().is_cuda(), fn, ": q must be a CUDA tensor, got ", q.device());
  const auto t = q.scalar_type();
  PK_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, fn,
                ": q must be float16, bfloat16, float32 or float64, got ", t);
  PK_CHECK_VALUE(q.dim() == 4, fn, ": q must be 4D (Z, Hq, L, E), got ", q.dim(), "D");
  PK_CHECK_VALUE(q.is_contiguous(), fn, ": q must be contiguous, got strides ", q.strides());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& bias,
                                                      double scale, bool is_causal,
                                                      double dropout_p, int64_t seed) {
  constexpr const char* fn = "attention_fwd_cuda";
  check_q(fn, q);
  check_operand(fn, "k", k, q);
  check_operand(fn, "v", v, q);
  check_args(fn, q, k, v, bias, dropout_p);
  const int64_t Z = q.size(0), Hq = q.size(1), L = q.size(2), S = k.size(2), Ev = v.size(3);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({Z, Hq, L, Ev}, q.options());
  at::Tensor lse = at::empty({Z, Hq, L}, q.options().dtype(acc_type(q)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  poison(out, stream);
  poison(lse, stream);
  const auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    if (Z * Hq * L == 0) return;
    if (S == 0) {  // nothing to attend: every row fully masked
      out.zero_();
      lse.fill_(-std::numeric_limits<double>::infinity());
      return;
    }
    Attn<acc_t> a = make_args<acc_t>(q, k, v, bias, scale, is_causal, dropout_p, seed);
    a.out = out.data_ptr();
    a.lse_out = lse.data_ptr<acc_t>();
    switch (q.scalar_type()) {
      case at::kHalf:
        if constexpr (std::is_same_v<acc_t, float>) launch_fwd_tc<false>(a, Z * Hq, stream);
        break;
      case at::kBFloat16:
        if constexpr (std::is_same_v<acc_t, float>) launch_fwd_tc<true>(a, Z * Hq, stream);
        break;
      case at::kFloat:
        if constexpr (std::is_same_v<acc_t, float>) launch_fwd_simt<float>(a, Z * Hq, stream);
        break;
      default:
        if constexpr (std::is_same_v<acc_t, double>) launch_fwd_simt<double>(a, Z * Hq, stream);
        break;
    }
  };
  if (acc_type(q) == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    double scale, bool is_causal, double dropout_p, int64_t seed) {
  constexpr const char* fn = "attention_bwd_cuda";
  check_q(fn, q);
  check_operand(fn, "k", k, q);
  check_operand(fn, "v", v, q);
  check_operand(fn, "grad_out", grad_out, q);
  check_operand(fn, "out", out, q);
  check_args(fn, q, k, v, bias, dropout_p);
  const int64_t Z = q.size(0), Hq = q.size(1), L = q.size(2), S = k.size(2), Ev = v.size(3);
  PK_CHECK_VALUE(out.size(0) == Z && out.size(1) == Hq && out.size(2) == L && out.size(3) == Ev,
                 fn, ": out must have shape (Z, Hq, L, Ev) = (", Z, ", ", Hq, ", ", L, ", ", Ev,
                 "), got ", out.sizes());
  PK_CHECK_VALUE(grad_out.sizes() == out.sizes(), fn, ": grad_out must have out's shape ",
                 out.sizes(), ", got ", grad_out.sizes());
  PK_CHECK_VALUE(lse.device() == q.device(), fn, ": lse must be on q's device (", q.device(),
                 "), got ", lse.device());
  PK_CHECK_TYPE(lse.scalar_type() == acc_type(q), fn, ": lse must be ", acc_type(q),
                " for q of dtype ", q.scalar_type(), ", got ", lse.scalar_type());
  PK_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == Z && lse.size(1) == Hq && lse.size(2) == L, fn,
                 ": lse must have shape (Z, Hq, L) = (", Z, ", ", Hq, ", ", L, "), got ",
                 lse.sizes());
  PK_CHECK_VALUE(lse.is_contiguous(), fn, ": lse must be contiguous, got strides ",
                 lse.strides());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const at::Tensor* t : {&dq, &dk, &dv}) poison(*t, stream);
  const auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    if (Z * Hq * L == 0 || S == 0) {  // no (query, key) pair: every gradient is 0
      for (at::Tensor* t : {&dq, &dk, &dv}) {
        if (t->numel() > 0) t->zero_();
      }
      return;
    }
    Attn<acc_t> a = make_args<acc_t>(q, k, v, bias, scale, is_causal, dropout_p, seed);
    at::Tensor delta = at::empty({Z, Hq, L}, q.options().dtype(acc_type(q)));
    a.grad_out = grad_out.const_data_ptr();
    a.lse = lse.const_data_ptr<acc_t>();
    a.delta = delta.const_data_ptr<acc_t>();
    a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
    a.vec = a.vec && aligned16(grad_out);
    switch (q.scalar_type()) {
      case at::kHalf:
        if constexpr (std::is_same_v<acc_t, float>) {
          launch_delta<at::Half>(grad_out, out, delta, stream);
          launch_bwd_tc<false>(a, Z, stream);
        }
        break;
      case at::kBFloat16:
        if constexpr (std::is_same_v<acc_t, float>) {
          launch_delta<at::BFloat16>(grad_out, out, delta, stream);
          launch_bwd_tc<true>(a, Z, stream);
        }
        break;
      case at::kFloat:
        if constexpr (std::is_same_v<acc_t, float>) {
          launch_delta<float>(grad_out, out, delta, stream);
          launch_bwd_simt<float>(a, Z, stream);
        }
        break;
      default:
        if constexpr (std::is_same_v<acc_t, double>) {
          launch_delta<double>(grad_out, out, delta, stream);
          launch_bwd_simt<double>(a, Z, stream);
        }
        break;
    }
  };
  if (acc_type(q) == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
  return {dq, dk, dv};
}

}  // namespace pykern
