"""The Triton kernels of forgetting attention (forward, backward, decoding, pruning) and their launch.

attention.py holds the math, the exact reference and the entry point ``forgetting_attention``, which calls
``forgetting_attention_triton`` here for CUDA tensors (or on the CPU under TRITON_INTERPRET=1). The section
below says what each kernel computes; docs/fox.md derives it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from . import acp

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: the torch backends still work
    triton = None


# ==================================================================================================
# Triton kernels (FlashAttention-2 structure), reached through `_TritonForgettingAttention`.
#
# Per batch row b and query head h (kv head h // GROUP), with q (Tq, D), k, v (Tk, D), log f (Tk,):
#   forward    c = cumsum(log f)                          `_gate_cumsum_kernel`, float32 (skipped when the
#                                                         caller passes c itself, as a decoding cache does)
#              O = softmax(s q k^T + D) v, lse per row     `_fwd_kernel`; decoding (Tq x GROUP <= 64 rows) and
#                                                         short chunked prefill: `_fwd_split_kernel`
#   backward   delta_i = sum_d O_id dO_id                  `_bwd_delta_kernel`
#              P = softmax(...), dS = P * (dO v^T - delta)
#              dK = s dS^T q, dV = P^T dO (summed over the GROUP heads), colsum(dS)   `_bwd_dkdv_kernel`
#              dQ = s dS k, rowsum(dS)                                               `_bwd_dq_kernel`
#              dc_t = rowsum(dS)_{query at t} - colsum(dS)_t,  dlog f_t = sum_{u >= t} dc_u
#                                                         `_gate_grad_kernel`
# rowsum(dS) is zero in exact arithmetic (a softmax ignores a constant added to its row), but delta comes from
# the stored O, rounded to 16 bits: the kernels' row sums are dO_i . (O_i - rounded O_i). Keeping them cancels
# the same error inside the column sums, which would otherwise bias dlog f at every key before the first query.
# P is never stored: both backward kernels recompute it from q, k, c and the forward's lse.
#
# Everything below works in base 2: the wrapper stores c2 = log2(e) * c once, and the kernels scale
# q k^T by qk_scale = log2(e) * sm_scale, so a logit in base 2 is
#     s2_ij = qk_scale * q_i . k_j + (c2_{p_i} - c2_j)      and   P_ij = exp2(s2_ij - lse2_i).
# The c difference is taken before it meets q.k: c grows to -1e4 and beyond on long sequences, and
# subtracting two nearby float32 values is exact where adding a large one to q.k would round it. The split
# kernel also reads natural c as the caller gave it (any strides) and scales the difference, log2(e) (c_i - c_j).
#
# Visibility of key j from query row i (key position p_i = Tk - Tq + i):
#     key_lo_i <= j <= p_i
# key_lo (B, Tq) is seq_start[b] (left padding) or the start of the row's packed sequence (varlen);
# query_hi (B, Tk) is its mirror for the backward pass: one past the last key position whose row can
# still see key j. Both are int32, often stride-0 views, and only read when MASK_LO is set.
#
# Loop bounds come from two helpers, `_query_block_key_range` and `_key_block_query_range`: each splits
# a block's range into blocks that need the causal mask (the diagonal) and blocks that do not.
#
# Adaptive computation pruning (acp.py; docs/fox.md, "Adaptive computation pruning"), flag PRUNE: a score
# whose decay c2_{p_i} - c2_j is below the base-2 threshold THRESHOLD[b, h] is dropped. A query block's keys
# then split into [start, band) (some scores dropped: masked), [band, mid) (none) and the diagonal, with
# every key block before `start` dropped for all rows and never loaded; a key block's query rows,
# symmetrically, end at `stop`. These bounds come from one small kernel per tile shape that binary-searches
# the prefix sums for every block at once (`_query_block_bounds_kernel`, `_key_block_bounds_kernel`). An
# attention program runs its diagonal tile first, whose range needs no bounds, while its two ints load; the
# band gets a loop of its own in the pruning variants only, entered only when the band is not empty (one
# loop with a branch per tile stalls its software pipeline: +10-18% on the H200). The "auto" threshold's pass over the q and k
# norms skips every head whose whole decay c_0 - c_{T-1} stays within the threshold at U = 0: no score of it
# can be pruned whatever its norms (log f = 0 costs that pass nothing). Decoding's split kernel
# starts each split at its first key block that some row keeps.
# ==================================================================================================

LOG2E = 1.4426950408889634
# Without Triton the kernels stay plain (never called) functions, so the module still imports.
_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def _initial_max(BLOCK_M: tl.constexpr):
    """Start of the running max. Masked logits are -inf; starting below every real base-2 logit but finite
    means a row with no visible key never computes (-inf) - (-inf)."""
    return tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)


@_jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking only what can run out: rows past n_rows, the padded head dim."""
    if CHECK_ROWS:
        mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@_jit
def _load_vec(ptrs, idx, n, other, CHECK: tl.constexpr):
    if CHECK:
        vec = tl.load(ptrs, mask=idx < n, other=other)
    else:
        vec = tl.load(ptrs)
    return vec


@_jit
def _mask_scores(s, decay, delta, q_pos, keys, key_lo, CAUSAL: tl.constexpr, MASK_LO: tl.constexpr,
                 PRUNE: tl.constexpr):
    """-inf where the key is not visible, or (PRUNE) where its decay c_q - c_k is below the threshold delta.

    q_pos, keys, key_lo and delta come already broadcast to s's layout; decay is s's gate term.
    """
    if CAUSAL:
        s = tl.where(keys <= q_pos, s, float("-inf"))
    if MASK_LO:
        s = tl.where(keys >= key_lo, s, float("-inf"))
    if PRUNE:
        s = tl.where(decay >= delta, s, float("-inf"))
    return s


@_jit
def _first_kept_key_block_rows(C, c_rows, c_q, delta, c_scale, valid, lo, hi, stride_ct, Tk, BLOCK_N: tl.constexpr):
    """Binary search for packed rows of several heads (split-key forward): the first key block n in [lo, hi) whose
    last key some valid row r keeps ((c_q[r] - c_key) * c_scale >= delta[r], the loop's own test; row r's prefix
    sums at C + c_rows[r] + key * stride_ct), else hi."""
    lo += tl.full([], 0, tl.int32)
    hi += tl.full([], 0, tl.int32)
    while lo < hi:
        mid = (lo + hi) // 2
        key = tl.minimum(mid * BLOCK_N + BLOCK_N - 1, Tk - 1)
        c_key = tl.load(C + c_rows + key * stride_ct, mask=valid, other=0.0)
        kept = tl.max(tl.where(valid & ((c_q - c_key) * c_scale >= delta), 1, 0), 0) > 0
        hi = tl.where(kept, mid, hi)
        lo = tl.where(kept, lo, mid + 1)
    return lo


@_jit
def _query_block_key_range(m0, offset, Tk, first_key_lo, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys read by query rows [m0, m0 + BLOCK_M): [start, mid) needs no causal mask, [mid, end) does.

    key_lo never decreases along the rows, so the block's first row has the smallest one.
    """
    start = (first_key_lo // BLOCK_N) * BLOCK_N
    mid = tl.maximum(((offset + m0 + 1) // BLOCK_N) * BLOCK_N, start)
    end = tl.minimum(offset + m0 + BLOCK_M, Tk)
    return start, mid, end


@_jit
def _query_block_rows(C, KEY_LO, b, m0, rows, offset, Tq, Tk, stride_lob, stride_lot,
                      MASK_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a block of query rows needs before its key loop (forward and dQ alike): key positions q_pos, gate
    prefix sums c_q, first visible key per row key_lo, and the block's key range start <= mid <= end."""
    q_pos = offset + rows
    c_q = tl.load(C + q_pos, mask=rows < Tq, other=0.0)
    if MASK_LO:
        key_lo = tl.load(KEY_LO + b * stride_lob + rows * stride_lot, mask=rows < Tq, other=Tk)
        first_key_lo = tl.load(KEY_LO + b * stride_lob + m0 * stride_lot)
    else:
        key_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
        first_key_lo = 0
    start, mid, end = _query_block_key_range(m0, offset, Tk, first_key_lo, BLOCK_M, BLOCK_N)
    return q_pos, c_q, key_lo, start, mid, end


@_jit
def _query_block_pruning(BOUNDS, DELTA, bh, m_block, n_blocks, start, PRUNE: tl.constexpr, BLOCK_M: tl.constexpr):
    """(threshold per row, start, band) of a query block (forward and dQ alike): with PRUNE, its threshold and the
    key range [start, band) partly pruned, from `_query_block_bounds_kernel`; without, zeros and an empty band."""
    if PRUNE:
        delta = tl.load(DELTA + bh)
        bounds = BOUNDS + (bh * n_blocks + m_block) * 2
        start = tl.load(bounds)
        band = tl.load(bounds + 1)
    else:
        delta = 0.0
        band = start
    return tl.zeros([BLOCK_M], dtype=tl.float32) + delta, start, band


@_jit
def _key_block_query_range(n0, offset, q_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows that read keys [n0, n0 + BLOCK_N): [start, mid) needs the causal mask, [mid, end) not.

    q_end is one past the last row that may see the block (Tq, or the end of a packed sequence).
    """
    start = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M
    mid = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M, start)
    return start, tl.minimum(mid, q_end), q_end


@_jit
def _fwd_inner(acc, l_i, m_i, q, c_q, q_pos, key_lo, delta, K, V, C, stride_kt, stride_vt, Tk, qk_scale,
               start, end, offs_n, offs_d,
               CAUSAL: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [start, end). Only causal (diagonal) blocks can run past Tk.

    delta: the pruning threshold per row (read only with PRUNE).
    """
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        k = _load_tile(K + keys[:, None] * stride_kt + offs_d[None, :], keys, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL)
        c_k = _load_vec(C + keys, keys, Tk, 0.0, CAUSAL)
        decay = c_q[:, None] - c_k[None, :]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + decay
        s = _mask_scores(s, decay, delta[:, None], q_pos[:, None], keys[None, :], key_lo[:, None], CAUSAL, MASK_LO,
                         PRUNE)
        v = _load_tile(V + keys[:, None] * stride_vt + offs_d[None, :], keys, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v, DOT_PRECISION)
    return acc, l_i, m_i


@_jit
def _fwd_kernel(Q, K, V, C, KEY_LO, DELTA, BOUNDS, O, LSE,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lob, stride_lot,
                H, Tq, Tk, qk_scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head). Writes O and the base-2 log-sum-exp.

    Key blocks: the diagonal [mid, end) first (its range needs no load, so its tiles stream in while the
    pruning bounds arrive), then [start, band) pruned in part (PRUNE only) and [band, mid) plain.
    """
    # Latest query blocks first: they have the most keys, and the short ones fill the tail of the grid.
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offset = Tk - Tq
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    C += bh * Tk

    q = _load_tile(Q + rows[:, None] * stride_qt + offs_d[None, :], rows, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    q_pos, c_q, key_lo, start, mid, end = _query_block_rows(C, KEY_LO, b, m0, rows, offset, Tq, Tk, stride_lob,
                                                            stride_lot, MASK_LO, BLOCK_M, BLOCK_N)
    delta, start, band = _query_block_pruning(BOUNDS, DELTA, bh, m0 // BLOCK_M, tl.num_programs(0), start, PRUNE,
                                              BLOCK_M)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = _initial_max(BLOCK_M)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, c_q, q_pos, key_lo, delta, K, V, C, stride_kt, stride_vt, Tk,
                               qk_scale, mid, end, offs_n, offs_d, True, MASK_LO, PRUNE, HEAD_DIM, BLOCK_D, BLOCK_N,
                               DOT_PRECISION)
    if PRUNE and start < band:  # a loop of its own, entered only when needed (section header)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, c_q, q_pos, key_lo, delta, K, V, C, stride_kt, stride_vt, Tk,
                                   qk_scale, start, band, offs_n, offs_d, False, MASK_LO, True, HEAD_DIM, BLOCK_D,
                                   BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, c_q, q_pos, key_lo, delta, K, V, C, stride_kt, stride_vt, Tk,
                               qk_scale, band, mid, offs_n, offs_d, False, MASK_LO, False, HEAD_DIM, BLOCK_D, BLOCK_N,
                               DOT_PRECISION)

    # A row with no visible key has l = 0: it returns 0, and a finite lse keeps its backward at 0 too.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_mask = (rows[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    O += b * stride_ob + h * stride_oh
    tl.store(O + rows[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + bh * Tq + rows, m_i + tl.log2(l_safe), mask=rows < Tq)


@_jit
def _split_inner(acc, l_i, m_i, q, c_q, q_pos, key_lo, delta, K, V, C, c_rows, stride_kt, stride_vt, stride_ct, Tk,
                 qk_scale, c_scale, start, end, offs_n, offs_d,
                 CAUSAL: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_HEAD: tl.constexpr):
    """Online softmax of packed rows (each its own head's prefix sums, C + c_rows[r] + key * stride_ct, scaled to
    base 2 by c_scale after the difference) over key blocks [start, end). Only CAUSAL blocks can run past Tk.
    ONE_HEAD (GROUP 1: every row of the tile is the same head): c_rows is one offset, and each key's c is loaded
    once and broadcast to the rows instead of once per row."""
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        k = _load_tile(K + keys[:, None] * stride_kt + offs_d[None, :], keys, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL)
        if ONE_HEAD:
            c_k = _load_vec(C + c_rows + keys * stride_ct, keys, Tk, 0.0, CAUSAL)[None, :]
        elif CAUSAL:
            c_k = tl.load(C + c_rows[:, None] + keys[None, :] * stride_ct, mask=keys[None, :] < Tk, other=0.0)
        else:
            c_k = tl.load(C + c_rows[:, None] + keys[None, :] * stride_ct)
        decay = (c_q[:, None] - c_k) * c_scale
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + decay
        s = _mask_scores(s, decay, delta[:, None], q_pos[:, None], keys[None, :], key_lo[:, None], CAUSAL, MASK_LO,
                         PRUNE)
        v = _load_tile(V + keys[:, None] * stride_vt + offs_d[None, :], keys, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, v, DOT_PRECISION)
    return acc, l_i, m_i


@_jit
def _online_softmax_step(acc, l_i, m_i, s, v, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax: base-2 scores s (rows, keys) and values v (keys, D) into the running
    max m, denominator l and unnormalized output acc."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@_jit
def _store_rows(O, LSE, o, lse, b, t, h, valid, offs_d, stride_ob, stride_ot, stride_oh, H, Tq,
                HEAD_DIM: tl.constexpr):
    """Write packed rows (b, query t, head h) of the output O (B, Tq, H, D) and the base-2 lse (B, H, Tq)."""
    o_mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(O + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + (b * H + h) * Tq + t, lse, mask=valid)


@_jit
def _combine_splits(O_PART, LSE_PART, O, LSE, b, hk, bhk, r_start, r_end, n_bhk, n_rows, num_splits, offs_d,
                    stride_ob, stride_ot, stride_oh, H, Tq, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, COMBINE_ROWS: tl.constexpr):
    """O = sum_s 2^(lse_s - lse) O_s and lse = log2 sum_s 2^lse_s for packed rows [r_start, r_end) of one kv head,
    COMBINE_ROWS rows x all splits per step (one round trip to L2, where the partials still are)."""
    splits = tl.arange(0, BLOCK_S)
    for r0 in range(r_start, r_end, COMBINE_ROWS):
        r = r0 + tl.arange(0, COMBINE_ROWS)
        ok = (splits[:, None] < num_splits) & (r[None, :] < r_end)
        part = (splits[:, None] * n_bhk + bhk) * n_rows + r[None, :]  # (BLOCK_S, COMBINE_ROWS)
        lse_s = tl.load(LSE_PART + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        lse_max = tl.max(lse_s, 0)
        lse_max = tl.where(r < r_end, lse_max, 0.0)  # rows past the tile's end: no split, nothing stored
        w = tl.where(ok, tl.exp2(lse_s - lse_max[None, :]), 0.0)
        o_mask = ok[:, :, None] & (offs_d[None, None, :] < HEAD_DIM)
        o_s = tl.load(O_PART + part[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=o_mask, other=0.0,
                      cache_modifier=".cg")
        total = tl.sum(w, 0)
        total = tl.where(r < r_end, total, 1.0)
        o = tl.sum(w[:, :, None] * o_s, 0) / total[:, None]
        _store_rows(O, LSE, o, lse_max + tl.log2(total), b, r // GROUP, hk * GROUP + r % GROUP, r < r_end, offs_d,
                    stride_ob, stride_ot, stride_oh, H, Tq, HEAD_DIM)


@_jit
def _fwd_split_kernel(Q, K, V, C, KEY_LO, DELTA, O, LSE, O_PART, LSE_PART, COUNTER,
                      stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                      stride_vb, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
                      stride_ob, stride_ot, stride_oh, stride_lob, stride_lot,
                      H, Tq, Tk, qk_scale, c_scale, keys_per_split,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, COMBINE_ROWS: tl.constexpr,
                      LAST_MERGES: tl.constexpr):
    """Split-key forward (flash-decoding) for decoding and chunked prefill: the Tq query rows of the GROUP heads that
    share one kv head are packed (row r: query r // GROUP, head r % GROUP of the group), BLOCK_M rows per tile, and
    each program takes one tile against one slice of keys_per_split keys. Grid (splits, row tiles, B * Hkv).

    Packing reads K and V once per group instead of once per head; splitting the keys fills the GPU when the rows
    are few. C holds the prefix sums at any strides, natural (c_scale = log2 e) or base 2 (c_scale = 1), so a
    decoding cache's c is read in place. With one split a program writes O and the lse; otherwise it writes a
    normalized partial O_s and its lse_s, and with LAST_MERGES the last program of its tile to finish (an atomic
    counter, which it resets to 0 for the next call) merges the splits; without, `_combine_kernel` does, after this
    kernel (tiles of many rows: one program would merge them serially). With PRUNE a split starts at its first key
    block that some row keeps (an all-pruned split reads nothing and contributes weight 0).
    """
    split = tl.program_id(0)
    row_tile = tl.program_id(1)
    bhk = tl.program_id(2).to(tl.int64)
    num_splits = tl.num_programs(0)
    n_bhk = tl.num_programs(2)
    b = bhk // (H // GROUP)
    hk = bhk % (H // GROUP)
    offset = Tk - Tq
    n_rows = GROUP * Tq
    r_start = row_tile * BLOCK_M
    rows = r_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid = rows < n_rows
    t = tl.minimum(rows // GROUP, Tq - 1)  # padding rows repeat the last query: in-bounds reads
    h = hk * GROUP + rows % GROUP
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh

    q_mask = valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :], mask=q_mask,
                other=0.0)
    c_rows = b * stride_cb + h * stride_ch
    if GROUP == 1:  # one head per tile: its keys' c are loaded once, not once per row
        c_keys = b * stride_cb + hk * stride_ch
    else:
        c_keys = c_rows
    q_pos = offset + t
    c_q = tl.load(C + c_rows + q_pos * stride_ct)
    t_first = r_start // GROUP
    t_last = tl.minimum((r_start + BLOCK_M - 1) // GROUP, Tq - 1)
    start = split * keys_per_split
    end = tl.minimum(tl.minimum(start + keys_per_split, Tk), offset + t_last + 1)  # later keys: no row sees them
    if MASK_LO:
        key_lo = tl.load(KEY_LO + b * stride_lob + t * stride_lot)
        start = tl.maximum(start, (tl.load(KEY_LO + b * stride_lob + t_first * stride_lot) // BLOCK_N) * BLOCK_N)
    else:
        key_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    if PRUNE:
        delta = tl.load(DELTA + b * H + h)
        start = _first_kept_key_block_rows(C, c_rows, c_q, delta, c_scale, valid, start // BLOCK_N,
                                           tl.cdiv(end, BLOCK_N), stride_ct, Tk, BLOCK_N) * BLOCK_N
    else:
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Blocks before `mid` hold only keys that every row of the tile sees causally.
    mid = tl.maximum(tl.minimum(((offset + t_first + 1) // BLOCK_N) * BLOCK_N, end), start)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = _initial_max(BLOCK_M)
    acc, l_i, m_i = _split_inner(acc, l_i, m_i, q, c_q, q_pos, key_lo, delta, K, V, C, c_keys, stride_kt, stride_vt,
                                 stride_ct, Tk, qk_scale, c_scale, start, mid, offs_n, offs_d, False, MASK_LO, PRUNE,
                                 HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, GROUP == 1)
    acc, l_i, m_i = _split_inner(acc, l_i, m_i, q, c_q, q_pos, key_lo, delta, K, V, C, c_keys, stride_kt, stride_vt,
                                 stride_ct, Tk, qk_scale, c_scale, mid, end, offs_n, offs_d, True, MASK_LO, PRUNE,
                                 HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, GROUP == 1)

    # A row with no visible key has l = 0: it returns 0 (weight 0 among splits), and a finite lse.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = m_i + tl.log2(l_safe)
    if num_splits == 1:
        _store_rows(O, LSE, o, lse, b, t, h, valid, offs_d, stride_ob, stride_ot, stride_oh, H, Tq, HEAD_DIM)
    else:
        part = (split * n_bhk + bhk) * n_rows + rows  # O_PART: (splits, B * Hkv, GROUP * Tq, D)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=q_mask)
        tl.store(LSE_PART + part, lse, mask=valid)
        if LAST_MERGES:
            tl.debug_barrier()  # every thread's partial is written before the counter says so (release, gpu scope)
            counter = COUNTER + bhk * tl.num_programs(1) + row_tile
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                tl.store(counter, 0)
                r_end = tl.minimum(r_start + BLOCK_M, n_rows)
                _combine_splits(O_PART, LSE_PART, O, LSE, b, hk, bhk, r_start, r_end, n_bhk, n_rows, num_splits,
                                offs_d, stride_ob, stride_ot, stride_oh, H, Tq, GROUP, HEAD_DIM, BLOCK_D, BLOCK_S,
                                COMBINE_ROWS)


@_jit
def _combine_kernel(O_PART, LSE_PART, O, LSE, stride_ob, stride_ot, stride_oh, H, Tq, num_splits,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                    COMBINE_ROWS: tl.constexpr):
    """The split kernel's merge (`_combine_splits`) as its own launch, for tiles too tall for one program to merge
    quickly: COMBINE_ROWS packed rows of one kv head per program. Grid (cdiv(GROUP * Tq, COMBINE_ROWS), B * Hkv)."""
    bhk = tl.program_id(1).to(tl.int64)
    n_rows = GROUP * Tq
    r_start = tl.program_id(0) * COMBINE_ROWS
    _combine_splits(O_PART, LSE_PART, O, LSE, bhk // (H // GROUP), bhk % (H // GROUP), bhk, r_start,
                    tl.minimum(r_start + COMBINE_ROWS, n_rows), tl.num_programs(1), n_rows, num_splits,
                    tl.arange(0, BLOCK_D), stride_ob, stride_ot, stride_oh, H, Tq, GROUP, HEAD_DIM, BLOCK_D, BLOCK_S,
                    COMBINE_ROWS)


@_jit
def _gate_cumsum_kernel(LOG_F, C2, stride_fb, stride_ft, stride_fh, H, T, BLOCK_T: tl.constexpr):
    """c2[b, h, :] = log2(e) * cumsum(log f[b, :, h]) in float32, one program per (batch, head)."""
    bh = tl.program_id(0).to(tl.int64)
    LOG_F += (bh // H) * stride_fb + (bh % H) * stride_fh
    offs = tl.arange(0, BLOCK_T)
    carry = 0.0
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs
        log_f = tl.load(LOG_F + t * stride_ft, mask=t < T, other=0.0)
        tl.store(C2 + bh * T + t, (tl.cumsum(log_f, 0) + carry) * 1.4426950408889634, mask=t < T)
        carry += tl.sum(log_f, 0)


@_jit
def _threshold2_from_bound(bound, log_keys, log_eps):
    """The "auto" threshold in base 2 for a score bound U: log2(e) (-(2 U + log Tk) + log eps) (acp.threshold)."""
    return (log_eps - 2.0 * bound - log_keys) * 1.4426950408889634


@_jit
def _max_norm_kernel(X, C, OUT, stride_b, stride_t, stride_h, stride_cb, stride_ct, stride_ch, Hx, T, Tk,
                     c_scale, log_keys, log_eps, HEADS_PER_X: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """OUT[chunk, b * Hx + h] = max over the BLOCK_T rows t of the chunk of |X[b, t, h, :]|^2, in float32, or 0 when
    none of the HEADS_PER_X query heads that read X's head h can prune: every visible score's decay is at least
    (c[b, Tk-1] - c[b, 0]) c_scale (c (B, Tk, H) falls along keys), and a threshold is at most its value at U = 0.
    A skipped head then gets the U = 0 threshold, which prunes nothing there either."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hx
    floor = _threshold2_from_bound(0.0, log_keys, log_eps)
    prunable = 0
    for g in range(HEADS_PER_X):
        h = (bh % Hx) * HEADS_PER_X + g
        c_first = tl.load(C + b * stride_cb + h * stride_ch)
        c_last = tl.load(C + b * stride_cb + (Tk - 1) * stride_ct + h * stride_ch)
        prunable += ((c_last - c_first) * c_scale < floor).to(tl.int32)
    sq_max = 0.0
    if prunable > 0:
        rows = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        X += b * stride_b + (bh % Hx) * stride_h
        x = _load_tile(X + rows[:, None] * stride_t + offs_d[None, :], rows, T, offs_d, HEAD_DIM, BLOCK_D, True)
        x = x.to(tl.float32)
        sq_max = tl.max(tl.sum(x * x, 1), 0)
    tl.store(OUT + chunk * tl.num_programs(1) + bh, sq_max)


@_jit
def _auto_threshold_kernel(Q_SQ, K_SQ, THRESHOLD2, H, GROUP, q_chunks, k_chunks, scale, log_keys, log_eps,
                           BLOCK_C: tl.constexpr):
    """threshold2[b, h] = log2(e) * (-(2 U + log Tk) + log eps), U = scale * max|q| * max|k| for query head h and its
    kv head, from the chunk maxima of |q|^2 (chunks, B * H) and |k|^2 (chunks, B * H / GROUP). One program per
    (b, h)."""
    bh = tl.program_id(0)
    bhk = (bh // H) * (H // GROUP) + (bh % H) // GROUP
    offs = tl.arange(0, BLOCK_C)
    q_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, q_chunks, BLOCK_C):
        q_sq = tl.maximum(q_sq, tl.load(Q_SQ + (c0 + offs) * tl.num_programs(0) + bh, mask=c0 + offs < q_chunks,
                                        other=0.0))
    k_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, k_chunks, BLOCK_C):
        k_sq = tl.maximum(k_sq, tl.load(K_SQ + (c0 + offs) * (tl.num_programs(0) // GROUP) + bhk,
                                        mask=c0 + offs < k_chunks, other=0.0))
    bound = scale * tl.sqrt(tl.max(q_sq, 0)) * tl.sqrt(tl.max(k_sq, 0))
    tl.store(THRESHOLD2 + bh, _threshold2_from_bound(bound, log_keys, log_eps))


@_jit
def _first_block_where(C, c_ref, delta, lo, hi, pos0, step, pos_max, KEY_SIDE: tl.constexpr, steps):
    """Per lane, the first block n in [lo, hi) that passes a test, else hi: a binary search of `steps` halvings.

    The test reads the prefix sum c = C[min(pos0 + n * step, pos_max)]. Key blocks (KEY_SIDE): "kept",
    c_ref - c >= delta, with c_ref a query row's prefix sum. Query blocks: "pruned", c - c_ref < delta, with
    c_ref a key's. Both are written as the score mask computes them (`_mask_scores`), so the bounds agree with
    it bit for bit; c falls along positions, so the blocks that pass are a suffix of [lo, hi).
    """
    lo += tl.zeros_like(hi)
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        c = tl.load(C + tl.minimum(pos0 + mid * step, pos_max), mask=active, other=0.0)
        if KEY_SIDE:
            passed = c_ref - c >= delta
        else:
            passed = c - c_ref < delta
        hi = tl.where(active & passed, mid, hi)
        lo = tl.where(active & passed, lo, tl.where(active, mid + 1, lo))
    return lo


@_jit
def _query_block_bounds_kernel(C, KEY_LO, DELTA, BOUNDS, stride_lob, stride_lot, H, Tq, Tk, n_blocks, steps,
                               MASK_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               LANES: tl.constexpr):
    """Pruning bounds of the query blocks (forward and dQ): BOUNDS[bh, m] = (start, band) in keys.

    Key blocks before `start` are pruned for every row of block m (even its first row, which prunes least, drops
    their last key) and never loaded; [start, band) is pruned in part (masked); from `band` on no score is (even
    the last row keeps the first key). A row keeps its own key (decay 0 >= delta), so start stays at or before
    the first row's block. One lane per query block, LANES blocks of one (batch, head) per program.
    """
    blocks = tl.program_id(0) * LANES + tl.arange(0, LANES)
    bh = tl.program_id(1).to(tl.int64)
    valid = blocks < n_blocks
    m0 = blocks * BLOCK_M
    offset = Tk - Tq
    C += bh * Tk
    if MASK_LO:
        first_key_lo = tl.load(KEY_LO + (bh // H) * stride_lob + m0 * stride_lot, mask=valid, other=0)
    else:
        first_key_lo = tl.zeros([LANES], dtype=tl.int32)
    start, mid, _ = _query_block_key_range(m0, offset, Tk, first_key_lo, BLOCK_M, BLOCK_N)
    delta = tl.load(DELTA + bh)
    p_first = offset + m0
    p_last = offset + tl.minimum(m0 + BLOCK_M, Tq) - 1
    c_first = tl.load(C + p_first, mask=valid, other=0.0)
    c_last = tl.load(C + p_last, mask=valid, other=0.0)
    first = _first_block_where(C, c_first, delta, start // BLOCK_N, p_first // BLOCK_N, BLOCK_N - 1, BLOCK_N,
                               Tk - 1, True, steps)
    band = _first_block_where(C, c_last, delta, start // BLOCK_N, mid // BLOCK_N, 0, BLOCK_N, Tk - 1, True, steps)
    out = BOUNDS + (bh * n_blocks + blocks) * 2
    tl.store(out, tl.maximum(first * BLOCK_N, start), mask=valid)
    tl.store(out + 1, tl.maximum(band * BLOCK_N, start), mask=valid)


@_jit
def _key_block_bounds_kernel(C, QUERY_HI, DELTA, BOUNDS, stride_hib, stride_hit, H, Tq, Tk, n_blocks, steps,
                             MASK_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             LANES: tl.constexpr):
    """Pruning bounds of the key blocks (dK/dV), the mirror image: BOUNDS[bh, n] = (band, stop) in query rows.

    Past the diagonal, rows [mid, band) keep every score of key block n (even its last row keeps the first key),
    [band, stop) prune some, and from `stop` on a query block's first row (the one that prunes least) drops even
    the last key: the rest of the rows are skipped.
    """
    blocks = tl.program_id(0) * LANES + tl.arange(0, LANES)
    bh = tl.program_id(1).to(tl.int64)
    valid = blocks < n_blocks
    n0 = blocks * BLOCK_N
    offset = Tk - Tq
    C += bh * Tk
    last_key = tl.minimum(n0 + BLOCK_N, Tk) - 1
    if MASK_LO:
        q_end = tl.load(QUERY_HI + (bh // H) * stride_hib + last_key * stride_hit, mask=valid, other=0) - offset
        q_end = tl.minimum(q_end, Tq)
    else:
        q_end = tl.zeros([LANES], dtype=tl.int32) + Tq
    _, mid, end = _key_block_query_range(n0, offset, q_end, BLOCK_M, BLOCK_N)
    delta = tl.load(DELTA + bh)
    c_first = tl.load(C + n0, mask=valid, other=0.0)
    c_last = tl.load(C + last_key, mask=valid, other=0.0)
    n_query_blocks = tl.cdiv(end, BLOCK_M)
    band = _first_block_where(C + offset, c_first, delta, mid // BLOCK_M, n_query_blocks, BLOCK_M - 1, BLOCK_M,
                              end - 1, False, steps)
    stop = _first_block_where(C + offset, c_last, delta, mid // BLOCK_M, n_query_blocks, 0, BLOCK_M, end - 1, False,
                              steps)
    out = BOUNDS + (bh * n_blocks + blocks) * 2
    tl.store(out, tl.maximum(tl.minimum(band * BLOCK_M, end), mid), mask=valid)
    tl.store(out + 1, tl.maximum(tl.minimum(stop * BLOCK_M, end), mid), mask=valid)


@_jit
def _gate_grad_kernel(DC_COL, DC_ROW, DLOG_F, stride_gb, stride_gt, stride_gh, H, Tq, Tk, BLOCK_T: tl.constexpr):
    """dlog f_t = sum_{u >= t} dc_u, dc_u = (row sum of dS of the query at u) - (column sum of dS at key u).

    One program per (batch, head) walks the keys from the end, each block in reverse order, so that a
    forward cumsum gives the suffix sums.
    """
    bh = tl.program_id(0).to(tl.int64)
    DLOG_F += (bh // H) * stride_gb + (bh % H) * stride_gh
    offset = Tk - Tq
    offs = tl.arange(0, BLOCK_T)
    carry = 0.0
    for t0 in range(0, Tk, BLOCK_T):
        t = Tk - 1 - (t0 + offs)
        dc = tl.load(DC_ROW + bh * Tq + t - offset, mask=t >= offset, other=0.0)
        dc -= tl.load(DC_COL + bh * Tk + t, mask=t >= 0, other=0.0)
        tl.store(DLOG_F + t * stride_gt, tl.cumsum(dc, 0) + carry, mask=t >= 0)
        carry += tl.sum(dc, 0)


@_jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                      H, Tq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d O_id dO_id in float32, laid out (B, H, Tq) like the lse."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    b = bh // H
    h = bh % H
    o = _load_tile(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                   rows, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                    rows, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Tq + rows, delta, mask=rows < Tq)


@_jit
def _bwd_dkdv_inner(dk, dv, dc, k, v, c_k, keys, Q, DO, LSE, DELTA, C, KEY_LO, threshold, stride_qt, stride_dot,
                    stride_lot, offset, Tq, qk_scale, start, end, offs_m, offs_d,
                    CAUSAL: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr, EVEN_M: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV and the column sums of dS of one key block over query blocks [start, end).

    Works on transposed scores (keys x queries) so that dK and dV come straight out of tl.dot.
    Rows past Tq load lse = +inf, which makes their P exactly 0.
    """
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        q = _load_tile(Q + rows[:, None] * stride_qt + offs_d[None, :], rows, Tq, offs_d, HEAD_DIM, BLOCK_D,
                       not EVEN_M)
        lse = _load_vec(LSE + rows, rows, Tq, float("inf"), not EVEN_M)
        c_q = _load_vec(C + offset + rows, rows, Tq, 0.0, not EVEN_M)
        decay_t = c_q[None, :] - c_k[:, None]
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale + decay_t
        if MASK_LO:
            key_lo = _load_vec(KEY_LO + rows * stride_lot, rows, Tq, 0, not EVEN_M)
        else:
            key_lo = rows  # unread without MASK_LO
        s_t = _mask_scores(s_t, decay_t, threshold, (offset + rows)[None, :], keys[:, None], key_lo[None, :], CAUSAL,
                           MASK_LO, PRUNE)
        p_t = tl.exp2(s_t - lse[None, :])
        do = _load_tile(DO + rows[:, None] * stride_dot + offs_d[None, :], rows, Tq, offs_d, HEAD_DIM, BLOCK_D,
                        not EVEN_M)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = _load_vec(DELTA + rows, rows, Tq, 0.0, not EVEN_M)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        dc += tl.sum(ds_t, 1)
    return dk, dv, dc


@_jit
def _bwd_dkdv_kernel(Q, K, V, C, DO, LSE, DELTA, KEY_LO, QUERY_HI, THRESHOLD, BOUNDS, DK, DV, DC_COL,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                     stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                     stride_lob, stride_lot, stride_hib, stride_hit,
                     H, Tq, Tk, sm_scale, qk_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr,
                     EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head); loops over the GROUP query heads that share them.

    dK = s dS^T Q and dV = P^T dO are summed over the group in registers; the column sums of dS (one
    vector per query head) go to DC_COL (B, H, Tk). Query blocks: [start, mid) the diagonal, [mid, band)
    plain, then (PRUNE) [band, stop) pruned in part; later rows prune the whole key block.
    """
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)
    hkv = H // GROUP
    b = bhk // hkv
    hk = bhk % hkv
    offset = Tk - Tq
    keys = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * stride_kb + hk * stride_kh + keys[:, None] * stride_kt + offs_d[None, :],
                   keys, Tk, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + b * stride_vb + hk * stride_vh + keys[:, None] * stride_vt + offs_d[None, :],
                   keys, Tk, offs_d, HEAD_DIM, BLOCK_D, True)
    if MASK_LO:
        last_key = tl.minimum(n0 + BLOCK_N, Tk) - 1
        q_end = tl.minimum(tl.load(QUERY_HI + b * stride_hib + last_key * stride_hit) - offset, Tq)
    else:
        q_end = Tq
    start, mid, end = _key_block_query_range(n0, offset, q_end, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        c_k = tl.load(C + bh * Tk + keys, mask=keys < Tk, other=0.0)
        if PRUNE:
            threshold = tl.load(THRESHOLD + bh)
            bounds = BOUNDS + (bh * tl.num_programs(0) + tl.program_id(0)) * 2
            band = tl.load(bounds)
            stop = tl.load(bounds + 1)
        else:
            threshold = 0.0
            band, stop = end, end
        dc = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk, dv, dc = _bwd_dkdv_inner(dk, dv, dc, k, v, c_k, keys, Qh, DOh, LSE + bh * Tq, DELTA + bh * Tq,
                                     C + bh * Tk, KEY_LO + b * stride_lob, threshold, stride_qt, stride_dot,
                                     stride_lot, offset, Tq, qk_scale, start, mid, offs_m, offs_d,
                                     True, MASK_LO, PRUNE, EVEN_M, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        dk, dv, dc = _bwd_dkdv_inner(dk, dv, dc, k, v, c_k, keys, Qh, DOh, LSE + bh * Tq, DELTA + bh * Tq,
                                     C + bh * Tk, KEY_LO + b * stride_lob, threshold, stride_qt, stride_dot,
                                     stride_lot, offset, Tq, qk_scale, mid, band, offs_m, offs_d,
                                     False, MASK_LO, False, EVEN_M, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        if PRUNE and band < stop:
            dk, dv, dc = _bwd_dkdv_inner(dk, dv, dc, k, v, c_k, keys, Qh, DOh, LSE + bh * Tq, DELTA + bh * Tq,
                                         C + bh * Tk, KEY_LO + b * stride_lob, threshold, stride_qt, stride_dot,
                                         stride_lot, offset, Tq, qk_scale, band, stop, offs_m, offs_d,
                                         False, MASK_LO, True, EVEN_M, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        tl.store(DC_COL + bh * Tk + keys, dc, mask=keys < Tk)

    kv_mask = (keys[:, None] < Tk) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + keys[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + keys[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@_jit
def _bwd_dq_inner(dq, dc, q, do, lse, delta, c_q, q_pos, key_lo, threshold, K, V, C, stride_kt, stride_vt, Tk,
                  qk_scale, start, end, offs_n, offs_d,
                  CAUSAL: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ and the row sums of dS of one query block over key blocks [start, end)."""
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        k = _load_tile(K + keys[:, None] * stride_kt + offs_d[None, :], keys, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL)
        v = _load_tile(V + keys[:, None] * stride_vt + offs_d[None, :], keys, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL)
        c_k = _load_vec(C + keys, keys, Tk, 0.0, CAUSAL)
        decay = c_q[:, None] - c_k[None, :]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + decay
        s = _mask_scores(s, decay, threshold[:, None], q_pos[:, None], keys[None, :], key_lo[:, None], CAUSAL,
                         MASK_LO, PRUNE)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        dc += tl.sum(ds, 1)
    return dq, dc


@_jit
def _bwd_dq_kernel(Q, K, V, C, DO, LSE, DELTA, KEY_LO, THRESHOLD, BOUNDS, DQ, DC_ROW,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                   stride_dqb, stride_dqt, stride_dqh, stride_lob, stride_lot,
                   H, Tq, Tk, sm_scale, qk_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head). dQ = s dS K; row sums of dS go to DC_ROW.

    Key blocks as in the forward: the diagonal [mid, end), then [start, band) pruned in part, [band, mid) plain.
    """
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offset = Tk - Tq
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    C += bh * Tk

    q = _load_tile(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                   rows, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                    rows, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + bh * Tq + rows, mask=rows < Tq, other=float("inf"))
    delta = tl.load(DELTA + bh * Tq + rows, mask=rows < Tq, other=0.0)
    q_pos, c_q, key_lo, start, mid, end = _query_block_rows(C, KEY_LO, b, m0, rows, offset, Tq, Tk, stride_lob,
                                                            stride_lot, MASK_LO, BLOCK_M, BLOCK_N)

    threshold, start, band = _query_block_pruning(BOUNDS, THRESHOLD, bh, m0 // BLOCK_M, tl.num_programs(0), start,
                                                  PRUNE, BLOCK_M)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dc = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq, dc = _bwd_dq_inner(dq, dc, q, do, lse, delta, c_q, q_pos, key_lo, threshold, K, V, C, stride_kt, stride_vt,
                           Tk, qk_scale, mid, end, offs_n, offs_d, True, MASK_LO, PRUNE, HEAD_DIM, BLOCK_D, BLOCK_N,
                           DOT_PRECISION)
    if PRUNE and start < band:
        dq, dc = _bwd_dq_inner(dq, dc, q, do, lse, delta, c_q, q_pos, key_lo, threshold, K, V, C, stride_kt,
                               stride_vt, Tk, qk_scale, start, band, offs_n, offs_d, False, MASK_LO, True, HEAD_DIM,
                               BLOCK_D, BLOCK_N, DOT_PRECISION)
    dq, dc = _bwd_dq_inner(dq, dc, q, do, lse, delta, c_q, q_pos, key_lo, threshold, K, V, C, stride_kt, stride_vt,
                           Tk, qk_scale, band, mid, offs_n, offs_d, False, MASK_LO, False, HEAD_DIM, BLOCK_D, BLOCK_N,
                           DOT_PRECISION)

    dq_mask = (rows[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=dq_mask)
    tl.store(DC_ROW + bh * Tq + rows, dc, mask=rows < Tq)


# --------------------------------------------------------------------------------------------------
# Triton launch: block sizes, the autograd Function, the wrapper.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KernelConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# First choice per (kernel, padded head dim) for 16-bit inputs on sm80+, tuned on an H100
# (benchmarks/NOTES.md). Anything that does not fit a GPU's shared memory falls back along
# _FALLBACK_CONFIGS, so no GPU needs an entry of its own.
_GPU_CONFIGS = {
    ("fwd", 16): _KernelConfig(64, 64, 4, 3),
    ("fwd", 32): _KernelConfig(64, 64, 4, 3),
    ("fwd", 64): _KernelConfig(64, 64, 4, 3),
    ("fwd", 128): _KernelConfig(64, 64, 4, 3),
    ("fwd", 256): _KernelConfig(64, 32, 4, 2),
    ("dkdv", 16): _KernelConfig(64, 64, 4, 3),
    ("dkdv", 32): _KernelConfig(64, 64, 4, 3),
    ("dkdv", 64): _KernelConfig(64, 64, 4, 3),
    ("dkdv", 128): _KernelConfig(32, 64, 4, 3),
    ("dkdv", 256): _KernelConfig(64, 32, 8, 2),
    ("dq", 16): _KernelConfig(64, 64, 4, 3),
    ("dq", 32): _KernelConfig(64, 64, 4, 3),
    ("dq", 64): _KernelConfig(64, 64, 4, 3),
    ("dq", 128): _KernelConfig(128, 64, 8, 2),
    ("dq", 256): _KernelConfig(128, 32, 8, 2),
    ("decode", 16): _KernelConfig(16, 128, 4, 3),
    ("decode", 32): _KernelConfig(16, 128, 4, 3),
    ("decode", 64): _KernelConfig(16, 128, 4, 3),
    ("decode", 128): _KernelConfig(16, 64, 4, 3),
    ("decode", 256): _KernelConfig(16, 32, 4, 3),
}
_FALLBACK_CONFIGS = (_KernelConfig(64, 64, 4, 2), _KernelConfig(32, 32, 4, 1), _KernelConfig(16, 16, 4, 1))
# Under TRITON_INTERPRET: small tiles, unequal so that tests cross block edges both ways.
_INTERPRET_CONFIGS = {
    "fwd": _KernelConfig(32, 16, 1, 1),
    "dkdv": _KernelConfig(16, 32, 1, 1),
    "dq": _KernelConfig(32, 16, 1, 1),
    "decode": _KernelConfig(16, 16, 1, 1),
}
# Tests and the benchmark's tuning sweep pin a configuration per kernel kind here.
_CONFIG_OVERRIDES: dict[str, _KernelConfig] = {}
_CONFIG_CHOSEN: dict[tuple, _KernelConfig] = {}
# Up to this many query rows (queries x heads of a GQA group, one tile), the forward pass packs them
# and splits the keys instead (decoding); it is also the split kernel's tallest tile.
_DECODE_MAX_ROWS = 64
# Chunked prefill (Tq < Tk) takes the split kernel too while the blocked forward would run fewer programs than
# this many per multiprocessor.
_PREFILL_SPLIT_WAVES = 2
# ... and while its (query, head) rows per kv head stay this few: beyond, the split kernel's row tiles lose to the
# blocked kernel (H200 chunked-prefill table, BENCHMARKS.md: 512 rows of one head won, 0.7-0.75x the blocked
# kernel's time; 1024 and 2048 rows of 4-head groups lost, 1.8-2.1x).
_PREFILL_SPLIT_MAX_ROWS = 512
# The split kernel fills _SPLIT_PROGRAMS_PER_SM program slots per multiprocessor (half as many with 64-row tiles)
# without spilling into a partial wave, and reads at most _SPLIT_MAX_KEYS keys per program, with at most
# _MAX_SPLITS slices of the keys (H200 sweeps, benchmarks/NOTES.md); the splits are merged _COMBINE_ELEMENTS
# (splits x rows x head dim) at a time.
_SPLIT_PROGRAMS_PER_SM = 2
_SPLIT_MAX_KEYS = 2048
_MAX_SPLITS = 32
_COMBINE_ELEMENTS = 4096
# The last program of a row tile merges its splits only while that takes at most this many of those steps (decoding's
# few rows); taller tiles are merged by `_combine_kernel` across the GPU (one program merging 64 rows x 9 splits
# serially, one L2 round trip per 2 rows, was most of chunked prefill's time: benchmarks/NOTES.md).
_LAST_MERGES_MAX_STEPS = 1
_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Positions per step of the gate's prefix sums (one program per batch row and head).
_GATE_BLOCK = 1024
# Blocks per program of the pruning-bounds kernels (one lane each).
_BOUNDS_LANES = 64


def _candidate_configs(kind: str, block_d: int, dtype: torch.dtype, device: torch.device) -> list[_KernelConfig]:
    if device.type != "cuda":
        return [_INTERPRET_CONFIGS[kind]]
    first = _GPU_CONFIGS[(kind, block_d)]
    if dtype == torch.float32:  # twice the bytes per tile: start from half the tile
        first = _KernelConfig(max(16, first.block_m // 2), max(16, first.block_n // 2), first.num_warps, 2)
    if kind == "decode":  # block_m is the least tile height (taller tiles, up to 64 rows, need less block_n)
        return [first, _KernelConfig(16, max(16, first.block_n // 2), 4, 2), _KernelConfig(16, 16, 4, 1)]
    return [first, *(c for c in _FALLBACK_CONFIGS if c.block_m * c.block_n < first.block_m * first.block_n)]


def _launch(kind: str, q: torch.Tensor, block_d: int, launch) -> None:
    """Call ``launch(config)`` with the first configuration whose tiles fit the GPU's shared memory.

    The last one that fitted is tried first next time (decoding tiles grow with Tq x GROUP, so it may not
    fit every call).
    """
    if kind in _CONFIG_OVERRIDES:
        return launch(_CONFIG_OVERRIDES[kind])
    key = (kind, block_d, q.dtype, q.device)
    configs = _candidate_configs(kind, block_d, q.dtype, q.device)
    if key in _CONFIG_CHOSEN:
        configs = [_CONFIG_CHOSEN[key], *configs]
    for config in configs:
        try:
            launch(config)
        except triton.runtime.errors.OutOfResources:
            continue
        _CONFIG_CHOSEN[key] = config
        return
    raise RuntimeError(f"no Triton configuration of the {kind} kernel fits this GPU (head dim {block_d}, {q.dtype})")


def _common_meta(q: torch.Tensor, k: torch.Tensor, key_lo, threshold2) -> dict:
    D = q.shape[-1]
    return dict(GROUP=q.shape[2] // k.shape[2], HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                MASK_LO=key_lo is not None, PRUNE=threshold2 is not None,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _or(t, placeholder):
    return t if t is not None else placeholder


def _strides(t, n=3):
    """The first n strides of t; (0, ...) for an absent optional tensor (its kernel flag is off)."""
    return t.stride()[:n] if t is not None else (0,) * n


def _triton_forward(q, k, v, c2, key_lo, threshold2, scale):
    """O (B, Tq, H, D) in q's dtype and the base-2 lse (B, H, Tq) in float32.

    threshold2: the pruning threshold in base 2 (B, H), or None. Optional tensors that are absent are passed
    as c2: the kernels do not read them when their flag is off.
    """
    if _split_wanted(q, k):
        return _split_forward(q, k, v, c2.transpose(1, 2), 1.0, key_lo, threshold2, scale)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    meta = _common_meta(q, k, key_lo, threshold2)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    args = (q, k, v, c2, _or(key_lo, c2), _or(threshold2, c2))
    strides = (*_strides(q), *_strides(k), *_strides(v))
    _launch("fwd", q, meta["BLOCK_D"], lambda cfg: _fwd_kernel[(triton.cdiv(Tq, cfg.block_m), B * H)](
        *args, _pruning_bounds("query", c2, key_lo, threshold2, Tq, cfg), o, lse, *strides, *o.stride()[:3],
        *_strides(key_lo, 2), H, Tq, Tk, scale * LOG2E,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta))
    return o, lse


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _split_wanted(q, k) -> bool:
    """The split-key forward for decoding (Tq x GROUP <= _DECODE_MAX_ROWS rows) and for chunked prefill (Tq < Tk)
    of at most _PREFILL_SPLIT_MAX_ROWS rows per kv head whose one-head-per-program grid would fill less than
    _PREFILL_SPLIT_WAVES waves of the GPU."""
    B, Tq, H, _ = q.shape
    Tk, group = k.shape[1], H // k.shape[2]
    if Tq * group <= _DECODE_MAX_ROWS:
        return True
    return (Tq < Tk and Tq * group <= _PREFILL_SPLIT_MAX_ROWS
            and triton.cdiv(Tq, 64) * B * H < _PREFILL_SPLIT_WAVES * _multiprocessors(q.device))


def _split_forward(q, k, v, c, c_scale, key_lo, threshold2, scale):
    """`_fwd_split_kernel`: O (B, Tq, H, D) and the base-2 lse (B, H, Tq), as `_triton_forward` returns them.

    c: the gate's prefix sums (B, Tk, H) float32 at any strides, natural (c_scale = log2 e) or base 2 (c_scale = 1).
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    meta = _common_meta(q, k, key_lo, threshold2)
    n_rows = Tq * meta["GROUP"]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)

    def launch(cfg):
        block_m = min(max(cfg.block_m, triton.next_power_of_2(n_rows)), _DECODE_MAX_ROWS)
        row_tiles = triton.cdiv(n_rows, block_m)
        splits, keys_per_split = _decode_splits(B * Hkv * row_tiles, Tk, cfg.block_n, block_m, q.device)
        block_s = triton.next_power_of_2(splits)
        combine_rows = max(1, min(block_m, _COMBINE_ELEMENTS // (block_s * meta["BLOCK_D"])))
        last_merges = triton.cdiv(min(block_m, n_rows), combine_rows) <= _LAST_MERGES_MAX_STEPS
        o_part, lse_part, counters = o, lse, lse  # placeholders where the kernel does not read them
        if splits > 1:
            o_part = torch.empty(splits, B * Hkv, n_rows, D, dtype=torch.float32, device=q.device)
            lse_part = torch.empty(splits, B * Hkv, n_rows, dtype=torch.float32, device=q.device)
            counters = _split_counters(B * Hkv * row_tiles, q.device) if last_merges else lse
        _fwd_split_kernel[(splits, row_tiles, B * Hkv)](
            q, k, v, c, _or(key_lo, c), _or(threshold2, c), o, lse, o_part, lse_part, counters,
            *_strides(q), *_strides(k), *_strides(v), *c.stride(), *o.stride()[:3], *_strides(key_lo, 2),
            H, Tq, Tk, scale * LOG2E, c_scale, keys_per_split, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
            BLOCK_S=block_s, COMBINE_ROWS=combine_rows, LAST_MERGES=last_merges, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **meta)
        if splits > 1 and not last_merges:
            _combine_kernel[(triton.cdiv(n_rows, combine_rows), B * Hkv)](
                o_part, lse_part, o, lse, *o.stride()[:3], H, Tq, splits, GROUP=meta["GROUP"], HEAD_DIM=D,
                BLOCK_D=meta["BLOCK_D"], BLOCK_S=block_s, COMBINE_ROWS=combine_rows)

    _launch("decode", q, meta["BLOCK_D"], launch)
    return o, lse


def _split_counters(n: int, device: torch.device) -> torch.Tensor:
    """At least n int32 counters for the split kernel's "last program combines", zero between calls (that program
    resets its own). One buffer per device, kept across calls: made outside any CUDA-graph capture, it adds no
    memset to a captured graph. Split-key forwards on one device must therefore not run concurrently on two streams.
    """
    counters = _SPLIT_COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing:  # memory of a graph's private pool must not outlive the graph
            _SPLIT_COUNTERS[device] = counters
    return counters


def _auto_threshold2(q, k, c, c_scale: float, scale: float, log_eps: float) -> torch.Tensor:
    """The "auto" pruning threshold (acp.threshold) in base 2, (B, H) float32, in three small kernels: chunk maxima
    of |q|^2 and |k|^2, then the bound (decoding runs it every step, so it must cost a few microseconds).

    c: the gate's prefix sums (B, Tk, H) float32, any strides, c_scale times them in base 2 (as the attention
    kernel reads them). Heads whose decay never reaches the threshold at U = 0 skip their norms (`_max_norm_kernel`).
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    block_d, block_t = max(16, triton.next_power_of_2(D)), 64
    log_keys, log_eps = math.log(Tk), float(log_eps)
    maxima = []
    for x, T, heads in ((q, Tq, H), (k, Tk, Hkv)):
        chunks = triton.cdiv(T, block_t)
        out = torch.empty(chunks, B * heads, dtype=torch.float32, device=q.device)
        _max_norm_kernel[(chunks, B * heads)](x, c, out, *_strides(x), *c.stride(), heads, T, Tk, c_scale, log_keys,
                                              log_eps, HEADS_PER_X=H // heads, HEAD_DIM=D, BLOCK_D=block_d,
                                              BLOCK_T=block_t)
        maxima.append(out)
    threshold2 = torch.empty(B, H, dtype=torch.float32, device=q.device)
    _auto_threshold_kernel[(B * H,)](*maxima, threshold2, H, H // Hkv, maxima[0].shape[0], maxima[1].shape[0],
                                     scale, log_keys, log_eps, BLOCK_C=64)
    return threshold2


def _pruning_bounds(side: str, c2, visibility, threshold2, Tq: int, cfg: _KernelConfig) -> torch.Tensor:
    """ACP block bounds (B * H, blocks, 2) int32 for the query-block ("query": forward, dQ) or key-block ("key":
    dK/dV) kernels with cfg's tiles; without pruning c2, a placeholder the kernels do not read."""
    if threshold2 is None:
        return c2
    B, H, Tk = c2.shape
    block, other = (cfg.block_m, cfg.block_n) if side == "query" else (cfg.block_n, cfg.block_m)
    n_blocks = -(-(Tq if side == "query" else Tk) // block)
    steps = (-(-(Tk if side == "query" else Tq) // other)).bit_length()  # halvings to search every block
    bounds = torch.empty(B * H, n_blocks, 2, dtype=torch.int32, device=c2.device)
    kernel = _query_block_bounds_kernel if side == "query" else _key_block_bounds_kernel
    kernel[(-(-n_blocks // _BOUNDS_LANES), B * H)](
        c2, _or(visibility, c2), threshold2, bounds, *_strides(visibility, 2), H, Tq, Tk, n_blocks, steps,
        MASK_LO=visibility is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, LANES=_BOUNDS_LANES, num_warps=2)
    return bounds


def _decode_splits(programs: int, Tk: int, block_n: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """Split the keys of each of ``programs`` row tiles into as many slices as fill the GPU's program slots without
    a partial wave after them (_SPLIT_PROGRAMS_PER_SM per multiprocessor, half for 64-row tiles: 144 programs on
    132 SMs ran slower than 128), and at least so many that none reads more than _SPLIT_MAX_KEYS keys (long caches
    stream faster from more programs); at most _MAX_SPLITS. Return (splits, keys per split)."""
    blocks = triton.cdiv(Tk, block_n)
    per_sm = _SPLIT_PROGRAMS_PER_SM if block_m < _DECODE_MAX_ROWS else max(1, _SPLIT_PROGRAMS_PER_SM // 2)
    wanted = max(per_sm * _multiprocessors(device) // programs, triton.cdiv(Tk, _SPLIT_MAX_KEYS))
    per_split = triton.cdiv(blocks, max(1, min(blocks, wanted, _MAX_SPLITS))) * block_n
    return triton.cdiv(Tk, per_split), per_split


def _triton_backward(do, q, k, v, c2, o, lse, key_lo, query_hi, threshold2, scale, gate_is_cumsum=False):
    """dq, dk, dv in their inputs' dtypes and dlog f (B, Tk, H) in float32 (with ``gate_is_cumsum``, dc instead)."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    meta = _common_meta(q, k, key_lo, threshold2)
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(Tq, 64), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Tq,
                                                    HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=64)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    dc_col = torch.empty(B, H, Tk, dtype=torch.float32, device=q.device)
    dc_row = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    lo, hi, thr = _or(key_lo, c2), _or(query_hi, c2), _or(threshold2, c2)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    qk_scale = scale * LOG2E
    _launch("dkdv", q, meta["BLOCK_D"], lambda cfg: _bwd_dkdv_kernel[(triton.cdiv(Tk, cfg.block_n), B * Hkv)](
        q, k, v, c2, do, lse, delta, lo, hi, thr, _pruning_bounds("key", c2, query_hi, threshold2, Tq, cfg), dk, dv,
        dc_col, *strides, *dk.stride()[:3], *dv.stride()[:3],
        *_strides(key_lo, 2), *_strides(query_hi, 2), H, Tq, Tk, scale, qk_scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EVEN_M=Tq % cfg.block_m == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta))
    _launch("dq", q, meta["BLOCK_D"], lambda cfg: _bwd_dq_kernel[(triton.cdiv(Tq, cfg.block_m), B * H)](
        q, k, v, c2, do, lse, delta, lo, thr, _pruning_bounds("query", c2, key_lo, threshold2, Tq, cfg), dq, dc_row,
        *strides, *dq.stride()[:3], *_strides(key_lo, 2), H, Tq, Tk, scale, qk_scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta))
    if gate_is_cumsum:  # dc_t = rowsum(dS) of the query at t - colsum(dS)_t (why the row sums stay: section header)
        dc = dc_col.neg_()
        dc[:, :, Tk - Tq:] += dc_row
        return dq, dk, dv, dc.transpose(1, 2)
    dlog_f = torch.empty(B, Tk, H, dtype=torch.float32, device=q.device)
    _gate_grad_kernel[(B * H,)](dc_col, dc_row, dlog_f, *dlog_f.stride(), H, Tq, Tk, BLOCK_T=_GATE_BLOCK)
    return dq, dk, dv, dlog_f


def _base2_prefix_sums(gate, is_cumsum):
    """c2 = log2(e) * c (B, H, Tk) contiguous float32, as the blocked kernels read it, from either gate form (B, Tk, H):
    the per-token log gates (a scan, `_gate_cumsum_kernel`) or their prefix sums c (one multiply)."""
    B, Tk, H = gate.shape
    c2 = torch.empty(B, H, Tk, dtype=torch.float32, device=gate.device)
    if is_cumsum:
        torch.mul(gate.transpose(1, 2), LOG2E, out=c2)
    else:
        _gate_cumsum_kernel[(B * H,)](gate, c2, *gate.stride(), H, Tk, BLOCK_T=_GATE_BLOCK)
    return c2


class _TritonForgettingAttention(torch.autograd.Function):
    """O = forgetting attention of (q, k, v, gate), the gate float32 (B, Tk, H): the log gates log f, or with
    ``is_cumsum`` their prefix sums c; gradients for all four. Pruning: a base-2 threshold (B, H), or with
    ``auto_log_eps`` the "auto" one, computed here once c is known."""

    @staticmethod
    def forward(ctx, q, k, v, gate, is_cumsum, scale, key_lo, query_hi, threshold2, auto_log_eps):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        split = is_cumsum and _split_wanted(q, k)  # reads c in place: no scan, no copy
        c2 = None if split else _base2_prefix_sums(gate, is_cumsum)
        if auto_log_eps is not None:
            c, c_scale = (gate, LOG2E) if split else (c2.transpose(1, 2), 1.0)
            threshold2 = _auto_threshold2(q, k, c, c_scale, scale, auto_log_eps)
        if split:
            o, lse = _split_forward(q, k, v, gate, LOG2E, key_lo, threshold2, scale)
        else:
            o, lse = _triton_forward(q, k, v, c2, key_lo, threshold2, scale)
        ctx.save_for_backward(q, k, v, gate if c2 is None else c2, o, lse, key_lo, query_hi, threshold2)
        ctx.scale, ctx.is_cumsum, ctx.saved_c2 = scale, is_cumsum, c2 is not None
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, c2, o, lse, key_lo, query_hi, threshold2 = ctx.saved_tensors
        if not ctx.saved_c2:  # the forward read c in place; the backward kernels want c2
            c2 = _base2_prefix_sums(c2, True)
        dq, dk, dv, dgate = _triton_backward(do, q, k, v, c2, o, lse, key_lo, query_hi, threshold2, ctx.scale,
                                             ctx.is_cumsum)
        return dq, dk, dv, dgate, None, None, None, None, None, None


def _visibility_bounds(q, k, seq_start, cu_seqlens):
    """key_lo (B, Tq) and query_hi (B, Tk) int32 as the kernels read them (see the section header)."""
    B, Tq = q.shape[:2]
    Tk = k.shape[1]
    if seq_start is not None:
        key_lo = seq_start.to(torch.int32).clamp(0, Tk)[:, None].expand(B, Tq)
        return key_lo, torch.full((1, 1), Tk, dtype=torch.int32, device=q.device).expand(B, Tk)
    if cu_seqlens is not None:
        offsets = cu_seqlens.to(device=q.device, dtype=torch.int32)
        lengths = offsets.diff()
        starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=Tk)
        ends = torch.repeat_interleave(offsets[1:], lengths, output_size=Tk)
        return starts[None], ends[None]
    return None, None


def triton_unavailable_reason(q: torch.Tensor) -> str | None:
    if triton is None:
        return "Triton is not installed"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 or float32, not {q.dtype}"
    if q.shape[-1] > 256:
        return f"the Triton kernels take head dims up to 256, not {q.shape[-1]}"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on the CPU)"
    return None


def forgetting_attention_triton(q, k, v, gate, is_cumsum, scale, seq_start, cu_seqlens, adaptive_threshold, log_eps):
    """forgetting_attention on the Triton kernels; ``gate``: log f (B, Tk, H), or with ``is_cumsum`` its prefix sums."""
    reason = triton_unavailable_reason(q)
    if reason is not None:
        raise ValueError(f"backend='triton': {reason}")
    key_lo, query_hi = _visibility_bounds(q, k, seq_start, cu_seqlens)
    threshold2, auto_log_eps = None, None
    if isinstance(adaptive_threshold, str) and adaptive_threshold == "auto":
        acp.check_log_eps(log_eps)
        auto_log_eps = log_eps
    elif adaptive_threshold is not None:
        threshold2 = acp.threshold(q, k, adaptive_threshold, log_eps=log_eps, sm_scale=scale) * LOG2E
    return _TritonForgettingAttention.apply(q, k, v, gate.float(), is_cumsum, scale, key_lo, query_hi, threshold2,
                                            auto_log_eps)
