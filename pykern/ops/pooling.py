"""Pooling family: global and channel pooling as custom ops with autograd.

Both are one reduction: the input seen as a strided (B, R, K) view, reduced over R into a
contiguous (B, K): `pykern::pool_reduce_fwd(x, is_max, with_indices) -> (out, indices)` and
`pykern::pool_reduce_bwd(grad_out, indices, R, is_max) -> grad_x`. The views are chosen here so
that each layout is read natively, never transposed first:

    global (over H, W)   NCHW: (N*C, H*W, 1)      NHWC: (N, H*W, C)
    channel (over C)     NCHW: (N, C, H*W)        NHWC: (N*H*W, C, 1)

Backends: csrc/cpu/pooling.cpp, csrc/cuda/pooling.cu, triton_kernels/pooling.py.
"""

from __future__ import annotations

import dataclasses

import torch

from pykern import backends
from pykern.ops.layout import contiguous, is_channels_last

POOL_REDUCE_FWD = backends.table("pooling", "pool_reduce_fwd")
POOL_REDUCE_BWD = backends.table("pooling", "pool_reduce_bwd")


@torch.library.custom_op("pykern::pool_reduce_fwd", mutates_args=())
def pool_reduce_fwd(
    x: torch.Tensor, is_max: bool, with_indices: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (or max, with the index of the max in R) of the (B, R, K) view x over R. Without
    with_indices the indices come back empty, (0, K): the CPU then skips finding them."""
    impl = backends.dispatch(POOL_REDUCE_FWD, x.device, "pool_reduce_fwd")
    return impl(x, is_max, with_indices)


@pool_reduce_fwd.register_fake
def _pool_reduce_fwd_fake(x, is_max, with_indices):
    B, _, K = x.shape
    rows = B if is_max and with_indices else 0
    return x.new_empty((B, K)), x.new_empty((rows, K), dtype=torch.int64)


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


_pool_reduce_fwd = backends.caller("pool_reduce_fwd", POOL_REDUCE_FWD)
_pool_reduce_bwd = backends.caller("pool_reduce_bwd", POOL_REDUCE_BWD)


class PoolReduceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, is_max: bool) -> torch.Tensor:
        backends.remember_backend(ctx)
        out, indices = _pool_reduce_fwd(x, is_max, True)
        ctx.save_for_backward(indices)
        ctx.R, ctx.is_max = x.shape[1], is_max
        return out

    @staticmethod
    @backends.keeps_forward_backend
    def backward(ctx, grad_out: torch.Tensor):
        (indices,) = ctx.saved_tensors
        return _pool_reduce_bwd(grad_out, indices, ctx.R, ctx.is_max), None


def _reduce(x: torch.Tensor, is_max: bool) -> torch.Tensor:
    """The (B, R, K) view x reduced over R; through autograd only when a gradient is wanted
    (Function.apply costs more than the kernel on small inputs)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return PoolReduceFunction.apply(x, is_max)
    return _pool_reduce_fwd(x, is_max, False)[0]


def global_pool(x: torch.Tensor, is_max: bool) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 1, 1), in x's memory format."""
    N, C, H, W = x.shape
    if is_channels_last(x):
        out = _reduce(x.permute(0, 2, 3, 1).reshape(N, H * W, C), is_max)
        return out.view(N, 1, 1, C).permute(0, 3, 1, 2)
    # NCHW; other strides are made contiguous first (the one copy in this family)
    return _reduce(contiguous(x).view(N * C, H * W, 1), is_max).view(N, C, 1, 1)


def channel_pool(x: torch.Tensor, is_max: bool) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W). With one channel both memory formats are the same bytes;
    the strides are the contiguous ones, as torch's x.mean(1, keepdim=True) gives."""
    N, C, H, W = x.shape
    if is_channels_last(x):
        return _reduce(x.permute(0, 2, 3, 1).reshape(N * H * W, C, 1), is_max).view(N, 1, H, W)
    return _reduce(contiguous(x).view(N, C, H * W), is_max).view(N, 1, H, W)


# Windowed pooling: max_pool2d, avg_pool2d and their adaptive forms.
#
# Two custom op pairs carry all four ops: pykern::max_pool2d_fwd/bwd and
# pykern::avg_pool2d_fwd/bwd, with `adaptive` choosing the window rule of
# csrc/common/pool_window.h. Output sizes are computed here only (pool2d_out_size,
# adaptive sizes are given); every backend reads them. Each kernel runs natively in the layout
# it is handed, `channels_last` or NCHW-contiguous, and returns its outputs in that layout.


MAX_POOL2D_FWD = backends.table("pooling", "max_pool2d_fwd")
MAX_POOL2D_BWD = backends.table("pooling", "max_pool2d_bwd")
AVG_POOL2D_FWD = backends.table("pooling", "avg_pool2d_fwd")
AVG_POOL2D_BWD = backends.table("pooling", "avg_pool2d_bwd")


def pool2d_out_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> int:
    """Output length of one axis of max_pool2d/avg_pool2d, as torch computes it: with
    ceil_mode, a last window that would start past the input and its left padding is dropped."""
    span = dilation * (kernel - 1) + 1
    out = (size + 2 * padding - span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """torch's Tensor.suggest_memory_format() for a 4D tensor: channels_last when the strides
    order the dims N, H, W, C (size-1 dims resolved as torch resolves them), else contiguous.
    Pooling outputs take this format, as torch's do."""
    # The common, unambiguous cases from two C++ flags. The flags ignore the strides of size-1
    # dims, which this rule reads (a lone image's N stride decides, as in x[0] of a batch).
    nchw, nhwc = x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)
    if nchw and not nhwc:
        return torch.contiguous_format
    if nhwc and not nchw and 1 not in x.shape:
        return torch.channels_last
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return torch.contiguous_format
        smallest = strides[d] * max(sizes[d], 1)
    return torch.channels_last


def _new_pooled(x: torch.Tensor, out_size, channels_last: bool, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = (x.shape[0], x.shape[1], *out_size)
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("pykern::max_pool2d_fwd", mutates_args=())
def max_pool2d_fwd(
    x: torch.Tensor,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    out_size: list[int],
    adaptive: bool,
    channels_last: bool,
    with_indices: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max over each window, int64 index h * W + w of the max in its plane; without
    with_indices an empty tensor, and no index is computed)."""
    impl = backends.dispatch(MAX_POOL2D_FWD, x.device, "max_pool2d_fwd")
    return impl(
        x, kernel, stride, padding, dilation, out_size, adaptive, channels_last, with_indices
    )


@max_pool2d_fwd.register_fake
def _max_pool2d_fwd_fake(
    x, kernel, stride, padding, dilation, out_size, adaptive, channels_last, with_indices
):
    out = _new_pooled(x, out_size, channels_last)
    if not with_indices:
        return out, x.new_empty((0,), dtype=torch.int64)
    return out, _new_pooled(x, out_size, channels_last, torch.int64)


@torch.library.custom_op("pykern::max_pool2d_bwd", mutates_args=())
def max_pool2d_bwd(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    in_size: list[int],
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    adaptive: bool,
    channels_last: bool,
) -> torch.Tensor:
    """grad_out routed to the saved indices; gathered per input element (deterministic)."""
    impl = backends.dispatch(MAX_POOL2D_BWD, grad_out.device, "max_pool2d_bwd")
    return impl(
        grad_out, indices, in_size, kernel, stride, padding, dilation, adaptive, channels_last
    )


@max_pool2d_bwd.register_fake
def _max_pool2d_bwd_fake(
    grad_out, indices, in_size, kernel, stride, padding, dilation, adaptive, channels_last
):
    return _new_pooled(grad_out, in_size, channels_last)


@torch.library.custom_op("pykern::avg_pool2d_fwd", mutates_args=())
def avg_pool2d_fwd(
    x: torch.Tensor,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    out_size: list[int],
    adaptive: bool,
    count_include_pad: bool,
    divisor_override: int,
    channels_last: bool,
) -> torch.Tensor:
    """Mean of each window (divisor_override 0: none)."""
    impl = backends.dispatch(AVG_POOL2D_FWD, x.device, "avg_pool2d_fwd")
    return impl(
        x, kernel, stride, padding, out_size, adaptive, count_include_pad, divisor_override,
        channels_last,
    )  # fmt: skip


@avg_pool2d_fwd.register_fake
def _avg_pool2d_fwd_fake(
    x, kernel, stride, padding, out_size, adaptive, count_include_pad, divisor_override,
    channels_last,
):  # fmt: skip
    return _new_pooled(x, out_size, channels_last)


@torch.library.custom_op("pykern::avg_pool2d_bwd", mutates_args=())
def avg_pool2d_bwd(
    grad_out: torch.Tensor,
    in_size: list[int],
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    adaptive: bool,
    count_include_pad: bool,
    divisor_override: int,
    channels_last: bool,
) -> torch.Tensor:
    """grad_out spread evenly over each window; gathered per input element (deterministic)."""
    impl = backends.dispatch(AVG_POOL2D_BWD, grad_out.device, "avg_pool2d_bwd")
    return impl(
        grad_out, in_size, kernel, stride, padding, adaptive, count_include_pad,
        divisor_override, channels_last,
    )  # fmt: skip


@avg_pool2d_bwd.register_fake
def _avg_pool2d_bwd_fake(
    grad_out, in_size, kernel, stride, padding, adaptive, count_include_pad, divisor_override,
    channels_last,
):  # fmt: skip
    return _new_pooled(grad_out, in_size, channels_last)


_max_pool2d_fwd = backends.caller("max_pool2d_fwd", MAX_POOL2D_FWD)
_max_pool2d_bwd = backends.caller("max_pool2d_bwd", MAX_POOL2D_BWD)
_avg_pool2d_fwd = backends.caller("avg_pool2d_fwd", AVG_POOL2D_FWD)
_avg_pool2d_bwd = backends.caller("avg_pool2d_bwd", AVG_POOL2D_BWD)


@dataclasses.dataclass(frozen=True)
class Window:
    """Everything but the tensors that a windowed pooling kernel reads: (H, W) pairs."""

    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    out_size: tuple[int, int] = (1, 1)
    adaptive: bool = False

    def args(self) -> tuple[list[int], list[int], list[int]]:
        return list(self.kernel), list(self.stride), list(self.padding)


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t in the layout the kernels were given (a copy only for a gradient that arrives in
    another layout, e.g. from an expand)."""
    return t.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


class MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, win: Window, channels_last: bool):
        backends.remember_backend(ctx)
        kernel, stride, padding = win.args()
        out, indices = _max_pool2d_fwd(
            x, kernel, stride, padding, list(win.dilation), list(win.out_size), win.adaptive,
            channels_last, True,
        )  # fmt: skip
        ctx.save_for_backward(indices)
        ctx.mark_non_differentiable(indices)
        ctx.win, ctx.channels_last, ctx.in_size = win, channels_last, list(x.shape[2:])
        return out, indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    @backends.keeps_forward_backend
    def backward(ctx, grad_out: torch.Tensor, _grad_indices):
        (indices,) = ctx.saved_tensors
        win = ctx.win
        kernel, stride, padding = win.args()
        grad_in = _max_pool2d_bwd(
            _in_layout(grad_out, ctx.channels_last), indices, ctx.in_size, kernel, stride,
            padding, list(win.dilation), win.adaptive, ctx.channels_last,
        )  # fmt: skip
        return grad_in, None, None


class AvgPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, win: Window, count_include_pad, divisor_override, channels_last):
        backends.remember_backend(ctx)
        kernel, stride, padding = win.args()
        ctx.args = (win, count_include_pad, divisor_override, channels_last, list(x.shape[2:]))
        return _avg_pool2d_fwd(
            x, kernel, stride, padding, list(win.out_size), win.adaptive, count_include_pad,
            divisor_override, channels_last,
        )  # fmt: skip

    @staticmethod
    @torch.autograd.function.once_differentiable
    @backends.keeps_forward_backend
    def backward(ctx, grad_out: torch.Tensor):
        win, count_include_pad, divisor_override, channels_last, in_size = ctx.args
        kernel, stride, padding = win.args()
        grad_in = _avg_pool2d_bwd(
            _in_layout(grad_out, channels_last), in_size, kernel, stride, padding, win.adaptive,
            count_include_pad, divisor_override, channels_last,
        )  # fmt: skip
        return grad_in, None, None, None, None


def _layout_of(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x in the memory format torch's pooling would output (a copy only when x is neither
    NCHW- nor channels_last-contiguous), and whether that format is channels_last."""
    channels_last = suggest_memory_format(x) == torch.channels_last
    return _in_layout(x, channels_last), channels_last


def max_pool2d(
    x: torch.Tensor, win: Window, with_indices: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, C, H, W) -> (values, indices), both (N, C, *win.out_size) in torch's format;
    indices None unless asked for (the gradient computes them regardless)."""
    x, channels_last = _layout_of(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return MaxPool2dFunction.apply(x, win, channels_last)
    kernel, stride, padding = win.args()
    out, indices = _max_pool2d_fwd(
        x, kernel, stride, padding, list(win.dilation), list(win.out_size), win.adaptive,
        channels_last, with_indices,
    )  # fmt: skip
    return out, indices if with_indices else None


def avg_pool2d(
    x: torch.Tensor, win: Window, count_include_pad: bool = True, divisor_override: int = 0
) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, *win.out_size) in torch's format."""
    x, channels_last = _layout_of(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return AvgPool2dFunction.apply(x, win, count_include_pad, divisor_override, channels_last)
    kernel, stride, padding = win.args()
    return _avg_pool2d_fwd(
        x, kernel, stride, padding, list(win.out_size), win.adaptive, count_include_pad,
        divisor_override, channels_last,
    )  # fmt: skip
