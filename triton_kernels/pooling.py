"""Pooling family in Triton: a (B, R, K) strided view reduced over R, and its backward; and
windowed pooling (max_pool2d, avg_pool2d, their adaptive forms) with their backwards.

Triton twin of csrc/cpu/pooling.cpp and csrc/cuda/pooling.cu, same argument order. Mean
accumulates in float32 (float64 for float64 input); max follows torch's index rule: the first
maximum, and any NaN wins (the last NaN's index). Windows follow csrc/common/pool_window.h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pykern.triton_kernels._launch import (
    autotune,
    cdiv,
    new_output,
    next_power_of_2,
    program_tile,
    round_for_bfloat16,
)


@triton.jit
def _pool_reduce_fwd_kernel(
    x_ptr, out_ptr, idx_ptr,
    R, K, sB, sR, sK,
    IS_MAX: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program per (b, tile of BLOCK_K outputs); it walks R in BLOCK_R steps.
    pid = tl.program_id(0).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    b = pid // k_tiles
    k = (pid % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    k_ok = k < K
    base = x_ptr + b * sB + k * sK
    total = tl.zeros([BLOCK_K], ACC)
    best = tl.full([BLOCK_K], float("-inf"), ACC)
    best_r = tl.zeros([BLOCK_K], tl.int64)
    last_nan_r = tl.full([BLOCK_K], -1, tl.int64)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        ok = (r[:, None] < R) & k_ok[None, :]
        v = tl.load(base[None, :] + r[:, None] * sR, mask=ok, other=0.0).to(ACC)
        if IS_MAX:
            nan = (v != v) & ok
            last_nan_r = tl.maximum(last_nan_r, tl.max(tl.where(nan, r[:, None], -1), axis=0))
            finite = tl.where(nan | ~ok, float("-inf"), v)
            tile_best = tl.max(finite, axis=0)
            first = tl.where((finite == tile_best[None, :]) & ok & ~nan, r[:, None], R)
            tile_r = tl.min(first, axis=0)
            take = tile_best > best  # strictly: ties keep the earlier index
            best_r = tl.where(take, tile_r, best_r)
            best = tl.where(take, tile_best, best)
        else:
            total += tl.sum(v, axis=0)
    if IS_MAX:
        # the element at the index, as torch returns it (a -0.0 / +0.0 tie keeps the first's
        # sign, which tl.max need not)
        at_r = tl.where(last_nan_r >= 0, last_nan_r, best_r)
        tl.store(out_ptr + b * K + k, tl.load(base + at_r * sR, mask=k_ok), mask=k_ok)
        tl.store(idx_ptr + b * K + k, at_r, mask=k_ok)
    else:
        tl.store(out_ptr + b * K + k, round_for_bfloat16(total / R, TO_BF16), mask=k_ok)


@triton.jit
def _pool_reduce_bwd_kernel(
    dy_ptr, idx_ptr, dx_ptr,
    R, K, total, sB, sK,
    IS_MAX: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per BLOCK elements of the contiguous (B, R, K) gradient.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = i < total
    k = i % K
    r = (i // K) % R
    b = i // (K * R)
    g = tl.load(dy_ptr + b * sB + k * sK, mask=ok, other=0.0).to(ACC)
    if IS_MAX:
        hit = tl.load(idx_ptr + b * K + k, mask=ok, other=-1) == r
        dx = tl.where(hit, g, 0.0)
    else:
        dx = round_for_bfloat16(g / R, TO_BF16)
    tl.store(dx_ptr + i, dx, mask=ok)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def pool_reduce_fwd(
    x: torch.Tensor, is_max: bool, with_indices: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean or max over R of the (B, R, K) view x, int64 index of the max in R). with_indices
    false: indices come back empty, (0, K); the kernel still writes them, to a scratch buffer."""
    B, R, K = x.shape
    if R == 0:
        raise ValueError("pool_reduce_fwd: nothing to pool over (R = 0)")
    out = new_output((B, K), x.dtype, x.device)
    indices = torch.empty((B if is_max else 0, K), dtype=torch.int64, device=x.device)
    returned = indices if with_indices else indices[:0]
    if out.numel() == 0:
        return out, returned
    block_k = min(next_power_of_2(K), 64)
    block_r = min(next_power_of_2(R), max(1, 4096 // block_k))
    grid = (B * cdiv(K, block_k),)
    _pool_reduce_fwd_kernel[grid](
        x, out, indices if is_max else out,
        R, K, x.stride(0), x.stride(1), x.stride(2),
        IS_MAX=is_max, ACC=_acc(x.dtype), TO_BF16=x.dtype == torch.bfloat16,
        BLOCK_R=block_r, BLOCK_K=block_k,
    )  # fmt: skip
    return out, returned


def pool_reduce_bwd(
    grad_out: torch.Tensor, indices: torch.Tensor, R: int, is_max: bool
) -> torch.Tensor:
    """The gradient of pool_reduce_fwd, as a contiguous (B, R, K) tensor."""
    B, K = grad_out.shape
    dx = new_output((B, R, K), grad_out.dtype, grad_out.device)
    if dx.numel() == 0:
        return dx
    block = 1024
    _pool_reduce_bwd_kernel[(cdiv(dx.numel(), block),)](
        grad_out, indices if is_max else grad_out, dx,
        R, K, dx.numel(), grad_out.stride(0), grad_out.stride(1),
        IS_MAX=is_max, ACC=_acc(grad_out.dtype), TO_BF16=grad_out.dtype == torch.bfloat16,
        BLOCK=block,
    )  # fmt: skip
    return dx


# ---- Windowed pooling: max_pool2d, avg_pool2d and their adaptive forms ----------------------
#
# Every kernel works on a [BLOCK_P pixels, BLOCK_C channels] tile of one image n, in either
# layout: NCHW runs with BLOCK_C = 1 (the pixels of one plane along the vector), NHWC with a
# few pixels and many channels (each load contiguous across channels). Window sizes are runtime
# ints, so taps and candidate outputs are walked with fixed-trip loops and masks.


@triton.jit
def _tile(C, P, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(image n, pixels [BLOCK_P], channels [BLOCK_C]) of this program, int64."""
    pid = tl.program_id(0).to(tl.int64)
    n, c, pix = program_tile(pid, C, P, CHANNELS_LAST, BLOCK_C, BLOCK_P)
    return n, pix, c


@triton.jit
def _offset(n, c, pix, C, P, CHANNELS_LAST: tl.constexpr):
    """[pix, c] offsets of elements (n, c, pix) of an (N, C, P = H*W) tensor in its layout."""
    if CHANNELS_LAST:
        return (n * P + pix[:, None]) * C + c[None, :]
    else:
        return (n * C + c[None, :]) * P + pix[:, None]


@triton.jit
def _taps(o, IN, OUT, K, S, PAD, D, ADAPTIVE: tl.constexpr):
    """taps_of: output o reads input positions first, first + step, ... < end."""
    if ADAPTIVE:
        first = o * IN // OUT
        end = ((o + 1) * IN + OUT - 1) // OUT
        step = 1
    else:
        first = o * S - PAD
        end = tl.minimum(first + (K - 1) * D + 1, IN)
        first = tl.where(first < 0, first + ((D - 1 - first) // D) * D, first)  # first tap >= 0
        step = D
    return first, end, step


@triton.jit
def _outputs_reading(i, IN, OUT, K, S, PAD, D, ADAPTIVE: tl.constexpr):
    """outputs_reading: [lo, hi) holds every output whose window may hold input position i."""
    if ADAPTIVE:
        lo = i * OUT // IN
        hi = tl.minimum(((i + 1) * OUT + IN - 1) // IN, OUT)
    else:
        span = (K - 1) * D
        top = i + PAD
        lo = tl.where(top < span, 0, (top - span + S - 1) // S)
        hi = tl.minimum(top // S + 1, OUT)
    return lo, hi


@triton.jit
def _avg_window(o, IN, OUT, K, S, PAD, ADAPTIVE: tl.constexpr, COUNT_PAD: tl.constexpr):
    """(first, end, divisor factor) of output o along one axis of avg_pool2d (dilation 1)."""
    first, end, _ = _taps(o, IN, OUT, K, S, PAD, 1, ADAPTIVE)
    if COUNT_PAD:  # padded_window: the window clipped to the padded input
        start = o * S - PAD
        count = tl.minimum(start + K, IN + PAD) - start
    else:
        count = end - first
    return first, end, count


_NCHW_CONFIGS = [
    triton.Config({"BLOCK_P": p, "BLOCK_C": 1}, num_warps=w)
    for p, w in ((128, 1), (256, 2), (512, 4), (1024, 4))
]
_NHWC_CONFIGS = [
    triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
    for p, c, w in ((1, 128, 1), (2, 64, 1), (4, 64, 2), (8, 32, 2), (4, 128, 4), (16, 64, 4))
]


def _per_layout(kernel, key: list[str]) -> dict:
    """The kernel autotuned over each layout's tile shapes: {channels_last: launcher}."""
    return {
        False: autotune(_NCHW_CONFIGS, key, {"BLOCK_P": 64, "BLOCK_C": 1})(kernel),
        True: autotune(_NHWC_CONFIGS, key, {"BLOCK_P": 4, "BLOCK_C": 16})(kernel),
    }


@triton.jit
def _max_pool2d_fwd_kernel(
    x_ptr, out_ptr, idx_ptr,
    C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, TAPS_H, TAPS_W,
    ADAPTIVE: tl.constexpr, CHANNELS_LAST: tl.constexpr, WITH_INDICES: tl.constexpr,
    LOWEST: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n, pix, c = _tile(C, OH * OW, CHANNELS_LAST, BLOCK_P, BLOCK_C)
    ok = (pix < OH * OW)[:, None] & (c < C)[None, :]
    oh = pix // OW
    ow = pix % OW
    h0, h_end, h_step = _taps(oh, H, OH, KH, SH, PH, DH, ADAPTIVE)
    w0, w_end, w_step = _taps(ow, W, OW, KW, SW, PW, DW, ADAPTIVE)
    best = tl.full([BLOCK_P, BLOCK_C], LOWEST, ACC)
    if WITH_INDICES:  # starts at the first valid tap
        best_i = tl.broadcast_to((h0 * W + w0)[:, None], [BLOCK_P, BLOCK_C])
    for i in range(0, TAPS_H):  # h outer, w inner: torch's scan order
        h = h0 + i * h_step
        for j in range(0, TAPS_W):
            w = w0 + j * w_step
            tap = ((h < h_end) & (w < w_end))[:, None] & ok
            at = _offset(n, c, h * W + w, C, H * W, CHANNELS_LAST)
            v = tl.load(x_ptr + at, mask=tap, other=0).to(ACC)
            take = tap & ((v > best) | (v != v))  # ties keep the first; the last NaN wins
            best = tl.where(take, v, best)
            if WITH_INDICES:
                best_i = tl.where(take, (h * W + w)[:, None], best_i)
    out = _offset(n, c, pix, C, OH * OW, CHANNELS_LAST)
    tl.store(out_ptr + out, best, mask=ok)  # an input value: exact in the input dtype
    if WITH_INDICES:
        tl.store(idx_ptr + out, best_i, mask=ok)


@triton.jit
def _max_pool2d_bwd_kernel(
    dy_ptr, idx_ptr, dx_ptr,
    C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, CAND_H, CAND_W,
    ADAPTIVE: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
    TO_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n, pix, c = _tile(C, H * W, CHANNELS_LAST, BLOCK_P, BLOCK_C)
    ok = (pix < H * W)[:, None] & (c < C)[None, :]
    h = pix // W
    w = pix % W
    oh0, oh_end = _outputs_reading(h, H, OH, KH, SH, PH, DH, ADAPTIVE)
    ow0, ow_end = _outputs_reading(w, W, OW, KW, SW, PW, DW, ADAPTIVE)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for i in range(0, CAND_H):
        oh = oh0 + i
        for j in range(0, CAND_W):
            ow = ow0 + j
            cand = ((oh < oh_end) & (ow < ow_end))[:, None] & ok
            at = _offset(n, c, oh * OW + ow, C, OH * OW, CHANNELS_LAST)
            hit = cand & (tl.load(idx_ptr + at, mask=cand, other=-1) == pix[:, None])
            acc += tl.load(dy_ptr + at, mask=hit, other=0).to(ACC)
    dx = _offset(n, c, pix, C, H * W, CHANNELS_LAST)
    tl.store(dx_ptr + dx, round_for_bfloat16(acc, TO_BF16), mask=ok)


@triton.jit
def _avg_pool2d_fwd_kernel(
    x_ptr, out_ptr,
    C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, TAPS_H, TAPS_W, DIVISOR,
    ADAPTIVE: tl.constexpr, COUNT_PAD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr, TO_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n, pix, c = _tile(C, OH * OW, CHANNELS_LAST, BLOCK_P, BLOCK_C)
    ok = (pix < OH * OW)[:, None] & (c < C)[None, :]
    oh = pix // OW
    ow = pix % OW
    h0, h_end, h_count = _avg_window(oh, H, OH, KH, SH, PH, ADAPTIVE, COUNT_PAD)
    w0, w_end, w_count = _avg_window(ow, W, OW, KW, SW, PW, ADAPTIVE, COUNT_PAD)
    total = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for i in range(0, TAPS_H):
        h = h0 + i
        for j in range(0, TAPS_W):
            w = w0 + j
            tap = ((h < h_end) & (w < w_end))[:, None] & ok
            at = _offset(n, c, h * W + w, C, H * W, CHANNELS_LAST)
            total += tl.load(x_ptr + at, mask=tap, other=0).to(ACC)
    empty = (h_end <= h0) | (w_end <= w0)  # no tap inside the input: the output is 0
    div = tl.where(DIVISOR != 0, DIVISOR, h_count * w_count)
    div = tl.where(empty | (div == 0), 1, div)[:, None].to(ACC)
    if total.dtype.is_int():
        mean = total // div  # Triton's // truncates toward zero, as C++'s / does
    else:
        mean = total / div
    mean = tl.where(empty[:, None], 0, mean)
    out = _offset(n, c, pix, C, OH * OW, CHANNELS_LAST)
    tl.store(out_ptr + out, round_for_bfloat16(mean, TO_BF16), mask=ok)


@triton.jit
def _avg_pool2d_bwd_kernel(
    dy_ptr, dx_ptr,
    C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, CAND_H, CAND_W, DIVISOR,
    ADAPTIVE: tl.constexpr, COUNT_PAD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ACC: tl.constexpr, TO_BF16: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n, pix, c = _tile(C, H * W, CHANNELS_LAST, BLOCK_P, BLOCK_C)
    ok = (pix < H * W)[:, None] & (c < C)[None, :]
    h = pix // W
    w = pix % W
    oh0, oh_end = _outputs_reading(h, H, OH, KH, SH, PH, 1, ADAPTIVE)
    ow0, ow_end = _outputs_reading(w, W, OW, KW, SW, PW, 1, ADAPTIVE)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for i in range(0, CAND_H):
        oh = oh0 + i
        h_first, h_end, h_count = _avg_window(oh, H, OH, KH, SH, PH, ADAPTIVE, COUNT_PAD)
        in_h = (oh < oh_end) & (h >= h_first) & (h < h_end)
        for j in range(0, CAND_W):
            ow = ow0 + j
            w_first, w_end, w_count = _avg_window(ow, W, OW, KW, SW, PW, ADAPTIVE, COUNT_PAD)
            hit = in_h & (ow < ow_end) & (w >= w_first) & (w < w_end)
            div = tl.where(DIVISOR != 0, DIVISOR, h_count * w_count)
            div = tl.where(hit & (div != 0), div, 1)[:, None].to(ACC)
            at = _offset(n, c, oh * OW + ow, C, OH * OW, CHANNELS_LAST)
            acc += tl.load(dy_ptr + at, mask=hit[:, None] & ok, other=0).to(ACC) / div
    dx = _offset(n, c, pix, C, H * W, CHANNELS_LAST)
    tl.store(dx_ptr + dx, round_for_bfloat16(acc, TO_BF16), mask=ok)


_SIZES = ["C", "H", "W", "OH", "OW"]
_MAX_POOL2D_FWD = _per_layout(_max_pool2d_fwd_kernel, [*_SIZES, "TAPS_H", "TAPS_W"])
_MAX_POOL2D_BWD = _per_layout(_max_pool2d_bwd_kernel, [*_SIZES, "CAND_H", "CAND_W"])
_AVG_POOL2D_FWD = _per_layout(_avg_pool2d_fwd_kernel, [*_SIZES, "TAPS_H", "TAPS_W"])
_AVG_POOL2D_BWD = _per_layout(_avg_pool2d_bwd_kernel, [*_SIZES, "CAND_H", "CAND_W"])


def _window_acc(dtype: torch.dtype):
    """The compare/accumulate type: float32 for half types, else the dtype itself."""
    if dtype in (torch.float16, torch.bfloat16):
        return tl.float32
    return getattr(tl, str(dtype).removeprefix("torch."))


def _lowest(dtype: torch.dtype):
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _new_pooled(n, c, h, w, dtype, device, channels_last: bool) -> torch.Tensor:
    if channels_last:
        return new_output((n, h, w, c), dtype, device).permute(0, 3, 1, 2)
    return new_output((n, c, h, w), dtype, device)


def _native(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t in the layout the kernels read (a no-op for callers that already pass it)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _most_taps(i: int, o: int) -> int:
    """The longest adaptive window when o outputs cover i inputs (at most ceil(i/o) + 1)."""
    return min(i // o if i % o == 0 else i // o + 2, i)


def _most_readers(i: int, o: int, kernel: int, stride: int, dilation: int, adaptive: bool) -> int:
    """The most outputs whose windows can hold one input position (outputs_reading's range)."""
    if adaptive:
        return min(o // i if o % i == 0 else o // i + 2, o)
    return min(((kernel - 1) * dilation + stride) // stride, o)  # ceil((span + 1) / stride)


def _grid(n: int, c: int, pixels: int):
    """One program per (image, tile of pixels, tile of channels): see _tile."""
    return lambda meta: (n * cdiv(pixels, meta["BLOCK_P"]) * cdiv(c, meta["BLOCK_C"]),)


def _strided_args(kernel, stride, padding, dilation, adaptive):
    """(kernel, stride, padding, dilation) as flat (H, W) ints; placeholders when adaptive."""
    if adaptive:
        return (1, 1, 1, 1, 0, 0, 1, 1)
    return (*kernel, *stride, *padding, *dilation)


def max_pool2d_fwd(
    x, kernel, stride, padding, dilation, out_size, adaptive, channels_last, with_indices=True
):
    """(max over each window, int64 flat index h * W + w of the max in its plane; without
    with_indices an empty tensor, and no index is computed)."""
    N, C, H, W = x.shape
    OH, OW = out_size
    out = _new_pooled(N, C, OH, OW, x.dtype, x.device, channels_last)
    if with_indices:
        indices = _new_pooled(N, C, OH, OW, torch.int64, x.device, channels_last)
    else:
        indices = torch.empty((0,), dtype=torch.int64, device=x.device)
    if out.numel() == 0:
        return out, indices
    taps = (_most_taps(H, OH), _most_taps(W, OW)) if adaptive else tuple(kernel)
    # One program per (image, tile of output pixels, tile of channels), see _tile.
    _MAX_POOL2D_FWD[channels_last][_grid(N, C, OH * OW)](
        _native(x, channels_last), out, indices if with_indices else out,
        C, H, W, OH, OW, *_strided_args(kernel, stride, padding, dilation, adaptive), *taps,
        ADAPTIVE=adaptive, CHANNELS_LAST=channels_last, WITH_INDICES=with_indices,
        LOWEST=_lowest(x.dtype), ACC=_window_acc(x.dtype),
    )  # fmt: skip
    return out, indices


def max_pool2d_bwd(
    grad_out, indices, in_size, kernel, stride, padding, dilation, adaptive, channels_last
):
    """grad_in: each input gathers the grad_out entries whose index names it (no atomics)."""
    N, C, OH, OW = grad_out.shape
    H, W = in_size
    grad_in = _new_pooled(N, C, H, W, grad_out.dtype, grad_out.device, channels_last)
    if grad_in.numel() == 0:
        return grad_in
    kh, kw, sh, sw, *_, dh, dw = _strided_args(kernel, stride, padding, dilation, adaptive)
    cand = (_most_readers(H, OH, kh, sh, dh, adaptive), _most_readers(W, OW, kw, sw, dw, adaptive))
    # One program per (image, tile of input pixels, tile of channels), see _tile.
    _MAX_POOL2D_BWD[channels_last][_grid(N, C, H * W)](
        _native(grad_out, channels_last), _native(indices, channels_last), grad_in,
        C, H, W, OH, OW, *_strided_args(kernel, stride, padding, dilation, adaptive), *cand,
        ADAPTIVE=adaptive, CHANNELS_LAST=channels_last, ACC=_window_acc(grad_out.dtype),
        TO_BF16=grad_out.dtype == torch.bfloat16,
    )  # fmt: skip
    return grad_in


def avg_pool2d_fwd(
    x, kernel, stride, padding, out_size, adaptive, count_include_pad, divisor_override,
    channels_last,
):  # fmt: skip
    """Mean over each window (float32/float64 sum; int64 sums and truncates like C++)."""
    N, C, H, W = x.shape
    OH, OW = out_size
    out = _new_pooled(N, C, OH, OW, x.dtype, x.device, channels_last)
    if out.numel() == 0:
        return out
    taps = (_most_taps(H, OH), _most_taps(W, OW)) if adaptive else tuple(kernel)
    kh, kw, sh, sw, ph, pw, _, _ = _strided_args(kernel, stride, padding, (1, 1), adaptive)
    # One program per (image, tile of output pixels, tile of channels), see _tile.
    _AVG_POOL2D_FWD[channels_last][_grid(N, C, OH * OW)](
        _native(x, channels_last), out,
        C, H, W, OH, OW, kh, kw, sh, sw, ph, pw, *taps, divisor_override,
        ADAPTIVE=adaptive, COUNT_PAD=count_include_pad and not adaptive,
        CHANNELS_LAST=channels_last, ACC=_window_acc(x.dtype),
        TO_BF16=x.dtype == torch.bfloat16,
    )  # fmt: skip
    return out


def avg_pool2d_bwd(
    grad_out, in_size, kernel, stride, padding, adaptive, count_include_pad, divisor_override,
    channels_last,
):  # fmt: skip
    """grad_in: each input gathers grad_out / divisor over the windows that hold it."""
    N, C, OH, OW = grad_out.shape
    H, W = in_size
    grad_in = _new_pooled(N, C, H, W, grad_out.dtype, grad_out.device, channels_last)
    if grad_in.numel() == 0:
        return grad_in
    kh, kw, sh, sw, ph, pw, _, _ = _strided_args(kernel, stride, padding, (1, 1), adaptive)
    cand = (_most_readers(H, OH, kh, sh, 1, adaptive), _most_readers(W, OW, kw, sw, 1, adaptive))
    # One program per (image, tile of input pixels, tile of channels), see _tile.
    _AVG_POOL2D_BWD[channels_last][_grid(N, C, H * W)](
        _native(grad_out, channels_last), grad_in,
        C, H, W, OH, OW, kh, kw, sh, sw, ph, pw, *cand, divisor_override,
        ADAPTIVE=adaptive, COUNT_PAD=count_include_pad and not adaptive,
        CHANNELS_LAST=channels_last, ACC=_window_acc(grad_out.dtype),
        TO_BF16=grad_out.dtype == torch.bfloat16,
    )  # fmt: skip
    return grad_in
