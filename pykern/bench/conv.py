"""Convolution family: the layers the issue names (ResNet-50's 7x7 stem, 1x1 and 3x3 layers, a
segmentation head's dilated 3x3, a depthwise 3x3, DCGAN's 4x4 stride-2 transposed convolution),
torch's conv (cuDNN on GPU, oneDNN on CPU) against pykern's, NCHW and NHWC, forward and
forward+backward ("_fwdbwd": the input, weight and bias gradients of one random output
gradient).

A case's shape is the input's (N, C, H, W); its layer (weight shape and arguments) is named by
the op. Each case carries its multiply-adds (2 flops each), so the report gives TFLOP/s and the
share of the matmul rate measured in the same run; its bytes are each tensor read or written
once. Checked against torch's op in float64 (harness.close_check: float32 within 2x torch's
own error, which on a GPU is TF32's).
"""

from __future__ import annotations

import dataclasses
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
from pykern.ops.conv import conv_out_size

FAMILY = "conv"
LAYOUTS = ("nchw", "nhwc")
FWDBWD = "_fwdbwd"


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    in_chw: tuple[int, int, int]
    weight: tuple[int, int, int, int]
    kw: dict
    transpose: bool = False

    def out_shape(self, n: int) -> tuple[int, int, int, int]:
        C, H, W = self.in_chw
        s, p = self.kw.get("stride", 1), self.kw.get("padding", 0)
        d = self.kw.get("dilation", 1)
        R, S = self.weight[2:]
        if self.transpose:
            K = self.weight[1] * self.kw.get("groups", 1)
            return (
                n,
                K,
                (H - 1) * s - 2 * p + d * (R - 1) + 1,
                (W - 1) * s - 2 * p + d * (S - 1) + 1,
            )
        return n, self.weight[0], conv_out_size(H, R, s, p, d), conv_out_size(W, S, s, p, d)

    def macs(self, n: int) -> int:
        """Multiply-adds of the forward pass (each output or input element's window)."""
        K, Cg, R, S = self.weight
        if self.transpose:  # every input element meets every tap of its group's outputs
            return n * self.in_chw[1] * self.in_chw[2] * K * Cg * R * S
        _, k, ho, wo = self.out_shape(n)
        return n * k * ho * wo * Cg * R * S


LAYERS = {
    layer.name: layer
    for layer in (
        Layer("conv7x7s2_stem", (3, 224, 224), (64, 3, 7, 7), dict(stride=2, padding=3)),
        Layer("conv1x1_256to64", (256, 56, 56), (64, 256, 1, 1), {}),
        Layer("conv3x3_64", (64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
        Layer("conv1x1_1024to256", (1024, 14, 14), (256, 1024, 1, 1), {}),
        Layer("conv3x3_256", (256, 14, 14), (256, 256, 3, 3), dict(padding=1)),
        Layer("conv3x3_dil2", (256, 28, 28), (256, 256, 3, 3), dict(padding=2, dilation=2)),
        Layer("conv3x3_dil4", (256, 28, 28), (256, 256, 3, 3), dict(padding=4, dilation=4)),
        Layer("conv3x3_depthwise", (256, 56, 56), (256, 1, 3, 3), dict(padding=1, groups=256)),
        Layer(
            "conv_transpose4x4s2",
            (256, 16, 16),
            (256, 128, 4, 4),
            dict(stride=2, padding=1),
            transpose=True,
        ),  # fmt: skip
    )
}
QUICK_LAYERS = ("conv1x1_256to64", "conv3x3_64", "conv_transpose4x4s2")

BATCH = {"cuda": 32, "cpu": 2}  # ResNet-50 at batch 32 on a GPU; a small batch on a CPU
PYTEST_SHAPES = {"cpu": [(1,)], "cuda": [(8,)]}  # for this family: batch sizes, see cases()
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}


def _layer(op: str) -> Layer:
    return LAYERS[op.removesuffix(FWDBWD)]


def make_case(op: str, n: int, dtype: torch.dtype, layout: str) -> Case:
    layer = _layer(op)
    size = torch.empty((), dtype=dtype).element_size()
    x = n * layer.in_chw[0] * layer.in_chw[1] * layer.in_chw[2]
    w = layer.weight[0] * layer.weight[1] * layer.weight[2] * layer.weight[3]
    y = n * layer.out_shape(n)[1] * layer.out_shape(n)[2] * layer.out_shape(n)[3]
    nbytes, flops = (x + w + y) * size, 2 * layer.macs(n)
    if op.endswith(FWDBWD):  # + grad_input (reads dy, w; writes dx), grad_weight (dy, x; dw)
        nbytes, flops = nbytes + 2 * (x + w + y) * size, 3 * flops
    return Case(FAMILY, op, (n, *layer.in_chw), dtype, layout, nbytes, flops)


def cases(
    device: str,
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> list[Case]:
    """Every (layer, pass, dtype, layout). `shapes`, for this family, are (N,) batch sizes, each
    used with every layer's own C, H and W."""
    batches = [BATCH[device]] if shapes is None else [s[0] for s in shapes]
    names = QUICK_LAYERS if quick else tuple(LAYERS)
    wanted = DTYPES[device] if dtypes is None else list(dtypes)
    return [
        make_case(name + suffix, n, dtype, layout)
        for n in batches
        for dtype in wanted
        for name in names
        for suffix in ("", FWDBWD)
        for layout in LAYOUTS
    ]


make_input = random_image


_PARAMS: dict = {}


def _params(x: torch.Tensor, layer: Layer) -> dict:
    """Weight, bias and output gradient for inputs like x, made once per case (a fixed seed),
    the weight in x's memory format, as a model converted with .to(memory_format=...) has it."""
    key = (layer.name, tuple(x.shape), x.dtype, x.device, x.stride())
    if key not in _PARAMS:
        g = torch.Generator(device="cpu").manual_seed(0)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
        w = torch.randn(layer.weight, generator=g) * (layer.weight[1] * 9) ** -0.5
        out_channels = layer.out_shape(1)[1]
        dy = torch.randn(layer.out_shape(x.shape[0]), generator=g)
        _PARAMS.clear()  # one case at a time: memory stays bounded
        _PARAMS[key] = {
            "w": w.to(x.device, x.dtype).contiguous(memory_format=fmt or torch.contiguous_format)
            .requires_grad_(),
            "b": (0.1 * torch.randn(out_channels, generator=g)).to(x.device, x.dtype)
            .requires_grad_(),
            "dy": dy.to(x.device, x.dtype).contiguous(memory_format=fmt or torch.contiguous_format),
        }  # fmt: skip
    return _PARAMS[key]


def _run(conv: Callable, layer: Layer, fwdbwd: bool, x: torch.Tensor, p: dict) -> torch.Tensor:
    """The output, or for fwdbwd the input gradient (the weight's and bias's are computed too)."""
    if not fwdbwd:
        with torch.no_grad():
            return conv(x, p["w"], p["b"], **layer.kw)
    x = x.detach().requires_grad_(True)
    y = conv(x, p["w"], p["b"], **layer.kw)
    return torch.autograd.grad(y, [x, p["w"], p["b"]], p["dy"])[0]


def _provider_fn(library: str, case: Case) -> Callable:
    layer = _layer(case.op)
    if layer.transpose:
        conv = PF.conv_transpose2d if library == "pykern" else F.conv_transpose2d
    else:
        conv = PF.conv2d if library == "pykern" else F.conv2d
    fwdbwd = case.op.endswith(FWDBWD)
    return lambda x: _run(conv, layer, fwdbwd, x, _params(x, layer))


def check_for(case: Case) -> Check:
    """Against torch's op (or its input gradient) on float64 copies of input and parameters."""
    layer = _layer(case.op)

    def check(x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> str | None:
        p = _params(x, layer)
        p64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in p.items()}
        conv = F.conv_transpose2d if layer.transpose else F.conv2d
        exact = _run(conv, layer, case.op.endswith(FWDBWD), x.double(), p64)
        return close_check(x, out, ref, exact)

    return check


def providers(case: Case, device: str) -> tuple[list[Provider], dict[str, str]]:
    """(providers to time, torch first; {provider: why it is skipped})."""
    return standard_providers(_provider_fn("torch", case), _provider_fn("pykern", case), device)
