"""Drop-in functional ops: torch's signatures and semantics, pykern's kernels.

Each function validates its arguments (errors name the argument) and calls pykern.ops.<family>.
"""

from __future__ import annotations

import torch

from pykern import backends
from pykern.ops import layout as _layout

__all__ = ["to_channels_last", "to_channels_first", "nchw_to_nhwc", "nhwc_to_nchw"]


def _check_tensor(op: str, input: object, ranks: tuple[int, ...], shape_names: str) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.layout != torch.strided:
        raise ValueError(f"{op}: input must be a dense (strided) tensor, got layout {input.layout}")
    if input.dim() not in ranks:
        raise ValueError(f"{op}: input must be {shape_names}, got a {input.dim()}D tensor")
    backends.check_device(input, op)


def to_channels_last(input: torch.Tensor) -> torch.Tensor:
    """Same values and strides as ``input.contiguous(memory_format=torch.channels_last)``.

    Args:
        input: (N, C, H, W), or (N, C, D, H, W) for ``torch.channels_last_3d``; any dtype and
            strides.

    Returns:
        A tensor of the same shape whose memory is laid out (N, H, W, C); ``input`` itself when
        it is laid out so already, as torch returns it.
    """
    _check_tensor("to_channels_last", input, (4, 5), "4D (N, C, H, W) or 5D (N, C, D, H, W)")
    return _layout.to_memory_format(input, channels_last=True)


def to_channels_first(input: torch.Tensor) -> torch.Tensor:
    """Same values and strides as ``input.contiguous()`` for a 4D or 5D tensor.

    Args:
        input: (N, C, H, W) or (N, C, D, H, W), typically channels_last; any dtype and strides.

    Returns:
        A contiguous (N, C, H, W) tensor; ``input`` itself when already contiguous.
    """
    _check_tensor("to_channels_first", input, (4, 5), "4D (N, C, H, W) or 5D (N, C, D, H, W)")
    return _layout.to_memory_format(input, channels_last=False)


def nchw_to_nhwc(input: torch.Tensor) -> torch.Tensor:
    """``input.permute(0, 2, 3, 1).contiguous()``: (N, C, H, W) -> (N, H, W, C) (5D too).

    Args:
        input: (N, C, H, W) or (N, C, D, H, W).

    Returns:
        A contiguous (N, H, W, C) or (N, D, H, W, C) tensor.
    """
    _check_tensor("nchw_to_nhwc", input, (4, 5), "4D (N, C, H, W) or 5D (N, C, D, H, W)")
    return _layout.permute_contiguous(input, _layout.TO_CHANNELS_LAST[input.dim()])


def nhwc_to_nchw(input: torch.Tensor) -> torch.Tensor:
    """``input.permute(0, 3, 1, 2).contiguous()``: (N, H, W, C) -> (N, C, H, W) (5D too).

    Args:
        input: (N, H, W, C) or (N, D, H, W, C).

    Returns:
        A contiguous (N, C, H, W) or (N, C, D, H, W) tensor.
    """
    _check_tensor("nhwc_to_nchw", input, (4, 5), "4D (N, H, W, C) or 5D (N, D, H, W, C)")
    return _layout.permute_contiguous(input, _layout.TO_CHANNELS_FIRST[input.dim()])
