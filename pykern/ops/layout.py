"""Layout family: NCHW <-> NHWC transforms as custom ops with autograd.

One kernel carries the whole family: `pykern::permute_copy(x, perm)`, which returns
x.permute(perm).contiguous() as a new tensor, with any dtype and any input strides.
to_channels_last is permute_copy to (N, H, W, C) viewed back as (N, C, H, W); nchw_to_nhwc is
the same copy without the view. Backends: csrc/cpu/layout.cpp, csrc/cuda/layout.cu,
triton_kernels/layout.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pykern import backends
from pykern._ext import _C


def _permute_copy_triton(x: torch.Tensor, perm: list[int]) -> torch.Tensor:
    from pykern.triton_kernels import layout  # triton is imported only when used

    return layout.permute_copy(x, perm)


PERMUTE_COPY = {
    "cpu": lambda x, perm: _C.permute_copy_cpu(x, perm),
    "cuda": lambda x, perm: _C.permute_copy_cuda(x, perm),
    "triton": _permute_copy_triton,
}

# Permutations from channels-first order to channels-last order, by rank.
TO_CHANNELS_LAST = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
TO_CHANNELS_FIRST = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}
CHANNELS_LAST_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_channels_last(x: torch.Tensor) -> bool:
    """x (4D or 5D) is laid out (N, *spatial, C) in memory, and not also NCHW-contiguous (a
    tensor that is both, e.g. C == 1, is read as NCHW)."""
    fmt = CHANNELS_LAST_FORMAT.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """x.contiguous(), without its dispatcher round trip (about 2 us a call, on every op's hot
    path) when x already is contiguous."""
    return x if x.is_contiguous() else x.contiguous()


def permuted_shape(shape: Sequence[int], perm: Sequence[int]) -> list[int]:
    """The output shape of permute_copy: the one place it is computed."""
    return [shape[p] for p in perm]


def inverse_permutation(perm: Sequence[int]) -> list[int]:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return inverse


@torch.library.custom_op("pykern::permute_copy", mutates_args=())
def permute_copy(x: torch.Tensor, perm: list[int]) -> torch.Tensor:
    """x.permute(perm).contiguous() as a new tensor (never an alias of x)."""
    return backends.dispatch(PERMUTE_COPY, x.device, "permute_copy")(x, list(perm))


_permute_copy_call = backends.caller("permute_copy", PERMUTE_COPY)


@permute_copy.register_fake
def _permute_copy_fake(x: torch.Tensor, perm: list[int]) -> torch.Tensor:
    return x.new_empty(permuted_shape(x.shape, perm))


class PermuteCopyFunction(torch.autograd.Function):
    """Autograd for permute_copy: the gradient is the inverse permutation, copied."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
        backends.remember_backend(ctx)
        ctx.perm = tuple(perm)
        return _permute_copy_call(x, list(perm))

    @staticmethod
    @backends.keeps_forward_backend
    def backward(ctx, grad_out: torch.Tensor):
        # Through apply (not the raw op) so that double backward works too.
        return PermuteCopyFunction.apply(grad_out, tuple(inverse_permutation(ctx.perm))), None


def _permute_copy(x: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """permute_copy, through the autograd Function only when a gradient can flow (that layer
    costs tens of microseconds a call, which small tensors on a GPU would feel)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return PermuteCopyFunction.apply(x, perm)
    return _permute_copy_call(x, list(perm))


def permute_contiguous(x: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
    """x.permute(perm).contiguous(), differentiable; like torch, returns the view itself when
    it is contiguous already."""
    view = x.permute(*perm)
    if view.is_contiguous():
        return view
    return _permute_copy(x, tuple(perm))


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x.contiguous(memory_format=...) for 4D/5D x: channels-last or channels-first."""
    ndim = x.dim()
    fmt = CHANNELS_LAST_FORMAT[ndim] if channels_last else torch.contiguous_format
    if x.is_contiguous(memory_format=fmt):
        return x  # as torch does: no copy when x already has the format
    if x.numel() == 0:
        # Nothing to move; torch's allocation gives the strides it uses for empty tensors
        # (e.g. (0, 1, 0, 0) for channels_last with C=0), which a kernel's output would not.
        return x.contiguous(memory_format=fmt)
    if not channels_last:
        return _permute_copy(x, tuple(range(ndim)))
    nhwc = _permute_copy(x, TO_CHANNELS_LAST[ndim])
    return nhwc.permute(*TO_CHANNELS_FIRST[ndim])
