"""Drop-in functional ops: torch's signatures and semantics, pykern's kernels.

Each function validates its arguments (errors name the argument) and calls pykern.ops.<family>.
"""

from __future__ import annotations

import torch

from pykern import backends
from pykern.ops import layout as _layout
from pykern.ops import pooling as _pooling

__all__ = [
    "to_channels_last",
    "to_channels_first",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "global_avg_pool2d",
    "global_max_pool2d",
    "channel_pool",
]


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


def _check_pool_input(op: str, input: object, reduced: str) -> bool:
    """Validates a pooling input; returns True when it is unbatched (C, H, W)."""
    _check_tensor(op, input, (3, 4), "3D (C, H, W) or 4D (N, C, H, W)")
    if not input.dtype.is_floating_point:
        raise TypeError(f"{op}: input must be a floating-point tensor, got {input.dtype}")
    sizes = dict(zip("CHW", input.shape[-3:], strict=True))
    if any(sizes[d] == 0 for d in reduced):
        raise ValueError(
            f"{op}: input must have non-zero {', '.join(reduced)} to pool over, got shape "
            f"{tuple(input.shape)}"
        )
    return input.dim() == 3


def _batched(fn, input: torch.Tensor, unbatched: bool) -> torch.Tensor:
    return fn(input.unsqueeze(0)).squeeze(0) if unbatched else fn(input)


def global_avg_pool2d(input: torch.Tensor) -> torch.Tensor:
    """Mean over H and W in one pass: ``F.adaptive_avg_pool2d(input, 1)``.

    Args:
        input: (N, C, H, W) or (C, H, W), floating point, NCHW or channels_last.

    Returns:
        (N, C, 1, 1) (or (C, 1, 1)) in the input's memory format.
    """
    unbatched = _check_pool_input("global_avg_pool2d", input, "HW")
    return _batched(lambda x: _pooling.global_pool(x, is_max=False), input, unbatched)


def global_max_pool2d(input: torch.Tensor) -> torch.Tensor:
    """Max over H and W in one pass: ``F.adaptive_max_pool2d(input, 1)`` (NaN propagates).

    Args:
        input: (N, C, H, W) or (C, H, W), floating point, NCHW or channels_last.

    Returns:
        (N, C, 1, 1) (or (C, 1, 1)) in the input's memory format.
    """
    unbatched = _check_pool_input("global_max_pool2d", input, "HW")
    return _batched(lambda x: _pooling.global_pool(x, is_max=True), input, unbatched)


def channel_pool(input: torch.Tensor, mode: str = "avg") -> torch.Tensor:
    """Pools over channels ("global depth pooling"): ``input.mean(1, keepdim=True)`` for
    mode "avg", ``input.max(1, keepdim=True).values`` for "max" (its gradient goes to the
    first maximum, as max's does; amax would split it among ties).

    Args:
        input: (N, C, H, W) or (C, H, W), floating point, NCHW or channels_last.
        mode: "avg" or "max".

    Returns:
        (N, 1, H, W) (or (1, H, W)) in the input's memory format.
    """
    if mode not in ("avg", "max"):
        raise ValueError(f"channel_pool: mode must be 'avg' or 'max', got {mode!r}")
    unbatched = _check_pool_input("channel_pool", input, "C")
    return _batched(lambda x: _pooling.channel_pool(x, is_max=mode == "max"), input, unbatched)
