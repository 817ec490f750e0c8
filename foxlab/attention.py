"""Forgetting attention: the exact reference, a memory-efficient PyTorch path, and the entry point.

The math (one batch row, one head; docs/fox.md, "Forgetting attention")::

    q: (Tq, D)   k, v: (Tk, D)   log_f: (Tk,)  float32, log f_t = logsigmoid(gate logit) <= 0
    c_t   = sum_{l <= t} log f_l                        inclusive prefix sum, float32
    p_i   = Tk - Tq + i                                 query i sits at key position p_i
    D_ij  = c_{p_i} - c_j   if j <= p_i, else -inf      (= sum_{l=j+1..p_i} log f_l)
    O     = softmax(s * q k^T + D) v                    s = sm_scale, 1/sqrt(D) by default

Batched shapes: q (B, Tq, H, D); k, v (B, Tk, Hkv, D) with Hkv dividing H (grouped-query attention:
query head h reads key/value head h // (H // Hkv)); log_fgate (B, Tk, H), one gate per *query* head.

The gate comes in one of two forms: the per-token log gates ``log_fgate``, or their running sums
``log_fgate_cumsum`` = c (B, Tk, H), float32. Only differences c_i - c_j enter the math, so c may start from
any origin: a decoding cache keeps c and appends c_last + cumsum(new log f), and decoding then needs no scan
over the cache (docs/fox.md, "Decoding with a cache"). Gradients flow to whichever form is given.

Two optional masks, both of which only remove keys:
- ``seq_start`` (B,) int: keys before ``seq_start[b]`` are invisible (left padding). A query row that
  sees no key at all returns zeros, never NaN.
- ``cu_seqlens`` (N + 1,) int with B = 1 and Tq = Tk: packed variable-length sequences; a query sees
  only keys of its own sequence.

Backends: ``reference`` materializes the (Tq, Tk) scores (exact, readable, returns probabilities too);
``torch`` processes query chunks under activation checkpointing, so memory is O(T * chunk) in forward
and backward; ``triton`` runs the fused kernels of kernels/; ``auto`` picks Triton on CUDA, else ``torch``.
Adaptive computation pruning (``adaptive_threshold``, acp.py) works on the torch and Triton paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import acp
from .kernels import forgetting_attention_triton, triton_unavailable_reason

BACKENDS = ("auto", "triton", "torch", "reference")
TORCH_CHUNK_SIZE = 256



# --------------------------------------------------------------------------------------------------
# Input checks: one place, every backend goes through it.
# --------------------------------------------------------------------------------------------------


def _gate_input(log_fgate, log_fgate_cumsum) -> tuple[str, torch.Tensor, bool]:
    """(argument name, tensor, is it the prefix sums) of the one gate form given."""
    if (log_fgate is None) == (log_fgate_cumsum is None):
        raise ValueError("pass exactly one of log_fgate (per-token log forget gates) or log_fgate_cumsum (their "
                         "running sums over the keys), both of shape (batch, Tk, heads)")
    if log_fgate is not None:
        return "log_fgate", log_fgate, False
    return "log_fgate_cumsum", log_fgate_cumsum, True


def _check_inputs(q, k, v, gate_name, gate, sm_scale, seq_start, cu_seqlens, backend) -> float:
    """Validate shapes, dtypes and devices (``gate`` is the argument ``gate_name``); return the softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v), (gate_name, gate)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq_len, heads, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    B, Tq, H, D = q.shape
    Bk, Tk, Hkv, Dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"k must have shape ({B}, Tk, Hkv, {D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"k/v heads ({Hkv}) must divide q heads ({H})")
    if Tq > Tk:
        raise ValueError(f"q has more positions ({Tq}) than k ({Tk}); queries are aligned to the last Tq keys")
    if gate.shape != (B, Tk, H):
        raise ValueError(f"{gate_name} must have shape (batch, Tk, heads) = {(B, Tk, H)}, got {tuple(gate.shape)}")
    if gate.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{gate_name} must be float32 (or float64), got {gate.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v), (gate_name, gate)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if seq_start is not None:
        if not isinstance(seq_start, torch.Tensor) or seq_start.shape != (B,) or seq_start.is_floating_point():
            raise ValueError(f"seq_start must be an integer tensor of shape ({B},)")
        if seq_start.device != q.device:
            raise ValueError(f"seq_start is on {seq_start.device} but q is on {q.device}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor of sequence offsets")
        if B != 1 or Tq != Tk:
            raise ValueError(f"cu_seqlens needs packed inputs: batch 1 and Tq == Tk, got batch {B}, Tq {Tq}, Tk {Tk}")
        offsets = cu_seqlens.tolist()
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != Tk or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to the packed length {Tk}, got {offsets}")
        if seq_start is not None:
            raise ValueError("pass either seq_start or cu_seqlens, not both")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if sm_scale is None:
        return 1.0 / math.sqrt(D)
    if not isinstance(sm_scale, (int, float)) or not math.isfinite(sm_scale) or sm_scale <= 0:
        raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale!r}")
    return float(sm_scale)


# --------------------------------------------------------------------------------------------------
# Exact reference and the chunked PyTorch path: both are `_attend` on slices of the same tensors.
# --------------------------------------------------------------------------------------------------


def _accumulation_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _visible(q_pos, k_pos, seq_start, segment_ids):
    """Boolean (B, 1, tq, tk): key position k_pos[j] is visible from query position q_pos[i]."""
    vis = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if seq_start is not None:
        vis = vis & (k_pos >= seq_start[:, None])[:, None, None, :]
    if segment_ids is not None:
        vis = vis & (segment_ids[q_pos][:, None] == segment_ids[k_pos][None, :])[None, None]
    return vis


def _attend(q, k, v, c_q, c_k, visible, scale):
    """softmax(scale * q k^T + c_q - c_k) v over the visible keys, for one block of queries.

    q (B, tq, H, D); k, v (B, tk, H, D); c_q (B, tq, H); c_k (B, tk, H); visible (B, 1, tq, tk).
    Returns the output (B, tq, H, D) and the probabilities (B, H, tq, tk), both in q's dtype.
    """
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits = scores + c_q.transpose(1, 2)[..., :, None] - c_k.transpose(1, 2)[..., None, :]
    # A finite fill instead of -inf keeps rows with no visible key NaN-free (forward and backward);
    # multiplying by `visible` then zeroes them.
    logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1) * visible
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), probs


def _prefix_sums(gate, is_cumsum, dtype):
    """c (B, Tk, H) in ``dtype`` from either gate form (the prefix sums are taken as given)."""
    return gate.to(dtype) if is_cumsum else gate.to(dtype).cumsum(dim=1)


def _prepare(q, k, v, c, seq_start, cu_seqlens):
    """Upcast to the accumulation dtype, expand GQA heads, and build the per-position bookkeeping."""
    acc = _accumulation_dtype(q)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    group = H // k.shape[2]
    k, v = (t.to(acc).repeat_interleave(group, dim=2) for t in (k, v))
    c = c.to(acc)
    segment_ids = None
    if cu_seqlens is not None:
        lengths = cu_seqlens.diff().to(q.device)
        segment_ids = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
    k_pos = torch.arange(Tk, device=q.device)
    return q.to(acc), k, v, c, q_pos, k_pos, segment_ids


def forgetting_attention_reference(q, k, v, log_fgate=None, *, log_fgate_cumsum=None, sm_scale=None, seq_start=None,
                                   cu_seqlens=None, return_probs=False):
    """Exact forgetting attention with the (Tq, Tk) scores materialized (see the module docstring).

    Takes the gate as ``log_fgate`` or as its prefix sums ``log_fgate_cumsum`` (like ``forgetting_attention``).
    Accumulates in float32 (float64 for float64 inputs). Returns the output (B, Tq, H, D) in q's dtype,
    and with ``return_probs`` also the attention probabilities (B, H, Tq, Tk) in the accumulation dtype.
    """
    gate_name, gate, is_cumsum = _gate_input(log_fgate, log_fgate_cumsum)
    scale = _check_inputs(q, k, v, gate_name, gate, sm_scale, seq_start, cu_seqlens, "reference")
    c = _prefix_sums(gate, is_cumsum, _accumulation_dtype(q))
    qa, ka, va, c, q_pos, k_pos, segment_ids = _prepare(q, k, v, c, seq_start, cu_seqlens)
    out, probs = _attend(qa, ka, va, c[:, q_pos], c, _visible(q_pos, k_pos, seq_start, segment_ids), scale)
    out = out.to(q.dtype)
    return (out, probs) if return_probs else out


def _forgetting_attention_chunked(q, k, v, c, scale, seq_start, cu_seqlens, threshold=None,
                                  chunk_size=TORCH_CHUNK_SIZE):
    """The reference computed one block of ``chunk_size`` queries at a time, from the gate's prefix sums c.

    Each block only reads the keys it can see causally, and is checkpointed, so neither forward nor
    backward ever holds more than (chunk_size, Tk) scores per head. With a pruning ``threshold`` (B, H) a
    block also skips the keys that all its rows prune (acp.py) and masks the scores with decay < threshold.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, c))
    qa, ka, va, c, q_pos, k_pos, segment_ids = _prepare(q, k, v, c, seq_start, cu_seqlens)
    c_heads = c.transpose(1, 2)  # (B, H, Tk)
    threshold = None if threshold is None else threshold.to(c.dtype)

    def block(qb, kb, vb, cqb, ckb, vis):
        return _attend(qb, kb, vb, cqb, ckb, vis, scale)[0]

    outs = []
    for start in range(0, q.shape[1], chunk_size):
        qp = q_pos[start:start + chunk_size]
        first = 0
        if threshold is not None:  # the block's first row prunes least
            first = int(acp.first_kept_key(c_heads, c_heads[:, :, qp[:1]], threshold).min())
        keys = slice(first, int(qp[-1]) + 1)
        vis = _visible(qp, k_pos[keys], seq_start, segment_ids)
        if threshold is not None:
            decay = c[:, qp].transpose(1, 2)[..., :, None] - c_heads[:, :, None, keys]
            vis = vis & (decay >= threshold[:, :, None, None])
        args = (qa[:, start:start + chunk_size], ka[:, keys], va[:, keys], c[:, qp], c[:, keys], vis)
        outs.append(checkpoint(block, *args, use_reentrant=False) if needs_grad else block(*args))
    return torch.cat(outs, dim=1).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------------


def output_norm(o: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None) -> torch.Tensor:
    """FoX Pro's output norm in plain PyTorch: y = o / sqrt(mean(o^2) + eps) * weight (* sigmoid(gate)), the mean over
    each head's D features. o, gate (B, T, H, D); weight (H, D) (one vector per head) or (D,) (shared). Computed in
    float32 (float64 for float64 o), returned in o's dtype."""
    acc = _accumulation_dtype(o)
    y = F.rms_norm(o.to(acc), (o.shape[-1],), eps=eps) * weight.to(acc)
    if gate is not None:
        y = y * torch.sigmoid(gate.to(acc))
    return y.to(o.dtype)


def _check_output_norm(q, weight, gate, eps) -> None:
    if weight is None:
        if gate is not None:
            raise ValueError("output_gate needs output_norm_weight (the gate multiplies the output norm's result)")
        return
    H, D = q.shape[2:]
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or tuple(weight.shape) not in (
            (H, D), (D,)):
        raise ValueError(f"output_norm_weight must be a floating-point tensor of shape ({H}, {D}) (one vector per head) "
                         f"or ({D},), got {tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight!r}")
    if gate is not None and (not isinstance(gate, torch.Tensor) or tuple(gate.shape) != tuple(q.shape)
                             or not gate.is_floating_point()):
        raise ValueError(f"output_gate must be a floating-point tensor of q's shape {tuple(q.shape)}, got "
                         f"{tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__}")
    for name, t in (("output_norm_weight", weight), ("output_gate", gate)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"output_norm_eps must be a non-negative number, got {eps!r}")


def forgetting_attention(q, k, v, log_fgate=None, *, log_fgate_cumsum=None, sm_scale=None, seq_start=None,
                         cu_seqlens=None, adaptive_threshold=None, log_eps=acp.DEFAULT_LOG_EPS, backend="auto",
                         output_norm_weight=None, output_gate=None, output_norm_eps=1e-6):
    """Forgetting attention, O = softmax(s q k^T + D) v with D_ij = c_i - c_j (module docstring).

    Args:
        q: (B, Tq, H, D). k, v: (B, Tk, Hkv, D), Hkv divides H, Tq <= Tk (queries are the last Tq positions).
        log_fgate: (B, Tk, H) float32 log forget gates (<= 0), one per query head.
        log_fgate_cumsum: instead of log_fgate (exactly one of the two), their running sums over the keys
            c = cumsum(log f, dim=1), (B, Tk, H) float32, from any origin; any strides (a (B, H, Tk) buffer
            viewed with .transpose(1, 2) is read in place). Decoding from c skips the scan over the cache.
        sm_scale: softmax scale, 1/sqrt(D) by default.
        seq_start: optional (B,) int, the first visible key of each row (left padding).
        cu_seqlens: optional (N + 1,) int offsets of packed sequences (B = 1, Tq = Tk).
        adaptive_threshold: adaptive computation pruning (acp.py): None (exact, the default); "auto", which drops
            at most e^log_eps of any query's attention weight (threshold from the query and key norms); or a
            log-space threshold delta <= 0, a number or a tensor broadcastable to (B, H): every score whose
            decay c_i - c_j is below delta is dropped. Needs log_fgate <= 0 (c non-increasing). The reference
            backend never prunes.
        log_eps: for "auto", the log of the largest attention weight a query may lose (default -10).
        backend: "auto" (Triton on CUDA for float16/bfloat16/float32 and head dims <= 256, else "torch"),
            "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" or "reference".
        output_norm_weight: FoX Pro's output norm, applied to O before it is returned (`output_norm`): (H, D) or
            (D,) weights; the Triton backend computes it in the attention kernels' forward and backward.
        output_gate: with output_norm_weight, the output gate's logits (B, Tq, H, D): the norm's result times
            sigmoid(output_gate). output_norm_eps: the norm's eps.
    Returns:
        (B, Tq, H, D) in q's dtype.
    """
    gate_name, gate, is_cumsum = _gate_input(log_fgate, log_fgate_cumsum)
    scale = _check_inputs(q, k, v, gate_name, gate, sm_scale, seq_start, cu_seqlens, backend)
    _check_output_norm(q, output_norm_weight, output_gate, output_norm_eps)
    if adaptive_threshold is not None and backend == "reference":
        raise ValueError("backend='reference' is exact and never prunes: drop adaptive_threshold or pick another "
                         "backend")
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_unavailable_reason(q) is None else "torch"
    if backend == "triton":
        norm = None
        if output_norm_weight is not None:
            out_gate = output_gate if output_gate is None or output_gate.stride(-1) == 1 else output_gate.contiguous()
            norm = (output_norm_weight.contiguous(), out_gate, float(output_norm_eps))
        return forgetting_attention_triton(q, k, v, gate, is_cumsum, scale, seq_start, cu_seqlens, adaptive_threshold,
                                           log_eps, norm)
    if backend == "reference":
        o = forgetting_attention_reference(q, k, v, log_fgate, log_fgate_cumsum=log_fgate_cumsum, sm_scale=scale,
                                           seq_start=seq_start, cu_seqlens=cu_seqlens)
    else:
        threshold = acp.threshold(q, k, adaptive_threshold, log_eps=log_eps, sm_scale=scale)
        c = _prefix_sums(gate, is_cumsum, _accumulation_dtype(q))
        o = _forgetting_attention_chunked(q, k, v, c, scale, seq_start, cu_seqlens, threshold)
    return o if output_norm_weight is None else output_norm(o, output_norm_weight, output_norm_eps, output_gate)


def log_forget_gate(logits: torch.Tensor) -> torch.Tensor:
    """log f = logsigmoid(logits), computed and returned in float32 (the gate is never stored in bf16)."""
    return F.logsigmoid(logits.float())
