"""Pooling modules. Global and channel pooling have no torch.nn counterpart, so these are plain
modules with no parameters; the torch-shaped ones (MaxPool2d, ...) will subclass torch's."""

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
