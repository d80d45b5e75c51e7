"""Normalization modules. Each subclasses its torch.nn counterpart and overrides forward only,
so constructor arguments, parameters, buffers (num_batches_tracked included) and state_dict
keys are torch's. BatchNormReLU2d and BatchNormAddReLU2d are BatchNorm2d with a fused tail:
they load a plain BatchNorm2d's state_dict."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pykern import functional as PF


def _batch_norm_forward(module, input, residual, relu: bool, op: str, group=None):
    """torch's _BatchNorm.forward (momentum None: cumulative average over num_batches_tracked),
    with the call validated before num_batches_tracked or the running stats change."""
    no_running = module.running_mean is None and module.running_var is None
    use_batch_stats = module.training or no_running
    keep_running = not module.training or module.track_running_stats
    running_mean = module.running_mean if keep_running else None
    running_var = module.running_var if keep_running else None
    PF._check_batch_norm(
        op, input, residual, running_mean, running_var, module.weight, module.bias,
        use_batch_stats, 0.0,
    )  # fmt: skip
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            factor = 1.0 / float(module.num_batches_tracked)
    return PF._run_batch_norm(
        input, residual, running_mean, running_var, module.weight, module.bias, use_batch_stats,
        factor, module.eps, relu, group,
    )  # fmt: skip


class BatchNorm2d(torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on pykern's kernels (NCHW and channels_last read natively)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return _batch_norm_forward(self, input, None, False, "BatchNorm2d")


class BatchNormReLU2d(BatchNorm2d):
    """BatchNorm2d then ReLU, fused into one pass forward and one backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return _batch_norm_forward(self, input, None, True, "BatchNormReLU2d")


class BatchNormAddReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(input) + residual), fused (the tail of a ResNet block)."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return _batch_norm_forward(self, input, residual, True, "BatchNormAddReLU2d")


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on pykern's kernels: in training with more than one process, the
    batch statistics (count, mean, variance per rank) are combined across the process group
    with torch.distributed, and the backward's two per-channel sums all-reduced; any backend
    (gloo on CPU included)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        group = None
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) <= 1:
                group = None
        return _batch_norm_forward(self, input, None, False, "SyncBatchNorm", group)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None):
        """Every BatchNorm*D in module replaced by a pykern SyncBatchNorm sharing its
        parameters and buffers (torch's convert_sync_batchnorm, with this class)."""
        converted = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            converted = cls(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, process_group,
            )  # fmt: skip
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return converted


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on pykern's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return PF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on pykern's kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return PF.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class LayerNorm2d(torch.nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an (N, C, H, W) image (ConvNeXt's
    LayerNorm2d), computed natively in NCHW and channels_last. Parameters weight and bias of
    shape (C,), as a LayerNorm(num_channels) has them."""

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_channels, eps, elementwise_affine, bias, device, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return PF.layer_norm_2d(input, self.weight, self.bias, self.eps)
