"""Adaptive computation pruning in the kernels: the "auto" threshold from the q and k norms, and the block bounds
that tell each attention program which key (or query) blocks it may skip, found by binary search over the
gate's prefix sums (acp.py has the method and its bound; the header of kernels/__init__.py the layout)."""

from __future__ import annotations

import math

import torch

from .common import _jit, _key_block_query_range, _KernelConfig, _load_tile, _or, _query_block_key_range, _strides, \
    tl, triton

# Blocks per program of the pruning-bounds kernels (one lane each).
_BOUNDS_LANES = 64


@_jit
def _query_block_pruning(BOUNDS, DELTA, bh, m_block, n_blocks, start, PRUNE: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """(threshold per row, start, band) of a query block (forward and dQ alike): with PRUNE, its threshold and the
    key range [start, band) partly pruned, from `_query_block_bounds_kernel`; without, zeros and an empty band.

    Both bounds are whole key blocks. Saying so (tl.multiple_of) keeps the loops' loads of c vectorized: a loop
    from a loaded bound of unknown alignment loads c one float at a time (+57 instructions per tile, sm_90).
    """
    if PRUNE:
        delta = tl.load(DELTA + bh)
        bounds = BOUNDS + (bh * n_blocks + m_block) * 2
        start = tl.multiple_of(tl.load(bounds), BLOCK_N)
        band = tl.multiple_of(tl.load(bounds + 1), BLOCK_N)
    else:
        delta = 0.0
        band = start
    return tl.zeros([BLOCK_M], dtype=tl.float32) + delta, start, band


@_jit
def _threshold2_from_bound(bound, log_keys, log_eps):
    """The "auto" threshold in base 2 for a score bound U: log2(e) (-(2 U + log Tk) + log eps) (acp.threshold)."""
    return (log_eps - 2.0 * bound - log_keys) * 1.4426950408889634


@_jit
def _max_norm_rows(X, C, OUT, chunk, bh, n_heads, stride_b, stride_t, stride_h, stride_cb, stride_ct, stride_ch, Hx,
                   T, Tk, c_scale, floor, HEADS_PER_X: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """OUT[chunk, bh] = max over the BLOCK_T rows t of the chunk of |X[b, t, h, :]|^2 (bh = b * Hx + h), in float32,
    or 0 when none of the HEADS_PER_X query heads that read X's head h can prune: every visible score's decay is
    at least (c[b, Tk-1] - c[b, 0]) c_scale (c (B, Tk, H) falls along keys), and a threshold is at most its value
    at U = 0 (`floor`). A skipped head then gets the U = 0 threshold, which prunes nothing there either."""
    b = bh // Hx
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
    tl.store(OUT + chunk * n_heads + bh, sq_max)


@_jit
def _max_norm_kernel(Q, K, C, Q_SQ, K_SQ, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_cb, stride_ct, stride_ch, B, H, Tq, Tk, c_scale, log_keys, log_eps, GROUP: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Chunk maxima of |q|^2 into Q_SQ (q chunks, B * H) and of |k|^2 into K_SQ (k chunks, B * H / GROUP), in one
    launch (`_max_norm_rows`): programs (chunk, head) over the B * H query heads, then the B * H / GROUP kv heads."""
    chunk = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    floor = _threshold2_from_bound(0.0, log_keys, log_eps)
    if head < B * H:
        if chunk * BLOCK_T < Tq:
            _max_norm_rows(Q, C, Q_SQ, chunk, head, B * H, stride_qb, stride_qt, stride_qh, stride_cb, stride_ct,
                           stride_ch, H, Tq, Tk, c_scale, floor, 1, HEAD_DIM, BLOCK_D, BLOCK_T)
    elif chunk * BLOCK_T < Tk:
        _max_norm_rows(K, C, K_SQ, chunk, head - B * H, B * (H // GROUP), stride_kb, stride_kt, stride_kh, stride_cb,
                       stride_ct, stride_ch, H // GROUP, Tk, Tk, c_scale, floor, GROUP, HEAD_DIM, BLOCK_D, BLOCK_T)


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


def _auto_threshold2(q, k, c, c_scale: float, scale: float, log_eps: float) -> torch.Tensor:
    """The "auto" pruning threshold (acp.threshold) in base 2, (B, H) float32, in two small kernels: chunk maxima
    of |q|^2 and |k|^2, then the bound (decoding runs it every step, so it must cost a few microseconds).

    c: the gate's prefix sums (B, Tk, H) float32, any strides, c_scale times them in base 2 (as the attention
    kernel reads them). Heads whose decay never reaches the threshold at U = 0 skip their norms (`_max_norm_rows`).
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    block_d, block_t = max(16, triton.next_power_of_2(D)), 64
    log_keys, log_eps = math.log(Tk), float(log_eps)
    q_chunks, k_chunks = triton.cdiv(Tq, block_t), triton.cdiv(Tk, block_t)
    q_sq = torch.empty(q_chunks, B * H, dtype=torch.float32, device=q.device)
    k_sq = torch.empty(k_chunks, B * Hkv, dtype=torch.float32, device=q.device)
    _max_norm_kernel[(max(q_chunks, k_chunks), B * (H + Hkv))](
        q, k, c, q_sq, k_sq, *_strides(q), *_strides(k), *c.stride(), B, H, Tq, Tk, c_scale, log_keys, log_eps,
        GROUP=H // Hkv, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_T=block_t)
    threshold2 = torch.empty(B, H, dtype=torch.float32, device=q.device)
    _auto_threshold_kernel[(B * H,)](q_sq, k_sq, threshold2, H, H // Hkv, q_chunks, k_chunks, scale, log_keys, log_eps,
                                     BLOCK_C=64)
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
