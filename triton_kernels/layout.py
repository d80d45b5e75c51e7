"""Layout family in Triton: out = x.permute(perm).contiguous().

Triton twin of csrc/cpu/layout.cpp and csrc/cuda/layout.cu; it executes the same PermutePlan
(csrc/common/index.h, via pykern._C.permute_plan): batch dims x rows x cols, cols being the
output's unit-stride dim. Triton moves the tile through shared memory on a GPU when the load
and store layouts differ, so reads and writes both coalesce.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pykern._ext import _C
from pykern.triton_kernels._launch import autotune, cdiv, new_output

MAX_BATCH_DIMS = 6  # kMaxBatchDims in csrc/common/index.h

# Layout kernels move bytes: every dtype runs as the unsigned integer of its width.
_STORAGE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _split_batch(b, size, stride_in, stride_out, off_in, off_out):
    """Peels the innermost remaining batch dim off flat batch index b."""
    i = b % size
    return b // size, off_in + i * stride_in, off_out + i * stride_out


@autotune(
    configs=[
        triton.Config({"BLOCK_R": 64, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_R": 32, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_R": 128, "BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_R": 32, "BLOCK_C": 128}, num_warps=4),
    ],
    key=["rows", "cols", "row_in", "col_in"],
    interpreter_config={"BLOCK_R": 32, "BLOCK_C": 32},
)
@triton.jit
def _permute_copy_kernel(
    in_ptr, out_ptr,
    rows, cols, row_in, col_in, row_out,
    bs0, bs1, bs2, bs3, bs4, bs5,  # batch sizes, outermost first (1 when unused)
    bi0, bi1, bi2, bi3, bi4, bi5,  # batch input strides
    bo0, bo1, bo2, bo3, bo4, bo5,  # batch output strides
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One program per (batch, row tile, col tile); 64-bit offsets throughout.
    pid = tl.program_id(0).to(tl.int64)
    row_tiles = tl.cdiv(rows, BLOCK_R)
    col_tiles = tl.cdiv(cols, BLOCK_C)
    col_tile = pid % col_tiles
    row_tile = (pid // col_tiles) % row_tiles
    b = pid // (col_tiles * row_tiles)
    off_in = b * 0
    off_out = b * 0
    b, off_in, off_out = _split_batch(b, bs5, bi5, bo5, off_in, off_out)
    b, off_in, off_out = _split_batch(b, bs4, bi4, bo4, off_in, off_out)
    b, off_in, off_out = _split_batch(b, bs3, bi3, bo3, off_in, off_out)
    b, off_in, off_out = _split_batch(b, bs2, bi2, bo2, off_in, off_out)
    b, off_in, off_out = _split_batch(b, bs1, bi1, bo1, off_in, off_out)
    b, off_in, off_out = _split_batch(b, bs0, bi0, bo0, off_in, off_out)

    r = row_tile * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    tile = tl.load(in_ptr + off_in + r[:, None] * row_in + c[None, :] * col_in, mask=mask)
    tl.store(out_ptr + off_out + r[:, None] * row_out + c[None, :], tile, mask=mask)


def _storage_view(x: torch.Tensor, perm: list[int]) -> tuple[torch.Tensor, list[int]]:
    """x as an integer tensor of the same element width (strides kept), and the perm to use."""
    if x.element_size() == 16:  # complex128: two int64 halves, the pair kept innermost
        return torch.view_as_real(x).view(torch.int64), [*perm, x.dim()]
    return x.view(_STORAGE[x.element_size()]), perm


def permute_copy(x: torch.Tensor, perm: list[int]) -> torch.Tensor:
    """x.permute(perm).contiguous() as a new tensor; any dtype, any strides."""
    out = new_output([x.shape[p] for p in perm], x.dtype, x.device)
    if out.numel() == 0:
        return out
    src, src_perm = _storage_view(x, perm)
    dst = (
        torch.view_as_real(out).view(torch.int64) if x.element_size() == 16 else out.view(src.dtype)
    )
    plan = _C.permute_plan(list(src.shape), list(src.stride()), src_perm)
    batch = [(1, 0, 0)] * (MAX_BATCH_DIMS - len(plan["batch"])) + list(plan["batch"])
    sizes, strides_in, strides_out = zip(*batch, strict=True)

    def grid(meta):
        row_tiles = cdiv(plan["rows"], meta["BLOCK_R"])
        col_tiles = cdiv(plan["cols"], meta["BLOCK_C"])
        return (plan["batch_count"] * row_tiles * col_tiles,)

    _permute_copy_kernel[grid](
        src, dst,
        plan["rows"], plan["cols"], plan["row_in"], plan["col_in"], plan["row_out"],
        *sizes, *strides_in, *strides_out,
    )  # fmt: skip
    return out
