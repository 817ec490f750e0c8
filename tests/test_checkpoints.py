"""Checkpoints of the paper's code and of fla load as foxlab models with the originals' logits and gates.

The golden fixtures (tests/fixtures/checkpoints/<name>/) were saved by the original implementations, together
with the logits and log forget gates those computed (make_golden.py says how and with which versions);
foxlab-legacy-pro was saved by foxlab itself before the per-head norm switches existed (make_foxlab_legacy.py).
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

import foxlab
from foxlab import ForgettingTransformerConfig, ForgettingTransformerForCausalLM, JSONGPT2Tokenizer, export_to_fla
from foxlab.checkpoints import checkpoint_format, foxlab_config_dict, json_unescape

from conftest import VARIANTS, tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
GOLDEN = sorted(p.name for p in FIXTURES.iterdir() if (p / "golden.safetensors").exists())
TOLERANCE = 1e-4  # max |foxlab - original| / max |original|, float32


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    if not reference.abs().max() > 0:  # no gate: foxlab's must be exactly zero too
        return float(value.abs().max())
    return float((value - reference).abs().max() / reference.abs().max())


def test_every_family_has_a_golden_fixture():
    expected = {"paper-fox-llama", "paper-fox-pro", "paper-transformer-llama", "paper-transformer-pro",
                "fla-fox", "fla-fox-pro", "fla-transformer", "foxlab-legacy-pro"}
    assert expected <= set(GOLDEN)
    assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 1_000_000


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_checkpoint_loads_with_the_originals_logits_and_gates(name, tmp_path):
    golden = load_file(FIXTURES / name / "golden.safetensors")
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name)
    assert isinstance(model, ForgettingTransformerForCausalLM)
    with torch.no_grad():
        out = model(golden["input_ids"], output_forget_gates=True)
    assert rel_err(out.logits, golden["logits"]) <= TOLERANCE
    for layer, log_f in enumerate(out.forget_gates):
        assert rel_err(log_f, golden[f"log_fgate.{layer}"]) <= TOLERANCE, f"layer {layer}"
    # Saved again, it is a foxlab checkpoint with the same numbers.
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert checkpoint_format(saved) == "foxlab" and saved["model_type"] == "forgetting_transformer"
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path)(golden["input_ids"]).logits
    assert torch.equal(again, out.logits)


def test_configs_convert_to_the_originals_layouts():
    fox_pro = AutoConfig.from_pretrained(FIXTURES / "paper-fox-pro")
    assert isinstance(fox_pro, ForgettingTransformerConfig) and fox_pro.model_type == "forgetting_transformer"
    assert fox_pro.qk_norm_share_param_across_head and not fox_pro.output_norm_share_param_across_head
    assert fox_pro.use_k_shift and fox_pro.use_output_norm
    assert (fox_pro.qk_norm_eps, fox_pro.norm_eps) == (1e-5, 1e-6)
    tf_pro = AutoConfig.from_pretrained(FIXTURES / "paper-transformer-pro")
    assert tf_pro.fgate_type == "none" and tf_pro.use_rope and not tf_pro.qk_norm_share_param_across_head
    assert AutoConfig.from_pretrained(FIXTURES / "fla-fox").tie_word_embeddings
    fla_tf = AutoConfig.from_pretrained(FIXTURES / "fla-transformer")
    assert (fla_tf.fgate_type, fla_tf.use_rope, fla_tf.num_kv_heads, fla_tf.qk_norm_share_param_across_head) == (
        "none", True, 1, True)
    legacy = AutoConfig.from_pretrained(FIXTURES / "foxlab-legacy-pro")
    assert legacy.qk_norm_share_param_across_head and legacy.output_norm_share_param_across_head
    assert legacy.qk_norm_eps == legacy.norm_eps == 1e-6


@pytest.mark.parametrize("name", GOLDEN)
def test_config_conversion_is_done_once_and_for_all(name):
    saved = json.loads((FIXTURES / name / "config.json").read_text())
    converted = foxlab_config_dict(saved)
    assert checkpoint_format(converted) == "foxlab" and foxlab_config_dict(converted) == converted
    direct, auto = (cls.from_pretrained(FIXTURES / name).to_dict() for cls in (ForgettingTransformerConfig, AutoConfig))
    assert {k: v for k, v in direct.items() if k != "_name_or_path"} == {k: v for k, v in auto.items()
                                                                         if k != "_name_or_path"}


def test_new_configs_default_to_per_head_norms():
    config = ForgettingTransformerConfig.from_preset("fox-pro-125m")
    assert not config.qk_norm_share_param_across_head and not config.output_norm_share_param_across_head
    model = tiny_model(**VARIANTS["fox-pro"])
    attn = model.model.layers[0].attn
    assert attn.q_norm.weight.shape == (4 * 32,) and attn.k_norm.weight.shape == (2 * 32,)
    assert attn.o_norm.weight.shape == (4 * 32,)


def test_per_head_norm_weights_act_per_head():
    """HeadRMSNorm with every head's weights equal computes the shared-weight norm; each head scales only itself."""
    shared = tiny_model(**VARIANTS["fox-pro"], qk_norm_share_param_across_head=True,
                        output_norm_share_param_across_head=True)
    per_head = tiny_model(**VARIANTS["fox-pro"])
    state = {}
    for key, value in shared.state_dict().items():
        target = per_head.state_dict()[key]
        state[key] = value.repeat(target.numel() // value.numel()) if "norm.weight" in key else value
    per_head.load_state_dict(state)
    ids = torch.randint(4, 260, (2, 9))
    torch.testing.assert_close(per_head(ids).logits, shared(ids).logits, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 5, 4, 32, dtype=torch.float64)
    norm = per_head.model.layers[0].attn.q_norm.double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4 * 32))
    expected = x / x.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt() * norm.weight.view(4, 32)
    torch.testing.assert_close(norm(x), expected)


def copy_fixture(name: str, tmp_path: Path, config_changes=None, weights=None) -> Path:
    """A copy of a fixture with changed config.json fields and/or weights (a function of the state dict)."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    if weights:
        save_file(weights(load_file(folder / "model.safetensors")), folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("name,changes,field", [
    ("fla-fox", dict(window_size=64), "window_size"),
    ("fla-fox", dict(qkv_bias=True), "qkv_bias"),
    ("fla-fox", dict(elementwise_affine=False), "elementwise_affine"),
    ("fla-fox", dict(attnres_block_size=4), "attnres_block_size"),
    ("fla-fox-pro", dict(hidden_act="powlu"), "hidden_act"),
    ("paper-fox-pro", dict(ogate_act="silu"), "ogate_act"),
    ("paper-fox-llama", dict(window_size=128), "window_size"),
])
def test_what_foxlab_cannot_compute_exactly_is_refused_by_name(name, changes, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        AutoModelForCausalLM.from_pretrained(copy_fixture(name, tmp_path, config_changes=changes))


def drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("name,weights,message", [
    ("paper-fox-pro", drop("model.layers.1.attn.k_proj.shift_proj.weight"), "missing: .*shifts.k.proj"),
    ("fla-fox", lambda s: {**s, "model.layers.0.attn.extra.weight": torch.zeros(2)}, "no place for: .*attn.extra"),
    ("fla-fox-pro", lambda s: {**s, "model.layers.0.attn.q_norm.weight": torch.ones(16)}, "wrong shape: .*q_norm"),
    ("foxlab-legacy-pro", drop("model.layers.0.attn.fgate.bias"), "missing_keys: .*fgate.bias"),
    ("foxlab-legacy-pro", lambda s: {**s, "model.layers.0.attn.q_norm.weight": torch.ones(32)}, "mismatch"),
])
def test_weights_that_do_not_all_map_are_an_error(name, weights, message, tmp_path):
    with pytest.raises((ValueError, RuntimeError), match=message):  # transformers raises itself on a wrong shape
        AutoModelForCausalLM.from_pretrained(copy_fixture(name, tmp_path, weights=weights))


def test_backbone_loads_from_a_causal_checkpoint_but_not_the_reverse(tmp_path):
    backbone = AutoModel.from_pretrained(FIXTURES / "paper-fox-pro")  # lm_head is simply not needed
    golden = load_file(FIXTURES / "paper-fox-pro" / "golden.safetensors")
    full = AutoModelForCausalLM.from_pretrained(FIXTURES / "paper-fox-pro")
    with torch.no_grad():
        hidden = backbone(golden["input_ids"]).last_hidden_state
        assert torch.equal(full.lm_head(hidden), full(golden["input_ids"]).logits)
    backbone.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lm_head"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_weight_files_sharded_or_pickled_load_too(layout, tmp_path):
    folder = copy_fixture("paper-fox-llama", tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for shard, names in shards.items():
            save_file({k: state[k] for k in names}, folder / shard)
        weight_map = {k: shard for shard, names in shards.items() for k in names}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    golden = load_file(folder / "golden.safetensors")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(folder)(golden["input_ids"]).logits
    assert rel_err(logits, golden["logits"]) <= TOLERANCE


# --------------------------------------------------------------------------------------------------
# Export to fla
# --------------------------------------------------------------------------------------------------

FLA_EXPORTABLE = {
    "fox": dict(),
    "fox-qknorm-gate-per-head": dict(qk_norm=True, use_output_gate=True),
    "fox-qknorm-shared": dict(qk_norm=True, qk_norm_share_param_across_head=True, tie_word_embeddings=True),
    "transformer": dict(fgate_type="none", use_rope=True, qk_norm=True, qk_norm_share_param_across_head=True),
}


def randomized(model):
    """Norm weights and gate biases away from their initial values, so that a misplaced one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", list(FLA_EXPORTABLE))
def test_export_to_fla_writes_flas_layout_and_reads_back(variant, tmp_path):
    model = randomized(tiny_model(**FLA_EXPORTABLE[variant]))
    export_to_fla(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    reference = "fla-transformer" if variant == "transformer" else "fla-fox-pro"
    fla_config = json.loads((FIXTURES / reference / "config.json").read_text())
    assert checkpoint_format(config) == checkpoint_format(fla_config)
    exported = load_file(tmp_path / "model.safetensors")
    fla_names = {k for k in load_file(FIXTURES / reference / "model.safetensors")}
    assert set(exported) - {"lm_head.weight"} <= fla_names
    if model.config.qk_norm and variant != "transformer":  # fla's FoX: one q norm weight per head
        assert exported["model.layers.0.attn.q_norm.weight"].shape == (4 * 32,)
    ids = torch.randint(4, 260, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ForgettingTransformerForCausalLM.from_pretrained(tmp_path)(ids).logits,
                                   model(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,field", [
    (VARIANTS["fox-pro"], "use_k_shift"),
    (dict(use_output_norm=True), "use_output_norm"),
    (dict(fgate_type="bias_only"), "fgate_type"),
    (dict(use_rope=True), "use_rope"),
    (dict(qk_norm=True, qk_norm_eps=1e-6), "qk_norm_eps"),
    (dict(fgate_type="none", use_rope=True, qk_norm=True), "qk_norm_share_param_across_head"),
])
def test_export_refuses_what_fla_cannot_represent(overrides, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        export_to_fla(tiny_model(**overrides), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("source", list(FLA_EXPORTABLE) + ["fla-fox", "fla-fox-pro", "fla-transformer"])
def test_export_loads_in_fla_with_the_same_logits(source, tmp_path, monkeypatch):
    """fla itself (needs flash-linear-attention) loads the export; its attention is made exact as in make_golden."""
    fla_models = pytest.importorskip("fla.models")
    import fla.layers.attn
    import fla.layers.forgetting_attn

    spec = importlib.util.spec_from_file_location("make_golden", FIXTURES / "make_golden.py")
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)

    monkeypatch.setattr(fla.layers.forgetting_attn, "parallel_forgetting_attn", make_golden.fla_attention)
    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", make_golden.flash_attention)
    if source in FLA_EXPORTABLE:
        model = randomized(tiny_model(**FLA_EXPORTABLE[source]))
    else:
        model = ForgettingTransformerForCausalLM.from_pretrained(FIXTURES / source)
    export_to_fla(model, tmp_path)
    fla_class = fla_models.TransformerForCausalLM if model.config.fgate_type == "none" else \
        fla_models.ForgettingTransformerForCausalLM
    fla_model = fla_class.from_pretrained(tmp_path).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
        logits = fla_model(input_ids=ids.cuda(), use_cache=False).logits.float().cpu()
    assert rel_err(logits, expected) <= TOLERANCE


# --------------------------------------------------------------------------------------------------
# The paper's tokenizer
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def paper_tokenizer_dir(tmp_path):
    """A paper-style tokenizer folder with a tiny byte-level BPE vocabulary trained here (no download)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    text = ['The forget gate decays attention "quickly".\nIt is \\ data dependent.'] * 20
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="JSONGPT2Tokenizer", add_bos_token=True, add_prefix_space=False, errors="replace",
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False, model_max_length=16384)))
    shutil.copy(FIXTURES / "paper-fox-llama" / "config.json", tmp_path / "config.json")
    return tmp_path


def test_paper_tokenizer_escapes_like_longcrawl64_and_round_trips(paper_tokenizer_dir):
    from transformers import GPT2Tokenizer

    tokenizer = AutoTokenizer.from_pretrained(paper_tokenizer_dir)
    assert isinstance(tokenizer, JSONGPT2Tokenizer)
    plain = GPT2Tokenizer.from_pretrained(paper_tokenizer_dir)
    text = 'The gate says "forget"\n\tnow: \\ café 🦊'
    ids = tokenizer(text).input_ids
    escaped = json.dumps(text)[1:-1]  # what the model was trained on
    assert "\\n" in escaped and "\\u00e9" in escaped and "\\ud83e\\udd8a" in escaped
    assert ids == [tokenizer.bos_token_id] + plain(escaped, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.batch_decode([ids, ids], skip_special_tokens=True) == [text, text]
    assert tokenizer.tokenize(text) == plain.tokenize(escaped)


def test_json_unescape_keeps_a_cut_off_escape():
    assert json_unescape('a\\"b\\\\n\\u00e9') == 'a"b\\né'
    assert json_unescape("end of text \\u00") == "end of text \\u00"
    assert json_unescape("\\ud83e\\udd8a") == "🦊"


def test_foxlab_registers_the_paper_model_types():
    for model_type in ("forgetting_transformer-project_fox", "transformer-project_fox", "forgetting_transformer"):
        assert model_type in foxlab.checkpoints.CONFIG_MAPPING
