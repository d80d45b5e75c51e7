"""Modules. Those with a torch.nn counterpart subclass it and override forward only, so
state_dicts load both ways."""

from pykern.nn.pooling import (
    AdaptiveAvgPool2d,
    AdaptiveMaxPool2d,
    AvgPool2d,
    ChannelPool,
    GlobalAvgPool2d,
    GlobalMaxPool2d,
    MaxPool2d,
)

__all__ = [
    "AdaptiveAvgPool2d",
    "AdaptiveMaxPool2d",
    "AvgPool2d",
    "ChannelPool",
    "GlobalAvgPool2d",
    "GlobalMaxPool2d",
    "MaxPool2d",
]
