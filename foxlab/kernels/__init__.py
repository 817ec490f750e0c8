"""The Triton kernels of forgetting attention (forward, backward, decoding, pruning) and their launch.

attention.py holds the math, the exact reference and the entry point ``forgetting_attention``, which calls
``forgetting_attention_triton`` here for CUDA tensors (or on the CPU under TRITON_INTERPRET=1). The comment
below says what each kernel computes and where it lives; docs/fox.md derives it.

    common.py            tile loads, masks, block ranges, launch configuration
    blocked.py           training and prefill: forward, backward, the gate's prefix sums and gradient
    hopper.py            the forward of training and prefill on Hopper GPUs, warp-specialized (Gluon), for the
                         common case
    hopper_backward.py   its backward on Hopper: one warp-specialized kernel (Gluon) where blocked.py has two
    split.py             decoding and short chunked prefill: the split-key forward and its merge
    pruning.py           adaptive computation pruning: the "auto" threshold and the block bounds
"""

from __future__ import annotations

import os

import torch

from .. import acp, fused
from . import blocked, pruning, split
from .common import LOG2E, triton

# ==================================================================================================
# Triton kernels (FlashAttention-2 structure), reached through `_TritonForgettingAttention` (below). The split
# kernel lives in split.py, the pruning threshold and bounds kernels in pruning.py, the others in blocked.py.
#
# Per batch row b and query head h (kv head h // GROUP), with q (Tq, D), k, v (Tk, D), log f (Tk,):
#   forward    c = cumsum(log f)                          `_gate_cumsum_kernel`, float32 (skipped when the
#                                                         caller passes c itself, as a decoding cache does;
#                                                         the backward scans again rather than keep c)
#              O = softmax(s q k^T + D) v, lse per row     `_fwd_kernel`; decoding (Tq x GROUP <= 64 rows) and
#                                                         short chunked prefill: `_fwd_split_kernel`; on an
#                                                         sm_90 GPU, 16-bit, head dim 64/128, Tq = Tk, no padding,
#                                                         pruning or output norm: hopper.py's `_fwd_kernel`
#   backward   delta_i = sum_d O_id dO_id                  `_bwd_delta_kernel`
# FoX Pro's output norm (and gate) of O can ride along: the forward's epilogue also writes Y = norm(O) (* sigmoid
# gate) and its rstd, and the delta kernel first takes dY back through the norm to dO (the formulas of fused.py).
#              P = softmax(...), dS = P * (dO v^T - delta)
#              dK = s dS^T q, dV = P^T dO (summed over the GROUP heads), colsum(dS)   `_bwd_dkdv_kernel`
#              dQ = s dS k, rowsum(dS)                                               `_bwd_dq_kernel`
#              (on an sm_90 GPU, 16-bit, head dim 64 or 128, Tq = Tk, no padding or pruning: all of it in
#              hopper_backward.py's `_bwd_kernel`, which adds dQ / s (by TMA) and rowsum(dS) into float32 sums;
#              at head dim 64 it takes both sums of dS rounded to 16 bits, by matmuls with a one-hot column)
#              dc_t = rowsum(dS)_{query at t} - colsum(dS)_t,  dlog f_t = sum_{u >= t} dc_u
#                                                         `_gate_grad_kernel`
# rowsum(dS) is zero in exact arithmetic (a softmax ignores a constant added to its row), but delta comes from
# the stored O, rounded to 16 bits: the kernels' row sums are dO_i . (O_i - rounded O_i). Keeping them cancels
# the same error inside the column sums, which would otherwise bias dlog f at every key before the first query.
# So both sums must be of the same numbers: both of float32 dS, or (Hopper, head dim 64) both of dS in 16 bits.
# P is never stored: both backward kernels recompute it from q, k, c and the forward's lse.
#
# Tile loads: on Hopper GPUs (Triton >= 3.4) the forward and the dQ kernel load their key/value tiles (the forward
# its query tile too) through TMA tensor descriptors, which view a (B, T, heads, D) tensor as one (B * T, heads * D)
# matrix; a tile that runs past its sequence then holds the next sequence's first rows, which the masks drop.
# Other layouts, head dims that are not powers of two and older GPUs load through pointers (`_tma_wanted`).
#
# Everything below works in base 2: the wrapper stores c2 = log2(e) * c once, and the kernels scale
# q k^T by qk_scale = log2(e) * sm_scale, so a logit in base 2 is
#     s2_ij = qk_scale * q_i . k_j + (c2_{p_i} - c2_j)      and   P_ij = exp2(s2_ij - lse2_i).
# c grows to -1e4 and beyond on long sequences, so c never meets q.k on its own: adding it would round q.k away.
# The blocked kernels split the decay around a nearby reference c2_ref (the block's first query, or first key):
#     s2_ij = [qk_scale * q_i . k_j - (c2_j - c2_ref)] + (c2_{p_i} - c2_ref)
# the bracket one multiply-add per score, the second term once per row, where it joins the running max or the lse
# (`_relative_scores`); both terms stay small wherever P_ij is not negligible. The pruning mask still compares the
# decay c2_{p_i} - c2_j itself, exactly as the pruning bounds do. The split kernel reads natural c as the caller
# gave it (any strides) and scales the difference, log2(e) (c_i - c_j).
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
# band gets a loop of its own in the pruning variants only, entered only when the band is not empty (one loop
# with a branch per tile stalls its software pipeline: +10-18% on the H200). Loops that start at a loaded
# bound keep their loads of c vectorized only if the bound is declared a whole block (`tl.multiple_of`) and c is
# addressed as C + n0 + offsets; with both, the pruning variants run within 1-2% of the plain kernels when
# nothing is pruned (benchmarks/NOTES.md, attempt 5). The "auto" threshold's pass over
# the q and k norms skips every head whose whole decay c_0 - c_{T-1} stays within the threshold at U = 0: no
# score of it can be pruned whatever its norms (log f = 0 costs that pass nothing). Decoding's split kernel
# starts each split at its first key block that some row keeps.
# ==================================================================================================


class _TritonForgettingAttention(torch.autograd.Function):
    """O = forgetting attention of (q, k, v, gate), the gate float32 (B, Tk, H): the log gates log f, or with
    ``is_cumsum`` their prefix sums c; gradients for all four. Pruning: a base-2 threshold (B, H), or with
    ``auto_log_eps`` the "auto" one, computed here once c is known. With ``out_weight``, FoX Pro's output norm
    (and gate) of O in the same kernels (blocked.py), returning its output instead; gradients for both."""

    @staticmethod
    def forward(ctx, q, k, v, gate, is_cumsum, scale, key_lo, query_hi, threshold2, auto_log_eps, out_weight,
                out_gate, out_eps):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        split_keys = split._split_wanted(q, k)
        # The split kernel reads c in place (no scan, no copy); the blocked kernels want c2 = log2(e) c, (B, H, Tk).
        c2 = None if split_keys and is_cumsum else blocked._base2_prefix_sums(gate, is_cumsum)
        c, c_scale = (gate, LOG2E) if c2 is None else (c2.transpose(1, 2), 1.0)
        if auto_log_eps is not None:
            threshold2 = pruning._auto_threshold2(q, k, c, c_scale, scale, auto_log_eps)
        out_norm = (out_weight, out_gate, out_eps) if out_weight is not None else None
        ctx.query_bounds = None  # the blocked forward's pruning bounds, which the dQ kernel can reuse
        if split_keys:
            o, lse = split._split_forward(q, k, v, c, c_scale, key_lo, threshold2, scale)
            y = rstd = None
            if out_norm is not None:  # decoding: the norm's own kernel, after the merge of the splits
                y, _, rstd, *_ = fused._rms_norm_launch(o, out_weight, out_eps, o.dtype, gate=out_gate)
                rstd = rstd.view(o.shape[:3])
        else:
            o, lse, ctx.query_bounds, y, rstd = blocked._triton_forward(q, k, v, c2, key_lo, threshold2, scale,
                                                                       out_norm)
        # The gate, not c2: the backward scans it again (a few microseconds) and drops c2 before its peak of memory.
        ctx.save_for_backward(q, k, v, gate, o, lse, key_lo, query_hi, threshold2, out_weight, out_gate, rstd)
        ctx.scale, ctx.is_cumsum, ctx.out_eps = scale, is_cumsum, out_eps
        return o if y is None else y

    @staticmethod
    def backward(ctx, do):
        q, k, v, gate, o, lse, key_lo, query_hi, threshold2, out_weight, out_gate, rstd = ctx.saved_tensors
        out_norm = (out_weight, out_gate, ctx.out_eps) if out_weight is not None else None
        dq, dk, dv, dgate, dweight, dout_gate = blocked._triton_backward(
            do, q, k, v, gate, o, lse, key_lo, query_hi, threshold2, ctx.scale, ctx.is_cumsum, ctx.query_bounds,
            out_norm, rstd)
        return dq, dk, dv, dgate, None, None, None, None, None, None, dweight, dout_gate, None


def _visibility_bounds(q, k, seq_start, cu_seqlens):
    """key_lo (B, Tq) and query_hi (B, Tk) int32 as the kernels read them (see the header above)."""
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


def forgetting_attention_triton(q, k, v, gate, is_cumsum, scale, seq_start, cu_seqlens, adaptive_threshold, log_eps,
                                output_norm=None):
    """forgetting_attention on the Triton kernels; ``gate``: log f (B, Tk, H), or with ``is_cumsum`` its prefix sums;
    ``output_norm``: (weight, gate or None, eps) of FoX Pro's output norm, applied in the same kernels, or None."""
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
    out_weight, out_gate, out_eps = output_norm if output_norm is not None else (None, None, 0.0)
    return _TritonForgettingAttention.apply(q, k, v, gate.float(), is_cumsum, scale, key_lo, query_hi, threshold2,
                                            auto_log_eps, out_weight, out_gate, out_eps)
