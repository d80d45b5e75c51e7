"""torch.autocast for pykern's ops: the same compute dtype torch's autocast picks for the
matching torch op. pykern's custom ops have no autocast kernels, so pykern.functional casts
the arguments here, at the top of each op, before validation and autograd (as torch's autocast
wrappers do, so the casts are differentiable and inputs are saved for backward in the compute
dtype).

Torch's policies (aten/src/ATen/autocast_mode.{h,cpp}; CPU measured with torch 2.14 under
torch.autocast("cpu", bfloat16) and float16):

    op                                   CUDA               CPU
    conv2d, conv_transpose2d             autocast dtype     autocast dtype
    scaled_dot_product_attention         autocast dtype     autocast dtype
    layer_norm (LayerNorm2d)             float32            input's dtype
    rms_norm                             float32 *          input's dtype
    batch_norm, pooling                  input's dtype      input's dtype

    * from torch 2.12; torch 2.11 runs rms_norm in the input's dtype (seen on an H100).

As torch does, only floating-point tensors other than float64 on the autocast's device type
are cast; anything else passes through unchanged (validation then reports it).
"""

from __future__ import annotations

import torch

LOWER = "lower"  # the autocast dtype (float16 or bfloat16)
FP32 = "fp32"

# op -> {device type: policy}; an op or device not listed runs in its inputs' dtypes.
POLICIES: dict[str, dict[str, str]] = {
    "conv2d": {"cuda": LOWER, "cpu": LOWER},
    "conv_transpose2d": {"cuda": LOWER, "cpu": LOWER},
    "scaled_dot_product_attention": {"cuda": LOWER, "cpu": LOWER},
    "layer_norm": {"cuda": FP32},
    # torch put rms_norm on its CUDA float32 list in 2.12 (pytorch#174824)
    "rms_norm": {"cuda": FP32} if torch.__version__ >= "2.12" else {},
}


def cast(op: str, *tensors):
    """The arguments of `op` in the dtype torch's autocast computes that op in (a tuple, same
    order); non-tensors and None pass through. A no-op outside torch.autocast."""
    policies = POLICIES[op]
    if not any(torch.is_autocast_enabled(kind) for kind in policies):
        return tensors  # (the common case, in a few hundred ns)
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            kind = t.device.type
            policy = policies.get(kind)
            if policy is not None and torch.is_autocast_enabled(kind):
                dtype = torch.get_autocast_dtype(kind) if policy == LOWER else torch.float32
                t = t.to(dtype)
        out.append(t)
    return tuple(out)
