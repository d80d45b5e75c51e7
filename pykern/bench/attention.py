"""Attention family: scaled_dot_product_attention, pykern's kernels against each of torch's own
backends (flash, cuDNN, memory-efficient, math: those that run the case), forward and
forward+backward, causal and not, over the sequence length; plus peak memory per provider.

The cases and providers here are timed by harness.py (driven by run.py) and by
bench/test_bench.py; the kernels measured are those of pykern/ops/attention.py
(csrc/cpu/attention.cpp, csrc/cuda/attention.cu, triton_kernels/attention.py), called through
pykern.functional.scaled_dot_product_attention with torch's signature.

GPU cases (issue 6): bfloat16, head dim 64 and 128, sequence 512 to 16k at 16k tokens per batch
(batch = 16384 / L), heads = 2048 / head dim, self-attention (L = S). CPU cases: float32, head
dim 64, one sequence of 256 to 2048, 4 heads (2 with --quick).

FLOPs (FlashAttention's count): 4 * B * H * L * S * E forward, halved when causal; the backward
2.5x the forward, so forward+backward is 3.5x. Bytes: q, k, v read and out written (forward);
forward+backward adds dout, q, k, v, out read and dq, dk, dv written.

The reference provider (what "vs torch" divides by) is torch's flash backend where it runs the
case, else the first of torch's backends that does. Every provider is checked against torch's
attention computed in float32 (GPU: the memory-efficient backend, linear memory; CPU: float64):
its relative error at most 2x that of torch's reference provider (DESIGN.md's rule). The output
of forward+backward is dq (dk and dv are computed too).

A case's input is q, k and v packed in one (3, B, H, L, E) tensor, so the harness rotates them
together; each provider unpacks views.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pykern.bench.harness import (
    FWDBWD,
    Case,
    Check,
    Provider,
    error_bound,
    pykern_backends,
    relative_error,
)

FAMILY = "attention"
LAYOUT = "bhle"  # (batch, heads, sequence, head dim), contiguous: torch's own convention
OPS = ("sdpa", "sdpa_causal")
ALIASES = {"scaled_dot_product_attention": OPS}  # --ops words meaning several ops

TOKENS = 16384  # per batch on a GPU: batch = TOKENS // L
MODEL_DIM = 2048  # heads * head dim on a GPU
CUDA_SEQ = (512, 1024, 2048, 4096, 8192, 16384)
CUDA_QUICK_SEQ = (1024, 4096, 16384)
CUDA_HEAD_DIMS = (64, 128)
CPU_SEQ = (256, 512, 1024, 2048)
CPU_HEADS, CPU_QUICK_HEADS, CPU_HEAD_DIM = 4, 2, 64
MEMORY_SEQ = (4096, 16384, 65536)  # peak memory, GPU only: one sequence, 16 heads of 128
MATH_SCORE_BYTES_CAP = 4 << 30  # torch's math path materializes B*H*L*S scores: skip above

# test_bench.py: (B, H, L, E) per device.
PYTEST_SHAPES = {"cpu": [(1, 2, 256, 64)], "cuda": [(4, 16, 4096, 128), (1, 16, 16384, 128)]}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16]}

# torch's backends, in the order tried for the reference: flash first (issue 6's yardstick).
TORCH_BACKENDS = {
    "torch-flash": "FLASH_ATTENTION",
    "torch-cudnn": "CUDNN_ATTENTION",
    "torch-efficient": "EFFICIENT_ATTENTION",
    "torch-math": "MATH",
}


def available() -> str | None:
    """None when pykern has scaled_dot_product_attention, else why the family cannot run."""
    try:
        import pykern.functional as PF
    except Exception as err:  # a broken install: say so rather than fail the whole run
        return f"import pykern.functional failed: {err}"
    if not hasattr(PF, "scaled_dot_product_attention"):
        return "pykern.functional has no scaled_dot_product_attention in this build"
    return _built()


@functools.cache
def _built() -> str | None:
    """None when pykern's attention runs a tiny CPU call; why not when its kernels are missing
    from this build (any other failure is left to the cases, which report it as an error)."""
    import pykern.functional as PF

    q = torch.randn(1, 1, 4, 8)
    try:
        PF.scaled_dot_product_attention(q, q, q)
    except (AttributeError, ImportError, NotImplementedError) as err:
        return f"pykern's attention kernels are not in this build ({type(err).__name__}: {err})"
    except Exception:
        return None
    return None


def causal_of(case: Case) -> bool:
    return case.base_op == "sdpa_causal"


def flops(B: int, H: int, L: int, S: int, E: int, causal: bool, fwdbwd: bool) -> int:
    forward = 4 * B * H * L * S * E // (2 if causal else 1)
    return int(forward * 3.5) if fwdbwd else forward


def make_case(op: str, shape: Sequence[int], dtype: torch.dtype) -> Case:
    B, H, L, E = shape
    fwdbwd = op.endswith(FWDBWD)
    size = torch.empty((), dtype=dtype).element_size()
    tensor = B * H * L * E * size
    nbytes = 4 * tensor + (8 * tensor if fwdbwd else 0)
    causal = op.removesuffix(FWDBWD) == "sdpa_causal"
    return Case(
        FAMILY, op, tuple(shape), dtype, LAYOUT, nbytes, flops(B, H, L, L, E, causal, fwdbwd)
    )


def default_shapes(device: str, quick: bool) -> list[tuple[int, int, int, int]]:
    if device == "cuda":
        seqs = CUDA_QUICK_SEQ if quick else CUDA_SEQ
        return [(TOKENS // L, MODEL_DIM // E, L, E) for E in CUDA_HEAD_DIMS for L in seqs]
    heads = CPU_QUICK_HEADS if quick else CPU_HEADS
    return [(1, heads, L, CPU_HEAD_DIM) for L in CPU_SEQ]


def cases(
    device: str,
    quick: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> list[Case]:
    """Every (shape, dtype, causal, pass): shapes are (B, H, L, E), self-attention."""
    if available() is not None:
        return []
    shapes = default_shapes(device, quick) if shapes is None else shapes
    wanted = DTYPES[device] if dtypes is None else list(dtypes)
    return [
        make_case(op + suffix, tuple(s), d)
        for d in wanted
        for s in shapes
        for op in OPS
        for suffix in ("", FWDBWD)
    ]


def make_input(case: Case, device: str) -> torch.Tensor:
    """q, k and v, random, packed as (3, B, H, L, E)."""
    return torch.randn((3, *case.shape), device=device, dtype=case.dtype)


_GRADS: dict = {}


def _dout(q: torch.Tensor) -> torch.Tensor:
    """A fixed random output gradient for outputs like q (made once per shape)."""
    key = (tuple(q.shape), q.dtype, q.device)
    if key not in _GRADS:
        g = torch.Generator(device="cpu").manual_seed(1)
        _GRADS.clear()
        _GRADS[key] = torch.randn(q.shape, generator=g).to(q.device, q.dtype)
    return _GRADS[key]


def _run(
    sdpa: Callable, causal: bool, fwdbwd: bool, x: torch.Tensor, dout: torch.Tensor | None = None
) -> torch.Tensor:
    """sdpa's output on the packed q, k, v; for fwdbwd dq (dk and dv are computed too)."""
    if not fwdbwd:
        with torch.no_grad():
            return sdpa(x[0], x[1], x[2], is_causal=causal)
    q, k, v = (t.detach().requires_grad_(True) for t in (x[0], x[1], x[2]))
    out = sdpa(q, k, v, is_causal=causal)
    dout = _dout(out) if dout is None else dout
    return torch.autograd.grad(out, (q, k, v), dout)[0]


def _pykern_sdpa(q, k, v, is_causal=False):
    import pykern.functional as PF

    return PF.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _kernel_context(backend_name: str) -> Callable[[], contextlib.AbstractContextManager]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return functools.partial(sdpa_kernel, [getattr(SDPBackend, backend_name)])


@functools.cache
def _torch_backend_runs(
    backend_name: str, device: str, dtype: torch.dtype, E: int, causal: bool, fwdbwd: bool
) -> str | None:
    """None when torch's backend runs attention of this kind here (tried on a small case), else
    torch's reason."""
    try:
        from torch.nn.attention import SDPBackend  # noqa: F401
    except ImportError as err:
        return f"torch.nn.attention.sdpa_kernel unavailable: {err}"
    x = torch.randn(3, 1, 2, 128, E, device=device, dtype=dtype)
    try:
        with _kernel_context(backend_name)():
            _run(F.scaled_dot_product_attention, causal, fwdbwd, x)
    except Exception as err:
        return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return None


def torch_providers(
    device: str, dtype: torch.dtype, shape: Sequence[int], causal: bool, fwdbwd: bool
) -> tuple[list[Provider], dict[str, str]]:
    """torch's backends that run this case here (flash first), and why the others do not."""
    B, H, L, E = shape
    ready, skipped = [], {}
    for name, backend_name in TORCH_BACKENDS.items():
        why = _torch_backend_runs(backend_name, device, dtype, E, causal, fwdbwd)
        if why is None and backend_name == "MATH" and B * H * L * L * 4 > MATH_SCORE_BYTES_CAP:
            why = f"the math path would materialize {B * H * L * L * 4 / 2**30:.0f} GiB of scores"
        if why is not None:
            skipped[name] = why
            continue
        fn = functools.partial(_run, F.scaled_dot_product_attention, causal, fwdbwd)
        ready.append(Provider(name, fn, context=_kernel_context(backend_name)))
    return ready, skipped


def providers(case: Case, device: str) -> tuple[list[Provider], dict[str, str]]:
    """(providers to time, the reference first; {provider: why it is skipped})."""
    causal, fwdbwd = causal_of(case), case.pass_ == "fwdbwd"
    ready, skipped = torch_providers(device, case.dtype, case.shape, causal, fwdbwd)
    backends, why = pykern_backends(device)
    skipped.update(why)
    fn = functools.partial(_run, _pykern_sdpa, causal, fwdbwd)
    for backend in backends:
        ready.append(Provider(f"pykern-{backend}", fn, "auto" if backend == "cpu" else backend))
    return ready, skipped


def exact_result(case: Case, x: torch.Tensor) -> torch.Tensor:
    """torch's attention on x in float32 (GPU, memory-efficient backend: linear memory) or
    float64 (CPU), the 'exact' result errors are measured against."""
    causal, fwdbwd = causal_of(case), case.pass_ == "fwdbwd"
    wide = torch.float32 if x.device.type == "cuda" else torch.float64
    dout = _dout(x[0]).to(wide) if fwdbwd else None  # the providers' dout, widened
    if x.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return _run(F.scaled_dot_product_attention, causal, fwdbwd, x.to(wide), dout)
    return _run(F.scaled_dot_product_attention, causal, fwdbwd, x.to(wide), dout)


_EXACT: dict = {}


def _exact_for(case: Case, x: torch.Tensor) -> torch.Tensor:
    key = (case, x.data_ptr())
    if key not in _EXACT:
        _EXACT.clear()  # one case at a time
        _EXACT[key] = exact_result(case, x)
    return _EXACT[key]


def check_for(case: Case) -> Check:
    """Values only (torch's flash backend may hand back (B, L, H, E)-strided outputs), within
    2x the reference provider's own error against the float32/float64 result."""

    def check(x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> str | None:
        if out.shape != ref.shape:
            return f"shape {tuple(out.shape)} differs from torch's {tuple(ref.shape)}"
        if out.dtype != ref.dtype:
            return f"dtype {out.dtype} differs from torch's {ref.dtype}"
        exact = _exact_for(case, x)
        error, allowed = relative_error(out, exact), error_bound(ref, exact)
        if not error <= allowed:
            return f"relative error {error:.3g} against float32 exceeds {allowed:.3g}"
        return None

    return check


def extra_for(case: Case) -> Callable:
    """Each provider's relative error against the exact result, kept in its record."""

    def extra(provider: Provider, x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> dict:
        return {"rel_error": relative_error(out, _exact_for(case, x)), "causal": causal_of(case)}

    return extra


def measure_memory(
    device: str,
    seqs: Sequence[int] = MEMORY_SEQ,
    dtype: torch.dtype = torch.bfloat16,
    heads: int = 16,
    head_dim: int = 128,
    backends: Sequence[str] | None = None,
    passes: Sequence[str] = ("fwd", "fwdbwd"),
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Peak memory of one call per provider and sequence length (batch 1, not causal), forward
    and forward+backward: torch.cuda.max_memory_allocated during the call, less what was
    allocated before it (the inputs, and dout), less the outputs (out; dq, dk, dv), i.e. the
    extra memory the kernel needs. A second call is measured (the first autotunes)."""
    rows = []
    if device != "cuda":
        return rows
    for L in seqs:
        for fwdbwd in [p == "fwdbwd" for p in passes]:
            shape = (1, heads, L, head_dim)
            ready, skipped = torch_providers(device, dtype, shape, False, fwdbwd)
            pk, why = pykern_backends(device)
            skipped.update(why)
            fn = functools.partial(_run, _pykern_sdpa, False, fwdbwd)
            ready += [Provider(f"pykern-{b}", fn, b) for b in pk]
            for provider in ready:
                if backends is not None and _backend_word(provider.name) not in backends:
                    continue
                if progress:
                    progress(f"memory {provider.name} L={L} {'fwdbwd' if fwdbwd else 'fwd'}")
                rows.append(_peak(provider, shape, dtype, fwdbwd))
            for name, reason in skipped.items():
                if backends is not None and _backend_word(name) not in backends:
                    continue
                rows.append(
                    {"provider": name, "seq": L, "pass": "fwdbwd" if fwdbwd else "fwd",
                     "heads": heads, "head_dim": head_dim, "dtype": str(dtype)[6:],
                     "status": "skipped", "reason": reason}
                )  # fmt: skip
    return rows


def _backend_word(name: str) -> str:
    return "torch" if name.startswith("torch") else name.removeprefix("pykern-")


def _peak(provider: Provider, shape: tuple, dtype: torch.dtype, fwdbwd: bool) -> dict:
    B, H, L, E = shape
    row = {
        "provider": provider.name,
        "seq": L,
        "pass": "fwdbwd" if fwdbwd else "fwd",
        "heads": H,
        "head_dim": E,
        "dtype": str(dtype).removeprefix("torch."),
    }
    tensor_bytes = B * H * L * E * dtype.itemsize
    x = None
    try:
        torch.cuda.empty_cache()
        x = torch.randn((3, *shape), device="cuda", dtype=dtype)
        if fwdbwd:
            _dout(x[0])
        with provider.active():
            provider.fn(x)  # warm-up: compile, autotune
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = provider.fn(x)
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        outputs = tensor_bytes * (4 if fwdbwd else 1)  # out; with the backward dq, dk, dv too
        row.update(
            status="ok",
            inputs_bytes=3 * tensor_bytes + (tensor_bytes if fwdbwd else 0),
            outputs_bytes=outputs,
            peak_bytes=peak,
            extra_bytes=max(0, peak - before - outputs),
        )
    except torch.OutOfMemoryError as err:
        row.update(status="out of memory", reason=str(err).splitlines()[0][:200])
    except Exception as err:
        row.update(status="error", reason=f"{type(err).__name__}: {err}"[:300])
    finally:
        del x
        _GRADS.clear()
        torch.cuda.empty_cache()
    return row
