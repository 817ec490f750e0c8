import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import foxlab
from foxlab import ForgettingTransformerConfig, ForgettingTransformerForCausalLM, ForgettingTransformerModel
from foxlab.attention import forgetting_attention_reference
from foxlab.model import gate_bias_for_timescales, stacked_linear

from conftest import VARIANTS, tiny_model


def test_auto_classes_resolve_to_foxlab():
    config = AutoConfig.for_model("forgetting_transformer")
    assert isinstance(config, ForgettingTransformerConfig)
    assert isinstance(AutoModel.from_config(config), ForgettingTransformerModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), ForgettingTransformerForCausalLM)


@pytest.mark.parametrize("variant", list(VARIANTS) + ["fixed", "bias_only"])
def test_save_and_load_round_trip_identical_logits(variant, tmp_path):
    overrides = VARIANTS.get(variant, dict(fgate_type=variant))
    model = tiny_model(seed=1, **overrides)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(4, 260, (2, 17))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(backbone(ids).last_hidden_state, model.model(ids).last_hidden_state)


def test_labels_give_shifted_loss_ignoring_minus_100():
    model = tiny_model()
    ids = torch.randint(4, 260, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 260), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_forget_gates_and_attentions_are_the_models_numbers():
    model = tiny_model(num_kv_heads=4)
    ids = torch.randint(4, 260, (2, 12))
    out = model(ids, output_attentions=True, output_forget_gates=True, output_hidden_states=True)
    assert len(out.forget_gates) == len(out.attentions) == model.config.num_hidden_layers
    for i, layer in enumerate(model.model.layers):
        x = layer.attn_norm(out.hidden_states[i])
        log_f = F.logsigmoid((layer.attn.fgate.proj(x) + layer.attn.fgate.bias).float())
        torch.testing.assert_close(out.forget_gates[i], log_f)
        B, T = ids.shape
        q, k, v = (proj(x).view(B, T, 4, 32) for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj))
        _, probs = forgetting_attention_reference(q, k, v, log_f, return_probs=True)
        torch.testing.assert_close(out.attentions[i], probs)
    # Asking for the maps does not change the model's output.
    torch.testing.assert_close(model(ids).logits, out.logits, rtol=1e-5, atol=1e-5)


def test_fgate_none_has_unit_gates_and_no_gate_parameters():
    model = tiny_model(fgate_type="none")
    out = model(torch.randint(4, 260, (1, 6)), output_forget_gates=True)
    assert all(torch.all(g == 0) for g in out.forget_gates)
    assert not any("fgate" in name for name, _ in model.named_parameters())


def test_init_follows_the_paper():
    model = tiny_model(seed=3, fgate_init_timescales=None, num_hidden_layers=4)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    assert abs(weights.std().item() - 0.02) < 1e-3
    for layer in model.model.layers:
        assert torch.all(layer.attn.fgate.bias == 0)
    timed = tiny_model(fgate_init_timescales=[4.0, 256.0])
    bias = timed.model.layers[0].attn.fgate.bias
    torch.testing.assert_close(bias, gate_bias_for_timescales(4.0, 256.0, 4))
    f = torch.sigmoid(bias.double())
    torch.testing.assert_close(-1 / torch.log(f), torch.tensor([4.0, 16.0, 64.0, 256.0], dtype=torch.float64), rtol=1e-6, atol=0)  # float32 bias


def test_fixed_gate_is_not_trained_bias_only_is():
    fixed = tiny_model(fgate_type="fixed")
    assert not any("fgate" in name for name, _ in fixed.named_parameters())
    assert "model.layers.0.attn.fgate.bias" in fixed.state_dict()
    bias_only = tiny_model(fgate_type="bias_only")
    assert "model.layers.0.attn.fgate.bias" in dict(bias_only.named_parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_checkpointing_gives_the_same_gradients(variant):
    ids = torch.randint(4, 260, (2, 10))

    def grads(checkpointing):
        model = tiny_model(seed=5, **VARIANTS[variant]).train()
        if checkpointing:  # renamed activation_checkpointing_enable in transformers 5.2x
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_backends_agree_on_cpu():
    model = tiny_model()
    ids = torch.randint(4, 260, (2, 300))
    logits = {}
    for backend in ("torch", "reference"):
        model.config.attn_backend = backend
        logits[backend] = model(ids).logits
    torch.testing.assert_close(logits["torch"], logits["reference"])


def test_bad_model_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.randint(4, 260, (1, 5)), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="single block of ones"):
        model(torch.randint(4, 260, (1, 5)), attention_mask=torch.tensor([[1, 0, 1, 1, 1]]))
    from transformers import DynamicCache
    with pytest.raises(ValueError, match="ForgettingTransformerCache"):
        model(torch.randint(4, 260, (1, 5)), cache=DynamicCache())


@pytest.mark.parametrize("inputs, error, message", [
    (dict(input_ids=torch.tensor([1, 5, 6])), ValueError,
     r"input_ids must have shape \(batch, seq_len\), got \(3,\); for one sequence pass input_ids\[None\]"),
    (dict(input_ids=torch.ones(1, 2, 3, dtype=torch.long)), ValueError, r"input_ids must have shape"),
    (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError,
     r"input_ids holds no tokens \(shape \(2, 0\)\)"),
    (dict(inputs_embeds=torch.zeros(1, 0, 128)), ValueError, r"inputs_embeds holds no tokens"),
    (dict(input_ids=torch.tensor([[1.0, 5.0]])), TypeError, r"input_ids must hold integer token ids, got dtype"),
    (dict(input_ids=[[1, 5, 6]]), TypeError, r"input_ids must be a torch.Tensor, got list"),
    (dict(input_ids=torch.tensor([[1, 260]])), ValueError, r"token ids in \[0, 259\].*from 1 to 260"),
    (dict(input_ids=torch.tensor([[-1, 5]])), ValueError, r"token ids in \[0, 259\].*from -1 to 5"),
    (dict(inputs_embeds=torch.zeros(1, 4, 64)), ValueError,
     r"inputs_embeds must have shape \(batch, seq_len, hidden_size=128\)"),
    (dict(inputs_embeds=torch.zeros(4, 128)), ValueError, r"for one sequence pass inputs_embeds\[None\]"),
])
def test_inputs_the_model_cannot_take_are_explained(inputs, error, message):
    model = tiny_model()
    with pytest.raises(error, match=message):
        model(**inputs)
    with pytest.raises(error, match=message):
        model.model(**inputs)  # the backbone alone too


def test_stacked_linear_is_the_linears_one_by_one():
    """One matmul over the stacked weights (with zero rows up to an aligned width) gives each Linear's output and
    gradients, float64 exact; the outputs are column slices of one tensor whose rows are 16 elements apart."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(24, n, bias=False, dtype=torch.float64) for n in (32, 8, 8, 3, 2)]
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    stacked = stacked_linear(x, linears, align=16)
    assert all(y.stride(-2) == 64 for y in stacked)  # 53 columns, padded to 64
    cotangents = [torch.randn_like(y) for y in stacked]
    grads = torch.autograd.grad(stacked, [x, *(lin.weight for lin in linears)], cotangents)
    plain = [lin(x) for lin in linears]
    expected = torch.autograd.grad(plain, [x, *(lin.weight for lin in linears)], cotangents)
    torch.testing.assert_close(stacked, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads, expected, rtol=0, atol=1e-12)


def test_version_is_exported():
    assert foxlab.__version__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_backend_trains_like_the_reference_on_gpu(variant):
    ids = torch.randint(4, 260, (2, 200), device="cuda")
    results = {}
    for backend in ("triton", "reference"):
        model = tiny_model(seed=7, device="cuda", attn_backend=backend, **VARIANTS[variant]).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        results[backend] = out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}  # logits: None (fused loss)
    torch.testing.assert_close(results["triton"][0], results["reference"][0], rtol=1e-4, atol=1e-4)
    for name, grad in results["reference"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
