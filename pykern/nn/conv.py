"""Convolution modules: subclasses of torch's that override the forward computation only, so
constructor arguments, initialization, repr and state_dict keys are torch's."""

from __future__ import annotations

import torch

from pykern import functional as PF


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d on pykern.functional.conv2d. padding_mode 'reflect', 'replicate' and
    'circular' pad the input first (torch.nn.functional.pad), then convolve unpadded."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode == "zeros":
            return PF.conv2d(
                input, weight, bias, self.stride, self.padding, self.dilation, self.groups
            )
        padded = torch.nn.functional.pad(
            input, self._reversed_padding_repeated_twice, mode=self.padding_mode
        )
        return PF.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d on pykern.functional.conv_transpose2d; forward's output_size
    picks the output_padding, as torch's does (whose constructor takes padding_mode 'zeros'
    only)."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return PF.conv_transpose2d(
            input, self.weight, self.bias, self.stride, self.padding, output_padding,
            self.groups, self.dilation,
        )  # fmt: skip
