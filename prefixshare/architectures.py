"""The error ``patch`` raises for a model it cannot make exact.

There is no list of supported architectures: ``prefixshare.patch`` decides from what the model is made of
(:mod:`prefixshare.structure`: its token mixers, its attention modules and their features, its layer types),
from what each attention call asks for, and from the self-check on the model itself
(:mod:`prefixshare.selfcheck`). ``compat/MATRIX.md`` lists every decoder-only causal LM of the installed
transformers with the result.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    """The model has a layer or an attention feature a prefix-shared batch cannot be made exact for.

    The message names the layer (or attention module) and the feature: a convolution or a recurrence over the
    sequence, attention outside transformers' ``AttentionInterface``, a kind of attention layer the kernels do
    not apply, a mask or bias the model builds itself, or a self-check that found different numbers.
    """


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    notes: str


# Kept for code that imported it (``prefixshare.ARCHITECTURES`` resolves here with a DeprecationWarning): the seven
# architectures prefixshare verified by name before support came from the model's structure. ``patch`` no longer
# reads it; compat/MATRIX.md lists every causal LM of the installed transformers instead.
ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), "Llama 2/3; full attention"),
    Architecture("mistral", ("mistral",), "sliding window on every layer"),
    Architecture("qwen2", ("qwen2",), "Qwen2 and Qwen2.5"),
    Architecture("qwen3", ("qwen3",), "q/k norm"),
    Architecture("gemma", ("gemma",), "Gemma 1"),
    Architecture("gemma2", ("gemma2",), "alternating sliding/full layers, attention logit softcap"),
    Architecture("gemma3", ("gemma3_text", "gemma3"), "5 sliding : 1 full layers, per-layer-type RoPE"),
)
