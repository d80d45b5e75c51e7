"""Pooling family: windowed pooling (max_pool2d, avg_pool2d, adaptive forms), global pooling
(over H and W) and channel pooling (over C), torch's own op against pykern's kernels, each with
NCHW and with NHWC (channels_last) inputs.

The cases and providers here are timed by harness.py (driven by run.py) and by bench/test_bench.py;
the kernels measured are the forward backends of pykern/ops/pooling.py (csrc/cpu/pooling.cpp,
csrc/cuda/pooling.cu, triton_kernels/pooling.py). Both layouts are read natively by torch and
pykern alike, so every op runs once per layout and the report's layout advice says which one
each provider prefers.

Each op reads its input once and writes its output once: bytes moved = input bytes + output
bytes (max pooling's indices are not asked for here, by torch or pykern).

A mean is not bit-equal to torch's (the float32 accumulation order
differs), so a provider is checked against torch's op run in float64 (harness.close_check);
a max is exact and passes that check only when exactly right.
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

FAMILY = "pooling"
LAYOUTS = ("nchw", "nhwc")  # the input's memory layout; the output keeps it


@dataclasses.dataclass(frozen=True)
class PoolOp:
    name: str
    over: str  # "window" (windowed pooling), "HW" (global pooling) or "C" (channel pooling)
    pykern: Callable[[torch.Tensor], torch.Tensor]
    torch: Callable[[torch.Tensor], torch.Tensor]  # the expression a torch user writes today


OPS = {
    op.name: op
    for op in (
        PoolOp(  # ResNet's stem
            "max_pool2d_3x3s2",
            "window",
            lambda x: PF.max_pool2d(x, 3, 2, 1),
            lambda x: F.max_pool2d(x, 3, 2, 1),
        ),
        PoolOp(  # DenseNet's transitions, U-Net-style downsampling
            "avg_pool2d_2x2s2",
            "window",
            lambda x: PF.avg_pool2d(x, 2),
            lambda x: F.avg_pool2d(x, 2),
        ),
        PoolOp(  # Inception-style 3x3 stride-1 average pooling branch
            "avg_pool2d_3x3s1",
            "window",
            lambda x: PF.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
            lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
        ),
        PoolOp(  # VGG-style head: any map to 7x7
            "adaptive_avg_pool2d_7",
            "window",
            lambda x: PF.adaptive_avg_pool2d(x, 7),
            lambda x: F.adaptive_avg_pool2d(x, 7),
        ),
        PoolOp(
            "adaptive_max_pool2d_7",
            "window",
            lambda x: PF.adaptive_max_pool2d(x, 7),
            lambda x: F.adaptive_max_pool2d(x, 7),
        ),
        PoolOp(
            "global_avg_pool2d",
            "HW",
            PF.global_avg_pool2d,
            lambda x: F.adaptive_avg_pool2d(x, 1),
        ),
        PoolOp(
            "global_max_pool2d",
            "HW",
            PF.global_max_pool2d,
            lambda x: F.adaptive_max_pool2d(x, 1),
        ),
        PoolOp(
            "channel_pool_avg",
            "C",
            lambda x: PF.channel_pool(x, "avg"),
            lambda x: x.mean(1, keepdim=True),
        ),
        PoolOp(
            "channel_pool_max",
            "C",
            lambda x: PF.channel_pool(x, "max"),
            lambda x: x.amax(1, keepdim=True),
        ),
    )
}

# (N, C, H, W), per kind of pooling. GPU: global pooling where networks do it, at the end of
# ResNet-50 (C = 2048, 7x7: H*W much smaller than C) and on larger, earlier maps; channel
# pooling as CBAM's spatial attention does it, on stage 1 to 3 activations. float32 sizes.
CUDA_SHAPES = {
    "window": [
        (64, 64, 112, 112),  # ResNet-50 stem output at batch 64: 205 MB
        (64, 256, 56, 56),  # stage 1: 205 MB
        (64, 512, 28, 28),  # stage 2: 103 MB
    ],
    "HW": [
        (64, 2048, 7, 7),  # ResNet-50 stage 4 at batch 64: 25.7 MB
        (256, 2048, 7, 7),  # the same at batch 256: 103 MB
        (64, 512, 28, 28),  # stage 2: 103 MB
        (64, 64, 112, 112),  # stem output, H*W = 12544: 205 MB
    ],
    "C": [
        (64, 256, 56, 56),  # stage 1: 205 MB
        (64, 1024, 14, 14),  # stage 3: 51 MB
        (64, 64, 112, 112),  # stem output, few channels: 205 MB
    ],
}
CUDA_QUICK_SHAPES = {
    "window": [(64, 64, 112, 112)],
    "HW": [(64, 2048, 7, 7), (64, 64, 112, 112)],
    "C": [(64, 256, 56, 56), (64, 1024, 14, 14)],
}

# CPU: 8 MB to 64 MB in float32, and one of 1 MB that fits the L3; the same for every kind.
# Nine ops, two layouts, two dtypes, four shapes: 144 cases, about three minutes.
CPU_SHAPES = [
    (32, 2048, 7, 7),  # 12.8 MB, C much larger than H*W
    (16, 256, 28, 28),  # 12.8 MB
    (8, 64, 112, 112),  # 25.7 MB, H*W much larger than C
    (4, 64, 32, 32),  # 1 MB
]
CPU_QUICK_SHAPES = [(32, 2048, 7, 7), (8, 64, 112, 112), (4, 64, 32, 32)]

# test_bench.py: small enough that `pytest bench/` stays near a minute or two without a GPU.
PYTEST_SHAPES = {
    "cpu": [(4, 64, 32, 32)],
    "cuda": [(64, 64, 112, 112), (64, 2048, 7, 7)],
}

# float16 moves the same bytes as bfloat16 through the same kernels: asked for with --dtype, it
# runs; by default it is left out, so the full GPU report fits one device call.
DTYPES = {
    "cpu": [torch.float32, torch.bfloat16],
    "cuda": [torch.float32, torch.bfloat16],
}


def make_case(op: str, shape: Sequence[int], dtype: torch.dtype, layout: str) -> Case:
    out_numel = OPS[op].torch(torch.empty(shape, device="meta")).numel()  # torch's own shape
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = (math.prod(shape) + out_numel) * size  # input read once, output written once
    return Case(FAMILY, op, tuple(shape), dtype, layout, nbytes)


def _default_shapes(device: str, quick: bool) -> dict[str, list[tuple[int, ...]]]:
    if device == "cuda":
        return CUDA_QUICK_SHAPES if quick else CUDA_SHAPES
    shapes = CPU_QUICK_SHAPES if quick else CPU_SHAPES
    return {"window": shapes, "HW": shapes, "C": shapes}


def cases(
    device: str,
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> list[Case]:
    """Every (op, shape, dtype, layout) for this device; shapes given are used for every op.
    Shapes outermost (windowed, global, then channel pooling's), so one shape's rows sit
    together in the progress output."""
    if shapes is None:
        by_kind = _default_shapes(device, quick)
    else:
        by_kind = {"window": shapes, "HW": shapes, "C": shapes}
    wanted = DTYPES[device] if dtypes is None else list(dtypes)  # asked for: taken as asked
    return [
        make_case(op, s, d, layout)
        for over, kind_shapes in by_kind.items()
        for s in kind_shapes
        for d in wanted
        for op, spec in OPS.items()
        if spec.over == over
        for layout in LAYOUTS
    ]


make_input = random_image


def check_for(case: Case) -> Check:
    """Against torch's op on the input in float64, within torch's own error (close_check)."""
    reference = OPS[case.op].torch

    def check(x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> str | None:
        return close_check(x, out, ref, reference(x.double()))

    return check


def providers(case: Case, device: str) -> tuple[list[Provider], dict[str, str]]:
    """(providers to time, torch first; {provider: why it is skipped})."""
    spec = OPS[case.op]
    return standard_providers(spec.torch, spec.pykern, device)
