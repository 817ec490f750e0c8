"""The forward of training and prefill on Hopper GPUs (sm_90), warp-specialized in Gluon, Triton's lower-level
language: FlashAttention-3's division of work (Shah et al., 2024, "FlashAttention-3: Fast and Accurate Attention with
Asynchrony and Low-precision") applied to forgetting attention.

Per batch row b and query head h (kv head h // GROUP), q, k, v (T, D), base-2 prefix sums c2 (T,), causal:

    s2_ij = qk_scale q_i . k_j + (c2_i - c2_j)   (j <= i),    O_i = sum_j exp2(s2_ij - lse2_i) v_j,
    lse2_i = log2 sum_j exp2(s2_ij)

exactly what `blocked._fwd_kernel` computes (and the same relative scores, `_relative_scores`, and online softmax,
`_softmax_weights`), with O (B, T, H, D) and lse2 (B, H, T) laid out as it lays them out, so its backward takes over.
What differs is how a GPU's streaming multiprocessor (SM) spends its time. One program (a CTA) holds three warp
groups of 4 warps:

    producer     1 warp (of its group): TMA copies of the query tile (128 rows; at head dim 64 into one of two
                 buffers), then of each key block's K (with its c2) and V (128 keys) into two-deep rings in shared
                 memory, as soon as both consumers have released a slot
    consumer 0   4 warps: query rows [0, 64) of the tile
    consumer 1   4 warps: rows [64, 128)

A consumer runs the key blocks from the diagonal backwards. In each it issues S = q k^T for this block and
P v for the previous one as asynchronous warp-group matmuls (wgmma), then does this block's softmax while P v is
still on the tensor cores. The two consumers take turns issuing (a ping-pong through two mbarriers), so one's
softmax runs under the other's matmuls. Only the diagonal block is masked. At head dim 64 the matmuls take half
as long and the softmax's own instructions set the pace, so there the softmax's row sums l = sum_j P_ij move to
the tensor cores too, as one more narrow matmul with P (`_sums_by_mma`), and each tile's O leaves through shared
memory by one TMA store (`_o_by_tma`). The grid is persistent: one program per SM takes tiles from a counter
as it gets free (`_take_tile`), so the producer already loads the next tile while the consumers finish this one
(the portable kernels get no such overlap from Triton 3.6 for sm_90), in an order that keeps K and V in L2: the
(batch, head)s go in groups whose K and V fit in a share of it (`KV_IN_L2`), and within a group the longest tiles
go first (`_longest_first`).

On an H200 this forward reaches 0.99-1.05x the speed of cuDNN's causal attention without a gate at head dim 128
and 0.90-1.01x at 64, where `blocked._fwd_kernel` reaches 0.78-0.88x (BENCHMARKS.md). It serves the common case
only: 16-bit q, k, v of head dim 64 or 128 laid out as TMA can read them, Tq == Tk, no padding, no pruning, no
fused output norm (`usable`); everything else, and every other GPU, takes the portable kernels.
"""

import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.core import _aggregate as aggregate  # Triton >= 3.9 also names it gluon.aggregate
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language._core import builtin
from triton._C.libtriton import ir

from .common import LOG2E, _multiprocessors, _relative_scores, _softmax_weights, _tma_layout_ok, triton

# Triton 3.9 renamed the TMA load and store (async_copy_global_to_shared, async_copy_shared_to_global); both names
# take the same arguments.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@builtin
def _tma_add_36(desc, coord, src, _semantic=None):
    """Triton 3.6's missing `tma.async_atomic_add` (its builder has the operation)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, coord, src.handle)


# A TMA reduction: adds a tile of shared memory into global memory at desc's coordinates, asynchronously.
_tma_add = getattr(tma, "async_atomic_add", None) or _tma_add_36

# Query rows per consumer warp group and keys per block: with two-deep K and V rings the 2 x 64 query rows fill
# 160 KiB of shared memory at D = 128, and the 12 warps take the whole register file (`_fwd_kernel`), one program
# per SM.
BLOCK_M, BLOCK_N = 64, 128
HEAD_DIMS = (64, 128)
# Bytes of K and V of the heads whose tiles run at the same time (`_heads_per_group`). Dealt all heads at once, a
# round of programs ran more heads than L2 holds and each tile read its head's keys from HBM again: on an H200
# (benchmarks/NOTES.md, session 18) groups within 32 MiB made the forward 2-8% faster at the five shapes of
# BENCHMARKS.md (7% at (8, 2048, 32, 64)), groups of 4 or 12 MiB up to 4% less so. Where one round's heads fit
# anyway (T = 512 and 16 heads: 132 x 128 KiB) groups cost 4-13%, so there the heads stay ungrouped.
KV_IN_L2 = 32 * 2**20
# Columns of a row-sum matmul: the narrowest wgmma (N = 8).
ONES = gl.constexpr(8)
# Tests turn this off to compare with the portable forward on the same inputs.
enabled = True


def on_hopper(q: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the Gluon kernels (this forward, hopper_backward.py's backward) can read these (B, T, heads, D)
    tensors: on an sm_90 GPU (not the interpreter), bf16 or fp16 throughout, the same number of positions, and each
    one (B * T, heads * D) matrix for TMA (`_tma_layout_ok`)."""
    return (q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(q.device) == (9, 0)
            and q.dtype in (torch.bfloat16, torch.float16) and all(t.dtype == q.dtype for t in others)
            and all(t.shape[1] == q.shape[1] for t in others) and _tma_layout_ok(q, *others))


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `forward` can run these: `on_hopper`, at head dim 64 or 128. The caller checks what this kernel
    leaves out (padding, pruning, the output norm)."""
    return enabled and on_hopper(q, k, v) and q.shape[-1] in HEAD_DIMS


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c2: torch.Tensor, scale: float):
    """O (B, T, H, D) in q's dtype and the base-2 lse (B, H, T) float32 of causal forgetting attention; c2 (B, H, T)
    float32 contiguous, the base-2 prefix sums of the gate (`blocked._base2_prefix_sums`; copied to rows of a
    multiple of 4 floats when T is not one); k, v may have fewer heads (GQA). Inputs as `usable` accepts them."""
    B, T, H, D = q.shape
    stride_c, c2 = _aligned_rows(c2)
    o = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    n_tiles = triton.cdiv(T, 2 * BLOCK_M) * B * H
    programs = min(n_tiles, _multiprocessors(q.device))
    descriptors = (_descriptor(q, BLOCK_M), _descriptor(k, BLOCK_N), _descriptor(v, BLOCK_N), _descriptor(c2, BLOCK_N),
                   _descriptor(o, BLOCK_M))
    group = H // k.shape[2]
    heads_per_group = _heads_per_group(B * H, programs, 2 * T * D * k.element_size(), group)
    next_tile = torch.zeros(1, dtype=torch.int32, device=q.device)  # the tile counter (`_take_tile`)
    _fwd_kernel[(programs,)](*descriptors, c2, o, lse, next_tile, T, stride_c, H, B * H, heads_per_group,
                             scale * LOG2E, GROUP=group, HEAD_DIM=D, num_warps=4, maxnreg=168)
    return o, lse


def _heads_per_group(heads: int, programs: int, kv_bytes: int, group: int) -> int:
    """How many of the `heads` (batch, query head)s the programs work on at a time (`_longest_first`), when a kv
    head's K and V take kv_bytes and `group` query heads share it: all of them where the heads of one round of
    `programs` tiles fit in KV_IN_L2 anyway, else as many as fit there, whole kv heads (at least one)."""
    if min(heads, programs) * kv_bytes <= KV_IN_L2 * group:
        return heads
    return min(heads, max(1, KV_IN_L2 // kv_bytes) * group)


def _aligned_rows(*vectors: torch.Tensor):
    """(B, H, T) float32 tensors as TMA reads their rows, each from a 16-byte-aligned start: the row stride (T
    rounded up to 4 floats) and the tensors, contiguous, zero-padded to it where T is not a multiple of 4."""
    T = vectors[0].shape[-1]
    stride = triton.cdiv(T, 4) * 4
    return stride, *(torch.nn.functional.pad(t, (0, stride - T)) if stride != T else t.contiguous() for t in vectors)


def _descriptor(t: torch.Tensor, block_rows: int, block_cols: int = 0):
    """A TMA descriptor over t (B, T, heads, D) as the (B * T, heads * D) matrix, in (block_rows, block_cols or D)
    tiles; over c2 (B, H, T') as one vector of B * H * T' floats, in block_rows pieces."""
    if t.dim() == 3:
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
        return TensorDescriptor(t, [t.numel()], [1], [block_rows], layout)
    B, T, heads, D = t.shape
    block = [block_rows, block_cols or D]
    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[t.dtype]
    return TensorDescriptor(t, [B * T, heads * D], [t.stride(1), 1], block,
                            gl.NVMMASharedLayout.get_default_for(block, dtype))


# --------------------------------------------------------------------------------------------------
# The kernel: the program's shared state, the tile order, the producer, the consumers.
# --------------------------------------------------------------------------------------------------


@gluon.constexpr_function
def _sums_by_mma(head_dim):
    """Whether the consumers sum a 16-bit tile over one axis (P's rows here; dS's rows and columns in
    hopper_backward.py) by the tensor cores, as products with a one-hot column (`_one_hot`; column 0 of the
    (64, ONES) result holds the sums), rather than in registers: an add per element and shuffles between threads.
    At head dim 64 the consumers' instructions, not the matmuls, set the pace and registers are to spare: there the
    narrow matmul makes this forward 5-14% faster on an H200 (benchmarks/NOTES.md, session 14) and the backward
    ~4%. At head dim 128 its accumulator makes the consumers spill: the forward 4-7% slower, the backward 1-4%.
    The sums are then of the rounded tile, the very numbers that the other matmuls take."""
    return head_dim <= 64


@gluon.constexpr_function
def _o_by_tma(head_dim):
    """Whether the consumers' O tiles leave through shared memory by TMA (one asynchronous copy each) rather than
    as stores from registers, 4 bytes per thread and instruction, which kept a tile's epilogue ~1,000 cycles longer
    (clock stamps on an H200; benchmarks/NOTES.md, session 15): at head dim 64 3% faster at (8, 2048, 32, 64), 7%
    at (32, 512, 16, 64), even at (1, 32768, 16, 64), where tiles are few. At 128 the two (64, 128) buffers take
    shared memory to 200 KiB, and the forward measured 5% slower at (1, 16384, 16, 128)."""
    return head_dim <= 64


@gluon.jit
def _one_hot(BN: gl.constexpr, dtype: gl.constexpr):
    """(ONES, BN) in shared memory, row 0 ones and the rest zeros: its transpose is the B operand that turns a
    (BM, BN) tile into its row sums."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [ONES, 32 // ONES], [gl.num_warps(), 1], [1, 0])
    first = gl.arange(0, ONES, layout=gl.SliceLayout(1, layout))[:, None] == 0
    values = gl.where(first, 1.0, 0.0) + gl.zeros([ONES, BN], gl.float32, layout=layout)
    ones = gl.allocate_shared_memory(dtype, [ONES, BN], gl.NVMMASharedLayout.get_default_for([ONES, BN], dtype))
    ones.store(values.to(dtype))
    fence_async_shared()
    return ones


@gluon.constexpr_function
def wgmma_layout(columns):
    """How a warp group's asynchronous matmul (wgmma) leaves an accumulator of `columns` columns in its 4 warps'
    registers (16 rows per warp and instruction)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, columns, 16])


@aggregate
class _Shared:
    """One program's shared memory and the mbarriers that pass it between the producer and the consumers: q
    (2 QBUF, BM, D), the query rows of QBUF tiles, one half per consumer (index 2 slot + j): with two, the next
    tile's rows and first key blocks load while this tile finishes; k, v (NBUF, BN, D) and c (NBUF, BN), rings of
    key blocks and their c2. A "ready" barrier completes when the producer's TMA copies into its slot have landed,
    a "free" one when both consumers have released the slot; turn (2,) says which consumer issues matmuls next.
    o (2, BM, D): the consumers' O tiles on their way out (`_o_by_tma`; at head dim 128, where O leaves from
    registers, q stands in). ones (ONES, BN): the one-hot column of the row sums' matmul (`_sums_by_mma`; 2 KiB,
    unused at head dim 128). tile (2, 1): the numbers of the tiles that the producer took, for the consumers
    (`_take_tile`), with their ready and free barriers."""
    q: gl.shared_memory_descriptor
    k: gl.shared_memory_descriptor
    v: gl.shared_memory_descriptor
    c: gl.shared_memory_descriptor
    o: gl.shared_memory_descriptor
    q_ready: gl.shared_memory_descriptor
    q_free: gl.shared_memory_descriptor
    k_ready: gl.shared_memory_descriptor
    k_free: gl.shared_memory_descriptor
    v_ready: gl.shared_memory_descriptor
    v_free: gl.shared_memory_descriptor
    turn: gl.shared_memory_descriptor
    ones: gl.shared_memory_descriptor
    tile: gl.shared_memory_descriptor
    tile_ready: gl.shared_memory_descriptor
    tile_free: gl.shared_memory_descriptor
    BM: gl.constexpr  # query rows per consumer
    BN: gl.constexpr  # keys per block
    D: gl.constexpr
    NBUF: gl.constexpr  # ring slots
    QBUF: gl.constexpr  # query tiles in shared memory
    S_LAYOUT: gl.constexpr  # a consumer's scores S (BM, BN) as wgmma leaves them in its 4 warps
    O_LAYOUT: gl.constexpr  # its output accumulator (BM, D)
    P_LAYOUT: gl.constexpr  # P (BM, BN) as wgmma's A operand
    SUMS_BY_MMA: gl.constexpr  # `_sums_by_mma`
    SUMS_LAYOUT: gl.constexpr  # the row sums' accumulator (BM, ONES)
    SUMS_A_LAYOUT: gl.constexpr  # P as their A operand
    O_BY_TMA: gl.constexpr  # `_o_by_tma`

    @gluon.constexpr_function
    def __init__(self, q, k, v, c, o, q_ready, q_free, k_ready, k_free, v_ready, v_free, turn, ones, tile, tile_ready,
                 tile_free):
        self.q, self.k, self.v, self.c, self.o = q, k, v, c, o
        self.q_ready, self.q_free, self.k_ready, self.k_free = q_ready, q_free, k_ready, k_free
        self.v_ready, self.v_free, self.turn, self.ones = v_ready, v_free, turn, ones
        self.tile, self.tile_ready, self.tile_free = tile, tile_ready, tile_free
        self.BM = gl.constexpr(q.type.shape[1])
        self.BN = gl.constexpr(k.type.shape[1])
        self.D = gl.constexpr(k.type.shape[2])
        self.NBUF = gl.constexpr(k.type.shape[0])
        self.QBUF = gl.constexpr(q.type.shape[0] // 2)
        self.S_LAYOUT = gl.constexpr(wgmma_layout(self.BN))
        self.O_LAYOUT = gl.constexpr(wgmma_layout(self.D))
        self.P_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=self.O_LAYOUT, k_width=2))
        self.SUMS_BY_MMA = gl.constexpr(_sums_by_mma(self.D))
        self.SUMS_LAYOUT = gl.constexpr(wgmma_layout(ONES))
        self.SUMS_A_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=self.SUMS_LAYOUT, k_width=2))
        self.O_BY_TMA = gl.constexpr(_o_by_tma(self.D))


@gluon.jit
def _take_tile(NEXT_TILE, tiles, sh):
    """The producer's next tile: the counter's value, which it advances (an atomic add), published to the other
    partitions through sh.tile (`_read_tile`; sh, this kernel's or hopper_backward.py's shared state). Taking tiles
    as programs get free, rather than dealing them out in advance, balances programs whose tiles differ in length
    up to T / 128 times."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    t = gl.atomic_add(NEXT_TILE + gl.arange(0, 1, layout=layout), gl.full([1], 1, gl.int32, layout), sem="relaxed")
    slot = tiles % 2
    mbarrier.wait(sh.tile_free.index(slot), ((tiles // 2) & 1) ^ 1)
    sh.tile.index(slot).store(t)
    mbarrier.arrive(sh.tile_ready.index(slot), count=1)
    return gl.max(t, 0)


@gluon.jit
def _read_tile(tiles, sh):
    """The program's tiles-th tile, as the producer took it (`_take_tile`)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    slot = tiles % 2
    mbarrier.wait(sh.tile_ready.index(slot), (tiles // 2) & 1)
    t = gl.max(sh.tile.index(slot).load(layout), 0)
    mbarrier.arrive(sh.tile_free.index(slot), count=1)
    return t


@gluon.jit
def _longest_first(t, per_head, heads, heads_per_group):
    """Tile t of heads x per_head tiles in the order the persistent kernels take them: the heads in groups of
    heads_per_group, whose data the programs that run at the same time share in L2 (the first group takes what is
    left over, so that the last is a full one and ends on short tiles: a short last group would start its longest
    tiles last), and within a group the longest tiles first, head after head. Returns (rank, head): the tile's
    place by length within its head (0: the longest) and its head."""
    first_heads = heads % heads_per_group  # the first group's (0: every group is full)
    later = t - first_heads * per_head  # t's rank among the full groups' tiles, if it is in one
    in_first = later < 0
    first_head = gl.where(in_first, 0, first_heads + later // (per_head * heads_per_group) * heads_per_group)
    group_heads = gl.where(in_first, first_heads, heads_per_group)
    rank = gl.where(in_first, t, later % (per_head * heads_per_group))  # within the group
    return rank // group_heads, first_head + rank % group_heads


@gluon.jit
def _producer(sh: _Shared, dims, descs, NEXT_TILE, GROUP: gl.constexpr):
    """One warp: per tile it takes, the two query tiles (once both consumers are done with the last ones), then
    each key block's K (with its c2) and V, each into its ring slot as soon as both consumers have released it."""
    T, stride_c, H, BH, n_row_blocks, heads_per_group = dims
    q_desc, k_desc, v_desc, c_desc = descs
    ring = 0  # key blocks loaded so far, over all tiles: the ring slot and its phase
    tiles = 0
    t = _take_tile(NEXT_TILE, tiles, sh)
    while t < n_row_blocks * BH:
        rank, bh = _longest_first(t, n_row_blocks, BH, heads_per_group)
        m0 = (n_row_blocks - 1 - rank) * 2 * sh.BM
        row0 = (bh // H) * T  # the sequence's first row in the (B * T, heads * D) matrices
        q_slot = tiles % sh.QBUF
        mbarrier.wait(sh.q_free.index(q_slot), ((tiles // sh.QBUF) & 1) ^ 1)
        mbarrier.expect(sh.q_ready.index(q_slot), 2 * q_desc.block_type.nbytes)
        for j in gl.static_range(2):
            _tma_load(q_desc, [row0 + m0 + j * sh.BM, (bh % H) * sh.D], sh.q_ready.index(q_slot),
                      sh.q.index(2 * q_slot + j))
        kv_col = ((bh % H) // GROUP) * sh.D
        n_blocks = gl.cdiv(m0 + 2 * sh.BM, sh.BN)
        for i in range(n_blocks):
            n0 = (n_blocks - 1 - i) * sh.BN  # the diagonal block first, then older keys
            slot = (ring + i) % sh.NBUF
            free_phase = (((ring + i) // sh.NBUF) & 1) ^ 1
            mbarrier.wait(sh.k_free.index(slot), free_phase)
            mbarrier.expect(sh.k_ready.index(slot), k_desc.block_type.nbytes + c_desc.block_type.nbytes)
            _tma_load(k_desc, [row0 + n0, kv_col], sh.k_ready.index(slot), sh.k.index(slot))
            _tma_load(c_desc, [bh * stride_c + n0], sh.k_ready.index(slot), sh.c.index(slot))
            mbarrier.wait(sh.v_free.index(slot), free_phase)
            mbarrier.expect(sh.v_ready.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, [row0 + n0, kv_col], sh.v_ready.index(slot), sh.v.index(slot))
        ring += n_blocks
        tiles += 1
        t = _take_tile(NEXT_TILE, tiles, sh)


@gluon.jit
def _scores_and_softmax(s, c_k, keys, rows, c_ref, r, m_i, qk_scale, MASK: gl.constexpr):
    """Scores of one block (rows, keys) from S = q k^T, causally masked on the diagonal, into the online softmax's
    weights: (P, alpha, m), `_softmax_weights`."""
    t = _relative_scores(s, c_k[None, :], c_ref, qk_scale)
    if MASK:
        t = gl.where(keys[None, :] <= rows[:, None], t, float("-inf"))
    return _softmax_weights(t, r, m_i)


@gluon.jit
def _issue_p_v(p, acc, l, slot, sh: _Shared):
    """Issues acc += P v for the key block in ring slot `slot`, asynchronously, and with `_sums_by_mma` also the
    row sums of the same rounded P into l (BM, ONES). Returns acc and l, in flight until `_wait_p_v`."""
    p = gl.convert_layout(p.to(sh.q.dtype), sh.P_LAYOUT)
    acc = warpgroup_mma(p, sh.v.index(slot), acc, is_async=True)
    if sh.SUMS_BY_MMA:
        l = warpgroup_mma(gl.convert_layout(p, sh.SUMS_A_LAYOUT), sh.ones.permute((1, 0)), l, is_async=True)
    return acc, l


@gluon.jit
def _wait_p_v(acc, l, sh: _Shared):
    """Waits for `_issue_p_v`'s matmuls: acc and l, landed."""
    if sh.SUMS_BY_MMA:
        acc, l = warpgroup_mma_wait(num_outstanding=0, deps=(acc, l))
    else:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    return acc, l


@gluon.jit
def _diagonal_block(slot_index, n0, q, turns, rows, c_q, c_ref, qk_scale, sh: _Shared, j: gl.constexpr):
    """Consumer j's first key block of a tile, the diagonal (keys n0 + [0, BN), the only masked one): S and its
    softmax only, as there is no previous block's P v to overlap; this block's P v goes out with the next block's S.
    The rows' term r = c_q - c_ref (`_relative_scores`) is formed here, once S has landed, so that the tile's
    first instructions do not wait for the loads of c_q and c_ref (~400 cycles on an H200). Returns P, m, l (the
    row sums so far: (BM,), or with `_sums_by_mma` a (BM, ONES) accumulator), r, turns."""
    s_layout: gl.constexpr = sh.S_LAYOUT
    slot = slot_index % sh.NBUF
    mbarrier.wait(sh.turn.index(j), turns & 1)
    mbarrier.wait(sh.k_ready.index(slot), (slot_index // sh.NBUF) & 1)
    s = warpgroup_mma(q, sh.k.index(slot).permute((1, 0)), gl.zeros([sh.BM, sh.BN], gl.float32, layout=s_layout),
                      use_acc=False, is_async=True)
    mbarrier.arrive(sh.turn.index(1 - j), count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    c_k = sh.c.index(slot).load(gl.SliceLayout(0, s_layout))
    mbarrier.arrive(sh.k_free.index(slot), count=1)
    keys = n0 + gl.arange(0, sh.BN, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([sh.BM], -1.0e30, gl.float32, layout=gl.SliceLayout(1, s_layout))
    r = c_q - c_ref
    # alpha is not needed: nothing has been summed yet to rescale
    p, _, m_i = _scores_and_softmax(s, c_k, keys, rows, c_ref, r, m_i, qk_scale, True)
    if sh.SUMS_BY_MMA:
        l = gl.zeros([sh.BM, ONES], gl.float32, layout=sh.SUMS_LAYOUT)  # P's sums go out with its P v
    else:
        l = gl.sum(p, 1)
    return p, m_i, l, r, turns + 1


@gluon.jit
def _key_block(slot_index, n0, q, p, acc, m_i, l, turns, rows, c_ref, r, qk_scale, sh: _Shared, j: gl.constexpr,
               MASK: gl.constexpr):
    """Consumer j's work on one key block (keys n0 + [0, BN), ring position slot_index), FA3's overlap within a
    warp group: this block's S = q k^T is issued before the previous block's P v, and this block's softmax runs
    while that P v is in flight. Returns the new P (of this block, for the next call's P v), acc, m, l, turns."""
    s_layout: gl.constexpr = sh.S_LAYOUT
    slot, prev = slot_index % sh.NBUF, (slot_index - 1) % sh.NBUF
    mbarrier.wait(sh.turn.index(j), turns & 1)  # this consumer's turn to issue matmuls
    mbarrier.wait(sh.k_ready.index(slot), (slot_index // sh.NBUF) & 1)
    s = warpgroup_mma(q, sh.k.index(slot).permute((1, 0)), gl.zeros([sh.BM, sh.BN], gl.float32, layout=s_layout),
                      use_acc=False, is_async=True)
    mbarrier.wait(sh.v_ready.index(prev), ((slot_index - 1) // sh.NBUF) & 1)
    acc, l = _issue_p_v(p, acc, l, prev, sh)
    mbarrier.arrive(sh.turn.index(1 - j), count=1)  # the other consumer's turn
    IN_FLIGHT: gl.constexpr = 1 + sh.SUMS_BY_MMA  # P v and its row sums stay on the tensor cores
    s = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(s, ))
    c_k = sh.c.index(slot).load(gl.SliceLayout(0, s_layout))
    mbarrier.arrive(sh.k_free.index(slot), count=1)
    keys = n0 + gl.arange(0, sh.BN, layout=gl.SliceLayout(0, s_layout))
    p, alpha, m_i = _scores_and_softmax(s, c_k, keys, rows, c_ref, r, m_i, qk_scale, MASK)
    if not sh.SUMS_BY_MMA:
        l = l * alpha + gl.sum(p, 1)
    acc, l = _wait_p_v(acc, l, sh)
    mbarrier.arrive(sh.v_free.index(prev), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, sh.O_LAYOUT))[:, None]
    if sh.SUMS_BY_MMA:
        l = l * gl.convert_layout(alpha, gl.SliceLayout(1, sh.SUMS_LAYOUT))[:, None]
    return p, acc, m_i, l, turns + 1


@gluon.jit
def _write_rows(acc, l_i, m_i, rows, first, bh, out, T, H, sh: _Shared, j: gl.constexpr):
    """Consumer j's epilogue: O = acc / l for its rows [first, first + BM) below T (bh the batch-head; out = (O
    (B, T, H, D) contiguous, its TMA descriptor, LSE)), and the base-2 lse m + log2(l) for the rows `rows` (the
    scores' row layout). With `_o_by_tma` a whole tile of rows leaves by TMA from shared memory; one that runs past
    T (whose rows past T would land in the next sequence) is stored from registers."""
    O, o_desc, LSE = out
    o_layout: gl.constexpr = acc.type.layout
    # one division per row: acc / l divides each element (with range checks)
    o = (acc * gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))[:, None]).to(O.dtype.element_ty)
    if sh.O_BY_TMA and first + sh.BM <= T:
        tma.store_wait(0)  # this consumer's last tile has left sh.o
        sh.o.index(j).store(o)
        fence_async_shared()
        _tma_store(o_desc, [(bh // H) * T + first, (bh % H) * sh.D], sh.o.index(j))
    else:
        o_rows = first + gl.arange(0, sh.BM, layout=gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, sh.D, layout=gl.SliceLayout(0, o_layout))
        offsets = ((bh // H) * T + o_rows).to(gl.int64)[:, None] * (H * sh.D) + (bh % H) * sh.D + o_cols[None, :]
        gl.store(O + offsets, o, mask=(o_rows < T)[:, None])
    gl.store(LSE + bh * T + rows, m_i + gl.log2(l_i), mask=rows < T)


@gluon.jit
def _consumer(j: gl.constexpr, C, out, qk_scale, sh: _Shared, dims):
    """Warp group j: query rows [j * BM, (j + 1) * BM) of every tile the program takes. Writes O and the lse."""
    T, stride_c, H, BH, n_row_blocks, heads_per_group = dims
    # Key blocks that reach past this group's first row need the causal mask.
    N_DIAGONAL: gl.constexpr = (2 * sh.BM) // sh.BN
    s_layout: gl.constexpr = sh.S_LAYOUT
    if j == 1:
        mbarrier.arrive(sh.turn.index(0), count=1)  # consumer 0 issues first
    ring = 0
    turns = 0
    tiles = 0
    t = _read_tile(tiles, sh)
    while t < n_row_blocks * BH:
        rank, bh = _longest_first(t, n_row_blocks, BH, heads_per_group)
        m0 = (n_row_blocks - 1 - rank) * 2 * sh.BM
        first = m0 + j * sh.BM
        rows = first + gl.arange(0, sh.BM, layout=gl.SliceLayout(1, s_layout))
        c_q = gl.load(C + bh * stride_c + rows, mask=rows < T, other=0.0)
        c_ref = gl.load(C + bh * stride_c + gl.minimum(first, T - 1))  # the group's first row, as the portable
        n_blocks = gl.cdiv(m0 + 2 * sh.BM, sh.BN)
        q_slot = tiles % sh.QBUF
        q = sh.q.index(2 * q_slot + j)
        mbarrier.wait(sh.q_ready.index(q_slot), (tiles // sh.QBUF) & 1)
        p, m_i, l, r, turns = _diagonal_block(ring, (n_blocks - 1) * sh.BN, q, turns, rows, c_q, c_ref, qk_scale, sh,
                                              j)
        acc = gl.zeros([sh.BM, sh.D], gl.float32, layout=sh.O_LAYOUT)
        for i in range(1, N_DIAGONAL):
            p, acc, m_i, l, turns = _key_block(ring + i, (n_blocks - 1 - i) * sh.BN, q, p, acc, m_i, l, turns,
                                               rows, c_ref, r, qk_scale, sh, j, True)
        for i in range(N_DIAGONAL, n_blocks):
            p, acc, m_i, l, turns = _key_block(ring + i, (n_blocks - 1 - i) * sh.BN, q, p, acc, m_i, l, turns,
                                               rows, c_ref, r, qk_scale, sh, j, False)
        mbarrier.arrive(sh.q_free.index(q_slot), count=1)  # this group's last q k^T is done
        last = (ring + n_blocks - 1) % sh.NBUF
        mbarrier.wait(sh.v_ready.index(last), ((ring + n_blocks - 1) // sh.NBUF) & 1)
        acc, l = _wait_p_v(*_issue_p_v(p, acc, l, last, sh), sh)
        mbarrier.arrive(sh.v_free.index(last), count=1)
        if sh.SUMS_BY_MMA:
            l = gl.convert_layout(gl.sum(l, 1), gl.SliceLayout(1, s_layout))  # column 0 holds the sums
        _write_rows(acc, l, m_i, rows, first, bh, out, T, H, sh, j)
        ring += n_blocks
        tiles += 1
        t = _read_tile(tiles, sh)
    tma.store_wait(0)  # the last tile's O has left shared memory before the program ends


@gluon.jit
def _consumer_0(C, out, qk_scale, sh: _Shared, dims):
    _consumer(0, C, out, qk_scale, sh, dims)


@gluon.jit
def _consumer_1(C, out, qk_scale, sh: _Shared, dims):
    _consumer(1, C, out, qk_scale, sh, dims)


@gluon.jit
def _fwd_kernel(q_desc, k_desc, v_desc, c_desc, o_desc, C, O, LSE, NEXT_TILE, T, stride_c, H, BH, heads_per_group,
                qk_scale, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Causal forgetting attention, O (B, T, H, D) and LSE (B, H, T) as in the module docstring; q, k, v through
    their (B * T, heads * D) TMA descriptors, C (B, H, stride_c) the base-2 prefix sums (also read through c_desc),
    stride_c >= T a multiple of 4. Persistent: each program takes tiles of 128 query rows of one of the BH
    (batch, head)s from the counter NEXT_TILE (int32, zeroed by the caller) in `_longest_first` order, groups of
    heads_per_group heads, until all are taken."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    NBUF: gl.constexpr = 2
    # Two query tiles at head dim 64: 1-2% faster on short sequences (many tiles). At 128 (200 KiB of shared memory
    # then) it measured 3% slower at (16, 1024, 16, 128) and even elsewhere (benchmarks/NOTES.md, session 14).
    QBUF: gl.constexpr = 2 if HEAD_DIM == 64 else 1
    barrier: gl.constexpr = mbarrier.MBarrierLayout()
    q = gl.allocate_shared_memory(q_desc.dtype, [2 * QBUF, BM, HEAD_DIM], q_desc.layout)
    if _o_by_tma(HEAD_DIM):
        o = gl.allocate_shared_memory(o_desc.dtype, [2, BM, HEAD_DIM], o_desc.layout)
    else:
        o = q  # not used
    sh = _Shared(q, gl.allocate_shared_memory(k_desc.dtype, [NBUF, BN, HEAD_DIM], k_desc.layout),
                 gl.allocate_shared_memory(v_desc.dtype, [NBUF, BN, HEAD_DIM], v_desc.layout),
                 gl.allocate_shared_memory(gl.float32, [NBUF, BN], c_desc.layout), o,
                 gl.allocate_shared_memory(gl.int64, [QBUF, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [QBUF, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [NBUF, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [NBUF, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [NBUF, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [NBUF, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [2, 1], barrier), _one_hot(BN, q_desc.dtype),
                 gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0])),
                 gl.allocate_shared_memory(gl.int64, [2, 1], barrier),
                 gl.allocate_shared_memory(gl.int64, [2, 1], barrier))
    for i in gl.static_range(QBUF):
        mbarrier.init(sh.q_ready.index(i), count=1)  # the producer's TMA copies complete the "ready" barriers
        mbarrier.init(sh.q_free.index(i), count=2)  # both consumers release a buffer
    for i in gl.static_range(NBUF):
        mbarrier.init(sh.k_ready.index(i), count=1)
        mbarrier.init(sh.v_ready.index(i), count=1)
        mbarrier.init(sh.k_free.index(i), count=2)
        mbarrier.init(sh.v_free.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(sh.turn.index(i), count=1)
        mbarrier.init(sh.tile_ready.index(i), count=1)
        mbarrier.init(sh.tile_free.index(i), count=2)  # both consumers read a tile's number
    dims = (T, stride_c, H, BH, gl.cdiv(T, 2 * BM), heads_per_group)
    # Registers per thread: 24 for the producer's warp group, 240 for each consumer's (the 64 x 128 float32
    # scores, the 64 x D accumulator, P).
    out = (O, o_desc, LSE)
    gl.warp_specialize([(_consumer_0, (C, out, qk_scale, sh, dims)),
                        (_producer, (sh, dims, (q_desc, k_desc, v_desc, c_desc), NEXT_TILE, GROUP)),
                        (_consumer_1, (C, out, qk_scale, sh, dims))], [1, 4], [24, 240])
