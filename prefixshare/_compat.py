"""Everything that differs between the transformers versions prefixshare supports (4.57 and 5.x).

The rest of the package imports these names instead of checking versions itself.
"""

from __future__ import annotations

import sys
from typing import Callable

import transformers
from packaging.version import Version
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TRANSFORMERS_VERSION = Version(transformers.__version__)

__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "ALL_MASK_ATTENTION_FUNCTIONS",
    "TRANSFORMERS_VERSION",
    "enable_gradient_checkpointing",
    "get_attn_implementation",
    "model_eager_attention",
    "register_attention",
    "rope_config_kwargs",
    "set_attn_implementation",
    "text_config",
]


def rope_config_kwargs(rope_type: str = "default", rope_theta: float = 10000.0, **values) -> dict:
    """Config keywords for a RoPE setting: 5.x takes ``rope_parameters``; 4.57 ``rope_scaling`` and ``rope_theta``."""
    if TRANSFORMERS_VERSION.major >= 5:
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": rope_theta, **values}}
    return {"rope_scaling": {"type": rope_type, "rope_type": rope_type, **values}, "rope_theta": rope_theta}


def text_config(config):
    """The config of the text decoder (the config itself for a text-only model)."""
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:  # older signature without `decoder`
        return get()


def get_attn_implementation(config) -> str | None:
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config, name: str) -> None:
    """Select an attention implementation on this config only (not on sibling vision configs).

    Writes the private attribute both versions read, bypassing 5.x's recursive setter and the
    model-level validation that only knows transformers' own names.
    """
    config._attn_implementation_internal = name


def model_eager_attention(module) -> Callable:
    """The architecture's own ``eager_attention_forward`` (Gemma2's applies the softcap, Llama's does not)."""
    for cls in type(module).__mro__:  # a subclass defined elsewhere (a user's, a test's) uses its parent's
        function = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if function is not None:
            return function
    raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward in {type(module).__module__}")


def register_attention(name: str, attention_function: Callable, mask_function: Callable) -> None:
    """Register an attention function and the mask builder that goes with it (process-global)."""
    ALL_ATTENTION_FUNCTIONS.register(name, attention_function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_function)


def enable_gradient_checkpointing(model, **checkpoint_kwargs) -> None:
    """Recompute each decoder layer in backward; ``checkpoint_kwargs`` go to ``torch.utils.checkpoint``.

    transformers 5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the
    old name warns); earlier releases have only the old one.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)
