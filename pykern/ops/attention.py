"""Attention family: scaled_dot_product_attention as two custom ops with autograd.

    pykern::attention_fwd(q, k, v, bias, scale, is_causal, dropout_p, seed) -> (out, lse)
    pykern::attention_bwd(grad_out, q, k, v, out, lse, bias, ...)            -> (dq, dk, dv)

over contiguous q (Z, Hq, L, E), k (Z, Hk, S, E), v (Z, Hk, S, Ev) (csrc/pykern.h states the
contract). pykern.functional.scaled_dot_product_attention validates, broadcasts and flattens
torch's (..., L, E) arguments into that form and turns masks into one additive bias.

Backends: csrc/cpu/attention.cpp, csrc/cuda/attention.cu, triton_kernels/attention.py.
"""

from __future__ import annotations

import numpy as np
import torch

from pykern import backends
from pykern.ops.layout import contiguous

_PHILOX_MUL = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_BUMP = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
_LOW32 = np.uint64(0xFFFFFFFF)


def dropout_threshold(dropout_p: float) -> int:
    """floor(dropout_p * 2^32): an element is dropped when its random word is below it."""
    return int(dropout_p * 4294967296.0)


def dropout_keep_mask(seed: int, Z: int, Hq: int, L: int, S: int, dropout_p: float):
    """The (Z, Hq, L, S) bool mask of kept attention elements: numpy's twin of
    csrc/common/philox.h (Philox4x32-10), which every backend uses, for tests and references."""
    zh = np.arange(Z * Hq, dtype=np.uint64)[:, None, None]
    i = np.arange(L, dtype=np.uint64)[None, :, None]
    j = np.arange(S, dtype=np.uint64)[None, None, :]
    shape = (Z * Hq, L, S)
    c0, c1 = np.broadcast_to(j, shape).copy(), np.broadcast_to(i, shape).copy()
    c2 = np.broadcast_to(zh & _LOW32, shape).copy()
    c3 = np.broadcast_to(zh >> np.uint64(32), shape).copy()
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        prod_a, prod_b = c0 * _PHILOX_MUL[0], c2 * _PHILOX_MUL[1]  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)) ^ c1 ^ k0,
            prod_b & _LOW32,
            (prod_a >> np.uint64(32)) ^ c3 ^ k1,
            prod_a & _LOW32,
        )
        k0, k1 = (k0 + _PHILOX_BUMP[0]) & _LOW32, (k1 + _PHILOX_BUMP[1]) & _LOW32
    keep = c0 >= np.uint64(dropout_threshold(dropout_p))
    return torch.from_numpy(keep.reshape(Z, Hq, L, S))


ATTENTION_FWD = backends.table("attention", "attention_fwd")
ATTENTION_BWD = backends.table("attention", "attention_bwd")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation type: of scores, lse and the additive bias."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _seeded(table: dict) -> dict:
    """The backend table with the seed passed as an int: the custom ops carry it as a 0-dim
    int64 CPU tensor, so torch.compile traces the random draw instead of baking in a constant."""

    def with_int_seed(impl):
        return lambda *args: impl(*args[:-1], int(args[-1]))

    return {name: with_int_seed(impl) for name, impl in table.items()}


_FWD = _seeded(ATTENTION_FWD)
_BWD = _seeded(ATTENTION_BWD)


@torch.library.custom_op("pykern::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (Z, Hq, L, Ev), lse (Z, Hq, L) in acc) of softmax(q k^T * scale + bias) v."""
    impl = backends.dispatch(_FWD, q.device, "attention_fwd")
    return impl(q, k, v, bias, scale, is_causal, dropout_p, seed)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, bias, scale, is_causal, dropout_p, seed):
    Z, Hq, L, _ = q.shape
    out = q.new_empty((Z, Hq, L, v.shape[-1]))
    return out, q.new_empty((Z, Hq, L), dtype=acc_dtype(q.dtype))


@torch.library.custom_op("pykern::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): the flash backward, recomputing scores from q, k and lse."""
    impl = backends.dispatch(_BWD, q.device, "attention_bwd")
    return impl(grad_out, q, k, v, out, lse, bias, scale, is_causal, dropout_p, seed)


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, bias, scale, is_causal, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_attention_fwd = backends.caller("attention_fwd", _FWD)
_attention_bwd = backends.caller("attention_bwd", _BWD)


class AttentionFunction(torch.autograd.Function):
    """Flash attention over contiguous (Z, H, L, E) operands; the bias is a constant."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, is_causal: bool, dropout_p: float, seed):
        backends.remember_backend(ctx)
        out, lse = _attention_fwd(q, k, v, bias, scale, is_causal, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, bias, seed)
        ctx.args = (scale, is_causal, dropout_p)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @backends.keeps_forward_backend
    def backward(ctx, grad_out):
        q, k, v, out, lse, bias, seed = ctx.saved_tensors
        scale, is_causal, dropout_p = ctx.args
        dq, dk, dv = _attention_bwd(
            contiguous(grad_out), q, k, v, out, lse, bias, scale, is_causal, dropout_p, seed
        )
        return dq, dk, dv, None, None, None, None, None


class NothingToAttend(torch.autograd.Function):
    """Zeros (Z, Hq, L, Ev), with zero gradients: an empty query or key sequence."""

    @staticmethod
    def forward(ctx, q, k, v, Ev: int):
        ctx.save_for_backward(q, k, v)
        return q.new_zeros((*q.shape[:3], Ev))

    @staticmethod
    def backward(ctx, grad_out):
        return *(torch.zeros_like(t) for t in ctx.saved_tensors), None


def new_seed(dropout_p: float) -> torch.Tensor:
    """The dropout seed as a 0-dim int64 CPU tensor, drawn from torch's default generator (so
    torch.manual_seed makes dropout reproducible); a constant when there is no dropout."""
    if dropout_p == 0.0:
        return torch.zeros((), dtype=torch.int64)
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)


def attention(q, k, v, bias, scale: float, is_causal: bool, dropout_p: float) -> torch.Tensor:
    """Validated flash attention of q (Z, Hq, L, E), k (Z, Hk, S, E), v (Z, Hk, S, Ev), bias
    None or (Z, Hq, L, S) in acc with any strides; -> (Z, Hq, L, Ev)."""
    Z, Hq, L, _ = q.shape
    S, Ev = k.shape[2], v.shape[3]
    if Z * Hq * L == 0 or S == 0:  # nothing to attend over: torch gives zeros
        return NothingToAttend.apply(q, k, v, Ev)
    seed = new_seed(dropout_p)
    q, k, v = contiguous(q), contiguous(k), contiguous(v)
    return AttentionFunction.apply(q, k, v, bias, scale, is_causal, dropout_p, seed)
