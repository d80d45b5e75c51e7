"""Timers, cache-defeating input rotation, floors and result records for the benchmarks.

Siblings: the family modules (layout.py, pooling.py, norm.py, conv.py, attention.py, e2e.py)
list cases and providers, run.py drives them through run_case(), report.py renders the
report.json it writes, charts.py draws it, compare.py sets two of them side by side;
bench/test_bench.py in the repository reuses the cases through pytest-benchmark.

How a case is timed:
- CUDA: CUDA events around a batch of back-to-back calls, after warm-up. A GPU spin
  (torch.cuda._sleep) is queued ahead of each batch so the host has enqueued the whole batch
  before the GPU reaches it: the time is the kernels', not Python's dispatch. The dispatch cost is
  measured on its own and kept as host_us (flagged as an upper bound where one call launches
  more kernels than CUDA's launch queue holds, so that enqueueing it waited on the GPU).
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

PACKAGE_DIR = Path(__file__).resolve().parent

MIB = 1 << 20
CPU_COPY_BYTES = 64 * MIB  # at least; raised to 2x the L3 where that is larger
CUDA_COPY_BYTES = 256 * MIB  # at least; raised to 4x the L2 where that is larger
CPU_MATMUL_N = 1024  # small: the CPU matmul floor is a sanity figure, not a target
CPU_LOWP_MATMUL_N = 256  # CPUs without bf16/fp16 units emulate them (seconds per 1024^3 call)
CUDA_MATMUL_N = 8192
MAX_BUFFERS = 4096  # tiny inputs need many copies to fill 2x the cache; memory stays small
CPU_ROTATION_CAP = 256 * MIB  # rotation is "when cheap" on CPU: never more memory than this
SLOW_CALL_MS = 100.0  # a CPU call this long needs no more warm-up than one call, nor batching
FWDBWD = "_fwdbwd"  # suffix of a family's op name timed forward + backward


# check(x, out, ref): None when out (a provider's result on x) is right against the reference
# provider's ref, else what is wrong. A family picks one: exact_check, or close_check with a
# float64 reference.
Check = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], str | None]


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long to time one case (all its providers together)."""

    min_repeats: int
    max_repeats: int
    budget_s: float  # keep adding repeats until this much wall time has passed
    repeat_ms: float  # aim for batches this long, so one repeat is well above timer noise
    max_inner: int  # at most this many calls in one batch
    warmup_s: float  # warm-up (past the first two calls) stops after this long


def settings(device: str, quick: bool = False) -> Settings:
    """Per-case timing. The budget is what a case gets when the run is not short of time; run.py
    lowers it to fit the run's time target, never below min_repeats."""
    if device == "cuda":
        return Settings(20, 200, 0.06 if quick else 0.15, 1.0, 100, 0.2)
    return Settings(5, 50, 0.12 if quick else 0.3, 2.0, 200, 0.1)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape, dtype and layout; a family module makes these."""

    family: str
    op: str  # the family's name; "<op>_fwdbwd" when timed forward + backward
    shape: tuple[int, ...]  # logical (N, C, H, W) whatever the memory layout
    dtype: torch.dtype
    layout: str  # "nchw->nhwc" for a conversion; "nchw" / "nhwc" for an op that keeps it
    bytes: int  # bytes read plus bytes written by one call
    flops: int = 0  # 0 for ops that only move memory

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def base_op(self) -> str:
        """The op without its pass suffix: what a report groups by."""
        return self.op.removesuffix(FWDBWD)

    @property
    def pass_(self) -> str:
        return "fwdbwd" if self.op.endswith(FWDBWD) else "fwd"

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{self.op} {shape} {self.dtype_name} {self.layout}"


@dataclasses.dataclass(frozen=True)
class Provider:
    """One implementation of a case's op: torch's own, or pykern under one backend."""

    name: str  # "torch", "torch-flash", "pykern-cpu", "pykern-cuda", "pykern-triton"
    fn: Callable[[torch.Tensor], torch.Tensor]
    backend: str | None = None  # pykern.use_backend(backend) around the calls; None for torch
    context: Callable[[], contextlib.AbstractContextManager] | None = None  # e.g. sdpa_kernel

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.backend is not None:
                import pykern

                stack.enter_context(pykern.use_backend(self.backend))
            if self.context is not None:
                stack.enter_context(self.context())
            yield


def provider_backend(name: str) -> str:
    """The --backends word a provider answers to: "torch" for torch's, else pykern's backend."""
    return "torch" if name.startswith("torch") else name.removeprefix("pykern-").split("+")[0]


@dataclasses.dataclass
class Record:
    """One JSON row: one (op, pass, shape, dtype, layout, provider) measured in one run."""

    op: str  # the op without its pass suffix
    family: str
    shape: list[int]
    dtype: str
    layout: str
    provider: str
    backend: str | None
    pass_: str  # "fwd" or "fwdbwd" (written as "pass")
    time_ms: float  # median over repeats of the time per call
    time_min_ms: float
    time_max_ms: float
    time_q1_ms: float  # quartiles of the repeats: the spread the report and compare use
    time_q3_ms: float
    repeats_ms: list[float]
    inner: int  # calls per timed batch
    buffers: int  # input copies rotated through
    host_us: float | None  # CUDA: host time to enqueue one call (Python + dispatch)
    host_us_upper_bound: bool  # host_us includes waiting on a full launch queue (_Timed._host_us)
    bytes: int
    gbps: float
    floor_gbps: float
    floor_ms: float  # the time the op would take at the floor (copy or matmul rate)
    pct_of_floor: float
    reference: str  # the provider ratio_vs_torch is measured against ("torch" mostly)
    ratio_vs_torch: float | None  # reference time / this time: > 1 means faster than torch
    flops: int | None
    tflops: float | None
    device: str
    torch: str
    commit: str
    date: str
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row["pass"] = row.pop("pass_")
        return row


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _git(*args: str) -> str | None:
    """git in the checkout pykern was imported from (an editable install), else in the working
    folder; None from an installed wheel outside any checkout."""
    for where in (PACKAGE_DIR, Path.cwd()):
        try:
            done = subprocess.run(
                ["git", *args], cwd=where, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown (not run from a git checkout)"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads()
    return f"{cpu_name()} ({threads} thread{'' if threads == 1 else 's'})"


def device_slug(device: str) -> str:
    """A folder-safe name: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc'."""
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu {cpu_name()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or device


def cache_bytes(device: str) -> int:
    """The last-level cache the input rotation has to defeat: GPU L2, or the CPU's largest."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    return _cpu_cache_bytes()


@functools.cache
def _cpu_cache_bytes() -> int:
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            text = (index / "size").read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * MIB)


def machine_info(device: str) -> dict:
    """Facts that make a report.json readable on its own: where, what, which code, when."""
    from pykern.info import info_dict

    info = dict(info_dict())
    commit = git_commit()
    info.update(
        device=device,
        device_name=device_name(device),
        device_slug=device_slug(device),
        cache_bytes=cache_bytes(device),
        cpu=cpu_name(),
        cpu_threads=torch.get_num_threads(),
        python=platform.python_version(),
        platform=platform.platform(),
        commit=commit,
        dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Other work on the machine skews CPU timings (OpenMP threads wait on a busy core).
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            sm_count=props.multi_processor_count,
            gpu_memory_bytes=props.total_memory,
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
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


def _covering(host_ms: float) -> float:
    """A spin's length that outlasts host_ms of enqueueing: half as long again, plus 50 us."""
    return 1.5 * host_ms + 0.05


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
        self.host_us_upper_bound = False  # host_us waited on a full launch queue
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

    def _host_us(self, wall_ms: float, count: int) -> tuple[float, bool]:
        """(host us to enqueue one call, blocked), the GPU kept busy by a spin meanwhile.

        CUDA's launch queue holds about a thousand kernels; a batch that launches more waits
        for the GPU to drain it, and that wait would be counted as host time. It shows as the
        spin having ended before the enqueue did (the spin outlasts the batch's own wall time,
        so only such a wait can make it end first). Then one call is tried alone; if that still
        waits, its time is kept as an upper bound (blocked True)."""
        while True:
            _spin(_covering(wall_ms * count))
            spun = torch.cuda.Event()
            spun.record()
            us = self._wall_ms(count, wait=False) * 1e3
            blocked = spun.query()  # the spin already over: the enqueue waited on the GPU
            torch.cuda.synchronize()
            if not blocked or count == 1:
                return us, blocked
            count = 1

    def calibrate(self, s: Settings, warmed: bool = False) -> None:
        """Warm-up (compile, autotune, allocator, first touch of every rotated input, bounded by
        s.warmup_s), then choose the batch size so a repeat lasts about s.repeat_ms, and the
        spin that hides dispatch (CUDA). warmed: the caller has made the first call already
        (run_case's check), which compiles and autotunes."""
        with self.provider.active():
            if not warmed:
                self._wall_ms(1, wait=True)  # compiles, autotunes: not an estimate of anything
            estimate_ms = self._wall_ms(1, wait=True)
            if not self.cuda and estimate_ms >= SLOW_CALL_MS:
                # One call outlasts any cache and timer effect: it is its own estimate.
                self.inner = 1
                return
            touch = min(len(self.inputs), 32) - 2
            touch = min(touch, math.ceil(s.warmup_s * 1e3 / max(estimate_ms, 1e-3)))
            if touch > 0:
                self._wall_ms(touch, wait=True)
            # Calls enough for a 20 ms estimate (one for a slow op): >= host and device time.
            probe = max(1, min(20, math.ceil(20.0 / max(estimate_ms, 1e-3))))
            wall_ms = self._wall_ms(probe, wait=True)
            if self.cuda:
                probe = max(3, probe)
                self.host_us, self.host_us_upper_bound = self._host_us(wall_ms, probe)
                self.spin_ms = _covering(wall_ms * probe)
                per_call_ms = self._events_ms(probe)
            else:
                per_call_ms = wall_ms
        self.inner = max(1, min(s.max_inner, math.ceil(s.repeat_ms / max(per_call_ms, 1e-6))))
        if self.cuda:
            self.spin_ms = _covering((self.host_us or 0.0) * 1e-3 * self.inner)

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
    diff = torch.linalg.vector_norm(out.double() - exact.double()).item()
    scale = torch.linalg.vector_norm(exact.double()).item()
    return diff / scale if scale > 0 else diff


def error_bound(ref: torch.Tensor, exact: torch.Tensor, rtol: float = 1e-4) -> float:
    """DESIGN.md's bound on a result's error against the exact one: float32 (and wider) rtol,
    or 2x torch's own error where that is larger; bfloat16 and float16 2x torch's own error at
    that dtype, + 1e-7 (so an op torch gets exactly, a max, must be exact too)."""
    if ref.dtype.itemsize >= 4:  # torch's own error can exceed rtol on ill-conditioned
        return max(rtol, 2 * relative_error(ref, exact))  # results (BatchNorm's dx)
    return 2 * relative_error(ref, exact) + 1e-7


def close_check(
    x: torch.Tensor,
    out: torch.Tensor,
    ref: torch.Tensor,
    exact: torch.Tensor,
    rtol: float = 1e-4,
) -> str | None:
    """None when out is as close to the float64 result exact as torch's own ref allows
    (error_bound). For ops whose result depends on the order of a float accumulation (a mean),
    where bit-equal to torch is too strict. Shape and dtype must be torch's, and so must the
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
    error, allowed = relative_error(out, exact), error_bound(ref, exact, rtol)
    if not error <= allowed:  # NaN fails too
        return f"relative error {error:.3g} against float64 exceeds {allowed:.3g}"
    return None


def random_image(case: Case, device: str) -> torch.Tensor:
    """A family's make_input for ops that keep the layout: a random (N, C, H, W) input,
    contiguous ("nchw") or channels_last ("nhwc")."""
    x = torch.randn(case.shape, device=device, dtype=case.dtype)
    return x.contiguous(memory_format=torch.channels_last) if case.layout == "nhwc" else x


def pykern_backends(device: str) -> tuple[list[str], dict[str, str]]:
    """The pykern backends this machine can time on device: ([backend], {provider: why not}).
    CPU: the C++ reference ("cpu"). CUDA: "cuda" and "triton" (never Triton's interpreter, and
    never Triton on CPU tensors, which only the interpreter runs)."""
    import pykern
    from pykern.backends import triton_interpreted

    if device != "cuda":
        return ["cpu"], {}
    ready, skipped = [], {}
    if pykern.has_cuda():
        ready.append("cuda")
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
            ready.append("triton")
    return ready, skipped


def standard_providers(
    torch_fn: Callable[[torch.Tensor], torch.Tensor],
    pykern_fn: Callable[[torch.Tensor], torch.Tensor],
    device: str,
) -> tuple[list[Provider], dict[str, str]]:
    """torch, then pykern under each backend this machine can run: (providers, {name: why
    skipped}). CPU: pykern-cpu (backend "auto", which runs the C++ reference on CPU tensors).
    CUDA: pykern-cuda and pykern-triton."""
    backends, skipped = pykern_backends(device)
    ready = [Provider("torch", torch_fn)]
    for backend in backends:
        ready.append(
            Provider(f"pykern-{backend}", pykern_fn, "auto" if backend == "cpu" else backend)
        )
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
    extra: Callable[[Provider, torch.Tensor, torch.Tensor, torch.Tensor], dict] | None = None,
) -> tuple[list[Record], list[dict]]:
    """Times every provider on one case, interleaved; returns records and errors.

    providers[0] is the reference (torch's op, or for attention torch's flash backend where it
    runs): its output is what each other provider must match (a provider that fails the check
    or raises is reported as an error, not timed), and ratio_vs_torch is its time over theirs.
    extra(provider, x, out, ref), where given, adds facts to each provider's record (an error
    against the reference, say).
    """
    first = make_input(case, device)
    inputs = rotated_inputs(first, rotation_count(first.numel() * first.element_size(), device))
    with providers[0].active():
        ref = providers[0].fn(first)
    timers, errors, extras = [], [], {}
    for i, provider in enumerate(providers):
        try:
            with provider.active():
                out = ref if i == 0 else provider.fn(first)  # the reference is right by definition
                problem = None if i == 0 else check(first, out, ref)
            if problem is not None:
                raise RuntimeError(problem)
            if extra is not None:
                extras[provider.name] = extra(provider, first, out, ref)
            del out
            timer = _Timed(provider, inputs, device)
            timer.calibrate(s, warmed=True)
            timers.append(timer)
        except Exception as err:  # one broken provider must not end the whole run
            errors.append(error_entry(case, provider.name, err))
            if device == "cuda" and isinstance(err, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
    del ref
    if timers:
        time_interleaved(timers, s, device)
    records = [_record(case, t, device, floors, meta) for t in timers]
    reference = providers[0].name
    ref_ms = next((r.time_ms for r in records if r.provider == reference), None)
    for r in records:
        r.reference = reference
        r.ratio_vs_torch = ref_ms / r.time_ms if ref_ms and r.time_ms > 0 else None
        r.extra.update(extras.get(r.provider, {}))
    return records, errors


def error_entry(case: Case, provider: str, err: BaseException) -> dict:
    return {
        "op": case.base_op,
        "pass": case.pass_,
        "family": case.family,
        "shape": list(case.shape),
        "dtype": case.dtype_name,
        "layout": case.layout,
        "provider": provider,
        "error": f"{type(err).__name__}: {err}"[:500],
    }


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """(q1, q3) of values (the 'inclusive' method: within the values' range)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def floor_ms_for(case_bytes: int, case_flops: int, dtype: str, floors: dict) -> float:
    """The time an op would take at the floor: its bytes at the copy bandwidth, or its flops at
    the dtype's matmul rate, whichever is longer (a convolution is bound by its arithmetic)."""
    floor_ms = case_bytes / (floors["copy"]["gbps"] * 1e9) * 1e3
    matmul = floors["matmul"].get(dtype)
    if case_flops and matmul:
        floor_ms = max(floor_ms, case_flops / (matmul["tflops"] * 1e12) * 1e3)
    return floor_ms


def _record(case: Case, timer: _Timed, device: str, floors: dict, meta: dict) -> Record:
    repeats = timer.repeats_ms
    median = statistics.median(repeats)
    q1, q3 = quartiles(repeats)
    floor_ms = floor_ms_for(case.bytes, case.flops, case.dtype_name, floors)
    return Record(
        op=case.base_op,
        family=case.family,
        shape=list(case.shape),
        dtype=case.dtype_name,
        layout=case.layout,
        provider=timer.provider.name,
        backend=timer.provider.backend,
        pass_=case.pass_,
        time_ms=median,
        time_min_ms=min(repeats),
        time_max_ms=max(repeats),
        time_q1_ms=q1,
        time_q3_ms=q3,
        repeats_ms=[round(r, 6) for r in repeats],
        inner=timer.inner,
        buffers=len(timer.inputs),
        host_us=None if timer.host_us is None else round(timer.host_us, 2),
        host_us_upper_bound=timer.host_us_upper_bound,
        bytes=case.bytes,
        gbps=case.bytes / (median * 1e-3) / 1e9,
        floor_gbps=floors["copy"]["gbps"],
        floor_ms=floor_ms,
        pct_of_floor=100.0 * floor_ms / median,
        reference="torch",
        ratio_vs_torch=None,
        flops=case.flops or None,
        tflops=case.flops / (median * 1e-3) / 1e12 if case.flops else None,
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
    q1, q3 = quartiles(repeats)
    return {
        "time_ms": statistics.median(repeats),
        "min_ms": min(repeats),
        "max_ms": max(repeats),
        "q1_ms": q1,
        "q3_ms": q3,
        "repeats": len(repeats),
        "repeats_ms": [round(r, 6) for r in repeats],
    }


def _copy_floor(nbytes: int, device: str, s: Settings) -> dict:
    src = torch.randn(nbytes // 4, dtype=torch.float32, device=device)
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
    """Copy bandwidth and matmul rate per dtype, measured now, on this device.

    copy: dst.copy_(src) on one large contiguous buffer, counting bytes read plus written;
    matmul: torch.mm of two n x n matrices per dtype (2 n^3 FLOPs); on a CPU n is 1024 for
    float32 and 256 for bfloat16/float16 (which CPUs without bf16 units emulate slowly).
    """
    s = dataclasses.replace(settings(device, quick), budget_s=0.3)
    wanted = list(dict.fromkeys([torch.float32, *dtypes]))
    if device == "cuda":
        nbytes = max(CUDA_COPY_BYTES, 4 * cache_bytes(device))
        sizes = {d: CUDA_MATMUL_N for d in wanted}
    else:
        nbytes = max(CPU_COPY_BYTES, 2 * cache_bytes(device))
        sizes = {d: CPU_MATMUL_N if d.itemsize >= 4 else CPU_LOWP_MATMUL_N for d in wanted}
    floors = {
        "copy": _copy_floor(nbytes, device, s),
        "matmul": {dtype_name(d): _matmul_floor(n, d, device, s) for d, n in sizes.items()},
    }
    if device == "cuda":
        floors["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        torch.cuda.empty_cache()
    return floors


def load_json(path: str | os.PathLike) -> dict:
    """A report.json (schema 2), or a results.json of the earlier `python -m bench.run`
    (schema 1), with schema 1's rows brought to schema 2's form: "_fwdbwd" ops split into op
    and pass, quartiles recomputed from the repeats, the reference named."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "records" not in doc:
        raise ValueError(f"{path}: not a pykern benchmark report (no 'records')")
    for r in doc["records"]:
        if r.get("op", "").endswith(FWDBWD):
            r["op"], r["pass"] = r["op"].removesuffix(FWDBWD), "fwdbwd"
        r.setdefault("pass", "fwd")
        r.setdefault("reference", "torch")
        r.setdefault("extra", {})
        if "time_q1_ms" not in r:
            r["time_q1_ms"], r["time_q3_ms"] = quartiles(r.get("repeats_ms") or [r["time_ms"]])
    for e in doc.get("errors", []):
        if e.get("op", "").endswith(FWDBWD):
            e["op"], e["pass"] = e["op"].removesuffix(FWDBWD), "fwdbwd"
        e.setdefault("pass", "fwd")
    return doc
