"""Timers, cache-defeating input rotation, floors and result records for the benchmarks.

Siblings: the family modules (layout.py, ...) list cases and providers, run.py drives them through
run_case(), report.py renders what write_json() writes, test_bench.py reuses the cases.

How a case is timed:
- CUDA: CUDA events around a batch of back-to-back calls, after warm-up. A GPU spin
  (torch.cuda._sleep) is queued ahead of each batch so the host has enqueued the whole batch
  before the GPU reaches it: the time is the kernels', not Python's dispatch. The dispatch cost is
  measured on its own and kept as host_us.
- CPU: time.perf_counter around a batch of calls, after warm-up.
- Inputs rotate across enough copies that together they exceed twice the last-level cache (GPU
  L2, CPU L3), so no call finds its input cached by the previous one.
- The providers of a case are timed interleaved, one repeat each in turn, so clock and thermal
  drift touch all of them alike. The reported time is the median repeat; all repeats are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

MIB = 1 << 20
CPU_COPY_BYTES = 64 * MIB  # at least; raised to 2x the L3 where that is larger
CUDA_COPY_BYTES = 256 * MIB  # at least; raised to 4x the L2 where that is larger
CPU_MATMUL_N = 1024  # small: the CPU matmul floor is a sanity figure, not a target
CUDA_MATMUL_N = 8192
MAX_BUFFERS = 4096  # tiny inputs need many copies to fill 2x the cache; memory stays small
CPU_ROTATION_CAP = 256 * MIB  # rotation is "when cheap" on CPU: never more memory than this


# check(x, out, ref): None when out (a provider's result on x) is right against torch's ref,
# else what is wrong. A family picks one: exact_check, or close_check with a float64 reference.
Check = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], str | None]


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long to time one case (all its providers together)."""

    min_repeats: int
    max_repeats: int
    budget_s: float  # keep adding repeats until this much wall time has passed
    repeat_ms: float  # aim for batches this long, so one repeat is well above timer noise
    max_inner: int  # at most this many calls in one batch


def settings(device: str, quick: bool = False) -> Settings:
    if device == "cuda":
        return Settings(20, 200, 0.25 if quick else 0.6, 1.0, 100)
    return Settings(5, 100, 0.6 if quick else 1.5, 2.0, 200)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape, dtype and layout; a family module makes these."""

    family: str
    op: str
    shape: tuple[int, ...]  # logical (N, C, H, W) whatever the memory layout
    dtype: torch.dtype
    layout: str  # "nchw->nhwc" for a conversion; "nchw" / "nhwc" for an op that keeps it
    bytes: int  # bytes read plus bytes written by one call
    flops: int = 0  # 0 for ops that only move memory

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{self.op} {shape} {self.dtype_name} {self.layout}"


@dataclasses.dataclass(frozen=True)
class Provider:
    """One implementation of a case's op: torch's own, or pykern under one backend."""

    name: str  # "torch", "pykern-cpu", "pykern-cuda", "pykern-triton"
    fn: Callable[[torch.Tensor], torch.Tensor]
    backend: str | None = None  # pykern.use_backend(backend) around the calls; None for torch

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.backend is None:
            yield
            return
        import pykern

        with pykern.use_backend(self.backend):
            yield


@dataclasses.dataclass
class Record:
    """One JSON row: one (op, shape, dtype, layout, provider) measured in one run."""

    op: str
    family: str
    shape: list[int]
    dtype: str
    layout: str
    provider: str
    backend: str | None
    pass_: str  # "fwd" (written as "pass")
    time_ms: float  # median over repeats of the time per call
    time_min_ms: float
    time_max_ms: float
    repeats_ms: list[float]
    inner: int  # calls per timed batch
    buffers: int  # input copies rotated through
    host_us: float | None  # CUDA: host time to enqueue one call (Python + dispatch)
    bytes: int
    gbps: float
    floor_gbps: float
    pct_of_floor: float
    ratio_vs_torch: float | None  # torch time / this time: > 1 means faster than torch
    flops: int | None
    tflops: float | None
    device: str
    torch: str
    commit: str
    date: str

    def to_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row["pass"] = row.pop("pass_")
        return row


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: str) -> str:
    """A folder-safe name: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc'."""
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu {cpu_name()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or device


def cache_bytes(device: str) -> int:
    """The last-level cache the input rotation has to defeat: GPU L2, or the CPU's largest."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            text = (index / "size").read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * MIB)


def machine_info(device: str) -> dict:
    """Facts that make a results.json readable on its own: where, what, which code, when."""
    from pykern.info import info_dict

    info = dict(info_dict())
    info.update(
        device=device,
        device_name=device_name(device),
        device_slug=device_slug(device),
        cache_bytes=cache_bytes(device),
        cpu=cpu_name(),
        cpu_threads=torch.get_num_threads(),
        python=platform.python_version(),
        platform=platform.platform(),
        commit=git_commit(),
        dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Other work on the machine skews CPU timings (OpenMP threads wait on a busy core).
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(sm_count=props.multi_processor_count, gpu_memory_bytes=props.total_memory)
    return info


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@functools.cache
def _spin_cycles_per_ms() -> float | None:
    """GPU clock cycles per ms of torch.cuda._sleep, or None where that private hook is gone."""
    if not hasattr(torch.cuda, "_sleep"):
        return None
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    return 10_000_000 / ms if ms > 0 else None


def _spin(ms: float) -> None:
    """Keeps the GPU busy for about ms while the host runs ahead and queues the timed calls."""
    cycles_per_ms = _spin_cycles_per_ms()
    if cycles_per_ms and ms > 0:
        torch.cuda._sleep(int(ms * cycles_per_ms))


def rotation_count(input_bytes: int, device: str) -> int:
    """Input copies to rotate through: together over 2x the last-level cache, at least 2."""
    count = max(2, math.ceil(2 * cache_bytes(device) / max(input_bytes, 1)))
    if device != "cuda":
        count = min(count, max(2, CPU_ROTATION_CAP // max(input_bytes, 1)))
    return min(count, MAX_BUFFERS)


def rotated_inputs(first: torch.Tensor, count: int) -> list[torch.Tensor]:
    """first plus count-1 copies with the same strides (channels_last stays channels_last)."""
    return [first] + [first.clone(memory_format=torch.preserve_format) for _ in range(count - 1)]


class _Timed:
    """One provider's calls on the rotating inputs of one case, one repeat at a time."""

    def __init__(self, provider: Provider, inputs: Sequence[torch.Tensor], device: str):
        self.provider = provider
        self.inputs = inputs
        self.cuda = device == "cuda"
        self.next = 0  # index of the next input to use, continued across repeats
        self.inner = 1
        self.spin_ms = 0.0
        self.host_us: float | None = None
        self.repeats_ms: list[float] = []

    def _batch(self, count: int) -> list[torch.Tensor]:
        n = len(self.inputs)
        batch = [self.inputs[(self.next + i) % n] for i in range(count)]
        self.next += count
        return batch

    def _wall_ms(self, count: int, wait: bool) -> float:
        """Host ms per call for count calls; with wait, until the device has finished too."""
        batch, fn = self._batch(count), self.provider.fn
        start = time.perf_counter()
        for x in batch:
            fn(x)
        if wait and self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3 / count

    def _events_ms(self, count: int) -> float:
        """Device ms per call for count calls, the host having queued them ahead (CUDA)."""
        batch, fn = self._batch(count), self.provider.fn
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _spin(self.spin_ms)
        start.record()
        for x in batch:
            fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / count

    def calibrate(self, s: Settings) -> None:
        """Warm-up (compile, autotune, allocator), then choose the batch size so a repeat lasts
        about s.repeat_ms, and the spin that hides dispatch (CUDA)."""
        probe = max(3, min(len(self.inputs), 20))
        with self.provider.active():
            self._wall_ms(max(3, min(len(self.inputs), 32)), wait=True)
            wall_ms = self._wall_ms(probe, wait=True)  # >= both host and device time per call
            if self.cuda:
                self.spin_ms = 1.5 * wall_ms * probe
                _spin(self.spin_ms)
                self.host_us = self._wall_ms(probe, wait=False) * 1e3  # enqueue only
                torch.cuda.synchronize()
                per_call_ms = self._events_ms(probe)
            else:
                per_call_ms = wall_ms
        self.inner = max(1, min(s.max_inner, math.ceil(s.repeat_ms / max(per_call_ms, 1e-6))))
        if self.cuda:
            self.spin_ms = 1.5 * (self.host_us or 0.0) * 1e-3 * self.inner + 0.05

    def repeat(self) -> None:
        with self.provider.active():
            if self.cuda:
                self.repeats_ms.append(self._events_ms(self.inner))
            else:
                self.repeats_ms.append(self._wall_ms(self.inner, wait=False))


def time_interleaved(timers: list[_Timed], s: Settings, device: str) -> None:
    """Round-robin repeats over the providers until the budget is spent (bounded both ways)."""
    start = time.perf_counter()
    rounds = 0
    while rounds < s.max_repeats and (
        rounds < s.min_repeats or time.perf_counter() - start < s.budget_s
    ):
        shift = rounds % len(timers)  # who goes first changes each round
        for timer in timers[shift:] + timers[:shift]:
            timer.repeat()
        rounds += 1
    sync(device)


def exact_check(x: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when out equals torch's ref bit for bit, strides included; else what differs."""
    if out.data_ptr() == x.data_ptr():
        return "returned its input (no copy was made): the input is in the wrong layout"
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} differs from torch's {tuple(ref.shape)}"
    if out.stride() != ref.stride():
        return f"strides {out.stride()} differ from torch's {ref.stride()}"
    if out.dtype != ref.dtype or not torch.equal(out, ref):
        return "values differ from torch's"
    return None


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """||out - exact|| / ||exact|| in float64 (the plain difference norm where exact is 0)."""
    diff = torch.linalg.vector_norm(out.double() - exact).item()
    scale = torch.linalg.vector_norm(exact).item()
    return diff / scale if scale > 0 else diff


def close_check(
    x: torch.Tensor,
    out: torch.Tensor,
    ref: torch.Tensor,
    exact: torch.Tensor,
    rtol: float = 1e-4,
) -> str | None:
    """None when out is as close to the float64 result exact as torch's own ref allows.

    For ops whose result depends on the order of a float accumulation (a mean), where bit-equal
    to torch is too strict. float32 (and wider): ||out - exact|| / ||exact|| <= rtol, or 2x
    torch's own error where that is larger. bfloat16 and float16: at most 2x torch's own
    relative error at that dtype, + 1e-7 (so an op torch gets exactly, a max, must be exact
    here too). Shape and dtype must be torch's, and so must the
    strides of every dimension longer than 1 (the memory layout; a size-1 dimension's stride is
    arbitrary).
    """
    if out.data_ptr() == x.data_ptr():
        return "returned its input"
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} differs from torch's {tuple(ref.shape)}"
    if out.dtype != ref.dtype:
        return f"dtype {out.dtype} differs from torch's {ref.dtype}"
    long_dims = [d for d in range(out.dim()) if out.shape[d] > 1]
    if [out.stride(d) for d in long_dims] != [ref.stride(d) for d in long_dims]:
        return f"strides {out.stride()} differ from torch's {ref.stride()}"
    error = relative_error(out, exact)
    if out.dtype.itemsize >= 4:  # torch's own error can exceed rtol on ill-conditioned
        allowed = max(rtol, 2 * relative_error(ref, exact))  # results (BatchNorm's dx)
    else:
        allowed = 2 * relative_error(ref, exact) + 1e-7
    if not error <= allowed:  # NaN fails too
        return f"relative error {error:.3g} against float64 exceeds {allowed:.3g}"
    return None


def random_image(case: Case, device: str) -> torch.Tensor:
    """A family's make_input for ops that keep the layout: a random (N, C, H, W) input,
    contiguous ("nchw") or channels_last ("nhwc")."""
    x = torch.randn(case.shape, device=device, dtype=case.dtype)
    return x.contiguous(memory_format=torch.channels_last) if case.layout == "nhwc" else x


def standard_providers(
    torch_fn: Callable[[torch.Tensor], torch.Tensor],
    pykern_fn: Callable[[torch.Tensor], torch.Tensor],
    device: str,
) -> tuple[list[Provider], dict[str, str]]:
    """torch, then pykern under each backend this machine can run: (providers, {name: why
    skipped}). CPU: pykern-cpu. CUDA: pykern-cuda and pykern-triton (never Triton's
    interpreter, and never Triton on CPU tensors, which only the interpreter runs)."""
    import pykern
    from pykern.backends import triton_interpreted

    ready = [Provider("torch", torch_fn)]
    skipped: dict[str, str] = {}
    if device != "cuda":
        ready.append(Provider("pykern-cpu", pykern_fn, backend="auto"))
        return ready, skipped
    if pykern.has_cuda():
        ready.append(Provider("pykern-cuda", pykern_fn, backend="cuda"))
    else:
        skipped["pykern-cuda"] = "this pykern build has no CUDA kernels (PYKERN_BUILD_CUDA)"
    try:
        import triton  # noqa: F401
    except ImportError:
        skipped["pykern-triton"] = "triton is not installed"
    else:
        if triton_interpreted():
            skipped["pykern-triton"] = "TRITON_INTERPRET=1: the interpreter is not benchmarked"
        else:
            ready.append(Provider("pykern-triton", pykern_fn, backend="triton"))
    return ready, skipped


def family_check(module: types.ModuleType, case: Case) -> Check:
    """The check(x, out, ref) of a family module for one case: check_for(case) where the module
    defines one (the check depends on the op), else its module-level check."""
    check_for = getattr(module, "check_for", None)
    return check_for(case) if check_for is not None else module.check


def run_case(
    case: Case,
    make_input: Callable[[Case, str], torch.Tensor],
    providers: Sequence[Provider],
    device: str,
    floors: dict,
    s: Settings,
    meta: dict,
    check: Check = exact_check,
) -> tuple[list[Record], list[dict]]:
    """Times every provider on one case, interleaved; returns records and errors.

    providers[0] must be torch: its output is the reference each other provider must match
    (a provider that fails the check or raises is reported as an error, not timed).
    """
    first = make_input(case, device)
    inputs = rotated_inputs(first, rotation_count(first.numel() * first.element_size(), device))
    ref = providers[0].fn(first)
    timers, errors = [], []
    for provider in providers:
        try:
            with provider.active():
                problem = check(first, provider.fn(first), ref)
            if problem is not None:
                raise RuntimeError(problem)
            timer = _Timed(provider, inputs, device)
            timer.calibrate(s)
            timers.append(timer)
        except Exception as err:  # one broken provider must not end the whole run
            errors.append(error_entry(case, provider.name, err))
    del ref
    if timers:
        time_interleaved(timers, s, device)
    records = [_record(case, t, device, floors, meta) for t in timers]
    torch_ms = next((r.time_ms for r in records if r.provider == "torch"), None)
    for r in records:
        r.ratio_vs_torch = torch_ms / r.time_ms if torch_ms and r.time_ms > 0 else None
    return records, errors


def error_entry(case: Case, provider: str, err: BaseException) -> dict:
    return {
        "op": case.op,
        "family": case.family,
        "shape": list(case.shape),
        "dtype": case.dtype_name,
        "layout": case.layout,
        "provider": provider,
        "error": f"{type(err).__name__}: {err}"[:500],
    }


def _record(case: Case, timer: _Timed, device: str, floors: dict, meta: dict) -> Record:
    repeats = timer.repeats_ms
    median = statistics.median(repeats)
    gbps = case.bytes / (median * 1e-3) / 1e9
    floor_gbps = floors["copy"]["gbps"]
    tflops = case.flops / (median * 1e-3) / 1e12 if case.flops else None
    # The floor: the bytes at copy bandwidth, or the flops at the dtype's matmul rate, whichever
    # takes longer (a convolution is bound by its arithmetic).
    floor_ms = case.bytes / (floor_gbps * 1e9) * 1e3
    matmul = floors["matmul"].get(case.dtype_name)
    if case.flops and matmul:
        floor_ms = max(floor_ms, case.flops / (matmul["tflops"] * 1e12) * 1e3)
    return Record(
        op=case.op,
        family=case.family,
        shape=list(case.shape),
        dtype=case.dtype_name,
        layout=case.layout,
        provider=timer.provider.name,
        backend=timer.provider.backend,
        pass_="fwd",
        time_ms=median,
        time_min_ms=min(repeats),
        time_max_ms=max(repeats),
        repeats_ms=[round(r, 6) for r in repeats],
        inner=timer.inner,
        buffers=len(timer.inputs),
        host_us=None if timer.host_us is None else round(timer.host_us, 2),
        bytes=case.bytes,
        gbps=gbps,
        floor_gbps=floor_gbps,
        pct_of_floor=100.0 * floor_ms / median,
        ratio_vs_torch=None,
        flops=case.flops or None,
        tflops=tflops,
        device=meta["device_name"],
        torch=meta["torch"],
        commit=meta["commit"],
        date=meta["date"],
    )


def _time_alone(fn: Callable[[], object], device: str, s: Settings) -> dict:
    """Median ms of fn() timed like a case (one buffer: the floor buffers dwarf the cache)."""
    timer = _Timed(Provider("floor", lambda _: fn()), [torch.empty(0)], device)
    timer.calibrate(s)
    time_interleaved([timer], s, device)
    repeats = timer.repeats_ms
    return {"time_ms": statistics.median(repeats), "min_ms": min(repeats), "repeats": len(repeats)}


def _copy_floor(nbytes: int, device: str, s: Settings) -> dict:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = _time_alone(lambda: dst.copy_(src), device, s)
    timing.update(bytes=2 * nbytes, gbps=2 * nbytes / (timing["time_ms"] * 1e-3) / 1e9)
    return timing


def _matmul_floor(n: int, dtype: torch.dtype, device: str, s: Settings) -> dict:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timing = _time_alone(lambda: torch.mm(a, b), device, s)
    timing.update(n=n, tflops=2 * n**3 / (timing["time_ms"] * 1e-3) / 1e12)
    return timing


def measure_floors(device: str, dtypes: Sequence[torch.dtype], quick: bool = False) -> dict:
    """Copy bandwidth and matmul rate, measured now, on this device.

    copy: dst.copy_(src) on one large contiguous buffer, counting bytes read plus written;
    matmul: torch.mm of two n x n matrices per dtype (2 n^3 FLOPs), float32 only on CPU.
    """
    s = dataclasses.replace(settings(device, quick), budget_s=0.5)
    if device == "cuda":
        nbytes = max(CUDA_COPY_BYTES, 4 * cache_bytes(device))
        n, matmul_dtypes = CUDA_MATMUL_N, list(dict.fromkeys(dtypes))
    else:
        nbytes = max(CPU_COPY_BYTES, 2 * cache_bytes(device))
        n, matmul_dtypes = CPU_MATMUL_N, [torch.float32]

    floors = {
        "copy": _copy_floor(nbytes, device, s),
        "matmul": {dtype_name(d): _matmul_floor(n, d, device, s) for d in matmul_dtypes},
    }
    if device == "cuda":
        floors["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        torch.cuda.empty_cache()
    return floors


def write_json(
    path: str | os.PathLike,
    machine: dict,
    floors: dict,
    records: Sequence[Record],
    errors: Sequence[dict] = (),
    skipped: Sequence[dict] = (),
) -> None:
    doc = {
        "schema": 1,
        "machine": machine,
        "floors": floors,
        "records": [r.to_dict() for r in records],
        "errors": list(errors),
        "skipped": list(skipped),
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
