"""The fuse_* switches on the CPU: the chunked loss against the plain one, the model with the switches on against
the same model with them off, the logits contract, configs that carry the switches, and input errors.

The Triton kernels themselves are tested in test_fused_kernels.py (interpreter) and test_fused_gpu.py.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import VARIANTS, tiny_model
from fused_cases import compare, cross_entropy_cases, ref_linear_cross_entropy, ref_rms_norm

from foxlab import ForgettingTransformerConfig, fused, fused_inputs

SWITCHES = ("fuse_norm", "fuse_swiglu", "fuse_cross_entropy")


def test_switches_are_on_by_default():
    config = ForgettingTransformerConfig()
    assert all(getattr(config, name) for name in SWITCHES)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_loss_matches_cross_entropy(dtype, tol):
    for hidden, weight, targets, chunk in cross_entropy_cases("cpu", dtype):
        compare(fused.linear_cross_entropy, ref_linear_cross_entropy, (hidden, weight, targets), tol, chunk_size=chunk)


def test_chunked_loss_under_bf16_autocast():
    hidden, weight, targets = torch.randn(37, 24), torch.randn(301, 24) / 5, torch.randint(0, 301, (37,))
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused.linear_cross_entropy(*leaves, targets, chunk_size=16)
    grads = torch.autograd.grad(loss, leaves)
    assert loss.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight)]
    ref = ref_linear_cross_entropy(*ref_leaves, targets)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-2, atol=0)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_leaves)):
        assert (a.double() - b).norm() / b.norm() < 2e-2


def test_num_items_in_batch_divides_the_sum():
    hidden, weight, targets = torch.randn(9, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64), \
        torch.randint(0, 20, (9,))
    total = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    for n in (1, 4, torch.tensor(7)):
        torch.testing.assert_close(fused.linear_cross_entropy(hidden, weight, targets, num_items_in_batch=n), total / n)


def test_backward_runs_once():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = fused.linear_cross_entropy(hidden, torch.randn(10, 8), torch.randint(0, 10, (4,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_causal_lm_loss_is_the_shifted_loss():
    hidden, weight = torch.randn(3, 11, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 11))
    labels[1, :5] = -100
    logits = hidden @ weight.T
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(fused.causal_lm_loss(hidden, weight, labels), expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_switches_on_and_off_agree(variant, one_thread):
    """On the CPU the norms and SwiGLU run the same PyTorch ops either way; the loss takes the chunked path."""
    ids = torch.randint(4, 260, (2, 15))
    labels = ids.clone()
    labels[1, :4] = -100
    results = {}
    for on in (True, False):
        model = tiny_model(seed=4, **dict.fromkeys(SWITCHES, on), **VARIANTS[variant]).train()
        out = model(ids, labels=labels)
        assert (out.logits is None) == on  # training with labels and the fused loss: no logits
        out.loss.backward()
        results[on] = out.loss, {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_logits_come_back_outside_training():
    model = tiny_model().train()
    ids = torch.randint(4, 260, (2, 7))
    assert model(ids).logits.shape == (2, 7, 260)  # no labels
    with torch.no_grad():
        assert model(ids, labels=ids).logits is not None  # no gradient wanted
    model.eval()
    assert model(ids, labels=ids).logits is not None
    model.train()
    out = model(ids, labels=ids, num_items_in_batch=5)  # transformers' divisor keeps the fused path
    assert out.logits is None
    model.config.fuse_cross_entropy = False
    torch.testing.assert_close(model(ids, labels=ids, num_items_in_batch=5).loss, out.loss)


def test_config_with_switches_loads_and_trains_on_cpu(tmp_path):
    model = tiny_model(seed=6, **VARIANTS["fox-pro"])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).train()
    assert all(getattr(loaded.config, name) for name in SWITCHES)
    ids = torch.randint(4, 260, (2, 9))
    loss = loaded(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in loaded.parameters())


def test_plain_norm_module_folds_residual_and_gate():
    norm = fused.RMSNorm(24, eps=1e-6, fused=True)  # on the CPU: PyTorch ops
    with torch.no_grad():
        norm.weight.normal_()
    x, r, g = torch.randn(3, 24), torch.randn(3, 24), torch.randn(3, 24)
    y, s = norm(x, residual=r)
    expected = ref_rms_norm(x, norm.weight, 1e-6, residual=r)
    torch.testing.assert_close(y, expected[0])
    torch.testing.assert_close(s, expected[1])
    torch.testing.assert_close(norm(x, gate=g), ref_rms_norm(x, norm.weight, 1e-6, gate=g))


def test_plain_head_norm_keeps_the_input_dtype():
    """Unfused per-head norms of bf16 q/k (autocast's matmul outputs) stay bf16 next to bf16 v: float32 weights."""
    from foxlab.model import HeadRMSNorm
    norm = HeadRMSNorm(3, 8, eps=1e-5)
    x, gate = torch.randn(2, 5, 3, 8, dtype=torch.bfloat16), torch.randn(2, 5, 3, 8, dtype=torch.bfloat16)
    assert norm(x).dtype == norm(x, gate=gate).dtype == torch.bfloat16
    expected = ref_rms_norm(x.double(), norm.weight.view(3, 8).double(), 1e-5, gate=gate.double())
    torch.testing.assert_close(norm(x, gate=gate).double(), expected, rtol=2e-2, atol=2e-2)


def test_kernels_read_column_slices_in_place():
    """A slice of a wider projection output is read where it lies (rows one stride apart); a layout whose rows are
    not one stride apart is copied."""
    wide = torch.randn(2, 5, 3 * 16 + 3)
    q = wide[..., :32].view(2, 5, 2, 16)
    same, stride = fused._row_strided(q, 32)
    assert same is q and stride == 51
    copied, stride = fused._row_strided(q, 16)  # rows of one head: 16 apart within a token, 51 - 16 across
    assert copied.is_contiguous() and stride == 16 and torch.equal(copied, q)
    copied, stride = fused._row_strided(q.transpose(1, 2), 16)
    assert copied.is_contiguous() and stride == 16


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        fused.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        fused.rms_norm(x, torch.ones(8), 1e-6, residual=torch.randn(2, 9))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        fused.rms_norm(torch.ones(2, 8, dtype=torch.long), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="weight must have shape"):
        fused.rms_norm(torch.randn(2, 3, 8), torch.ones(2, 8), 1e-6)  # per-head weights: (3, 8) for 3 heads
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8)
    with pytest.raises(ValueError, match="must both be"):
        fused_inputs.attention_inputs(q, k, None, q_weight=torch.ones(8), k_weight=torch.ones(2, 8))
    with pytest.raises(ValueError, match="q_weight and k_weight come together"):
        fused_inputs.attention_inputs(q, k, None, q_weight=torch.ones(4, 8))
    with pytest.raises(ValueError, match=r"v must have shape \(2, 3, 2, 8\)"):
        fused_inputs.attention_inputs(q, k, torch.randn(2, 3, 2, 5), v_shift_logits=torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="v_previous is the token before a shifted chunk"):
        fused_inputs.attention_inputs(q, k, None, v_previous=torch.randn(2, 1, 2, 8))
    with pytest.raises(ValueError, match=r"k_previous must have shape \(2, 1, 2, 8\)"):
        fused_inputs.attention_inputs(q, k, None, k_shift_logits=torch.randn(2, 3, 2), k_previous=torch.randn(2, 2, 2, 8))
    with pytest.raises(ValueError, match="up must have the shape of gate"):
        fused.swiglu(x, torch.randn(2, 9))
    with pytest.raises(ValueError, match="a_logits must have shape"):
        fused_inputs.token_shift(torch.randn(1, 3, 2, 4), None, torch.randn(1, 3, 3))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA tensors"):
            fused.swiglu(x, x)
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="targets must lie in"):
        fused.linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 10, -100]))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        fused.linear_cross_entropy(hidden, weight, torch.zeros(4))
    with pytest.raises(ValueError, match="weight must have shape"):
        fused.linear_cross_entropy(hidden, torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        fused.linear_cross_entropy(hidden, weight, torch.zeros(4, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        fused.causal_lm_loss(torch.randn(2, 3, 8), weight, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="fuse_norm"):
        ForgettingTransformerConfig(fuse_norm="yes")
