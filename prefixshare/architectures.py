"""The decoder architectures prefixshare is verified on, keyed by the text config's ``model_type``.

Every supported decoder calls transformers' attention interface with q after RoPE (driven by
``position_ids``), passes its per-layer ``sliding_window`` and, for Gemma2, its ``softcap`` and its
``query_pre_attn_scalar`` scaling. The patch needs nothing per architecture beyond that; what differs is
recorded here so that the patch, the tests and the compatibility matrix read one table.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    """The model's architecture is not on prefixshare's verified list."""


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    notes: str


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), "Llama 2/3; full attention"),
    Architecture("mistral", ("mistral",), "sliding window on every layer (config.sliding_window)"),
    Architecture(
        "qwen2", ("qwen2",), "Qwen2 and Qwen2.5; sliding window when use_sliding_window, from max_window_layers on"
    ),
    Architecture("qwen3", ("qwen3",), "q/k norm; sliding window as Qwen2"),
    Architecture("gemma", ("gemma",), "Gemma 1"),
    Architecture(
        "gemma2",
        ("gemma2",),
        "alternating sliding/full layers, attention logit softcap (eager or flex only), query_pre_attn_scalar",
    ),
    Architecture(
        "gemma3",
        ("gemma3_text", "gemma3"),
        "5 sliding : 1 full layers, per-layer-type RoPE; the text decoder of Gemma3ForConditionalGeneration",
    ),
)

SUPPORTED_MODEL_TYPES = {t: a for a in ARCHITECTURES for t in a.model_types}


def architecture_of(config) -> Architecture | None:
    return SUPPORTED_MODEL_TYPES.get(getattr(config, "model_type", None))


def unsupported_message(model_type: str | None) -> str:
    names = ", ".join(a.name for a in ARCHITECTURES)
    return (
        f"prefixshare has not verified model_type {model_type!r}; supported architectures: {names}. "
        "A decoder that calls transformers' attention interface can opt in with "
        "prefixshare.patch(model, allow_unverified=True); check it with compat/run_matrix.py first."
    )
