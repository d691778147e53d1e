"""Eager attention: explicit scores, additive float mask, softmax in float32, optional logit softcap and sinks."""

from __future__ import annotations

import torch
from torch import nn

from ..masks import additive_mask
from ._common import check_shapes, isolate_nonfinite, reached_heads, repeat_kv


def eager_attention(
    module, query, key, value, layout, *, scaling, dropout=0.0, sliding_window=None, softcap=None, sinks=None
):
    """Shapes as in :mod:`prefixshare.backends`; returns the attention weights too, like transformers' eager."""
    n_rep = check_shapes(query, key)
    key, value, reached = isolate_nonfinite(key, value, layout, sliding_window)
    # a query that may see a non-finite key or value is made NaN: its row of scores, hence its weights (returned
    # too, so they must not be finite numbers that differ from the run alone) and its output are NaN, and other
    # rows never read it. (Cheaper than marking the [B, H, L, L] weights.)
    query = query.masked_fill(reached_heads(reached, query.shape[1]).transpose(1, 2)[..., None], float("nan"))
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        # Gemma2 caps the logits before the mask is added, as its own eager path does
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + additive_mask(layout, scores.dtype, sliding_window)
    if sinks is not None:
        # GPT-OSS: one more logit per head in every softmax row, whose probability is then dropped (its value
        # is zero); the row's other probabilities sum to less than one
        B, H, L, _ = scores.shape
        column = sinks.reshape(1, H, 1, 1).to(scores.dtype).expand(B, H, L, 1)
        scores = torch.cat([scores, column], dim=-1)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        weights = weights[..., :-1]
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights
