"""Memory-lean log-probs: vocabulary logits only where a response token is predicted.

``model(**batch).logits`` is ``[B, L, V]``: at a 128k-256k vocabulary it dominates activation memory,
and most of its rows (prompt tokens, padding) are thrown away by the splitter. :func:`response_logps`
runs the same forward but feeds the LM head only the ``T`` hidden states that predict response tokens,
and turns those logits into log-probs in chunks whose float32 softmax is recomputed in backward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .logps import ResponseLogps, _input_ids_of, _layout_of, sum_per_response, token_logps
from .patch import expect_layout_applied
from .structure import unwrap_model as _unwrap


def chunked_token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """``[T, V]`` logits, ``[T]`` targets -> ``[T]`` float32 log-probs, ``chunk_size`` rows at a time.

    Each chunk's float32 ``log_softmax`` is freed after use and recomputed in backward, so the extra memory
    is one ``[chunk_size, V]`` float32 block instead of ``[T, V]``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows of logits per chunk), got {chunk_size!r}")
    if logits.shape[0] <= chunk_size:
        return token_logps(logits, targets)
    if torch.is_grad_enabled() and logits.requires_grad:

        def chunk_logps(rows, rows_targets):
            return checkpoint(token_logps, rows, rows_targets, use_reentrant=False)

    else:
        chunk_logps = token_logps
    return torch.cat(
        [chunk_logps(logits[i : i + chunk_size], targets[i : i + chunk_size]) for i in range(0, len(logits), chunk_size)]
    )


def predictor_logits(model, batch) -> torch.Tensor:
    """``[T, V]`` logits at the ``T`` positions that predict response tokens, in the layout's target order.

    Runs ``model(**batch)`` as usual (peft, DDP and FSDP wrappers included) with the LM head's input narrowed
    to those rows by a temporary hook, so ``[B, L, V]`` logits never exist; the model's own final logit
    processing (Gemma2's final softcap) still applies.
    """
    layout = _layout_of(batch)
    lm_head = _unwrap(model).get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no output embeddings (LM head)")

    def keep_predictor_rows(module, args):
        hidden = args[0]
        B, L, H = hidden.shape
        if (B, L) != layout.shape:
            raise ValueError(f"hidden states {tuple(hidden.shape)} do not match the batch layout {layout.shape}")
        index = layout.to(hidden.device).predictor_index
        return (hidden.reshape(B * L, H)[index].unsqueeze(0), *args[1:])

    handle = lm_head.register_forward_pre_hook(keep_predictor_rows)
    try:
        with expect_layout_applied(model, layout):
            return model(**batch).logits[0]
    finally:
        handle.remove()


def response_targets(batch, device) -> torch.Tensor:
    """``[T]`` token ids of the response tokens, in the layout's target order."""
    layout = _layout_of(batch).to(device)
    return _input_ids_of(batch, None).to(device).reshape(-1)[layout.target_index]


def response_logps(model, batch, *, chunk_size: int = 1024) -> ResponseLogps:
    """Per-response summed log-probs of a prefix-shared (or paired) batch without ``[B, L, V]`` logits.

    Equal to ``gather_response_logps(model(**batch).logits, batch)`` (up to matmul rounding). Works with
    peft and FSDP models: see :func:`predictor_logits`.

    Returns:
        :class:`~prefixshare.logps.ResponseLogps`: ``logps`` ``[n, K]`` float32, ``num_tokens`` ``[n, K]``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows of logits per chunk), got {chunk_size!r}")
    logits = predictor_logits(model, batch)
    layout = _layout_of(batch).to(logits.device)
    per_token = chunked_token_logps(logits, response_targets(batch, logits.device), chunk_size)
    return ResponseLogps(sum_per_response(per_token, layout), layout.response_lengths)
