"""`python -m pykern demo`: runs every op on the best device present, against torch.

Each op runs on every backend that can run there (cpu reference; cuda and triton on a GPU)
with fresh random inputs in both layouts, and is compared with torch's own op: layout ops bit
for bit with torch's strides, pooling within DESIGN.md's error bound. The exit code is non-zero
when any result differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pykern
import pykern.functional as PF
from pykern import backends

# op name -> (pykern function, torch function, input memory format)
CASES = {
    "to_channels_last": (
        PF.to_channels_last,
        lambda x: x.contiguous(memory_format=torch.channels_last),
        torch.contiguous_format,
    ),
    "to_channels_first": (PF.to_channels_first, lambda x: x.contiguous(), torch.channels_last),
    "nchw_to_nhwc": (
        PF.nchw_to_nhwc,
        lambda x: x.permute(0, 2, 3, 1).contiguous(),
        torch.contiguous_format,
    ),
    "nhwc_to_nchw": (
        PF.nhwc_to_nchw,
        lambda x: x.permute(0, 3, 1, 2).contiguous(),
        torch.contiguous_format,
    ),
}
# Pooling reduces in another order than torch: checked by relative error against torch's op in
# float64, within DESIGN.md's bound for the dtype (float32) or torch's own low-precision error x2.
POOLING = {
    "global_avg_pool2d": (PF.global_avg_pool2d, lambda x: F.adaptive_avg_pool2d(x, 1)),
    "global_max_pool2d": (PF.global_max_pool2d, lambda x: F.adaptive_max_pool2d(x, 1)),
    "channel_pool(avg)": (lambda x: PF.channel_pool(x, "avg"), lambda x: x.mean(1, keepdim=True)),
    "channel_pool(max)": (lambda x: PF.channel_pool(x, "max"), lambda x: x.amax(1, keepdim=True)),
}
SHAPES = [(8, 64, 56, 56), (3, 17, 9, 33), (16, 3, 224, 224)]
DTYPES = [torch.float32, torch.bfloat16]


def _backends_for(device: str) -> list[str]:
    if device == "cpu":
        return ["auto"]
    names = ["triton"]
    if pykern.has_cuda():
        names.insert(0, "cuda")
    return names


def _close(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor) -> bool:
    def err(t):
        return ((t.double() - ref64).norm() / ref64.norm()).item()

    bound = 1e-4 if out.dtype == torch.float32 else 2 * err(torch_out) + 1e-7
    return out.shape == torch_out.shape and err(out) <= bound


def run(device: str | None = None) -> bool:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
    print(f"pykern demo on {device}{gpu}")
    all_ok = True
    for backend in _backends_for(device):
        with pykern.use_backend(backend):
            impl = backends.pick(torch.device(device), "permute_copy")
            for op, (fn, ref_fn, fmt) in CASES.items():
                for shape in SHAPES:
                    for dtype in DTYPES:
                        x = torch.randn(shape, device=device).to(dtype)
                        x = x.contiguous(memory_format=fmt)
                        out, ref = fn(x), ref_fn(x)
                        ok = torch.equal(out, ref) and out.stride() == ref.stride()
                        all_ok &= ok
                        name = str(dtype).removeprefix("torch.")
                        verdict = "ok  " if ok else "FAIL"
                        print(f"  {verdict} {impl:7s} {op:18s} {str(shape):18s} {name}")
            for op, (fn, ref_fn) in POOLING.items():
                for fmt in (torch.contiguous_format, torch.channels_last):
                    for dtype in DTYPES:
                        x = torch.randn(SHAPES[0], device=device).to(dtype)
                        x = x.contiguous(memory_format=fmt)
                        ok = _close(fn(x), ref_fn(x.double()), ref_fn(x))
                        all_ok &= ok
                        name = str(dtype).removeprefix("torch.")
                        layout = "nhwc" if fmt == torch.channels_last else "nchw"
                        verdict = "ok  " if ok else "FAIL"
                        print(f"  {verdict} {impl:7s} {op:18s} {layout:18s} {name}")
    print("all results match torch" if all_ok else "SOME RESULTS DIFFER FROM TORCH")
    return all_ok
