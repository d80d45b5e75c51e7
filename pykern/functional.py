"""Drop-in functional ops: torch's signatures and semantics, pykern's kernels.

Each function validates its arguments (errors name the argument) and calls pykern.ops.<family>.
"""

from __future__ import annotations

import functools
import math

import torch

from pykern import _autocast, backends
from pykern.ops import attention as _attention
from pykern.ops import conv as _conv
from pykern.ops import layout as _layout
from pykern.ops import norm as _norm
from pykern.ops import pooling as _pooling

__all__ = [
    "to_channels_last",
    "to_channels_first",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "global_avg_pool2d",
    "global_max_pool2d",
    "channel_pool",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "batch_norm",
    "batch_norm_relu",
    "batch_norm_add_relu",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "layer_norm_2d",
    "conv2d",
    "conv_transpose2d",
    "scaled_dot_product_attention",
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
    if 0 in (input.shape[-2:] if reduced == "HW" else input.shape[-3:-2]):
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


def _pair(op: str, name: str, value, allow_none: bool = False) -> tuple:
    """An int or a sequence of one or two ints as an (H, W) pair, as torch takes them."""
    if isinstance(value, (list, tuple)) and len(value) in (1, 2):
        pair = tuple(value) * (3 - len(value))
    else:
        pair = (value, value)
    ok = all(
        (v is None and allow_none) or (isinstance(v, int) and not isinstance(v, bool)) for v in pair
    )
    if not ok:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def _check_window_input(op: str, input: object, integers: tuple[torch.dtype, ...]) -> bool:
    """Validates a windowed pooling input: 3D or 4D, non-empty (C, H, W); floating point or
    one of the integer dtypes torch's op takes. Returns True when it is unbatched (C, H, W)."""
    _check_tensor(op, input, (3, 4), "3D (C, H, W) or 4D (N, C, H, W)")
    if not (input.dtype.is_floating_point or input.dtype in integers):
        kinds = "floating-point" + (" or integer" if integers else "")
        raise TypeError(f"{op}: input must be a {kinds} tensor, got {input.dtype}")
    if 0 in input.shape[-3:]:
        raise ValueError(
            f"{op}: input must have non-zero C, H and W (only the batch may be empty), got "
            f"shape {tuple(input.shape)}"
        )
    return input.dim() == 3


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _strided_window(op, input, kernel_size, stride, padding, dilation, ceil_mode):
    """The validated window of max_pool2d / avg_pool2d for input. Eager calls reuse the result
    for the same arguments (validating them costs more than a small pooling kernel); under
    torch.compile it is computed as it is traced."""
    args = (op, tuple(input.shape[-2:]), _hashable(kernel_size), _hashable(stride))
    return _cached(_window_of, *args, _hashable(padding), _hashable(dilation), ceil_mode)


def _cached(window_of, *args):
    """window_of(*args), an lru_cache'd validation, from its cache in eager calls whose
    arguments are all _exact; computed afresh under torch.compile (as it is traced) and for
    any other argument (which it refuses, naming it, or takes as torch does)."""
    if not torch.compiler.is_compiling() and all(map(_exact, args)):
        return window_of(*args)
    return window_of.__wrapped__(*args)


def _exact(value) -> bool:
    """True for an argument whose cache entry no value of another type can hit: a str, bool,
    int or None (the caches are typed), or a tuple of ints and Nones (3.0 and True hash as 3
    and 1 do: they must reach the validation, which refuses them)."""
    kind = type(value)
    if kind is tuple:
        return all(v is None or type(v) is int for v in value)
    return kind is int or kind is bool or kind is str or value is None


def _hashable(value):
    return tuple(value) if type(value) is list else value


@functools.lru_cache(maxsize=256, typed=True)
def _window_of(op, in_hw, kernel_size, stride, padding, dilation, ceil_mode) -> _pooling.Window:
    """The window of max_pool2d / avg_pool2d over an (H, W) input, validated."""
    kernel = _pair(op, "kernel_size", kernel_size)
    no_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)
    stride = kernel if no_stride else _pair(op, "stride", stride)
    padding = _pair(op, "padding", padding)
    dilation = _pair(op, "dilation", dilation)
    for name, pair in (("kernel_size", kernel), ("stride", stride), ("dilation", dilation)):
        if min(pair) <= 0:
            raise ValueError(f"{op}: {name} must be greater than zero, got {pair}")
    if min(padding) < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {padding}")
    for p, k in zip(padding, kernel, strict=True):
        if p > k // 2:  # torch's rule, the dilation left out (max_pool2d's too)
            raise ValueError(
                f"{op}: padding ({p}) must be at most half of the kernel_size ({k}), "
                f"got padding={padding}, kernel_size={kernel}"
            )
    out = tuple(
        _pooling.pool2d_out_size(*args, ceil_mode)
        for args in zip(in_hw, kernel, stride, padding, dilation, strict=True)
    )
    if min(out) <= 0:
        raise ValueError(
            f"{op}: the output would be empty: input (H, W) = {in_hw} with kernel_size={kernel}, "
            f"stride={stride}, padding={padding}, dilation={dilation} gives {out}"
        )
    return _pooling.Window(kernel, stride, padding, dilation, out)


def _max_pool(input: torch.Tensor, win, unbatched: bool, return_indices: bool):
    """max_pool2d and adaptive_max_pool2d after validation: values, or (values, indices)."""
    x = input.unsqueeze(0) if unbatched else input
    out, indices = _pooling.max_pool2d(x, win, bool(return_indices))
    if not return_indices:
        return out.squeeze(0) if unbatched else out
    return (out.squeeze(0), indices.squeeze(0)) if unbatched else (out, indices)


def max_pool2d(
    input: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
):
    """``F.max_pool2d``: the max of each (dilated) window, NaN propagating.

    Args:
        input: (N, C, H, W) or (C, H, W); floating point or integer; NCHW or channels_last.
        kernel_size, stride (default kernel_size), padding, dilation: an int or an (H, W) pair.
            Padding is implicit -inf and at most half the kernel (dilation aside), as in torch.
        ceil_mode: round the output size up (a last window may hang over the padding).
        return_indices: also return the int64 index h * W + w of each max in its plane.

    Returns:
        (N, C, H_out, W_out) in the input's memory format; with return_indices, (out, indices).
    """
    unbatched = _check_window_input("max_pool2d", input, _INTEGER_DTYPES)
    win = _strided_window("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)
    return _max_pool(input, win, unbatched, return_indices)


def avg_pool2d(
    input: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> torch.Tensor:
    """``F.avg_pool2d``: the mean of each window.

    Args:
        input: (N, C, H, W) or (C, H, W); floating point or int64; NCHW or channels_last.
        kernel_size, stride (default kernel_size), padding: an int or an (H, W) pair; padding
            is implicit zeros and at most half the kernel.
        ceil_mode: round the output size up.
        count_include_pad: count the padding in the divisor.
        divisor_override: divide every sum by this instead (non-zero).

    Returns:
        (N, C, H_out, W_out) in the input's memory format.
    """
    unbatched = _check_window_input("avg_pool2d", input, (torch.int64,))
    if divisor_override is not None and (
        not isinstance(divisor_override, int) or isinstance(divisor_override, bool)
    ):
        raise TypeError(f"avg_pool2d: divisor_override must be an int, got {divisor_override!r}")
    if divisor_override == 0:
        raise ValueError("avg_pool2d: divisor_override must be non-zero, got 0")
    win = _strided_window("avg_pool2d", input, kernel_size, stride, padding, 1, ceil_mode)
    return _batched(
        lambda x: _pooling.avg_pool2d(x, win, bool(count_include_pad), divisor_override or 0),
        input,
        unbatched,
    )


def _adaptive_window(op: str, input: torch.Tensor, output_size) -> _pooling.Window:
    return _cached(_adaptive_window_of, op, tuple(input.shape[-2:]), _hashable(output_size))


@functools.lru_cache(maxsize=256, typed=True)
def _adaptive_window_of(op: str, in_hw: tuple[int, int], output_size) -> _pooling.Window:
    """The window of adaptive_avg_pool2d / adaptive_max_pool2d over an (H, W) input, validated."""
    out = _pair(op, "output_size", output_size, allow_none=True)
    out = tuple(s if o is None else o for o, s in zip(out, in_hw, strict=True))
    if min(out) < 0:
        raise ValueError(f"{op}: output_size must be >= 0, got {output_size!r}")
    return _pooling.Window(out_size=out, adaptive=True)


def adaptive_avg_pool2d(input: torch.Tensor, output_size) -> torch.Tensor:
    """``F.adaptive_avg_pool2d``: output (i, j) averages rows [floor(i H / H_out),
    ceil((i + 1) H / H_out)) and the same columns of W.

    Args:
        input: (N, C, H, W) or (C, H, W), floating point, NCHW or channels_last.
        output_size: an int or an (H_out, W_out) pair; None keeps that input size.

    Returns:
        (N, C, H_out, W_out) in the input's memory format.
    """
    unbatched = _check_window_input("adaptive_avg_pool2d", input, ())
    win = _adaptive_window("adaptive_avg_pool2d", input, output_size)
    return _batched(lambda x: _pooling.avg_pool2d(x, win), input, unbatched)


def adaptive_max_pool2d(input: torch.Tensor, output_size, return_indices: bool = False):
    """``F.adaptive_max_pool2d``: the max over adaptive_avg_pool2d's windows.

    Args:
        input: (N, C, H, W) or (C, H, W), floating point, NCHW or channels_last.
        output_size: an int or an (H_out, W_out) pair; None keeps that input size.
        return_indices: also return the int64 index h * W + w of each max in its plane.

    Returns:
        (N, C, H_out, W_out) in the input's memory format; with return_indices, (out, indices).
    """
    unbatched = _check_window_input("adaptive_max_pool2d", input, ())
    win = _adaptive_window("adaptive_max_pool2d", input, output_size)
    return _max_pool(input, win, unbatched, return_indices)


# Normalization


_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_norm_input(op: str, input: object, min_dim: int, shape_names: str) -> None:
    _check_tensor(op, input, range(min_dim, 64), shape_names)
    if input.dtype not in _NORM_DTYPES:
        raise TypeError(
            f"{op}: input must be float16, bfloat16, float32 or float64, got {input.dtype}"
        )


def _check_companion(op: str, name: str, t: object, input: torch.Tensor, shape) -> None:
    """A tensor that goes with input (weight, bias, running stats): None, or of `shape` on
    input's device, in input's dtype (or float32 for a float16/bfloat16 input, as torch's
    mixed-precision normalization takes it)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != input.device:
        raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
    if t.dtype != input.dtype and not (t.dtype == torch.float32 and input.dtype in _LOW_PRECISION):
        allowed = (input.dtype, torch.float32) if input.dtype in _LOW_PRECISION else (input.dtype,)
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype {names} (input's), got {t.dtype}")
    if t.shape != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_same_as_input(op: str, name: str, t: object, input: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != input.shape or t.dtype != input.dtype or t.device != input.device:
        raise ValueError(
            f"{op}: {name} must match input's shape, dtype and device "
            f"({tuple(input.shape)}, {input.dtype}, {input.device}), got "
            f"({tuple(t.shape)}, {t.dtype}, {t.device})"
        )


def _check_batch_norm(
    op, input, residual, running_mean, running_var, weight, bias, training, momentum
) -> None:
    """Everything batch_norm refuses, checked before any state changes."""
    _check_norm_input(op, input, 2, "(N, C) or (N, C, *spatial), at least 2D")
    C = input.shape[1]
    if residual is not None:
        _check_same_as_input(op, "residual", residual, input)
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_companion(op, name, t, input, (C,))
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given when not training")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{op}: momentum must be a float, got {momentum!r}")
    if training and input.numel() // max(C, 1) == 1:  # torch's rule: an empty batch runs
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, got input of size "
            f"{tuple(input.shape)}"
        )


def _run_batch_norm(
    input, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu,
    group=None,
):  # fmt: skip
    if input.numel() == 0:
        return _norm.empty_batch_norm(
            input, residual, running_mean, running_var, weight, bias, bool(training),
            float(momentum), relu, group,
        )  # fmt: skip
    return _norm.batch_norm(
        input, running_mean, running_var, weight, bias, residual, bool(training),
        float(momentum), float(eps), relu, _layout.is_channels_last(input), group,
    )  # fmt: skip


def _batch_norm(
    op, input, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu
):
    """The three functional BatchNorms: validated (before any state changes), then run."""
    _check_batch_norm(
        op, input, residual, running_mean, running_var, weight, bias, training, momentum
    )
    return _run_batch_norm(
        input, residual, running_mean, running_var, weight, bias, training, momentum, eps, relu
    )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm``: each channel normalized over the batch and spatial dims.

    Args:
        input: (N, C) or (N, C, *spatial), floating point; NCHW or channels_last, each read
            natively.
        running_mean, running_var: (C,) running statistics; updated in place when training
            (the variance unbiased), used instead of the batch's when not. May be None when
            training.
        weight, bias: optional (C,) affine parameters.
        training: normalize with the batch statistics (computed stably, in float32 or float64).
        momentum: weight of the batch statistics in the running update.
        eps: added to the variance.

    Returns:
        A tensor like input, in its memory format.
    """
    return _batch_norm(
        "batch_norm", input, None, running_mean, running_var, weight, bias, training, momentum,
        eps, relu=False,
    )  # fmt: skip


def batch_norm_relu(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.relu(F.batch_norm(...))`` fused: one elementwise pass forward and one backward, the
    BatchNorm output never written. Arguments as batch_norm."""
    return _batch_norm(
        "batch_norm_relu", input, None, running_mean, running_var, weight, bias, training,
        momentum, eps, relu=True,
    )  # fmt: skip


def batch_norm_add_relu(
    input: torch.Tensor,
    residual: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.relu(F.batch_norm(input, ...) + residual)`` fused (the tail of a ResNet block), with
    the gradients of input, residual, weight and bias. residual: input's shape, dtype and
    device; other arguments as batch_norm."""
    return _batch_norm(
        "batch_norm_add_relu", input, residual, running_mean, running_var, weight, bias,
        training, momentum, eps, relu=True,
    )  # fmt: skip


def _normalized_shape(op: str, input: torch.Tensor, normalized_shape) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    try:
        shape = tuple(shape)
    except TypeError:
        shape = None
    if shape is None or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise TypeError(
            f"{op}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        )
    if len(shape) == 0 or len(shape) > input.dim() or tuple(input.shape[-len(shape) :]) != shape:
        raise ValueError(
            f"{op}: normalized_shape {list(shape)} must match the trailing dimensions of input, "
            f"got input of shape {tuple(input.shape)}"
        )
    return shape


def _row_norm(op, input, residual, normalized_shape, weight, bias, eps, rms):
    """layer_norm, rms_norm and their add_ forms: (y, input + residual or None)."""
    in_dtype = getattr(input, "dtype", None)
    policy = "rms_norm" if rms else "layer_norm"
    input, residual, weight, bias = _autocast.cast(policy, input, residual, weight, bias)
    _check_norm_input(op, input, 1, "at least 1D")
    shape = _normalized_shape(op, input, normalized_shape)
    if residual is not None:
        _check_same_as_input(op, "residual", residual, input)
    _check_companion(op, "weight", weight, input, shape)
    _check_companion(op, "bias", bias, input, shape)
    if eps is None:  # rms_norm's default: the epsilon of the compute type, as torch's
        eps = torch.finfo(torch.float32 if input.dtype in _LOW_PRECISION else input.dtype).eps
    C = math.prod(shape)
    if C == 0:  # nothing to normalize
        total = input if residual is None else input + residual
        return total.clone(), (total if residual is not None else None)
    x = _layout.contiguous(input).view(-1, C, 1)
    res = None if residual is None else _layout.contiguous(residual).view(-1, C, 1)
    y, s = _norm.row_norm(
        x,
        res,
        _flat(weight),
        _flat(bias),
        float(eps),
        rms,
    )
    # Under autocast (float32 norms) the sum comes back in input's dtype, as input + residual.
    return y.view_as(input), (None if s is None else s.view_as(input).to(in_dtype))


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """A weight or bias of the normalized shape as one (C,) vector."""
    return t if t is None or t.dim() == 1 else t.reshape(-1)


def layer_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm``: normalizes over the trailing normalized_shape dims.

    Args:
        input: (*, *normalized_shape), floating point, any strides.
        normalized_shape: an int or a sequence of ints.
        weight, bias: optional, of normalized_shape.
        eps: added to the variance.

    Returns:
        A contiguous tensor of input's shape and dtype.
    """
    return _row_norm("layer_norm", input, None, normalized_shape, weight, bias, eps, False)[0]


def rms_norm(
    input: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """``F.rms_norm``: input / sqrt(mean(input^2) + eps) * weight over normalized_shape.

    Args:
        input, normalized_shape, weight: as layer_norm.
        eps: added to the mean square; None means the epsilon of the compute type, as
            torch's: torch.finfo(input.dtype).eps, float32's for float16/bfloat16 input.
    """
    return _row_norm("rms_norm", input, None, normalized_shape, weight, None, eps, True)[0]


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual; (F.layer_norm(s, ...), s)`` in one pass over x and residual (a
    pre-norm transformer block's residual stream).

    Returns:
        (normalized, x + residual), both of x's shape and dtype.
    """
    return _row_norm("add_layer_norm", x, residual, normalized_shape, weight, bias, eps, False)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual; (F.rms_norm(s, ...), s)`` in one pass. Returns (normalized, s)."""
    return _row_norm("add_rms_norm", x, residual, normalized_shape, weight, None, eps, True)


def layer_norm_2d(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """LayerNorm over the channels of each pixel (ConvNeXt's LayerNorm2d): what
    ``F.layer_norm(input.permute(0, 2, 3, 1), (C,), ...).permute(0, 3, 1, 2)`` computes, with
    no permute or copy: NCHW reduces over the strided C axis, channels_last over rows.

    Args:
        input: (N, C, H, W), floating point, NCHW or channels_last.
        weight, bias: optional (C,).
        eps: added to the variance (ConvNeXt's default 1e-6).

    Returns:
        (N, C, H, W) in the input's memory format.
    """
    op = "layer_norm_2d"
    input, weight, bias = _autocast.cast("layer_norm", input, weight, bias)
    _check_norm_input(op, input, 4, "4D (N, C, H, W)")
    if input.dim() != 4:
        raise ValueError(f"{op}: input must be 4D (N, C, H, W), got a {input.dim()}D tensor")
    C = input.shape[1]
    _check_companion(op, "weight", weight, input, (C,))
    _check_companion(op, "bias", bias, input, (C,))
    if input.numel() == 0:
        return _norm.empty_affine(input, weight, bias)
    # The view's middle axis is C: rows of C for channels_last, a strided axis for NCHW.
    channels_last = _layout.is_channels_last(input)
    x = _norm.channel_view(input, channels_last)
    y, _ = _norm.row_norm(x, None, weight, bias, float(eps), False)
    return _norm.from_channel_view(y, input, channels_last)


# Convolution: conv2d and conv_transpose2d (pykern/ops/conv.py).


def _check_conv_operands(op: str, input: object, weight: object) -> None:
    """input 3D or 4D with non-zero (C, H, W); weight a non-empty 4D tensor of input's dtype on
    input's device."""
    _check_tensor(op, input, (3, 4), "3D (C, H, W) or 4D (N, C, H, W)")
    if input.dtype not in _NORM_DTYPES:
        raise TypeError(
            f"{op}: input must be float16, bfloat16, float32 or float64, got {input.dtype}"
        )
    if 0 in input.shape[-3:]:
        raise ValueError(
            f"{op}: input must have non-zero C, H and W (only the batch may be empty), got "
            f"shape {tuple(input.shape)}"
        )
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or weight.numel() == 0:
        raise ValueError(f"{op}: weight must be a non-empty 4D tensor, got {tuple(weight.shape)}")
    if weight.device != input.device:
        raise ValueError(f"{op}: weight is on {weight.device} but input is on {input.device}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{op}: weight has dtype {weight.dtype} but input has {input.dtype}")


def _check_conv_bias(op: str, bias: object, input: torch.Tensor, channels: int) -> None:
    if bias is None:
        return
    _check_same_dtype_device(op, "bias", bias, input)
    if tuple(bias.shape) != (channels,):
        raise ValueError(f"{op}: bias must have shape ({channels},), got {tuple(bias.shape)}")


def _check_same_dtype_device(op: str, name: str, t: object, input: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != input.device:
        raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
    if t.dtype != input.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but input has {input.dtype}")


def _positive_int(op: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{op}: {name} must be greater than zero, got {value}")
    return value


def _positive_pair(op: str, name: str, value) -> tuple:
    pair = _pair(op, name, value)
    if min(pair) <= 0:
        raise ValueError(f"{op}: {name} must be greater than zero, got {pair}")
    return pair


def _non_negative_pair(op: str, name: str, value) -> tuple:
    pair = _pair(op, name, value)
    if min(pair) < 0:
        raise ValueError(f"{op}: {name} must be non-negative, got {pair}")
    return pair


def _conv_padding(op: str, padding, stride, dilation, kernel) -> tuple[tuple, tuple]:
    """(symmetric padding, extra padding after the end) for an int, a pair, 'valid' or 'same'.
    'same' with an odd total padding puts the extra element after the end, as torch does."""
    if not isinstance(padding, str):
        return _non_negative_pair(op, "padding", padding), (0, 0)
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding != "same":
        raise ValueError(
            f"{op}: padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}"
        )
    if stride != (1, 1):
        raise ValueError(f"{op}: padding='same' needs stride 1, got stride={stride}")
    totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
    return tuple(t // 2 for t in totals), tuple(t % 2 for t in totals)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """torch.nn.functional.conv2d, computed as im2col + GEMM (CPU, CUDA) or an implicit GEMM
    (Triton).

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); float16, bfloat16, float32 or float64; NCHW
            or channels_last (each computed natively).
        weight: (K, C / groups, R, S), input's dtype and device.
        bias: optional (K,).
        stride, dilation: int or (h, w) pair, > 0 (dilation > 1: the atrous convolution).
        padding: int or pair >= 0, 'valid' (none) or 'same' (output size = input size; stride 1).
        groups: divides C and K; groups == C is the depthwise convolution.

    Returns:
        (N, K, Ho, Wo), channels_last when input or weight is (torch's rule).
    """
    op = "conv2d"
    input, weight, bias = _autocast.cast(op, input, weight, bias)
    _check_conv_operands(op, input, weight)
    groups = _positive_int(op, "groups", groups)
    K, Cg, R, S = weight.shape
    C = input.shape[-3]
    if K % groups:
        raise ValueError(f"{op}: groups ({groups}) must divide weight.shape[0] ({K})")
    if Cg * groups != C:
        raise ValueError(
            f"{op}: input has {C} channels but weight expects {Cg * groups} "
            f"(weight.shape[1] = {Cg} times groups = {groups})"
        )
    _check_conv_bias(op, bias, input, K)
    stride = _positive_pair(op, "stride", stride)
    dilation = _positive_pair(op, "dilation", dilation)
    padding, extra = _conv_padding(op, padding, stride, dilation, (R, S))
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    channels_last = _conv.channels_last_for(x, weight)
    if any(extra):
        x = torch.nn.functional.pad(x, (0, extra[1], 0, extra[0]))
    padded = [size + 2 * p for size, p in zip(x.shape[2:], padding, strict=True)]
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, (R, S), strict=True)]
    if any(span > size for span, size in zip(spans, padded, strict=True)):
        raise ValueError(
            f"{op}: the kernel spans {tuple(spans)} (weight {R}x{S}, dilation {dilation}), "
            f"more than the padded input {tuple(padded)}"
        )
    geo = _conv.Geometry(stride, padding, dilation, groups, channels_last)
    y = _conv.conv2d(x, weight, bias, geo)
    return y.squeeze(0) if unbatched else y


def conv_transpose2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    output_padding=0,
    groups: int = 1,
    dilation=1,
) -> torch.Tensor:
    """torch.nn.functional.conv_transpose2d: the transpose of conv2d's matrix, GEMM then col2im
    (CPU, CUDA) or an implicit GEMM (Triton).

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); NCHW or channels_last.
        weight: (C, K / groups, R, S), input's dtype and device.
        bias: optional (K,).
        stride, dilation: int or pair, > 0. padding: int or pair, >= 0.
        output_padding: int or pair added to one side of the output; each smaller than the
            stride or the dilation of its dimension.
        groups: divides C and K.

    Returns:
        (N, K, (H - 1) * stride - 2 * padding + dilation * (R - 1) + output_padding + 1, ...).
    """
    op = "conv_transpose2d"
    input, weight, bias = _autocast.cast(op, input, weight, bias)
    _check_conv_operands(op, input, weight)
    groups = _positive_int(op, "groups", groups)
    Cin, Kg, R, S = weight.shape
    C = input.shape[-3]
    if Cin != C:
        raise ValueError(f"{op}: input has {C} channels but weight.shape[0] is {Cin}")
    if C % groups:
        raise ValueError(f"{op}: groups ({groups}) must divide the input channels ({C})")
    _check_conv_bias(op, bias, input, Kg * groups)
    stride = _positive_pair(op, "stride", stride)
    dilation = _positive_pair(op, "dilation", dilation)
    padding = _non_negative_pair(op, "padding", padding)
    output_padding = _non_negative_pair(op, "output_padding", output_padding)
    for o, s, d in zip(output_padding, stride, dilation, strict=True):
        if o >= s and o >= d:
            raise ValueError(
                f"{op}: output_padding must be smaller than the stride or the dilation, got "
                f"output_padding={output_padding}, stride={stride}, dilation={dilation}"
            )
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    out_hw = [
        (h - 1) * s - 2 * p + d * (k - 1) + 1 + o
        for h, s, p, d, k, o in zip(
            x.shape[2:], stride, padding, dilation, (R, S), output_padding, strict=True
        )
    ]
    if min(out_hw) <= 0:
        raise ValueError(
            f"{op}: the output would be empty: input (H, W) = {tuple(x.shape[2:])}, weight "
            f"{R}x{S}, stride={stride}, padding={padding}, dilation={dilation}, "
            f"output_padding={output_padding}"
        )
    # output_padding >= stride (allowed when below the dilation): the output reaches past the
    # last window of a convolution over it, so it is not conv2d's adjoint. Every window's
    # full reach (no padding), then cropped by the padding in front and cut or zero-filled
    # at the end: the `padding` rows past the nominal end still hold window sums.
    adjoint = all(o < s for o, s in zip(output_padding, stride, strict=True))
    geo = _conv.Geometry(
        stride, padding if adjoint else (0, 0), dilation, groups, _conv.channels_last_for(x, weight)
    )
    if adjoint:
        y = _conv.conv_transpose2d(x, weight, bias, geo, out_hw)
        return y.squeeze(0) if unbatched else y
    reach = [
        (h - 1) * s + d * (k - 1) + 1
        for h, s, d, k in zip(x.shape[2:], stride, dilation, (R, S), strict=True)
    ]
    y = _conv.conv_transpose2d(x, weight, None, geo, reach)
    (ph, pw), (oh, ow), (rh, rw) = padding, out_hw, reach
    y = torch.nn.functional.pad(y, (-pw, pw + ow - rw, -ph, ph + oh - rh))
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.squeeze(0) if unbatched else y


# Attention: scaled_dot_product_attention (pykern/ops/attention.py).

_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_attention_operands(op: str, query, key, value) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got {t.layout}")
        if t.dim() < 2:
            raise ValueError(
                f"{op}: {name} must have at least 2 dimensions (..., sequence, features), got "
                f"a {t.dim()}D tensor"
            )
        backends.check_device(t, op, name)
    if query.dtype not in _ATTENTION_DTYPES:
        raise TypeError(
            f"{op}: query must be float16, bfloat16, float32 or float64, got {query.dtype}"
        )
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but query has {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{op}: {name} is on {t.device} but query is on {query.device}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"{op}: key's head dim ({key.shape[-1]}) must equal query's ({query.shape[-1]})"
        )
    if query.shape[-1] == 0:
        raise ValueError(f"{op}: query's head dim (its last dimension) must be non-zero")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"{op}: value's sequence length ({value.shape[-2]}) must equal key's ({key.shape[-2]})"
        )


def _broadcast(op: str, what: str, *shapes) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise ValueError(
            f"{op}: {what} do not broadcast: " + ", ".join(str(tuple(s)) for s in shapes)
        ) from None


def _attention_batches(op: str, query, key, value, enable_gqa: bool):
    """(batch shape of the output, Z, Hq, Hk): the flattening of the leading dimensions into
    (Z, H); with grouped-query attention the head dims (-3) are kept apart, else all batch
    dims broadcast together as torch's math path broadcasts them."""
    qb, kb, vb = query.shape[:-2], key.shape[:-2], value.shape[:-2]
    heads_differ = min(len(qb), len(kb), len(vb)) >= 1 and (qb[-1] != kb[-1] or qb[-1] != vb[-1])
    if enable_gqa and heads_differ:
        Hq, Hk = qb[-1], kb[-1]
        if vb[-1] != Hk:
            raise ValueError(f"{op}: value has {vb[-1]} heads but key has {Hk}")
        if Hk == 0 or Hq % Hk != 0:
            raise ValueError(
                f"{op}: with enable_gqa, query's heads ({Hq}) must be a multiple of key's ({Hk})"
            )
        outer = _broadcast(op, "the batch dimensions of query, key and value", qb[:-1], kb[:-1],
                           vb[:-1])  # fmt: skip
        return (*outer, Hq), math.prod(outer), Hq, Hk
    if heads_differ and len({qb[-1], kb[-1], vb[-1]} - {1}) > 1:
        raise ValueError(
            f"{op}: query, key and value have {qb[-1]}, {kb[-1]} and {vb[-1]} heads (dim -3); "
            "differing head counts need enable_gqa=True"
        )
    batch = _broadcast(op, "the batch dimensions of query, key and value", qb, kb, vb)
    heads = batch[-1] if batch else 1
    return batch, math.prod(batch[:-1]), heads, heads


def _attention_bias(op: str, attn_mask, query: torch.Tensor, target, Z: int, Hq: int):
    """attn_mask as one additive (Z, Hq, L, S) bias in the accumulation type (-inf where a bool
    mask is False), broadcast by strides rather than copied where the shape allows."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{op}: attn_mask must be a torch.Tensor or None, got "
                        f"{type(attn_mask).__name__}")  # fmt: skip
    if attn_mask.device != query.device:
        raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but query is on "
                         f"{query.device}")  # fmt: skip
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise TypeError(
            f"{op}: attn_mask must be bool or of query's dtype {query.dtype}, got {attn_mask.dtype}"
        )
    if attn_mask.requires_grad:
        raise ValueError(
            f"{op}: attn_mask requires grad, but pykern treats the mask as a constant (detach it)"
        )
    if len(target) == 3 and attn_mask.dim() == 4 and attn_mask.shape[0] == 1:
        # torch runs a 3D query as 4D, so it takes a 4D mask of one batch there (only there)
        attn_mask = attn_mask[0]
    if _broadcast(op, "attn_mask and the attention scores", attn_mask.shape, target) != target:
        raise ValueError(
            f"{op}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
            f"attention scores' shape {target}"
        )
    acc = _attention.acc_dtype(query.dtype)
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=acc, device=query.device)
        bias = bias.masked_fill(attn_mask.logical_not(), float("-inf"))
    else:
        bias = attn_mask.to(acc)
    return bias.expand(target).reshape(Z, Hq, *target[-2:])


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Same as ``torch.nn.functional.scaled_dot_product_attention``: softmax(q k^T * scale +
    mask) v, flash-style (tiled online softmax, memory linear in the sequence length).

    Args:
        query: (..., L, E); key: (..., S, E); value: (..., S, Ev). Batch dimensions broadcast;
            with ``enable_gqa`` the head dimension (-3) of key and value may divide query's
            (grouped-query attention: query head h reads key head h // (Hq // Hk)).
        attn_mask: bool (True: attend) or additive of query's dtype, broadcasting to
            (..., L, S); not with ``is_causal``.
        dropout_p: in [0, 1); the mask comes from a counter-based generator seeded from torch's
            default generator (``torch.manual_seed`` reproduces it).
        is_causal: key j is masked for query i when j > i (top-left aligned when L != S).
        scale: default 1 / sqrt(E).

    Returns:
        (..., L, Ev) in query's dtype. A query whose every key is masked gets zeros, with zero
        gradients, as torch gives.
    """
    op = "scaled_dot_product_attention"
    query, key, value, attn_mask = _autocast.cast(op, query, key, value, attn_mask)
    _check_attention_operands(op, query, key, value)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{op}: dropout_p must be a float, got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {flag!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be a float or None, got {scale!r}")
    if attn_mask is not None and is_causal:
        raise ValueError(f"{op}: give attn_mask or is_causal=True, not both")

    L, E, S, Ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    batch, Z, Hq, Hk = _attention_batches(op, query, key, value, enable_gqa)
    bias = None
    if attn_mask is not None:
        bias = _attention_bias(op, attn_mask, query, (*batch, L, S), Z, Hq)
    q = query.expand(*batch, L, E).reshape(Z, Hq, L, E)
    k = key.expand(*batch[:-1], Hk, S, E).reshape(Z, Hk, S, E)
    v = value.expand(*batch[:-1], Hk, S, Ev).reshape(Z, Hk, S, Ev)
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    out = _attention.attention(q, k, v, bias, scale, is_causal, float(dropout_p))
    return out.reshape(*batch, L, Ev)
