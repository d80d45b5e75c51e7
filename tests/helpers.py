"""Helpers every family's tests use: targets, inputs, and the DESIGN.md tolerance rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    device: str  # "cpu" or "cuda"
    backend: str  # pykern backend in force: "auto", "cuda" or "triton"


def make_input(
    shape, dtype=torch.float32, device="cpu", layout="nchw", noncontig=False, requires_grad=False
) -> torch.Tensor:
    """Fresh random input (never zeros): layout "nchw" or "nhwc" (channels_last memory);
    noncontig takes every other element along the last dim of a wider tensor."""
    wide = list(shape)
    if noncontig:
        wide[-1] = 2 * wide[-1]
    if dtype == torch.bool:
        x = torch.rand(wide, device=device) > 0.5
    elif dtype.is_floating_point or dtype.is_complex:
        x = torch.randn(wide, dtype=dtype, device=device)
    else:
        info = torch.iinfo(dtype)
        low, high = max(info.min, -1000), min(info.max, 1000)
        x = torch.randint(low, high, wide, dtype=dtype, device=device)
    if layout == "nhwc":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    if noncontig:
        x = x[..., ::2]
    return x.requires_grad_(requires_grad)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close_to_ref(out, ref_fp64, torch_lowp=None, fp32_tol=1e-4):
    """DESIGN.md's rule: against a float64 reference, float32 (and float64) outputs land under
    fp32_tol; float16/bfloat16 outputs err at most 2x torch's own op in that precision."""
    assert out.shape == ref_fp64.shape, (out.shape, ref_fp64.shape)
    assert not torch.isnan(out).any(), "output has NaN (unwritten or wrong elements)"
    err = rel_error(out, ref_fp64)
    if out.dtype in (torch.float16, torch.bfloat16):
        assert torch_lowp is not None, "low precision needs torch's own low-precision output"
        limit = 2 * rel_error(torch_lowp, ref_fp64) + 1e-7
    else:
        limit = fp32_tol
    assert err <= limit, f"relative error {err:.3e} > {limit:.3e}"


def grads_against_torch(fn, ref_fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagates one random gradient through fn(x) and through torch's ref_fn on a copy of
    x; returns (our x.grad, torch's x.grad)."""
    x = x.detach().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = fn(x), ref_fn(x_ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    return x.grad, x_ref.grad
