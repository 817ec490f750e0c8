import pytest
import torch

from foxlab import ForgettingTransformerConfig, ForgettingTransformerForCausalLM

# The three families the generation tests cover, at a size that runs in milliseconds.
VARIANTS = {
    "fox": dict(),
    "fox-pro": dict(qk_norm=True, use_output_gate=True, use_output_norm=True, use_k_shift=True, use_v_shift=True),
    "transformer": dict(fgate_type="none", use_rope=True),
}


# Generation parity runs on every device here: on CUDA the model goes through the Triton kernels.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_model(seed=0, device="cpu", **overrides) -> ForgettingTransformerForCausalLM:
    """A seeded `tiny` model in eval mode; gate biases spread so heads forget at different rates."""
    torch.manual_seed(seed)
    overrides.setdefault("num_kv_heads", 2)
    if overrides.get("fgate_type") != "none":
        overrides.setdefault("fgate_init_timescales", [2.0, 64.0])
    config = ForgettingTransformerConfig.from_preset("tiny", **overrides)
    return ForgettingTransformerForCausalLM(config).eval().to(device)


@pytest.fixture(params=[(v, d) for d in DEVICES for v in VARIANTS], ids=lambda p: "-".join(p))
def variant_model(request):
    variant, device = request.param
    return tiny_model(device=device, **VARIANTS[variant])


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and one thread stays fast when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def masked_attention(q, k, v, log_f, threshold=None, *, seq_start=None, cu_seqlens=None, sm_scale=None):
    """Dense forgetting attention in float64, keeping only the scores with decay c_i - c_j >= threshold (B, H).

    Returns (output (B, Tq, H, D), probabilities (B, H, Tq, Tk), kept mask, visible mask). Written apart from
    foxlab's code: the independent check of pruning (acp.py) and of its statistics.
    """
    q, k, v, log_f = (t.double() for t in (q, k, v, log_f))
    B, Tq, H, D = q.shape
    Tk, group = k.shape[1], H // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    c = log_f.cumsum(dim=1).transpose(1, 2)  # (B, H, Tk)
    pos = torch.arange(Tk - Tq, Tk)
    keys = torch.arange(Tk)
    decay = c[:, :, pos, None] - c[:, :, None, :]
    visible = (keys[None, :] <= pos[:, None]).expand(B, H, Tq, Tk)
    if seq_start is not None:
        visible = visible & (keys >= seq_start[:, None, None, None])
    if cu_seqlens is not None:
        segment = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff())
        visible = visible & (segment[pos][:, None] == segment[None, :])
    kept = visible if threshold is None else visible & (decay >= threshold.double()[:, :, None, None])
    scale = D ** -0.5 if sm_scale is None else sm_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + decay
    probs = torch.softmax(scores.masked_fill(~kept, torch.finfo(torch.float64).min), dim=-1) * kept
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), probs, kept, visible


def quantized_gates(B, T, H, generator=None):
    """log f on a grid of 1/16 (sums exact in float32) and thresholds halfway between grid points (B, H), so that
    no decay sits within rounding of a threshold and every implementation prunes exactly the same scores."""
    log_f = -torch.randint(0, 6, (B, T, H), generator=generator).float() / 16
    threshold = -(torch.randint(8, 40, (B, H), generator=generator).float() + 0.5) / 16
    return log_f, threshold
