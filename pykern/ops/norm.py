"""Normalization family: LayerNorm, RMSNorm (with their residual-add forms), LayerNorm2d and
BatchNorm (with fused ReLU and add+ReLU, and the cross-rank statistics of SyncBatchNorm) as
custom ops with autograd.

Every kernel sees its big tensors as one contiguous (B, C, K) view, built here so that each
layout is read natively, never transposed:

    row norm, over C for each (b, k)        LayerNorm/RMSNorm   (rows, N, 1)
                                            LayerNorm2d NCHW    (N, C, H*W)
                                            LayerNorm2d NHWC    (N*H*W, C, 1)
    batch norm, over (b, k) for each c      NCHW (N, C, H*W)    NHWC (N*H*W, C, 1)

Per-channel and per-row vectors (weight, bias, mean, var, rstd) travel in the accumulation
dtype "acc" (float64 for float64 input, else float32); weight and bias are cast to it here,
so autograd casts their gradients back. BatchNorm's kernels also read weight, bias and the
running statistics in x's own dtype: a bfloat16 model's BatchNorm then launches no conversions
(four per call otherwise, the bulk of a bfloat16 ResNet's ops). The running-statistics update
rule lives here only (update_running_stats). Backends: csrc/cpu/norm.cpp, csrc/cuda/norm.cu,
triton_kernels/norm.py.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pykern import backends
from pykern.ops.layout import contiguous

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _in_acc(t: Tensor | None, acc: torch.dtype) -> Tensor | None:
    """t converted to the accumulation type (a no-op call skipped: it costs a microsecond or
    two on every call of a small normalization)."""
    return t if t is None or t.dtype == acc else t.to(acc)


def _in_acc_or(t: Tensor | None, acc: torch.dtype, own: torch.dtype) -> Tensor | None:
    """t as it is when its dtype is acc or x's own dtype `own` (the BatchNorm kernels read
    either), else converted to acc."""
    return t if t is None or t.dtype == own else _in_acc(t, acc)


def _vector(x: Tensor, shape) -> Tensor:
    return x.new_empty(shape, dtype=acc_dtype(x.dtype))


def _none() -> Tensor:
    """Stand-in for an optional output not asked for (custom ops cannot return None)."""
    return torch.empty(0)


def channel_view(x: Tensor, channels_last: bool) -> Tensor:
    """(N, C, *spatial) as the (B, C, K) view the kernels read: (N, C, S) for NCHW, (N*S, C, 1)
    for channels_last (a copy only when x is not laid out that way already)."""
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if channels_last:
        return contiguous(x.movedim(1, -1)).view(N * S, C, 1)
    return contiguous(x).view(N, C, S)


def from_channel_view(t: Tensor, x: Tensor | torch.Size, channels_last: bool) -> Tensor:
    """A (B, C, K) result of channel_view(x) back to x's shape (x or its shape given), in x's
    memory format."""
    if channels_last:
        shape = x if isinstance(x, torch.Size) else x.shape
        return t.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return t.view(x) if isinstance(x, torch.Size) else t.view_as(x)  # view_as: 2 us less


ROW_NORM_FWD = backends.table("norm", "row_norm_fwd")
ROW_NORM_BWD = backends.table("norm", "row_norm_bwd")
BATCH_NORM_STATS = backends.table("norm", "batch_norm_stats")
BATCH_NORM_UPDATE_RUNNING = backends.table("norm", "batch_norm_update_running")
BATCH_NORM_FWD = backends.table("norm", "batch_norm_fwd")
BATCH_NORM_BWD_REDUCE = backends.table("norm", "batch_norm_bwd_reduce")
BATCH_NORM_BWD = backends.table("norm", "batch_norm_bwd")


@torch.library.custom_op("pykern::row_norm_fwd", mutates_args=())
def row_norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s = x + residual or empty, mean (B, K) or empty when rms, rstd (B, K)) of the
    (B, C, K) view x normalized over C."""
    impl = backends.dispatch(ROW_NORM_FWD, x.device, "row_norm_fwd")
    return impl(x, residual, weight, bias, eps, rms)


@row_norm_fwd.register_fake
def _row_norm_fwd_fake(x, residual, weight, bias, eps, rms):
    B, _, K = x.shape
    s = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    mean = _vector(x, (0,) if rms else (B, K))
    return torch.empty_like(x), s, mean, _vector(x, (B, K))


@torch.library.custom_op("pykern::row_norm_bwd", mutates_args=())
def row_norm_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    grad_sum: Tensor | None,
    rms: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (+ grad_sum), dweight or empty, dbias or empty); x is the normalized input."""
    impl = backends.dispatch(ROW_NORM_BWD, x.device, "row_norm_bwd")
    return impl(grad_y, x, weight, mean, rstd, grad_sum, rms, need_dweight, need_dbias)


@row_norm_bwd.register_fake
def _row_norm_bwd_fake(grad_y, x, weight, mean, rstd, grad_sum, rms, need_dweight, need_dbias):
    C = x.shape[1]
    return (
        torch.empty_like(x),
        _vector(x, (C if need_dweight else 0,)),
        _vector(x, (C if need_dbias else 0,)),
    )


@torch.library.custom_op("pykern::batch_norm_stats", mutates_args=())
def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased var) of each channel c of the (B, C, K) view x, over (b, k)."""
    return backends.dispatch(BATCH_NORM_STATS, x.device, "batch_norm_stats")(x)


@batch_norm_stats.register_fake
def _batch_norm_stats_fake(x):
    return _vector(x, (x.shape[1],)), _vector(x, (x.shape[1],))


@torch.library.custom_op(
    "pykern::batch_norm_update_running", mutates_args=("running_mean", "running_var")
)
def batch_norm_update_running(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    var_factor: float,
) -> None:
    """In place: running = (1 - momentum) * running + momentum * batch, the variance scaled by
    var_factor first; one launch (the four in-place ops of torch's rule were four)."""
    impl = backends.dispatch(BATCH_NORM_UPDATE_RUNNING, mean.device, "batch_norm_update_running")
    impl(mean, var, running_mean, running_var, momentum, var_factor)


@batch_norm_update_running.register_fake
def _batch_norm_update_running_fake(mean, var, running_mean, running_var, momentum, var_factor):
    return None


@torch.library.custom_op("pykern::batch_norm_fwd", mutates_args=())
def batch_norm_fwd(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    relu: bool,
) -> Tensor:
    """[relu]((x - mean) / sqrt(var + eps) * weight + bias [+ residual]) per channel; the
    (C,) vectors each in acc or in x's dtype (as are mean, var and weight in the two below)."""
    impl = backends.dispatch(BATCH_NORM_FWD, x.device, "batch_norm_fwd")
    return impl(x, mean, var, weight, bias, residual, eps, relu)


@batch_norm_fwd.register_fake
def _batch_norm_fwd_fake(x, mean, var, weight, bias, residual, eps, relu):
    return torch.empty_like(x)


@torch.library.custom_op("pykern::batch_norm_bwd_reduce", mutates_args=())
def batch_norm_bwd_reduce(
    grad_y: Tensor, x: Tensor, y: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Per channel: (sum of dy, sum of dy * xhat), dy masked where the ReLU output y <= 0."""
    impl = backends.dispatch(BATCH_NORM_BWD_REDUCE, x.device, "batch_norm_bwd_reduce")
    return impl(grad_y, x, y, mean, var, eps)


@batch_norm_bwd_reduce.register_fake
def _batch_norm_bwd_reduce_fake(grad_y, x, y, mean, var, eps):
    return _vector(x, (x.shape[1],)), _vector(x, (x.shape[1],))


@torch.library.custom_op("pykern::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(
    grad_y: Tensor,
    x: Tensor,
    y: Tensor | None,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    eps: float,
    count: int,
    want_grad_residual: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, the masked dy as the residual's gradient or empty); count 0: eval-mode stats."""
    impl = backends.dispatch(BATCH_NORM_BWD, x.device, "batch_norm_bwd")
    return impl(
        grad_y, x, y, mean, var, weight, sum_dy, sum_dy_xhat, eps, count, want_grad_residual
    )


@batch_norm_bwd.register_fake
def _batch_norm_bwd_fake(
    grad_y, x, y, mean, var, weight, sum_dy, sum_dy_xhat, eps, count, want_grad_residual
):
    return torch.empty_like(x), torch.empty_like(x) if want_grad_residual else x.new_empty((0,))


_row_norm_fwd = backends.caller("row_norm_fwd", ROW_NORM_FWD)
_row_norm_bwd = backends.caller("row_norm_bwd", ROW_NORM_BWD)
_batch_norm_stats = backends.caller("batch_norm_stats", BATCH_NORM_STATS)
_batch_norm_update_running = backends.caller("batch_norm_update_running", BATCH_NORM_UPDATE_RUNNING)
_batch_norm_fwd = backends.caller("batch_norm_fwd", BATCH_NORM_FWD)
_batch_norm_bwd_reduce = backends.caller("batch_norm_bwd_reduce", BATCH_NORM_BWD_REDUCE)
_batch_norm_bwd = backends.caller("batch_norm_bwd", BATCH_NORM_BWD)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class RowNormFunction(torch.autograd.Function):
    """(y, s) of row_norm_fwd with the gradients of x, residual, weight and bias."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, rms: bool):
        backends.remember_backend(ctx)
        y, s, mean, rstd = _row_norm_fwd(x, residual, weight, bias, eps, rms)
        normed = x if residual is None else s
        ctx.save_for_backward(normed, weight, mean, rstd)
        ctx.rms, ctx.has_residual = rms, residual is not None
        ctx.set_materialize_grads(False)
        if residual is None:
            ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    @backends.keeps_forward_backend
    def backward(ctx, grad_y, grad_s):
        normed, weight, mean, rstd = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(normed)
        grad_sum = contiguous(grad_s) if ctx.has_residual and grad_s is not None else None
        need = ctx.needs_input_grad
        dx, dweight, dbias = _row_norm_bwd(
            contiguous(grad_y), normed, weight, mean, rstd, grad_sum, ctx.rms, need[2], need[3]
        )
        return (
            dx if need[0] else None,
            dx if need[1] else None,
            dweight if need[2] else None,
            dbias if need[3] else None,
            None,
            None,
        )


def row_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[Tensor, Tensor | None]:
    """x, residual: contiguous (B, C, K) views; weight, bias: (C,) in any float dtype.
    Returns (y, x + residual or None)."""
    acc = acc_dtype(x.dtype)
    weight, bias = _in_acc(weight, acc), _in_acc(bias, acc)
    if _needs_grad(x, residual, weight, bias):
        y, s = RowNormFunction.apply(x, residual, weight, bias, eps, rms)
    else:
        y, s, _, _ = _row_norm_fwd(x, residual, weight, bias, eps, rms)
    return y, (s if residual is not None else None)


# BatchNorm. The batch statistics are computed (and, for SyncBatchNorm, combined across ranks)
# before BatchNormFunction, which treats them as given: its backward carries the terms that
# flow through them (count > 0).


def sync_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, int]:
    """Every rank's (count, mean, biased var) combined (Chan's parallel formula): the
    statistics of the whole batch across the process group."""
    local = torch.cat([mean.new_tensor([count]), mean, var])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # (ranks, 1 + 2C)
    C = mean.numel()
    counts, means, vars_ = table[:, :1], table[:, 1 : 1 + C], table[:, 1 + C :]
    total = counts.sum()
    mean_all = (counts * means).sum(0) / total
    var_all = (counts * (vars_ + (means - mean_all) ** 2)).sum(0) / total
    return mean_all, var_all, int(total.item())


def sync_gradient_sums(sum_dy: Tensor, sum_dy_xhat: Tensor, group) -> tuple[Tensor, Tensor]:
    """The backward's two channel sums added over every rank of the group (one all_reduce,
    which every rank's backward makes alike, an empty batch's too)."""
    sums = torch.cat([sum_dy, sum_dy_xhat])
    dist.all_reduce(sums, group=group)
    return sums.chunk(2)


class BatchNormFunction(torch.autograd.Function):
    """y of batch_norm_fwd given the statistics, with the gradients of x, weight, bias and
    the residual; count > 0 means the statistics are the batch's over count values (and
    their gradient terms are included), count == 0 that they were constants (eval).

    x and residual are (B, C, K) channel views of the caller's input; y comes back in the
    input's shape (`shape`, `channels_last`) as a tensor that is no view: an in-place op on a
    view of the output (ResNet's relu_ and +=) costs two copies of the activation in backward
    (autograd's CopySlices), and on a view made inside a Function it is refused."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean, var, eps, relu, count, group, shape, cl):
        backends.remember_backend(ctx)
        y = _batch_norm_fwd(x, mean, var, weight, bias, residual, eps, relu)
        ctx.save_for_backward(x, y if relu else None, mean, var, weight)
        ctx.eps, ctx.count, ctx.group, ctx.channels_last = eps, count, group, cl
        return from_channel_view(y, shape, cl).detach()  # same storage and version counter

    @staticmethod
    @torch.autograd.function.once_differentiable
    @backends.keeps_forward_backend
    def backward(ctx, grad_y):
        x, y, mean, var, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_res = ctx.needs_input_grad[:4]
        grad_y = channel_view(grad_y, ctx.channels_last)
        training = ctx.count > 0
        dx = dweight = dbias = d_res = None
        if need_w or need_b or (need_x and training):
            sum_dy, sum_dy_xhat = _batch_norm_bwd_reduce(grad_y, x, y, mean, var, ctx.eps)
            dweight, dbias = sum_dy_xhat, sum_dy  # this rank's: DDP averages them across ranks
        else:
            sum_dy = sum_dy_xhat = x.new_zeros(mean.shape, dtype=acc_dtype(x.dtype))
        if need_x or need_res:
            if training and ctx.group is not None:
                sum_dy, sum_dy_xhat = sync_gradient_sums(sum_dy, sum_dy_xhat, ctx.group)
            dx, d_res = _batch_norm_bwd(
                grad_y, x, y, mean, var, weight, sum_dy, sum_dy_xhat, ctx.eps, ctx.count, need_res
            )
        return (
            dx if need_x else None,
            dweight if need_w else None,
            dbias if need_b else None,
            d_res if need_res else None,
            *([None] * 8),
        )


def empty_affine(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The result of a channel (dim 1) norm of an input with no element: empty, in input's
    dtype and memory format, and still a function of weight and bias, which then get zero
    gradients as torch's norms give them (not none, which DDP would refuse)."""
    channel = (1, input.shape[1]) + (1,) * (input.dim() - 2)
    out = input.clone()
    if weight is not None:
        out = out * weight.view(channel).to(out.dtype)
    if bias is not None:
        out = out + bias.view(channel).to(out.dtype)
    return out


def empty_batch_norm(
    input, residual, running_mean, running_var, weight, bias, training, momentum, relu, group
) -> Tensor:
    """BatchNorm of an input with no element: torch's empty result, with (zero) gradients for
    weight, bias and the residual, running statistics untouched. Under SyncBatchNorm this rank
    still takes part in the others' collectives (the statistics' all_gather, the backward's
    all_reduce) with a count of 0, so no rank waits on it forever; its running statistics then
    take the group's, as every other rank's do."""
    out = empty_affine(input if residual is None else input + residual, weight, bias)
    out = out.clamp_min(0) if relu else out
    if not training or group is None:
        return out
    C = input.shape[1]
    zeros = input.new_zeros(C, dtype=acc_dtype(input.dtype))
    mean, var, count = sync_stats(zeros, zeros, 0, group)
    if count > 1:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    if _needs_grad(input, residual):
        out = JoinGradientSums.apply(out, C, group)
    return out


class JoinGradientSums(torch.autograd.Function):
    """Identity whose backward joins the all_reduce of BatchNormFunction's backward on the
    other ranks with zero sums: this rank's share of an empty batch."""

    @staticmethod
    def forward(ctx, out, C: int, group):
        ctx.C, ctx.group = C, group
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        zeros = grad.new_zeros(ctx.C, dtype=acc_dtype(grad.dtype))
        sync_gradient_sums(zeros, zeros, ctx.group)
        return grad, None, None


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> None:
    """torch's rule: running = (1 - momentum) * running + momentum * batch, the variance
    unbiased (count / (count - 1)). This runs on every training call: one kernel
    (batch_norm_update_running; four small in-place ops cost four launches, some 15-20 us on
    CPU), torch's in-place ops for running stats that are not plain contiguous tensors."""
    unbias = count / (count - 1)
    stats = (running_mean, running_var)
    if running_mean is None and running_var is None:
        return
    if all(map(_plain_contiguous, stats)):
        _batch_norm_update_running(mean, var, *stats, momentum, unbias)
        return
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        if running_var is not None:  # the unbiasing factor folded into the scalar
            running_var.mul_(1 - momentum).add_(var, alpha=momentum * unbias)


def _plain_contiguous(t: Tensor | None) -> bool:
    return t is None or (type(t) is torch.Tensor and t.is_contiguous())


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
    channels_last: bool,
    group=None,
) -> Tensor:
    """input, residual: (N, C, *spatial), already validated, read as channel views (NHWC ones
    when channels_last); training uses (and, when given, updates) the batch statistics, over
    all ranks of `group` when it is not None. The result has input's shape and memory format."""
    x = channel_view(input, channels_last)
    residual = None if residual is None else channel_view(residual, channels_last)
    acc = acc_dtype(x.dtype)
    weight, bias = _in_acc_or(weight, acc, x.dtype), _in_acc_or(bias, acc, x.dtype)
    if training:
        mean, var = _batch_norm_stats(x.detach())  # BatchNormFunction's backward covers them
        count = x.shape[0] * x.shape[2]
        if group is not None:
            mean, var, count = sync_stats(mean, var, count, group)
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        mean, var = _in_acc_or(running_mean, acc, x.dtype), _in_acc_or(running_var, acc, x.dtype)
        count = 0
    if _needs_grad(x, weight, bias, residual):
        return BatchNormFunction.apply(
            x, weight, bias, residual, mean, var, eps, relu, count, group, input.shape,
            channels_last,
        )  # fmt: skip
    y = _batch_norm_fwd(x, mean, var, weight, bias, residual, eps, relu)
    return from_channel_view(y, input, channels_last)
