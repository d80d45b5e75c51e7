"""`python -m pykern demo`: runs every op on the best device present, against torch.

Each op runs on every backend that can run there (cpu reference; cuda and triton on a GPU)
with fresh random inputs in both layouts, and is compared with torch's own op. The exit code
is non-zero when any result differs.
"""

from __future__ import annotations

import torch

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
SHAPES = [(8, 64, 56, 56), (3, 17, 9, 33), (16, 3, 224, 224)]
DTYPES = [torch.float32, torch.bfloat16]


def _backends_for(device: str) -> list[str]:
    if device == "cpu":
        return ["auto"]
    names = ["triton"]
    if pykern.has_cuda():
        names.insert(0, "cuda")
    return names


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
    print("all results equal torch's" if all_ok else "SOME RESULTS DIFFER FROM TORCH")
    return all_ok
