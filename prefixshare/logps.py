"""Per-response log-probabilities from the logits of a prefix-shared or paired batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from .collators import LAYOUT_KEY
from .layout import PrefixShareLayout
from .patch import check_logits


class ResponseLogps(NamedTuple):
    """Summed log-probs and token counts of every response, in input order.

    logps: ``[num_examples, K]`` float32, the sum of log p(token) over each response's tokens.
    num_tokens: ``[num_examples, K]`` long, the number of tokens of each response (for length
        normalization: IPO, SimPO).
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor


def _layout_of(batch_or_layout) -> PrefixShareLayout:
    if isinstance(batch_or_layout, PrefixShareLayout):
        return batch_or_layout
    if isinstance(batch_or_layout, Mapping) and LAYOUT_KEY in batch_or_layout:
        return batch_or_layout[LAYOUT_KEY]
    raise TypeError(
        f"expected a batch from PrefixShareCollator/PairedCollator (a mapping with '{LAYOUT_KEY}') "
        f"or a PrefixShareLayout, got {type(batch_or_layout).__name__}"
    )


def _input_ids_of(batch_or_layout, input_ids):
    if input_ids is not None:
        return input_ids
    if isinstance(batch_or_layout, Mapping) and "input_ids" in batch_or_layout:
        return batch_or_layout["input_ids"]
    raise TypeError("pass input_ids= when giving a layout instead of a batch")


def token_logps(predictor_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from logits of shape ``[T, V]`` (any float dtype) -> ``[T]`` float32.

    Upcasts the given rows to float32 at once: pass only the rows that predict response tokens (the
    callers gather them first), never ``[B, L, V]``.
    """
    logprobs = torch.log_softmax(predictor_logits.float(), dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sum_per_response(per_token: torch.Tensor, layout: PrefixShareLayout) -> torch.Tensor:
    """Scatter-add ``[T]`` per-token values into ``[num_examples, K]`` float32 sums."""
    n, K = layout.num_examples, layout.num_responses
    index = layout.response_index.to(per_token.device)
    sums = torch.zeros(n * K, dtype=torch.float32, device=per_token.device)
    return sums.index_add(0, index, per_token.float()).view(n, K)


def gather_response_logps(logits: torch.Tensor, batch, *, input_ids: torch.Tensor | None = None) -> ResponseLogps:
    """Summed log-probs of all K responses of every example.

    Args:
        logits: ``[B, L, V]`` logits of the forward pass on ``batch`` (any float dtype), as the patched model
            returned them (``out.logits``).
        batch: the collator's output (or its layout, then pass ``input_ids``).

    Returns:
        :class:`ResponseLogps` with ``logps`` ``[n, K]`` float32 and ``num_tokens`` ``[n, K]``.

    Raises:
        LayoutNotAppliedError: ``logits`` do not come from a forward that applied this batch's layout in every
            attention layer (an unpatched model, a changed attention implementation, another batch).
    """
    layout = _layout_of(batch)
    ids = _input_ids_of(batch, input_ids).to(logits.device)
    B, L, V = logits.shape
    if (B, L) != layout.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match the batch layout {layout.shape}")
    check_logits(logits, layout)
    layout = layout.to(logits.device)
    flat = logits.reshape(B * L, V)
    per_token = token_logps(flat[layout.predictor_index], ids.reshape(-1)[layout.target_index])
    return ResponseLogps(sum_per_response(per_token, layout), layout.response_lengths)


def split_logps(logits: torch.Tensor, batch, *, input_ids: torch.Tensor | None = None):
    """``(chosen_logps, rejected_logps)``, each ``[num_examples]`` float32, in input order.

    The log-prob of a response is the sum over its tokens. For K responses use
    :func:`gather_response_logps`.
    """
    result = gather_response_logps(logits, batch, input_ids=input_ids)
    if result.logps.shape[1] != 2:
        raise ValueError(
            f"split_logps expects chosen and rejected (K=2); this batch has K={result.logps.shape[1]} responses: "
            "use gather_response_logps"
        )
    return result.logps[:, 0], result.logps[:, 1]
