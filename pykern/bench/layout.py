"""Layout family: NCHW <-> NHWC conversions, torch's own expression against pykern's kernels.

The cases and providers here are timed by harness.py (driven by run.py) and by bench/test_bench.py;
the kernels measured are the permute_copy backends of pykern/ops/layout.py
(csrc/cpu/layout.cpp, csrc/cuda/layout.cu, triton_kernels/layout.py).

Each op reads its input once and writes its output once: bytes moved = 2 * numel * element size.
The input is always in the layout the op converts from, since torch and pykern both return the
input itself (no copy, nothing to time) when it is already in the target layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

import pykern.functional as PF
from pykern.bench.harness import Case, Provider, exact_check, standard_providers

FAMILY = "layout"
check = exact_check  # a layout op moves bits: anything short of bit-equal to torch is a bug


@dataclasses.dataclass(frozen=True)
class LayoutOp:
    name: str
    source: str  # memory layout of the input: "nchw" or "nhwc"
    target: str
    pykern: Callable[[torch.Tensor], torch.Tensor]
    torch: Callable[[torch.Tensor], torch.Tensor]  # the expression a torch user writes today


OPS = {
    op.name: op
    for op in (
        LayoutOp(
            "to_channels_last",
            "nchw",
            "nhwc",
            PF.to_channels_last,
            lambda x: x.contiguous(memory_format=torch.channels_last),
        ),
        LayoutOp(
            "to_channels_first",
            "nhwc",
            "nchw",
            PF.to_channels_first,
            lambda x: x.contiguous(),
        ),
        LayoutOp(
            "nchw_to_nhwc",
            "nchw",
            "nhwc",
            PF.nchw_to_nhwc,
            lambda x: x.permute(0, 2, 3, 1).contiguous(),
        ),
        LayoutOp(
            "nhwc_to_nchw",
            "nhwc",
            "nchw",
            PF.nhwc_to_nchw,
            lambda x: x.permute(0, 3, 1, 2).contiguous(),
        ),
    )
}

# (N, C, H, W). GPU: ResNet-like activations of 64 MB and more in float32, so the copy streams
# from HBM; then the awkward ones (C = 3 image batches, C = 1000 at 7x7) and small ones where
# launch and tail effects show.
CUDA_SHAPES = [
    (64, 256, 56, 56),  # ResNet-50 stage 1 at batch 64: 205 MB
    (32, 64, 224, 224),  # full-resolution 64-channel map: 411 MB
    (128, 512, 28, 28),  # stage 2: 205 MB
    (128, 1024, 14, 14),  # stage 3: 103 MB
    (256, 2048, 7, 7),  # stage 4, C much larger than H*W: 103 MB
    (128, 3, 224, 224),  # an image batch, C = 3: 77 MB
    (32, 1000, 7, 7),  # C not a multiple of 8, tiny H*W: 6.3 MB
    (8, 64, 56, 56),  # small: 6.4 MB
    (1, 256, 56, 56),  # batch-1 inference: 3.2 MB
]
CUDA_QUICK_SHAPES = [(64, 256, 56, 56), (128, 3, 224, 224), (8, 64, 56, 56)]

# CPU: roughly 8 MB to 64 MB in float32, and one of 1 MB that fits the L3.
CPU_SHAPES = [
    (4, 64, 32, 32),  # 1 MB
    (8, 64, 64, 64),  # 8.4 MB
    (16, 256, 28, 28),  # 12.8 MB
    (32, 3, 224, 224),  # C = 3: 19 MB
    (32, 1000, 7, 7),  # odd C, 7x7: 6.3 MB
    (16, 512, 28, 28),  # 25.7 MB
    (16, 64, 112, 112),  # 51 MB
]
CPU_QUICK_SHAPES = [
    (4, 64, 32, 32),
    (8, 64, 64, 64),
    (16, 256, 28, 28),
    (32, 3, 224, 224),
    (16, 64, 112, 112),
]

# test_bench.py: small enough that `pytest bench/` stays near a minute without a GPU.
PYTEST_SHAPES = {
    "cpu": [(4, 64, 32, 32), (2, 3, 224, 224)],
    "cuda": [(64, 256, 56, 56), (8, 64, 56, 56), (128, 3, 224, 224)],
}

# float16 moves the same bytes as bfloat16 through the same kernels: asked for with --dtype, it
# runs; by default it is left out, so the full GPU report fits one device call.
DTYPES = {
    "cpu": [torch.float32, torch.bfloat16],
    "cuda": [torch.float32, torch.bfloat16],
}


def make_case(op: str, shape: Sequence[int], dtype: torch.dtype) -> Case:
    spec = OPS[op]
    numel = 1
    for size in shape:
        numel *= size
    nbytes = 2 * numel * torch.empty((), dtype=dtype).element_size()
    return Case(FAMILY, op, tuple(shape), dtype, f"{spec.source}->{spec.target}", nbytes)


def cases(
    device: str,
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> list[Case]:
    """Every (op, shape, dtype) for this device, shapes outermost so one shape's rows sit
    together in the progress output."""
    if shapes is None:
        if device == "cuda":
            shapes = CUDA_QUICK_SHAPES if quick else CUDA_SHAPES
        else:
            shapes = CPU_QUICK_SHAPES if quick else CPU_SHAPES
    wanted = DTYPES[device] if dtypes is None else list(dtypes)  # asked for: taken as asked
    return [make_case(op, s, d) for s in shapes for d in wanted for op in OPS]


def make_input(case: Case, device: str) -> torch.Tensor:
    """A random input in the layout the op converts from."""
    n, c, h, w = case.shape
    if OPS[case.op].source == "nchw":
        return torch.randn(n, c, h, w, device=device, dtype=case.dtype)
    if case.op == "nhwc_to_nchw":  # a plain (N, H, W, C) tensor
        return torch.randn(n, h, w, c, device=device, dtype=case.dtype)
    nchw = torch.randn(n, c, h, w, device=device, dtype=case.dtype)
    return nchw.contiguous(memory_format=torch.channels_last)


def providers(case: Case, device: str) -> tuple[list[Provider], dict[str, str]]:
    """(providers to time, torch first; {provider: why it is skipped})."""
    spec = OPS[case.op]
    return standard_providers(spec.torch, spec.pykern, device)
