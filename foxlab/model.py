"""The Forgetting Transformer (FoX): attention, MLP, block, backbone, causal-LM head and cache.

One block, pre-norm::

    h = x + ForgettingAttention(RMSNorm(x))
    y = h + SwiGLU(RMSNorm(h))

ForgettingAttention (per head; shapes B batch, T tokens, H query heads, Hkv key/value heads, D head dim)::

    q, k, v  = W_q x, W_k x, W_v x                  (B, T, H | Hkv, D)
    k, v     <- KV-shift (optional): k'_t = a_t k_{t-1} + (1 - a_t) k_t
    q, k     <- per-head RMSNorm (optional qk_norm), RoPE (Transformer baselines only)
    log f_t  = logsigmoid(w_f . x_t + b_f)          (B, T, H), float32; 0 for fgate_type="none"
    o        = forgetting_attention(q, k, v, log f) (attention.py: softmax(s q k^T + c_i - c_j) v; with a cache,
               from the cached prefix sums c instead of log f)
    o        <- per-head RMSNorm (optional), then o * sigmoid(W_g x) (optional output gate); with fuse_norm the
               attention kernels apply both to their output (forgetting_attention's output_norm_weight)
    out      = W_o o
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from . import fused as fused_ops
from . import fused_inputs
from .checkpoints import check_loading_info, prepare_from_pretrained
from .config import ForgettingTransformerConfig
from .attention import forgetting_attention, forgetting_attention_reference, log_forget_gate, output_norm

# transformers renamed the cache argument and output field from `past_key_values` to `cache` in 5.2x;
# the model accepts both names and returns the one this version's generation loop reads.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class ForgettingTransformerModelOutput(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus ``forget_gates``: per layer, the log forget gates (B, T, H) in float32."""

    forget_gates: tuple[torch.Tensor, ...] | None = None


@dataclass
class ForgettingTransformerCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus ``forget_gates``: per layer, the log forget gates (B, T, H) in float32."""

    forget_gates: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


class ForgettingCacheLayer(DynamicLayer):
    """One layer's decoding state.

    ``keys``/``values`` (B, Hkv, T, D) as DynamicLayer keeps them (after shift, norm and RoPE), the running sums of
    the log forget gates ``fgate_cumsum`` (B, H, T) float32 (c_t = log f_0 + ... + log f_t, heads first as the
    kernels read it), and for KV-shift the raw (pre-shift) keys and values ``shift_states["k" | "v"]`` (B, n, Hkv, D)
    whose last token shifts into the next one. New tokens append c_last + cumsum(their log f), the same float32
    running sum a scan over all gates would give; attention reads c in place (``log_fgate_cumsum``), so a decoding
    step costs no scan over the cache.

    ``crop`` must restore the shift state of the new last token, so after ``activate_past_recording()`` (which
    assisted generation calls) ``shift_states`` keeps every raw token from then on (n grows with the cache);
    otherwise only the last one (n = 1), and a KV-shift cache cannot be cropped.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.fgate_cumsum: torch.Tensor | None = None
        self.shift_states: dict[str, torch.Tensor] = {}
        self.record_past = False

    def append(self, k: torch.Tensor, v: torch.Tensor, log_fgate: torch.Tensor):
        """Add T new tokens (k, v: (B, T, Hkv, D); log_fgate: (B, T, H) float32); return all cached keys and values
        in the same layout and the gate's prefix sums c (B, T_all, H), a view of ``fgate_cumsum``."""
        keys, values = self.update(k.transpose(1, 2), v.transpose(1, 2))
        c_new = log_fgate.float().transpose(1, 2).cumsum(dim=-1)
        cached = self.fgate_cumsum
        if cached is not None and cached.shape[-1] > 0:
            c_new = cached[..., -1:] + c_new
        self.fgate_cumsum = c_new if cached is None else torch.cat([cached, c_new], dim=-1)
        return keys.transpose(1, 2), values.transpose(1, 2), self.fgate_cumsum.transpose(1, 2)

    def shift_state(self, name: str) -> torch.Tensor | None:
        """The raw ``name`` ("k" or "v") of the last cached token (B, 1, Hkv, D), or None before the first."""
        states = self.shift_states.get(name)
        return None if states is None else states[:, -1:]

    def push_shift_inputs(self, name: str, raw: torch.Tensor) -> None:
        """Remember the raw (pre-shift) ``name`` of T new tokens (B, T, Hkv, D)."""
        raw = raw.detach()
        if self.record_past and name in self.shift_states:
            self.shift_states[name] = torch.cat([self.shift_states[name], raw], dim=1)
        else:
            # a copy: raw may be a slice of the attention's projection output, which a view would keep alive
            self.shift_states[name] = (raw if self.record_past else raw[:, -1:]).clone()

    def activate_past_recording(self) -> None:
        """Keep the raw KV-shift inputs of every token from now on, so that ``crop`` can undo any of them."""
        self.record_past = True

    def _map_extras(self, fn) -> None:
        if self.fgate_cumsum is not None:
            self.fgate_cumsum = fn(self.fgate_cumsum)
        self.shift_states = {name: fn(state) for name, state in self.shift_states.items()}

    def reset(self) -> None:
        super().reset()
        self.fgate_cumsum, self.shift_states = None, {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_extras(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_extras(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_extras(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` cached tokens (a positive value: the length to keep, the older form)."""
        length = self.get_seq_length()
        keep = min(tokens_to_remove, length) if tokens_to_remove > 0 else max(length + tokens_to_remove, 0)
        if keep == length:
            return
        self.shift_states = self._cropped_shift_states(length - keep, keep)
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]
        self.fgate_cumsum = self.fgate_cumsum[..., :keep]

    def _cropped_shift_states(self, removed: int, keep: int) -> dict[str, torch.Tensor]:
        if keep == 0:
            return {}  # the next token starts a sequence: it shifts in zeros
        for states in self.shift_states.values():
            if removed >= states.shape[1]:
                raise RuntimeError(
                    f"cannot crop {removed} tokens from a KV-shift cache that kept the raw keys/values of only "
                    f"{states.shape[1]}: call cache.activate_past_recording() before the tokens to undo are added")
        return {name: states[:, :states.shape[1] - removed] for name, states in self.shift_states.items()}


class ForgettingTransformerCache(Cache):
    """The decoding cache of a ForgettingTransformer: one ForgettingCacheLayer per layer.

    Pass it as ``cache=`` (or ``past_key_values=``); the model creates one when ``use_cache=True``.
    """

    def __init__(self, config: ForgettingTransformerConfig):
        super().__init__(layers=[ForgettingCacheLayer() for _ in range(config.num_hidden_layers)])


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of x (B, T, H, D) at integer positions (B, T)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[..., None].float() * inv_freq
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def gate_bias_for_timescales(t_min: float, t_max: float, num_heads: int) -> torch.Tensor:
    """Gate biases b = -log(expm1(1/T)), T log-spaced from t_min to t_max: sigmoid(b) = exp(-1/T)."""
    timescales = torch.logspace(math.log10(t_min), math.log10(t_max), num_heads, dtype=torch.float64)
    return (-torch.log(torch.expm1(1.0 / timescales))).float()


class ForgetGate(nn.Module):
    """Per-head log forget gates log f_t (B, T, H), float32.

    ``full``: logsigmoid(w_f . x_t + b_f); ``bias_only``: logsigmoid(b_f), learned; ``fixed``: logsigmoid(b_f),
    a constant buffer. The bias is the module's own tensor for every kind, so initialization reaches it.
    """

    def __init__(self, config: ForgettingTransformerConfig):
        super().__init__()
        self.kind, self.num_heads = config.fgate_type, config.num_heads
        self.proj = nn.Linear(config.hidden_size, config.num_heads, bias=False) if self.kind == "full" else None
        if self.kind == "fixed":
            self.register_buffer("bias", torch.zeros(config.num_heads))
        else:
            self.bias = nn.Parameter(torch.zeros(config.num_heads))

    def forward(self, x: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        """log f for x (B, T, hidden); ``projected``: w_f . x when the caller has it already (the attention computes
        it in one matmul with its other per-head projections)."""
        logits = self.bias.expand(*x.shape[:-1], self.num_heads)
        if self.proj is not None:
            logits = (self.proj(x) if projected is None else projected) + logits
        return log_forget_gate(logits)


class TokenShift(nn.Module):
    """KV-shift: x'_t = a_t x_{t-1} + (1 - a_t) x_t, with a per-head a_t = sigmoid(w . h_t) from the block input h.

    ``proj`` holds w; the attention computes w . h_t together with its other per-head projections and passes the
    result in. With ``fuse_norm`` on CUDA the attention runs the shift in fused_inputs.attention_inputs instead.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_heads, bias=False)

    def forward(self, x: torch.Tensor, previous: torch.Tensor | None, a_logits: torch.Tensor) -> torch.Tensor:
        """x (B, T, Hkv, D); previous: x of the token before this chunk (B, 1, Hkv, D) or None; a_logits: w . h_t
        (B, T, Hkv)."""
        if previous is None:
            previous = torch.zeros_like(x[:, :1])
        shifted = torch.cat([previous.to(x.dtype), x[:, :-1]], dim=1)
        a = torch.sigmoid(a_logits)[..., None].to(x.dtype)
        return a * shifted + (1 - a) * x


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over each head's D features of x (B, T, H, D), each head with its own weights (H * D of them);
    ``gate`` (B, T, H, D): the output times sigmoid(gate), as fused.RMSNorm takes it. ``fused``: one Triton kernel
    on CUDA (fused.rms_norm with (H, D) weights) instead of the PyTorch ops."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, fused: bool = False):
        super().__init__(num_heads * head_dim, eps=eps)
        self.num_heads, self.head_dim, self.fused = num_heads, head_dim, fused

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused and fused_ops.triton_wanted(x):
            return fused_ops.rms_norm(x, self.head_weights(), self.eps, gate=gate)
        return output_norm(x, self.head_weights(), self.eps, gate)  # x's dtype: q, k, v must share one

    def head_weights(self) -> torch.Tensor:
        """The weights as (H, D), one row per head."""
        return self.weight.view(self.num_heads, self.head_dim)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}"


def head_norm(num_heads: int, head_dim: int, eps: float, shared: bool, fused: bool = False) -> nn.RMSNorm:
    """Per-head RMSNorm of (B, T, heads, D) with D weights shared by all heads (fused.RMSNorm) or H * D
    (HeadRMSNorm); either is a Triton kernel when ``fused`` on CUDA."""
    return fused_ops.RMSNorm(head_dim, eps=eps, fused=fused) if shared else HeadRMSNorm(num_heads, head_dim, eps, fused)


def stacked_linear(x: torch.Tensor, linears: list[nn.Linear], align: int = 1) -> list[torch.Tensor]:
    """``[linear(x) for linear in linears]`` (bias-free Linears) as one matmul with their weights stacked.

    The same math in fewer launches: each Linear costs a matmul forward and two backward, plus an add into x's
    gradient, and a training step pays host time for every launch. The outputs are column slices of one tensor;
    the fused kernels and the attention kernels read such slices in place. ``align``: rows of zeros are stacked
    under the weights until the output's row stride is a multiple of it (the attention kernels vectorize their
    loads only on rows 16 elements apart); their columns are dropped. Without autograd (inference, decoding) the
    Linears run one by one: there the stacking would copy every weight on each call, and decoding a token is
    bound by reading the weights.
    """
    if len(linears) == 1 or not torch.is_grad_enabled():
        return [linear(x) for linear in linears]
    weights = [linear.weight for linear in linears]
    sizes = [linear.out_features for linear in linears]
    padding = -sum(sizes) % align
    if padding:
        weights.append(weights[0].new_zeros(padding, weights[0].shape[1]))
    return list(F.linear(x, torch.cat(weights)).split(sizes + [padding], dim=-1)[:len(linears)])


class ForgettingAttention(nn.Module):
    """Multi-head (grouped-query) softmax attention with a per-head forget gate; see the module docstring."""

    def __init__(self, config: ForgettingTransformerConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, Hkv, D, C = config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, Hkv * D, bias=False)
        self.v_proj = nn.Linear(C, Hkv * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        self.fgate = ForgetGate(config) if config.fgate_type != "none" else None
        qk_shared, o_shared = config.qk_norm_share_param_across_head, config.output_norm_share_param_across_head
        fused = config.fuse_norm
        self.q_norm = head_norm(H, D, config.qk_norm_eps, qk_shared, fused) if config.qk_norm else None
        self.k_norm = head_norm(Hkv, D, config.qk_norm_eps, qk_shared, fused) if config.qk_norm else None
        self.o_norm = head_norm(H, D, config.norm_eps, o_shared, fused) if config.use_output_norm else None
        self.g_proj = nn.Linear(C, H * D, bias=False) if config.use_output_gate else None
        self.shifts = nn.ModuleDict({name: TokenShift(C, Hkv) for name, on in
                                     (("k", config.use_k_shift), ("v", config.use_v_shift)) if on})

    def project(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, T, C) through every input projection, in one matmul (stacked_linear): "q" (B, T, H, D), "k" and "v"
        (B, T, Hkv, D), "g" (B, T, H, D) the output gate's logits, then the per-head scalars "f" (B, T, H) the forget
        gate's w_f . x and "shift_k" / "shift_v" (B, T, Hkv) the KV-shift logits, each where the config has it."""
        linears = {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj, "g": self.g_proj,
                   "f": self.fgate.proj if self.fgate is not None else None,
                   **{"shift_" + name: shift.proj for name, shift in self.shifts.items()}}
        linears = {name: linear for name, linear in linears.items() if linear is not None}
        out = dict(zip(linears, stacked_linear(x, list(linears.values()), align=16)))
        for name in ("q", "k", "v", "g"):
            if name in out:
                out[name] = out[name].unflatten(-1, (-1, self.head_dim))
        return out

    def shift_and_norm(self, proj, layer_cache, token_mask):
        """(q, k, v) from the outputs of ``project``, after KV-shift and the q/k norms where the config has them: one
        fused launch (fused_inputs.attention_inputs) with ``fuse_norm`` on CUDA, else the modules one by one."""
        q, k, v = proj["q"], proj["k"], proj["v"]
        if not self.shifts and self.q_norm is None:
            return q, k, v
        raw, previous, logits = {"k": k, "v": v}, {}, {}
        for name in self.shifts:
            if token_mask is not None:
                raw[name] = raw[name] * token_mask[:, :, None, None]  # padded tokens shift in zeros
            previous[name] = layer_cache.shift_state(name) if layer_cache is not None else None
            logits[name] = proj["shift_" + name]
            if layer_cache is not None:
                layer_cache.push_shift_inputs(name, raw[name])
        if self.config.fuse_norm and fused_ops.triton_wanted(q):
            weights = [norm.head_weights() if isinstance(norm, HeadRMSNorm) else norm.weight
                       for norm in (self.q_norm, self.k_norm)] if self.q_norm is not None else [None, None]
            return fused_inputs.attention_inputs(q, raw["k"], raw["v"], q_weight=weights[0], k_weight=weights[1],
                                                 eps=self.config.qk_norm_eps, k_shift_logits=logits.get("k"),
                                                 v_shift_logits=logits.get("v"), k_previous=previous.get("k"),
                                                 v_previous=previous.get("v"))
        k, v = (self.shifts[name](raw[name], previous[name], logits[name]) if name in self.shifts else raw[name]
                for name in "kv")
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, *, seq_start=None, token_mask=None, positions=None, cache=None, output_attentions=False):
        """x (B, T, C) -> (output (B, T, C), attention probabilities (B, H, T, Tk) or None, log f (B, T, H))."""
        B, T, _ = x.shape
        proj = self.project(x)
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        q, k, v = self.shift_and_norm(proj, layer_cache, token_mask)
        if self.config.use_rope:
            q, k = apply_rope(q, positions, self.config.rope_theta), apply_rope(k, positions, self.config.rope_theta)
            v = v.contiguous()  # q and k are rotated copies now: v alone must not keep the projections' output alive

        if self.fgate is not None:
            log_f = self.fgate(x, proj.get("f"))
        else:
            log_f = torch.zeros(B, T, self.num_heads, device=x.device, dtype=torch.float32)
        if token_mask is not None:
            log_f = log_f * token_mask[..., None]  # padded tokens neither forget nor are seen (seq_start)
        if layer_cache is not None:  # the cache keeps the gate's prefix sums: decoding needs no scan
            k, v, c = layer_cache.append(k, v, log_f)
            gate = dict(log_fgate_cumsum=c)
        else:
            gate = dict(log_fgate=log_f)

        probs, out_gate = None, proj.get("g")
        # with fuse_norm, the output norm and gate run inside the attention's own kernels
        in_attention = self.o_norm is not None and self.config.fuse_norm and not output_attentions
        if output_attentions:
            o, probs = forgetting_attention_reference(q, k, v, seq_start=seq_start, return_probs=True, **gate)
        else:
            o = self.attend(q, k, v, gate, seq_start, out_gate if in_attention else None, in_attention)
        if self.o_norm is not None and not in_attention:
            o = self.o_norm(o, gate=out_gate)  # the gate multiplies after the norm, in the same kernel when fused
        elif self.o_norm is None and out_gate is not None:
            o = o * torch.sigmoid(out_gate)
        return self.o_proj(o.reshape(B, T, -1)), probs, log_f


    def attend(self, q, k, v, gate, seq_start, out_gate=None, with_output_norm=False):
        """The attention kernel call, pruned when the config sets ``acp_log_tolerance`` (acp.py); ``gate``: the
        keyword of the gate's form, {"log_fgate": log f} or {"log_fgate_cumsum": c}. ``with_output_norm``: o_norm
        (and the output gate's logits ``out_gate``) applied inside the call."""
        tolerance, backend = self.config.acp_log_tolerance, self.config.attn_backend
        options = {} if tolerance is None or backend == "reference" else dict(adaptive_threshold="auto",
                                                                               log_eps=tolerance)
        if with_output_norm:
            norm = self.o_norm
            options.update(output_norm_weight=norm.head_weights() if isinstance(norm, HeadRMSNorm) else norm.weight,
                           output_gate=out_gate, output_norm_eps=norm.eps)
        return forgetting_attention(q, k, v, seq_start=seq_start, backend=backend, **gate, **options)


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)); with ``fuse_swiglu`` and silu, act(gate) * up is one Triton kernel on CUDA."""

    def __init__(self, config: ForgettingTransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]
        self.fused = config.fuse_swiglu and config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.fused and fused_ops.triton_wanted(gate):
            return self.down_proj(fused_ops.swiglu(gate, up))
        return self.down_proj(self.act(gate) * up)


class ForgettingTransformerBlock(GradientCheckpointingLayer):
    def __init__(self, config: ForgettingTransformerConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = fused_ops.RMSNorm(config.hidden_size, eps=config.norm_eps, fused=config.fuse_norm)
        self.attn = ForgettingAttention(config, layer_idx)
        self.mlp_norm = fused_ops.RMSNorm(config.hidden_size, eps=config.norm_eps, fused=config.fuse_norm)
        self.mlp = SwiGLU(config)

    def forward(self, x, seq_start=None, token_mask=None, positions=None, cache=None, output_attentions=False):
        h, probs, log_f = self.attn(self.attn_norm(x), seq_start=seq_start, token_mask=token_mask,
                                    positions=positions, cache=cache, output_attentions=output_attentions)
        normed, x = self.mlp_norm(h, residual=x)  # x <- x + h, folded into the norm's kernel when fused
        return x + self.mlp(normed), probs, log_f


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def padding_from_mask(attention_mask, past: int, new: int):
    """From a (B, past + new) 0/1 mask, the first visible key per row and the mask of the new tokens.

    Each row must be one block of ones (left and/or right padding). Returns (seq_start (B,) or None,
    token_mask (B, new) float or None); both None when nothing is padded.
    """
    if attention_mask is None:
        return None, None
    if attention_mask.dim() != 2 or attention_mask.shape[1] != past + new:
        raise ValueError(f"attention_mask must have shape (batch, cached + new tokens) = (batch, {past + new}), "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None, None
    seq_start = (mask.cumsum(dim=1) == 0).sum(dim=1)
    idx = torch.arange(mask.shape[1], device=mask.device)
    block = (idx >= seq_start[:, None]) & (idx < (seq_start + mask.sum(dim=1))[:, None])
    if not bool((block == mask).all()):
        raise ValueError("attention_mask must be a single block of ones per row (pad on the left for generation)")
    return (seq_start if bool(seq_start.any()) else None), mask[:, past:].float()


def check_inputs(input_ids, inputs_embeds, config) -> None:
    """Refuse inputs the model cannot take, saying what it expects: exactly one of input_ids (B, T) integer token
    ids in [0, vocab_size) and inputs_embeds (B, T, hidden_size), with T >= 1."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    name, x = ("input_ids", input_ids) if inputs_embeds is None else ("inputs_embeds", inputs_embeds)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__} (tokenizer(..., return_tensors='pt') "
                        "gives one)")
    ndim = 2 if name == "input_ids" else 3
    shape = "(batch, seq_len)" if ndim == 2 else f"(batch, seq_len, hidden_size={config.hidden_size})"
    if x.dim() != ndim or (ndim == 3 and x.shape[-1] != config.hidden_size):
        hint = f"; for one sequence pass {name}[None]" if x.dim() == ndim - 1 else ""
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}{hint}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} holds no tokens (shape {tuple(x.shape)}): pass at least one token per sequence")
    if name == "input_ids":
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {x.dtype}")
        if x.device.type == "cpu" and x.numel():  # on a GPU the check would wait for the device at every call
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= config.vocab_size:
                raise ValueError(f"input_ids must be token ids in [0, {config.vocab_size - 1}] (vocab_size "
                                 f"{config.vocab_size}), got ids from {low} to {high}")


class ForgettingTransformerPreTrainedModel(PreTrainedModel):
    config_class = ForgettingTransformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ForgettingTransformerBlock"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, **kwargs):
        """Load a checkpoint: foxlab's, or the paper's or fla's, converted on the way (foxlab.checkpoints).

        Unlike transformers' default, a checkpoint whose weights do not all fit the model (missing, unexpected or
        of another shape) is an error, never a model with freshly initialized parts.
        """
        path, kwargs = prepare_from_pretrained(ForgettingTransformerForCausalLM, pretrained_model_name_or_path, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        check_loading_info(info, pretrained_model_name_or_path)
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        """The paper's initialization (both public FoX implementations use it).

        Every Linear and Embedding weight ~ N(0, initializer_range), biases 0, RMSNorm weights 1. Forget-gate
        biases are 0 (f ~ 0.5 at the start, the paper's default) unless ``fgate_init_timescales`` asks for
        log-spaced timescales per head (docs/fox.md, "Initialization").
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ForgetGate):
            if self.config.fgate_init_timescales is None:
                init.zeros_(module.bias)
            else:
                init.copy_(module.bias, gate_bias_for_timescales(*self.config.fgate_init_timescales, module.num_heads))


class ForgettingTransformerModel(ForgettingTransformerPreTrainedModel):
    """Embeddings, the blocks and the final RMSNorm: input ids -> hidden states."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # the backbone of a causal-LM checkpoint

    def __init__(self, config: ForgettingTransformerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ForgettingTransformerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = fused_ops.RMSNorm(config.hidden_size, eps=config.norm_eps, fused=config.fuse_norm)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, output_forget_gates=None,
                return_dict=None, past_key_values=None, **kwargs):
        """Returns ForgettingTransformerModelOutput; ``forget_gates`` holds each layer's log f (B, T, H)."""
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        use_cache = (cfg.use_cache and not self.training) if use_cache is None else use_cache
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        check_inputs(input_ids, inputs_embeds, cfg)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = ForgettingTransformerCache(cfg)
        if cache is not None and not isinstance(cache, ForgettingTransformerCache):
            raise ValueError(f"cache must be a ForgettingTransformerCache, got {type(cache).__name__}")

        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        seq_start, token_mask = padding_from_mask(attention_mask, past, T)
        if cfg.use_rope and position_ids is None:
            if attention_mask is not None:  # positions count real tokens only, as with left padding in HF models
                position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)

        hidden_states, attentions, forget_gates = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            x, probs, log_f = layer(x, seq_start=seq_start, token_mask=token_mask, positions=position_ids,
                                    cache=cache, output_attentions=output_attentions)
            attentions.append(probs)
            forget_gates.append(log_f)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)

        out = ForgettingTransformerModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            forget_gates=tuple(forget_gates) if output_forget_gates else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return out if return_dict else out.to_tuple()


class ForgettingTransformerForCausalLM(ForgettingTransformerPreTrainedModel, GenerationMixin):
    """The backbone plus a language-model head. ``labels`` (B, T) give the shifted next-token loss; -100 is ignored.

    With ``fuse_cross_entropy`` (the default), a forward pass that trains (training mode, gradients enabled, labels
    given) computes the LM head and the loss together in chunks (fused.causal_lm_loss): the (tokens x vocab)
    logits never exist, and the output's ``logits`` is None. Without labels, in eval mode or under no_grad, the
    logits are returned as usual.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ForgettingTransformerConfig):
        super().__init__(config)
        self.model = ForgettingTransformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _fused_loss_applies(self, logits_to_keep, loss_kwargs) -> bool:
        return (self.config.fuse_cross_entropy and self.training and torch.is_grad_enabled() and not logits_to_keep
                and set(loss_kwargs) <= {"num_items_in_batch"})

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make a DynamicCache: it gets a ForgettingTransformerCache (below)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Give generate() a ForgettingTransformerCache from the start (assisted decoding needs one before the first
        forward); an assistant model's cache records its KV-shift inputs, since the main model crops it back."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        given = any(model_kwargs.get(name) is not None for name in ("cache", "past_key_values"))
        if given or generation_config.use_cache is False:
            return
        cache = ForgettingTransformerCache(self.config)
        if getattr(generation_config, "is_assistant", False):
            cache.activate_past_recording()
        model_kwargs[CACHE_FIELD] = cache

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, position_ids=None, use_cache=True, **kwargs):
        """Feed only the tokens the cache has not seen; the attention mask always covers all of them."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, CACHE_FIELD: cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:]
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, past:]
        for name in ("output_attentions", "output_hidden_states", "output_forget_gates", "logits_to_keep"):
            if name in kwargs:
                inputs[name] = kwargs[name]
        return inputs

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                output_forget_gates=None, return_dict=None, logits_to_keep=0, past_key_values=None, **kwargs):
        """Returns ForgettingTransformerCausalLMOutput (loss when ``labels`` are given, logits, cache, ...).

        ``logits`` is None when the fused loss ran (class docstring); loss arguments other than
        ``num_items_in_batch`` (transformers' gradient-accumulation divisor) take the logits path.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states, output_forget_gates=output_forget_gates,
                         return_dict=True)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        loss = logits = None
        if labels is not None and self._fused_loss_applies(logits_to_keep, kwargs):
            loss = fused_ops.causal_lm_loss(hidden, self.lm_head.weight, labels,
                                            num_items_in_batch=kwargs.get("num_items_in_batch"))
        else:
            logits = self.lm_head(hidden)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = ForgettingTransformerCausalLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            forget_gates=out.forget_gates, **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
        )
        return result if return_dict else result.to_tuple()
