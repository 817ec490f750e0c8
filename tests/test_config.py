import pytest

from foxlab import PRESETS, ForgettingTransformerConfig


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
