"""Adaptive computation pruning (ACP): which scores the forget gate has erased, and how much work that saves.

Lin et al. 2025, "Adaptive Computation Pruning for the Forgetting Transformer" (arXiv 2504.06949). The decay
term of a score, D_ij = c_{p_i} - c_j, only falls as the key j moves back from the query (c is a running sum
of log f <= 0). Drop every score with D_ij < delta. If |s q_i . k_j| <= U for all i, j, each dropped term
weighs at most e^(U + delta) while the query's own key (D = 0) weighs at least e^(-U), so with N keys

    dropped attention mass of any query  <=  N e^(2U + delta)  =  eps   for   delta = -(2U + log N) + log eps.

``threshold(q, k, "auto")`` computes that delta per (batch, head) with U = s max_t |q_t| max_t |k_t|
(Cauchy-Schwarz). The dropped keys of a query form a prefix of its keys, and a later query drops a longer
one, so a kernel skips whole tiles of keys before a start it finds from the prefix sums c alone, and masks only
the few tiles where the boundary passes. Pruning needs log f <= 0 (true gates); the model's gates always are.

This module holds the threshold, the bookkeeping in plain PyTorch (no T x T tensor anywhere) and the
statistics a user asks for: how many scores and kernel tiles a model's gates let the kernels skip.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

DEFAULT_LOG_EPS = -10.0
# The tile of the forward kernel on the GPU (head dims up to 128), used to count skipped tiles.
DEFAULT_TILE = (64, 64)


def threshold(q, k, adaptive_threshold, *, log_eps: float = DEFAULT_LOG_EPS, sm_scale: float | None = None):
    """The pruning threshold delta per (batch, head), float32 (B, H) in natural-log units, or None (no pruning).

    ``adaptive_threshold``: None; a number; a tensor broadcastable to (B, H); or "auto", which gives
    delta = -(2U + log Tk) + log_eps with U = sm_scale * max|q| * max|k| per batch row and head (the bound in
    the module docstring: at most e^log_eps of any query's attention weight is dropped). q (B, Tq, H, D) and
    k (B, Tk, Hkv, D) as in ``forgetting_attention``. Every threshold must be <= 0: the diagonal (D = 0) is
    never pruned.
    """
    if adaptive_threshold is None:
        return None
    B, _, H, D = q.shape
    if isinstance(adaptive_threshold, str):
        if adaptive_threshold != "auto":
            raise ValueError(f'adaptive_threshold must be None, "auto", a number or a tensor, got {adaptive_threshold!r}')
        check_log_eps(log_eps)
        scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
        group = H // k.shape[2]
        q, k = q.detach(), k.detach()  # the threshold picks which scores to drop; no gradient flows through it
        q_max = torch.linalg.vector_norm(q, dim=-1, dtype=torch.float32).amax(dim=1)  # (B, H)
        k_max = torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32).amax(dim=1).repeat_interleave(group, dim=1)
        bound = scale * q_max * k_max
        return -(2 * bound + math.log(k.shape[1])) + log_eps
    if isinstance(adaptive_threshold, bool) or not isinstance(adaptive_threshold, (int, float, torch.Tensor)):
        raise ValueError(f'adaptive_threshold must be None, "auto", a number or a tensor, got '
                         f'{type(adaptive_threshold).__name__}')
    delta = torch.as_tensor(adaptive_threshold, dtype=torch.float32, device=q.device)
    try:
        delta = torch.broadcast_to(delta, (B, H)).contiguous()
    except RuntimeError:
        raise ValueError(f"adaptive_threshold must broadcast to (batch, heads) = {(B, H)}, "
                         f"got shape {tuple(delta.shape)}") from None
    if not bool(((delta <= 0) & ~delta.isnan()).all()):
        raise ValueError("adaptive_threshold must be <= 0 everywhere (a log-space decay; 0 or above would prune "
                         "a query's own key)")
    return delta


def check_log_eps(log_eps) -> None:
    if isinstance(log_eps, bool) or not isinstance(log_eps, (int, float)) or not -1e4 <= log_eps <= 0:
        raise ValueError(f"log_eps must be a number in [-1e4, 0] (the log of the dropped attention mass), got "
                         f"{log_eps!r}")


def first_kept_key(c: torch.Tensor, c_query: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Index of the first key j with c_query - c_j >= delta, per (B, H, query).

    c (B, H, Tk) running log-decay, non-increasing along keys; c_query (B, H, n) the queries' c; delta (B, H).
    Keys before the index are pruned for that query (binary search: O(n log Tk), no T x T).
    """
    return torch.searchsorted((-c).contiguous(), (delta[..., None] - c_query).contiguous())


@dataclass
class PruningStats:
    """What pruning skips, per (batch, head) (or aggregated, see ``pruning_statistics``).

    ``pruned_fraction``: share of the visible query-key scores dropped (the attention FLOPs that the math
    removes). ``skipped_tile_fraction``: share of the forward kernel's (tile_m x tile_n) score tiles that
    it never computes (the FLOPs it really saves; tiles on the boundary are computed and masked).
    ``tiles``: (B, H, Tq / tile_m, Tk / tile_n) int8 map, 0 = not needed (causal or padding), 1 = computed,
    2 = skipped by pruning.
    """

    pruned_fraction: torch.Tensor
    skipped_tile_fraction: torch.Tensor
    tiles: torch.Tensor
    tile: tuple[int, int]


def tile_statistics(log_fgate: torch.Tensor, delta: torch.Tensor, *, num_queries: int | None = None,
                    seq_start: torch.Tensor | None = None, tile: tuple[int, int] = DEFAULT_TILE) -> PruningStats:
    """Count what a threshold delta (B, H) prunes for gates log_fgate (B, Tk, H); queries are the last
    ``num_queries`` positions (all by default); ``seq_start`` (B,) hides keys before it (left padding).

    Per query row only two numbers matter, its first visible and first kept key, so this is O(T log T) for
    the scores and O(T^2 / tile^2) for the tile map.
    """
    B, Tk, H = log_fgate.shape
    Tq = Tk if num_queries is None else num_queries
    c = log_fgate.double().cumsum(dim=1).transpose(1, 2)  # (B, H, Tk)
    pos = torch.arange(Tk - Tq, Tk, device=c.device)
    lo = torch.zeros(B, dtype=torch.long, device=c.device) if seq_start is None else seq_start.long().clamp(0, Tk)
    lo = lo[:, None, None]
    kept_from = first_kept_key(c, c[:, :, pos], delta.double()).clamp_min(lo)  # (B, H, Tq)
    visible = (pos + 1 - lo).clamp_min(0)  # keys lo..p per row
    pruned = (kept_from - lo).clamp_min(0).minimum(visible)
    pruned_fraction = pruned.sum(-1) / visible.sum(-1).clamp_min(1)

    tm, tn = tile
    q_blocks, k_blocks = -(-Tq // tm), -(-Tk // tn)
    row0 = torch.arange(q_blocks, device=c.device) * tm  # first and last query row of each query block
    row1 = (row0 + tm).clamp_max(Tq) - 1
    key0 = torch.arange(k_blocks, device=c.device) * tn
    last_pos = pos[row1][:, None]
    needed = (key0 <= last_pos) & (key0 + tn > lo[..., None]) & (lo[..., None] <= last_pos)  # (B, 1, Qb, Kb)
    # A tile is skipped when its last key is pruned for the block's first row (the row that prunes least).
    last_key = (key0 + tn).clamp_max(Tk) - 1
    skipped = needed & (last_key[None, None, None, :] < kept_from[:, :, row0][..., None])
    tiles = needed.to(torch.int8) + skipped.to(torch.int8)
    skipped_fraction = skipped.sum((-1, -2)) / needed.sum((-1, -2)).clamp_min(1)
    return PruningStats(pruned_fraction.float(), skipped_fraction.float(), tiles, tile)


@contextmanager
def record_attention_inputs(model):
    """Within the block, every ForgettingAttention of ``model`` appends (q, k, log f, seq_start) of each call,
    detached, to the yielded dict {layer index: [calls]}."""
    from .model import ForgettingAttention

    records: dict[int, list] = {}
    modules = [m for m in model.modules() if isinstance(m, ForgettingAttention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no ForgettingAttention layers (not a foxlab model?)")

    def recorder(module):
        def attend(q, k, v, gate, seq_start, *output_norm):
            log_f = gate.get("log_fgate")
            if log_f is None:  # a cache passes the prefix sums c (from 0): log f_t = c_t - c_{t-1}
                c = gate["log_fgate_cumsum"]
                log_f = torch.diff(c, dim=1, prepend=torch.zeros_like(c[:, :1]))
            records.setdefault(module.layer_idx, []).append((q.detach(), k.detach(), log_f.detach(), seq_start))
            return type(module).attend(module, q, k, v, gate, seq_start, *output_norm)
        return attend

    for m in modules:
        m.attend = recorder(m)
    try:
        yield records
    finally:
        for m in modules:
            del m.attend


@torch.no_grad()
def pruning_statistics(model, input_ids: torch.Tensor, *, attention_mask=None, log_eps: float = DEFAULT_LOG_EPS,
                       tile: tuple[int, int] = DEFAULT_TILE) -> dict:
    """What adaptive computation pruning skips in ``model`` on ``input_ids`` (B, T), per layer and head.

    Runs one forward pass without pruning, records each layer's q, k and gates, and applies the "auto"
    threshold for ``log_eps``. Returns {"pruned_fraction": (layers, H), "skipped_tile_fraction": (layers, H)}
    (means over the batch, float tensors), "per_layer": [PruningStats per layer], "thresholds": (layers, B, H).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    with record_attention_inputs(model) as records:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    per_layer, deltas = [], []
    for layer in sorted(records):
        q, k, log_f, seq_start = records[layer][0]
        delta = threshold(q, k, "auto", log_eps=log_eps)
        per_layer.append(tile_statistics(log_f, delta, num_queries=q.shape[1], seq_start=seq_start, tile=tile))
        deltas.append(delta)
    return {
        "pruned_fraction": torch.stack([s.pruned_fraction.mean(0) for s in per_layer]),
        "skipped_tile_fraction": torch.stack([s.skipped_tile_fraction.mean(0) for s in per_layer]),
        "per_layer": per_layer,
        "thresholds": torch.stack(deltas),
    }
