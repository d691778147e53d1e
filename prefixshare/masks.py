"""Masks derived from a layout's attention predicate, memoized on the layout (one per batch and window).

Every mask here evaluates :meth:`PrefixShareLayout.attention_predicate`; none restates the rule.
(Variable-length kernels take the layout's :meth:`~PrefixShareLayout.varlen_sequences` instead, and
:func:`key_ranges` / :func:`reaches`, which need no ``[L, L]`` tensor, read the rule off that table the way the
varlen kernels do; tests check both against the predicate.)
"""

from __future__ import annotations

from typing import NamedTuple

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


class KeyRanges(NamedTuple):
    """What every query of a layout sees, as one contiguous range of the layout's varlen key list.

    ``query_index``, ``key_index``: those of :meth:`PrefixShareLayout.varlen_sequences` (flat ``b * L + t``
    indices; every non-padding token is a query once, prompt keys repeat for later responses).
    ``lo``, ``hi``: ``[Tq]`` long; query ``query_index[i]`` sees exactly the keys ``key_index[lo[i]:hi[i]]``.
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor


def key_ranges(layout: PrefixShareLayout, sliding_window: int | None = None) -> KeyRanges:
    """The keys each query sees (:class:`KeyRanges`), without any ``[L, L]`` tensor, memoized per window.

    Derived from :meth:`PrefixShareLayout.varlen_sequences` (tested equal to the predicate) by the rule the
    varlen kernels apply to it: in a sequence of ``n_q`` queries over ``n_k`` keys, causal aligned bottom-right,
    query ``i`` sits at key index ``i + n_k - n_q`` (its logical position) and sees the keys up to it, and with a
    window W only those at most W - 1 before it. Built with device operations of known output size (no device
    to host copy). Padding tokens are not among the queries: each sees itself only.
    """

    def build():
        seq = layout.varlen_sequences()
        len_q = seq.cu_seqlens_q[1:] - seq.cu_seqlens_q[:-1]
        len_k = seq.cu_seqlens_k[1:] - seq.cu_seqlens_k[:-1]
        sequence = torch.repeat_interleave(
            torch.arange(len(len_q), device=len_q.device), len_q, output_size=len(seq.query_index)
        )
        within = torch.arange(len(seq.query_index), device=len_q.device) - seq.cu_seqlens_q[sequence]
        position = within + (len_k - len_q)[sequence]  # the query's key index in its sequence
        first_key = seq.cu_seqlens_k[sequence].long()
        hi = first_key + position + 1
        lo = first_key if sliding_window is None else first_key + (position - (sliding_window - 1)).clamp_min(0)
        return KeyRanges(seq.query_index, seq.key_index, lo, hi)

    return layout.cached(("key_ranges", sliding_window), build)


def reaches(layout: PrefixShareLayout, marked: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """``marked`` ``[B, L, ...]`` bool, per key -> ``[B, L, ...]`` bool, per query: True where the query may
    attend to (:func:`dense_bool_mask`) at least one marked key (the trailing dims, such as key/value heads,
    are independent). ``O(B * L)``: prefix sums over :func:`key_ranges`, no ``[L, L]`` tensor, no device sync.
    """
    B, L = layout.shape
    ranges = key_ranges(layout, sliding_window)
    flat = marked.reshape(B * L, *marked.shape[2:])
    # counts[j] = marked keys among the first j of the key list; a query's range [lo, hi) holds counts[hi] - counts[lo]
    counts = flat[ranges.key_index].cumsum(0, dtype=torch.int32)
    counts = torch.cat([counts.new_zeros(1, *counts.shape[1:]), counts])
    seen = (counts[ranges.hi] - counts[ranges.lo]) > 0
    # padding tokens see themselves only: what they are marked with; real tokens: what their range holds
    return flat.index_copy(0, ranges.query_index, seen).view(marked.shape)
