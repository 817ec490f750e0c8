"""The backward of training on Hopper GPUs (sm_90), warp-specialized in Gluon: FlashAttention-3's backward
(Shah et al., 2024) applied to forgetting attention, in one kernel where `blocked._triton_backward` uses two.

Per batch row b and query head h (kv head h // GROUP), causal, with the forward's base-2 lse2 and
delta_i = dO_i . O_i (`blocked._delta`):

    P_ij  = exp2(qk_scale q_i . k_j + c2_i - c2_j - lse2_i)      (j <= i)
    dS_ij = P_ij (dO_i . v_j - delta_i)
    dV_j  = sum_i P_ij dO_i,   dK_j = s sum_i dS_ij q_i,   dQ_i = s sum_j dS_ij k_j   (dK, dV summed over the group)
    colsum_j = sum_i dS_ij,    rowsum_i = sum_j dS_ij

exactly what `blocked._bwd_dkdv_kernel` and `blocked._bwd_dq_kernel` compute (the same relative scores,
`_relative_scores`), so the gate's gradient (`_gate_grad_kernel`) takes the sums as it takes theirs. The portable
backward recomputes P in both kernels: 7 matmul units (a unit being one causal q k^T) where FlashAttention's
backward does 5. Here a tile is 128 keys of one (batch, kv head); its program recomputes P once per 64 query
rows and adds the tile's share of dQ (and of the row sums) into float32 sums in global memory, which many tiles
update; the atomic adds are what FlashAttention-3 pays for the two saved units, and like it this kernel leaves dQ's
to the TMA unit (a reduction, `_tma_add`: one instruction per tile where pointer atomics took 32 per thread and
step, a third of the backward's time at head dim 128). One program (a CTA) holds three warp groups of 4 warps, two
consumers and one that holds the producer and the dQ writer:

    producer     1 warp: per tile, which it takes from a counter (`_take_tile`), K and V of the tile's keys, then
                 per query block (each head of the group in turn) q, dO and the rows' lse2, delta and c2, by TMA
                 into two-deep rings in shared memory
    dQ writer    2 warps: per query block, the two consumers' dQ halves from shared memory into the float32 sums
                 by TMA reductions, and their row sums by atomic adds (FlashAttention-3 gives this job to a warp
                 of its own too, so the consumers never wait on the adds)
    consumer j   4 warps, the tile's keys n0 + 64 j + [0, 64): per query block, S^T = k q^T and dP^T = v dO^T,
                 then P^T and dS^T, dV += P^T dO and dK += dS^T q (wgmma with A from registers); dS^T goes to
                 shared memory, and one block later, when the other consumer's half is there too, consumer j
                 computes that block's dQ columns [D/2 j, D/2 (j + 1)) from all 128 keys (wgmma from shared
                 memory) and hands them to the writer. Waiting for the other half at once kept the two consumers
                 in step, both on their exponentials while the tensor cores idled; a block apart they fall out of
                 phase (1-5% faster at head dim 64, even at 128: benchmarks/NOTES.md, session 17)

Only the two query blocks on the diagonal (and a last, partial one) are masked. The grid is persistent: one program
per SM takes tiles as it gets free, in an order that keeps L2 warm and ends on short tiles (`_tile_keys`). At head
dim 64 a program holds two tiles' K and V, so that the next tile's come in while the consumers finish this one (at
128 there is room for one: `_key_tiles_in_shared`), and the row and column sums of dS come from the tensor cores
too (`_sums_by_mma`). On an H200 the backward (this kernel with the delta and gate-gradient kernels around it) runs at
0.89-0.94x cuDNN's causal backward without a gate, where the two portable kernels reach 0.69-0.79x (BENCHMARKS.md).
The float32 dQ sums take twice dq's bytes, and the atomic adds arrive in no fixed order: with
torch.use_deterministic_algorithms(True) the portable backward runs instead (`usable`). It serves the same common
case as hopper.py's forward, at head dims 64 and 128; everything else takes the portable kernels.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.core import _aggregate as aggregate
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from . import hopper
from .common import LOG2E, _multiprocessors, _relative_scores, triton
from .hopper import (ONES, _aligned_rows, _descriptor, _longest_first, _one_hot, _read_tile, _sums_by_mma, _take_tile,
                     _tma_add, _tma_load, wgmma_layout)

# Query rows per step and keys per consumer (a tile is 2 * BLOCK_N keys).
BLOCK_M, BLOCK_N = 64, 64
HEAD_DIMS = (64, 128)
# Bytes of q and dO of the heads whose tiles run at the same time (`_tile_keys`), a quarter of an H100's or
# H200's 50 MB of L2. On an H200 (benchmarks/NOTES.md, session 16) two heads of 8 MiB together were 2% slower than
# one at a time at (1, 32768, 16, 64), eight of 2 MiB 3% faster than one at (4, 4096, 16, 128) and even with 24 at
# (2, 8192, 16, 64), and all heads at once (no grouping) 6-16% slower at T <= 2048.
Q_DO_IN_L2 = 12 * 2**20
# Tests turn this off to compare with the portable backward on the same inputs.
enabled = True


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor) -> bool:
    """Whether `backward` can run these: what hopper.py's forward needs (`hopper.on_hopper`), at head dim 64 or 128,
    with dO (from `blocked._delta`) laid out as TMA reads it too, and unless torch is asked for deterministic
    algorithms: the atomic adds sum dQ in whatever order the programs reach them, so dQ may differ in its last bits
    from run to run (the portable backward's sums have a fixed order). The caller checks what this kernel leaves out
    (padding, pruning)."""
    return (enabled and not torch.are_deterministic_algorithms_enabled() and hopper.on_hopper(q, k, v, do)
            and q.shape[-1] in HEAD_DIMS)


def backward(do, q, k, v, c2, lse, delta, scale):
    """dq_sum = dq / scale (B, T, H, D) float32, dk, dv in k's dtype and the gate's column and row sums of dS,
    dc_col and dc_row (B, H, T) float32, of causal forgetting attention (module docstring). The caller scales and
    rounds dq_sum into q's dtype (one pass) once it has freed what it no longer needs: that allocation is the
    backward's peak of memory. do, q (B, T, H, D); k, v (B, T, Hkv, D); c2, lse, delta (B, H, T) float32; inputs as
    `usable` accepts them."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    stride_c, c2, lse, delta = _aligned_rows(c2, lse, delta)
    dk, dv = torch.empty(k.shape, dtype=k.dtype, device=k.device), torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dq_sum = torch.zeros(B, T, H, D, dtype=torch.float32, device=q.device)
    dc_col = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    dc_row = torch.zeros(B, H, T, dtype=torch.float32, device=q.device)
    descriptors = (_descriptor(q, BLOCK_M), _descriptor(do, BLOCK_M), _descriptor(k, BLOCK_N),
                   _descriptor(v, BLOCK_N), *(_descriptor(t, BLOCK_M) for t in (lse, delta, c2)),
                   _descriptor(dq_sum, BLOCK_M, D // 2))
    n_tiles = triton.cdiv(T, 2 * BLOCK_N) * B * Hkv
    head_bytes = 2 * T * (H // Hkv) * D * q.element_size()  # q and dO of one (batch, kv head)
    heads_per_group = max(1, min(B * Hkv, Q_DO_IN_L2 // max(head_bytes, 1)))  # `_tile_keys`
    next_tile = torch.zeros(1, dtype=torch.int32, device=q.device)  # the tile counter (`_take_tile`)
    _bwd_kernel[(min(n_tiles, _multiprocessors(q.device)),)](*descriptors, c2, dk, dv, dc_col, dc_row, next_tile, T,
                                                            stride_c, H, n_tiles, heads_per_group, scale * LOG2E,
                                                            scale, GROUP=H // Hkv, HEAD_DIM=D, num_warps=4,
                                                            maxnreg=168)
    return dq_sum, dk, dv, dc_col, dc_row


@aggregate
class _Shared:
    """One program's shared memory and mbarriers. tile (2, 1) int32: the tiles the producer took (`_take_tile`), a
    two-deep ring, "ready" once written, "free" once both consumers and the writer have read it. k, v (2 KV, BN,
    D): the keys of KV tiles, consumer j's at index 2 slot + j, "ready" when loaded, "free" when both consumers are
    done with the tile. Rings of NBUF query blocks: q, do (NBUF, BM, D) and the rows' lse2, delta, c2 (NBUF, BM),
    "ready" when the producer's copies have landed, "free" when both consumers are done with them. ds (4, BN, BM):
    dS^T of both consumers, two-deep (ds_ready completes when both halves are in, ds_free when both consumers' dQ
    has read them). dq (2, BM, D/2) float32: the consumers' dQ halves, rows (6, W, BM) float32: their partial row
    sums of dS, three-deep (at head dim 128 a block's are stored with its scores, a block before its dQ), which add
    up over axis 1 (W = ONES, or 4 warps' sums: `_sums_by_mma`); dq_full completes when both consumers have handed
    theirs over, dq_free when the writer has read them. ones (ONES, BN): a one-hot column, stored K-major
    (`_one_hot`; 1 KiB, unused at head dim 128)."""
    tile: gl.shared_memory_descriptor
    k: gl.shared_memory_descriptor
    v: gl.shared_memory_descriptor
    q: gl.shared_memory_descriptor
    do: gl.shared_memory_descriptor
    lse: gl.shared_memory_descriptor
    delta: gl.shared_memory_descriptor
    c: gl.shared_memory_descriptor
    ds: gl.shared_memory_descriptor
    dq: gl.shared_memory_descriptor
    rows: gl.shared_memory_descriptor
    ones: gl.shared_memory_descriptor
    tile_ready: gl.shared_memory_descriptor
    tile_free: gl.shared_memory_descriptor
    kv_ready: gl.shared_memory_descriptor
    kv_free: gl.shared_memory_descriptor
    q_ready: gl.shared_memory_descriptor
    q_free: gl.shared_memory_descriptor
    ds_ready: gl.shared_memory_descriptor
    ds_free: gl.shared_memory_descriptor
    dq_full: gl.shared_memory_descriptor
    dq_free: gl.shared_memory_descriptor
    BM: gl.constexpr  # query rows per step
    BN: gl.constexpr  # keys per consumer
    D: gl.constexpr
    KV: gl.constexpr  # tiles of keys in shared memory
    NBUF: gl.constexpr
    S_LAYOUT: gl.constexpr  # S^T, dP^T (BN, BM) as wgmma leaves them in a consumer's 4 warps
    KV_LAYOUT: gl.constexpr  # dK, dV (BN, D)
    DQ_LAYOUT: gl.constexpr  # a consumer's dQ half (BM, D/2)
    A_LAYOUT: gl.constexpr  # P^T, dS^T as wgmma's A operand
    SUMS_LAYOUT: gl.constexpr  # a consumer's row sums (BM, ONES) and column sums (BN, ONES)
    SUMS_A_LAYOUT: gl.constexpr  # dS^T as the column sums' A operand
    SUMS_BY_MMA: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, tile, k, v, q, do, lse, delta, c, ds, dq, rows, ones, tile_ready, tile_free, kv_ready, kv_free,
                 q_ready, q_free, ds_ready, ds_free, dq_full, dq_free):
        self.tile, self.k, self.v, self.q, self.do, self.lse, self.delta, self.c = tile, k, v, q, do, lse, delta, c
        self.ds, self.dq, self.rows, self.ones = ds, dq, rows, ones
        self.tile_ready, self.tile_free, self.kv_ready, self.kv_free = tile_ready, tile_free, kv_ready, kv_free
        self.q_ready, self.q_free, self.ds_ready, self.ds_free = q_ready, q_free, ds_ready, ds_free
        self.dq_full, self.dq_free = dq_full, dq_free
        self.BM = gl.constexpr(q.type.shape[1])
        self.BN = gl.constexpr(k.type.shape[1])
        self.D = gl.constexpr(k.type.shape[2])
        self.KV = gl.constexpr(k.type.shape[0] // 2)
        self.NBUF = gl.constexpr(q.type.shape[0])
        self.S_LAYOUT = gl.constexpr(wgmma_layout(self.BM))
        self.KV_LAYOUT = gl.constexpr(wgmma_layout(self.D))
        self.DQ_LAYOUT = gl.constexpr(wgmma_layout(self.D // 2))
        self.A_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=self.KV_LAYOUT, k_width=2))
        self.SUMS_LAYOUT = gl.constexpr(wgmma_layout(ONES))
        self.SUMS_A_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=self.SUMS_LAYOUT, k_width=2))
        self.SUMS_BY_MMA = gl.constexpr(_sums_by_mma(self.D))


@gluon.constexpr_function
def _key_tiles_in_shared(head_dim):
    """Tiles of keys (K and V of 2 BN keys) a program holds: at head dim 64 two, so that the producer loads the next
    tile's while the consumers finish this one (155 KiB of shared memory); at 128 one (two would take 257 KiB)."""
    return 2 if head_dim <= 64 else 1


@gluon.jit
def _tile_keys(t, T, H, n_tiles, heads_per_group, sh: _Shared, GROUP: gl.constexpr):
    """Tile t's first key, batch row and kv head, and its number of query blocks per head, in `_longest_first`
    order over the (batch, kv head)s (a tile's first keys see the most queries), in groups of heads_per_group whose
    q and dO stay in L2 (`backward`)."""
    key_tiles = gl.cdiv(T, 2 * sh.BN)
    rank, batch_kv_head = _longest_first(t, key_tiles, n_tiles // key_tiles, heads_per_group)
    n0 = rank * 2 * sh.BN
    return n0, batch_kv_head // (H // GROUP), batch_kv_head % (H // GROUP), gl.cdiv(T - n0, sh.BM)


@gluon.jit
def _producer(sh: _Shared, descs, NEXT_TILE, T, stride_c, H, n_tiles, heads_per_group, GROUP: gl.constexpr):
    """One warp: per tile it takes, the tile's K and V, then each head's query blocks from the diagonal on into
    the rings."""
    q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, c_desc = descs
    tiles = 0
    step = 0  # query blocks loaded so far, over all tiles: the ring slot and its phase
    t = _take_tile(NEXT_TILE, tiles, sh)
    while t < n_tiles:
        n0, b, kv_head, n_steps = _tile_keys(t, T, H, n_tiles, heads_per_group, sh, GROUP)
        kv = tiles % sh.KV
        mbarrier.wait(sh.kv_free.index(kv), ((tiles // sh.KV) & 1) ^ 1)
        mbarrier.expect(sh.kv_ready.index(kv), 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
        for j in gl.static_range(2):
            _tma_load(k_desc, [b * T + n0 + j * sh.BN, kv_head * sh.D], sh.kv_ready.index(kv), sh.k.index(2 * kv + j))
            _tma_load(v_desc, [b * T + n0 + j * sh.BN, kv_head * sh.D], sh.kv_ready.index(kv), sh.v.index(2 * kv + j))
        for g in range(GROUP):
            h = kv_head * GROUP + g
            for i in range(n_steps):
                slot = step % sh.NBUF
                m0 = n0 + i * sh.BM
                mbarrier.wait(sh.q_free.index(slot), ((step // sh.NBUF) & 1) ^ 1)
                mbarrier.expect(sh.q_ready.index(slot), 2 * q_desc.block_type.nbytes + 3 * c_desc.block_type.nbytes)
                _tma_load(q_desc, [b * T + m0, h * sh.D], sh.q_ready.index(slot), sh.q.index(slot))
                _tma_load(do_desc, [b * T + m0, h * sh.D], sh.q_ready.index(slot), sh.do.index(slot))
                row = (b * H + h) * stride_c + m0
                _tma_load(lse_desc, [row], sh.q_ready.index(slot), sh.lse.index(slot))
                _tma_load(delta_desc, [row], sh.q_ready.index(slot), sh.delta.index(slot))
                _tma_load(c_desc, [row], sh.q_ready.index(slot), sh.c.index(slot))
                step += 1
        tiles += 1
        t = _take_tile(NEXT_TILE, tiles, sh)


@gluon.jit
def _scores(step, m0, kv, keys, c_k, c_ref, dk, dv, dc, qk_scale, T, sh: _Shared, j: gl.constexpr, MASK: gl.constexpr):
    """The first half of consumer j's work on one query block (rows m0 + [0, BM), ring position step) against its
    keys in key slot kv: S^T and dP^T, then P^T and dS^T; dV += P^T dO and dK += dS^T q (and the column sums of dS)
    issued, and dS^T stored for `_dq`, which the consumer runs one step later, so that the two consumers need not
    wait for each other's dS^T at once and drift apart: one's softmax then runs under the other's matmuls. Returns
    dk, dv, dc, in flight."""
    s_layout: gl.constexpr = sh.S_LAYOUT
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)  # a query row's vector
    slot = step % sh.NBUF
    mbarrier.wait(sh.q_ready.index(slot), (step // sh.NBUF) & 1)
    q, do = sh.q.index(slot), sh.do.index(slot)
    zero = gl.zeros([sh.BN, sh.BM], gl.float32, layout=s_layout)
    s_t = warpgroup_mma(sh.k.index(2 * kv + j), q.permute((1, 0)), zero, use_acc=False, is_async=True)
    dp_t = warpgroup_mma(sh.v.index(2 * kv + j), do.permute((1, 0)), zero, use_acc=False, is_async=True)
    s_t, dp_t = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, dp_t))
    lse = sh.lse.index(slot).load(col_layout)
    delta = sh.delta.index(slot).load(col_layout)
    c_q = sh.c.index(slot).load(col_layout)
    t = _relative_scores(s_t, c_k[:, None], c_ref, qk_scale)
    if MASK:  # the diagonal, and rows past the sequence's end
        queries = m0 + gl.arange(0, sh.BM, layout=col_layout)
        t = gl.where((keys[:, None] <= queries[None, :]) & (queries < T)[None, :], t, float("-inf"))
    p_t = gl.exp2(t - (lse - (c_q - c_ref))[None, :])
    ds_t = p_t * (dp_t - delta[None, :])
    dv = warpgroup_mma(gl.convert_layout(p_t.to(sh.q.dtype), sh.A_LAYOUT), do, dv, is_async=True)
    ds_16 = ds_t.to(sh.q.dtype)  # what dK, dQ (and at head dim 64 the sums) take
    ds_a = gl.convert_layout(ds_16, sh.A_LAYOUT)
    dk = warpgroup_mma(ds_a, q, dk, is_async=True)
    # With `_sums_by_mma` both sums are of dS rounded to 16 bits, as dK and dQ take it: the gate's gradient needs
    # the two to be sums of the same numbers (__init__.py). The column sums here, the row sums in `_dq`.
    if sh.SUMS_BY_MMA:
        dc = warpgroup_mma(gl.convert_layout(ds_a, sh.SUMS_A_LAYOUT), sh.ones.permute((1, 0)), dc, is_async=True)
    else:  # the row sums over each warp's 16 keys, which the writer adds up: no warp waits here for the others
        dc += gl.sum(ds_t, 1)
        sh.rows.index(2 * (step % 3) + j).store(gl.sum(gl.reshape(ds_t, [4, sh.BN // 4, sh.BM]), 1))
    ds_buffer = step % 2
    mbarrier.wait(sh.ds_free.index(ds_buffer), ((step // 2) & 1) ^ 1)  # both consumers' dQ two steps back are done
    sh.ds.index(2 * ds_buffer + j).store(ds_16)
    fence_async_shared()
    mbarrier.arrive(sh.ds_ready.index(ds_buffer), count=1)
    return dk, dv, dc


@gluon.jit
def _wait_kv(dk, dv, dc, sh: _Shared):
    """dk, dv and the column sums dc (a matmul's, with `_sums_by_mma`), landed."""
    if sh.SUMS_BY_MMA:
        dk, dv, dc = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, dc))
    else:
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
    return dk, dv, dc


@gluon.jit
def _dq(step, kv, dk, dv, dc, sh: _Shared, j: gl.constexpr):
    """The second half of consumer j's work on the query block at ring position step, a step after `_scores`:
    its columns [D/2 j, D/2 (j + 1)) of dQ = dS k from both consumers' dS^T over all 2 BN keys (and with
    `_sums_by_mma` the block's row sums of this consumer's dS) to the writer. Waits for every matmul in flight, also
    dk, dv, dc of the block after this one, and returns them."""
    ds_buffer = step % 2
    mbarrier.wait(sh.ds_ready.index(ds_buffer), (step // 2) & 1)
    DH: gl.constexpr = sh.D // 2
    dq = warpgroup_mma(sh.ds.index(2 * ds_buffer).permute((1, 0)), sh.k.index(2 * kv).slice(j * DH, DH, dim=1),
                       gl.zeros([sh.BM, DH], gl.float32, layout=sh.DQ_LAYOUT), use_acc=False, is_async=True)
    dq = warpgroup_mma(sh.ds.index(2 * ds_buffer + 1).permute((1, 0)), sh.k.index(2 * kv + 1).slice(j * DH, DH, dim=1),
                       dq, is_async=True)
    if sh.SUMS_BY_MMA:
        rows = warpgroup_mma(sh.ds.index(2 * ds_buffer + j).permute((1, 0)), sh.ones.permute((1, 0)),
                             gl.zeros([sh.BM, ONES], gl.float32, layout=sh.SUMS_LAYOUT), use_acc=False, is_async=True)
        dq, rows, dk, dv, dc = warpgroup_mma_wait(num_outstanding=0, deps=(dq, rows, dk, dv, dc))
        sh.rows.index(2 * (step % 3) + j).permute((1, 0)).store(rows)
    else:
        dq, dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dk, dv))
    mbarrier.arrive(sh.ds_free.index(ds_buffer), count=1)
    mbarrier.wait(sh.dq_free, (step & 1) ^ 1)  # the writer's copy has read the last block's
    sh.dq.index(j).store(dq)
    fence_async_shared()  # before the TMA reads it
    mbarrier.arrive(sh.dq_full, count=1)
    return dk, dv, dc


@gluon.jit
def _query_block(step, m0, kv, keys, c_k, c_ref, dk, dv, dc, qk_scale, T, sh: _Shared, j: gl.constexpr,
                 MASK: gl.constexpr):
    """Consumer j's step at ring position step: this query block's `_scores`, then the previous one's `_dq`; the
    block's ring slot is free once its dV and dK matmuls are done."""
    dk, dv, dc = _scores(step, m0, kv, keys, c_k, c_ref, dk, dv, dc, qk_scale, T, sh, j, MASK)
    dk, dv, dc = _dq(step - 1, kv, dk, dv, dc, sh, j)
    mbarrier.arrive(sh.q_free.index(step % sh.NBUF), count=1)
    return dk, dv, dc


@gluon.jit
def _key_tile(t, tiles, step, C, DK, DV, DC_COL, T, stride_c, H, n_tiles, heads_per_group, qk_scale, sm_scale,
              sh: _Shared, j: gl.constexpr, GROUP: gl.constexpr):
    """Consumer j's part of tile t (the program's tiles-th; its first query block at ring position step): keys
    n0 + BN j + [0, BN) against every query block of every head of the group. Writes their dK, dV and, per head,
    the column sums of dS; returns the ring position after the tile."""
    n0, b, kv_head, n_steps = _tile_keys(t, T, H, n_tiles, heads_per_group, sh, GROUP)
    n_diagonal = gl.minimum(n_steps, 2 * sh.BN // sh.BM)
    n_full = gl.maximum(n_diagonal, (T - n0) // sh.BM)  # query blocks that end at or before T
    row_layout: gl.constexpr = gl.SliceLayout(1, sh.S_LAYOUT)
    first = n0 + j * sh.BN
    keys = first + gl.arange(0, sh.BN, layout=row_layout)
    sum_keys = first + gl.arange(0, sh.BN, layout=gl.SliceLayout(1, sh.SUMS_LAYOUT))
    dk = gl.zeros([sh.BN, sh.D], gl.float32, layout=sh.KV_LAYOUT)
    dv = gl.zeros([sh.BN, sh.D], gl.float32, layout=sh.KV_LAYOUT)
    kv = tiles % sh.KV
    mbarrier.wait(sh.kv_ready.index(kv), (tiles // sh.KV) & 1)
    for g in range(GROUP):
        bh = b * H + kv_head * GROUP + g
        c_k = gl.load(C + bh * stride_c + keys, mask=keys < T, other=0.0)
        c_ref = gl.load(C + bh * stride_c + gl.minimum(first, T - 1))  # the group's first key, as the portable
        if sh.SUMS_BY_MMA:
            dc = gl.zeros([sh.BN, ONES], gl.float32, layout=sh.SUMS_LAYOUT)  # column sums of dS in column 0
        else:
            dc = gl.zeros([sh.BN], gl.float32, layout=row_layout)
        # Masked: the two query blocks on the diagonal and a last one that runs past T; the others are not. Three
        # loops, not a runtime `if` in one: that gave wrong gradients with Triton 3.6 (benchmarks/NOTES.md).
        # The head's first block: its scores alone, waited for (the loops carry dk, dv landed).
        dk, dv, dc = _wait_kv(*_scores(step, n0, kv, keys, c_k, c_ref, dk, dv, dc, qk_scale, T, sh, j, True), sh)
        mbarrier.arrive(sh.q_free.index(step % sh.NBUF), count=1)
        for i in range(1, n_diagonal):
            dk, dv, dc = _query_block(step + i, n0 + i * sh.BM, kv, keys, c_k, c_ref, dk, dv, dc, qk_scale, T, sh, j,
                                      True)
        for i in range(n_diagonal, n_full):
            dk, dv, dc = _query_block(step + i, n0 + i * sh.BM, kv, keys, c_k, c_ref, dk, dv, dc, qk_scale, T, sh, j,
                                      False)
        for i in range(n_full, n_steps):
            dk, dv, dc = _query_block(step + i, n0 + i * sh.BM, kv, keys, c_k, c_ref, dk, dv, dc, qk_scale, T, sh, j,
                                      True)
        dk, dv, dc = _dq(step + n_steps - 1, kv, dk, dv, dc, sh, j)  # the head's last block's
        step += n_steps
        if sh.SUMS_BY_MMA:
            gl.store(DC_COL + bh * T + sum_keys, gl.sum(dc, 1), mask=sum_keys < T)
        else:
            gl.store(DC_COL + bh * T + keys, dc, mask=keys < T)
    mbarrier.arrive(sh.kv_free.index(kv), count=1)  # the last block's matmuls are done with K and V
    out_rows = first + gl.arange(0, sh.BN, layout=gl.SliceLayout(1, sh.KV_LAYOUT))
    out_cols = gl.arange(0, sh.D, layout=gl.SliceLayout(0, sh.KV_LAYOUT))
    offsets = (b * T + out_rows).to(gl.int64)[:, None] * (H // GROUP * sh.D) + kv_head * sh.D + out_cols[None, :]
    mask = (out_rows < T)[:, None]
    gl.store(DK + offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    gl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=mask)
    return step


@gluon.jit
def _consumer(j: gl.constexpr, C, DK, DV, DC_COL, T, stride_c, H, n_tiles, heads_per_group, qk_scale, sm_scale,
              sh: _Shared, GROUP: gl.constexpr):
    """Warp group j: its half of the keys of every tile the program takes (`_key_tile`)."""
    gl.static_assert(sh.BM == sh.BN, "sh.ones serves both sums")
    tiles = 0
    step = 0
    t = _read_tile(tiles, sh)
    while t < n_tiles:
        step = _key_tile(t, tiles, step, C, DK, DV, DC_COL, T, stride_c, H, n_tiles, heads_per_group, qk_scale,
                         sm_scale, sh, j, GROUP)
        tiles += 1
        t = _read_tile(tiles, sh)


@gluon.jit
def _consumer_0(C, DK, DV, DC_COL, T, stride_c, H, n_tiles, heads_per_group, qk_scale, sm_scale, sh: _Shared,
                GROUP: gl.constexpr):
    _consumer(0, C, DK, DV, DC_COL, T, stride_c, H, n_tiles, heads_per_group, qk_scale, sm_scale, sh, GROUP)


@gluon.jit
def _consumer_1(C, DK, DV, DC_COL, T, stride_c, H, n_tiles, heads_per_group, qk_scale, sm_scale, sh: _Shared,
                GROUP: gl.constexpr):
    _consumer(1, C, DK, DV, DC_COL, T, stride_c, H, n_tiles, heads_per_group, qk_scale, sm_scale, sh, GROUP)


@gluon.jit
def _dq_writer(dq_desc, DC_ROW, T, H, n_tiles, heads_per_group, sh: _Shared, GROUP: gl.constexpr):
    """Two warps: each query block's dQ / s (the consumers' halves) into dq_desc's (B T, H D) float32 sums by TMA
    reductions, and its row sums of dS (the consumers' 8 warps' sums) into DC_ROW (B, H, T) by atomic adds, rows
    below T only. A block that runs past its sequence's end adds its rows past T, which are exact zeros (P is 0
    there), into the next sequence's first rows, and the TMA drops those past the tensor's end."""
    PARTS: gl.constexpr = sh.rows.type.shape[1]
    sums_layout: gl.constexpr = gl.BlockedLayout([PARTS, 1], [1, 32], [1, gl.num_warps()], [1, 0])  # a row each
    sum_rows = gl.arange(0, sh.BM, layout=gl.SliceLayout(0, sums_layout))
    tiles = 0
    step = 0
    t = _read_tile(tiles, sh)
    while t < n_tiles:
        n0, b, kv_head, n_steps = _tile_keys(t, T, H, n_tiles, heads_per_group, sh, GROUP)
        for g in range(GROUP):
            h = kv_head * GROUP + g
            for i in range(n_steps):
                m0 = n0 + i * sh.BM
                mbarrier.wait(sh.dq_full, step & 1)
                for j in gl.static_range(2):
                    _tma_add(dq_desc, [b * T + m0, h * sh.D + j * (sh.D // 2)], sh.dq.index(j))
                buffer = 2 * (step % 3)
                sums = sh.rows.index(buffer).load(sums_layout) + sh.rows.index(buffer + 1).load(sums_layout)
                gl.atomic_add(DC_ROW + (b * H + h) * T + m0 + sum_rows, gl.sum(sums, 0), mask=m0 + sum_rows < T,
                              sem="relaxed")
                tma.store_wait(0)  # the copies have read sh.dq
                mbarrier.arrive(sh.dq_free, count=1)
                step += 1
        tiles += 1
        t = _read_tile(tiles, sh)


@gluon.jit
def _bwd_kernel(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, c_desc, dq_desc, C, DK, DV, DC_COL, DC_ROW,
                NEXT_TILE, T, stride_c, H, n_tiles, heads_per_group, qk_scale, sm_scale, GROUP: gl.constexpr,
                HEAD_DIM: gl.constexpr):
    """The backward of the module docstring, persistent: each program takes tiles of 2 BN keys of one (batch, kv
    head), numbered kv-head-major (`_tile_keys`), from the counter NEXT_TILE (int32, zeroed by the caller) until all
    n_tiles are taken. dK, dV (B, T, Hkv, D) and DC_COL (B, H, T) written, dQ / s (dq_desc, B T x H D) and DC_ROW
    (B, H, T) float32 added to (zeroed by the caller). q, dO, k, v, dQ / s through (B * T, heads * D) TMA
    descriptors; C, lse2, delta (B, H, stride_c) with stride_c >= T a multiple of 4 (C also read directly)."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    KV: gl.constexpr = _key_tiles_in_shared(HEAD_DIM)
    NBUF: gl.constexpr = 2
    dtype: gl.constexpr = q_desc.dtype
    barrier: gl.constexpr = mbarrier.MBarrierLayout()
    vector: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    sh = _Shared(gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0])),
                 gl.allocate_shared_memory(dtype, [2 * KV, BN, HEAD_DIM], k_desc.layout),
                 gl.allocate_shared_memory(dtype, [2 * KV, BN, HEAD_DIM], v_desc.layout),
                 gl.allocate_shared_memory(dtype, [NBUF, BM, HEAD_DIM], q_desc.layout),
                 gl.allocate_shared_memory(dtype, [NBUF, BM, HEAD_DIM], do_desc.layout),
                 gl.allocate_shared_memory(gl.float32, [NBUF, BM], lse_desc.layout),
                 gl.allocate_shared_memory(gl.float32, [NBUF, BM], delta_desc.layout),
                 gl.allocate_shared_memory(gl.float32, [NBUF, BM], c_desc.layout),
                 gl.allocate_shared_memory(dtype, [4, BN, BM], gl.NVMMASharedLayout.get_default_for([BN, BM], dtype)),
                 gl.allocate_shared_memory(gl.float32, [2, BM, HEAD_DIM // 2], dq_desc.layout),
                 gl.allocate_shared_memory(gl.float32, [6, ONES if _sums_by_mma(HEAD_DIM) else 4, BM], vector),
                 _one_hot(BN, dtype),
                 gl.allocate_shared_memory(gl.int64, [2, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [2, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [KV, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [KV, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [NBUF, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [NBUF, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [2, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [2, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [1], barrier), gl.allocate_shared_memory(gl.int64, [1], barrier))
    for i in gl.static_range(2):
        mbarrier.init(sh.tile_ready.index(i), count=1)
        mbarrier.init(sh.tile_free.index(i), count=3)  # both consumers and the writer
    for i in gl.static_range(KV):
        mbarrier.init(sh.kv_ready.index(i), count=1)
        mbarrier.init(sh.kv_free.index(i), count=2)
    for i in gl.static_range(NBUF):
        mbarrier.init(sh.q_ready.index(i), count=1)
        mbarrier.init(sh.q_free.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(sh.ds_ready.index(i), count=2)
        mbarrier.init(sh.ds_free.index(i), count=2)
    mbarrier.init(sh.dq_full, count=2)
    mbarrier.init(sh.dq_free, count=1)
    # Registers per thread: 32 for the producer's and the writer's warp group, 240 for each consumer's (dK and dV
    # (64 x D float32), S^T and dP^T).
    consumer_args = (C, DK, DV, DC_COL, T, stride_c, H, n_tiles, heads_per_group, qk_scale, sm_scale, sh, GROUP)
    gl.warp_specialize([(_consumer_0, consumer_args),
                        (_producer, (sh, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, c_desc), NEXT_TILE,
                                     T, stride_c, H, n_tiles, heads_per_group, GROUP)),
                        (_dq_writer, (dq_desc, DC_ROW, T, H, n_tiles, heads_per_group, sh, GROUP)),
                        (_consumer_1, consumer_args)],
                       [1, 2, 4], [32, 32, 240])
