"""What the kernels share: tile loads, score masks, block ranges, one online-softmax step, and the launch
configuration (tiles per kernel and head dim, with fallbacks for GPUs whose shared memory is smaller)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: the torch backends still work
    triton = None
try:  # Triton >= 3.4: tiles loaded by the Hopper tensor memory accelerator (TMA)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

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
def _load_rows(X, row0, col, rows, stride, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr, TMA: tl.constexpr):
    """Rows ``rows`` (BLOCK,) of one head's (n_rows, HEAD_DIM) matrix, a (BLOCK, BLOCK_D) tile. With TMA, X is a
    tensor descriptor (`_tma_descriptor`) and the tile its block at (row0, col): rows past the end of the tensor
    come as zeros, rows past this head's sequence as the next sequence's (masks drop them). Else X points at the
    head's row 0, its rows ``stride`` apart (`_load_tile`)."""
    if TMA:
        tile = X.load([row0, col])
    else:
        tile = _load_tile(X + rows[:, None] * stride + offs_d[None, :], rows, n_rows, offs_d, HEAD_DIM, BLOCK_D,
                          CHECK_ROWS)
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
def _relative_scores(qk, c_k, c_ref, qk_scale):
    """The key-dependent part t = qk_scale q.k - (c_k - c_ref) of a tile of base-2 scores, from qk = q k^T (or its
    transpose), the keys' prefix sums c_k broadcast along the query axis ([None, :], or [:, None] for the transpose)
    and a reference c_ref (scalar). The whole score is s = t + (c_q - c_ref): the decay c_q - c_k split into a per-key
    and a per-row term, so that a score costs one multiply-add (the row term joins the max or the lse once per row)
    where c_q - c_k and a multiply-add cost two operations. c_ref is a nearby prefix sum (the block's first query, or
    first key), so both terms stay small wherever a score matters; subtracting c_k itself (-1e4 and beyond on long
    sequences) would round q.k away."""
    return qk * qk_scale - (c_k - c_ref)


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
def _key_block_query_range(n0, offset, q_end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows that read keys [n0, n0 + BLOCK_N): [start, mid) needs the causal mask, [mid, end) not.

    q_end is one past the last row that may see the block (Tq, or the end of a packed sequence).
    """
    start = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M
    mid = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M, start)
    return start, tl.minimum(mid, q_end), q_end


@_jit
def _softmax_weights(t, r, m_i):
    """The online softmax's weights for one key block of base-2 scores s = t + r[:, None] (rows, keys), given as
    a tile t and a per-row term r (`_relative_scores`): the block's unnormalized probabilities p = exp2(s - m)
    under the new running max m of s, the factor alpha = exp2(m_old - m) that rescales what was summed before, and
    m. s itself is never formed: exp2(s - m) = exp2(t - (m - r)), one subtraction per score."""
    m_new = tl.maximum(m_i, tl.max(t, 1) + r)
    p = tl.exp2(t - (m_new - r)[:, None])
    alpha = tl.exp2(m_i - m_new)
    return p, alpha, m_new


@_jit
def _softmax_update(t, r, m_i, l_i):
    """`_softmax_weights` and the new denominator l = alpha l_old + the row sums of p: (p, alpha, m, l)."""
    p, alpha, m_new = _softmax_weights(t, r, m_i)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@_jit
def _online_softmax_step(acc, l_i, m_i, t, r, v, DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax (`_softmax_update`) with values v (keys, D) into the unnormalized output
    acc; returns the new acc, l and m."""
    p, alpha, m_new, l_i = _softmax_update(t, r, m_i, l_i)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# --------------------------------------------------------------------------------------------------
# Launch: tiles per kernel, fallbacks, the arguments every launch shares.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KernelConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    prune_max_registers: int | None = None  # per thread (ptxas -maxnreg) in the pruning variants, NVIDIA only

    def options(self, device: torch.device, prune: bool) -> dict:
        """Triton's launch options for this configuration: num_warps, num_stages, (pruning) maxnreg, and floating-point
        fusion asked for by name: the scores cost one multiply-add each only if multiplies and adds may fuse
        (`_relative_scores`), which Triton 3.9 still does by default and announces it will stop doing in 3.10."""
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=True)
        if prune and self.prune_max_registers and device.type == "cuda" and torch.version.hip is None:
            options["maxnreg"] = self.prune_max_registers
        return options


# First choice per (kernel, padded head dim) for 16-bit inputs on sm80+, tuned on an H100 and re-tuned on an
# H200, where the head-dim-128 forward moved to 128-row tiles of 8 warps (8% faster; benchmarks/NOTES.md). Anything that does not fit a GPU's shared memory falls back along
# _FALLBACK_CONFIGS, so no GPU needs an entry of its own.
# The register cap of the pruning variants: a 128-thread program of at most 168 registers per thread lets 3
# programs share an SM's 64K registers, as many as the ~60 KB of shared memory of these head-dim-64 tiles allow
# on Hopper. The pruning variants of the forward and dQ compile to 160-168 with Triton 3.6 (170-214 before their
# loads of c were vectorized: 2 programs per SM), so the cap guards the third program against other compilers;
# the plain kernels stay uncapped, a cap cost them ~1.5% (benchmarks/NOTES.md, attempt 5).
_SM_REGISTERS_3_PROGRAMS = 168
_GPU_CONFIGS = {
    ("fwd", 16): _KernelConfig(64, 64, 4, 3),
    ("fwd", 32): _KernelConfig(64, 64, 4, 3),
    ("fwd", 64): _KernelConfig(64, 64, 4, 3, _SM_REGISTERS_3_PROGRAMS),
    ("fwd", 128): _KernelConfig(128, 64, 8, 3),
    ("fwd", 256): _KernelConfig(64, 32, 4, 2),
    # A variant kind ("fwd_tma") lists only the head dims where it differs from its base kind (`_lookup`).
    # TMA loads: 64-row tiles of 4 warps won at both head dims (the forward 1-7% faster than with pointers, NOTES.md)
    ("fwd_tma", 128): _KernelConfig(64, 64, 4, 3),
    # With at least _LONG_KEYS keys, 128-key tiles at head dim 64: half the loop trips and online-softmax rescales per
    # key (+3% at 4096 keys to +11% at 16384 on an H200), where short sequences lose more to their wider diagonal tile
    # (-2% at 2048, -10% at 1024; NOTES.md, session 9). At head dim 128 they lose everywhere (1 program per SM).
    ("fwd_tma_long", 64): _KernelConfig(64, 128, 4, 3),
    ("dkdv", 16): _KernelConfig(64, 64, 4, 3),
    ("dkdv", 32): _KernelConfig(64, 64, 4, 3),
    ("dkdv", 64): _KernelConfig(64, 64, 4, 3),
    ("dkdv", 128): _KernelConfig(32, 64, 4, 3),
    ("dkdv", 256): _KernelConfig(64, 32, 8, 2),
    ("dq", 16): _KernelConfig(64, 64, 4, 3),
    ("dq", 32): _KernelConfig(64, 64, 4, 3),
    ("dq", 64): _KernelConfig(64, 64, 4, 3, _SM_REGISTERS_3_PROGRAMS),
    ("dq", 128): _KernelConfig(128, 64, 8, 2),
    ("dq", 256): _KernelConfig(128, 32, 8, 2),
    # TMA loads of k and v: one more stage paid at head dim 128 (2-5% on the whole backward, NOTES.md)
    ("dq_tma", 128): _KernelConfig(128, 64, 8, 3),
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
# A first choice of 128-row tiles (one 8-warp program per SM) leaves SMs idle when its grid fills fewer waves of the
# GPU than this (chunked prefill of a few hundred queries: 160 against 115 us at Tq 512, Tk 8192, 16 heads of 128);
# such a call takes 64-row tiles of 4 warps, several programs per SM.
_WIDE_TILE_MIN_WAVES = 2
_LONG_KEYS = 4096
# Tests and the benchmark's tuning sweep pin a configuration per kernel kind here.
_CONFIG_OVERRIDES: dict[str, _KernelConfig] = {}
_CONFIG_CHOSEN: dict[tuple, _KernelConfig] = {}


def _lookup(table: dict, kind: str, block_d: int | None = None):
    """table's entry for kind (keyed (kind, block_d) when block_d is given), else its base kind's (the name before
    "_": "fwd" for "fwd_tma"), else None: a variant kind lists only what it changes, and pinning "fwd" pins "fwd_tma"
    too."""
    for name in (kind, kind.split("_")[0]):
        entry = table.get(name if block_d is None else (name, block_d))
        if entry is not None:
            return entry
    return None


def _candidate_configs(kind: str, block_d: int, dtype: torch.dtype, device: torch.device,
                       grid_rows: tuple[int, int] | None = None, keys: int = 0) -> list[_KernelConfig]:
    """The configurations to try, first choice first. grid_rows (rows, programs per row tile): the kernel's grid
    runs cdiv(rows, block_m) x that many programs, for the short-grid rule (_WIDE_TILE_MIN_WAVES); keys: how many
    keys the rows read, for the kinds with a first choice of their own for long sequences (_LONG_KEYS)."""
    if device.type != "cuda":
        return [_lookup(_INTERPRET_CONFIGS, kind)]
    first = _lookup(_GPU_CONFIGS, kind, block_d)
    if keys >= _LONG_KEYS and dtype != torch.float32:  # measured in 16 bits
        first = _GPU_CONFIGS.get((f"{kind}_long", block_d), first)
    if dtype == torch.float32:  # twice the bytes per tile: start from half the tile
        first = _KernelConfig(max(16, first.block_m // 2), max(16, first.block_n // 2), first.num_warps, 2)
    if grid_rows is not None and first.block_m > 64:
        rows, per_tile = grid_rows
        if -(-rows // first.block_m) * per_tile < _WIDE_TILE_MIN_WAVES * _multiprocessors(device):
            first = _KernelConfig(64, first.block_n, 4, first.num_stages)
    if kind == "decode":  # block_m is the least tile height (taller tiles, up to 64 rows, need less block_n)
        return [first, _KernelConfig(16, max(16, first.block_n // 2), 4, 2), _KernelConfig(16, 16, 4, 1)]
    return [first, *(c for c in _FALLBACK_CONFIGS if c.block_m * c.block_n < first.block_m * first.block_n)]


def _launch(kind: str, q: torch.Tensor, block_d: int, launch, grid_rows: tuple[int, int] | None = None,
            keys: int = 0) -> None:
    """Call ``launch(config)`` with the first configuration whose tiles fit the GPU's shared memory.

    The last one that fitted is tried first next time for the same first choice (decoding tiles grow with
    Tq x GROUP, so it may not fit every call). grid_rows, keys: see `_candidate_configs`.
    """
    pinned = _lookup(_CONFIG_OVERRIDES, kind)
    if pinned is not None:
        return launch(pinned)
    configs = _candidate_configs(kind, block_d, q.dtype, q.device, grid_rows, keys)
    key = (kind, block_d, q.dtype, q.device, configs[0])
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


def _tma_wanted(kind: str, *tensors: torch.Tensor) -> bool:
    """Whether kernel ``kind`` ("fwd" or "dq") loads its key/value tiles from these (B, T, heads, D) tensors through
    TMA descriptors: on a Hopper or newer GPU (or under the interpreter), with Triton >= 3.4, when each is one
    (B * T, heads * D) matrix whose rows are a multiple of 16 bytes apart, and D a power of two (a block then holds
    exactly one head's features) of at most 512 bytes (the widest head tested on a GPU: 256 in 16 bits). TMA tiles
    made the forward 1-7% and forward + backward 1-5% faster on an H200 (benchmarks/NOTES.md); anything else takes
    the pointer loads."""
    q = tensors[0]
    if TensorDescriptor is None or not _TMA_LOADS[kind]:
        return False
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (9, 0):
        return False
    D = q.shape[-1]
    if D < 16 or D & (D - 1) or D * q.element_size() > 512:
        return False
    return _tma_layout_ok(*tensors)


def _tma_layout_ok(*tensors: torch.Tensor) -> bool:
    """Whether each (B, T, heads, D) tensor is one (B * T, heads * D) matrix (`_tma_descriptor`) whose rows start
    16 bytes apart or a multiple of that, as a TMA descriptor requires."""
    return all(t.stride(3) == 1 and t.stride(2) == t.shape[3]
               and (t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1))
               and (t.stride(1) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


def _tma_descriptor(t: torch.Tensor, block_rows: int):
    """t (B, T, heads, D) as the (B * T, heads * D) matrix that `_tma_wanted` checked, read in (block_rows, D) tiles."""
    B, T, heads, D = t.shape
    return TensorDescriptor(t, [B * T, heads * D], [t.stride(1), 1], [block_rows, D])


# Which kernels may use TMA loads; tests turn them off to check the pointer loads on the same inputs.
_TMA_LOADS = {"fwd": True, "dq": True}


def _or(t, placeholder):
    return t if t is not None else placeholder


def _strides(t, n=3):
    """The first n strides of t; (0, ...) for an absent optional tensor (its kernel flag is off)."""
    return t.stride()[:n] if t is not None else (0,) * n


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
