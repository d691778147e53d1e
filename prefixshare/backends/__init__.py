"""Attention kernels for prefix-shared batches, one thin function per kernel.

Each backend has the signature::

    attend(module, query, key, value, layout, *, scaling, dropout, sliding_window, softcap)
        query: [B, H, L, D]; key, value: [B, H_kv, L, D] (grouped-query: H_kv divides H), after RoPE
        layout: the batch's PrefixShareLayout, on the query's device
        -> (out [B, L, H, D], attention weights [B, H, L, L] or None)

and derives its mask from the layout (prefixshare.masks), never from a rule of its own.
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

__all__ = ["BACKENDS", "eager_attention", "flex_attention", "sdpa_attention", "varlen_attention"]
