"""ForgettingTransformerConfig: one config for FoX, FoX (Pro) and the Transformer baselines.

The variants differ only in switches (docs/fox.md, "Variants", has the paper's ablation):

- FoX (LLaMA): pre-norm RMSNorm, SwiGLU, no positional embedding, ``fgate_type="full"``.
- FoX (Pro): FoX + ``qk_norm`` + ``use_output_gate`` + ``use_output_norm`` + ``use_k_shift``/``use_v_shift``.
- Transformer (LLaMA / Pro): the same with ``fgate_type="none"`` and ``use_rope=True``.
"""

from __future__ import annotations

import copy
import inspect

from transformers import GenerationConfig, PretrainedConfig
from transformers.activations import ACT2FN

from .settings import Setting, SettingError, check_names, choice, flag, integer, number, require_rows

FGATE_TYPES = ("full", "bias_only", "fixed", "none")
ATTN_BACKENDS = ("auto", "triton", "torch", "reference")

# What every setting of ForgettingTransformerConfig accepts (foxlab.settings). A new argument of __init__ needs
# its row here: the module refuses to import without it. Values are checked whenever they are set (in __init__,
# by from_pretrained's overrides, or later as config.name = value); how settings relate (divisibility, ...) is
# checked in __init__.
SETTINGS: dict[str, Setting] = {
    "vocab_size": integer(low=1),
    "hidden_size": integer(low=1),
    "num_hidden_layers": integer(low=1),
    "num_heads": integer(low=1),
    "num_kv_heads": integer(low=1, optional=True),
    "head_dim": integer(low=1, optional=True),
    "hidden_ratio": number(above=0),
    "intermediate_size": integer(low=1, optional=True),
    "hidden_act": choice(*ACT2FN),
    "norm_eps": number(above=0),
    "initializer_range": number(above=0),
    "tie_word_embeddings": flag(),
    "fgate_type": choice(*FGATE_TYPES),
    "fgate_init_timescales": Setting(list, length=2, above=0, optional=True),
    "qk_norm": flag(),
    "use_output_gate": flag(),
    "use_output_norm": flag(),
    "use_k_shift": flag(),
    "use_v_shift": flag(),
    "use_rope": flag(),
    "rope_theta": number(above=0),
    "fuse_norm": flag(),
    "fuse_swiglu": flag(),
    "fuse_cross_entropy": flag(),
    "attn_backend": choice(*ATTN_BACKENDS),
    "acp_log_tolerance": number(low=-1e4, high=0, optional=True),
    "use_cache": flag(),
    "qk_norm_eps": number(above=0),
    "qk_norm_share_param_across_head": flag(),
    "output_norm_share_param_across_head": flag(),
    "pad_token_id": integer(low=0, optional=True),
    "bos_token_id": integer(low=0, optional=True),
    "eos_token_id": integer(low=0, optional=True),
}


def _transformers_keys() -> set[str]:
    """Keys that transformers itself writes into or reads from any model's config.json (``architectures``,
    ``dtype``, ``transformers_version``, ...): accepted as they are, never suggested."""
    keys = set(PretrainedConfig().to_dict()) | set(inspect.signature(PretrainedConfig.__init__).parameters)
    # read by PretrainedConfig (or written by older versions) without being attributes of a fresh one
    keys |= {"auto_map", "torch_dtype", "num_labels", "name_or_path", "_commit_hash", "attn_implementation",
             "experts_implementation", "per_layer_config", "tokenizer_class", "use_return_dict",
             "_attn_implementation_internal", "_experts_implementation_internal"}
    generation_defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)
    keys |= set(generation_defaults())  # generation settings in old config.json files: popped by transformers
    return keys - {"self", "args", "kwargs"}


TRANSFORMERS_KEYS = _transformers_keys()

_PRO = dict(qk_norm=True, use_output_gate=True, use_output_norm=True, use_k_shift=True, use_v_shift=True)
_TRANSFORMER = dict(fgate_type="none", use_rope=True)
# Paper sizes (docs/fox.md, "Model sizes"): head dim 64 for FoX, 128 for the Transformer baselines;
# the vocabulary is the GPT-NeoX tokenizer's, padded to a multiple of 64.
_SIZES = {
    "125m": dict(hidden_size=768, num_hidden_layers=12),
    "360m": dict(hidden_size=1024, num_hidden_layers=24),
    "760m": dict(hidden_size=1536, num_hidden_layers=24),
}


def _paper(size: str, head_dim: int = 64, **switches) -> dict:
    sizes = _SIZES[size]
    return dict(vocab_size=50304, **sizes, num_heads=sizes["hidden_size"] // head_dim, **switches)


PRESETS: dict[str, dict] = {
    # Byte-level, a few hundred thousand parameters: trains on a laptop CPU in minutes.
    "tiny": dict(vocab_size=260, hidden_size=128, num_hidden_layers=2, num_heads=4),
    "fox-125m": _paper("125m"),
    "fox-pro-125m": _paper("125m", **_PRO),
    "fox-360m": _paper("360m"),
    "fox-pro-360m": _paper("360m", **_PRO),
    "fox-760m": _paper("760m"),
    "fox-pro-760m": _paper("760m", **_PRO),
    "transformer-125m": _paper("125m", head_dim=128, **_TRANSFORMER),
    "transformer-pro-125m": _paper("125m", head_dim=128, **_PRO, **_TRANSFORMER),
}


class ForgettingTransformerConfig(PretrainedConfig):
    """Configuration of a Forgetting Transformer.

    Args:
        vocab_size, hidden_size, num_hidden_layers: the usual sizes.
        num_heads: query heads. num_kv_heads: key/value heads (grouped-query attention), divides num_heads;
            defaults to num_heads.
        head_dim: per-head size; defaults to hidden_size // num_heads.
        hidden_ratio / intermediate_size: SwiGLU width. intermediate_size defaults to
            2/3 * hidden_ratio * hidden_size rounded up to a multiple of 256 (the LLaMA rule).
        hidden_act: the MLP's gate activation ("silu" gives SwiGLU).
        norm_eps: RMSNorm epsilon. initializer_range: std of every Linear / Embedding weight.
        fgate_type: "full" (f_t = sigmoid(w . x_t + b), data-dependent), "bias_only" (f = sigmoid(b), learned
            per head), "fixed" (f = sigmoid(b), a constant per head) or "none" (no gate: a Transformer).
        fgate_init_timescales: None (gate bias 0, f ~ 0.5, the paper's default) or [T_min, T_max]: gate biases
            b = -log(expm1(1/T)) with T log-spaced over the heads of each layer, so head h forgets on a
            timescale of about T_h tokens. "fixed" gates need timescales; they default to [1, 1024].
        qk_norm: per-head RMSNorm on q and k. use_output_gate: o * sigmoid(W_g x). use_output_norm: per-head
            RMSNorm on o before the gate. use_k_shift / use_v_shift: KV-shift, k'_t = a_t k_{t-1} + (1 - a_t) k_t.
        qk_norm_eps: epsilon of the q/k norms (1e-5 in both public FoX implementations, whatever norm_eps is).
        qk_norm_share_param_across_head / output_norm_share_param_across_head: False (the default, as in the
            paper's code today): each head's norm has its own D weights (H * D in all); True: one set of D weights
            shared by all heads, the layout of the paper's released checkpoints (q/k norms) and of foxlab's own
            checkpoints saved before these fields existed (q/k and output norms), which load as such.
        use_rope, rope_theta: rotary position embedding (the Transformer baselines; FoX uses none).
        fuse_norm, fuse_swiglu, fuse_cross_entropy: fused ops (fused.py), all on by default. ``fuse_norm``: every
            RMSNorm as one Triton kernel on CUDA, the block's residual add folded into the MLP's norm, and FoX
            Pro's element-wise extras fused too (per-head q/k norms, the output norm with its gate, KV-shift).
            ``fuse_swiglu``: silu(gate) * up as one Triton kernel on CUDA. On the CPU (or without Triton) these
            two run the plain PyTorch ops. ``fuse_cross_entropy``: when the model trains with labels, the LM head
            and the loss run in chunks, so the (tokens x vocab) logits never exist and the output's ``logits`` is
            None (a Triton kernel per chunk on CUDA, PyTorch ops elsewhere). Off: the plain PyTorch model.
        attn_backend: "auto" (Triton on CUDA, else the memory-efficient PyTorch path), "triton", "torch" or
            "reference" (exact, materialized scores).
        acp_log_tolerance: None (exact attention) or log eps <= 0 for adaptive computation pruning: every layer
            skips the scores its forget gates have decayed so far that at most eps = e^acp_log_tolerance of any
            query's attention weight is lost (foxlab.acp; -10 is the paper's choice). Training, prefill and
            decoding all prune; ``output_attentions`` stays exact. The reference backend ignores it.
        use_cache: whether forward returns a ForgettingTransformerCache by default (generation needs it).
    """

    model_type = "forgetting_transformer"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Hugging Face tooling (generation, device maps) looks for the LLaMA names.
    attribute_map = {"num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads"}

    def __init__(
        self,
        vocab_size: int = 384,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        hidden_ratio: float = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "silu",
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        fgate_type: str = "full",
        fgate_init_timescales: list[float] | None = None,
        qk_norm: bool = False,
        use_output_gate: bool = False,
        use_output_norm: bool = False,
        use_k_shift: bool = False,
        use_v_shift: bool = False,
        qk_norm_eps: float = 1e-5,
        qk_norm_share_param_across_head: bool = False,
        output_norm_share_param_across_head: bool = False,
        use_rope: bool = False,
        rope_theta: float = 10000.0,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        attn_backend: str = "auto",
        acp_log_tolerance: float | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                raise SettingError(f"{alias} is called {name} here: pass {name}", alias)
        check_names(kwargs, SETTINGS, also=TRANSFORMERS_KEYS)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = head_dim
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.fgate_type = fgate_type
        if fgate_type == "fixed" and fgate_init_timescales is None:
            fgate_init_timescales = [1.0, 1024.0]
        self.fgate_init_timescales = fgate_init_timescales
        self.qk_norm = qk_norm
        self.use_output_gate = use_output_gate
        self.use_output_norm = use_output_norm
        self.use_k_shift = use_k_shift
        self.use_v_shift = use_v_shift
        self.qk_norm_eps = qk_norm_eps
        self.qk_norm_share_param_across_head = qk_norm_share_param_across_head
        self.output_norm_share_param_across_head = output_norm_share_param_across_head
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.attn_backend = attn_backend
        self.acp_log_tolerance = acp_log_tolerance
        self.use_cache = use_cache
        self._validate_and_derive()
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def __setattr__(self, name, value):
        name = self.attribute_map.get(name, name)
        if name in SETTINGS:
            value = SETTINGS[name].check(name, value)
        super().__setattr__(name, value)

    def _validate_and_derive(self) -> None:
        """Check how settings relate (each one alone is checked when set) and fill in the derived sizes."""
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise SettingError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                                   f"({self.num_heads}), or set head_dim", "hidden_size")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise SettingError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                               f"({self.num_kv_heads})", "num_kv_heads")
        if self.intermediate_size is None:
            width = int(2 * self.hidden_ratio * self.hidden_size / 3)
            self.intermediate_size = 256 * ((width + 255) // 256)
        timescales = self.fgate_init_timescales
        if timescales is not None and not timescales[0] <= timescales[1]:
            raise SettingError(f"fgate_init_timescales must be [T_min, T_max] with T_min <= T_max, got "
                               f"{timescales}", "fgate_init_timescales")
        if self.use_rope and self.head_dim % 2:
            raise SettingError(f"use_rope needs an even head_dim, got {self.head_dim}", "head_dim")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Read a saved config: foxlab's (older ones too) or, converted by foxlab.checkpoints, the paper's or fla's."""
        from .checkpoints import foxlab_config_dict  # foxlab.checkpoints imports this module

        return super().from_dict(foxlab_config_dict(config_dict), **kwargs)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """A config.json's fields, converted to foxlab's (as from_dict does) before transformers compares model types."""
        from .checkpoints import foxlab_config_dict

        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        return foxlab_config_dict(config_dict), kwargs

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ForgettingTransformerConfig":
        """A named configuration (``tiny``, the paper's ``fox-125m`` ... ``transformer-pro-125m``), with overrides."""
        if name not in PRESETS:
            raise SettingError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}", "preset")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})


require_rows(ForgettingTransformerConfig.__init__, SETTINGS, ignore=("self", "kwargs"))
