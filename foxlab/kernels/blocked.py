"""The blocked kernels of training and prefill (FlashAttention-2 structure): the gate's prefix sums, the forward
(one program per query block), the backward (dK/dV per key block, dQ per query block) and the gate's gradient."""

from __future__ import annotations

import torch

from .common import LOG2E, _common_meta, _initial_max, _jit, _key_block_query_range, _launch, _load_rows, _load_tile, \
    _load_vec, _mask_scores, _online_softmax_step, _or, _query_block_rows, _relative_scores, _strides, \
    _tma_descriptor, _tma_wanted, tl, triton
from .pruning import _pruning_bounds, _query_block_pruning
from ..fused import _rms_norm_input_grad, _rms_normalize, _sigmoid, _weight_grad, _weight_stride

try:  # a Triton with Gluon for Hopper (3.6 and later): the warp-specialized forward and backward
    from . import hopper, hopper_backward
except (ImportError, AttributeError):
    hopper = hopper_backward = None

# Positions per step of the gate's prefix sums (one program per batch row and head).
_GATE_BLOCK = 1024
# Elements per program of `_scale_kernel`.
_SCALE_BLOCK = 4096


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
def _fwd_inner(acc, l_i, m_i, q, c_q, c_ref, q_pos, key_lo, delta, K, V, C, stride_kt, stride_vt, kv_row0, kv_col, Tk,
               qk_scale, start, end, offs_n, offs_d,
               CAUSAL: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Online softmax over key blocks [start, end). Only causal (diagonal) blocks can run past Tk.

    Scores as t + (c_q - c_ref) (`_relative_scores`). delta: the pruning threshold per row (read only with PRUNE,
    whose mask takes the decay as c_q - c_k, as the pruning bounds do, bit for bit). K, V: the head's pointers, or
    with TMA descriptors whose row kv_row0 is the sequence's first key and column kv_col the head's first feature.
    """
    r = c_q - c_ref
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        k = _load_rows(K, kv_row0 + n0, kv_col, keys, stride_kt, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL, TMA)
        c_k = _load_vec(C + n0 + offs_n, keys, Tk, 0.0, CAUSAL)
        t = _relative_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), c_k[None, :], c_ref, qk_scale)
        decay = c_q[:, None] - c_k[None, :] if PRUNE else t  # read only by the pruning mask
        t = _mask_scores(t, decay, delta[:, None], q_pos[:, None], keys[None, :], key_lo[:, None], CAUSAL, MASK_LO,
                         PRUNE)
        v = _load_rows(V, kv_row0 + n0, kv_col, keys, stride_vt, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL, TMA)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, t, r, v, DOT_PRECISION)
    return acc, l_i, m_i


@_jit
def _output_norm_tile(o, w, gate, eps, HEAD_DIM: tl.constexpr, OUT_GATE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """FoX Pro's output norm of one tile of O rows (BLOCK_M, BLOCK_D) float32, as stored (rounded): y = o / rms(o)
    * w (* sigmoid(gate)), w (BLOCK_D,) the head's weights; returns (y, rstd (BLOCK_M,)). fused.py's formula."""
    y, rstd = _rms_normalize(o[:, None, :], w[None, :], eps, HEAD_DIM)
    y = tl.reshape(y, (BLOCK_M, BLOCK_D))
    if OUT_GATE:
        y = y * _sigmoid(gate)
    return y, tl.reshape(rstd, (BLOCK_M,))


@_jit
def _fwd_kernel(Q, K, V, C, KEY_LO, DELTA, BOUNDS, O, LSE, W_OUT, GATE, Y, RSTD_OUT,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lob, stride_lot,
                stride_gb, stride_gt, stride_gh, w_out_stride, out_eps, H, Tq, Tk, qk_scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr,
                DOT_PRECISION: tl.constexpr, OUT_NORM: tl.constexpr, OUT_GATE: tl.constexpr, TMA: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head). Writes O and the base-2 log-sum-exp; with OUT_NORM also
    Y = the output norm of O (`_output_norm_tile`: head h's weights at W_OUT + h * w_out_stride, the gate logits
    GATE (B, Tq, H, D) at its strides with OUT_GATE; Y laid out as O) and its RSTD_OUT (B, Tq, H).

    Key blocks: the diagonal [mid, end) first (its range needs no load, so its tiles stream in while the
    pruning bounds arrive), then [band, mid) plain and (PRUNE only) [start, band) pruned in part.
    With TMA, Q, K and V are tensor descriptors over (B * T, heads * D) (`_tma_descriptor`) instead of pointers.
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
    C += bh * Tk
    # The rows of this sequence's first query and key, and the head's first feature, in the TMA descriptors.
    q_row0, kv_row0 = (b * Tq + m0).to(tl.int32), (b * Tk).to(tl.int32)
    q_col, kv_col = (h * HEAD_DIM).to(tl.int32), ((h // GROUP) * HEAD_DIM).to(tl.int32)
    if not TMA:
        Q += b * stride_qb + h * stride_qh
        K += b * stride_kb + (h // GROUP) * stride_kh
        V += b * stride_vb + (h // GROUP) * stride_vh

    q = _load_rows(Q, q_row0, q_col, rows, stride_qt, Tq, offs_d, HEAD_DIM, BLOCK_D, True, TMA)
    q_pos, c_q, key_lo, start, mid, end = _query_block_rows(C, KEY_LO, b, m0, rows, offset, Tq, Tk, stride_lob,
                                                            stride_lot, MASK_LO, BLOCK_M, BLOCK_N)
    delta, start, band = _query_block_pruning(BOUNDS, DELTA, bh, m0 // BLOCK_M, tl.num_programs(0), start, PRUNE,
                                              BLOCK_M, BLOCK_N)

    c_ref = tl.load(C + offset + m0)  # the block's first query's prefix sum (`_relative_scores`)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = _initial_max(BLOCK_M)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, c_q, c_ref, q_pos, key_lo, delta, K, V, C, stride_kt, stride_vt,
                               kv_row0, kv_col, Tk, qk_scale, mid, end, offs_n, offs_d, True, MASK_LO, PRUNE, HEAD_DIM,
                               BLOCK_D, BLOCK_N, DOT_PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, c_q, c_ref, q_pos, key_lo, delta, K, V, C, stride_kt, stride_vt,
                               kv_row0, kv_col, Tk, qk_scale, band, mid, offs_n, offs_d, False, MASK_LO, False,
                               HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, TMA)
    if PRUNE and start < band:  # a loop of its own, entered only when needed (header of kernels/__init__.py)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, c_q, c_ref, q_pos, key_lo, delta, K, V, C, stride_kt, stride_vt,
                                   kv_row0, kv_col, Tk, qk_scale, start, band, offs_n, offs_d, False, MASK_LO, True,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, TMA)

    # A row with no visible key has l = 0: it returns 0, and a finite lse keeps its backward at 0 too.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_mask = (rows[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    o_offs = b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
    o = o.to(O.dtype.element_ty)
    tl.store(O + o_offs, o, mask=o_mask)
    tl.store(LSE + bh * Tq + rows, m_i + tl.log2(l_safe), mask=rows < Tq)
    if OUT_NORM:
        w = tl.load(W_OUT + h * w_out_stride + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
        gate = o
        if OUT_GATE:
            gate = tl.load(GATE + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + offs_d[None, :],
                           mask=o_mask, other=0.0).to(tl.float32)
        y, rstd = _output_norm_tile(o.to(tl.float32), w, gate, out_eps, HEAD_DIM, OUT_GATE, BLOCK_M, BLOCK_D)
        tl.store(Y + o_offs, y.to(Y.dtype.element_ty), mask=o_mask)
        tl.store(RSTD_OUT + (b * Tq + rows) * H + h, rstd, mask=rows < Tq)


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
def _scale_kernel(X, Y, scale, N, BLOCK: tl.constexpr):
    """Y = scale * X rounded to Y's dtype, N elements: Hopper's float32 dQ sums into dq in one pass (torch's
    mul with a 16-bit `out` reached 3.0 TB/s on an H200; this kernel saves 9-15 us per backward there)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offsets, mask=offsets < N)
    tl.store(Y + offsets, (x * scale).to(Y.dtype.element_ty), mask=offsets < N)


@_jit
def _bwd_delta_kernel(O, DO, DELTA, W_OUT, GATE, RSTD_OUT, DY, DGATE, DW_PARTIAL, stride_ob, stride_ot, stride_oh,
                      stride_dob, stride_dot, stride_doh, stride_gb, stride_gt, stride_gh, stride_yb, stride_yt,
                      stride_yh, w_out_stride, H, Tq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, OUT_NORM: tl.constexpr, OUT_GATE: tl.constexpr):
    """delta_i = sum_d O_id dO_id in float32, laid out (B, H, Tq) like the lse.

    With OUT_NORM (the forward's output norm, `_fwd_kernel`) DY is the gradient of its output Y, and this kernel
    first takes it back through the norm (and gate) to dO, which it writes to DO for the other backward kernels
    (fused.py's backward: DGATE (B, Tq, H, D) contiguous; each program's partial dW, row (program, b, h) of
    DW_PARTIAL).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    b = bh // H
    h = bh % H
    o = _load_tile(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                   rows, Tq, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do_ptrs = DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :]
    if OUT_NORM:
        mask = (rows[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
        dy = _load_tile(DY + b * stride_yb + h * stride_yh + rows[:, None] * stride_yt + offs_d[None, :],
                        rows, Tq, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
        rstd = tl.load(RSTD_OUT + (b * Tq + rows) * H + h, mask=rows < Tq, other=0.0)
        w = tl.load(W_OUT + h * w_out_stride + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
        o_hat = o * rstd[:, None]
        if OUT_GATE:
            gate = tl.load(GATE + b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + offs_d[None, :],
                           mask=mask, other=0.0).to(tl.float32)
            sig = _sigmoid(gate)
            dgate = dy * o_hat * w[None, :] * sig * (1.0 - sig)
            tl.store(DGATE + ((b * Tq + rows[:, None]) * H + h) * HEAD_DIM + offs_d[None, :],
                     dgate.to(DGATE.dtype.element_ty), mask=mask)
            dy = dy * sig
        dw = tl.sum(dy * o_hat, 0)
        tl.store(DW_PARTIAL + (tl.program_id(0) * tl.num_programs(1) + bh) * HEAD_DIM + offs_d, dw,
                 mask=offs_d < HEAD_DIM)
        do = _rms_norm_input_grad((dy * w[None, :])[:, None, :], o_hat[:, None, :], rstd[:, None], HEAD_DIM)
        do = tl.reshape(do, (BLOCK_M, BLOCK_D)).to(DO.dtype.element_ty)
        tl.store(do_ptrs, do, mask=mask)
    else:
        do = _load_tile(do_ptrs, rows, Tq, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Tq + rows, delta, mask=rows < Tq)


@_jit
def _bwd_dkdv_inner(dk, dv, dc, k, v, c_k, c_ref, keys, Q, DO, LSE, DELTA, C, KEY_LO, threshold, stride_qt, stride_dot,
                    stride_lot, offset, Tq, qk_scale, start, end, offs_m, offs_d,
                    CAUSAL: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr, EVEN_M: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV and the column sums of dS of one key block over query blocks [start, end).

    Works on transposed scores (keys x queries) so that dK and dV come straight out of tl.dot; scores as in
    `_relative_scores`, c_ref the block's first key's prefix sum. Rows past Tq load lse = +inf, which makes their P
    exactly 0.
    """
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        q = _load_tile(Q + rows[:, None] * stride_qt + offs_d[None, :], rows, Tq, offs_d, HEAD_DIM, BLOCK_D,
                       not EVEN_M)
        lse = _load_vec(LSE + rows, rows, Tq, float("inf"), not EVEN_M)
        c_q = _load_vec(C + offset + rows, rows, Tq, 0.0, not EVEN_M)
        t_t = _relative_scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), c_k[:, None], c_ref, qk_scale)
        decay_t = c_q[None, :] - c_k[:, None] if PRUNE else t_t  # read only by the pruning mask
        if MASK_LO:
            key_lo = _load_vec(KEY_LO + rows * stride_lot, rows, Tq, 0, not EVEN_M)
        else:
            key_lo = rows  # unread without MASK_LO
        t_t = _mask_scores(t_t, decay_t, threshold, (offset + rows)[None, :], keys[:, None], key_lo[None, :], CAUSAL,
                           MASK_LO, PRUNE)
        p_t = tl.exp2(t_t - (lse - (c_q - c_ref))[None, :])
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
        c_ref = tl.load(C + bh * Tk + n0)
        if PRUNE:
            threshold = tl.load(THRESHOLD + bh)
            bounds = BOUNDS + (bh * tl.num_programs(0) + tl.program_id(0)) * 2
            band = tl.multiple_of(tl.load(bounds), BLOCK_M)  # whole query blocks (as in _query_block_pruning)
            stop = tl.load(bounds + 1)
        else:
            threshold = 0.0
            band, stop = end, end
        dc = tl.zeros([BLOCK_N], dtype=tl.float32)
        dk, dv, dc = _bwd_dkdv_inner(dk, dv, dc, k, v, c_k, c_ref, keys, Qh, DOh, LSE + bh * Tq, DELTA + bh * Tq,
                                     C + bh * Tk, KEY_LO + b * stride_lob, threshold, stride_qt, stride_dot,
                                     stride_lot, offset, Tq, qk_scale, start, mid, offs_m, offs_d,
                                     True, MASK_LO, PRUNE, EVEN_M, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        dk, dv, dc = _bwd_dkdv_inner(dk, dv, dc, k, v, c_k, c_ref, keys, Qh, DOh, LSE + bh * Tq, DELTA + bh * Tq,
                                     C + bh * Tk, KEY_LO + b * stride_lob, threshold, stride_qt, stride_dot,
                                     stride_lot, offset, Tq, qk_scale, mid, band, offs_m, offs_d,
                                     False, MASK_LO, False, EVEN_M, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION)
        if PRUNE and band < stop:
            dk, dv, dc = _bwd_dkdv_inner(dk, dv, dc, k, v, c_k, c_ref, keys, Qh, DOh, LSE + bh * Tq, DELTA + bh * Tq,
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
def _bwd_dq_inner(dq, dc, q, do, lse, delta, c_q, c_ref, q_pos, key_lo, threshold, K, V, C, stride_kt, stride_vt,
                  kv_row0, kv_col, Tk, qk_scale, start, end, offs_n, offs_d,
                  CAUSAL: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ and the row sums of dS of one query block over key blocks [start, end) (K, V, c_ref and the
    scores as in `_fwd_inner`)."""
    lse_rel = lse - (c_q - c_ref)  # P = exp2(s - lse) = exp2(t - lse_rel)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        k = _load_rows(K, kv_row0 + n0, kv_col, keys, stride_kt, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL, TMA)
        v = _load_rows(V, kv_row0 + n0, kv_col, keys, stride_vt, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL, TMA)
        c_k = _load_vec(C + n0 + offs_n, keys, Tk, 0.0, CAUSAL)
        t = _relative_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), c_k[None, :], c_ref, qk_scale)
        decay = c_q[:, None] - c_k[None, :] if PRUNE else t  # read only by the pruning mask
        t = _mask_scores(t, decay, threshold[:, None], q_pos[:, None], keys[None, :], key_lo[:, None], CAUSAL,
                         MASK_LO, PRUNE)
        p = tl.exp2(t - lse_rel[:, None])
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
                   DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head). dQ = s dS K; row sums of dS go to DC_ROW.

    Key blocks as in the forward: the diagonal [mid, end), then [band, mid) plain and [start, band) pruned in part.
    With TMA, K and V are tensor descriptors, as in `_fwd_kernel` (Q and dO, loaded once, stay pointers).
    """
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offset = Tk - Tq
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_row0, kv_col = (b * Tk).to(tl.int32), ((h // GROUP) * HEAD_DIM).to(tl.int32)  # with TMA
    if not TMA:
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
                                                  PRUNE, BLOCK_M, BLOCK_N)
    c_ref = tl.load(C + offset + m0)  # as in the forward

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dc = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq, dc = _bwd_dq_inner(dq, dc, q, do, lse, delta, c_q, c_ref, q_pos, key_lo, threshold, K, V, C, stride_kt,
                           stride_vt, kv_row0, kv_col, Tk, qk_scale, mid, end, offs_n, offs_d, True, MASK_LO, PRUNE,
                           HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, TMA)
    dq, dc = _bwd_dq_inner(dq, dc, q, do, lse, delta, c_q, c_ref, q_pos, key_lo, threshold, K, V, C, stride_kt,
                           stride_vt, kv_row0, kv_col, Tk, qk_scale, band, mid, offs_n, offs_d, False, MASK_LO, False,
                           HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, TMA)
    if PRUNE and start < band:
        dq, dc = _bwd_dq_inner(dq, dc, q, do, lse, delta, c_q, c_ref, q_pos, key_lo, threshold, K, V, C, stride_kt,
                               stride_vt, kv_row0, kv_col, Tk, qk_scale, start, band, offs_n, offs_d, False, MASK_LO,
                               True, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, TMA)

    dq_mask = (rows[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=dq_mask)
    tl.store(DC_ROW + bh * Tq + rows, dc, mask=rows < Tq)


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


def _triton_forward(q, k, v, c2, key_lo, threshold2, scale, out_norm=None):
    """O (B, Tq, H, D) in q's dtype, the base-2 lse (B, H, Tq) in float32, and the query-block pruning bounds it
    used, {(block_m, block_n): bounds}, for a dQ kernel of the same tiles. With ``out_norm`` = (weight (H, D) or
    (D,), gate (B, Tq, H, D) or None, eps) also Y, the output norm of O, and its rstd (B, Tq, H): (o, lse, bounds, y,
    rstd); else y and rstd are None.

    threshold2: the pruning threshold in base 2 (B, H), or None. Optional tensors that are absent are passed
    as c2: the kernels do not read them when their flag is off. On Hopper the common case (`hopper.usable`, with no
    padding, pruning or output norm) takes hopper.py's warp-specialized forward instead of `_fwd_kernel`.
    """
    if hopper is not None and key_lo is None and threshold2 is None and out_norm is None and hopper.usable(q, k, v):
        return (*hopper.forward(q, k, v, c2, scale), {}, None, None)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    meta = _common_meta(q, k, key_lo, threshold2)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    args = (q, k, v, c2, _or(key_lo, c2), _or(threshold2, c2))
    weight, gate, eps = out_norm if out_norm is not None else (None, None, 0.0)
    y = torch.empty_like(o) if out_norm is not None else None
    rstd = torch.empty(B, Tq, H, dtype=torch.float32, device=q.device) if out_norm is not None else None
    out_args = (_or(weight, c2), _or(gate, c2), _or(y, c2), _or(rstd, c2))
    strides = (*_strides(q), *_strides(k), *_strides(v))
    norm_meta = dict(OUT_NORM=out_norm is not None, OUT_GATE=gate is not None)
    query_bounds = {}

    tma = _tma_wanted("fwd", q, k, v)

    def launch(cfg):
        bounds = _pruning_bounds("query", c2, key_lo, threshold2, Tq, cfg)
        query_bounds[(cfg.block_m, cfg.block_n)] = bounds
        qkv = ((_tma_descriptor(q, cfg.block_m), _tma_descriptor(k, cfg.block_n), _tma_descriptor(v, cfg.block_n))
               if tma else (q, k, v))
        _fwd_kernel[(triton.cdiv(Tq, cfg.block_m), B * H)](
            *qkv, *args[3:], bounds, o, lse, *out_args, *strides, *o.stride()[:3], *_strides(key_lo, 2),
            *_strides(gate), _weight_stride(weight), eps, H, Tq, Tk, scale * LOG2E, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, TMA=tma, **cfg.options(q.device, meta["PRUNE"]), **meta, **norm_meta)

    _launch("fwd_tma" if tma else "fwd", q, meta["BLOCK_D"], launch, grid_rows=(Tq, B * H), keys=Tk)
    return o, lse, query_bounds, y, rstd


def _delta(do, o, out_norm=None, rstd=None):
    """`_bwd_delta_kernel`: (dO, delta (B, H, Tq), dweight, dgate). Without ``out_norm`` dO is ``do`` itself and the
    last two are None; with it (the forward's (weight, gate, eps) and its rstd) ``do`` is the gradient of the norm's
    output, and dO, in o's dtype, the gradient of O; dweight in the weight's shape, dgate None without a gate."""
    B, Tq, H, D = o.shape
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=o.device)
    grid = (triton.cdiv(Tq, 64), B * H)
    weight, gate, _ = out_norm if out_norm is not None else (None, None, None)
    dy, dgate, dw_partial = do, None, None
    if out_norm is not None:
        do = torch.empty_like(o)
        dgate = torch.empty(o.shape, dtype=gate.dtype, device=o.device) if gate is not None else None
        dw_partial = torch.empty(*grid, D, dtype=torch.float32, device=o.device)
    _bwd_delta_kernel[grid](o, do, delta, _or(weight, delta), _or(gate, delta), _or(rstd, delta), dy,
                            _or(dgate, delta), _or(dw_partial, delta), *o.stride()[:3], *do.stride()[:3],
                            *_strides(gate), *dy.stride()[:3], _weight_stride(weight), H, Tq, HEAD_DIM=D,
                            BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=64, OUT_NORM=out_norm is not None,
                            OUT_GATE=gate is not None)
    dweight = _weight_grad(dw_partial.view(-1, H * D).sum(dim=0), weight) if out_norm is not None else None
    return do, delta, dweight, dgate


def _triton_backward(do, q, k, v, gate, o, lse, key_lo, query_hi, threshold2, scale, gate_is_cumsum=False,
                     query_bounds=None, out_norm=None, rstd=None):
    """dq, dk, dv in their inputs' dtypes, dlog f (B, Tk, H) in float32 (with ``gate_is_cumsum``, dc instead), and
    the output norm's dweight and dgate (`_delta`; None without ``out_norm``, whose do is then dO itself).

    gate (B, Tk, H) float32: log f, or with ``gate_is_cumsum`` its prefix sums c. The kernels' c2 is made here and
    freed before dq is, the backward's peak of memory (the forward's c2 is not kept: its B H Tk floats would be
    there too).

    query_bounds: the forward's pruning bounds by tile shape (`_triton_forward`), reused when dQ's tiles match.
    On Hopper the common case (`hopper_backward.usable`, with no padding or pruning) takes hopper_backward.py's
    one-kernel backward instead of `_bwd_dkdv_kernel` and `_bwd_dq_kernel`.
    """
    B, Tq, H = q.shape[:3]
    Tk = k.shape[1]
    c2 = _base2_prefix_sums(gate, gate_is_cumsum)
    do, delta, dweight, dgate = _delta(do, o, out_norm, rstd)
    one_kernel = (hopper_backward is not None and key_lo is None and query_hi is None and threshold2 is None
                  and hopper_backward.usable(q, k, v, do))
    if one_kernel:
        dq, dk, dv, dc_col, dc_row = hopper_backward.backward(do, q, k, v, c2, lse, delta, scale)  # float32 dq / s
    else:
        dq, dk, dv, dc_col, dc_row = _blocked_backward(do, delta, q, k, v, c2, lse, key_lo, query_hi, threshold2,
                                                       scale, query_bounds)
    del delta, c2  # peak memory: the (B, H, T) vectors go before dq's conversion below allocates dq
    if gate_is_cumsum:  # dc_t = rowsum(dS) of the query at t - colsum(dS)_t (why the row sums stay: __init__.py)
        d_gate = dc_col.neg_()
        d_gate[:, :, Tk - Tq:] += dc_row
        d_gate = d_gate.transpose(1, 2)
    else:
        d_gate = torch.empty(B, Tk, H, dtype=torch.float32, device=q.device)
        _gate_grad_kernel[(B * H,)](dc_col, dc_row, d_gate, *d_gate.stride(), H, Tq, Tk, BLOCK_T=_GATE_BLOCK)
    del dc_col, dc_row
    if one_kernel:  # its float32 sums of dS k: scaled and rounded in one pass
        dq_sum, dq = dq, torch.empty_like(q)
        _scale_kernel[(triton.cdiv(dq.numel(), _SCALE_BLOCK),)](dq_sum, dq, scale, dq.numel(), BLOCK=_SCALE_BLOCK,
                                                                num_warps=8)
    return dq, dk, dv, d_gate, dweight, dgate


def _blocked_backward(do, delta, q, k, v, c2, lse, key_lo, query_hi, threshold2, scale, query_bounds):
    """dq, dk, dv and the column and row sums of dS, (B, H, Tk) and (B, H, Tq) float32, from the dK/dV and dQ
    kernels."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    meta = _common_meta(q, k, key_lo, threshold2)
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
        **cfg.options(q.device, meta["PRUNE"]), **meta))

    def dq_bounds(cfg):
        reused = (query_bounds or {}).get((cfg.block_m, cfg.block_n))
        return reused if reused is not None else _pruning_bounds("query", c2, key_lo, threshold2, Tq, cfg)

    tma = _tma_wanted("dq", q, k, v)

    def key_values(cfg):  # TMA descriptors over k and v, or the tensors
        return (_tma_descriptor(k, cfg.block_n), _tma_descriptor(v, cfg.block_n)) if tma else (k, v)

    def launch_dq(cfg):
        _bwd_dq_kernel[(triton.cdiv(Tq, cfg.block_m), B * H)](
            q, *key_values(cfg), c2, do, lse, delta, lo, thr, dq_bounds(cfg), dq, dc_row, *strides, *dq.stride()[:3],
            *_strides(key_lo, 2), H, Tq, Tk, scale, qk_scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TMA=tma, **cfg.options(q.device, meta["PRUNE"]), **meta)

    _launch("dq_tma" if tma else "dq", q, meta["BLOCK_D"], launch_dq)
    return dq, dk, dv, dc_col, dc_row
