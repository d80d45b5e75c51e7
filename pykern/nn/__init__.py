"""Modules. Those with a torch.nn counterpart subclass it and override forward only, so
state_dicts load both ways."""

from pykern.nn.pooling import ChannelPool, GlobalAvgPool2d, GlobalMaxPool2d

__all__ = ["ChannelPool", "GlobalAvgPool2d", "GlobalMaxPool2d"]
