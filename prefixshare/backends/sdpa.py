"""torch.nn.functional.scaled_dot_product_attention with the layout's boolean mask."""

from __future__ import annotations

import torch

from ..masks import dense_bool_mask
from ._common import check_shapes


def sdpa_attention(module, query, key, value, layout, *, scaling, dropout=0.0, sliding_window=None, softcap=None):
    """Shapes as in :mod:`prefixshare.backends`. SDPA has no logit softcap: it refuses one rather than drop it."""
    if softcap is not None:
        raise ValueError(
            "prefixshare: sdpa cannot apply the attention logit softcap this model uses (Gemma2); "
            "load the model with attn_implementation='eager' or 'flex_attention', "
            "or call prefixshare.patch(model, backend='eager')"
        )
    n_rep = check_shapes(query, key)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=dense_bool_mask(layout, sliding_window),
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
        enable_gqa=n_rep > 1,
    )
    return out.transpose(1, 2).contiguous(), None
