"""The split-key forward: decoding (a few query rows against a long cache) and short chunked prefill. Rows of one
kv head's GQA group are packed into a tile and the keys are split across programs; the splits are merged by the
last program of a tile to finish, or by `_combine_kernel` for tall tiles. Forward only: its backward is the blocked
kernels' (blocked.py)."""

from __future__ import annotations

import dataclasses

import torch

from .common import LOG2E, _common_meta, _initial_max, _jit, _launch, _load_tile, _load_vec, _mask_scores, \
    _multiprocessors, _online_softmax_step, _or, _strides, tl, triton

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
# Warps per 16 rows of a tile, up to the configuration's count. A 16-row tile spreads its key columns over the warps,
# so every row max and row sum of the online softmax is a reduction across warps through shared memory, with a
# barrier. At 2 warps instead of 4, one query of 16 heads against 4,096 keys took 10.6 instead of 12.0 us on an H200,
# and no other decoding shape lost more than 2% (benchmarks/NOTES.md, session 19).
_WARPS_PER_16_ROWS = 2
_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}


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
def _split_inner(acc, l_i, m_i, q, c_q, q_pos, key_lo, delta, K, V, C, c_rows, stride_kt, stride_vt, stride_ct,
                 stride_ch, Tk, qk_scale, c_scale, start, end, offs_n, offs_d,
                 CAUSAL: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 C_HEADS: tl.constexpr):
    """Online softmax of packed rows (each its own head's prefix sums, C + c_rows[r] + key * stride_ct, scaled to
    base 2 by c_scale after the difference) over key blocks [start, end). Only CAUSAL blocks can run past Tk.
    C_HEADS says how a key block's c reach the rows: 1 (GROUP 1, every row the same head; c_rows is one offset):
    one load per key, broadcast to the rows; GROUP (a power of two <= BLOCK_M; c_rows is the group's first head):
    a (GROUP, BLOCK_N) load, each head's row repeated down the tile (row r is head r % GROUP); 0: one load per row
    and key."""
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        k = _load_tile(K + keys[:, None] * stride_kt + offs_d[None, :], keys, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL)
        if C_HEADS == 1:
            c_k = _load_vec(C + c_rows + keys * stride_ct, keys, Tk, 0.0, CAUSAL)[None, :]
        elif C_HEADS > 1:
            c_ptrs = C + c_rows + tl.arange(0, C_HEADS)[:, None] * stride_ch + keys[None, :] * stride_ct
            if CAUSAL:
                c_g = tl.load(c_ptrs, mask=keys[None, :] < Tk, other=0.0)
            else:
                c_g = tl.load(c_ptrs)
            c_k = tl.reshape(tl.broadcast_to(c_g[None, :, :], (BLOCK_M // C_HEADS, C_HEADS, BLOCK_N)),
                             (BLOCK_M, BLOCK_N))
        elif CAUSAL:
            c_k = tl.load(C + c_rows[:, None] + keys[None, :] * stride_ct, mask=keys[None, :] < Tk, other=0.0)
        else:
            c_k = tl.load(C + c_rows[:, None] + keys[None, :] * stride_ct)
        decay = (c_q[:, None] - c_k) * c_scale
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + decay
        s = _mask_scores(s, decay, delta[:, None], q_pos[:, None], keys[None, :], key_lo[:, None], CAUSAL, MASK_LO,
                         PRUNE)
        v = _load_tile(V + keys[:, None] * stride_vt + offs_d[None, :], keys, Tk, offs_d, HEAD_DIM, BLOCK_D, CAUSAL)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, s, tl.zeros_like(l_i), v, DOT_PRECISION)
    return acc, l_i, m_i


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
def _store_split(O, LSE, O_PART, LSE_PART, COUNTER, o, lse, split, row_tile, num_splits, bhk, n_bhk, b, hk, t, h, rows,
                 r_start, n_rows, valid, offs_d, stride_ob, stride_ot, stride_oh, H, Tq, GROUP: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                 COMBINE_ROWS: tl.constexpr, LAST_MERGES: tl.constexpr):
    """A split program's result: O and the lse when there is one split; else its partial (o, lse) into O_PART and
    LSE_PART, and with LAST_MERGES, if it is the last of its tile to finish, the merge of the tile's splits."""
    if num_splits == 1:
        _store_rows(O, LSE, o, lse, b, t, h, valid, offs_d, stride_ob, stride_ot, stride_oh, H, Tq, HEAD_DIM)
    else:
        part = (split * n_bhk + bhk) * n_rows + rows  # O_PART: (splits, B * Hkv, GROUP * Tq, D)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM))
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
def _fwd_split_kernel(Q, K, V, C, KEY_LO, DELTA, O, LSE, O_PART, LSE_PART, COUNTER,
                      stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                      stride_vb, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
                      stride_ob, stride_ot, stride_oh, stride_lob, stride_lot,
                      H, Tq, Tk, qk_scale, c_scale, keys_per_split,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_LO: tl.constexpr, PRUNE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, COMBINE_ROWS: tl.constexpr,
                      LAST_MERGES: tl.constexpr, C_HEADS: tl.constexpr):
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
    if C_HEADS > 0:  # the group's c are loaded once per head and key, not once per row
        c_keys = b * stride_cb + hk * GROUP * stride_ch
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
                                 stride_ct, stride_ch, Tk, qk_scale, c_scale, start, mid, offs_n, offs_d, False,
                                 MASK_LO, PRUNE, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PRECISION, C_HEADS)
    acc, l_i, m_i = _split_inner(acc, l_i, m_i, q, c_q, q_pos, key_lo, delta, K, V, C, c_keys, stride_kt, stride_vt,
                                 stride_ct, stride_ch, Tk, qk_scale, c_scale, mid, end, offs_n, offs_d, True, MASK_LO,
                                 PRUNE, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PRECISION, C_HEADS)

    # A row with no visible key has l = 0: it returns 0 (weight 0 among splits), and a finite lse.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    _store_split(O, LSE, O_PART, LSE_PART, COUNTER, acc / l_safe[:, None], m_i + tl.log2(l_safe), split, row_tile,
                 num_splits, bhk, n_bhk, b, hk, t, h, rows, r_start, n_rows, valid, offs_d, stride_ob, stride_ot,
                 stride_oh, H, Tq, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_S, COMBINE_ROWS, LAST_MERGES)


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
        cfg = dataclasses.replace(cfg, num_warps=min(cfg.num_warps, _WARPS_PER_16_ROWS * block_m // 16))
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
            BLOCK_S=block_s, COMBINE_ROWS=combine_rows, LAST_MERGES=last_merges,
            C_HEADS=_gate_heads_per_load(meta["GROUP"], block_m), **cfg.options(q.device, meta["PRUNE"]), **meta)
        if splits > 1 and not last_merges:
            _combine_kernel[(triton.cdiv(n_rows, combine_rows), B * Hkv)](
                o_part, lse_part, o, lse, *o.stride()[:3], H, Tq, splits, GROUP=meta["GROUP"], HEAD_DIM=D,
                BLOCK_D=meta["BLOCK_D"], BLOCK_S=block_s, COMBINE_ROWS=combine_rows)

    _launch("decode", q, meta["BLOCK_D"], launch)
    return o, lse


def _gate_heads_per_load(group: int, block_m: int) -> int:
    """The split kernel's C_HEADS: load each key's c once per head of the group and repeat it down the tile where
    the group is a power of two that divides the tile (rows r and r + GROUP are one head), else once per row (0)."""
    if group == 1 or (group & (group - 1) == 0 and group <= block_m):
        return group
    return 0


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
