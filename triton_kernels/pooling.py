"""Pooling family in Triton: a (B, R, K) strided view reduced over R, and its backward.

Triton twin of csrc/cpu/pooling.cpp and csrc/cuda/pooling.cu, same argument order. Mean
accumulates in float32 (float64 for float64 input); max follows torch's index rule: the first
maximum, and any NaN wins (the last NaN's index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pykern.triton_kernels._launch import new_output, round_for_bfloat16


@triton.jit
def _pool_reduce_fwd_kernel(
    x_ptr, out_ptr, idx_ptr,
    R, K, sB, sR, sK,
    IS_MAX: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program per (b, tile of BLOCK_K outputs); it walks R in BLOCK_R steps.
    pid = tl.program_id(0).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    b = pid // k_tiles
    k = (pid % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    k_ok = k < K
    base = x_ptr + b * sB + k * sK
    total = tl.zeros([BLOCK_K], ACC)
    best = tl.full([BLOCK_K], float("-inf"), ACC)
    best_r = tl.zeros([BLOCK_K], tl.int64)
    last_nan_r = tl.full([BLOCK_K], -1, tl.int64)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        ok = (r[:, None] < R) & k_ok[None, :]
        v = tl.load(base[None, :] + r[:, None] * sR, mask=ok, other=0.0).to(ACC)
        if IS_MAX:
            nan = (v != v) & ok
            last_nan_r = tl.maximum(last_nan_r, tl.max(tl.where(nan, r[:, None], -1), axis=0))
            finite = tl.where(nan | ~ok, float("-inf"), v)
            tile_best = tl.max(finite, axis=0)
            first = tl.where((finite == tile_best[None, :]) & ok & ~nan, r[:, None], R)
            tile_r = tl.min(first, axis=0)
            take = tile_best > best  # strictly: ties keep the earlier index
            best_r = tl.where(take, tile_r, best_r)
            best = tl.where(take, tile_best, best)
        else:
            total += tl.sum(v, axis=0)
    if IS_MAX:
        has_nan = last_nan_r >= 0
        tl.store(out_ptr + b * K + k, tl.where(has_nan, float("nan"), best), mask=k_ok)
        tl.store(idx_ptr + b * K + k, tl.where(has_nan, last_nan_r, best_r), mask=k_ok)
    else:
        tl.store(out_ptr + b * K + k, round_for_bfloat16(total / R, TO_BF16), mask=k_ok)


@triton.jit
def _pool_reduce_bwd_kernel(
    dy_ptr, idx_ptr, dx_ptr,
    R, K, total, sB, sK,
    IS_MAX: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per BLOCK elements of the contiguous (B, R, K) gradient.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = i < total
    k = i % K
    r = (i // K) % R
    b = i // (K * R)
    g = tl.load(dy_ptr + b * sB + k * sK, mask=ok, other=0.0).to(ACC)
    if IS_MAX:
        hit = tl.load(idx_ptr + b * K + k, mask=ok, other=-1) == r
        dx = tl.where(hit, g, 0.0)
    else:
        dx = round_for_bfloat16(g / R, TO_BF16)
    tl.store(dx_ptr + i, dx, mask=ok)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def pool_reduce_fwd(x: torch.Tensor, is_max: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean or max over R of the (B, R, K) view x, int64 index of the max in R)."""
    B, R, K = x.shape
    if R == 0:
        raise ValueError("pool_reduce_fwd: nothing to pool over (R = 0)")
    out = new_output((B, K), x.dtype, x.device)
    indices = torch.empty((B if is_max else 0, K), dtype=torch.int64, device=x.device)
    if out.numel() == 0:
        return out, indices
    block_k = min(triton.next_power_of_2(K), 64)
    block_r = min(triton.next_power_of_2(R), max(1, 4096 // block_k))
    grid = (B * triton.cdiv(K, block_k),)
    _pool_reduce_fwd_kernel[grid](
        x, out, indices if is_max else out,
        R, K, x.stride(0), x.stride(1), x.stride(2),
        IS_MAX=is_max, ACC=_acc(x.dtype), TO_BF16=x.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_K=block_k,
    )  # fmt: skip
    return out, indices


def pool_reduce_bwd(
    grad_out: torch.Tensor, indices: torch.Tensor, R: int, is_max: bool
) -> torch.Tensor:
    """The gradient of pool_reduce_fwd, as a contiguous (B, R, K) tensor."""
    B, K = grad_out.shape
    dx = new_output((B, R, K), grad_out.dtype, grad_out.device)
    if dx.numel() == 0:
        return dx
    block = 1024
    _pool_reduce_bwd_kernel[(triton.cdiv(dx.numel(), block),)](
        grad_out, indices if is_max else grad_out, dx,
        R, K, dx.numel(), grad_out.stride(0), grad_out.stride(1),
        IS_MAX=is_max, ACC=_acc(grad_out.dtype), TO_BF16=grad_out.dtype == torch.bfloat16,
        BLOCK=block,
    )  # fmt: skip
    return dx
