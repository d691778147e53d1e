"""Masks derived from a layout's attention predicate, memoized on the layout (one per batch and window).

Every function here evaluates :meth:`PrefixShareLayout.attention_predicate`; none restates the rule.
(Variable-length kernels take the layout's :meth:`~PrefixShareLayout.varlen_sequences` instead.)
"""

from __future__ import annotations

import torch

from .layout import PrefixShareLayout


def dense_bool_mask(layout: PrefixShareLayout, sliding_window: int | None = None) -> torch.Tensor:
    """``[B, 1, L, L]`` bool, True where the query (dim 2) may attend to the key (dim 3). For sdpa."""

    def build():
        B, L = layout.shape
        rows = torch.arange(B, device=layout.device)[:, None, None, None]
        idx = torch.arange(L, device=layout.device)
        predicate = layout.attention_predicate(sliding_window)
        return predicate(rows, None, idx[None, None, :, None], idx[None, None, None, :])

    return layout.cached(("dense_bool", sliding_window), build)


def additive_mask(layout: PrefixShareLayout, dtype: torch.dtype, sliding_window: int | None = None) -> torch.Tensor:
    """``[B, 1, L, L]`` in ``dtype``: 0 where attention is allowed, the dtype's minimum elsewhere. For eager.

    (Adding a bool mask would add 0/1, silently wrong: eager and flex add what they are given.)
    """

    def build():
        allowed = dense_bool_mask(layout, sliding_window)
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    return layout.cached(("additive", sliding_window, dtype), build)


def block_mask(layout: PrefixShareLayout, sliding_window: int | None = None):
    """A FlexAttention ``BlockMask`` over ``[B, *, L, L]`` from the predicate (skips fully masked blocks)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def build():
        B, L = layout.shape
        # on CUDA, compiling the mask construction avoids materializing the [B, L, L] predicate
        return create_block_mask(
            layout.attention_predicate(sliding_window), B, None, L, L, device=layout.device,
            _compile=layout.device.type == "cuda",
        )

    return layout.cached(("block_mask", sliding_window), build)

