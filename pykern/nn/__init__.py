"""Modules. Those with a torch.nn counterpart subclass it and override forward only, so
state_dicts load both ways."""

from pykern.nn.attention import MultiheadAttention
from pykern.nn.conv import Conv2d, ConvTranspose2d
from pykern.nn.norm import (
    BatchNorm2d,
    BatchNormAddReLU2d,
    BatchNormReLU2d,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    SyncBatchNorm,
)
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
    "BatchNorm2d",
    "BatchNormAddReLU2d",
    "BatchNormReLU2d",
    "ChannelPool",
    "Conv2d",
    "ConvTranspose2d",
    "GlobalAvgPool2d",
    "GlobalMaxPool2d",
    "LayerNorm",
    "LayerNorm2d",
    "MaxPool2d",
    "MultiheadAttention",
    "RMSNorm",
    "SyncBatchNorm",
]
