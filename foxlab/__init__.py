"""foxlab: the Forgetting Transformer (FoX) for learning, study and research."""

from .kernels import forgetting_attention, forgetting_attention_reference

__all__ = ["forgetting_attention", "forgetting_attention_reference"]
