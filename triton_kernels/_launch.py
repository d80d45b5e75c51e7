"""Launch helpers: a fixed config under Triton's interpreter, autotuning on a GPU.

@triton.autotune needs a GPU driver to time configs, so under TRITON_INTERPRET=1 a kernel
runs with one fixed config instead; the launcher code is the same either way.
"""

from __future__ import annotations

from inspect import signature

import torch
import triton
import triton.language as tl
import triton.testing

from pykern._ext import _C
from pykern.backends import triton_interpreted

# Read once: @triton.jit picks the interpreter or the compiler as these modules are imported,
# so a later change of TRITON_INTERPRET could not move them anyway (and launches ask often).
_INTERPRETED = triton_interpreted()


def interpreted() -> bool:
    return _INTERPRETED


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints, for grids. triton.cdiv (and next_power_of_2) became constexpr
    functions in Triton 3.8 that cost 4-5 us a call, several a launch: on a GPU, launches whose
    host time can exceed their device time."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n for host sizes, 1 for n <= 1 (an empty size still gets a
    block)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def dot_block(size: int, block: int) -> int:
    """block shrunk to the power of two covering size, at least 16 (tl.dot's minimum)."""
    return min(block, max(16, next_power_of_2(size)))


# A @triton.jit helper inlined into kernels on a GPU; under the interpreter plain Python (the
# calling kernel's module is already patched), since the interpreter re-patches the language
# module on every call of a jitted helper, which was half of its running time.
jit_helper = (lambda fn: fn) if interpreted() else triton.jit


@jit_helper
def program_tile(pid, C, K, C_CONTIG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """(b, c [BLOCK_C], k [BLOCK_K]) of program pid over (B, c tiles, k tiles), int64: the
    tiles of a (B, C, K) tensor, c tiles fastest when C_CONTIG (neighbouring programs read
    neighbouring bytes of a channels-innermost layout), else k tiles (a plane in order)."""
    c_tiles = tl.cdiv(C, BLOCK_C)
    k_tiles = tl.cdiv(K, BLOCK_K)
    if C_CONTIG:  # channel tiles fastest: neighbouring programs read neighbouring bytes
        c_tile = pid % c_tiles
        k_tile = (pid // c_tiles) % k_tiles
    else:  # k tiles fastest: a plane is walked in order
        k_tile = pid % k_tiles
        c_tile = (pid // k_tiles) % c_tiles
    b = pid // (c_tiles * k_tiles)
    c = c_tile * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    k = k_tile * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    return b, c, k


@jit_helper
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b; UPCAST: float32 operands (the interpreter's bfloat16 tl.dot is wrong).
    out_dtype follows acc: compiled tl.dot refuses a float64 acc under its float32 default."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A kernel's output; 0xFF-filled first when tests poison outputs (csrc/common/poison.h)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _C.poison_outputs() and out.numel() > 0:
        out.view(torch.uint8).fill_(0xFF)
    return out


class _FixedConfig:
    """kernel[grid](...) with the constexprs of one config filled in, like an autotuner."""

    def __init__(self, kernel, config: dict):
        self.kernel = kernel
        self.config = config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            resolved = grid(self.config) if callable(grid) else grid
            return self.kernel[resolved](*args, **kwargs, **self.config)

        return launch


def _autotune_bench(kernel_call, quantiles):
    """One config's time for the autotuner: 5 ms of warm-up and 20 ms of repeats, against
    Triton's 25 and 100. Each new shape autotunes again; at Triton's lengths, autotuning was
    most of the per-case overhead in the H100 benchmark run of 2026-11-26."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# triton.autotune takes a do_bench in the versions met here (3.6, 3.8); an older one that does
# not keeps its own timing.
_HAS_DO_BENCH = "do_bench" in signature(triton.autotune).parameters
_BENCH = {"do_bench": _autotune_bench} if _HAS_DO_BENCH else {}


def autotune(configs: list[triton.Config], key: list[str], interpreter_config: dict):
    """triton.autotune on a GPU; under the interpreter, `interpreter_config` (constexprs) only."""

    def wrap(kernel):
        if interpreted():
            return _FixedConfig(kernel, interpreter_config)
        return triton.autotune(configs=configs, key=key, **_BENCH)(kernel)

    return wrap


@triton.jit
def round_for_bfloat16(x, TO_BF16: tl.constexpr):
    """float32 x rounded to nearest-even at bfloat16's precision, when TO_BF16.

    Triton's interpreter (3.8) truncates float32 -> bfloat16 stores, even when asked for
    "rtne"; a value rounded here first converts exactly, in the interpreter and on a GPU.
    inf keeps its class (its low bits are 0); NaN passes unrounded, since the GPU's canonical
    NaN 0x7FFFFFFF would carry into the sign bit and come out as -0.0.
    """
    if TO_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        # Shifts rather than a 0xFFFF0000 mask: that literal would widen the tensor to int64.
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x
