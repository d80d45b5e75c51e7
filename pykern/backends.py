"""Which implementation runs an op: the backend setting and the per-call choice.

The setting is "auto" (default), "cuda" or "triton"; it comes from, in order of precedence, an
enclosing `use_backend(...)` block, `set_backend(...)`, then the PYKERN_BACKEND environment
variable. It selects among GPU implementations; CPU tensors run the C++ reference, except
that with backend "triton" and TRITON_INTERPRET=1 they run the Triton kernels in Triton's
interpreter (how CI tests every Triton kernel without a GPU).

A gradient runs on the backend its forward ran on (`remember_backend` /
`keeps_forward_backend` on every autograd Function), as torch's own backward kernels follow
their forward's choice. This matters beyond taste: autograd runs the backward of CUDA tensors
on its own device thread, which sees no `use_backend` block of the thread that ran the forward.
Under torch.compile the choice is made when the compiled graph runs, in the thread that runs
it: a compiled backward on a GPU sees `set_backend` and PYKERN_BACKEND, not `use_backend`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from pykern import _ext

BACKENDS = ("auto", "cuda", "triton")

# What "auto" picks on a CUDA tensor, per op, from the benchmark (bench/results/). An op not
# listed uses the CUDA kernels when compiled in, else Triton.
AUTO_CHOICE: dict[str, str] = {}


class _ThreadState(threading.local):
    """Each thread's stack of use_backend blocks (innermost last). An attribute every thread
    has: getattr with a default on a missing thread-local attribute costs a microsecond."""

    def __init__(self) -> None:
        self.stack: list[str] = []


_state = _ThreadState()
_global_backend: str | None = None


def _check_name(name: object, argument: str = "backend") -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{argument} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Sets the backend for every later call (all threads): "auto", "cuda" or "triton"."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The backend in force here: innermost use_backend, else set_backend, else PYKERN_BACKEND."""
    stack = _state.stack
    if stack:
        return stack[-1]
    if _global_backend is not None:
        return _global_backend
    return _env_backend(os.environ.get("PYKERN_BACKEND", "auto"))


@functools.lru_cache(maxsize=8)
def _env_backend(value: str) -> str:
    """PYKERN_BACKEND's value checked, once per value (every call reads it)."""
    return _check_name(value, "PYKERN_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: run the enclosed calls (this thread) with the given backend."""
    name = _check_name(name)
    stack = _state.stack
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def remember_backend(ctx) -> None:
    """In an autograd Function's forward: records the backend in force, for its backward
    (see keeps_forward_backend). None while torch.compile traces the forward: a compiled
    graph picks its backend when it runs."""
    ctx.backend = None if torch.compiler.is_compiling() else get_backend()


def keeps_forward_backend(backward: Callable) -> Callable:
    """Decorator for an autograd Function's backward: runs it under the backend its forward
    recorded with remember_backend, in whatever thread autograd runs it."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        backend = ctx.backend
        if backend is None:
            return backward(ctx, *grads)
        stack = _state.stack  # use_backend's push and pop, without a generator per call
        stack.append(backend)
        try:
            return backward(ctx, *grads)
        finally:
            stack.pop()

    return run


def triton_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_device(tensor: torch.Tensor, op: str, argument: str = "input") -> None:
    """Raises a clear error for a tensor on a device this build cannot run."""
    if tensor.is_cpu or tensor.is_cuda or tensor.is_meta:  # (flags: no device object built)
        return
    raise ValueError(
        f"{op}: {argument} is on device '{tensor.device}', which pykern does not support "
        "(cpu and cuda only)"
    )


def pick(device: torch.device, op: str) -> str:
    """The implementation for one call: "cpu", "cuda" or "triton"."""
    backend = get_backend()
    if device.type == "cpu":
        return _cpu_choice(backend, op)
    if device.type != "cuda":
        raise ValueError(f"{op}: device '{device}' is not supported (cpu and cuda only)")
    if backend == "auto":
        backend = AUTO_CHOICE.get(op, "cuda" if _ext.has_cuda() else "triton")
    if backend == "cuda" and not _ext.has_cuda():
        raise RuntimeError(f"{op}: backend 'cuda' was chosen but {_ext.BUILD_CUDA_HINT}")
    return backend


def _cpu_choice(backend: str, op: str) -> str:
    """pick's answer for a CPU tensor under `backend`: the C++ reference, or Triton's
    interpreter when backend "triton" is asked for and TRITON_INTERPRET=1."""
    if backend != "triton":
        return "cpu"
    if triton_interpreted():
        return "triton"
    raise RuntimeError(
        f"{op}: backend 'triton' on a CPU tensor needs TRITON_INTERPRET=1 (set before "
        "triton is imported); use backend 'auto' for the C++ CPU kernels"
    )


def dispatch(table: dict[str, Callable], device: torch.device, op: str) -> Callable:
    """The function from an op's backend table {"cpu": ..., "cuda": ..., "triton": ...}."""
    return table[pick(device, op)]


def table(family: str, op: str) -> dict[str, Callable]:
    """An op's backend table: {"cpu": _C.<op>_cpu, "cuda": _C.<op>_cuda, "triton":
    pykern.triton_kernels.<family>.<op>}, each looked up when called: a CPU-only build has no
    _cuda entries, and triton is imported only when used."""

    def triton_impl(*args):
        return getattr(importlib.import_module(f"pykern.triton_kernels.{family}"), op)(*args)

    def native(name: str) -> Callable:
        fn = None  # the _C function, looked up on the first call

        def impl(*args):
            nonlocal fn
            if fn is None:
                fn = getattr(_ext._C, name)
            return fn(*args)

        return impl

    return {"cpu": native(f"{op}_cpu"), "cuda": native(f"{op}_cuda"), "triton": triton_impl}


def _plain_eager(x: object) -> bool:
    """True for a call that no tracer, mode or tensor subclass could observe: a plain CPU or
    CUDA tensor, outside torch.compile's tracing, with no torch function or dispatch mode."""
    return (
        type(x) is torch.Tensor
        and (x.is_cpu or x.is_cuda)  # (flags: cheaper than building x.device)
        and not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
        and _get_current_dispatch_mode() is None
    )


def caller(op_name: str, table: dict[str, Callable]) -> Callable:
    """The function an op family calls for torch.ops.pykern.<op_name>, whose implementation
    reads `table`. In plain eager calls it runs the implementation the custom op would pick
    directly, skipping some 40 us of dispatcher round trip a call (felt by small tensors and by
    every GPU launch); otherwise (torch.compile, FakeTensor, subclasses, modes) the custom op."""

    def call(x: torch.Tensor, *args):
        if _plain_eager(x):
            # pick()'s choice; for a CPU tensor without building x.device (a microsecond)
            choice = _cpu_choice(get_backend(), op_name) if x.is_cpu else pick(x.device, op_name)
            return table[choice](x, *args)
        return getattr(torch.ops.pykern, op_name)(x, *args)

    call.__name__ = op_name
    return call
