"""Normalization family: LayerNorm, RMSNorm, add+LayerNorm, LayerNorm2d and BatchNorm (training,
plain and fused with add+ReLU, and eval), torch's own ops against pykern's, forward alone and
forward+backward ("_fwdbwd" ops: the input's gradient, with the parameters' too).

The cases and providers here are timed by harness.py (driven by run.py) and by bench/test_bench.py.
Row norms run on (rows, hidden) inputs (layout "rows"); LayerNorm2d and BatchNorm on NCHW and
NHWC images, each read natively by both torch and pykern (torch's LayerNorm2d is what ConvNeXt
writes: permute, layer_norm, permute).

Bytes, the floor: every tensor read once and written once per pass. Forward: x (+ residual)
read, y (+ x + residual) written. Backward: dy and x read (and y, for a ReLU's mask), dx (and
the residual's gradient) written. Per-channel vectors are negligible and not counted.
Every provider is checked against torch's op run in float64 (harness.close_check).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

import pykern.functional as PF
from pykern.bench.harness import (
    Case,
    Check,
    Provider,
    close_check,
    random_image,
    standard_providers,
)

FAMILY = "norm"


@dataclasses.dataclass(frozen=True)
class NormOp:
    name: str
    kind: str  # "row" (rows, hidden) or "image" (N, C, H, W)
    pykern: Callable  # (x, extras) -> output
    torch: Callable  # the expression a torch user writes today
    reads: int  # big tensors read and written, forward (x, residual, y ...)
    bwd_reads: int = 0  # and by the backward, for the _fwdbwd form


def _extras(x: torch.Tensor, op: str) -> dict:
    """Parameters, a residual and an output gradient for inputs like x, made once per case from
    a fixed seed and reused, so that no call pays for them: weight and bias of the normalized
    size (requiring grad), running stats, residual and dy of x's shape and layout."""
    pdt = _param_dtype(x, op)
    key = (tuple(x.shape), x.dtype, x.device, x.stride(), pdt)
    if key not in _EXTRAS:
        C = x.shape[1] if x.dim() == 4 else x.shape[-1]
        g = torch.Generator(device="cpu").manual_seed(0)

        def like_x() -> torch.Tensor:
            return torch.empty_like(x).copy_(torch.randn(x.shape, generator=g))

        _EXTRAS.clear()  # one case at a time: memory stays bounded
        _EXTRAS[key] = {
            "w": (1 + 0.1 * torch.randn(C, generator=g)).to(x.device, pdt).requires_grad_(),
            "b": (0.1 * torch.randn(C, generator=g)).to(x.device, pdt).requires_grad_(),
            "rm": torch.zeros(C, device=x.device, dtype=pdt),
            "rv": torch.ones(C, device=x.device, dtype=pdt),
            "r": like_x(),
            "dy": like_x(),
        }
    return _EXTRAS[key]


_EXTRAS: dict = {}


def _param_dtype(x: torch.Tensor, op: str) -> torch.dtype:
    # BatchNorm keeps float32 parameters for low-precision activations (as under autocast);
    # LayerNorms take the activation dtype (as a bf16 model holds them; torch's layer_norm
    # refuses bf16 input with float32 weight on CUDA).
    return torch.float32 if op.startswith("batch_norm") else x.dtype


def _ln2d_torch(x, e):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), e["w"], e["b"], 1e-6)
    return y.permute(0, 3, 1, 2)


def _bn_train(fn):
    # momentum 0: the running stats are updated (so the work is done) but stay the same
    return lambda x, e: fn(x, e["rm"], e["rv"], e["w"], e["b"], True, 0.0)


OPS = {
    op.name: op
    for op in (
        NormOp(
            "layer_norm",
            "row",
            lambda x, e: PF.layer_norm(x, x.shape[-1:], e["w"], e["b"]),
            lambda x, e: F.layer_norm(x, x.shape[-1:], e["w"], e["b"]),
            2,
            3,
        ),
        NormOp(
            "rms_norm",
            "row",
            lambda x, e: PF.rms_norm(x, x.shape[-1:], e["w"], 1e-6),
            lambda x, e: F.rms_norm(x, x.shape[-1:], e["w"], 1e-6),
            2,
            3,
        ),
        NormOp(  # a pre-norm transformer block: s = x + residual; (layer_norm(s), s)
            "add_layer_norm",
            "row",
            lambda x, e: PF.add_layer_norm(x, e["r"], x.shape[-1:], e["w"], e["b"])[0],
            lambda x, e: F.layer_norm(x + e["r"], x.shape[-1:], e["w"], e["b"]),
            4,
        ),
        NormOp(  # ConvNeXt
            "layer_norm_2d",
            "image",
            lambda x, e: PF.layer_norm_2d(x, e["w"], e["b"], 1e-6),
            _ln2d_torch,
            2,
            3,
        ),
        NormOp(
            "batch_norm_train",
            "image",
            _bn_train(PF.batch_norm),
            _bn_train(F.batch_norm),
            2,
            3,
        ),
        NormOp(  # ResNet's block tail
            "batch_norm_add_relu_train",
            "image",
            lambda x, e: PF.batch_norm_add_relu(
                x, e["r"], e["rm"], e["rv"], e["w"], e["b"], True, 0.0
            ),
            lambda x, e: F.relu(
                F.batch_norm(x, e["rm"], e["rv"], e["w"], e["b"], True, 0.0) + e["r"]
            ),
            3,
            5,
        ),
        NormOp(
            "batch_norm_eval",
            "image",
            lambda x, e: PF.batch_norm(x, e["rm"], e["rv"], e["w"], e["b"]),
            lambda x, e: F.batch_norm(x, e["rm"], e["rv"], e["w"], e["b"]),
            2,
        ),
    )
}
FWDBWD = "_fwdbwd"  # suffix of an op timed forward + backward


# Sizes. CUDA: the rows (8192, 1024..8192) in bf16; ResNet-50 stage activations at
# batch 64 for BatchNorm; ConvNeXt-T stage activations for LayerNorm2d. CPU: about 8-32 MB.
CUDA_SHAPES = {
    "row": [(8192, 1024), (8192, 4096), (8192, 8192)],
    "image": [(64, 256, 56, 56), (64, 64, 112, 112), (64, 2048, 7, 7)],
}
CUDA_QUICK_SHAPES = {"row": [(8192, 4096)], "image": [(64, 256, 56, 56)]}
CPU_SHAPES = {
    "row": [(4096, 1024), (1024, 4096), (8192, 768)],
    "image": [(32, 64, 56, 56), (16, 96, 56, 56), (32, 512, 7, 7)],
}
CPU_QUICK_SHAPES = {"row": [(4096, 1024)], "image": [(32, 64, 56, 56), (32, 512, 7, 7)]}
PYTEST_SHAPES = {"cpu": [(256, 384), (4, 32, 16, 16)], "cuda": [(8192, 1024), (64, 64, 56, 56)]}

DTYPES = {
    "cpu": [torch.float32, torch.bfloat16],
    "cuda": [torch.bfloat16, torch.float32],
}


def _spec(op: str) -> NormOp:
    return OPS[op.removesuffix(FWDBWD)]


def make_case(op: str, shape: Sequence[int], dtype: torch.dtype, layout: str) -> Case:
    spec = _spec(op)
    tensors = spec.reads + (spec.bwd_reads if op.endswith(FWDBWD) else 0)
    size = torch.empty((), dtype=dtype).element_size()
    return Case(FAMILY, op, tuple(shape), dtype, layout, tensors * math.prod(shape) * size)


def cases(
    device: str,
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> list[Case]:
    """Every (op, pass, shape, dtype, layout); given shapes are used by the ops of their rank
    (2D: row norms, 4D: image norms)."""
    if shapes is not None:
        by_rank = {2: "row", 4: "image"}
        table = {
            kind: [s for s in shapes if by_rank.get(len(s)) == kind] for kind in ("row", "image")
        }
    elif device == "cuda":
        table = CUDA_QUICK_SHAPES if quick else CUDA_SHAPES
    else:
        table = CPU_QUICK_SHAPES if quick else CPU_SHAPES
    wanted = DTYPES[device] if dtypes is None else list(dtypes)
    out = []
    for kind, kind_shapes in table.items():
        layouts = ("rows",) if kind == "row" else ("nchw", "nhwc")
        for shape in kind_shapes:
            for dtype in wanted:
                for name, spec in OPS.items():
                    if spec.kind != kind:
                        continue
                    passes = [name] + ([name + FWDBWD] if spec.bwd_reads else [])
                    for op in passes:
                        out += [make_case(op, shape, dtype, lay) for lay in layouts]
    return out


make_input = random_image


def _run(fn: Callable, fwdbwd: bool, x: torch.Tensor, e: dict) -> torch.Tensor:
    """fn's output, or for fwdbwd the gradient of x (the parameters' are computed too)."""
    if not fwdbwd:
        with torch.no_grad():
            return fn(x, e)
    x = x.detach().requires_grad_(True)
    y = fn(x, e)
    return torch.autograd.grad(y, [x, e["w"], e["b"]], e["dy"], allow_unused=True)[0]


def _provider_fn(fn: Callable, case: Case) -> Callable:
    fwdbwd = case.op.endswith(FWDBWD)
    return lambda x: _run(fn, fwdbwd, x, _extras(x, case.op))


def _format_of(x: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def check_for(case: Case) -> Check:
    """Against torch's op (or its gradient) on float64 copies of the input and extras."""
    spec = _spec(case.op)

    def check(x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> str | None:
        e64 = {
            k: v.detach().double().requires_grad_(v.requires_grad)
            for k, v in _extras(x, case.op).items()
        }
        fwdbwd = case.op.endswith(FWDBWD)
        exact = _run(spec.torch, fwdbwd, x.double(), e64)
        if spec.name == "layer_norm_2d":  # torch's permutes give NHWC strides for NCHW input,
            ref = ref.contiguous(memory_format=_format_of(out))  # pykern keeps input's: both ok
        if fwdbwd and spec.name == "batch_norm_add_relu_train":
            out, ref, exact = _off_relu_kink(x, e64, out, ref, exact)
        return close_check(x, out, ref, exact)

    return check


def _off_relu_kink(x, e64, out, ref, exact):
    """ReLU's gradient jumps at 0: where the exact pre-activation z = BN(x) + residual is within
    a few roundings of x's dtype of 0, a correct low-precision result may fall on either side
    (torch's own float32 does, one element in a million). Those elements are zeroed in all
    three gradients, so the check compares every other element."""
    with torch.no_grad():
        bn = F.batch_norm(x.double(), e64["rm"].clone(), e64["rv"].clone(), e64["w"], e64["b"],
                          True, 0.0)  # fmt: skip
        z = bn + e64["r"]
        band = 8 * torch.finfo(x.dtype).eps * (1 + bn.abs() + e64["r"].abs())
        off = z.abs() > band
    # in place on clones: each keeps its own strides, which close_check compares
    return out.clone().mul_(off), ref.clone().mul_(off), exact.clone().mul_(off)


def providers(case: Case, device: str) -> tuple[list[Provider], dict[str, str]]:
    """(providers to time, torch first; {provider: why it is skipped})."""
    spec = _spec(case.op)
    return standard_providers(
        _provider_fn(spec.torch, case), _provider_fn(spec.pykern, case), device
    )
