"""Pooling modules. Those torch has subclass torch's and override forward only (same
constructor arguments, repr and state_dict); global and channel pooling have no torch.nn
counterpart, so these are plain modules with no parameters."""

from __future__ import annotations

import torch

from pykern import functional as PF


class GlobalAvgPool2d(torch.nn.Module):
    """(N, C, H, W) -> (N, C, 1, 1): mean over H and W (as nn.AdaptiveAvgPool2d(1))."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return PF.global_avg_pool2d(input)


class GlobalMaxPool2d(torch.nn.Module):
    """(N, C, H, W) -> (N, C, 1, 1): max over H and W (as nn.AdaptiveMaxPool2d(1))."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return PF.global_max_pool2d(input)


class ChannelPool(torch.nn.Module):
    """(N, C, H, W) -> (N, 1, H, W): mean or max over channels."""

    def __init__(self, mode: str = "avg"):
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"ChannelPool: mode must be 'avg' or 'max', got {mode!r}")
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return PF.channel_pool(input, self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d on pykern's kernels."""

    def forward(self, input: torch.Tensor):
        return PF.max_pool2d(
            input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
            self.return_indices,
        )  # fmt: skip


class AvgPool2d(torch.nn.AvgPool2d):
    """torch.nn.AvgPool2d on pykern's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return PF.avg_pool2d(
            input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
            self.count_include_pad, self.divisor_override,
        )  # fmt: skip


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    """torch.nn.AdaptiveAvgPool2d on pykern's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return PF.adaptive_avg_pool2d(input, self.output_size)


class AdaptiveMaxPool2d(torch.nn.AdaptiveMaxPool2d):
    """torch.nn.AdaptiveMaxPool2d on pykern's kernels."""

    def forward(self, input: torch.Tensor):
        return PF.adaptive_max_pool2d(input, self.output_size, self.return_indices)
