"""foxlab: the Forgetting Transformer (FoX) for learning, study and research.

Importing foxlab registers the model with transformers' Auto classes, so ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM`` (``from_config``, ``from_pretrained``) and ``generate`` work, and
``AutoTokenizer`` loads the byte-level tokenizer saved with every checkpoint. The checkpoints of the paper's code
and of fla load too, converted on reading (foxlab.checkpoints), with the paper's tokenizer (``JSONGPT2Tokenizer``);
``export_to_fla`` writes fla's format. Without ``import foxlab``, transformers does not know the model type of a
foxlab checkpoint (and suggests upgrading itself, which does not help).
Every setting is checked: a wrong name, type or value raises ``SettingError`` naming it.
Supported: transformers >= 5.0, < 6 (tested with 5.17 and 5.24).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .checkpoints import JSONGPT2Tokenizer, export_to_fla
from .checkpoints import register as _register_checkpoint_formats
from .config import PRESETS, ForgettingTransformerConfig
from .data import ByteTokenizer  # registers it with AutoTokenizer
from .attention import forgetting_attention, forgetting_attention_reference
from .model import (
    ForgettingTransformerCache,
    ForgettingTransformerForCausalLM,
    ForgettingTransformerModel,
    ForgettingTransformerPreTrainedModel,
)
from .settings import SettingError

AutoConfig.register(ForgettingTransformerConfig.model_type, ForgettingTransformerConfig, exist_ok=True)
AutoModel.register(ForgettingTransformerConfig, ForgettingTransformerModel, exist_ok=True)
AutoModelForCausalLM.register(ForgettingTransformerConfig, ForgettingTransformerForCausalLM, exist_ok=True)
_register_checkpoint_formats()  # the paper's and fla's model types, read into foxlab models

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "ByteTokenizer",
    "ForgettingTransformerCache",
    "ForgettingTransformerConfig",
    "ForgettingTransformerForCausalLM",
    "ForgettingTransformerModel",
    "ForgettingTransformerPreTrainedModel",
    "JSONGPT2Tokenizer",
    "SettingError",
    "export_to_fla",
    "forgetting_attention",
    "forgetting_attention_reference",
]
