"""Attention family in Triton: flash attention forward and backward (FlashAttention-2 style).

Triton twin of csrc/cpu/attention.cpp and csrc/cuda/attention.cu, same argument order
(csrc/pykern.h states the contract): q (Z, Hq, L, E), k (Z, Hk, S, E), v (Z, Hk, S, Ev),
query head h reads key/value head h // (Hq // Hk); scores (q k^T) * scale + bias, causal
(j > i masked, top-left aligned) and dropout (csrc/common/philox.h, bit for bit).

Forward: one program per (query tile, z * Hq + h) walks the key tiles with an online softmax
(running max, running sum, float accumulator), so no (L, S) matrix is ever stored; it writes
out and the log-sum-exp. Backward recomputes the probabilities from q, k and the lse in three
launches, none with atomics: D = rowsum(dO * O); dK, dV per key tile (looping over the query
heads of its group and their query tiles); dQ per query tile (looping over key tiles).

Key tiles are walked in two loops: tiles that need no mask (inside S and, when causal, wholly
at or below the diagonal) and the rest, where the S and causal masks are applied; causal
tiles wholly above the diagonal are never visited.

Units: with float32 accumulation and no bias the scores are kept in log2 units (scale *
log2(e) folded into one multiply), so the exponentials are plain exp2; with a bias (or in
float64) they stay in natural units and go through exp(s - max), so a mask of finfo.min
(rather than -inf) still gives torch's uniform row instead of overflowing to -inf. lse is
stored in natural log either way.

float32 operands multiply exactly (input_precision "ieee", never TF32); float16 and bfloat16
run on tensor cores with float32 accumulation; float64 accumulates in float64.
"""

from __future__ import annotations

import functools

import numpy as np
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
    next_power_of_2,
    round_for_bfloat16,
)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# ---- Shared pieces of the kernels -------------------------------------------------------


@jit_helper
def _operand(x, dtype, UPCAST: tl.constexpr):
    """Accumulator-typed x (probabilities, dS) as a tl.dot operand beside `dtype` operands."""
    if UPCAST:
        return x  # stays float32: mma upcasts the other operand
    return x.to(dtype)


@jit_helper
def _exp_diff(s, m, LOG2_SCORES: tl.constexpr):
    """exp(s - m) for scores in kernel units: log2 units (exp2), or natural units (exp, which
    for float32 is itself exp2 of a product with log2(e) on a GPU). The difference is taken
    first, so scores near the float's lowest (masks of finfo.min rather than -inf) never
    overflow to -inf on the way."""
    if LOG2_SCORES:
        return tl.exp2(s - m)
    return tl.exp(s - m)


@jit_helper
def _double(hi, lo, ACC: tl.constexpr):
    """hi + lo in ACC: a host double split into two float32 kernel arguments (Triton types
    float arguments float32), so float64 kernels see it to about 48 bits."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@jit_helper
def _dropout_keep(zh, i, j, seed_lo, seed_hi, threshold):
    """Whether elements (zh, i, j) survive dropout: csrc/common/philox.h's dropout_keep, i the
    query rows and j the key columns (int64 tensors that broadcast), zh an int64 scalar."""
    c1, c0 = tl.broadcast(i.to(tl.uint32), j.to(tl.uint32))
    c2 = zh.to(tl.uint32)
    c3 = (zh >> 32).to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        hi_a = tl.umulhi(c0, 0xD2511F53)
        lo_a = c0 * 0xD2511F53
        hi_b = tl.umulhi(c2, 0xCD9E8D57)
        lo_b = c2 * 0xCD9E8D57
        c0 = hi_b ^ c1 ^ k0
        c1 = lo_b
        c2 = hi_a ^ c3 ^ k1
        c3 = lo_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0 >= threshold.to(tl.uint32)


@jit_helper
def _bias_tile(bias_base, i, j, L, S, sb_l, sb_s):
    """bias[i, j] of one head (i, j int64 tensors that broadcast); scores with a bias stay in
    natural units (see _exp_diff)."""
    return tl.load(bias_base + i * sb_l + j * sb_s, mask=(i < L) & (j < S), other=0.0)


@jit_helper
def _query_tile(pid, L, Hq, Hk, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(zh = z * Hq + h, its key/value head z * Hk + h // (Hq // Hk), first row m0) of the
    forward's and dQ's program pid: query tiles fastest, so the programs running together read
    the same head's K and V from L2; causal: the longest rows first."""
    m_tiles = tl.cdiv(L, BLOCK_M)
    m_tile = pid % m_tiles
    if IS_CAUSAL:
        m_tile = m_tiles - 1 - m_tile
    zh = (pid // m_tiles).to(tl.int64)
    kvh = (zh // Hq) * Hk + (zh % Hq) // (Hq // Hk)
    return zh, kvh, m_tile * BLOCK_M


@jit_helper
def _key_tile_bounds(m0, S, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, end) for query rows [m0, m0 + BLOCK_M): key tiles starting below full_end lie
    inside S and, when causal, at or below every row's diagonal (no mask); the tiles from
    full_end up to end need masks; causal tiles from end on are wholly masked (skipped)."""
    if IS_CAUSAL:
        end = tl.minimum(S, m0 + BLOCK_M)
        full_end = (tl.minimum(S, m0 + 1) // BLOCK_N) * BLOCK_N
    else:
        end = S
        full_end = (S // BLOCK_N) * BLOCK_N
    return full_end, end


@jit_helper
def _lse_for_exp(lse_base, i, L, LOG2_SCORES: tl.constexpr):
    """lse of rows i in kernel score units; +inf for rows past L and rows whose every key is
    masked (lse -inf), so exp(s - lse) is 0 there rather than NaN."""
    lse = tl.load(lse_base + i, mask=i < L, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    if LOG2_SCORES:
        lse = lse * _LOG2E
    return lse


# ---- Forward ----------------------------------------------------------------------------


@jit_helper
def _fwd_step(
    acc, m_i, l_i, q, i, j0, zh, k_base, v_base, bias_base,
    L, S, E, Ev, sb_l, sb_s, qk_scale, seed_lo, seed_hi, threshold,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, LOG2_SCORES: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):  # fmt: skip
    """One key tile [j0, j0 + BLOCK_N) of the online softmax; returns (acc, m_i, l_i)."""
    j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    k = tl.load(
        k_base + j[:, None] * E + e[None, :], mask=(j[:, None] < S) & (e[None, :] < E), other=0.0
    )
    s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], ACC), PRECISION, UPCAST) * qk_scale
    if HAS_BIAS:
        s += _bias_tile(bias_base, i[:, None], j[None, :], L, S, sb_l, sb_s)
    if MASK:
        visible = j[None, :] < S
        if IS_CAUSAL:
            visible = visible & (j[None, :] <= i[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # While a row has seen only masked keys its max is -inf: subtract 0 instead (exp gives 0)
    # so that -inf - -inf never makes a NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = _exp_diff(s, m_sub[:, None], LOG2_SCORES)
    alpha = _exp_diff(m_i, m_sub, LOG2_SCORES)
    l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator ignores dropout
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(zh, i[:, None], j[None, :], seed_lo, seed_hi, threshold), p, 0.0)
    v = tl.load(
        v_base + j[:, None] * Ev + ev[None, :],
        mask=(j[:, None] < S) & (ev[None, :] < Ev),
        other=0.0,
    )
    acc = mma(_operand(p, v.dtype, UPCAST), v, acc * alpha[:, None], PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold", "TUNE"])
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr,
    Hq, Hk, L, S, E, Ev, sb_z, sb_h, sb_l, sb_s,
    qs_hi, qs_lo, keep_hi, keep_lo, seed_lo, seed_hi, threshold, TUNE,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC: tl.constexpr, LOG2_SCORES: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, TO_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):  # fmt: skip
    zh, kvh, m0 = _query_tile(tl.program_id(0), L, Hq, Hk, IS_CAUSAL, BLOCK_M)
    i = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    q = tl.load(
        q_ptr + zh * L * E + i[:, None] * E + e[None, :],
        mask=(i[:, None] < L) & (e[None, :] < E),
        other=0.0,
    )
    k_base = k_ptr + kvh * S * E
    v_base = v_ptr + kvh * S * Ev
    bias_base = bias_ptr + (zh // Hq) * sb_z + (zh % Hq) * sb_h
    qk_scale = _double(qs_hi, qs_lo, ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    full_end, end = _key_tile_bounds(m0, S, IS_CAUSAL, BLOCK_M, BLOCK_N)
    for j0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(
            acc, m_i, l_i, q, i, j0, zh, k_base, v_base, bias_base,
            L, S, E, Ev, sb_l, sb_s, qk_scale, seed_lo, seed_hi, threshold,
            False, IS_CAUSAL, HAS_BIAS, HAS_DROPOUT, ACC, LOG2_SCORES, PRECISION,
            UPCAST, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV,
        )  # fmt: skip
    for j0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(
            acc, m_i, l_i, q, i, j0, zh, k_base, v_base, bias_base,
            L, S, E, Ev, sb_l, sb_s, qk_scale, seed_lo, seed_hi, threshold,
            True, IS_CAUSAL, HAS_BIAS, HAS_DROPOUT, ACC, LOG2_SCORES, PRECISION,
            UPCAST, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV,
        )  # fmt: skip
    # l_i is 0 only for rows whose every key is masked: output 0, lse -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if LOG2_SCORES:
        lse = (m_i + tl.log2(l_safe)) * _LN2
    else:
        lse = m_i + tl.log(l_safe)
    lse = tl.where(empty, float("-inf"), lse)
    inv_l = 1.0 / l_safe
    if HAS_DROPOUT:
        inv_l = inv_l * _double(keep_hi, keep_lo, ACC)
    out = acc * inv_l[:, None]
    row_ok = i < L
    tl.store(lse_ptr + zh * L + i, lse, mask=row_ok)
    tl.store(
        out_ptr + zh * L * Ev + i[:, None] * Ev + ev[None, :],
        round_for_bfloat16(out, TO_BF16),
        mask=row_ok[:, None] & (ev[None, :] < Ev),
    )


# ---- Backward ---------------------------------------------------------------------------


@triton.jit
def _attention_bwd_delta_kernel(
    do_ptr, out_ptr, delta_ptr, R, Ev,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_EV: tl.constexpr,
):  # fmt: skip
    # D[r] = sum over Ev of dO[r] * O[r], in ACC, for the Z * Hq * L rows; BLOCK_R rows a program.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    ev = tl.arange(0, BLOCK_EV)
    ok = (r[:, None] < R) & (ev[None, :] < Ev)
    offsets = r[:, None] * Ev + ev[None, :]
    do = tl.load(do_ptr + offsets, mask=ok, other=0.0).to(ACC)
    o = tl.load(out_ptr + offsets, mask=ok, other=0.0).to(ACC)
    tl.store(delta_ptr + r, tl.sum(do * o, 1), mask=r < R)


@jit_helper
def _dkdv_step(
    dk, dv, k, v, j, i0, zh, q_base, do_base, lse_base, delta_base, bias_base,
    L, S, E, Ev, sb_l, sb_s, qk_scale, keep_scale, seed_lo, seed_hi, threshold,
    MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr,
    LOG2_SCORES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):  # fmt: skip
    """One query tile [i0, i0 + BLOCK_M) of one query head into the key tile's (dk, dv), all
    in transposed form (keys are rows); MASK: the causal mask. Query rows past L need no
    mask: their q and dO load as 0 and their lse as +inf, so P and dS are 0 there. Key rows
    past S need none either: whatever they compute stays in their own rows of dk and dv,
    which are never stored."""
    i = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    row_ok = i[:, None] < L
    q = tl.load(q_base + i[:, None] * E + e[None, :], mask=row_ok & (e[None, :] < E), other=0.0)
    do = tl.load(
        do_base + i[:, None] * Ev + ev[None, :], mask=row_ok & (ev[None, :] < Ev), other=0.0
    )
    lse = _lse_for_exp(lse_base, i, L, LOG2_SCORES)
    delta = tl.load(delta_base + i, mask=i < L, other=0.0)
    s_t = mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], ACC), PRECISION, UPCAST) * qk_scale
    if HAS_BIAS:
        s_t += _bias_tile(bias_base, i[None, :], j[:, None], L, S, sb_l, sb_s)
    if MASK:
        s_t = tl.where(j[:, None] <= i[None, :], s_t, float("-inf"))
    p_t = _exp_diff(s_t, lse[None, :], LOG2_SCORES)
    dp_t = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], ACC), PRECISION, UPCAST)
    if HAS_DROPOUT:
        keep = _dropout_keep(zh, i[None, :], j[:, None], seed_lo, seed_hi, threshold)
        dv = mma(_operand(tl.where(keep, p_t, 0.0), do.dtype, UPCAST), do, dv, PRECISION, UPCAST)
        dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
    else:
        dv = mma(_operand(p_t, do.dtype, UPCAST), do, dv, PRECISION, UPCAST)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = mma(_operand(ds_t, q.dtype, UPCAST), q, dk, PRECISION, UPCAST)
    return dk, dv


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold", "TUNE"])
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    Hq, Hk, L, S, E, Ev, sb_z, sb_h, sb_l, sb_s,
    qs_hi, qs_lo, gs_hi, gs_lo, keep_hi, keep_lo, seed_lo, seed_hi, threshold, TUNE,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC: tl.constexpr, LOG2_SCORES: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, TO_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):  # fmt: skip
    # One program per (key tile, z * Hk + kv head), key tiles fastest (causal: the tiles with
    # the most query rows below them first); it loops over the Hq / Hk query heads of the
    # group and their query tiles in a fixed order, so dk and dv need no atomics.
    n_tiles = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    n0 = (pid % n_tiles) * BLOCK_N
    zkv = (pid // n_tiles).to(tl.int64)
    z = zkv // Hk
    group = Hq // Hk
    h0 = (zkv % Hk) * group  # first query head of the group
    j = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    key_ok = j[:, None] < S
    k_offsets = zkv * S * E + j[:, None] * E + e[None, :]
    v_offsets = zkv * S * Ev + j[:, None] * Ev + ev[None, :]
    k = tl.load(k_ptr + k_offsets, mask=key_ok & (e[None, :] < E), other=0.0)
    v = tl.load(v_ptr + v_offsets, mask=key_ok & (ev[None, :] < Ev), other=0.0)
    qk_scale = _double(qs_hi, qs_lo, ACC)
    keep_scale = _double(keep_hi, keep_lo, ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_E], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], ACC)
    if IS_CAUSAL:
        # Query tiles before first_tile lie wholly above the diagonal (skipped); from
        # full_start on every row i is at or below every key j of the tile (no mask).
        first_tile = (n0 // BLOCK_M) * BLOCK_M
        full_start = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        first_tile = 0
        full_start = 0
    for g in range(0, group):
        zh = z * Hq + h0 + g
        q_base = q_ptr + zh * L * E
        do_base = do_ptr + zh * L * Ev
        lse_base = lse_ptr + zh * L
        delta_base = delta_ptr + zh * L
        bias_base = bias_ptr + z * sb_z + (h0 + g) * sb_h
        if IS_CAUSAL:
            for i0 in range(first_tile, tl.minimum(full_start, L), BLOCK_M):
                dk, dv = _dkdv_step(
                    dk, dv, k, v, j, i0, zh, q_base, do_base, lse_base, delta_base, bias_base,
                    L, S, E, Ev, sb_l, sb_s, qk_scale, keep_scale, seed_lo, seed_hi, threshold,
                    True, HAS_BIAS, HAS_DROPOUT, ACC, LOG2_SCORES, PRECISION, UPCAST,
                    BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV,
                )  # fmt: skip
        for i0 in range(full_start, L, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, j, i0, zh, q_base, do_base, lse_base, delta_base, bias_base,
                L, S, E, Ev, sb_l, sb_s, qk_scale, keep_scale, seed_lo, seed_hi, threshold,
                False, HAS_BIAS, HAS_DROPOUT, ACC, LOG2_SCORES, PRECISION, UPCAST,
                BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV,
            )  # fmt: skip
    if HAS_DROPOUT:
        dv = dv * keep_scale
    dk = dk * _double(gs_hi, gs_lo, ACC)
    tl.store(dk_ptr + k_offsets, round_for_bfloat16(dk, TO_BF16), mask=key_ok & (e[None, :] < E))
    tl.store(dv_ptr + v_offsets, round_for_bfloat16(dv, TO_BF16), mask=key_ok & (ev[None, :] < Ev))


@jit_helper
def _dq_step(
    dq, q, do, lse, delta, i, j0, zh, k_base, v_base, bias_base,
    L, S, E, Ev, sb_l, sb_s, qk_scale, keep_scale, seed_lo, seed_hi, threshold,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, LOG2_SCORES: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):  # fmt: skip
    """One key tile [j0, j0 + BLOCK_N) into the query tile's dq; MASK: the S and causal masks."""
    j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    key_ok = j[:, None] < S
    k = tl.load(k_base + j[:, None] * E + e[None, :], mask=key_ok & (e[None, :] < E), other=0.0)
    v = tl.load(v_base + j[:, None] * Ev + ev[None, :], mask=key_ok & (ev[None, :] < Ev), other=0.0)
    s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], ACC), PRECISION, UPCAST) * qk_scale
    if HAS_BIAS:
        s += _bias_tile(bias_base, i[:, None], j[None, :], L, S, sb_l, sb_s)
    if MASK:
        visible = j[None, :] < S
        if IS_CAUSAL:
            visible = visible & (j[None, :] <= i[:, None])
        s = tl.where(visible, s, float("-inf"))
    p = _exp_diff(s, lse[:, None], LOG2_SCORES)
    dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], ACC), PRECISION, UPCAST)
    if HAS_DROPOUT:
        keep = _dropout_keep(zh, i[:, None], j[None, :], seed_lo, seed_hi, threshold)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return mma(_operand(ds, k.dtype, UPCAST), k, dq, PRECISION, UPCAST)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "threshold", "TUNE"])
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    Hq, Hk, L, S, E, Ev, sb_z, sb_h, sb_l, sb_s,
    qs_hi, qs_lo, gs_hi, gs_lo, keep_hi, keep_lo, seed_lo, seed_hi, threshold, TUNE,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACC: tl.constexpr, LOG2_SCORES: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, TO_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
):  # fmt: skip
    # Laid out as the forward's programs; walks the same key tiles.
    zh, kvh, m0 = _query_tile(tl.program_id(0), L, Hq, Hk, IS_CAUSAL, BLOCK_M)
    i = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    row_ok = i[:, None] < L
    q_offsets = zh * L * E + i[:, None] * E + e[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok & (e[None, :] < E), other=0.0)
    do = tl.load(
        do_ptr + zh * L * Ev + i[:, None] * Ev + ev[None, :],
        mask=row_ok & (ev[None, :] < Ev),
        other=0.0,
    )
    lse = _lse_for_exp(lse_ptr + zh * L, i, L, LOG2_SCORES)
    delta = tl.load(delta_ptr + zh * L + i, mask=i < L, other=0.0)
    k_base = k_ptr + kvh * S * E
    v_base = v_ptr + kvh * S * Ev
    bias_base = bias_ptr + (zh // Hq) * sb_z + (zh % Hq) * sb_h
    qk_scale = _double(qs_hi, qs_lo, ACC)
    keep_scale = _double(keep_hi, keep_lo, ACC)
    dq = tl.zeros([BLOCK_M, BLOCK_E], ACC)
    full_end, end = _key_tile_bounds(m0, S, IS_CAUSAL, BLOCK_M, BLOCK_N)
    for j0 in range(0, full_end, BLOCK_N):
        dq = _dq_step(
            dq, q, do, lse, delta, i, j0, zh, k_base, v_base, bias_base,
            L, S, E, Ev, sb_l, sb_s, qk_scale, keep_scale, seed_lo, seed_hi, threshold,
            False, IS_CAUSAL, HAS_BIAS, HAS_DROPOUT, ACC, LOG2_SCORES, PRECISION,
            UPCAST, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV,
        )  # fmt: skip
    for j0 in range(full_end, end, BLOCK_N):
        dq = _dq_step(
            dq, q, do, lse, delta, i, j0, zh, k_base, v_base, bias_base,
            L, S, E, Ev, sb_l, sb_s, qk_scale, keep_scale, seed_lo, seed_hi, threshold,
            True, IS_CAUSAL, HAS_BIAS, HAS_DROPOUT, ACC, LOG2_SCORES, PRECISION,
            UPCAST, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV,
        )  # fmt: skip
    dq = dq * _double(gs_hi, gs_lo, ACC)
    tl.store(dq_ptr + q_offsets, round_for_bfloat16(dq, TO_BF16), mask=row_ok & (e[None, :] < E))


# ---- Launchers --------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class (max of the padded E and Ev).
# BLOCK_M counts query rows and BLOCK_N key rows in every kernel: the forward and dQ kernels
# hold a query tile and stream key tiles, the dK/dV kernel holds a key tile and streams
# query tiles (so it wants a large BLOCK_N and a small BLOCK_M).
_FWD_TILES = {
    64: (
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
    ),
    128: ((128, 64, 8, 3), (128, 32, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)),
    256: ((128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)),
}
_DKDV_TILES = {
    64: (
        (32, 128, 4, 3),
        (32, 128, 8, 3),
        (64, 128, 8, 3),
        (32, 64, 8, 3),
        (64, 64, 4, 3),
        (32, 64, 4, 4),
    ),
    128: ((32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 8, 2), (16, 128, 8, 2), (32, 64, 4, 3)),
    256: ((64, 64, 8, 1), (32, 64, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)),
}
_DQ_TILES = {
    64: ((128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)),
    128: ((128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)),
    256: ((64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)),
}  # fmt: skip
# float64 runs mma.sync on 8-byte operands: small tiles only, every kernel alike.
_FP64_TILES = ((64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 1))
_TABLES = {"fwd": _FWD_TILES, "dkdv": _DKDV_TILES, "dq": _DQ_TILES}
# (BLOCK_M, BLOCK_N) under the interpreter, which pays per operation: few, mid-sized tiles.
_INTERP_BLOCKS = (32, 32)
_KEY = ["E", "Ev", "TUNE", "IS_CAUSAL", "HAS_BIAS", "HAS_DROPOUT", "PRECISION"]
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _head_block(size: int) -> int:
    return max(16, next_power_of_2(size))


def _launcher(kernel, table: str, fp64: bool, L: int, S: int, head_block: int):
    """`kernel` autotuned over the tiles of `table` for its head-dim class, tiles capped to
    L and S (one launcher per cap class, not per shape)."""
    head_class = 64 if head_block <= 64 else (128 if head_block <= 128 else 256)
    return _capped_launcher(
        kernel, table, fp64, dot_block(L, 128), dot_block(S, 128), head_class, _INTERP_BLOCKS
    )


@functools.cache
def _capped_launcher(kernel, table, fp64, cap_m, cap_n, head_class, interp_blocks):
    tiles = _FP64_TILES if fp64 else _TABLES[table][head_class]
    configs, seen = [], set()
    for bm, bn, warps, stages in tiles:
        tile = (min(bm, cap_m), min(bn, cap_n), warps, stages)
        if tile not in seen:
            seen.add(tile)
            blocks = {"BLOCK_M": tile[0], "BLOCK_N": tile[1]}
            configs.append(triton.Config(blocks, num_warps=warps, num_stages=stages))
    interp = {"BLOCK_M": min(interp_blocks[0], cap_m), "BLOCK_N": min(interp_blocks[1], cap_n)}
    return autotune(configs, _KEY, interp)(kernel)


def _tune_bucket(L: int, S: int) -> int:
    """An autotuning key for the sequence lengths: their log2 classes, so a new length of a
    similar magnitude reuses the tuned config rather than tuning again."""
    return int(L).bit_length() * 64 + int(S).bit_length()


def _dtype_args(dtype: torch.dtype, has_bias: bool) -> dict:
    """The kernels' type constexprs for inputs of `dtype` (see the module doc for the units)."""
    return {
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
        "LOG2_SCORES": dtype != torch.float64 and not has_bias,
        "PRECISION": "ieee",  # float32 exact (never TF32); 16-bit and float64 ignore it
        "UPCAST": interpreted() and dtype == torch.bfloat16,
        "TO_BF16": dtype == torch.bfloat16,
    }


def _split_double(x: float) -> tuple[float, float]:
    """(hi, lo) float32 values with hi + lo = x to about 48 bits (see _double)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def _scalar_args(args: dict, scale: float, dropout_p: float, seed: int) -> dict:
    """The scalar kernel arguments shared by every kernel (score scale in kernel units,
    dropout's keep scale, threshold and seed words); args: _dtype_args'."""
    qs_hi, qs_lo = _split_double(scale * (_LOG2E.value if args["LOG2_SCORES"] else 1.0))
    keep_hi, keep_lo = _split_double(1.0 / (1.0 - dropout_p))
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return {
        "qs_hi": qs_hi,
        "qs_lo": qs_lo,
        "keep_hi": keep_hi,
        "keep_lo": keep_lo,
        "seed_lo": seed & 0xFFFFFFFF,
        "seed_hi": seed >> 32,
        "threshold": int(dropout_p * 4294967296.0),  # csrc/common/philox.h dropout_threshold
    }


def _check_tensor(fn: str, name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dimensions, got {t.dim()}")


def _check_device(fn: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{fn}: {name} must be on {device} (q's device), got {t.device}")


def _check_inputs(fn, q, k, v, bias, scale, dropout_p) -> torch.dtype:
    """Validates the arguments every attention launcher takes; returns the accumulate type."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(fn, name, t, 4)
    if q.dtype not in _DTYPES:
        raise TypeError(f"{fn}: q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.device.type == "cpu" and not interpreted():
        raise ValueError(
            f"{fn}: q is a CPU tensor: Triton kernels run on CUDA tensors, or on CPU tensors "
            "with TRITON_INTERPRET=1"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        _check_device(fn, name, t, q.device)
    Z, Hq, L, E = q.shape
    _, Hk, S, _ = k.shape
    if k.shape[0] != Z or k.shape[3] != E:
        raise ValueError(f"{fn}: k must be (Z={Z}, Hk, S, E={E}), got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{fn}: v must be (Z, Hk, S, Ev) with (Z, Hk, S) = {tuple(k.shape[:3])} (k's), "
            f"got {tuple(v.shape)}"
        )
    if (Hk == 0 and Hq != 0) or (Hk != 0 and Hq % Hk != 0):
        raise ValueError(f"{fn}: q's heads ({Hq}) must be a multiple of k's heads ({Hk})")
    for name, size in (("q's E", E), ("v's Ev", v.shape[3])):
        if not 1 <= size <= 256:
            raise ValueError(f"{fn}: head dim {name} must be in 1..256, got {size}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if bias is not None:
        _check_tensor(fn, "bias", bias, 4)
        if tuple(bias.shape) != (Z, Hq, L, S):
            raise ValueError(
                f"{fn}: bias must have shape (Z, Hq, L, S) = {(Z, Hq, L, S)} (broadcast "
                f"with stride 0), got {tuple(bias.shape)}"
            )
        if bias.dtype != acc:
            raise TypeError(f"{fn}: bias must be {acc} (the accumulate type), got {bias.dtype}")
        _check_device(fn, "bias", bias, q.device)
        if any(st < 0 for st in bias.stride()):
            raise ValueError(f"{fn}: bias strides must be >= 0, got {bias.stride()}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{fn}: scale must be a float, got {type(scale).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    return acc


def _check_like(fn: str, name: str, t, shape: tuple, dtype: torch.dtype, device) -> None:
    """t must be a contiguous `shape` tensor of `dtype` on `device`."""
    _check_tensor(fn, name, t, len(shape))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must be {dtype}, got {t.dtype}")
    _check_device(fn, name, t, device)
    if not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous")


def _bias_args(bias, q: torch.Tensor) -> tuple:
    """(pointer, stride z, h, l, s) of bias; q and zeros when there is none (never read)."""
    if bias is None:
        return (q, 0, 0, 0, 0)
    return (bias, *bias.stride())


def attention_fwd(q, k, v, bias, scale, is_causal, dropout_p, seed):
    """(out (Z, Hq, L, Ev) in q's dtype, lse (Z, Hq, L) in acc): softmax((q k^T) * scale + bias,
    causal) with dropout, times v; one program per (query tile, z * Hq + h)."""
    acc = _check_inputs("attention_fwd", q, k, v, bias, scale, dropout_p)
    Z, Hq, L, E = q.shape
    _, Hk, S, Ev = v.shape
    out = new_output((Z, Hq, L, Ev), q.dtype, q.device)
    lse = new_output((Z, Hq, L), acc, q.device)
    if Z * Hq * L == 0:
        return out, lse
    block_e, block_ev = _head_block(E), _head_block(Ev)
    launch = _launcher(
        _attention_fwd_kernel, "fwd", q.dtype == torch.float64, L, S, max(block_e, block_ev)
    )
    bias_ptr, *bias_strides = _bias_args(bias, q)
    args = _dtype_args(q.dtype, bias is not None)
    grid = lambda meta: (cdiv(L, meta["BLOCK_M"]) * Z * Hq,)  # noqa: E731
    launch[grid](
        q, k, v, bias_ptr, out, lse, Hq, Hk, L, S, E, Ev, *bias_strides,
        TUNE=_tune_bucket(L, S), **_scalar_args(args, float(scale), float(dropout_p), seed),
        IS_CAUSAL=bool(is_causal), HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0,
        BLOCK_E=block_e, BLOCK_EV=block_ev, **args,
    )  # fmt: skip
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, bias, scale, is_causal, dropout_p, seed):
    """(dq, dk, dv) in q's dtype for attention_fwd's (out, lse): D = rowsum(dO * O) first,
    then dk, dv one program per (key tile, z * Hk + kv head) over the group's query heads,
    then dq one program per (query tile, z * Hq + h); deterministic (no atomics)."""
    fn = "attention_bwd"
    acc = _check_inputs(fn, q, k, v, bias, scale, dropout_p)
    Z, Hq, L, E = q.shape
    _, Hk, S, Ev = v.shape
    _check_like(fn, "grad_out", grad_out, (Z, Hq, L, Ev), q.dtype, q.device)
    _check_like(fn, "out", out, (Z, Hq, L, Ev), q.dtype, q.device)
    _check_like(fn, "lse", lse, (Z, Hq, L), acc, q.device)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, q.dtype, q.device)
    dv = new_output(v.shape, q.dtype, q.device)
    if Z * Hk * S == 0 and Z * Hq * L == 0:
        return dq, dk, dv
    args = _dtype_args(q.dtype, bias is not None)
    fp64 = q.dtype == torch.float64
    block_e, block_ev = _head_block(E), _head_block(Ev)
    head_block = max(block_e, block_ev)

    R = Z * Hq * L
    delta = torch.empty((R,), dtype=acc, device=q.device)
    if R > 0:
        block_r = max(1, min(128, 8192 // block_ev))
        # One program per block_r rows of (Z * Hq * L, Ev).
        _attention_bwd_delta_kernel[(cdiv(R, block_r),)](
            grad_out, out, delta, R, Ev, ACC=args["ACC"], BLOCK_R=block_r, BLOCK_EV=block_ev
        )

    bias_ptr, *bias_strides = _bias_args(bias, q)
    scalars = _scalar_args(args, float(scale), float(dropout_p), seed)
    scalars["gs_hi"], scalars["gs_lo"] = _split_double(float(scale))
    common = dict(
        TUNE=_tune_bucket(L, S), **scalars, IS_CAUSAL=bool(is_causal),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0,
        BLOCK_E=block_e, BLOCK_EV=block_ev, **args,
    )  # fmt: skip
    if Z * Hk * S > 0:
        launch = _launcher(_attention_bwd_dkdv_kernel, "dkdv", fp64, L, S, head_block)
        grid = lambda meta: (cdiv(S, meta["BLOCK_N"]) * Z * Hk,)  # noqa: E731
        launch[grid](
            q, k, v, bias_ptr, grad_out, lse, delta, dk, dv,
            Hq, Hk, L, S, E, Ev, *bias_strides, **common,
        )  # fmt: skip
    if R > 0:
        launch = _launcher(_attention_bwd_dq_kernel, "dq", fp64, L, S, head_block)
        grid = lambda meta: (cdiv(L, meta["BLOCK_M"]) * Z * Hq,)  # noqa: E731
        launch[grid](
            q, k, v, bias_ptr, grad_out, lse, delta, dq,
            Hq, Hk, L, S, E, Ev, *bias_strides, **common,
        )  # fmt: skip
    return dq, dk, dv
