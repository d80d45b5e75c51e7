"""Normalization family in Triton: row norm (LayerNorm, RMSNorm, their residual-add forms,
LayerNorm2d) and BatchNorm (statistics, forward with fused add/ReLU, the two backward passes).

Triton twin of csrc/cpu/norm.cpp and csrc/cuda/norm.cu, same argument order and results (the
contract: csrc/pykern.h, "normalization"). Big tensors are contiguous (B, C, K) views; math runs
in "acc" (float64 for float64 input, else float32); every cross-program reduction writes
per-program partials and reduces them in a fixed order (no atomics), so results are
deterministic.

Every kernel works on [BLOCK_C, BLOCK_K] tiles of (c, k). When K == 1 (LayerNorm rows, NHWC
images) the view is read as (1, C, B): "k" then runs over the B rows and c is the contiguous
axis (C_CONTIG), so one kernel serves both layouts, each read in its native order.
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from pykern.triton_kernels._launch import (
    autotune,
    cdiv,
    interpreted,
    jit_helper,
    new_output,
    next_power_of_2,
    program_tile,
    round_for_bfloat16,
)

# Row norm keeps a whole row of C in registers up to this many columns (K == 1), or this many
# channels for K > 1 tiles ({C_CONTIG: size}); beyond, it loops over C in chunks (two passes).
# The backward holds more tensors a thread (and the partial sums): smaller rows, or it spills.
_ROW_FWD_SINGLE_MAX = {True: 16384, False: 1024}
_ROW_BWD_SINGLE_MAX = {True: 8192, False: 1024}
_ROW_CHUNK = {True: 4096, False: 128}


# ---- shared helpers ---------------------------------------------------------------------------
#
# Helpers are jit_helper functions (_launch.py): inlined on a GPU, plain Python when interpreted.


@jit_helper
def _offsets(b, c, k, C, K, C_CONTIG: tl.constexpr):
    """[BLOCK_C, BLOCK_K] int64 offsets of elements (b, c, k) of a contiguous (B, C, K) tensor;
    with C_CONTIG (K == 1) "k" is the row and b is 0."""
    if C_CONTIG:
        return k[None, :] * C + c[:, None]
    else:
        return (b * C + c[:, None]) * K + k[None, :]


@jit_helper
def _first_k(c, K, C_CONTIG: tl.constexpr):
    """Offsets of elements (0, c, 0): the first of each channel."""
    if C_CONTIG:
        return c
    else:
        return c * K


@jit_helper
def _finite_or_zero(v):
    # The shift of the shifted-data variance: any finite value near the data will do.
    return tl.where(v - v == 0, v, 0.0)


@jit_helper
def _inv_sqrt(v, ACC: tl.constexpr):
    """1 / sqrt(v), correctly rounded steps (not the approximate rsqrt)."""
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(v))


@jit_helper
def _pair(HI, LO, ACC: tl.constexpr):
    # Float arguments arrive as float32: eps and count travel as float32 pairs (hi + lo),
    # exact enough for float64 math.
    return tl.cast(HI, ACC) + tl.cast(LO, ACC)


@jit_helper
def _load_vec(ptr, c, c_ok, HAS: tl.constexpr, default, ACC: tl.constexpr):
    """ptr[c] as acc, or `default` everywhere when the optional vector is absent."""
    if HAS:
        return tl.load(ptr + c, mask=c_ok, other=default).to(ACC)
    else:
        return tl.full(c.shape, default, ACC)


@jit_helper
def _channel_invstd(var_ptr, c, c_ok, EPS_HI, EPS_LO, ACC: tl.constexpr):
    """1 / sqrt(var[c] + eps) as acc, var stored as acc or as x's dtype."""
    return _inv_sqrt(_load_vec(var_ptr, c, c_ok, True, 1.0, ACC) + _pair(EPS_HI, EPS_LO, ACC), ACC)


@jit_helper
def _load_s(x_ptr, r_ptr, at, ok, HAS_RES: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr):
    """s = x (+ residual), rounded to x's dtype as torch's x + residual is, returned as acc."""
    x = tl.load(x_ptr + at, mask=ok, other=0.0)
    if HAS_RES:
        s = x.to(ACC) + tl.load(r_ptr + at, mask=ok, other=0.0).to(ACC)
        return round_for_bfloat16(s, TO_BF16).to(x.dtype).to(ACC)
    else:
        return x.to(ACC)


@jit_helper
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = tl.where(n > 0, n_b / tl.where(n > 0, n, 1.0), 0.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


# ---- row norm forward ---------------------------------------------------------------------------


@triton.jit
def _row_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, bias_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr,
    C, K, EPS_HI, EPS_LO, TUNE,
    C_CONTIG: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    RMS: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program per (b, tile of BLOCK_K columns k); each column is normalized over C.
    pid = tl.program_id(0).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    b = pid // k_tiles
    k = (pid % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    k_ok = k < K
    c = tl.arange(0, BLOCK_C).to(tl.int64)
    eps = _pair(EPS_HI, EPS_LO, ACC)
    if SINGLE:  # the whole of C in one tile: read once, two-pass variance in registers
        c_ok = c < C
        ok = c_ok[:, None] & k_ok[None, :]
        at = _offsets(b, c, k, C, K, C_CONTIG)
        s = _load_s(x_ptr, r_ptr, at, ok, HAS_RES, ACC, TO_BF16)
        if HAS_RES:
            tl.store(s_ptr + at, s, mask=ok)  # exact: s is already rounded to x's dtype
        if RMS:
            rstd = _inv_sqrt(tl.sum(s * s, axis=0) / C + eps, ACC)
            xhat = s * rstd[None, :]
        else:
            # Corrected two-pass: d = s - (plain mean) is exact even with a mean far from 0
            # (1e4, spread 1 in float32), and sum(d) / C corrects the plain mean's rounding,
            # so mean and y are as accurate as the variance.
            mean0 = tl.sum(s, axis=0) / C
            d = tl.where(ok, s - mean0[None, :], 0.0)
            corr = tl.sum(d, axis=0) / C
            var = tl.maximum(tl.sum(d * d, axis=0) / C - corr * corr, 0.0)
            rstd = _inv_sqrt(var + eps, ACC)
            xhat = (d - corr[None, :]) * rstd[None, :]
            mean = mean0 + corr
        w = _load_vec(w_ptr, c, c_ok, HAS_W, 1.0, ACC)
        bias = _load_vec(bias_ptr, c, c_ok, HAS_B, 0.0, ACC)
        y = xhat * w[:, None] + bias[:, None]
        tl.store(y_ptr + at, round_for_bfloat16(y, TO_BF16), mask=ok)
    else:  # C in chunks: pass 1 merges per-chunk (count, mean, M2), pass 2 writes y
        if not RMS:
            # Everything of s - shift, shift the plain mean of the first chunk: close to the
            # mean, so the differences are exact and the chunk means carry no offset rounding.
            c_ok = c < C
            ok = c_ok[:, None] & k_ok[None, :]
            s = _load_s(x_ptr, r_ptr, _offsets(b, c, k, C, K, C_CONTIG), ok, HAS_RES, ACC, TO_BF16)
            shift = _finite_or_zero(tl.sum(s, axis=0) / tl.sum(c_ok.to(ACC), axis=0))
        n = tl.zeros([BLOCK_K], ACC)
        mean = tl.zeros([BLOCK_K], ACC)
        m2 = tl.zeros([BLOCK_K], ACC)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + c
            c_ok = cc < C
            ok = c_ok[:, None] & k_ok[None, :]
            at = _offsets(b, cc, k, C, K, C_CONTIG)
            s = _load_s(x_ptr, r_ptr, at, ok, HAS_RES, ACC, TO_BF16)
            if HAS_RES:
                tl.store(s_ptr + at, s, mask=ok)
            if RMS:
                m2 += tl.sum(s * s, axis=0)
            else:
                d = tl.where(ok, s - shift[None, :], 0.0)
                n_b = tl.sum(c_ok.to(ACC), axis=0)
                mean_b = tl.sum(d, axis=0) / n_b
                d = tl.where(ok, d - mean_b[None, :], 0.0)
                n, mean, m2 = _chan(n, mean, m2, n_b, mean_b, tl.sum(d * d, axis=0))
        rstd = _inv_sqrt(m2 / C + eps, ACC)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + c
            c_ok = cc < C
            ok = c_ok[:, None] & k_ok[None, :]
            at = _offsets(b, cc, k, C, K, C_CONTIG)
            s = _load_s(x_ptr, r_ptr, at, ok, HAS_RES, ACC, TO_BF16)
            if RMS:
                xhat = s * rstd[None, :]
            else:
                xhat = ((s - shift[None, :]) - mean[None, :]) * rstd[None, :]
            w = _load_vec(w_ptr, cc, c_ok, HAS_W, 1.0, ACC)
            bias = _load_vec(bias_ptr, cc, c_ok, HAS_B, 0.0, ACC)
            y = xhat * w[:, None] + bias[:, None]
            tl.store(y_ptr + at, round_for_bfloat16(y, TO_BF16), mask=ok)
        if not RMS:
            mean = shift + mean
    if not RMS:
        tl.store(mean_ptr + b * K + k, mean, mask=k_ok)
    tl.store(rstd_ptr + b * K + k, rstd, mask=k_ok)


@jit_helper
def _row_mean(mean_ptr, b, k, K, k_ok, RMS: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """The saved mean of each (b, k) of a tile; 0 for RMSNorm, which saves none."""
    if RMS:
        return tl.zeros([BLOCK_K], ACC)
    else:
        return tl.load(mean_ptr + b * K + k, mask=k_ok, other=0.0)


@jit_helper
def _bwd_terms(dy_ptr, x_ptr, at, ok, w, mean, rstd, ACC: tl.constexpr):
    """(dy, xhat, g = dy * w) of one [BLOCK_C, BLOCK_K] chunk in acc; masked lanes are 0."""
    dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(ACC)
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(ACC)
    xhat = tl.where(ok, (x - mean[None, :]) * rstd[None, :], 0.0)
    return dy, xhat, dy * w[:, None]


@jit_helper
def _row_dx(g, xhat, rstd, c1, c2, RMS: tl.constexpr):
    """dx of one chunk from c1 = mean_c(g * xhat) and c2 = mean_c(g) (unused for RMS)."""
    if RMS:
        return rstd[None, :] * (g - xhat * c1[None, :])
    else:
        return rstd[None, :] * (g - c2[None, :] - xhat * c1[None, :])


# ---- row norm backward --------------------------------------------------------------------------


@triton.jit
def _row_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, gs_ptr, dx_ptr, dw_ptr, db_ptr,
    C, K, B, TUNE,
    C_CONTIG: tl.constexpr, HAS_W: tl.constexpr, HAS_GS: tl.constexpr, RMS: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, SINGLE: tl.constexpr, ACC: tl.constexpr,
    TO_BF16: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # A fixed grid of G programs; program p takes column tiles p, p + G, ... in order and
    # writes its parameter-gradient partial sums to row p of the (G, C) buffers dw / db.
    pid = tl.program_id(0).to(tl.int64)
    G = tl.num_programs(0).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    T = B * k_tiles
    c = tl.arange(0, BLOCK_C).to(tl.int64)
    if SINGLE:
        c_ok = c < C
        w = _load_vec(w_ptr, c, c_ok, HAS_W, 1.0, ACC)
        dw = tl.zeros([BLOCK_C, BLOCK_K], ACC)  # per lane: reduced over k once, at the end
        db = tl.zeros([BLOCK_C, BLOCK_K], ACC)
        for t in range(pid, T, G):
            b = t // k_tiles
            k = (t % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = k < K
            ok = c_ok[:, None] & k_ok[None, :]
            at = _offsets(b, c, k, C, K, C_CONTIG)
            rstd = tl.load(rstd_ptr + b * K + k, mask=k_ok, other=0.0)
            mean = _row_mean(mean_ptr, b, k, K, k_ok, RMS, ACC, BLOCK_K)
            dy, xhat, g = _bwd_terms(dy_ptr, x_ptr, at, ok, w, mean, rstd, ACC)
            c1 = tl.sum(g * xhat, axis=0) / C
            c2 = tl.sum(g, axis=0) / C
            dx = _row_dx(g, xhat, rstd, c1, c2, RMS)
            if HAS_GS:
                dx += tl.load(gs_ptr + at, mask=ok, other=0.0).to(ACC)
            tl.store(dx_ptr + at, round_for_bfloat16(dx, TO_BF16), mask=ok)
            if NEED_DW:
                dw += dy * xhat
            if NEED_DB:
                db += dy
        if NEED_DW:
            tl.store(dw_ptr + pid * C + c, tl.sum(dw, axis=1), mask=c_ok)
        if NEED_DB:
            tl.store(db_ptr + pid * C + c, tl.sum(db, axis=1), mask=c_ok)
    else:  # C in chunks: pass 1 sums g and g * xhat, pass 2 writes dx and the partials
        for t in range(pid, T, G):
            b = t // k_tiles
            k = (t % k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
            k_ok = k < K
            rstd = tl.load(rstd_ptr + b * K + k, mask=k_ok, other=0.0)
            mean = _row_mean(mean_ptr, b, k, K, k_ok, RMS, ACC, BLOCK_K)
            sum_g = tl.zeros([BLOCK_K], ACC)
            sum_gx = tl.zeros([BLOCK_K], ACC)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + c
                c_ok = cc < C
                ok = c_ok[:, None] & k_ok[None, :]
                at = _offsets(b, cc, k, C, K, C_CONTIG)
                w = _load_vec(w_ptr, cc, c_ok, HAS_W, 1.0, ACC)
                dy, xhat, g = _bwd_terms(dy_ptr, x_ptr, at, ok, w, mean, rstd, ACC)
                sum_g += tl.sum(g, axis=0)
                sum_gx += tl.sum(g * xhat, axis=0)
            c1 = sum_gx / C
            c2 = sum_g / C
            # Pass 2 reads back this program's partial row, written by the previous tile
            # (possibly by other threads of the program): all of those stores come first.
            tl.debug_barrier()
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + c
                c_ok = cc < C
                ok = c_ok[:, None] & k_ok[None, :]
                at = _offsets(b, cc, k, C, K, C_CONTIG)
                w = _load_vec(w_ptr, cc, c_ok, HAS_W, 1.0, ACC)
                dy, xhat, g = _bwd_terms(dy_ptr, x_ptr, at, ok, w, mean, rstd, ACC)
                dx = _row_dx(g, xhat, rstd, c1, c2, RMS)
                if HAS_GS:
                    dx += tl.load(gs_ptr + at, mask=ok, other=0.0).to(ACC)
                tl.store(dx_ptr + at, round_for_bfloat16(dx, TO_BF16), mask=ok)
                # This program's own partial row: no other program touches it.
                if NEED_DW:
                    old = tl.load(dw_ptr + pid * C + cc, mask=c_ok & (t > pid), other=0.0)
                    tl.store(dw_ptr + pid * C + cc, old + tl.sum(dy * xhat, axis=1), mask=c_ok)
                if NEED_DB:
                    old = tl.load(db_ptr + pid * C + cc, mask=c_ok & (t > pid), other=0.0)
                    tl.store(db_ptr + pid * C + cc, old + tl.sum(dy, axis=1), mask=c_ok)
        if pid >= T:  # no tile for this program: its partials are zeros
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + c
                if NEED_DW:
                    tl.store(dw_ptr + pid * C + cc, tl.zeros([BLOCK_C], ACC), mask=cc < C)
                if NEED_DB:
                    tl.store(db_ptr + pid * C + cc, tl.zeros([BLOCK_C], ACC), mask=cc < C)


@triton.jit
def _sum_rows_kernel(
    a_ptr, out_a_ptr, b_ptr, out_b_ptr, P, C,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # out[c] = sum over the P rows of the (P, C) partials, in a fixed order; one program per
    # BLOCK_C columns, for one or two buffers at once.
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = c < C
    acc_a = tl.zeros([BLOCK_C], ACC)
    acc_b = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        ok = (p < P)[:, None] & c_ok[None, :]
        at = p[:, None] * C + c[None, :]
        if HAS_A:
            acc_a += tl.sum(tl.load(a_ptr + at, mask=ok, other=0.0), axis=0)
        if HAS_B:
            acc_b += tl.sum(tl.load(b_ptr + at, mask=ok, other=0.0), axis=0)
    if HAS_A:
        tl.store(out_a_ptr + c, acc_a, mask=c_ok)
    if HAS_B:
        tl.store(out_b_ptr + c, acc_b, mask=c_ok)


# ---- batch norm -------------------------------------------------------------------------------
#
# The per-channel reductions split the (b, k) index space into P = B * NKC pieces (each b, k in
# chunks of KCHUNK); a program reduces one piece for BLOCK_C channels into row p of a (P, C)
# partial buffer, and a second kernel merges the P rows of each channel in order.


@jit_helper
def _bn_piece(pid, C, K, KCHUNK, NKC, BLOCK_C: tl.constexpr):
    """(piece p, its b, its k range [k_lo, k_hi), channels c) of program pid."""
    c_tiles = tl.cdiv(C, BLOCK_C)
    c = (pid % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    p = pid // c_tiles
    b = p // NKC
    k_lo = (p % NKC) * KCHUNK
    k_hi = tl.minimum(k_lo + KCHUNK, K)
    return p, b, k_lo, k_hi, c


@triton.jit
def _bn_stats_partial_kernel(
    x_ptr, pmean_ptr, pm2_ptr,
    C, K, KCHUNK, NKC, TUNE,
    C_CONTIG: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # (mean, M2) of one piece for BLOCK_C channels: Welford in every lane of the tile (no
    # reduction inside the loop), the lanes merged exactly at the end. All of x - shift, shift
    # each channel's first value (the same in every piece): with a mean far from 0 the
    # differences are exact, so the means carry no rounding of the offset.
    pid = tl.program_id(0).to(tl.int64)
    p, b, k_lo, k_hi, c = _bn_piece(pid, C, K, KCHUNK, NKC, BLOCK_C)
    c_ok = c < C
    shift = _finite_or_zero(tl.load(x_ptr + _first_k(c, K, C_CONTIG), mask=c_ok, other=0.0).to(ACC))
    n = tl.zeros([1, BLOCK_K], ACC)  # values each k lane has seen
    mean = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    m2 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = k < k_hi
        ok = c_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + _offsets(b, c, k, C, K, C_CONTIG), mask=ok, other=0.0).to(ACC)
        d = x - shift[:, None]
        n += k_ok.to(ACC)[None, :]
        delta = tl.where(ok, d - mean, 0.0)
        mean += delta * (1.0 / tl.maximum(n, 1.0))
        m2 += delta * tl.where(ok, d - mean, 0.0)
    count = tl.sum(n, axis=1)
    mean_c = tl.sum(n * mean, axis=1) / count
    dev = mean - mean_c[:, None]
    m2_c = tl.sum(m2, axis=1) + tl.sum(n * dev * dev, axis=1)
    tl.store(pmean_ptr + p * C + c, mean_c, mask=c_ok)
    tl.store(pm2_ptr + p * C + c, m2_c, mask=c_ok)


@triton.jit
def _bn_stats_merge_kernel(
    x_ptr, pmean_ptr, pm2_ptr, mean_ptr, var_ptr,
    C, K, KCHUNK, NKC, P,
    C_CONTIG: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Merges the P pieces of BLOCK_C channels in order: each block of BLOCK_P pieces exactly
    # (weighted mean, then M2 plus the spread of the piece means), then Chan across blocks.
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    c_ok = c < C
    n = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        p_ok = p < P
        ok = p_ok[:, None] & c_ok[None, :]
        k_lo = (p % NKC) * KCHUNK
        count = tl.where(p_ok, tl.minimum(k_lo + KCHUNK, K) - k_lo, 0).to(ACC)
        pm = tl.load(pmean_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        pq = tl.load(pm2_ptr + p[:, None] * C + c[None, :], mask=ok, other=0.0)
        n_b = tl.sum(count, axis=0)
        mean_b = tl.sum(count[:, None] * pm, axis=0) / n_b
        d = tl.where(ok, pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(pq, axis=0) + tl.sum(count[:, None] * d * d, axis=0)
        n, mean, m2 = _chan(n, mean, m2, n_b, mean_b, m2_b)
    shift = _finite_or_zero(tl.load(x_ptr + _first_k(c, K, C_CONTIG), mask=c_ok, other=0.0).to(ACC))
    tl.store(mean_ptr + c, shift + mean, mask=c_ok)
    tl.store(var_ptr + c, m2 / n, mask=c_ok)


@triton.jit
def _bn_update_running_kernel(
    rm_ptr, rv_ptr, mean_ptr, var_ptr,
    C, KEEP_HI, KEEP_LO, TAKE_M_HI, TAKE_M_LO, TAKE_V_HI, TAKE_V_LO,
    HAS_MEAN: tl.constexpr, HAS_VAR: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # running = keep * running + take * batch per channel, in acc, rounded once; both running
    # tensors (one dtype) in one launch: program axis 1 is 0 for the mean, 1 for the variance.
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = c < C
    keep = _pair(KEEP_HI, KEEP_LO, ACC)
    if tl.program_id(1) == 0:
        if HAS_MEAN:
            r = tl.load(rm_ptr + c, mask=ok, other=0.0).to(ACC)
            v = keep * r + _pair(TAKE_M_HI, TAKE_M_LO, ACC) * tl.load(mean_ptr + c, mask=ok)
            tl.store(rm_ptr + c, round_for_bfloat16(v, TO_BF16), mask=ok)
    else:
        if HAS_VAR:
            r = tl.load(rv_ptr + c, mask=ok, other=0.0).to(ACC)
            v = keep * r + _pair(TAKE_V_HI, TAKE_V_LO, ACC) * tl.load(var_ptr + c, mask=ok)
            tl.store(rv_ptr + c, round_for_bfloat16(v, TO_BF16), mask=ok)


@triton.jit
def _bn_fwd_kernel(
    x_ptr, mean_ptr, var_ptr, w_ptr, bias_ptr, r_ptr, y_ptr,
    C, K, EPS_HI, EPS_LO, TUNE,
    C_CONTIG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program per (b, tile of channels, tile of k): elementwise with per-channel vectors.
    pid = tl.program_id(0).to(tl.int64)
    b, c, k = program_tile(pid, C, K, C_CONTIG, BLOCK_C, BLOCK_K)
    c_ok = c < C
    ok = c_ok[:, None] & (k < K)[None, :]
    mean = _load_vec(mean_ptr, c, c_ok, True, 0.0, ACC)
    invstd = _channel_invstd(var_ptr, c, c_ok, EPS_HI, EPS_LO, ACC)
    w = _load_vec(w_ptr, c, c_ok, HAS_W, 1.0, ACC)
    bias = _load_vec(bias_ptr, c, c_ok, HAS_B, 0.0, ACC)
    at = _offsets(b, c, k, C, K, C_CONTIG)
    x = tl.load(x_ptr + at, mask=ok, other=0.0).to(ACC)
    v = (x - mean[:, None]) * invstd[:, None] * w[:, None] + bias[:, None]
    if HAS_RES:
        v += tl.load(r_ptr + at, mask=ok, other=0.0).to(ACC)
    if RELU:
        v = tl.where(v < 0, 0.0, v)  # NaN stays NaN, as torch.relu
    tl.store(y_ptr + at, round_for_bfloat16(v, TO_BF16), mask=ok)


@jit_helper
def _masked_dy(dy_ptr, y_ptr, at, ok, HAS_Y: tl.constexpr, ACC: tl.constexpr):
    """grad_y, zeroed where the ReLU output y <= 0 (threshold_backward: a NaN y passes)."""
    dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(ACC)
    if HAS_Y:
        y = tl.load(y_ptr + at, mask=ok, other=0.0)
        dy = tl.where(y <= 0, 0.0, dy)
    return dy


@triton.jit
def _bn_bwd_reduce_kernel(
    dy_ptr, x_ptr, y_ptr, mean_ptr, var_ptr, pdy_ptr, pdyx_ptr,
    C, K, KCHUNK, NKC, EPS_HI, EPS_LO, TUNE,
    C_CONTIG: tl.constexpr, HAS_Y: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Sums of dy and dy * xhat over one piece for BLOCK_C channels: in every lane of the tile
    # (tiles in order), the lanes summed at the end.
    pid = tl.program_id(0).to(tl.int64)
    p, b, k_lo, k_hi, c = _bn_piece(pid, C, K, KCHUNK, NKC, BLOCK_C)
    c_ok = c < C
    mean = _load_vec(mean_ptr, c, c_ok, True, 0.0, ACC)
    invstd = _channel_invstd(var_ptr, c, c_ok, EPS_HI, EPS_LO, ACC)
    sum_dy = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    sum_dyx = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        ok = c_ok[:, None] & (k < k_hi)[None, :]
        at = _offsets(b, c, k, C, K, C_CONTIG)
        dy = _masked_dy(dy_ptr, y_ptr, at, ok, HAS_Y, ACC)
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(ACC)
        xhat = (x - mean[:, None]) * invstd[:, None]
        sum_dy += dy
        sum_dyx += dy * xhat
    tl.store(pdy_ptr + p * C + c, tl.sum(sum_dy, axis=1), mask=c_ok)
    tl.store(pdyx_ptr + p * C + c, tl.sum(sum_dyx, axis=1), mask=c_ok)


@triton.jit
def _bn_bwd_kernel(
    dy_ptr, x_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, sdy_ptr, sdyx_ptr, dx_ptr, dr_ptr,
    C, K, EPS_HI, EPS_LO, COUNT_HI, COUNT_LO, TUNE,
    C_CONTIG: tl.constexpr, HAS_Y: tl.constexpr, HAS_W: tl.constexpr, TRAIN: tl.constexpr,
    WANT_DR: tl.constexpr, ACC: tl.constexpr, TO_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program per (b, tile of channels, tile of k): elementwise with per-channel vectors.
    pid = tl.program_id(0).to(tl.int64)
    b, c, k = program_tile(pid, C, K, C_CONTIG, BLOCK_C, BLOCK_K)
    c_ok = c < C
    ok = c_ok[:, None] & (k < K)[None, :]
    invstd = _channel_invstd(var_ptr, c, c_ok, EPS_HI, EPS_LO, ACC)
    scale = _load_vec(w_ptr, c, c_ok, HAS_W, 1.0, ACC) * invstd
    at = _offsets(b, c, k, C, K, C_CONTIG)
    dy = _masked_dy(dy_ptr, y_ptr, at, ok, HAS_Y, ACC)
    if TRAIN:
        mean = _load_vec(mean_ptr, c, c_ok, True, 0.0, ACC)
        count = _pair(COUNT_HI, COUNT_LO, ACC)
        mean_dy = tl.load(sdy_ptr + c, mask=c_ok, other=0.0) / count
        mean_dyx = tl.load(sdyx_ptr + c, mask=c_ok, other=0.0) / count
        x = tl.load(x_ptr + at, mask=ok, other=0.0).to(ACC)
        xhat = (x - mean[:, None]) * invstd[:, None]
        dx = scale[:, None] * (dy - mean_dy[:, None] - xhat * mean_dyx[:, None])
    else:
        dx = scale[:, None] * dy
    tl.store(dx_ptr + at, round_for_bfloat16(dx, TO_BF16), mask=ok)
    if WANT_DR:
        tl.store(dr_ptr + at, dy, mask=ok)  # exact: dy is grad_y or 0


# ---- launch configuration ---------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _float_pair(value: float) -> tuple[float, float]:
    """value as float32 hi + lo (see _pair)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _tune_bucket(*sizes: int) -> int:
    """An autotuning key for sizes that vary from call to call: their log2 classes, so a new
    batch size of a similar magnitude reuses the tuned config rather than tuning again."""
    key = 0
    for size in sizes:
        key = key * 64 + int(size).bit_length()
    return key


class _Tiling:
    """Tile shapes for one kernel and one BLOCK_C: BLOCK_K is tuned, BLOCK_C is fixed by the
    launcher. `tiles` are the elements a tile to try, `per_thread` the elements a thread (8:
    one 16-byte vector of a 16-bit type), `stages` the software-pipelining depths; at most
    max_warps warps (32 warps leave 64 registers a thread)."""

    def __init__(self, tiles, per_thread=(8, 16), stages=(1,), max_warps=16):
        self.tiles, self.per_thread, self.stages = tuple(tiles), tuple(per_thread), tuple(stages)
        self.max_warps = max_warps

    def block_ks(self, block_c: int, k_cap: int, k_min: int = 1) -> list[int]:
        """The BLOCK_K values (k_min <= BLOCK_K <= k_cap where possible) this launch may run
        with; one under the interpreter."""
        tiles = (_INTERP_TILE,) if interpreted() else self.tiles
        return sorted({max(min(k_min, k_cap), min(tile // block_c, k_cap)) for tile in tiles})

    def configs(self, block_c: int, k_cap: int, k_min: int = 1) -> list[triton.Config]:
        configs, seen = [], set()
        for block_k in self.block_ks(block_c, k_cap, k_min):
            for per_thread in self.per_thread:
                warps = max(1, min(self.max_warps, block_c * block_k // (32 * per_thread)))
                for stages in self.stages:
                    if (block_k, warps, stages) not in seen:
                        seen.add((block_k, warps, stages))
                        configs.append(
                            triton.Config({"BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
                        )
        return configs


# Elements a tile under the interpreter: few programs (each costs), small arrays.
_INTERP_TILE = 4096
_KEY = ["C", "TUNE"]  # C and the log2 classes of the sizes (see _tune_bucket)

_ROW_FWD_TILING = _Tiling((1024, 4096, 16384), per_thread=(8, 32), max_warps=32)
_ROW_BWD_TILING = _Tiling((1024, 4096, 8192), per_thread=(16,), stages=(1, 2))
_BN_ELEMENTWISE_TILING = _Tiling((1024, 4096, 8192))
_BN_REDUCE_TILING = _Tiling((1024, 4096, 8192))


@functools.cache
def _tuned(kernel, tiling: _Tiling, block_c: int, k_cap: int, k_min: int = 1):
    """`kernel` autotuned over BLOCK_K for one BLOCK_C and BLOCK_K range (one launcher each)."""
    configs = tiling.configs(block_c, k_cap, k_min)
    interp = {"BLOCK_K": tiling.block_ks(block_c, k_cap, k_min)[0]}
    return autotune(configs, _KEY, interp)(kernel)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_target(device: torch.device, per_sm: int) -> int:
    """per_sm programs for each SM of the device; a few under the interpreter."""
    if interpreted() or device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return per_sm * _sm_count(index)


def _view(x: torch.Tensor):
    """(Bv, C, Kv, C_CONTIG): K == 1 tensors are walked as (1, C, B), see the module doc."""
    B, C, K = x.shape
    if K == 1:
        return 1, C, B, True
    return B, C, K, False


def _check(name: str, t: torch.Tensor, shape, dtype: torch.dtype, device) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(
            f"{name} must be {tuple(shape)} {dtype} on {device}, got {tuple(t.shape)} "
            f"{t.dtype} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_big(fn: str, x: torch.Tensor, others: dict) -> None:
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be a 3D (B, C, K) view, got {x.dim()} dims")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{fn}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    _check(f"{fn}: x", x, x.shape, x.dtype, x.device)
    for name, t in others.items():
        if t is not None:
            _check(f"{fn}: {name}", t, x.shape, x.dtype, x.device)


def _check_vectors(fn: str, x: torch.Tensor, n: int, vectors: dict, or_x_dtype=False) -> None:
    """(n,) acc vectors; or_x_dtype: x's own dtype is accepted too (BatchNorm's weight, bias and
    statistics, which its kernels load as they are stored)."""
    acc = _acc_torch(x.dtype)
    for name, t in vectors.items():
        if t is not None:
            own = or_x_dtype and t.dtype == x.dtype
            _check(f"{fn}: {name}", t, (n,), x.dtype if own else acc, x.device)


def _empty(dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty((0,), dtype=dtype, device=device)


# ---- row norm launchers -----------------------------------------------------------------------


def _row_plan(C: int, c_contig: bool, single_max: dict) -> tuple[int, bool]:
    """(BLOCK_C, SINGLE): the whole of C in one tile when it fits, else chunks."""
    if next_power_of_2(C) <= single_max[c_contig]:
        return next_power_of_2(C), True
    return _ROW_CHUNK[c_contig], False


def _row_k_min(c_contig: bool) -> int:
    """K > 1: at least 8 contiguous k a tile row (16 bytes of a 16-bit type)."""
    return 1 if c_contig else 8


def row_norm_fwd(x, residual, weight, bias, eps, rms):
    """(y, s = x + residual or empty, mean (B, K) or empty when rms, rstd (B, K)): each (b, k)
    of the (B, C, K) view normalized over C (LayerNorm, or RMSNorm when rms)."""
    fn = "row_norm_fwd"
    _check_big(fn, x, {"residual": residual})
    B, C, K = x.shape
    _check_vectors(fn, x, C, {"weight": weight, "bias": bias})
    acc = _acc_torch(x.dtype)
    y = new_output((B, C, K), x.dtype, x.device)
    s = _empty(x.dtype, x.device) if residual is None else new_output((B, C, K), x.dtype, x.device)
    mean = _empty(acc, x.device) if rms else new_output((B, K), acc, x.device)
    rstd = new_output((B, K), acc, x.device)
    if B * K == 0:
        return y, s, mean, rstd
    Bv, _, Kv, c_contig = _view(x)
    block_c, single = _row_plan(C, c_contig, _ROW_FWD_SINGLE_MAX)
    k_cap = next_power_of_2(Kv)
    launch = _tuned(_row_norm_fwd_kernel, _ROW_FWD_TILING, block_c, k_cap, _row_k_min(c_contig))
    # One program per (b, tile of BLOCK_K columns k) (rows when K == 1).
    grid = lambda meta: (Bv * cdiv(Kv, meta["BLOCK_K"]),)  # noqa: E731
    launch[grid](
        x, residual if residual is not None else x, weight if weight is not None else rstd,
        bias if bias is not None else rstd, y, s if residual is not None else y,
        rstd if rms else mean, rstd,
        C, Kv, *_float_pair(eps), _tune_bucket(Bv, C, Kv),
        C_CONTIG=c_contig, HAS_RES=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, RMS=rms, SINGLE=single, ACC=_acc(x.dtype),
        TO_BF16=x.dtype == torch.bfloat16, BLOCK_C=block_c,
    )  # fmt: skip
    return y, s, mean, rstd


def _sum_rows(a, b, C, acc):
    """Column sums of the (P, C) partials a and b (either may be None) in a fixed order."""
    device = (a if a is not None else b).device
    out_a = new_output((C,), acc, device) if a is not None else _empty(acc, device)
    out_b = new_output((C,), acc, device) if b is not None else _empty(acc, device)
    P = (a if a is not None else b).shape[0]
    block_c = min(next_power_of_2(C), 256)
    block_p = min(next_power_of_2(P), max(1, 4096 // block_c))
    # One program per BLOCK_C columns, walking the P rows in order.
    _sum_rows_kernel[(cdiv(C, block_c),)](
        a if a is not None else b, out_a if a is not None else out_b,
        b if b is not None else a, out_b if b is not None else out_a, P, C,
        HAS_A=a is not None, HAS_B=b is not None, ACC=_acc(acc),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out_a, out_b


def row_norm_bwd(grad_y, x, weight, mean, rstd, grad_sum, rms, need_dweight, need_dbias):
    """(dx, dweight or empty, dbias or empty) of row_norm_fwd; x is the forward's s."""
    fn = "row_norm_bwd"
    _check_big(fn, x, {"grad_y": grad_y, "grad_sum": grad_sum})
    B, C, K = x.shape
    acc = _acc_torch(x.dtype)
    _check_vectors(fn, x, C, {"weight": weight})
    _check(f"{fn}: rstd", rstd, (B, K), acc, x.device)
    if not rms:
        _check(f"{fn}: mean", mean, (B, K), acc, x.device)
    dx = new_output((B, C, K), x.dtype, x.device)
    if B * K == 0:
        zeros = lambda need: torch.zeros((C,) if need else (0,), dtype=acc, device=x.device)  # noqa: E731
        return dx, zeros(need_dweight), zeros(need_dbias)
    Bv, _, Kv, c_contig = _view(x)
    block_c, single = _row_plan(C, c_contig, _ROW_BWD_SINGLE_MAX)
    k_min = _row_k_min(c_contig)
    launch = _tuned(_row_norm_bwd_kernel, _ROW_BWD_TILING, block_c, next_power_of_2(Kv), k_min)
    # A fixed grid of G programs, each walking column tiles p, p + G, ...: G (the rows of the
    # partial sums) must not depend on the tuned BLOCK_K, so it comes from the smallest one;
    # with a larger BLOCK_K the programs left without a tile write zero partials.
    smallest_k = _ROW_BWD_TILING.block_ks(block_c, next_power_of_2(Kv), k_min)[0]
    per_sm = 2 if need_dweight or need_dbias else 8  # partial rows cost G * C * 8 bytes
    G = max(1, min(Bv * cdiv(Kv, smallest_k), _programs_target(x.device, per_sm)))
    dw = torch.empty((G, C), dtype=acc, device=x.device) if need_dweight else None
    db = torch.empty((G, C), dtype=acc, device=x.device) if need_dbias else None
    launch[(G,)](
        grad_y, x, weight if weight is not None else rstd, rstd if rms else mean, rstd,
        grad_sum if grad_sum is not None else x, dx,
        dw if dw is not None else rstd, db if db is not None else rstd,
        C, Kv, Bv, _tune_bucket(Bv, C, Kv),
        C_CONTIG=c_contig, HAS_W=weight is not None, HAS_GS=grad_sum is not None, RMS=rms,
        NEED_DW=need_dweight, NEED_DB=need_dbias, SINGLE=single, ACC=_acc(x.dtype),
        TO_BF16=x.dtype == torch.bfloat16, BLOCK_C=block_c,
    )  # fmt: skip
    if not (need_dweight or need_dbias):
        return dx, _empty(acc, x.device), _empty(acc, x.device)
    dweight, dbias = _sum_rows(dw, db, C, acc)
    return dx, dweight, dbias


# ---- batch norm launchers ---------------------------------------------------------------------


def _bn_block_c(C: int, Kv: int, c_contig: bool) -> int:
    """Channels a tile: NHWC a contiguous run of up to 128; NCHW enough planes to fill a tile
    of about 1024 elements when the planes are small."""
    if c_contig:
        return min(next_power_of_2(C), 128)
    return min(next_power_of_2(C), max(1, 1024 // next_power_of_2(Kv)))


def _bn_elementwise(kernel, x, C, Bv, Kv, c_contig):
    """The autotuned launcher and grid of an elementwise BatchNorm kernel."""
    block_c = _bn_block_c(C, Kv, c_contig)
    launch = _tuned(kernel, _BN_ELEMENTWISE_TILING, block_c, next_power_of_2(Kv))
    # One program per (b, tile of channels, tile of k): see _tile_of.
    grid = lambda meta: (Bv * cdiv(C, block_c) * cdiv(Kv, meta["BLOCK_K"]),)  # noqa: E731
    return launch, grid, block_c


def _bn_reduce_launch(kernel, C, Bv, Kv, c_contig, device):
    """(launcher, grid, BLOCK_C, KCHUNK, NKC) of a per-channel reduction: each b's k range is
    split into NKC chunks of KCHUNK so that the (piece, channel tile) programs fill the device;
    KCHUNK is a multiple of every tuned BLOCK_K, so tiles never straddle two pieces."""
    block_c = _bn_block_c(C, Kv, c_contig)
    step = _BN_REDUCE_TILING.block_ks(block_c, next_power_of_2(Kv))[-1]
    per_b = max(1, _programs_target(device, 8) // (Bv * cdiv(C, block_c)))
    kchunk = cdiv(cdiv(Kv, per_b), step) * step
    kchunk, nkc = (Kv, 1) if kchunk >= Kv else (kchunk, cdiv(Kv, kchunk))
    launch = _tuned(kernel, _BN_REDUCE_TILING, block_c, step)
    grid = (Bv * nkc * cdiv(C, block_c),)  # one program per (piece, channel tile)
    return launch, grid, block_c, kchunk, nkc


def batch_norm_stats(x):
    """(mean, biased var) of each channel over all (b, k), as acc (C,) vectors."""
    fn = "batch_norm_stats"
    _check_big(fn, x, {})
    B, C, K = x.shape
    if B * K == 0:
        raise ValueError(f"{fn}: x has no elements per channel (B * K = 0)")
    acc = _acc_torch(x.dtype)
    Bv, _, Kv, c_contig = _view(x)
    launch, grid, block_c, kchunk, nkc = _bn_reduce_launch(
        _bn_stats_partial_kernel, C, Bv, Kv, c_contig, x.device
    )
    P = Bv * nkc
    pmean = torch.empty((P, C), dtype=acc, device=x.device)
    pm2 = torch.empty((P, C), dtype=acc, device=x.device)
    launch[grid](
        x, pmean, pm2, C, Kv, kchunk, nkc, _tune_bucket(Bv, C, Kv),
        C_CONTIG=c_contig, ACC=_acc(x.dtype), BLOCK_C=block_c,
    )  # fmt: skip
    mean = new_output((C,), acc, x.device)
    var = new_output((C,), acc, x.device)
    merge_c = min(next_power_of_2(C), 128)
    merge_p = min(next_power_of_2(P), max(1, 4096 // merge_c))
    # One program per BLOCK_C channels, merging the P pieces in order.
    _bn_stats_merge_kernel[(cdiv(C, merge_c),)](
        x, pmean, pm2, mean, var, C, Kv, kchunk, nkc, P,
        C_CONTIG=c_contig, ACC=_acc(x.dtype), BLOCK_P=merge_p, BLOCK_C=merge_c, num_warps=4,
    )  # fmt: skip
    return mean, var


def batch_norm_update_running(mean, var, running_mean, running_var, momentum, var_factor):
    """In place: running = (1 - momentum) * running + momentum * batch (var times var_factor),
    both running tensors checked (and their versions bumped) before either is written."""
    fn = "batch_norm_update_running"
    pairs = {"running_mean": (running_mean, mean), "running_var": (running_var, var)}
    for name, (running, batch) in pairs.items():
        if running is None:
            continue
        _check(f"{fn}: {name}", running, batch.shape, running.dtype, batch.device)
        _check(f"{fn}: {name}'s batch statistics", batch, batch.shape, _acc_torch(running.dtype),
               batch.device)  # fmt: skip
    given = [running for running, _ in pairs.values() if running is not None]
    for running in given:  # autograd sees the write, as it sees mul_ / add_
        torch.autograd.graph.increment_version(running)
    if not given or given[0].numel() == 0:
        return
    # One launch for both when they share a dtype, else one each.
    groups = [given] if len({t.dtype for t in given}) == 1 else [[t] for t in given]
    block = min(next_power_of_2(mean.numel()), 1024)
    for group in groups:
        has_mean = any(t is running_mean for t in group)
        has_var = any(t is running_var for t in group)
        dtype = group[0].dtype
        _bn_update_running_kernel[(cdiv(mean.numel(), block), 2)](
            running_mean if has_mean else group[0], running_var if has_var else group[0],
            mean, var, mean.numel(), *_float_pair(1 - momentum), *_float_pair(momentum),
            *_float_pair(momentum * var_factor),
            HAS_MEAN=has_mean, HAS_VAR=has_var, ACC=_acc(dtype),
            TO_BF16=dtype == torch.bfloat16, BLOCK=block,
        )  # fmt: skip


def batch_norm_fwd(x, mean, var, weight, bias, residual, eps, relu):
    """[relu]((x - mean) * rsqrt(var + eps) * weight + bias [+ residual]) per channel c."""
    fn = "batch_norm_fwd"
    _check_big(fn, x, {"residual": residual})
    B, C, K = x.shape
    _check_vectors(fn, x, C, {"mean": mean, "var": var, "weight": weight, "bias": bias}, True)
    y = new_output((B, C, K), x.dtype, x.device)
    if y.numel() == 0:
        return y
    Bv, _, Kv, c_contig = _view(x)
    launch, grid, block_c = _bn_elementwise(_bn_fwd_kernel, x, C, Bv, Kv, c_contig)
    launch[grid](
        x, mean, var, weight if weight is not None else mean, bias if bias is not None else mean,
        residual if residual is not None else x, y,
        C, Kv, *_float_pair(eps), _tune_bucket(Bv, C, Kv),
        C_CONTIG=c_contig, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_RES=residual is not None, RELU=relu, ACC=_acc(x.dtype),
        TO_BF16=x.dtype == torch.bfloat16, BLOCK_C=block_c,
    )  # fmt: skip
    return y


def batch_norm_bwd_reduce(grad_y, x, y, mean, var, eps):
    """(sum of dy, sum of dy * xhat) per channel, dy = grad_y masked where y <= 0 when y is
    given (the output of a ReLU variant)."""
    fn = "batch_norm_bwd_reduce"
    _check_big(fn, x, {"grad_y": grad_y, "y": y})
    B, C, K = x.shape
    _check_vectors(fn, x, C, {"mean": mean, "var": var}, True)
    acc = _acc_torch(x.dtype)
    if B * K == 0:
        return torch.zeros((C,), dtype=acc, device=x.device), torch.zeros(
            (C,), dtype=acc, device=x.device
        )
    Bv, _, Kv, c_contig = _view(x)
    launch, grid, block_c, kchunk, nkc = _bn_reduce_launch(
        _bn_bwd_reduce_kernel, C, Bv, Kv, c_contig, x.device
    )
    P = Bv * nkc
    pdy = torch.empty((P, C), dtype=acc, device=x.device)
    pdyx = torch.empty((P, C), dtype=acc, device=x.device)
    launch[grid](
        grad_y, x, y if y is not None else x, mean, var, pdy, pdyx,
        C, Kv, kchunk, nkc, *_float_pair(eps), _tune_bucket(Bv, C, Kv),
        C_CONTIG=c_contig, HAS_Y=y is not None, ACC=_acc(x.dtype), BLOCK_C=block_c,
    )  # fmt: skip
    return _sum_rows(pdy, pdyx, C, acc)


def batch_norm_bwd(
    grad_y, x, y, mean, var, weight, sum_dy, sum_dy_xhat, eps, count, want_grad_residual
):
    """(dx, d_residual = the masked dy or empty); count > 0: batch statistics over count
    values per channel, count == 0: constant statistics (eval)."""
    fn = "batch_norm_bwd"
    _check_big(fn, x, {"grad_y": grad_y, "y": y})
    B, C, K = x.shape
    _check_vectors(fn, x, C, {"mean": mean, "var": var, "weight": weight}, True)
    _check_vectors(fn, x, C, {"sum_dy": sum_dy, "sum_dy_xhat": sum_dy_xhat})
    if count < 0:
        raise ValueError(f"{fn}: count must be >= 0, got {count}")
    dx = new_output((B, C, K), x.dtype, x.device)
    if want_grad_residual:
        d_res = new_output((B, C, K), x.dtype, x.device)
    else:
        d_res = _empty(x.dtype, x.device)
    if dx.numel() == 0:
        return dx, d_res
    Bv, _, Kv, c_contig = _view(x)
    launch, grid, block_c = _bn_elementwise(_bn_bwd_kernel, x, C, Bv, Kv, c_contig)
    launch[grid](
        grad_y, x, y if y is not None else x, mean, var, weight if weight is not None else var,
        sum_dy, sum_dy_xhat, dx, d_res if want_grad_residual else dx,
        C, Kv, *_float_pair(eps), *_float_pair(float(max(count, 1))), _tune_bucket(Bv, C, Kv),
        C_CONTIG=c_contig, HAS_Y=y is not None, HAS_W=weight is not None, TRAIN=count > 0,
        WANT_DR=want_grad_residual, ACC=_acc(x.dtype), TO_BF16=x.dtype == torch.bfloat16,
        BLOCK_C=block_c,
    )  # fmt: skip
    return dx, d_res
