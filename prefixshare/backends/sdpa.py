"""torch.nn.functional.scaled_dot_product_attention with the layout's boolean mask."""

from __future__ import annotations

import torch

from ..masks import dense_bool_mask
from ._common import check_shapes, isolate_nonfinite, mark_reached, repeat_kv


def _with_sink_key(query, key, value, mask, sinks, scaling):
    """Append one key per head whose score is that head's sink logit and whose value is zero.

    SDPA takes no per-head logit, but a key can carry it: one extra feature, 1 in every query and 0 in every
    real key, and a sink key that is 0 everywhere but ``sink / scaling`` there. Its score is then
    ``scaling * 1 * sink / scaling = sink`` for every query, its value adds nothing, and the softmax
    denominator gets ``exp(sink)``: GPT-OSS's sinks exactly, with their gradient through the key. The sink key
    differs per query head, so grouped key/value heads are repeated first; every query (padding too) sees it.
    """
    B, H, L, D = query.shape
    key, value = repeat_kv(key, H // key.shape[1]), repeat_kv(value, H // value.shape[1])
    query = torch.cat([query, query.new_ones(B, H, L, 1)], dim=-1)
    key = torch.cat([key, key.new_zeros(B, H, L, 1)], dim=-1)
    sink_key = torch.cat(
        [key.new_zeros(1, H, 1, D), (sinks.to(key.dtype) / scaling).reshape(1, H, 1, 1)], dim=-1
    ).expand(B, H, 1, D + 1)
    key = torch.cat([key, sink_key], dim=2)
    value = torch.cat([value, value.new_zeros(B, H, 1, value.shape[-1])], dim=2)
    mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], 1)], dim=-1)
    return query, key, value, mask


def sdpa_attention(
    module, query, key, value, layout, *, scaling, dropout=0.0, sliding_window=None, softcap=None, sinks=None
):
    """Shapes as in :mod:`prefixshare.backends`. SDPA has no logit softcap: it refuses one rather than drop it."""
    if softcap is not None:
        raise ValueError(
            "prefixshare: sdpa cannot apply the attention logit softcap this model uses (Gemma2); "
            "load the model with attn_implementation='eager' or 'flex_attention', "
            "or call prefixshare.patch(model, backend='eager')"
        )
    n_rep = check_shapes(query, key)
    key, value, reached = isolate_nonfinite(key, value, layout, sliding_window)
    mask = dense_bool_mask(layout, sliding_window)
    if sinks is not None:
        query, key, value, mask = _with_sink_key(query, key, value, mask, sinks, scaling)
        n_rep = 1
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        enable_gqa=n_rep > 1,
    )
    return mark_reached(out.transpose(1, 2).contiguous(), reached), None
