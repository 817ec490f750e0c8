"""Checkpoints of the other FoX implementations: read the paper's and fla's, write fla's.

Two other codebases train FoX, each with its own ``config.json`` fields and weight names:

- the paper's (Lin et al., ICLR 2025; github zhixuan-lin/forgetting-transformer, read at commit 883f260), whose
  released checkpoints (FoX and Transformer baselines, LLaMA and Pro, 760M) are on the Hugging Face hub:
  model_type ``forgetting_transformer-project_fox`` (FoX, FoX Pro and Transformer Pro, the latter being FoX
  without gate and with RoPE) and ``transformer-project_fox`` (Transformer LLaMA);
- fla (PyPI ``flash-linear-attention``, read at 0.6.0): ``forgetting_transformer``, the very name foxlab
  registers, and ``transformer`` for its Transformer.

Importing foxlab registers these model types, so ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained`` give a
foxlab model for any of them (``transformer`` only when no other library registered it first;
``ForgettingTransformerForCausalLM.from_pretrained`` reads all of them anyway). ``foxlab_config_dict`` turns a
config.json into foxlab's fields, refusing what foxlab cannot compute exactly (naming the field), and
``foxlab_state_dict`` renames and reshapes the weights; a weight that has no place in the foxlab model, or a
foxlab weight that the checkpoint lacks, is an error, never a silently random parameter. ``export_to_fla`` writes
a foxlab model in fla's format when fla can represent it. ``JSONGPT2Tokenizer`` reads the paper's tokenizer.

Semantics that differ and are not converted: the paper's model takes labels already shifted, foxlab's shifts
them (``labels = input_ids``); fla's and the paper's attention masks are 0/1 like foxlab's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, GPT2Tokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import cached_file, logging

from .config import ForgettingTransformerConfig

logger = logging.get_logger(__name__)

PAPER_FOX, PAPER_TRANSFORMER = "forgetting_transformer-project_fox", "transformer-project_fox"
FLA_TRANSFORMER = "transformer"

# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------

# The originals' constructor defaults for every field read below (a config.json may omit any of them).
_SHARED_DEFAULTS = dict(
    vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_heads=32, num_kv_heads=None, hidden_ratio=4,
    intermediate_size=None, hidden_act="swish", window_size=None, initializer_range=0.02, elementwise_affine=True,
    norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=None, bos_token_id=1, eos_token_id=2,
)
_PAPER_DEFAULTS = dict(
    _SHARED_DEFAULTS, use_rope=False, rope_base=500000.0, use_output_gate=False, ogate_act="sigmoid",
    fgate_type="full", fgate_bias_init=False, decay_time_min=None, decay_time_max=None, use_output_norm=False,
    qk_norm=False, qk_norm_share_param_across_head=False, use_k_shift=False, use_v_shift=False,
    log_pruning_tolerance=None,
)
_FLA_DEFAULTS = dict(
    _SHARED_DEFAULTS, qkv_bias=False, qk_norm=False, use_output_gate=False, rope_theta=10000.0,
    attnres_block_size=None,
)
_DEFAULTS = {"paper": _PAPER_DEFAULTS, "paper-transformer": dict(_PAPER_DEFAULTS, use_rope=True),
             "fla": _FLA_DEFAULTS, "fla-transformer": _FLA_DEFAULTS}
# Both originals give their q/k norms a fixed epsilon, whatever norm_eps says.
ORIGINAL_QK_NORM_EPS = 1e-5
# Fields that foxlab's checkpoints lacked before they existed, with the values that reproduce those checkpoints.
_LEGACY_FOXLAB = dict(qk_norm_share_param_across_head=True, output_norm_share_param_across_head=True)


def checkpoint_format(config_dict: dict) -> str:
    """"foxlab", "paper", "paper-transformer", "fla" or "fla-transformer", from a config.json's fields."""
    model_type = config_dict.get("model_type")
    if model_type == PAPER_FOX:
        return "paper"
    if model_type == PAPER_TRANSFORMER:
        return "paper-transformer"
    if model_type == FLA_TRANSFORMER:
        return "fla-transformer"
    fla_fields = {"qkv_bias", "window_size", "elementwise_affine"}
    if model_type == ForgettingTransformerConfig.model_type and "fgate_type" not in config_dict \
            and fla_fields & config_dict.keys():
        return "fla"
    return "foxlab"


def foxlab_config_dict(config_dict: dict) -> dict:
    """ForgettingTransformerConfig fields for a config.json of any format ``checkpoint_format`` knows."""
    fmt = checkpoint_format(config_dict)
    if fmt == "foxlab":
        if "fgate_type" not in config_dict:  # not a saved config: keep today's defaults
            return dict(config_dict)
        legacy = dict(_LEGACY_FOXLAB, qk_norm_eps=config_dict.get("norm_eps", 1e-6))
        return {**legacy, **config_dict}
    source = {**_DEFAULTS[fmt], **config_dict}
    return _from_paper(source, fmt) if fmt.startswith("paper") else _from_fla(source, fmt)


def _refuse(fmt: str, field: str, value, why: str):
    raise ValueError(f"cannot load this {fmt} checkpoint exactly: {field}={value!r} ({why})")


def _common_fields(d: dict, fmt: str) -> dict:
    """The fields every format shares, as foxlab's; refuses a sliding window and norms without weights."""
    if d["window_size"] is not None:
        _refuse(fmt, "window_size", d["window_size"], "foxlab attends to the whole prefix")
    if not d["elementwise_affine"]:
        _refuse(fmt, "elementwise_affine", False, "foxlab's norms always have weights")
    ratio = 4 if d["hidden_ratio"] is None else d["hidden_ratio"]
    width = d["intermediate_size"]
    if width is None:  # the originals' rule, evaluated in their order
        width = 256 * ((int(d["hidden_size"] * ratio * 2 / 3) + 255) // 256)
    fields = {name: d[name] for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads",
                                         "hidden_act", "norm_eps", "initializer_range", "tie_word_embeddings",
                                         "pad_token_id", "bos_token_id", "eos_token_id")}
    fields.update({name: d[name] for name in ("use_cache", "dtype", "torch_dtype") if name in d})
    return dict(fields, intermediate_size=width, qk_norm_eps=ORIGINAL_QK_NORM_EPS, qk_norm_share_param_across_head=False,
                output_norm_share_param_across_head=False, model_type=ForgettingTransformerConfig.model_type)


def _from_paper(d: dict, fmt: str) -> dict:
    fields = _common_fields(d, fmt)
    if fmt == "paper-transformer":  # its own class: RoPE, no gate, no Pro switches, SwiGLU whatever hidden_act says
        return dict(fields, fgate_type="none", use_rope=d["use_rope"], rope_theta=d["rope_base"], hidden_act="swish")
    if d["use_output_gate"] and d["ogate_act"] != "sigmoid":
        _refuse(fmt, "ogate_act", d["ogate_act"], "foxlab's output gate is a sigmoid")
    if d["log_pruning_tolerance"] is not None:
        logger.warning("log_pruning_tolerance (adaptive computation pruning) is a speed-up that drops attention "
                       "weights below exp(%s); foxlab computes attention exactly", d["log_pruning_tolerance"])
    timescales = [d["decay_time_min"], d["decay_time_max"]] if d["fgate_bias_init"] else None
    switches = ("qk_norm", "qk_norm_share_param_across_head", "use_output_gate", "use_output_norm",
                "use_k_shift", "use_v_shift", "use_rope", "fgate_type")
    fields.update({name: d[name] for name in switches})
    return dict(fields, fgate_init_timescales=timescales, rope_theta=d["rope_base"])


def _from_fla(d: dict, fmt: str) -> dict:
    fields = _common_fields(d, fmt)
    if d["qkv_bias"]:
        _refuse(fmt, "qkv_bias", True, "foxlab's q/k/v projections have no bias")
    if d["attnres_block_size"] is not None:
        _refuse(fmt, "attnres_block_size", d["attnres_block_size"], "foxlab has plain residual connections")
    if d["hidden_act"] != "swish":
        _refuse(fmt, "hidden_act", d["hidden_act"], "foxlab's MLP computes act(gate) * up; fla's other one does not")
    if fmt == "fla-transformer":  # RoPE always on; q/k norm weights shared by the heads
        if d["rope_theta"] is None:
            _refuse(fmt, "rope_theta", None, "fla's Transformer always applies RoPE")
        return dict(fields, fgate_type="none", use_rope=True, rope_theta=d["rope_theta"], qk_norm=d["qk_norm"],
                    qk_norm_share_param_across_head=True)
    return dict(fields, qk_norm=d["qk_norm"], use_output_gate=d["use_output_gate"])


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

# Names outside the blocks, then per block (after "model.layers.N."): original name -> foxlab name.
_TOP_NAMES = {"model.embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}
_BLOCK_NAMES = {name: name for name in ("attn_norm.weight", "mlp_norm.weight", "attn.q_proj.weight",
                                        "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
                                        "attn.q_norm.weight", "attn.k_norm.weight", "mlp.down_proj.weight")}
_FLA_BLOCK_NAMES = dict(_BLOCK_NAMES, **{
    "attn.f_proj.weight": "attn.fgate.proj.weight", "attn.f_proj.bias": "attn.fgate.bias",
    "attn.g_proj.weight": "attn.g_proj.weight", "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
})
_PAPER_BLOCK_NAMES = dict(_BLOCK_NAMES, **{
    "attn.k_proj.linear.weight": "attn.k_proj.weight", "attn.k_proj.shift_proj.weight": "attn.shifts.k.proj.weight",
    "attn.v_proj.linear.weight": "attn.v_proj.weight", "attn.v_proj.shift_proj.weight": "attn.shifts.v.proj.weight",
    "attn.fgate_proj.weight": "attn.fgate.proj.weight", "attn.fgate_proj.bias": "attn.fgate.bias",
    "attn.fgate_bias": "attn.fgate.bias", "attn.ogate_proj.weight": "attn.g_proj.weight",
    "attn.output_norm.weight": "attn.o_norm.weight",
})
_PAPER_FUSED_MLP = "mlp.gate_proj.weight"  # the paper stacks gate and up: (2 * intermediate, hidden)
_BLOCK = re.compile(r"(model\.layers\.\d+\.)(.+)")


def foxlab_state_dict(fmt: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original checkpoint's weights under foxlab's names; raises on any weight without a place in foxlab."""
    if fmt == "foxlab":
        return dict(state_dict)
    paper = fmt.startswith("paper")
    block_names = _PAPER_BLOCK_NAMES if paper else _FLA_BLOCK_NAMES
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        match = _BLOCK.fullmatch(key)
        prefix, name = match.groups() if match else ("", key)
        names = block_names if match else _TOP_NAMES
        if paper and match and name == _PAPER_FUSED_MLP:
            out[prefix + "mlp.gate_proj.weight"], out[prefix + "mlp.up_proj.weight"] = tensor.chunk(2, dim=0)
        elif name in names:
            out[prefix + names[name]] = tensor
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"this {fmt} checkpoint has weights foxlab has no place for: {', '.join(sorted(unmapped))}")
    return out


def check_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tied: bool) -> None:
    """Raise unless ``state_dict`` holds exactly the ``expected`` names and shapes (a tied head may be absent)."""
    missing = sorted(set(expected) - set(state_dict) - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
                  for k in sorted(set(state_dict) & set(expected)) if state_dict[k].shape != expected[k].shape]
    problems = [f"{what}: {', '.join(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]
    if problems:
        raise ValueError("the checkpoint's weights do not match the model (nothing is left at random):\n"
                         + "\n".join(problems))


def check_loading_info(info: dict, source) -> None:
    """Raise when transformers reports weights it could not load (it would leave them at random)."""
    problems = {what: sorted(map(str, info.get(what) or ()))
                for what in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        listed = "; ".join(f"{what}: {', '.join(keys)}" for what, keys in problems.items() if keys)
        raise ValueError(f"{source}: the checkpoint's weights do not match the model (nothing is left at random): "
                         f"{listed}")


_DOWNLOAD_ARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def load_tensors(path, **download) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint (a folder or a hub id; safetensors or .bin, sharded or not), on the CPU."""
    for name in _WEIGHT_FILES:
        file = cached_file(path, name, _raise_exceptions_for_missing_entries=False, **download)
        if file:
            break
    else:
        raise FileNotFoundError(f"no weights in {path}: looked for {', '.join(_WEIGHT_FILES)}")
    files = [file]
    if name.endswith(".index.json"):
        shards = sorted(set(json.loads(Path(file).read_text())["weight_map"].values()))
        files = [cached_file(path, shard, **download) for shard in shards]
    tensors = {}
    for file in files:
        is_safetensors = str(file).endswith(".safetensors")
        tensors.update(load_file(file) if is_safetensors else torch.load(file, map_location="cpu", weights_only=True))
    return tensors


def prepare_from_pretrained(causal_lm_class, path, kwargs: dict):
    """The (path, kwargs) for transformers' from_pretrained: unchanged for foxlab checkpoints; for the others the
    config goes by its path (converted as it is read) and the weights, converted and checked, as ``state_dict``."""
    if path is None or "state_dict" in kwargs:
        return path, kwargs
    download = {name: kwargs[name] for name in _DOWNLOAD_ARGS if name in kwargs}
    try:
        raw, _ = PretrainedConfig.get_config_dict(path, **download)  # as saved: ForgettingTransformerConfig's converts
    except OSError:
        return path, kwargs  # no config.json: transformers says what is missing
    fmt = checkpoint_format(raw)
    if fmt == "foxlab":
        return path, kwargs
    config = kwargs.get("config")
    if not isinstance(config, ForgettingTransformerConfig):
        config = ForgettingTransformerConfig.from_dict(raw)
    state_dict = foxlab_state_dict(fmt, load_tensors(path, **download))
    with torch.device("meta"):
        expected = causal_lm_class(config).state_dict()
    check_state_dict(state_dict, expected, tied=config.tie_word_embeddings)
    return None, dict(kwargs, config=kwargs.get("config") or path, state_dict=state_dict)


# --------------------------------------------------------------------------------------------------
# Export to fla
# --------------------------------------------------------------------------------------------------


def _fla_blockers(c: ForgettingTransformerConfig) -> list[str]:
    """What in the config fla cannot represent, each as 'field=value: why'."""
    rules = [
        (c.fgate_type in ("full", "none"), f"fgate_type={c.fgate_type!r}: fla's FoX has the data-dependent gate only"),
        (c.use_rope == (c.fgate_type == "none"), f"use_rope={c.use_rope}: fla's FoX has no RoPE, its Transformer "
                                                 "always has it"),
        (not (c.use_k_shift or c.use_v_shift), "use_k_shift/use_v_shift=True: fla has no KV-shift"),
        (not c.use_output_norm, "use_output_norm=True: fla has no output norm"),
        (not (c.fgate_type == "none" and c.use_output_gate), "use_output_gate=True: fla's Transformer has none"),
        (c.hidden_act in ("silu", "swish"), f"hidden_act={c.hidden_act!r}: fla's MLP is SwiGLU"),
        (c.head_dim * c.num_heads == c.hidden_size, f"head_dim={c.head_dim}: fla's is hidden_size // num_heads"),
        (not c.qk_norm or c.qk_norm_eps == ORIGINAL_QK_NORM_EPS,
         f"qk_norm_eps={c.qk_norm_eps}: fla's q/k norms use {ORIGINAL_QK_NORM_EPS}"),
        (not (c.qk_norm and c.fgate_type == "none" and not c.qk_norm_share_param_across_head),
         "qk_norm_share_param_across_head=False: fla's Transformer shares q/k norm weights across heads"),
    ]
    return [message for ok, message in rules if not ok]


def fla_config_dict(config: ForgettingTransformerConfig) -> dict:
    """fla's config.json fields for a foxlab config it can represent."""
    fields = {name: getattr(config, name) for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "intermediate_size", "norm_eps",
        "initializer_range", "tie_word_embeddings", "qk_norm", "pad_token_id", "bos_token_id", "eos_token_id")}
    fields.update(hidden_act="swish", window_size=None, qkv_bias=False, elementwise_affine=True)
    if config.fgate_type == "none":
        return dict(fields, model_type=FLA_TRANSFORMER, architectures=["TransformerForCausalLM"],
                    rope_theta=config.rope_theta)
    return dict(fields, model_type=ForgettingTransformerConfig.model_type, use_output_gate=config.use_output_gate,
                architectures=["ForgettingTransformerForCausalLM"])


def fla_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under fla's names; q/k norm weights shared by the heads are repeated per head."""
    config, to_fla = model.config, {v: k for k, v in _FLA_BLOCK_NAMES.items()}
    to_fla_top = {v: k for k, v in _TOP_NAMES.items()}
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        match = _BLOCK.fullmatch(key)
        prefix, name = match.groups() if match else ("", key)
        tensor = tensor.detach().cpu().contiguous()
        if name in ("attn.q_norm.weight", "attn.k_norm.weight") and config.fgate_type != "none" \
                and config.qk_norm_share_param_across_head:  # fla's FoX: one weight per head
            heads = config.num_heads if name.startswith("attn.q") else config.num_kv_heads
            tensor = tensor.repeat(heads)
        out[prefix + (to_fla if match else to_fla_top)[name]] = tensor
    return out


def export_to_fla(model, save_directory) -> Path:
    """Save a foxlab model in fla's format (config.json, model.safetensors), loadable by fla's
    ``AutoModelForCausalLM.from_pretrained``: FoX as ``forgetting_transformer``, a Transformer (no gate, RoPE) as
    ``transformer``. Raises, naming the fields, for a model fla cannot represent (KV-shift, output norm, ...)."""
    blockers = _fla_blockers(model.config)
    if blockers:
        raise ValueError("fla cannot represent this model: " + "; ".join(blockers))
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(fla_config_dict(model.config), indent=2) + "\n")
    save_file(fla_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    return out


# --------------------------------------------------------------------------------------------------
# The paper's tokenizer
# --------------------------------------------------------------------------------------------------

_JSON_ESCAPES = re.compile(r'(?:\\u[0-9a-fA-F]{4}|\\["\\/bfnrt])+')


def json_unescape(text: str) -> str:
    """Undo JSON string escaping; an incomplete escape (a cut-off generation) stays as it is."""
    return _JSON_ESCAPES.sub(lambda run: json.loads(f'"{run.group(0)}"'), text)


class JSONGPT2Tokenizer(GPT2Tokenizer):
    """The paper's tokenizer: GPT-2's byte-level BPE applied to the text as a JSON string literal, without its
    quotes (LongCrawl64 stored its documents so, and the released models were trained on them).

    Encoding escapes (a newline becomes the two characters ``\\n``, non-ASCII characters ``\\uXXXX``); decoding
    undoes it. Loaded by ``AutoTokenizer`` from the paper's checkpoints once foxlab is imported.
    """

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        return super()._encode_plus(_json_escape(text), _json_escape(text_pair), *args, **kwargs)

    def _decode(self, token_ids, *args, **kwargs) -> str:
        return json_unescape(super()._decode(token_ids, *args, **kwargs))


def _json_escape(text):
    """JSON-escape a text, or every text in (nested) lists of them; None stays None."""
    if isinstance(text, str):
        return json.dumps(text)[1:-1]
    if isinstance(text, (list, tuple)):
        return type(text)(_json_escape(t) for t in text)
    return text


# --------------------------------------------------------------------------------------------------
# Registration with the Auto classes
# --------------------------------------------------------------------------------------------------


def _config_reader(model_type: str) -> type:
    """A config class that AutoConfig finds under ``model_type`` and that reads into a ForgettingTransformerConfig,
    so that the Auto model classes then pick foxlab's models."""

    class Reader(ForgettingTransformerConfig):
        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            return ForgettingTransformerConfig.from_dict(config_dict, **kwargs)

    Reader.model_type = model_type
    Reader.__name__ = Reader.__qualname__ = f"ConfigReader_{model_type.replace('-', '_')}"
    return Reader


def register() -> None:
    paper_reader = _config_reader(PAPER_FOX)
    AutoConfig.register(PAPER_FOX, paper_reader, exist_ok=True)
    AutoConfig.register(PAPER_TRANSFORMER, _config_reader(PAPER_TRANSFORMER), exist_ok=True)
    if FLA_TRANSFORMER not in CONFIG_MAPPING:  # a generic name: never take it from another library
        AutoConfig.register(FLA_TRANSFORMER, _config_reader(FLA_TRANSFORMER))
    AutoTokenizer.register(paper_reader, tokenizer_class=JSONGPT2Tokenizer, exist_ok=True)
