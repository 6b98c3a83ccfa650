"""Causal flash attention (FlashAttention-2 style), forward and backward, on tensor cores.

`attention(q, k, v, causal=True, scale=None)` on (B, H, T, D) tensors equals
`F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)`.

Forward (`_attn_fwd`, one program per (BLOCK_M query rows, one batch*head)):
    S = (Q_tile @ K_tile^T) * scale * log2(e), processed one BLOCK_N key tile at a time with an
    online softmax in fp32: running row max m (base 2), running row sum l, accumulator acc (fp32,
    BLOCK_M x D) rescaled by exp2(m_old - m_new) whenever the max grows. P = exp2(S - m) is cast to
    the value dtype for the P @ V dot, so fp16/bf16 inputs use tensor cores for both dots.
    Loop bounds skip every key tile strictly above the diagonal (never loaded); tiles left of the
    diagonal run unmasked; only the diagonal tiles (and, without causal, the key tail) are masked.
    Stored: O = acc / l in the input dtype, and the fp32 logsumexp LSE = (m + log2 l) * ln 2 of the
    scaled scores, (B, H, T). Nothing of size T x T exists anywhere, in memory or in registers.

Backward (three launches, deterministic: every output element is written by exactly one program,
no atomics, so no accumulation survives between autotune trials and no reset hook is needed):
    1. `_attn_bwd_preprocess`: delta = rowsum(dO * O) in fp32, (B, H, T).
    2. `_attn_bwd_dkdv`: one program per BLOCK_N keys; iterates over query tiles from the diagonal
       down to T (causal) recomputing P^T = exp2(K Q^T * scale*log2e - LSE*log2e):
       dV += P^T dO, dS^T = P^T * (V dO^T - delta), dK += dS^T Q; dK *= scale at the end.
    3. `_attn_bwd_dq`: one program per BLOCK_M queries; iterates over key tiles up to the diagonal:
       dQ += dS K; dQ *= scale.
    All accumulation in fp32; dQ, dK, dV are cast to the input dtype.
    Tiny T (T <= SPLIT_DS_MAX_T = 16, fp16/bf16): a row of dQ or dK is then a sum of a handful of terms,
    so an error in one dS value is shared by the whole D-wide row instead of averaging out over many
    keys. Two such errors took dq / dk to 3.5x / 4.4x the error of the rounded fp32 result at
    (B, H, T, D) = (2, 3, 2, 128) bf16: delta = rowsum(dO * O) read from the stored, rounded O (with
    1-3 keys dP - delta is a small difference and that rounding dominates it), and dS rounded to the
    input dtype for its dots. There `_attn_bwd_delta_small` replaces step 1 with delta = rowsum(P * dP)
    from fp32 P and dP (== dO . O before rounding; one program per batch*head, all T rows and keys in
    one tile), and the dot kernels carry dS as hi + lo, both in the input dtype, two dots each
    (SPLIT_DS). Then dq / dk equal the rounded fp32 result (tests/test_attention.py, test_tiny_T_parity).
    Out-of-range query rows (T not a multiple of the tile) are loaded as zeros in q, dO, LSE and
    delta, which makes their P^T dO and dS^T Q contributions exactly zero, so the backward needs no
    bounds mask on the scores, only the causal mask on diagonal tiles.

Saved for backward: q, k, v (the caller's views, not copies), O and LSE: O(B*H*T*D) memory, of
which only LSE (B*H*T fp32) is new.

Limits: head dim D in {16, 32, 64, 128}; q, k, v of one shape, dtype and device; dtypes (the one rule
of every kernel, kernels._launch.DTYPES) fp32, bf16 or fp16, accumulation in fp32, any other dtype
(float64 included) raising DtypeError (a TypeError and a ValueError) naming it; stride(-1) == 1
required (q, k, v split from the fused c_attn output qualify: the other strides are passed to the
kernels as they are, no copy). A dO with a non-unit last stride (e.g. the expanded gradient of
`o.sum()`) is copied with `.contiguous()`; the model's gradients arrive with unit stride. O is allocated as (B, T, H, D) memory and
returned as its (B, H, T, D) transpose, so the model's `y.transpose(1, 2).reshape(B, T, C)` is free.

fp32 inputs use IEEE fp32 dots (no TF32) so fp32 parity holds to ~1e-6; on the GPU that is a
correctness path, not a fast one (FMA dots, one small untuned tile per kernel and head dim; training
runs bf16 or fp16 under autocast). fp16 inputs (GPUs without bf16) take the same path as bf16: P and
dS are rounded to fp16 for the tensor-core dots, everything accumulates in fp32.
Under TRITON_INTERPRET=1 the dot operands are upcast to fp32 (the interpreter's bf16 tl.dot is wrong,
triton issue 11584) after the same roundings the compiled kernel does: P, dS and the outputs go
through `store_cast`, which rounds to nearest even as the GPU's cvt.rn does (the interpreter's own
fp32 -> bf16 cast truncates), and one fixed small config is used instead of autotuning.

Configs: one table per GPU family (`TABLES`, `FP32_TABLES`; `kernels._launch.config_table` maps a
compute capability to its table): mma.sync tables for 8.0 (163 KB of shared memory per block) and
8.6 / 8.9 / 12.x (99 KB), a wgmma table for 9.0, a tcgen05 table for 10.x. Each tile states the largest
head dim it fits; every tile was compiled for its arch (0 spills, shared memory within the limit).
Below 8.0 there is no table: attention routes to SDPA (`kernels.arch_plan`). The autotuner sees every
table's configs, prunes to the running GPU's, and is keyed on D, causal, the dtypes and T rounded up
to a power of two. A process can instead pin its configs: `install_attention_configs(entries)` (e.g.
the table `attention_configs()` returned in the run that wrote a checkpoint) or
FASTGPT_ATTENTION_CONFIGS=fixed / `set_attention_config_mode("fixed")` (each table's first fitting
tile), so every process launches the same tiles and results are bitwise reproducible.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._jit import store_cast
from ._launch import (
    Build,
    DtypeError,
    _cuda_index,
    attention_route,
    can_launch,
    check_dtypes,
    count_launch,
    device_plan,
    interpreting,
    on_tensor_device,
    next_pow2,
    register_builds,
    register_workspace,
    table_arch,
    why_not,
)

HEAD_DIMS = (16, 32, 64, 128)


# ============================================================================================
# Kernels
# ============================================================================================
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, T_BUCKET, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # T_BUCKET (next_pow2(T)) is unused in the body: it is only an autotune key.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T

    # (BLOCK_M, D) query tile, held in registers for the whole key loop.
    q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * stride_qt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # scores in base 2: exp(x) == exp2(x * log2 e)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Stage 1: key tiles that need no mask. Causal: keys [0, start_m) lie left of the diagonal
    # (BLOCK_M % BLOCK_N == 0, so tiles never straddle it) and below T. Not causal: full tiles.
    if CAUSAL:
        split = start_m
        hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        split = (T // BLOCK_N) * BLOCK_N
        hi = T
    for start_n in range(0, split, BLOCK_N):
        rows_n = (start_n + offs_n).to(tl.int64)
        k = tl.load(k_base + rows_n[:, None] * stride_kt + offs_d[None, :])  # (BLOCK_N, D)
        v = tl.load(v_base + rows_n[:, None] * stride_vt + offs_d[None, :])
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = store_cast(p, v.dtype)
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    # Stage 2: the diagonal tiles (causal) or the key tail beyond the last full tile; masked.
    # Every query row sees at least one valid key in the first of these tiles (key start_m for
    # causal), so the running max is finite before any all-masked row segment appears: no NaN.
    for start_n in range(split, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < T
        rows_n = cols.to(tl.int64)
        k = tl.load(k_base + rows_n[:, None] * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_base + rows_n[:, None] * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL:
            keep = offs_m[:, None] >= cols[None, :]
        else:
            keep = n_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = store_cast(p, v.dtype)
        if UPCAST_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of the scaled scores
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)
    tl.store(o_base + offs_m.to(tl.int64)[:, None] * stride_ot + offs_d[None, :],
             store_cast(acc, O.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :],
                mask=m_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :],
                 mask=m_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _attn_bwd_delta_small(
    Q, K, V, DO, LSE, DELTA,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    H, T, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # T <= BLOCK (tiny T, see the docstring): delta = rowsum(P * dP) from the fp32 P and dP, i.e. dO . O
    # with O unrounded, instead of dO . O from the stored (rounded) O. One program per (batch, head).
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs < T
    rows = offs.to(tl.int64)[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qt + offs_d[None, :], mask=ok[:, None], other=0.0)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows * stride_kt + offs_d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows * stride_vt + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :],
                 mask=ok[:, None], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * T + offs, mask=ok, other=0.0) * 1.4426950408889634
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (sm_scale * 1.4426950408889634)
    keep = ok[None, :]
    if CAUSAL:
        keep = keep & (offs[:, None] >= offs[None, :])
    p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs, tl.sum(p * dp, 1), mask=ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, T, T_BUCKET, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_DS: tl.constexpr,
):
    # One program: BLOCK_N keys of one (batch, head); loops over BLOCK_M query tiles.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stat_base = pid_bh.to(tl.int64) * T

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < T
    rows_n = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + b * stride_kb + h * stride_kh + rows_n * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows_n * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query tiles [start_n, start_n + BLOCK_N) straddle the diagonal (BLOCK_N % BLOCK_M == 0) and
    # take the causal mask; later ones run unmasked; earlier ones see none of these keys (skipped).
    if CAUSAL:
        lo = start_n
        split = tl.minimum(start_n + BLOCK_N, T)
    else:
        lo = 0
        split = 0
    for phase in tl.static_range(2):
        if phase == 0:
            m_lo = lo
            m_hi = split
        else:
            m_lo = split
            m_hi = T
        for start_m in range(m_lo, m_hi, BLOCK_M):
            cols = start_m + offs_m  # query rows of this tile
            m_ok = cols < T
            rows_m = cols.to(tl.int64)[:, None]
            q = tl.load(q_base + rows_m * stride_qt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            do = tl.load(do_base + rows_m * stride_dot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            # Zeros past T make those rows' contributions vanish (see the docstring).
            lse2 = tl.load(LSE + stat_base + cols, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + stat_base + cols, mask=m_ok, other=0.0)
            if UPCAST_DOT:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            # (BLOCK_N, BLOCK_M): transposed scores, keys down, queries across.
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            pt = tl.math.exp2(st - lse2[None, :])
            if phase == 0:
                pt = tl.where(cols[None, :] >= offs_n[:, None], pt, 0.0)
            pt_lo = store_cast(pt, DO.dtype.element_ty)
            if UPCAST_DOT:
                pt_lo = pt_lo.to(tl.float32)
            dv = tl.dot(pt_lo, do, dv, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst32 = pt * (dpt - delta[None, :])
            dst = store_cast(dst32, Q.dtype.element_ty)
            if SPLIT_DS:  # tiny T: dS^T = hi + lo, both in the input dtype (see the docstring)
                dst_lo = store_cast(dst32 - dst.to(tl.float32), Q.dtype.element_ty)
                if UPCAST_DOT:
                    dst_lo = dst_lo.to(tl.float32)
                dk = tl.dot(dst_lo, q, dk, input_precision=DOT_PRECISION)
            if UPCAST_DOT:
                dst = dst.to(tl.float32)
            dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows_n * stride_dkt + offs_d[None, :],
             store_cast(dk, DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows_n * stride_dvt + offs_d[None, :],
             store_cast(dv, DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, T_BUCKET, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_DS: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head); loops over BLOCK_N key tiles.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    stat_base = pid_bh.to(tl.int64) * T

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    rows_m = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows_m * stride_qt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows_m * stride_dot + offs_d[None, :],
                 mask=m_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + stat_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + stat_base + offs_m, mask=m_ok, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Keys [0, start_m) are left of the diagonal (BLOCK_M % BLOCK_N == 0): unmasked, all < T.
    # Keys [start_m, min(start_m + BLOCK_M, T)): diagonal tiles, causal mask. Not causal: every
    # tile in phase 1, keys past T loaded as zeros and masked.
    if CAUSAL:
        split = start_m
        hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        split = 0
        hi = T
    for phase in tl.static_range(2):
        if phase == 0:
            n_lo = 0
            n_hi = split
        else:
            n_lo = split
            n_hi = hi
        for start_n in range(n_lo, n_hi, BLOCK_N):
            cols = start_n + offs_n
            rows_n = cols.to(tl.int64)[:, None]
            if phase == 0:
                k = tl.load(k_base + rows_n * stride_kt + offs_d[None, :])
                v = tl.load(v_base + rows_n * stride_vt + offs_d[None, :])
            else:
                n_ok = cols < T
                k = tl.load(k_base + rows_n * stride_kt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
                v = tl.load(v_base + rows_n * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
            if UPCAST_DOT:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(s - lse2[:, None])
            if phase == 1:
                # Keys past T are zero vectors, but exp2(-lse) may overflow for them: mask anyway.
                if CAUSAL:
                    p = tl.where(offs_m[:, None] >= cols[None, :], p, 0.0)
                else:
                    p = tl.where((cols < T)[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds32 = p * (dp - delta[:, None])
            ds = store_cast(ds32, Q.dtype.element_ty)
            if SPLIT_DS:  # tiny T: dS = hi + lo, both in the input dtype (see the docstring)
                ds_lo = store_cast(ds32 - ds.to(tl.float32), Q.dtype.element_ty)
                if UPCAST_DOT:
                    ds_lo = ds_lo.to(tl.float32)
                dq = tl.dot(ds_lo, k, dq, input_precision=DOT_PRECISION)
            if UPCAST_DOT:
                ds = ds.to(tl.float32)
            dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows_m * stride_dqt + offs_d[None, :],
             store_cast(dq, DQ.dtype.element_ty), mask=m_ok[:, None])


# ============================================================================================
# Autotune configs and launchers
# ============================================================================================
@dataclass(frozen=True)
class Tile:
    """One launch config of one attention kernel.

    The head-dim limit lives here, not as an attribute on `triton.Config`: Triton's autotune disk cache
    (TRITON_CACHE_AUTOTUNING=1) rebuilds configs with `triton.Config(**config.__dict__)`, which rejects
    anything extra, so the configs handed to `triton.autotune` carry only Triton's own fields."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    max_head_dim: int = 128  # larger head dims spill (or overflow shared memory) with this tile

    @property
    def key(self) -> tuple[int, int, int, int]:
        return self.BLOCK_M, self.BLOCK_N, self.num_warps, self.num_stages

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, num_warps=self.num_warps, num_stages=self.num_stages)

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N},
                             num_warps=self.num_warps, num_stages=self.num_stages)


_t = Tile  # short name for the tables below: _t(BLOCK_M, BLOCK_N, num_warps, num_stages[, max_head_dim])


KERNELS = ("fwd", "dkdv", "dq")
# Per config table (chosen by compute capability: `kernels._launch.config_table`), per kernel, the
# autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages[, largest head dim]); the first one
# that allows a head dim is what FASTGPT_ATTENTION_CONFIGS=fixed launches. Forward and dQ need
# BLOCK_M % BLOCK_N == 0, dK/dV needs BLOCK_N % BLOCK_M == 0 (diagonal tiles never straddle a loop
# split). mma.sync (8.x, 12.x) works per warp on 16-row fragments: 4 warps on 64-128 rows. wgmma (9.0)
# works per warpgroup of 4 warps on 64 rows: 128-row tiles in 8 warps give two warpgroups. tcgen05
# (10.x) issues from one thread into tensor memory, so registers matter less there.
# Every (tile, head dim <= its limit, fp16/bf16) below was compiled for its table's arch by
# `python -m bench.compile_report` at T=1024: 0 spill bytes and shared memory within the arch's per-block
# limit (the test suite checks it, tests/test_compile_report.py).
TABLES: dict[str, dict[str, list[Tile]]] = {
    "sm80": {  # A100: 163 KB per block
        "fwd": [_t(128, 64, 4, 3, 64), _t(128, 32, 4, 3, 64), _t(64, 64, 4, 3), _t(128, 64, 8, 3)],
        "dkdv": [_t(32, 64, 4, 3), _t(32, 128, 8, 2), _t(32, 64, 4, 4, 64), _t(64, 64, 4, 3, 64)],
        "dq": [_t(64, 32, 4, 3), _t(64, 64, 4, 3), _t(128, 32, 8, 3), _t(128, 64, 8, 2, 64)],
    },
    "sm86": {  # RTX 30xx: 99 KB per block; at D=128 sm80's fwd 128x64 w8 spills, dQ 64x64 w4 needs 104 KB
        "fwd": [_t(64, 64, 4, 3), _t(128, 64, 4, 3, 64), _t(128, 32, 4, 3), _t(64, 64, 8, 3)],
        "dkdv": [_t(32, 64, 4, 3), _t(32, 128, 8, 2), _t(32, 64, 4, 4, 64)],
        "dq": [_t(64, 32, 4, 3), _t(128, 32, 8, 3), _t(64, 64, 8, 2), _t(128, 64, 8, 3, 64)],
    },
    "sm90": {  # H100: 227 KB per block, wgmma
        "fwd": [_t(128, 64, 8, 3), _t(128, 128, 8, 2, 64), _t(64, 64, 4, 3), _t(128, 64, 4, 3, 64)],
        "dkdv": [_t(64, 64, 4, 3, 64), _t(32, 128, 8, 2), _t(32, 128, 8, 3, 64), _t(64, 128, 8, 1, 64)],
        "dq": [_t(64, 64, 4, 3), _t(128, 64, 8, 2, 64), _t(128, 32, 8, 3), _t(64, 32, 4, 3)],
    },
    "sm100": {  # B200: 227 KB per block, tcgen05 (accumulators in tensor memory: fewer registers)
        "fwd": [_t(128, 64, 8, 3), _t(128, 128, 8, 2), _t(128, 64, 4, 3, 64)],
        "dkdv": [_t(64, 64, 4, 3), _t(64, 128, 8, 1), _t(32, 64, 4, 3), _t(32, 128, 8, 2, 64)],
        "dq": [_t(64, 64, 4, 3), _t(128, 64, 8, 2), _t(128, 32, 8, 3), _t(64, 32, 4, 3)],
    },
    "sm120": {  # RTX 50xx: mma.sync, 99 KB per block; its ptxas spills more at D=128: 8-warp tiles there
        "fwd": [_t(64, 64, 8, 3), _t(128, 64, 8, 3, 64), _t(64, 32, 4, 3), _t(128, 32, 8, 2)],
        "dkdv": [_t(32, 64, 8, 3), _t(32, 64, 4, 4), _t(32, 128, 8, 2, 64)],
        "dq": [_t(64, 32, 8, 3), _t(64, 64, 8, 2), _t(128, 32, 8, 2), _t(64, 32, 4, 3)],
    },
}
TABLES["sm89"] = TABLES["sm86"]  # RTX 40xx, L4: same mma.sync and 99 KB as 8.6; compiled for sm_89 on its own
# fp32 inputs (accepted, not fast): IEEE fp32 dots run on FMA units, where each thread holds its share of
# every fp32 operand tile: larger tiles spill at D=128 (on sm_90a and up even 32x32 in 8 warps), so
# small tiles, the same on every arch, one per kernel and head dim (no tuning).
_FP32 = {"fwd": [_t(32, 32, 8, 2, 64), _t(16, 16, 4, 2)], "dkdv": [_t(16, 32, 8, 2)],
         "dq": [_t(32, 32, 8, 2, 64), _t(16, 16, 4, 1)]}
FP32_TABLES: dict[str, dict[str, list[Tile]]] = {name: _FP32 for name in TABLES}
# Under the interpreter: one small config each, BLOCK_M != BLOCK_N so the straddling diagonal
# tiles are exercised.
INTERP_TILES = {"fwd": _t(64, 32, 4, 1), "dkdv": _t(32, 64, 4, 1), "dq": _t(64, 32, 4, 1)}
# The backward's tiny-T path (`split_ds`: T <= SPLIT_DS_MAX_T, fp16/bf16) launches one fixed tile on every
# arch, in every config mode and under the interpreter: 16 x 16 holds every query and key of such a T, so
# there is nothing to tune, and larger tiles only add masked work (at D=128, with dS carried as a hi + lo
# pair, they spill registers on several archs).
SPLIT_DS_TILES = {"dkdv": _t(16, 16, 4, 1), "dq": _t(16, 16, 4, 1)}
PRE_BLOCK_M = 16  # 32 and 64 rows in 4 warps spill a few bytes on sm_100a (ptxas 13), 16 none


def tiles_for(kernel: str, table: str, dtype: torch.dtype, head_dim: int) -> list[Tile]:
    """The candidates of one kernel on one config table for inputs of this dtype and head dim."""
    tables = FP32_TABLES if dtype == torch.float32 else TABLES
    return [t for t in tables[table][kernel] if head_dim <= t.max_head_dim]


def autotune_configs(kernel: str) -> list[triton.Config]:
    """Every table's candidates for `kernel` as plain triton.Configs (deduplicated); the pruner keeps the
    running GPU's ones."""
    seen: dict[tuple, Tile] = {}
    for tables in (TABLES, FP32_TABLES):
        for table in tables.values():
            for t in table[kernel]:
                seen.setdefault(t.key, t)
    return [t.config() for t in seen.values()]


def _config_key(c: triton.Config) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _table_of(t: torch.Tensor) -> str:
    plan = device_plan(t.device)
    if plan.table is None:
        raise RuntimeError(f"kernels.attention cannot run on this GPU: {plan.reason}")
    return plan.table


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        allowed = {t.key for t in tiles_for(kernel, _table_of(q), q.dtype, d)}
        return [c for c in configs if _config_key(c) in allowed]
    return prune


def _tuned(fn, kernel: str):
    # The autotuner sees every table's configs and prunes to the running GPU's at first call.
    # No reset_to_zero: no output accumulates across trials (plain stores, no atomics).
    return triton.autotune(configs=autotune_configs(kernel), key=["HEAD_DIM", "T_BUCKET", "CAUSAL"],
                           prune_configs_by={"early_config_prune": _pruner(kernel)})(fn)


_RAW = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_TUNED = {} if interpreting() else {k: _tuned(fn, k) for k, fn in _RAW.items()}


# --------------------------------------------------------------------------------------------
# Which config each launch uses: autotuned (default), fixed, or installed from a saved table.
# --------------------------------------------------------------------------------------------
CONFIG_ENV = "FASTGPT_ATTENTION_CONFIGS"
CONFIG_MODES = ("autotune", "fixed")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_ENTRY_KEYS = ("kernel", "arch", "head_dim", "dtype", "t_bucket", "causal")
_mode: str | None = None  # set_attention_config_mode's choice; None: the environment's
_installed: dict[tuple, Tile] = {}  # from install_attention_configs
_chosen: dict[tuple, Tile] = {}  # what this process launched, per key


def set_attention_config_mode(mode: str | None) -> None:
    """'autotune' (default) or 'fixed': every launch takes the first candidate of its arch's table, no
    benchmarking, the same in every process (bitwise-reproducible runs). None: back to the environment
    variable FASTGPT_ATTENTION_CONFIGS (unset means 'autotune'). Installed configs win over both."""
    global _mode
    if mode is not None and mode not in CONFIG_MODES:
        raise ValueError(f"attention config mode must be one of {CONFIG_MODES}, got {mode!r}")
    _mode = mode


def attention_config_mode() -> str:
    mode = _mode or os.environ.get(CONFIG_ENV) or "autotune"
    if mode not in CONFIG_MODES:
        raise ValueError(f"{CONFIG_ENV}={mode!r} is not one of {CONFIG_MODES}")
    return mode


@functools.lru_cache(maxsize=None)
def _cuda_arch_name(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def _arch_name(t: torch.Tensor) -> str:
    if t.device.type != "cuda":
        return "interpreter"
    return _cuda_arch_name(_cuda_index(t.device))


def attention_configs() -> list[dict]:
    """The config every attention kernel launched with in this process, one JSON-able dict per
    (kernel, arch, head_dim, dtype, t_bucket, causal), e.g. to save in a checkpoint and hand to
    `install_attention_configs` when the run resumes, so the resumed process launches the same tiles."""
    return [{**dict(zip(_ENTRY_KEYS, key)), **tile.launch_kwargs()}
            for key, tile in sorted(_chosen.items(), key=lambda kv: tuple(map(str, kv[0])))]


def install_attention_configs(entries: list[dict]) -> int:
    """Launch with these configs (the format `attention_configs` returns) wherever their key matches,
    instead of autotuning; entries for another arch are kept and simply never match here. Replaces
    what was installed before; returns the number of entries. A malformed entry raises ValueError
    naming it, and nothing is installed."""
    table = {}
    for e in entries:
        try:
            key = tuple(e[k] for k in _ENTRY_KEYS)
            kernel, arch, d, dtype, t_bucket, causal = key
            tile = Tile(*(int(e[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")), max_head_dim=d)
            ok = (kernel in KERNELS and isinstance(arch, str) and d in HEAD_DIMS and dtype in _DTYPE_NAMES.values()
                  and isinstance(t_bucket, int) and t_bucket == next_pow2(t_bucket) and isinstance(causal, bool)
                  and all(v == next_pow2(v) and v >= 1 for v in tile.key[:3]) and tile.num_stages >= 1
                  and min(tile.BLOCK_M, tile.BLOCK_N) >= 16
                  and (tile.BLOCK_N % tile.BLOCK_M == 0 if kernel == "dkdv" else tile.BLOCK_M % tile.BLOCK_N == 0))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"not an attention config entry: {e!r}")
        table[key] = tile
    _installed.clear()
    _installed.update(table)
    return len(table)


def clear_attention_configs() -> None:
    """Forget installed and recorded configs (the autotuner's own cache stays)."""
    _installed.clear()
    _chosen.clear()


def _run(kernel: str, grid, args: tuple, flags: dict, q: torch.Tensor, T: int) -> None:
    """Launch one attention kernel with the config this process uses for its key, and record it."""
    key = (kernel, _arch_name(q), flags["HEAD_DIM"], _DTYPE_NAMES[q.dtype], next_pow2(T), flags["CAUSAL"])
    tile = SPLIT_DS_TILES[kernel] if flags.get("SPLIT_DS") else _installed.get(key)
    if tile is None and interpreting():
        tile = INTERP_TILES[kernel]
    elif tile is None and attention_config_mode() == "fixed":
        tile = tiles_for(kernel, _table_of(q), q.dtype, flags["HEAD_DIM"])[0]
    if tile is not None:
        kw = tile.launch_kwargs()
        _RAW[kernel][grid(kw)](*args, **flags, **kw)
    else:
        tuned = _TUNED[kernel]
        tuned[grid](*args, **flags)
        c = tuned.best_config
        tile = Tile(*_config_key(c), max_head_dim=flags["HEAD_DIM"])
    _chosen[key] = tile
    count_launch(f"attention_{'bwd_' if kernel != 'fwd' else ''}{kernel}")


def _dot_flags(dtype: torch.dtype) -> dict:
    # fp32 inputs: exact fp32 dots (TF32 would cost ~1e-3 relative error).
    return dict(UPCAST_DOT=interpreting(), DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _new_bhtd(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (B, H, T, D) tensor over (B, T, H, D) memory: transposing back to (B, T, H*D) is free."""
    B, H, T, D = like.shape
    return torch.empty((B, T, H, D), dtype=dtype or like.dtype, device=like.device).transpose(1, 2)


def _launch_fwd(q, k, v, causal: bool, scale: float):
    B, H, T, D = q.shape
    o = _new_bhtd(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    args = (q, k, v, o, lse, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
            H, T, next_pow2(T), scale)
    flags = dict(HEAD_DIM=D, CAUSAL=causal, **_dot_flags(q.dtype))
    _run("fwd", lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H), args, flags, q, T)
    return o, lse


SPLIT_DS_MAX_T = 16  # tiny T: one tile of queries and of keys, where the extra work costs nothing measurable


def split_ds(T: int, dtype: torch.dtype) -> bool:
    """Whether the backward takes its tiny-T path: delta from the fp32 P and dP, dS carried as a hi + lo pair
    of fp16/bf16 tiles (see the module docstring)."""
    return T <= SPLIT_DS_MAX_T and dtype != torch.float32


def _launch_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    B, H, T, D = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()  # documented copy; autograd hands this op unit-stride gradients
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    small = split_ds(T, q.dtype)
    if small:
        _attn_bwd_delta_small[(B * H,)](
            q, k, v, do, lse, delta, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), H, T, scale,
            HEAD_DIM=D, BLOCK=SPLIT_DS_MAX_T, CAUSAL=causal, **_dot_flags(q.dtype), num_warps=4)
        count_launch("attention_bwd_delta_small")
    else:
        _attn_bwd_preprocess[(triton.cdiv(T, PRE_BLOCK_M), B * H)](
            o, do, delta, *_strides3(o), *_strides3(do), H, T, HEAD_DIM=D, BLOCK_M=PRE_BLOCK_M, num_warps=4)
        count_launch("attention_bwd_preprocess")

    dq, dk, dv = _new_bhtd(q), _new_bhtd(k), _new_bhtd(v)
    common = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do))
    tail = (H, T, next_pow2(T), scale)
    flags = dict(HEAD_DIM=D, CAUSAL=causal, SPLIT_DS=small, **_dot_flags(q.dtype))
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, *common, *_strides3(dk), *_strides3(dv), *tail)
    dq_args = (q, k, v, do, lse, delta, dq, *common, *_strides3(dq), *tail)
    _run("dkdv", lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H), dkdv_args, flags, q, T)
    _run("dq", lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H), dq_args, flags, q, T)
    return dq, dk, dv


@register_workspace("attention_bwd")
def _bwd_workspace(do, q, k, v, o, lse, causal, scale):
    """What `_launch_bwd` allocates on CUDA besides dq, dk, dv: delta (B, H, T) fp32, and dO made unit-stride."""
    B, H, T, _ = q.shape
    work = [((B, H, T), torch.float32)]
    if do.stride(-1) != 1:
        work.append((tuple(do.shape), do.dtype))
    return work


# ============================================================================================
# Custom ops (torch.compile / FakeTensorMode see through them) and autograd
# ============================================================================================
@torch.library.custom_op("fastgpt::attention_fwd", mutates_args=())
@on_tensor_device
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, LSE): O (B, H, T, D) in q's dtype, LSE (B, H, T) fp32."""
    # The launch check lives here, not in `attention`, so fake tensors (torch.compile tracing,
    # bench.memory's CPU fake tensors standing in for CUDA ones) reach the fake implementation.
    if not can_launch(q, k, v):
        raise RuntimeError(f"kernels.attention cannot run: {why_not(q, k, v)}")
    if q.is_cuda and attention_route(q.device) != "triton":
        raise RuntimeError(f"kernels.attention cannot run on this GPU: {device_plan(q.device).reason}")
    return _launch_fwd(q, k, v, causal, scale)


@attention_fwd.register_fake
def _(q, k, v, causal, scale):
    B, H, T, D = q.shape
    return _new_bhtd(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("fastgpt::attention_bwd", mutates_args=())
@on_tensor_device
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in the input dtype."""
    return _launch_bwd(do, q, k, v, o, lse, causal, scale)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return _new_bhtd(q), _new_bhtd(k), _new_bhtd(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================================
# Public function and reference
# ============================================================================================
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v on (B, H, T, D) tensors; scale defaults to D**-0.5."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, T, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    check_dtypes("attention", q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise DtypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} is not supported; supported: {HEAD_DIMS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have stride 1 in its last dimension, got strides {tuple(t.stride())}")
    if q.shape[0] * q.shape[1] > 65535:  # B*H is the grid's second axis, which CUDA caps at 65535
        raise ValueError(f"B*H = {q.shape[0] * q.shape[1]} exceeds 65535; split the batch into smaller calls")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, _ = attention_fwd(q, k, v, bool(causal), float(scale))
    return o


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch attention, computed in q's dtype; materializes the (T, T) matrix."""
    T, D = q.shape[-2], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


# ============================================================================================
# Compile-report builds: every table's candidates at GPT-2 shapes (T=1024), fp16, bf16 and fp32 at every
# head dim a tile allows, each for the arch(s) whose table holds it; the tiny-T backward's one tile.
# ============================================================================================
def _signature(fn, dtype: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):
            sig[name] = "*" + dtype
        elif name == "sm_scale":
            sig[name] = "fp32"
        elif name.startswith("stride_") or name in ("H", "T", "T_BUCKET"):
            sig[name] = "i32"
        else:
            sig[name] = "constexpr"
    return sig


def _divisibility(fn, t_aligned: bool = True) -> dict:
    # What the launcher's specialization sees at GPT-2 shapes: 16-byte aligned pointers, strides,
    # T and T_BUCKET multiples of 16 (H = 12 is not). t_aligned=False: T % 16 != 0 (T_BUCKET still is).
    pointers = {"Q", "K", "V", "O", "LSE", "DO", "DELTA", "DK", "DV", "DQ"}
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name in pointers or name.startswith("stride_") or name == "T_BUCKET" or (name == "T" and t_aligned)}


def _table_archs() -> dict[str, str]:
    """config table -> the compile target it is checked on."""
    return {table: table_arch(table).name for table in TABLES}


# Launch shapes beyond GPT-2's causal T=1024, each its own report group at bf16 D=64 (label, causal, T):
# non-causal; T=1 (one-token decoding: the JIT specializes an int argument equal to 1, and T_BUCKET =
# next_pow2(1) = 1, into constants); T=1000 (T % 16 != 0: no divisibility hint on T).
_VARIANTS = (("", True, 1024), (" non-causal", False, 1024), (" T=1", True, 1), (" T=1000", True, 1000))


def _kernel_builds(kernel: str, head_dims=HEAD_DIMS) -> list[Build]:
    """One build per distinct (tile, dtype, head dim, shape variant), for every arch whose table holds that tile.

    Every head dim the launcher accepts (HEAD_DIMS) at every dtype; the _VARIANTS shapes at bf16 D=64.
    """
    fn, report = _RAW[kernel], "attention_" + ("fwd" if kernel == "fwd" else "bwd_" + kernel)
    named = {name: dt for dt, name in _DTYPE_NAMES.items()}
    seen: dict[tuple, dict[str, int]] = {}
    for table, arch in _table_archs().items():
        for dtype, tables in (("fp16", TABLES), ("bf16", TABLES), ("fp32", FP32_TABLES)):
            for d in head_dims:
                for variant in _VARIANTS if (dtype, d) == ("bf16", 64) else _VARIANTS[:1]:
                    for rank, t in enumerate(tiles_for(kernel, table, named[dtype], d)):
                        seen.setdefault((t.key, dtype, d, variant), {})[arch] = rank
    out = []
    # The backward's tiny-T path (split_ds: T <= SPLIT_DS_MAX_T, fp16/bf16) is its own group per dtype and
    # head dim: its one tile (SPLIT_DS_TILES) on every table's arch.
    items = [(key, ranks, False if kernel != "fwd" else None) for key, ranks in seen.items()]
    if kernel != "fwd":
        archs = {arch: 0 for arch in _table_archs().values()}
        items += [((SPLIT_DS_TILES[kernel].key, dtype, d, _VARIANTS[0]), archs, True)
                  for dtype in ("fp16", "bf16") for d in head_dims]
    for ((bm, bn, warps, stages), dtype, d, (label, causal, T)), ranks, split in items:
        signature, constexprs = _signature(fn, dtype), {}
        if T == 1:
            signature.update(T="constexpr", T_BUCKET="constexpr")
            constexprs.update(T=1, T_BUCKET=1)
        constexprs.update(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, UPCAST_DOT=False,
                          DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        if split is not None:
            constexprs["SPLIT_DS"] = split
        t_note, g_note = (f"<={SPLIT_DS_MAX_T}", " split-dS") if split else (f"={T}", "")
        out.append(Build(
            kernel=report, fn=fn, signature=signature, constexprs=constexprs,
            num_warps=warps, num_stages=stages,
            config=f"{dtype} T{t_note} D={d}{' non-causal' if not causal else ''} BLOCK_M={bm} BLOCK_N={bn} "
                   f"w{warps} s{stages}",
            attrs=_divisibility(fn, T % 16 == 0 and T > 1), archs=tuple(ranks),
            group=f"{dtype} D={d}{label}{g_note}", rank=ranks))
    return out


@register_builds
def _builds() -> list[Build]:
    builds = [b for kernel in KERNELS for b in _kernel_builds(kernel)]
    fn = _attn_bwd_preprocess
    for dtype in ("fp16", "bf16", "fp32"):
        for d in HEAD_DIMS:
            builds.append(Build(
                kernel="attention_bwd_preprocess", fn=fn, signature=_signature(fn, dtype),
                constexprs=dict(HEAD_DIM=d, BLOCK_M=PRE_BLOCK_M), num_warps=4, num_stages=1,
                config=f"{dtype} T=1024 D={d} BLOCK_M={PRE_BLOCK_M} w4", attrs=_divisibility(fn),
                archs=tuple(dict.fromkeys(_table_archs().values()))))
    fn = _attn_bwd_delta_small  # tiny T only (split_ds), so fp16/bf16 only
    for dtype in ("fp16", "bf16"):
        for d in HEAD_DIMS:
            builds.append(Build(
                kernel="attention_bwd_delta_small", fn=fn, signature=_signature(fn, dtype),
                constexprs=dict(HEAD_DIM=d, BLOCK=SPLIT_DS_MAX_T, CAUSAL=True, UPCAST_DOT=False,
                                DOT_PRECISION="tf32"), num_warps=4, num_stages=1,
                config=f"{dtype} T<={SPLIT_DS_MAX_T} D={d} BLOCK={SPLIT_DS_MAX_T} w4", attrs=_divisibility(fn),
                archs=tuple(dict.fromkeys(_table_archs().values()))))
    return builds
