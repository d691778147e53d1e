"""Per-response log-probabilities from the logits of a prefix-shared or paired batch."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import PrefixShareLayout, input_ids_of, layout_of
from .patch import check_logits


class TokenIndex(NamedTuple):
    """Where each of the ``T`` response tokens belongs (all ``[T]`` long, in the layout's target order).

    example: the example's index in the collator's input list.
    response: the response slot (0 = chosen, 1 = rejected when K = 2).
    position: the token's position within its response (0 for the first token).
    """

    example: torch.Tensor
    response: torch.Tensor
    position: torch.Tensor


class ResponseLogps(NamedTuple):
    """Summed log-probs and token counts of every response, in input order; optionally per token.

    logps: ``[num_examples, K]`` float32, the sum of log p(token) over each response's tokens.
    num_tokens: ``[num_examples, K]`` long, the number of tokens of each response (for length
        normalization: IPO, SimPO).
    token_logps: ``[T]`` float32 log p of every response token (``response_logps(..., per_token=True)``),
        with its graph; None otherwise.
    token_index: :class:`TokenIndex` of those ``T`` tokens (with ``per_token`` or ``stats``); None otherwise.
    stats: ``{name: [T] float32}`` per-token statistics (``response_logps(..., stats=...)``, no gradient; the
        ``entropy`` with its graph under ``entropy_grad=True``).
    stat_sums: ``{name: [num_examples, K] float32}`` the same summed over each response.

    :meth:`padded` turns per-token values into the ``[num_examples, K, max_len]`` form RL losses use.
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor
    token_logps: torch.Tensor | None = None
    token_index: TokenIndex | None = None
    stats: dict[str, torch.Tensor] | None = None
    stat_sums: dict[str, torch.Tensor] | None = None

    def padded(self, values: torch.Tensor | str | None = None, *, fill: float = 0.0):
        """``(padded [n, K, max_len], mask [n, K, max_len] bool)`` of per-token values.

        ``values``: a ``[T]`` tensor in token order, the name of one of :attr:`stats`, or None for
        :attr:`token_logps`. Gradients flow through the padded tensor. See :func:`pad_per_token`.
        """
        if self.token_index is None:
            raise ValueError("no per-token values: call response_logps(..., per_token=True) or with stats=...")
        if values is None:
            if self.token_logps is None:
                raise ValueError("no token_logps: call response_logps(..., per_token=True)")
            values = self.token_logps
        elif isinstance(values, str):
            if not self.stats or values not in self.stats:
                raise ValueError(f"no per-token stat {values!r}; computed: {sorted(self.stats or ())}")
            values = self.stats[values]
        return pad_per_token(values, self.token_index, self.num_tokens, fill=fill)


def token_index_of(layout: PrefixShareLayout) -> TokenIndex:
    """The :class:`TokenIndex` of a layout's ``T`` response tokens (on the layout's device)."""
    K = layout.num_responses
    owner = layout.response_index
    # a response's tokens lie side by side in its row, so a token's position is its distance to the first one
    first = torch.full((layout.num_examples * K,), torch.iinfo(torch.long).max, dtype=torch.long, device=owner.device)
    first = first.scatter_reduce(0, owner, layout.target_index, reduce="amin")
    return TokenIndex(owner // K, owner % K, layout.target_index - first[owner])


def pad_per_token(values: torch.Tensor, token_index: TokenIndex, num_tokens: torch.Tensor, *, fill: float = 0.0):
    """Per-token values ``[T]`` -> ``(padded [n, K, max_len], mask [n, K, max_len] bool)``.

    ``padded[i, k, j]`` is the value of token ``j`` of response ``k`` of example ``i``; positions past a
    response's end hold ``fill`` and are False in ``mask``. ``max_len`` is the longest response. Gradients
    flow from ``padded`` back to ``values``.
    """
    n, K = num_tokens.shape
    if values.dim() != 1 or values.shape[0] != token_index.example.shape[0]:
        raise ValueError(
            f"values must be a [T] tensor with T={token_index.example.shape[0]} tokens, got shape {tuple(values.shape)}"
        )
    max_len = int(num_tokens.max()) if num_tokens.numel() else 0
    device = values.device
    flat = ((token_index.example * K + token_index.response) * max_len + token_index.position).to(device)
    padded = values.new_full((n * K * max_len,), fill).index_put((flat,), values)
    mask = torch.zeros(n * K * max_len, dtype=torch.bool, device=device).index_fill_(0, flat, True)
    return padded.view(n, K, max_len), mask.view(n, K, max_len)


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
    layout = layout_of(batch)
    ids = input_ids_of(batch, input_ids).to(logits.device)
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
