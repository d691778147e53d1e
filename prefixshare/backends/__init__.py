"""Attention kernels for prefix-shared batches, one thin function per kernel.

Each backend has the signature::

    attend(module, query, key, value, layout, *, scaling, dropout, sliding_window, softcap, sinks=None)
        query: [B, H, L, D]; key: [B, H_kv, L, D]; value: [B, H_kv, L, D_v] (grouped-query: H_kv divides H;
            D_v may differ from D: DeepSeek's multi-head latent attention), after RoPE
        layout: the batch's PrefixShareLayout, on the query's device
        sinks: None, or [H] learned per-head attention-sink logits (GPT-OSS): a virtual key every query sees,
            with a value of zero, that only enlarges each softmax denominator by exp(sink)
        -> (out [B, L, H, D_v], attention weights [B, H, L, L] or None)

and derives its mask from the layout (prefixshare.masks), never from a rule of its own. A feature a kernel
cannot apply raises (never dropped): :data:`FEATURES` says which kernels apply which feature, and
``prefixshare.patch`` refuses the combination before any forward runs.
"""

from __future__ import annotations

from .eager import eager_attention
from .flex import flex_attention
from .sdpa import sdpa_attention
from .varlen import varlen_attention

BACKENDS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flex_attention": flex_attention,
    "varlen": varlen_attention,
}

# attention features a model may have -> the backends that apply them (every backend applies sliding windows
# in logical positions, grouped-query heads and a value head dim other than the query/key one). varlen applies a
# softcap through its reference kernel and the CUDA kernels that have one (flash-attn >= 2.6, FlashAttention-3
# releases with softcap, FlashAttention-4); where a GPU forward would reach only kernels without (torch's
# varlen_attn), patch refuses it too (prefixshare.backends.varlen.refuse_missing_kernel_features)
FEATURES = {
    "attention sinks": ("eager", "sdpa", "flex_attention"),
    "attention logit softcap": ("eager", "flex_attention", "varlen"),
}

# kernels whose attention probabilities are float32 whatever the model's dtype (transformers' eager path and this
# package's: softmax(..., dtype=torch.float32)): a float64 model computes at float32 precision there (measured,
# tiny Llama/Qwen2/Gemma2/Gemma3 in float64, initializer_range 0.2, packed probe vs alone: eager 3.4e-8 to
# 1.5e-7, float32's epsilon; sdpa 4e-17 to 1.2e-16)
SOFTMAX_IN_FLOAT32 = frozenset({"eager"})

__all__ = ["BACKENDS", "FEATURES", "SOFTMAX_IN_FLOAT32", "eager_attention", "flex_attention", "sdpa_attention", "varlen_attention"]
