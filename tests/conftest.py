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
