"""Convolution family in Triton: conv2d forward, grad_input and grad_weight as implicit GEMMs.

Triton twin of csrc/cpu/conv.cpp and csrc/cuda/conv.cu, same argument order (see their
header comment for the semantics). No column buffer: each tile load gathers its im2col
patch straight from the image, so `workspace_bytes` is accepted and ignored.

Forward and grad_input walk their reduction as one flat loop over (tap r, tap s, channel
chunk), so the loads of each trip are plain [pixels, channels] tiles and the compiler can
pipeline the whole reduction; grad_weight fixes the tap per program and loops over pixels. In
NHWC memory a channel chunk is a contiguous vector of every pixel (weights: (K, R, S, Cg)
memory, also contiguous in c); in NCHW memory the pixels are contiguous instead. tl.dot
accumulates in float32 (float64 for float64); float32 operands use TF32 when
torch.backends.cuda.matmul.allow_tf32 allows it, else exact FMA products.

Depthwise convs (Cg == 1) and the ops of a depthwise conv_transpose2d (Kg == 1, Cg small)
take direct kernels instead (_direct_*: elementwise products over a group's few channels and
the taps, float32 / float64 accumulation, no tl.dot), since their GEMM tiles would be almost
all padding.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from pykern.triton_kernels._launch import (
    autotune,
    cdiv,
    dot_block,
    interpreted,
    jit_helper,
    mma,
    new_output,
    round_for_bfloat16,
)


@jit_helper
def _pixel_offset(n, h, w, C, H, W, CHANNELS_LAST: tl.constexpr):
    """Offsets of channel 0 of pixels (n, h, w) (int64 vectors) of an (N, C, H, W) tensor."""
    if CHANNELS_LAST:
        return ((n * H + h) * W + w) * C
    return (n * C * H + h) * W + w


@jit_helper
def _channel_stride(H, W, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return 1
    return H * W


@jit_helper
def _weight_strides(Cg, R, S, CHANNELS_LAST: tl.constexpr):
    """(k, c, r, s) strides of a (K, Cg, R, S) weight: (K, R, S, Cg) memory when channels_last."""
    if CHANNELS_LAST:
        return R * S * Cg, 1, S * Cg, Cg
    return Cg * R * S, R * S, S, 1


@jit_helper
def _gemm_tile(pid, m_tiles, n_tiles, GROUP_M: tl.constexpr):
    """(m tile, n tile) of program pid: GROUP_M rows of tiles are walked column by column, so
    programs running at the same time share their A rows and B columns in L2."""
    per_group = GROUP_M * n_tiles
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(m_tiles - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C, H, W, K, Ho, Wo, R, S, SH, SW, PH, PW, DH, DW, Cg, Kg,
    HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Group g's GEMM: y[(n, ho, wo), k] = sum over (r, s, c) of patch[(n, ho, wo), (r, s, c)]
    # * w[(r, s, c), k]; one program per [BLOCK_M output pixels, BLOCK_N output channels].
    g = tl.program_id(1)
    M = N * Ho * Wo
    m_tile, n_tile = _gemm_tile(
        tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(Kg, BLOCK_N), GROUP_M
    )
    m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    kk = n_tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_ok = m < M
    kk_ok = kk < Kg
    wo = m % Wo
    ho = (m // Wo) % Ho
    n = m // (Wo * Ho)
    k = g * Kg + kk
    x_cs = _channel_stride(H, W, CHANNELS_LAST)
    wk, wc, wr, ws = _weight_strides(Cg, R, S, CHANNELS_LAST)
    c_tiles = tl.cdiv(Cg, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for t in range(0, R * S * c_tiles):
        r = t // (S * c_tiles)
        s = (t // c_tiles) % S
        c = (t % c_tiles) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        c_ok = c < Cg
        h = ho * SH - PH + r * DH
        w = wo * SW - PW + s * DW
        row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)  # outside: zero padding
        rows = _pixel_offset(n, h, w, C, H, W, CHANNELS_LAST)
        a = tl.load(
            x_ptr + rows[:, None] + ((g * Cg + c) * x_cs)[None, :],
            mask=row_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + (k * wk)[None, :] + (c * wc)[:, None] + (r * wr + s * ws),
            mask=c_ok[:, None] & kk_ok[None, :],
            other=0.0,
        )
        acc = mma(a, b, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + k, mask=kk_ok, other=0.0).to(ACC)[None, :]
    out = _pixel_offset(n, ho, wo, K, Ho, Wo, CHANNELS_LAST)[:, None]
    out += (k * _channel_stride(Ho, Wo, CHANNELS_LAST))[None, :]
    tl.store(y_ptr + out, round_for_bfloat16(acc, TO_BF16), mask=m_ok[:, None] & kk_ok[None, :])


@jit_helper
def _phase_taps(phase, PAD, STRIDE, DIL, GCD, INV, R):
    """(first, step, count) of the taps r with (phase + PAD - r * DIL) % STRIDE == 0: those
    solve r * (DIL / GCD) = (phase + PAD) / GCD mod STRIDE / GCD, so r = first + i * step
    with INV the inverse of DIL / GCD modulo STRIDE / GCD; none when GCD does not divide."""
    a = (phase + PAD) % STRIDE
    step = STRIDE // GCD
    first = ((a // GCD) * INV) % step
    count = tl.where(a % GCD == 0, (R - first + step - 1) // step, 0)  # first < step
    return first, step, count


@triton.jit
def _conv2d_bwd_input_kernel(
    dy_ptr, w_ptr, b_ptr, dx_ptr,
    N, C, H, W, K, Ho, Wo, R, S, SH, SW, PH, PW, DH, DW, Cg, Kg,
    GCD_H, GCD_W, INV_H, INV_W,
    HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Gather form of col2im: dx[(n, h, w), c] = sum over the taps (r, s) and k that read
    # (h, w) of dy[(n, ho, wo), k] * w[k, c, r, s]. The pixels are split by phase (h % SH,
    # w % SW): every pixel of one phase is read by the same taps, so a program (one phase,
    # [BLOCK_M pixels, BLOCK_N input channels]) loops over only those taps, with no masks
    # spent on taps that skip it.
    g = tl.program_id(1)
    HQ = tl.cdiv(H, SH)
    WQ = tl.cdiv(W, SW)
    M = N * HQ * WQ
    m_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(Cg, BLOCK_N)
    pid = tl.program_id(0)
    phase = pid // (m_tiles * n_tiles)
    phase_h = phase // SW
    phase_w = phase % SW
    m_tile, n_tile = _gemm_tile(pid % (m_tiles * n_tiles), m_tiles, n_tiles, GROUP_M)
    m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cc = n_tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cc_ok = cc < Cg
    wq = m % WQ
    hq = (m // WQ) % HQ
    n = m // (WQ * HQ)
    h = phase_h + hq * SH
    w = phase_w + wq * SW
    m_ok = (m < M) & (h < H) & (w < W)
    r0, r_step, r_count = _phase_taps(phase_h, PH, SH, DH, GCD_H, INV_H, R)
    s0, s_step, s_count = _phase_taps(phase_w, PW, SW, DW, GCD_W, INV_W, S)
    dy_cs = _channel_stride(Ho, Wo, CHANNELS_LAST)
    wk, wc, wr, ws = _weight_strides(Cg, R, S, CHANNELS_LAST)
    k_tiles = tl.cdiv(Kg, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for t in range(0, r_count * s_count * k_tiles):
        r = r0 + (t // (s_count * k_tiles)) * r_step
        s = s0 + ((t // k_tiles) % s_count) * s_step
        k = g * Kg + (t % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = k < (g + 1) * Kg
        ho = hq + (phase_h + PH - r * DH) // SH  # an exact division: the phase's taps
        wo = wq + (phase_w + PW - s * DW) // SW
        row_ok = m_ok & (ho >= 0) & (ho < Ho) & (wo >= 0) & (wo < Wo)
        rows = _pixel_offset(n, ho, wo, K, Ho, Wo, CHANNELS_LAST)
        a = tl.load(
            dy_ptr + rows[:, None] + (k * dy_cs)[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + (k * wk)[:, None] + (cc * wc)[None, :] + (r * wr + s * ws),
            mask=k_ok[:, None] & cc_ok[None, :],
            other=0.0,
        )
        acc = mma(a, b, acc, PRECISION, UPCAST)
    c = g * Cg + cc
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cc_ok, other=0.0).to(ACC)[None, :]
    out = _pixel_offset(n, h, w, C, H, W, CHANNELS_LAST)[:, None]
    out += (c * _channel_stride(H, W, CHANNELS_LAST))[None, :]
    tl.store(dx_ptr + out, round_for_bfloat16(acc, TO_BF16), mask=m_ok[:, None] & cc_ok[None, :])


@triton.jit
def _conv2d_bwd_weight_kernel(
    dy_ptr, x_ptr, dw_ptr,
    N, C, H, W, K, Ho, Wo, R, S, SH, SW, PH, PW, DH, DW, Cg, Kg, P_CHUNK,
    CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Group g's GEMM for one tap (r, s): dw[k, c] = sum over p = (n, ho, wo) of dy[k, p]
    # * x[p, c] at (ho * SH - PH + r * DH, wo * SW - PW + s * DW). One program per
    # [BLOCK_M output channels, BLOCK_N input channels, tap] and per piece of P_CHUNK pixels
    # (program_id(2)); with more than one piece it writes float partial sums to dw_ptr's
    # piece, summed in order afterwards by _sum_pieces_kernel.
    g = tl.program_id(1)
    piece = tl.program_id(2)
    pid = tl.program_id(0)
    c_tiles = tl.cdiv(Cg, BLOCK_N)
    c_tile = pid % c_tiles
    rs = (pid // c_tiles) % (R * S)
    k_tile = pid // (c_tiles * R * S)
    r = rs // S
    s = rs % S
    kk = k_tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cc = c_tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    kk_ok = kk < Kg
    cc_ok = cc < Cg
    k = g * Kg + kk
    c = g * Cg + cc
    dy_cs = _channel_stride(Ho, Wo, CHANNELS_LAST)
    x_cs = _channel_stride(H, W, CHANNELS_LAST)
    P = N * Ho * Wo
    p_end = tl.minimum((piece + 1) * P_CHUNK, P)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for p0 in range(piece * P_CHUNK, p_end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K).to(tl.int64)
        p_ok = p < p_end
        wo = p % Wo
        ho = (p // Wo) % Ho
        n = p // (Wo * Ho)
        cols = _pixel_offset(n, ho, wo, K, Ho, Wo, CHANNELS_LAST)
        a = tl.load(
            dy_ptr + (k * dy_cs)[:, None] + cols[None, :],
            mask=kk_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        h = ho * SH - PH + r * DH
        w = wo * SW - PW + s * DW
        row_ok = p_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        b = tl.load(
            x_ptr + _pixel_offset(n, h, w, C, H, W, CHANNELS_LAST)[:, None] + (c * x_cs)[None, :],
            mask=row_ok[:, None] & cc_ok[None, :],
            other=0.0,
        )
        acc = mma(a, b, acc, PRECISION, UPCAST)
    wk, wc, wr, ws = _weight_strides(Cg, R, S, CHANNELS_LAST)
    out = (k * wk)[:, None] + (cc * wc)[None, :] + (r * wr + s * ws)
    out += piece.to(tl.int64) * K * Cg * R * S
    tl.store(dw_ptr + out, round_for_bfloat16(acc, TO_BF16), mask=kk_ok[:, None] & cc_ok[None, :])


@triton.jit
def _sum_pieces_kernel(
    part_ptr, out_ptr, total, PIECES, TO_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    # out[i] = sum over pieces of part[piece, i], in piece order: deterministic.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = i < total
    part = part_ptr + i
    acc = tl.load(part, mask=ok, other=0.0)
    for _ in range(1, PIECES):
        part += total  # a pointer step: piece * total may pass 2^31
        acc += tl.load(part, mask=ok, other=0.0)
    tl.store(out_ptr + i, round_for_bfloat16(acc, TO_BF16), mask=ok)


# ---- Direct kernels: depthwise and other one-channel-per-group convolutions ------------
#
# A depthwise conv (Cg == 1, Kg = m) or the transposed depthwise conv's ops (Kg == 1, Cg = m)
# reduces over at most a few channels, so a GEMM tile (>= 16 channels) is almost all padding.
# These kernels compute each element directly: one program per tile of an image (y, dx, or
# the dy a weight gradient reduces), a loop over the channels of its group and the taps. A tile
# is [BLOCK_M, BLOCK_N] elements: NHWC [pixels, channels], NCHW [(n, c, row), columns], so its
# contiguous axis is always the second. _image_tile returns each index as a [BLOCK_M, 1] or
# [1, BLOCK_N] tensor; the loop bodies broadcast them and so serve both layouts.


@jit_helper
def _image_tile(
    pid_m, pid_n, N, C, H, W,
    CHANNELS_LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """(n, c, h, w, in range) of tile (pid_m, pid_n) of an (N, C, H, W) image, int64."""
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    j = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    if CHANNELS_LAST:  # m = (n, h, w) pixels, j = channels
        w = (m % W)[:, None]
        h = ((m // W) % H)[:, None]
        n = (m // (W * H))[:, None]
        c = j[None, :]
        ok = (n < N) & (c < C)  # n < N, not m < N * H * W: that product may pass 2^31
    else:  # m = (n, c, h) rows, j = columns
        h = (m % H)[:, None]
        c = ((m // H) % C)[:, None]
        n = (m // (H * C))[:, None]
        w = j[None, :]
        ok = (n < N) & (w < W)
    return n, c, h, w, ok


def _image_grid(N, C, H, W, channels_last: bool):
    """The launch grid of _image_tile's tiles, for a kernel's BLOCK_M and BLOCK_N."""
    rows, cols = (N * H * W, C) if channels_last else (N * C * H, W)
    return lambda meta: (cdiv(rows, meta["BLOCK_M"]), cdiv(cols, meta["BLOCK_N"]))


@triton.jit
def _direct_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C, H, W, K, Ho, Wo, R, S, SH, SW, PH, PW, DH, DW, Cg, Kg,
    HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
    TO_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # y[n, k, p, q] = bias[k] + sum over (cg, r, s) of w[k, cg, r, s]
    #     * x[n, (k // Kg) * Cg + cg, p * SH - PH + r * DH, q * SW - PW + s * DW]
    n, k, p, q, out_ok = _image_tile(
        tl.program_id(0), tl.program_id(1), N, K, Ho, Wo, CHANNELS_LAST, BLOCK_M, BLOCK_N
    )
    k_ok = k < K
    c0 = (k // Kg) * Cg
    x_cs = _channel_stride(H, W, CHANNELS_LAST)
    wk, wc, wr, ws = _weight_strides(Cg, R, S, CHANNELS_LAST)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for t in range(0, Cg * R * S):
        cg = t // (R * S)
        r = (t // S) % R
        s = t % S
        h = p * SH - PH + r * DH
        w = q * SW - PW + s * DW
        ok = out_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)  # outside: zero padding
        at = _pixel_offset(n, h, w, C, H, W, CHANNELS_LAST) + (c0 + cg) * x_cs
        xv = tl.load(x_ptr + at, mask=ok, other=0.0)
        wv = tl.load(w_ptr + k * wk + (cg * wc + r * wr + s * ws), mask=k_ok, other=0.0)
        acc += xv.to(ACC) * wv.to(ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + k, mask=k_ok, other=0.0).to(ACC)
    out = _pixel_offset(n, p, q, K, Ho, Wo, CHANNELS_LAST) + k * _channel_stride(
        Ho, Wo, CHANNELS_LAST
    )
    tl.store(y_ptr + out, round_for_bfloat16(acc, TO_BF16), mask=out_ok)


@jit_helper
def _reader(i, PAD, T, DIL, STRIDE, OUT):
    """(o, valid) of the output o whose tap T reads image position i: o * STRIDE = i + PAD
    - T * DIL exactly, 0 <= o < OUT. The dividend is clamped first: no negative division."""
    num = i + PAD - T * DIL
    o = tl.maximum(num, 0) // STRIDE
    return o, (num >= 0) & (o * STRIDE == num) & (o < OUT)


@triton.jit
def _direct_bwd_input_kernel(
    dy_ptr, w_ptr, b_ptr, dx_ptr,
    N, C, H, W, K, Ho, Wo, R, S, SH, SW, PH, PW, DH, DW, Cg, Kg,
    HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
    TO_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # dx[n, c, i, j] = bias[c] + sum over the Kg output channels k of c's group and the taps
    # (r, s) whose output (ho, wo) reads (i, j) of dy[n, k, ho, wo] * w[k, c % Cg, r, s]: a
    # gather, each dx element written once (no atomics).
    n, c, i, j, in_ok = _image_tile(
        tl.program_id(0), tl.program_id(1), N, C, H, W, CHANNELS_LAST, BLOCK_M, BLOCK_N
    )
    c_ok = c < C
    k0 = (c // Cg) * Kg
    cg = c % Cg
    dy_cs = _channel_stride(Ho, Wo, CHANNELS_LAST)
    wk, wc, wr, ws = _weight_strides(Cg, R, S, CHANNELS_LAST)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for t in range(0, Kg * R * S):
        k = k0 + t // (R * S)
        r = (t // S) % R
        s = t % S
        ho, ho_ok = _reader(i, PH, r, DH, SH, Ho)
        wo, wo_ok = _reader(j, PW, s, DW, SW, Wo)
        ok = in_ok & ho_ok & wo_ok
        at = _pixel_offset(n, ho, wo, K, Ho, Wo, CHANNELS_LAST) + k * dy_cs
        dyv = tl.load(dy_ptr + at, mask=ok, other=0.0)
        wv = tl.load(w_ptr + k * wk + cg * wc + (r * wr + s * ws), mask=c_ok, other=0.0)
        acc += dyv.to(ACC) * wv.to(ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)
    out = _pixel_offset(n, i, j, C, H, W, CHANNELS_LAST) + c * _channel_stride(H, W, CHANNELS_LAST)
    tl.store(dx_ptr + out, round_for_bfloat16(acc, TO_BF16), mask=in_ok)


@triton.jit
def _direct_bwd_weight_kernel(
    dy_ptr, x_ptr, dw_ptr,
    N, C, H, W, K, Ho, Wo, R, S, SH, SW, PH, PW, DH, DW, Cg, Kg, ROWS, ROW_CHUNK,
    CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # dw[k, cg, r, s] = sum over (n, p, q) of dy[n, k, p, q]
    #     * x[n, (k // Kg) * Cg + cg, p * SH - PH + r * DH, q * SW - PW + s * DW].
    # One program per (tap, cg, output channels: BLOCK_N of them in NHWC, one in NCHW) and per
    # piece of ROW_CHUNK of dy's ROWS rows (program_id(1)): NHWC rows are pixels (n, p, q),
    # NCHW rows (n, p) of Wo columns. Its [BLOCK_M, BLOCK_N] products are summed elementwise
    # over the piece, then reduced in the tile. With more than one piece it writes float
    # partial sums to dw_ptr's piece, summed in order by _sum_pieces_kernel.
    pid = tl.program_id(0)
    piece = tl.program_id(1)
    rs = pid % (R * S)
    r = rs // S
    s = rs % S
    cg = (pid // (R * S)) % Cg
    k_tile = (pid // (R * S * Cg)).to(tl.int64)
    if CHANNELS_LAST:  # a tile's columns: BLOCK_N channels
        col_tiles = 1
    else:  # a tile's columns: q, of the one channel k_tile
        col_tiles = tl.cdiv(Wo, BLOCK_N)
    row0 = piece.to(tl.int64) * ROW_CHUNK
    row_end = tl.minimum(row0 + ROW_CHUNK, ROWS)
    dy_cs = _channel_stride(Ho, Wo, CHANNELS_LAST)
    x_cs = _channel_stride(H, W, CHANNELS_LAST)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for t in range(0, tl.cdiv(row_end - row0, BLOCK_M) * col_tiles):
        m = row0 + (t // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        j = (t % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        if CHANNELS_LAST:
            q = (m % Wo)[:, None]
            p = ((m // Wo) % Ho)[:, None]
            n = (m // (Wo * Ho))[:, None]
            k = k_tile * BLOCK_N + j[None, :]
            ok = (m < row_end)[:, None] & (k < K)
        else:
            p = (m % Ho)[:, None]
            n = (m // Ho)[:, None]
            q = j[None, :]
            k = k_tile
            ok = (m < row_end)[:, None] & (q < Wo)
        dyv = tl.load(
            dy_ptr + _pixel_offset(n, p, q, K, Ho, Wo, CHANNELS_LAST) + k * dy_cs,
            mask=ok,
            other=0.0,
        )
        h = p * SH - PH + r * DH
        w = q * SW - PW + s * DW
        x_ok = ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        c = (k // Kg) * Cg + cg
        xv = tl.load(
            x_ptr + _pixel_offset(n, h, w, C, H, W, CHANNELS_LAST) + c * x_cs,
            mask=x_ok,
            other=0.0,
        )
        acc += dyv.to(ACC) * xv.to(ACC)
    wk, wc, wr, ws = _weight_strides(Cg, R, S, CHANNELS_LAST)
    at = cg * wc + r * wr + s * ws + piece.to(tl.int64) * K * Cg * R * S
    if CHANNELS_LAST:
        k = k_tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        total = round_for_bfloat16(tl.sum(acc, axis=0), TO_BF16)
        tl.store(dw_ptr + at + k * wk, total, mask=k < K)
    else:
        total = round_for_bfloat16(tl.sum(tl.sum(acc, axis=1), axis=0), TO_BF16)
        tl.store(dw_ptr + at + k_tile * wk, total)


# ---- Launchers --------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): wgmma tiles for 16-bit and TF32 operands
# (float32 without TF32 runs them as FMA loops); float64 runs smaller tiles (8-byte operands,
# mma.sync only).
_TILES = (
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 32, 4, 3),
    (64, 64, 64, 4, 3),
)
_FP64_TILES = ((64, 64, 32, 4, 3), (64, 32, 32, 4, 3), (32, 32, 32, 4, 3))
_INTERP_TILE = (64, 64, 32)  # few programs and loop trips: the interpreter pays per op


def _launcher(kernel, key: tuple, channels_last: bool, fp64: bool, dims: tuple, swizzle: bool):
    """`kernel` autotuned over the tiles that fit dims = (M, N, K) of its GEMM."""
    caps = tuple(dot_block(d, 128) for d in dims)  # one launcher per cap class, not per shape
    return _capped_launcher(kernel, key, channels_last, fp64, caps, swizzle)


@functools.cache
def _capped_launcher(kernel, key, channels_last, fp64, caps, swizzle):
    """One launcher per layout and precision class too, so their tuned configs never mix."""
    extra = {"GROUP_M": 8} if swizzle else {}
    configs, seen = [], set()
    for bm, bn, bk, warps, stages in _FP64_TILES if fp64 else _TILES:
        tile = tuple(dot_block(d, b) for d, b in zip(caps, (bm, bn, bk), strict=True))
        if (tile, warps, stages) not in seen:
            seen.add((tile, warps, stages))
            blocks = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tile, strict=True))
            configs.append(triton.Config(blocks | extra, num_warps=warps, num_stages=stages))
    interp = dict(
        zip(
            ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
            (dot_block(d, b) for d, b in zip(caps, _INTERP_TILE, strict=True)),
            strict=True,
        )
    )
    return autotune(configs, list(key), interp | extra)(kernel)


def _dtype_args(dtype: torch.dtype) -> dict:
    """The accumulate type and tl.dot precision of operands of `dtype` (kernel constexprs)."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
        "PRECISION": "tf32" if tf32 else "ieee",
        "UPCAST": interpreted() and dtype == torch.bfloat16,
        "TO_BF16": dtype == torch.bfloat16,
    }


def _native(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t in the layout the kernels index (a no-op for callers that already pass it)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _new_4d(a, b, c, d, dtype, device, channels_last: bool) -> torch.Tensor:
    """(a, b, c, d) output, (a, c, d, b) in memory when channels_last."""
    if channels_last:
        return new_output((a, c, d, b), dtype, device).permute(0, 3, 1, 2)
    return new_output((a, b, c, d), dtype, device)


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pieces_target(device: torch.device) -> int:
    """Programs wanted to fill the device: two per SM; a few under the interpreter."""
    if interpreted() or device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 2 * torch.cuda.get_device_properties(index).multi_processor_count


_FWD_KEY = ("N", "C", "H", "W", "K", "R", "S", "SH", "SW", "Cg")
_BWD_WEIGHT_KEY = ("N", "C", "H", "W", "K", "R", "S", "SH", "SW", "Cg", "P_CHUNK")

# The direct kernels' tiles, (BLOCK_M, BLOCK_N, num_warps) per layout: NCHW [rows, columns],
# NHWC [pixels, channels]; the interpreter's are larger (it pays per op, not per element).
_DIRECT_TILES = {
    False: ((8, 128, 4), (16, 64, 4), (32, 32, 4), (64, 16, 4), (32, 64, 8)),
    True: ((8, 128, 4), (16, 64, 4), (32, 32, 4), (64, 16, 4), (128, 8, 4)),
}
_DIRECT_INTERP_TILE = {False: (32, 16), True: (64, 16)}
_DIRECT_MAX_CG = 8  # Kg == 1 groups of up to this many input channels also run direct
_DIRECT_BWD_WEIGHT_KEY = (*_FWD_KEY, "ROW_CHUNK")


def _direct(Cg: int, Kg: int) -> bool:
    """True when the direct kernels serve a conv: depthwise (Cg == 1, Kg = the multiplier),
    and the ops of a depthwise conv_transpose2d (weight (C, m, R, S): Kg == 1, Cg = m)."""
    return Cg == 1 or (Kg == 1 and Cg <= _DIRECT_MAX_CG)


@functools.cache
def _direct_launcher(kernel, channels_last: bool):
    """`kernel` autotuned over its layout's tiles (a fixed tile under the interpreter)."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps)
        for bm, bn, warps in _DIRECT_TILES[channels_last]
    ]
    key = _DIRECT_BWD_WEIGHT_KEY if kernel is _direct_bwd_weight_kernel else _FWD_KEY
    interp = dict(zip(("BLOCK_M", "BLOCK_N"), _DIRECT_INTERP_TILE[channels_last], strict=True))
    return autotune(configs, list(key), interp)(kernel)


def _direct_fwd(x, weight, bias, y, stride, padding, dilation, Cg, Kg, channels_last):
    N, C, H, W = x.shape
    K, _, R, S = weight.shape
    _, _, Ho, Wo = y.shape
    _direct_launcher(_direct_fwd_kernel, channels_last)[_image_grid(N, K, Ho, Wo, channels_last)](
        _native(x, channels_last), _native(weight, channels_last),
        bias.contiguous() if bias is not None else x, y,
        N, C, H, W, K, Ho, Wo, R, S, *stride, *padding, *dilation, Cg, Kg,
        HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last,
        ACC=_dtype_args(x.dtype)["ACC"], TO_BF16=x.dtype == torch.bfloat16,
    )  # fmt: skip
    return y


def _direct_bwd_input(grad_y, weight, bias, dx, stride, padding, dilation, Cg, Kg, channels_last):
    N, C, H, W = dx.shape
    K, _, R, S = weight.shape
    _, _, Ho, Wo = grad_y.shape
    launch = _direct_launcher(_direct_bwd_input_kernel, channels_last)
    launch[_image_grid(N, C, H, W, channels_last)](
        _native(grad_y, channels_last), _native(weight, channels_last),
        bias.contiguous() if bias is not None else grad_y, dx,
        N, C, H, W, K, Ho, Wo, R, S, *stride, *padding, *dilation, Cg, Kg,
        HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last,
        ACC=_dtype_args(dx.dtype)["ACC"], TO_BF16=dx.dtype == torch.bfloat16,
    )  # fmt: skip
    return dx


def _direct_bwd_weight(grad_y, x, dw, stride, padding, dilation, Cg, Kg, channels_last):
    """dw by _direct_bwd_weight_kernel; pieces of rows as conv2d_bwd_weight cuts pixels."""
    N, K, Ho, Wo = grad_y.shape
    _, C, H, W = x.shape
    _, _, R, S = dw.shape
    rows, row_pixels = (N * Ho * Wo, 1) if channels_last else (N * Ho, Wo)
    programs = (cdiv(K, 32) if channels_last else K) * Cg * R * S
    # Direct programs are light (4 warps, no shared memory): several per SM fill a GPU.
    target = _pieces_target(x.device) * (1 if interpreted() else 4)
    min_rows = cdiv(64 if interpreted() else 2048, row_pixels)
    pieces = max(1, min(cdiv(target, programs), cdiv(rows, min_rows)))
    chunk = cdiv(rows, pieces)
    pieces = cdiv(rows, chunk)
    to_bf16 = x.dtype == torch.bfloat16
    acc = _dtype_args(x.dtype)["ACC"]
    if pieces > 1:
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = torch.empty((pieces, dw.numel()), dtype=acc_dtype, device=x.device)
    else:
        out = dw
    grid = lambda meta: (  # noqa: E731
        (cdiv(K, meta["BLOCK_N"]) if channels_last else K) * Cg * R * S,
        pieces,
    )
    _direct_launcher(_direct_bwd_weight_kernel, channels_last)[grid](
        _native(grad_y, channels_last), _native(x, channels_last), out,
        N, C, H, W, K, Ho, Wo, R, S, *stride, *padding, *dilation, Cg, Kg, rows, chunk,
        CHANNELS_LAST=channels_last, ACC=acc, TO_BF16=to_bf16 and pieces == 1,
    )  # fmt: skip
    if pieces > 1:
        block = 1024
        _sum_pieces_kernel[(cdiv(dw.numel(), block),)](
            out, dw, dw.numel(), pieces, TO_BF16=to_bf16, BLOCK=block
        )
    return dw


def conv2d_fwd(x, weight, bias, stride, padding, dilation, groups, channels_last, workspace_bytes):
    """y (N, K, Ho, Wo) = conv2d(x, weight) + bias[k]; one program per (pixel tile, output
    channel tile) of a group, reducing over that group's (r, s, c)."""
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    Kg = K // groups
    Ho = _out_size(H, R, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, S, stride[1], padding[1], dilation[1])
    y = _new_4d(N, K, Ho, Wo, x.dtype, x.device, channels_last)
    if y.numel() == 0:
        return y
    if _direct(Cg, Kg):
        return _direct_fwd(x, weight, bias, y, stride, padding, dilation, Cg, Kg, channels_last)
    M = N * Ho * Wo
    launch = _launcher(
        _conv2d_fwd_kernel, _FWD_KEY, channels_last, x.dtype == torch.float64, (M, Kg, Cg), True
    )
    grid = lambda meta: (  # noqa: E731
        cdiv(M, meta["BLOCK_M"]) * cdiv(Kg, meta["BLOCK_N"]),
        groups,
    )
    launch[grid](
        _native(x, channels_last), _native(weight, channels_last),
        bias.contiguous() if bias is not None else x, y,
        N, C, H, W, K, Ho, Wo, R, S, *stride, *padding, *dilation, Cg, Kg,
        HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last, **_dtype_args(x.dtype),
    )  # fmt: skip
    return y


def conv2d_bwd_input(
    grad_y, weight, bias, in_size, stride, padding, dilation, groups, channels_last,
    workspace_bytes,
):  # fmt: skip
    """dx (N, C, H, W): every input pixel gathers grad_y * w over the taps that read it (no
    atomics), + bias[c]: conv_transpose2d's forward."""
    N, K, Ho, Wo = grad_y.shape
    _, Cg, R, S = weight.shape
    H, W = in_size
    C = Cg * groups
    Kg = K // groups
    dx = _new_4d(N, C, H, W, grad_y.dtype, grad_y.device, channels_last)
    if dx.numel() == 0:
        return dx
    if _direct(Cg, Kg):
        return _direct_bwd_input(
            grad_y, weight, bias, dx, stride, padding, dilation, Cg, Kg, channels_last
        )
    (sh, sw), (dh, dw) = stride, dilation
    gcd_h, gcd_w = math.gcd(dh, sh), math.gcd(dw, sw)
    # The inverse of d / gcd modulo s / gcd names the first tap of each phase (_phase_taps).
    inv_h, inv_w = pow(dh // gcd_h, -1, sh // gcd_h), pow(dw // gcd_w, -1, sw // gcd_w)
    M = N * cdiv(H, sh) * cdiv(W, sw)  # pixels of the largest phase
    launch = _launcher(
        _conv2d_bwd_input_kernel, _FWD_KEY, channels_last, grad_y.dtype == torch.float64,
        (M, Cg, Kg), True,
    )  # fmt: skip
    grid = lambda meta: (  # noqa: E731
        sh * sw * cdiv(M, meta["BLOCK_M"]) * cdiv(Cg, meta["BLOCK_N"]),
        groups,
    )
    launch[grid](
        _native(grad_y, channels_last), _native(weight, channels_last),
        bias.contiguous() if bias is not None else grad_y, dx,
        N, C, H, W, K, Ho, Wo, R, S, *stride, *padding, *dilation, Cg, Kg,
        gcd_h, gcd_w, inv_h, inv_w,
        HAS_BIAS=bias is not None, CHANNELS_LAST=channels_last, **_dtype_args(grad_y.dtype),
    )  # fmt: skip
    return dx


def conv2d_bwd_weight(
    grad_y, x, kernel_size, stride, padding, dilation, groups, channels_last, workspace_bytes
):
    """dw (K, Cg, R, S) = grad_y im2col(x)^T over all N * Ho * Wo pixels. When the tiles alone
    would leave the device idle, the pixels are cut into pieces reduced separately into float
    partials and summed in order afterwards (deterministic)."""
    N, K, Ho, Wo = grad_y.shape
    _, C, H, W = x.shape
    R, S = kernel_size
    Cg = C // groups
    Kg = K // groups
    dw = _new_4d(K, Cg, R, S, x.dtype, x.device, channels_last)
    if dw.numel() == 0:
        return dw
    P = N * Ho * Wo
    if P == 0:
        return dw.zero_()  # an empty sum
    if _direct(Cg, Kg):
        return _direct_bwd_weight(grad_y, x, dw, stride, padding, dilation, Cg, Kg, channels_last)
    args = _dtype_args(x.dtype)
    tiles = groups * cdiv(Kg, 64) * cdiv(Cg, 64) * R * S
    min_chunk = 64 if interpreted() else 2048  # enough pixels a piece to hide its launch
    pieces = max(1, min(cdiv(_pieces_target(x.device), tiles), cdiv(P, min_chunk)))
    chunk = cdiv(P, pieces)
    pieces = cdiv(P, chunk)
    if pieces > 1:
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = torch.empty((pieces, dw.numel()), dtype=acc_dtype, device=x.device)
        args["TO_BF16"] = False  # partials stay in the accumulate type
    else:
        out = dw
    launch = _launcher(
        _conv2d_bwd_weight_kernel, _BWD_WEIGHT_KEY, channels_last, x.dtype == torch.float64,
        (Kg, Cg, P), False,
    )  # fmt: skip
    grid = lambda meta: (  # noqa: E731
        cdiv(Kg, meta["BLOCK_M"]) * cdiv(Cg, meta["BLOCK_N"]) * R * S,
        groups,
        pieces,
    )
    launch[grid](
        _native(grad_y, channels_last), _native(x, channels_last), out,
        N, C, H, W, K, Ho, Wo, R, S, *stride, *padding, *dilation, Cg, Kg, chunk,
        CHANNELS_LAST=channels_last, **args,
    )  # fmt: skip
    if pieces > 1:
        block = 1024
        # One program per BLOCK elements of dw, in its memory order (as the partials are).
        _sum_pieces_kernel[(cdiv(dw.numel(), block),)](
            out, dw, dw.numel(), pieces, TO_BF16=x.dtype == torch.bfloat16, BLOCK=block
        )
    return dw
