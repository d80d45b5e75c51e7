"""Convolution family: conv2d and conv_transpose2d as three custom ops with autograd.

Every convolution here is im2col + GEMM (or, in Triton, an implicit GEMM), through three ops
over (N, C, H, W) images and a (K, C / groups, R, S) weight, both in one memory format:

    pykern::conv2d_fwd(x, w, bias, ...)                  -> y  = conv(x, w) + bias[k]
    pykern::conv2d_bwd_input(grad_y, w, bias, in_size)   -> dx = col2im(W^T dY) + bias[c]
    pykern::conv2d_bwd_weight(grad_y, x, kernel_size)    -> dW = sum_n dY_n im2col(x_n)^T

conv_transpose2d is the adjoint of conv2d, so the same three ops serve it with roles swapped:
its forward is bwd_input (its bias fused), its input gradient is fwd, its weight gradient is
bwd_weight with its input and output gradient exchanged.

channels_last: x, grad_y and the image outputs are NHWC in memory and the weight (K, R, S, Cg);
else all are contiguous NCHW / KCRS. The format follows torch's rule (channels_last when the input
or the weight is), and so does the output's.

Backends: csrc/cpu/conv.cpp, csrc/cuda/conv.cu, triton_kernels/conv.py.
"""

from __future__ import annotations

import dataclasses

import torch

from pykern import backends
from pykern.ops.pooling import suggest_memory_format

CONV2D_FWD = backends.table("conv", "conv2d_fwd")
CONV2D_BWD_INPUT = backends.table("conv", "conv2d_bwd_input")
CONV2D_BWD_WEIGHT = backends.table("conv", "conv2d_bwd_weight")

_workspace_bytes = 256 << 20


def set_workspace_bytes(nbytes: int) -> None:
    """Bound on the im2col column buffer of one call of the CPU and CUDA kernels (default
    256 MiB): larger batches are processed in chunks of images whose columns fit (at least one
    image per chunk). Triton's implicit GEMM has no column buffer."""
    global _workspace_bytes
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
        raise ValueError(f"set_workspace_bytes: nbytes must be a positive int, got {nbytes!r}")
    _workspace_bytes = nbytes


def get_workspace_bytes() -> int:
    return _workspace_bytes


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _new_image(t: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=_format(channels_last))


@torch.library.custom_op("pykern::conv2d_fwd", mutates_args=())
def conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    channels_last: bool,
    workspace_bytes: int,
) -> torch.Tensor:
    """conv2d of x (N, C, H, W) with weight (K, C / groups, R, S), + bias[k]."""
    impl = backends.dispatch(CONV2D_FWD, x.device, "conv2d_fwd")
    return impl(x, weight, bias, stride, padding, dilation, groups, channels_last, workspace_bytes)


@conv2d_fwd.register_fake
def _conv2d_fwd_fake(x, weight, bias, stride, padding, dilation, groups, channels_last, ws):
    out_hw = [
        conv_out_size(*args)
        for args in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True)
    ]
    return _new_image(x, (x.shape[0], weight.shape[0], *out_hw), channels_last)


@torch.library.custom_op("pykern::conv2d_bwd_input", mutates_args=())
def conv2d_bwd_input(
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    channels_last: bool,
    workspace_bytes: int,
) -> torch.Tensor:
    """The adjoint of conv2d_fwd in x, (N, C, *in_size), + bias[c]."""
    impl = backends.dispatch(CONV2D_BWD_INPUT, grad_y.device, "conv2d_bwd_input")
    return impl(
        grad_y, weight, bias, in_size, stride, padding, dilation, groups, channels_last,
        workspace_bytes,
    )  # fmt: skip


@conv2d_bwd_input.register_fake
def _conv2d_bwd_input_fake(
    grad_y, weight, bias, in_size, stride, padding, dilation, groups, channels_last, ws
):
    shape = (grad_y.shape[0], weight.shape[1] * groups, *in_size)
    return _new_image(grad_y, shape, channels_last)


@torch.library.custom_op("pykern::conv2d_bwd_weight", mutates_args=())
def conv2d_bwd_weight(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    channels_last: bool,
    workspace_bytes: int,
) -> torch.Tensor:
    """The gradient of conv2d_fwd in the weight, (K, C / groups, *kernel_size)."""
    impl = backends.dispatch(CONV2D_BWD_WEIGHT, grad_y.device, "conv2d_bwd_weight")
    return impl(
        grad_y, x, kernel_size, stride, padding, dilation, groups, channels_last,
        workspace_bytes,
    )  # fmt: skip


@conv2d_bwd_weight.register_fake
def _conv2d_bwd_weight_fake(
    grad_y, x, kernel_size, stride, padding, dilation, groups, channels_last, ws
):
    shape = (grad_y.shape[1], x.shape[1] // groups, *kernel_size)
    return _new_image(grad_y, shape, channels_last)


_conv2d_fwd = backends.caller("conv2d_fwd", CONV2D_FWD)
_conv2d_bwd_input = backends.caller("conv2d_bwd_input", CONV2D_BWD_INPUT)
_conv2d_bwd_weight = backends.caller("conv2d_bwd_weight", CONV2D_BWD_WEIGHT)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A validated convolution's arguments, as the kernels take them (symmetric padding)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    channels_last: bool

    def args(self) -> tuple:
        """stride, padding, dilation, groups, channels_last, workspace_bytes."""
        return (
            list(self.stride), list(self.padding), list(self.dilation), self.groups,
            self.channels_last, _workspace_bytes,
        )  # fmt: skip

    def out_size(self, in_hw, kernel) -> list[int]:
        windows = zip(in_hw, kernel, self.stride, self.padding, self.dilation, strict=True)
        return [conv_out_size(*window) for window in windows]


class ConvFunction(torch.autograd.Function):
    """conv2d (transpose False) or conv_transpose2d (True). Each is the other's adjoint, so one's
    forward is the other's input gradient, and the weight gradient swaps its two images."""

    @staticmethod
    def forward(ctx, x, weight, bias, geo: Geometry, transpose: bool, out_hw: tuple[int, int]):
        backends.remember_backend(ctx)
        ctx.save_for_backward(x, weight)
        ctx.geo, ctx.transpose, ctx.has_bias = geo, transpose, bias is not None
        if x.shape[0] == 0:  # an empty batch: the kernels need at least one image
            channels = weight.shape[1] * geo.groups if transpose else weight.shape[0]
            return _new_image(x, (0, channels, *out_hw), geo.channels_last)
        if transpose:
            return _conv2d_bwd_input(x, weight, bias, list(out_hw), *geo.args())
        return _conv2d_fwd(x, weight, bias, *geo.args())

    @staticmethod
    @torch.autograd.function.once_differentiable
    @backends.keeps_forward_backend
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        geo, transpose = ctx.geo, ctx.transpose
        grad_y = grad_y.contiguous(memory_format=_format(geo.channels_last))
        dx = dw = db = None
        if x.shape[0] == 0:
            dx, dw = torch.zeros_like(x), torch.zeros_like(weight)
        else:
            if ctx.needs_input_grad[0] and transpose:
                dx = _conv2d_fwd(grad_y, weight, None, *geo.args())
            elif ctx.needs_input_grad[0]:
                dx = _conv2d_bwd_input(grad_y, weight, None, list(x.shape[2:]), *geo.args())
            if ctx.needs_input_grad[1]:
                images = (x, grad_y) if transpose else (grad_y, x)  # (the "dY", the "x")
                dw = _conv2d_bwd_weight(*images, list(weight.shape[2:]), *geo.args())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad_y.sum(dim=(0, 2, 3))
        return dx, dw, db, None, None, None


def channels_last_for(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's choice for a convolution: channels_last when the input or the weight is."""
    return torch.channels_last in (suggest_memory_format(x), suggest_memory_format(weight))


def _in_format(t: torch.Tensor | None, channels_last: bool) -> torch.Tensor | None:
    return None if t is None else t.contiguous(memory_format=_format(channels_last))


def conv2d(x, weight, bias, geo: Geometry) -> torch.Tensor:
    """Validated 4D conv2d (symmetric padding) in geo's memory format."""
    out_hw = tuple(geo.out_size(x.shape[2:], weight.shape[2:]))
    return _apply(x, weight, bias, geo, False, out_hw)


def conv_transpose2d(x, weight, bias, geo: Geometry, out_size) -> torch.Tensor:
    """Validated 4D conv_transpose2d: (N, weight.shape[1] * groups, *out_size)."""
    return _apply(x, weight, bias, geo, True, tuple(out_size))


def _apply(x, weight, bias, geo: Geometry, transpose: bool, out_hw) -> torch.Tensor:
    x, weight = _in_format(x, geo.channels_last), _in_format(weight, geo.channels_last)
    bias = None if bias is None else bias.contiguous()
    return ConvFunction.apply(x, weight, bias, geo, transpose, out_hw)
