"""Fused ops on the attention's inputs: FoX Pro's KV-shift and per-head q/k norms, one Triton kernel forward and
one backward for all of them (`attention_inputs`; `token_shift` is the shift alone).

Math (token t of a sequence, per head, rows of D features; float32 arithmetic, float64 for float64 inputs)::

    token_shift       a_t = sigmoid(logit_t)       y_t = a_t x_{t-1} + (1 - a_t) x_t,   x_{-1} = previous or 0
    attention_inputs  q' = rms_norm(q)   k' = rms_norm(token_shift(k))   v' = token_shift(v)   (each step optional)

Backward, with ds the gradient that reaches the shifted value (through the norm's backward of fused.py for k, dy
itself for v)::

    dx_t = (1 - a_t) ds_t + a_{t+1} ds_{t+1}     dlogit_t = a_t (1 - a_t) sum_d ds_t (x_{t-1} - x_t)

One program per (tile of tokens, role): role 0 normalizes q, role 1 shifts and/or normalizes k, role 2 shifts v.
Nothing between the shift and the norm is stored: the backward recomputes the shifted value, and for dx_t the
gradient of token t + 1 as well. Inputs are read in place as rows one stride apart (the column slices of the
attention's stacked projections, model.stacked_linear); outputs are written contiguous. In a training step every
fused op costs host time too (an autograd.Function and a launch), so one op for the three tensors, not four.
"""

from __future__ import annotations

import functools

import torch

from .fused import (_acc_dtype, _autocast_or, _cdiv, _check_float_tensor, _check_norm_input, _check_triton,
                    _group_tile, _jit, _norm_meta, _program_rows, _programs, _rms_norm_input_grad, _rms_normalize,
                    _row_strided, _rows_per_program, _sigmoid, _stand_in, _weight_grad, _weight_stride)

try:
    import triton.language as tl
except ImportError:  # no Triton on this platform: the kernels below are never launched
    tl = None


@_jit
def _input_value(X, stride_x, P, A, stride_a, rows, row_ok, groups, offs, in_row, T, n_groups, group_size,
                 SHIFT: tl.constexpr, HAS_PREV: tl.constexpr, ACC: tl.constexpr):
    """(s, x_t, x_{t-1}, a_t) at token rows ``rows`` of X (B*T tokens of n_groups x group_size, rows ``stride_x``
    apart; ``offs`` (BLOCK_G, BLOCK_D) the offsets within a row): s = a_t x_{t-1} + (1 - a_t) x_t with SHIFT, where
    a_t = sigmoid(A_t) (A rows ``stride_a`` apart; a_t (BLOCK_M, BLOCK_G)) and x_{-1} is row b of P (B, n_groups,
    group_size) with HAS_PREV (the cached token before a decoding chunk), else 0; s = x_t without SHIFT."""
    mask = row_ok[:, None, None] & in_row[None, :, :]
    x_offs = rows[:, None, None] * stride_x + offs[None, :, :]
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(ACC)
    if SHIFT:
        t = rows % T
        before = tl.load(X + x_offs - stride_x, mask=mask & (t > 0)[:, None, None], other=0.0).to(ACC)
        if HAS_PREV:
            p_offs = (rows // T)[:, None, None] * (n_groups * group_size) + offs[None, :, :]
            before += tl.load(P + p_offs, mask=mask & (t == 0)[:, None, None], other=0.0).to(ACC)
        a_mask = row_ok[:, None] & (groups < n_groups)[None, :]
        a = _sigmoid(tl.load(A + rows[:, None] * stride_a + groups[None, :], mask=a_mask, other=0.0).to(ACC))
        s = a[:, :, None] * before + (1.0 - a[:, :, None]) * x
    else:
        before, a, s = x, tl.sum(x, axis=2), x
    return s, x, before, a


@_jit
def _input_fwd_rows(X, stride_x, P, A, stride_a, W, w_stride, Y, RSTD, tile, n_rows, T, n_groups, group_size, eps,
                    SHIFT: tl.constexpr, NORM: tl.constexpr, HAS_PREV: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """One tile of token rows of one input X (B*T, n_groups, group_size): shifted (SHIFT), then normalized per group
    with W (group g's weights at g * w_stride: 0 for one vector shared by all groups) and RSTD stored (NORM)."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    groups, cols, in_row, offs = _group_tile(n_groups, group_size, BLOCK_G, BLOCK_D)
    y, _, _, _ = _input_value(X, stride_x, P, A, stride_a, rows, row_ok, groups, offs, in_row, T, n_groups,
                              group_size, SHIFT, HAS_PREV, ACC)
    if NORM:
        w = tl.load(W + groups[:, None] * w_stride + cols[None, :], mask=in_row, other=0.0).to(ACC)
        y, rstd = _rms_normalize(y, w, eps, group_size)
        tl.store(RSTD + rows[:, None] * n_groups + groups[None, :], rstd,
                 mask=row_ok[:, None] & (groups < n_groups)[None, :])
    tl.store(Y + rows[:, None, None] * (n_groups * group_size) + offs[None, :, :], y.to(Y.dtype.element_ty),
             mask=row_ok[:, None, None] & in_row[None, :, :])


@_jit
def _attention_inputs_fwd_kernel(Q, stride_q, WQ, wq_stride, YQ, RSTDQ, n_q_groups,
                                 K, stride_k, PK, AK, stride_ak, WK, wk_stride, YK, RSTDK,
                                 V, stride_v, PV, AV, stride_av, YV, n_kv_groups, n_rows, T, group_size, eps,
                                 FIRST: tl.constexpr, NORM_QK: tl.constexpr, SHIFT_K: tl.constexpr,
                                 SHIFT_V: tl.constexpr, HAS_PREV: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Programs (tile, role - FIRST), for the roles in use: 0 normalizes q, 1 shifts and/or normalizes k, 2 shifts v.
    The roles in use are consecutive (q is normalized only together with k), so FIRST and the grid name them."""
    role, tile = tl.program_id(1) + FIRST, tl.program_id(0)
    if NORM_QK and role == 0:
        _input_fwd_rows(Q, stride_q, Q, Q, 0, WQ, wq_stride, YQ, RSTDQ, tile, n_rows, T, n_q_groups, group_size, eps,
                        False, True, False, ACC, BLOCK_M, BLOCK_G, BLOCK_D)
    elif (SHIFT_K or NORM_QK) and role == 1:
        _input_fwd_rows(K, stride_k, PK, AK, stride_ak, WK, wk_stride, YK, RSTDK, tile, n_rows, T, n_kv_groups,
                        group_size, eps, SHIFT_K, NORM_QK, HAS_PREV, ACC, BLOCK_M, BLOCK_G, BLOCK_D)
    elif SHIFT_V and role == 2:
        _input_fwd_rows(V, stride_v, PV, AV, stride_av, V, 0, YV, V, tile, n_rows, T, n_kv_groups, group_size, eps,
                        True, False, HAS_PREV, ACC, BLOCK_M, BLOCK_G, BLOCK_D)


@_jit
def _input_grad(X, stride_x, P, A, stride_a, w, RSTD, DY, rows, row_ok, groups, offs, in_row, T, n_groups,
                group_size, SHIFT: tl.constexpr, NORM: tl.constexpr, HAS_PREV: tl.constexpr, ACC: tl.constexpr):
    """(ds, dy, s_hat, x_t, x_{t-1}, a_t) at token rows ``rows``: ds the gradient reaching the value s the norm saw
    (`_input_value`), through the norm's backward with NORM (s_hat = s * rstd), else dy itself (s_hat = s)."""
    s, x, before, a = _input_value(X, stride_x, P, A, stride_a, rows, row_ok, groups, offs, in_row, T, n_groups,
                                   group_size, SHIFT, HAS_PREV, ACC)
    dy = tl.load(DY + rows[:, None, None] * (n_groups * group_size) + offs[None, :, :],
                 mask=row_ok[:, None, None] & in_row[None, :, :], other=0.0).to(ACC)
    ds, s_hat = dy, s
    if NORM:
        rstd = tl.load(RSTD + rows[:, None] * n_groups + groups[None, :],
                       mask=row_ok[:, None] & (groups < n_groups)[None, :], other=0.0)
        s_hat = s * rstd[:, :, None]
        ds = _rms_norm_input_grad(dy * w[None, :, :], s_hat, rstd, group_size)
    return ds, dy, s_hat, x, before, a


@_jit
def _input_bwd_rows(X, stride_x, P, A, stride_a, W, w_stride, RSTD, DY, DX, DA, DP, DW, program, rows_per_program,
                    n_rows, T, n_groups, group_size, SHIFT: tl.constexpr, NORM: tl.constexpr, HAS_PREV: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of `_input_fwd_rows` over the token rows ``program`` owns: the norm's, then the shift's (module
    docstring), whose dx_t needs ds_{t+1}, recomputed from row t + 1. Writes DX (contiguous); with SHIFT, DA and
    (HAS_PREV) DP, the gradient of P, from the rows at t = 0; with NORM the program's partial dW to DW."""
    groups, cols, in_row, offs = _group_tile(n_groups, group_size, BLOCK_G, BLOCK_D)
    group_ok = groups < n_groups
    w = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
    if NORM:
        w = tl.load(W + groups[:, None] * w_stride + cols[None, :], mask=in_row, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
    row_begin, row_end = _program_rows(program, rows_per_program, n_rows)
    for start in range(row_begin, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None, None] & in_row[None, :, :]
        ds, dy, s_hat, x, before, a = _input_grad(X, stride_x, P, A, stride_a, w, RSTD, DY, rows, row_ok, groups,
                                                  offs, in_row, T, n_groups, group_size, SHIFT, NORM, HAS_PREV, ACC)
        if NORM:
            dw += tl.sum(dy * s_hat, axis=0)
        dx = ds
        if SHIFT:
            has_next = row_ok & (rows % T < T - 1)
            ds_next, _, _, _, _, a_next = _input_grad(X, stride_x, P, A, stride_a, w, RSTD, DY, rows + 1, has_next,
                                                      groups, offs, in_row, T, n_groups, group_size, SHIFT, NORM,
                                                      HAS_PREV, ACC)
            a_next = tl.where(has_next[:, None], a_next, 0.0)
            dx = (1.0 - a[:, :, None]) * ds + a_next[:, :, None] * ds_next
            da = a * (1.0 - a) * tl.sum(ds * (before - x), axis=2)
            tl.store(DA + rows[:, None] * n_groups + groups[None, :], da.to(DA.dtype.element_ty),
                     mask=row_ok[:, None] & group_ok[None, :])
            if HAS_PREV:  # only token 0 reads P, weighted by a_0
                p_offs = (rows // T)[:, None, None] * (n_groups * group_size) + offs[None, :, :]
                tl.store(DP + p_offs, (a[:, :, None] * ds).to(DP.dtype.element_ty),
                         mask=mask & (rows % T == 0)[:, None, None])
        tl.store(DX + rows[:, None, None] * (n_groups * group_size) + offs[None, :, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
    if NORM:
        tl.store(DW + offs, dw, mask=in_row)


@_jit
def _attention_inputs_bwd_kernel(Q, stride_q, WQ, wq_stride, RSTDQ, DYQ, DXQ, n_q_groups,
                                 K, stride_k, PK, AK, stride_ak, WK, wk_stride, RSTDK, DYK, DXK, DAK, DPK,
                                 V, stride_v, PV, AV, stride_av, DYV, DXV, DAV, DPV, n_kv_groups,
                                 DW_PARTIAL, dw_stride, n_rows, rows_per_program, T, group_size,
                                 FIRST: tl.constexpr, NORM_QK: tl.constexpr, SHIFT_K: tl.constexpr,
                                 SHIFT_V: tl.constexpr, HAS_PREV: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of `_attention_inputs_fwd_kernel`, programs (program, role - FIRST). Row p of DW_PARTIAL (rows
    ``dw_stride`` apart) holds program p's partial dW of q's norm, then k's: one sum over the rows gives both."""
    role, program = tl.program_id(1) + FIRST, tl.program_id(0)
    dw_row = DW_PARTIAL + program * dw_stride
    if NORM_QK and role == 0:
        _input_bwd_rows(Q, stride_q, Q, Q, 0, WQ, wq_stride, RSTDQ, DYQ, DXQ, Q, Q, dw_row, program, rows_per_program,
                        n_rows, T, n_q_groups, group_size, False, True, False, ACC, BLOCK_M, BLOCK_G, BLOCK_D)
    elif (SHIFT_K or NORM_QK) and role == 1:
        _input_bwd_rows(K, stride_k, PK, AK, stride_ak, WK, wk_stride, RSTDK, DYK, DXK, DAK, DPK,
                        dw_row + n_q_groups * group_size, program, rows_per_program, n_rows, T, n_kv_groups,
                        group_size, SHIFT_K, NORM_QK, HAS_PREV, ACC, BLOCK_M, BLOCK_G, BLOCK_D)
    elif SHIFT_V and role == 2:
        _input_bwd_rows(V, stride_v, PV, AV, stride_av, V, 0, V, DYV, DXV, DAV, DPV, dw_row, program,
                        rows_per_program, n_rows, T, n_kv_groups, group_size, True, False, HAS_PREV, ACC, BLOCK_M,
                        BLOCK_G, BLOCK_D)


@functools.lru_cache(maxsize=None)
def _inputs_meta(groups: int, group_size: int, norm_qk: bool, shift_k: bool, shift_v: bool, has_previous: bool,
                 acc: torch.dtype) -> tuple[dict, int]:
    """(compile-time arguments, number of roles) of the attention-inputs kernels; cached, the same few every step."""
    first = 0 if norm_qk else 1 if shift_k else 2
    meta = dict(_norm_meta(groups, group_size, acc), FIRST=first, NORM_QK=norm_qk, SHIFT_K=shift_k, SHIFT_V=shift_v,
                HAS_PREV=has_previous)
    return meta, (2 if shift_v else 1) - first + 1


class _AttentionInputsFunction(torch.autograd.Function):
    """q (B, T, H, D) normalized with wq; k (B, T, Hkv, D) shifted with logits ak (and the token before, pk) and/or
    normalized with wk; v (B, T, Hkv, D) shifted with av (pv). Returns (q', k', v'), None for an input left as it is
    (wq and wk come together; pk and pv too)."""

    @staticmethod
    def forward(ctx, q, wq, k, pk, ak, wk, v, pv, av, eps, out_dtype):
        norm_qk, shift_k, shift_v = wq is not None, ak is not None, av is not None
        B, T, Hkv, D = k.shape
        H, rows = q.shape[2] if norm_qk else Hkv, B * T
        acc = _acc_dtype(*(t for t in (q, wq, k, wk, v) if t is not None))
        meta, n_roles = _inputs_meta(max(H, Hkv), D, norm_qk, shift_k, shift_v,
                                     pk is not None or pv is not None, acc)
        # the inputs are read in place (column slices of the stacked projections), the outputs written contiguous
        (q, stride_q), (wq,) = (_row_strided(q, H * D) if norm_qk else (k, 0)), _stand_in(k, wq)
        k, stride_k = _row_strided(k, Hkv * D)
        v, stride_v = _row_strided(v, Hkv * D) if shift_v else (k, 0)
        ak, stride_ak = _row_strided(ak, Hkv) if shift_k else (k, 0)
        av, stride_av = _row_strided(av, Hkv) if shift_v else (k, 0)
        pk, pv = (p.to(k.dtype).contiguous() if p is not None else k for p in (pk, pv))
        yq = q.new_empty(q.shape, dtype=out_dtype) if norm_qk else None
        yk = k.new_empty(k.shape, dtype=out_dtype if norm_qk else k.dtype) if norm_qk or shift_k else None
        yv = v.new_empty(v.shape) if shift_v else None
        rstd_q, rstd_k = (k.new_empty((rows, H), dtype=acc), k.new_empty((rows, Hkv), dtype=acc)) if norm_qk else (k, k)
        if rows:
            _attention_inputs_fwd_kernel[(_cdiv(rows, meta["BLOCK_M"]), n_roles)](
                q, stride_q, wq, _weight_stride(wq), *_stand_in(k, yq), rstd_q, H,
                k, stride_k, pk, ak, stride_ak, *_stand_in(k, wk), _weight_stride(wk), *_stand_in(k, yk), rstd_k,
                v, stride_v, pv, av, stride_av, *_stand_in(k, yv), Hkv, rows, T, D, eps, **meta)
        ctx.save_for_backward(q, wq, rstd_q, k, pk, ak, wk, rstd_k, v, pv, av)
        ctx.layout = (stride_q, stride_k, stride_ak, stride_v, stride_av, H, n_roles, meta)
        return yq, yk, yv

    @staticmethod
    def backward(ctx, dyq, dyk, dyv):
        q, wq, rstd_q, k, pk, ak, wk, rstd_k, v, pv, av = ctx.saved_tensors
        stride_q, stride_k, stride_ak, stride_v, stride_av, H, n_roles, meta = ctx.layout
        norm_qk, shift_k, shift_v = meta["NORM_QK"], meta["SHIFT_K"], meta["SHIFT_V"]
        B, T, Hkv, D = k.shape
        rows = B * T
        # an output that did not reach the loss has no gradient: zeros (its rows still run, for their partial dW)
        dyq = (dyq.contiguous() if dyq is not None else q.new_zeros(q.shape)) if norm_qk else k
        dyk = (dyk.contiguous() if dyk is not None else k.new_zeros(k.shape)) if norm_qk or shift_k else k
        dyv = (dyv.contiguous() if dyv is not None else v.new_zeros(v.shape)) if shift_v else k
        dq = q.new_empty(q.shape) if norm_qk else None
        dk = k.new_empty(k.shape) if norm_qk or shift_k else None
        dv = v.new_empty(v.shape) if shift_v else None
        dak, dav = (a.new_empty((B, T, Hkv)) if on else None for a, on in ((ak, shift_k), (av, shift_v)))
        has_previous = meta["HAS_PREV"]
        dpk, dpv = (p.new_empty(p.shape) if has_previous and on else None for p, on in ((pk, shift_k), (pv, shift_v)))
        programs = _programs(_cdiv(rows, meta["BLOCK_M"]), k.device)
        n_w = (H + Hkv) * D if norm_qk else 1
        dw_partial = (torch.empty if rows else torch.zeros)((programs, n_w), dtype=rstd_q.dtype if norm_qk else
                                                            torch.float32, device=k.device)
        if rows:
            _attention_inputs_bwd_kernel[(programs, n_roles)](
                q, stride_q, wq, _weight_stride(wq if norm_qk else None), rstd_q, dyq, *_stand_in(k, dq), H,
                k, stride_k, pk, ak, stride_ak, wk if norm_qk else k, _weight_stride(wk if norm_qk else None), rstd_k,
                dyk, *_stand_in(k, dk, dak, dpk), v, stride_v, pv, av, stride_av, dyv, *_stand_in(k, dv, dav, dpv), Hkv,
                dw_partial, n_w, rows, _rows_per_program(rows, programs, meta["BLOCK_M"]), T, D, **meta)
        dwq = dwk = None
        if norm_qk:  # one reduction for both weights: q's per-head partials, then k's
            dw = dw_partial.sum(dim=0)
            dwq, dwk = _weight_grad(dw[:H * D], wq), _weight_grad(dw[H * D:], wk)
        return dq, dwq, dk, dpk, dak, dwk, dv, dpv, dav, None, None


def _check_heads_input(name: str, t, shape: tuple | None = None) -> None:
    """t a floating tensor (B, T, heads, D), of ``shape`` where given."""
    _check_float_tensor(name, t)
    if t.dim() != 4 or (shape is not None and tuple(t.shape) != tuple(shape)):
        expected = tuple(shape) if shape is not None else "(batch, seq_len, heads, head_dim)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def _check_shift_args(x, x_name: str, a_logits, a_name: str, previous, p_name: str) -> None:
    """a_logits (B, T, heads) and previous (B, 1, heads, D) or None for x (B, T, heads, D), on x's device."""
    _check_float_tensor(a_name, a_logits)
    for name, t, shape in ((a_name, a_logits, x.shape[:3]), (p_name, previous, (x.shape[0], 1, *x.shape[2:]))):
        if t is None:
            continue
        _check_float_tensor(name, t)
        if t.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")


def attention_inputs(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor | None, *,
                     q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                     k_shift_logits: torch.Tensor | None = None, v_shift_logits: torch.Tensor | None = None,
                     k_previous: torch.Tensor | None = None, v_previous: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None):
    """FoX Pro's token-wise steps on the attention's inputs, all in one Triton kernel forward and one backward::

        k <- KV-shift(k) = a_t k_{t-1} + (1 - a_t) k_t,  a_t = sigmoid(k_shift_logits_t)     (with k_shift_logits)
        v <- KV-shift(v) the same way with v_shift_logits                                     (with v_shift_logits)
        q, k <- per-head RMSNorm with q_weight, k_weight (k after its shift)                  (with the weights)

    Args:
        q: (B, T, H, D), or None without the norms. k: (B, T, Hkv, D). v: (B, T, Hkv, D), or None without v's shift.
        q_weight, k_weight: both or neither; (D,) each (one vector for all heads) or (H, D) and (Hkv, D).
        k_shift_logits, v_shift_logits: (B, T, Hkv) each, or None for no shift.
        k_previous, v_previous: (B, 1, Hkv, D) the raw k / v of the token before this chunk (decoding from a
            cache), or None for zeros.
        out_dtype: the normalized outputs' dtype, rms_norm's default; shifted-only ones keep their input's.
    Returns:
        (q, k, v), each processed as asked or returned as given. Inputs may be column slices of wider tensors (rows
        one stride apart): they are read in place.
    """
    norm_qk = q_weight is not None or k_weight is not None
    _check_heads_input("k", k)
    if norm_qk:
        if q_weight is None or k_weight is None:
            raise ValueError("q_weight and k_weight come together: pass both or neither")
        _check_heads_input("q", q)
        if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"q must have k's batch, seq_len and head_dim {tuple(k.shape)}, got {tuple(q.shape)}")
        _check_norm_input(q, q_weight, eps, "q", "q_weight")
        _check_norm_input(k, k_weight, eps, "k", "k_weight")
        if q_weight.dim() != k_weight.dim():
            raise ValueError(f"q_weight {tuple(q_weight.shape)} and k_weight {tuple(k_weight.shape)} must both be "
                             f"(D,) or both (heads, D)")
    if v_shift_logits is not None:
        _check_heads_input("v", v, k.shape)
    for name, a_logits, previous in (("k", k_shift_logits, k_previous), ("v", v_shift_logits, v_previous)):
        if a_logits is not None:
            _check_shift_args(k, "k", a_logits, f"{name}_shift_logits", previous, f"{name}_previous")
        elif previous is not None:
            raise ValueError(f"{name}_previous is the token before a shifted chunk: it needs {name}_shift_logits")
    if not norm_qk and k_shift_logits is None and v_shift_logits is None:
        return q, k, v
    _check_triton(k, "attention_inputs")
    for name, t in (("q", q if norm_qk else None), ("v", v if v_shift_logits is not None else None)):
        if t is not None and (t.device != k.device or t.dtype != k.dtype):
            raise ValueError(f"{name} must be on k's device and of its dtype ({k.device}, {k.dtype}), got {t.device}, "
                             f"{t.dtype}")
    if (k_previous is None) != (v_previous is None) and k_shift_logits is not None and v_shift_logits is not None:
        k_previous, v_previous = (p if p is not None else torch.zeros_like(k[:, :1]) for p in (k_previous, v_previous))
    out_dtype = out_dtype or _autocast_or(k, k.dtype)
    yq, yk, yv = _AttentionInputsFunction.apply(
        q if norm_qk else None, q_weight.contiguous() if norm_qk else None, k, k_previous, k_shift_logits,
        k_weight.contiguous() if norm_qk else None, v if v_shift_logits is not None else None, v_previous,
        v_shift_logits, float(eps), out_dtype)
    return (q if yq is None else yq), (k if yk is None else yk), (v if yv is None else yv)


def token_shift(x: torch.Tensor, previous: torch.Tensor | None, a_logits: torch.Tensor) -> torch.Tensor:
    """KV-shift y_t = a_t x_{t-1} + (1 - a_t) x_t with a_t = sigmoid(a_logits), one Triton kernel each way
    (`attention_inputs` with k only).

    Args:
        x: (B, T, H, D) keys or values. previous: (B, 1, H, D) x of the token before this chunk (decoding), or
            None for zeros. a_logits: (B, T, H), one mixing logit per token and head.
    Returns:
        (B, T, H, D) in x's dtype.
    """
    _check_heads_input("x", x)
    _check_shift_args(x, "x", a_logits, "a_logits", previous, "previous")
    _check_triton(x, "token_shift")
    return _AttentionInputsFunction.apply(None, None, x, previous, a_logits, None, None, None, None, 0.0, x.dtype)[1]
