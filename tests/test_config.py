import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from foxlab import PRESETS, ForgettingTransformerConfig
from foxlab.config import SETTINGS
from foxlab.settings import Setting, SettingError, integer, require_rows

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_and_round_trip(name, tmp_path):
    config = ForgettingTransformerConfig.from_preset(name)
    assert config.num_heads * config.head_dim == config.hidden_size
    config.save_pretrained(tmp_path)
    loaded = ForgettingTransformerConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_paper_sizes():
    fox = ForgettingTransformerConfig.from_preset("fox-760m")
    assert (fox.num_hidden_layers, fox.hidden_size, fox.head_dim, fox.fgate_type) == (24, 1536, 64, "full")
    pro = ForgettingTransformerConfig.from_preset("fox-pro-125m")
    assert pro.qk_norm and pro.use_output_gate and pro.use_output_norm and pro.use_k_shift and pro.use_v_shift
    tf = ForgettingTransformerConfig.from_preset("transformer-125m")
    assert tf.fgate_type == "none" and tf.use_rope and tf.head_dim == 128


def test_overrides_and_derived_fields():
    config = ForgettingTransformerConfig.from_preset("tiny", num_kv_heads=2, hidden_ratio=2)
    assert config.num_key_value_heads == 2 and config.num_attention_heads == 4
    assert config.intermediate_size == 256  # 2/3 * 2 * 128 rounded up to 256
    assert ForgettingTransformerConfig(fgate_type="fixed").fgate_init_timescales == [1.0, 1024.0]


def test_fuse_switches_are_saved(tmp_path):
    ForgettingTransformerConfig(fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True).save_pretrained(tmp_path)
    loaded = ForgettingTransformerConfig.from_pretrained(tmp_path)
    assert loaded.fuse_norm and loaded.fuse_swiglu and loaded.fuse_cross_entropy


@pytest.mark.parametrize("kwargs,field", [
    (dict(hidden_size=100, num_heads=3), "hidden_size"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(fgate_type="sometimes"), "fgate_type"),
    (dict(attn_backend="cuda"), "attn_backend"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(fgate_init_timescales=[10, 1]), "fgate_init_timescales"),
    (dict(use_rope=True, head_dim=7, num_heads=4), "head_dim"),
    (dict(norm_eps=0), "norm_eps"),
])
def test_impossible_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ForgettingTransformerConfig(**kwargs)


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="fox-125m.*transformer-pro-125m"):
        ForgettingTransformerConfig.from_preset("fox-1b")


# --- every setting is checked (foxlab.settings): names, types, ranges ---

def bad_values(setting: Setting) -> list:
    """Values a setting must refuse, derived from its row alone, so a row added later is tested too."""
    if setting.kind is bool:
        return ["no", "False", 1, 0.0]
    if setting.choices:
        return ["nonsense", 3, True]
    if setting.kind is list:
        return [[1.0], "1,64", [1.0, "64"], [1.0, float("nan")]] + (
            [[setting.above, 2.0]] if setting.above is not None else [])
    numeric = {int: ["4", 2.5, True], float: ["4", True, float("nan"), float("inf")]}[setting.kind]
    if setting.low is not None:
        numeric.append(setting.low - 1)
    if setting.above is not None:
        numeric.append(setting.above)
    if setting.high is not None:
        numeric.append(setting.high + 1)
    return numeric + ([] if setting.optional else [None])


CASES = [(name, value) for name, setting in SETTINGS.items() for value in bad_values(setting)]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_every_setting_refuses_bad_values_and_names_itself(name, value):
    with pytest.raises(SettingError, match=rf"\b{name} must be") as e:
        ForgettingTransformerConfig(**{name: value})
    assert e.value.name == name and isinstance(e.value, ValueError) and isinstance(e.value, TypeError)
    config = ForgettingTransformerConfig()
    with pytest.raises(SettingError, match=rf"\b{name} must be"):  # also when set later
        setattr(config, name, value)


def test_messages_say_what_is_expected():
    with pytest.raises(SettingError, match=r"hidden_ratio must be a number > 0, got '4' \(a str\)"):
        ForgettingTransformerConfig.from_preset("tiny", hidden_ratio="4")
    with pytest.raises(SettingError, match=r"qk_norm must be True or False, got 'no' \(a str\)"):
        ForgettingTransformerConfig(qk_norm="no")
    with pytest.raises(SettingError, match=r"fgate_type must be one of 'full', .*, got 'ful'; did you mean 'full'"):
        ForgettingTransformerConfig(fgate_type="ful")


@pytest.mark.parametrize("name, suggestion", [
    ("num_layers", "num_hidden_layers"),
    ("fgate_init_timescale", "fgate_init_timescales"),
    ("qknorm", "qk_norm"),
    ("use_kshift", "use_k_shift"),
    ("attn_backed", "attn_backend"),
])
def test_unknown_names_are_refused_with_the_closest(name, suggestion):
    with pytest.raises(SettingError, match=rf"unknown setting '{name}'; did you mean '{suggestion}'\?"):
        ForgettingTransformerConfig.from_preset("tiny", **{name: [1, 64]})
    with pytest.raises(SettingError, match="valid settings: acp_log_tolerance, attn_backend, .*vocab_size"):
        ForgettingTransformerConfig(zzzz=1)  # nothing close: the list of valid names


def test_transformers_alias_names_point_to_ours():
    with pytest.raises(SettingError, match="num_attention_heads is called num_heads here"):
        ForgettingTransformerConfig(num_attention_heads=8)
    config = ForgettingTransformerConfig(num_heads=8)
    assert config.num_attention_heads == 8  # reading the alias still works (HF tooling reads it)


def test_a_new_argument_without_a_row_is_refused():
    def make(a, b, **kwargs):
        pass

    with pytest.raises(TypeError, match="no Setting row for parameter.*b"):
        require_rows(make, {"a": integer()}, ignore=("kwargs",))


def test_config_json_with_transformers_keys_loads(tmp_path):
    """config.json files carry transformers' own keys (and older versions wrote others): they still load."""
    config = ForgettingTransformerConfig.from_preset("tiny", num_kv_heads=2)
    data = {**config.to_dict(), "architectures": ["ForgettingTransformerForCausalLM"], "torch_dtype": "float32",
            "dtype": "float32", "transformers_version": "5.17.0", "_name_or_path": "somewhere",
            "auto_map": {}, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
            "max_length": 20, "num_beams": 1, "output_attentions": False, "_commit_hash": None}
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = AutoConfig.from_pretrained(tmp_path, output_hidden_states=True)
    assert type(loaded) is ForgettingTransformerConfig and loaded.output_hidden_states
    assert (loaded.num_kv_heads, loaded.intermediate_size) == (2, config.intermediate_size)
    with pytest.raises(SettingError, match="qk_norm must be True or False"):  # from_pretrained's overrides too
        AutoConfig.from_pretrained(tmp_path, qk_norm="no")
    (tmp_path / "config.json").write_text(json.dumps({**data, "num_layers": 3}))  # a hand-edited typo
    with pytest.raises(SettingError, match="did you mean 'num_hidden_layers'"):
        AutoConfig.from_pretrained(tmp_path)


def test_checkpoint_saved_before_the_checks_loads_with_the_same_logits():
    """tests/fixtures/run-0.1.0: saved by foxlab before settings were checked; its logits were computed then."""
    expected = load_file(FIXTURE / "expected.safetensors")
    model = AutoModelForCausalLM.from_pretrained(FIXTURE / "checkpoint").eval()
    assert model.config.qk_norm and model.config.fgate_init_timescales == [2, 64]
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-6, atol=1e-6)


def test_numpy_numbers_are_stored_as_python_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    config = ForgettingTransformerConfig(vocab_size=np.int64(300), hidden_ratio=np.float32(2.5),
                                         fgate_init_timescales=(np.float32(2), 64))
    assert type(config.vocab_size) is int and type(config.hidden_ratio) is float
    assert config.fgate_init_timescales == [2.0, 64]
    config.save_pretrained(tmp_path)  # JSON: would fail on numpy scalars
    assert ForgettingTransformerConfig.from_pretrained(tmp_path).vocab_size == 300
