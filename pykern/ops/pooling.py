"""Pooling family: global and channel pooling as custom ops with autograd.

Both are one reduction: the input seen as a strided (B, R, K) view, reduced over R into a
contiguous (B, K): `pykern::pool_reduce_fwd(x, is_max) -> (out, indices)` and
`pykern::pool_reduce_bwd(grad_out, indices, R, is_max) -> grad_x`. The views are chosen here so
that each layout is read natively, never transposed first:

    global (over H, W)   NCHW: (N*C, H*W, 1)      NHWC: (N, H*W, C)
    channel (over C)     NCHW: (N, C, H*W)        NHWC: (N*H*W, C, 1)

Backends: csrc/cpu/pooling.cpp, csrc/cuda/pooling.cu, triton_kernels/pooling.py.
"""

from __future__ import annotations

import torch

from pykern import backends
from pykern._ext import _C


def _triton_fwd(x, is_max):
    from pykern.triton_kernels import pooling

    return pooling.pool_reduce_fwd(x, is_max)


def _triton_bwd(grad_out, indices, R, is_max):
    from pykern.triton_kernels import pooling

    return pooling.pool_reduce_bwd(grad_out, indices, R, is_max)


POOL_REDUCE_FWD = {
    "cpu": lambda x, is_max: _C.pool_reduce_fwd_cpu(x, is_max),
    "cuda": lambda x, is_max: _C.pool_reduce_fwd_cuda(x, is_max),
    "triton": _triton_fwd,
}
POOL_REDUCE_BWD = {
    "cpu": lambda g, i, R, is_max: _C.pool_reduce_bwd_cpu(g, i, R, is_max),
    "cuda": lambda g, i, R, is_max: _C.pool_reduce_bwd_cuda(g, i, R, is_max),
    "triton": _triton_bwd,
}


@torch.library.custom_op("pykern::pool_reduce_fwd", mutates_args=())
def pool_reduce_fwd(x: torch.Tensor, is_max: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (or max, with the index of the max in R) of the (B, R, K) view x over R."""
    return backends.dispatch(POOL_REDUCE_FWD, x.device, "pool_reduce_fwd")(x, is_max)


@pool_reduce_fwd.register_fake
def _pool_reduce_fwd_fake(x, is_max):
    B, _, K = x.shape
    return x.new_empty((B, K)), x.new_empty((B if is_max else 0, K), dtype=torch.int64)


@torch.library.custom_op("pykern::pool_reduce_bwd", mutates_args=())
def pool_reduce_bwd(
    grad_out: torch.Tensor, indices: torch.Tensor, R: int, is_max: bool
) -> torch.Tensor:
    """grad_out (B, K) spread back over R: divided by R, or to the max's index."""
    impl = backends.dispatch(POOL_REDUCE_BWD, grad_out.device, "pool_reduce_bwd")
    return impl(grad_out, indices, R, is_max)


@pool_reduce_bwd.register_fake
def _pool_reduce_bwd_fake(grad_out, indices, R, is_max):
    B, K = grad_out.shape
    return grad_out.new_empty((B, R, K))


class PoolReduceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, is_max: bool) -> torch.Tensor:
        out, indices = torch.ops.pykern.pool_reduce_fwd(x, is_max)
        ctx.save_for_backward(indices)
        ctx.R, ctx.is_max = x.shape[1], is_max
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (indices,) = ctx.saved_tensors
        return torch.ops.pykern.pool_reduce_bwd(grad_out, indices, ctx.R, ctx.is_max), None


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def global_pool(x: torch.Tensor, is_max: bool) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 1, 1), in x's memory format."""
    N, C, H, W = x.shape
    if _channels_last(x):
        out = PoolReduceFunction.apply(x.permute(0, 2, 3, 1).reshape(N, H * W, C), is_max)
        return out.view(N, 1, 1, C).permute(0, 3, 1, 2)
    # NCHW; other strides are made contiguous first (the one copy in this family)
    x = x.contiguous()
    return PoolReduceFunction.apply(x.view(N * C, H * W, 1), is_max).view(N, C, 1, 1)


def channel_pool(x: torch.Tensor, is_max: bool) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W). With one channel both memory formats are the same bytes;
    the strides are the contiguous ones, as torch's x.mean(1, keepdim=True) gives."""
    N, C, H, W = x.shape
    if _channels_last(x):
        out = PoolReduceFunction.apply(x.permute(0, 2, 3, 1).reshape(N * H * W, C, 1), is_max)
        return out.view(N, 1, H, W)
    x = x.contiguous()
    return PoolReduceFunction.apply(x.view(N, C, H * W), is_max).view(N, 1, H, W)
