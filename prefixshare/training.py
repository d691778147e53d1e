"""One preference training step on a collated batch: policy forward, reference log-probs, loss.

Built only on the public pieces: ``model(**batch)`` through :func:`prefixshare.response_logps`,
:func:`prefixshare.losses.preference_loss` and :mod:`prefixshare.reference`. A plain PyTorch loop::

    prefixshare.patch(model); prefixshare.patch(reference_model)
    collator = prefixshare.PrefixShareCollator(pad_token_id=tokenizer.pad_token_id)
    for examples in loader:
        batch = collator(examples).to(device)
        loss, metrics = preference_step(model, batch, ref=reference_model, loss="dpo", beta=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .layout import LAYOUT_KEY
from .engine import response_logps
from .losses import LOSSES, REFERENCE_FREE, preference_loss
from .moe import capture_router_logits, load_balancing_loss, moe_routing
from .moe import router_aux_loss_coef as router_aux_loss_coef_of
from .reference import (
    DISABLE_ADAPTERS,
    PRECOMPUTED,
    REFERENCE_LOGPS_KEY,
    check_patched,
    model_inputs,
    reference_logps,
)

__all__ = ["preference_step"]


def preference_step(
    model,
    batch: Mapping,
    *,
    ref: Any = None,
    loss: str = "dpo",
    beta: float = 0.1,
    router_aux_loss_coef: float | None = None,
    **loss_options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one batch of preference pairs and its metrics; call ``loss.backward()`` yourself.

    Args:
        model: the policy, patched with :func:`prefixshare.patch` (a transformers model or a peft model).
        batch: a ``PrefixShareCollator`` or ``PairedCollator`` batch (K = 2: chosen then rejected), on the
            model's device; it may carry precomputed reference log-probs under ``"reference_logps"``
            (:class:`prefixshare.reference.WithReferenceLogps`), which are never passed to the model.
        ref: where the reference log-probs come from, for every loss outside ``REFERENCE_FREE``:

            * a reference model (patched), run in eval mode under ``torch.no_grad()``;
            * ``"disable_adapters"``: ``model`` is a peft model and its base weights are the reference;
            * ``"precomputed"``: read them from the batch;
            * ``None``: only for reference-free losses (simpo, orpo, nll); reference-free losses ignore
              ``ref`` and run no reference forward pass.
        loss: a name of :data:`prefixshare.losses.LOSSES` (dpo, robust, hinge, ipo, simpo, orpo, rpo, nll).
        beta: the loss's beta.
        router_aux_loss_coef: mixture-of-experts models: the weight of the router's load-balancing loss added to
            the loss, as TRL's ``DPOTrainer``: ``None`` takes the config's ``router_aux_loss_coef``, for a model
            whose text config has ``output_router_logits``; ``0.0`` turns it off. The loss is computed over the
            batch's real tokens, each prompt once (:func:`prefixshare.moe.load_balancing_loss`) and logged as
            ``aux_loss``.
        **loss_options: the loss's own options (``reduction``, ``label_smoothing``, ``gamma``, ...).

    Returns:
        ``(loss, metrics)`` from :func:`prefixshare.losses.preference_loss`: a scalar loss with a graph to the
        policy's trainable parameters, and detached scalar metrics (``rewards/accuracies`` etc.; ``aux_loss``
        for a MoE model with the load-balancing loss, whose weighted value is part of ``loss``).

    Raises:
        ValueError: unknown loss; a reference needed but ``ref`` is None; an unpatched policy or reference;
            precomputed log-probs missing or of the wrong shape; non-finite log-probs (from the loss).
    """
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known losses: {', '.join(sorted(LOSSES))}")
    if not isinstance(batch, Mapping) or LAYOUT_KEY not in batch:
        raise ValueError(
            f"expected a batch from PrefixShareCollator or PairedCollator (a mapping with {LAYOUT_KEY!r}), "
            f"got {type(batch).__name__}"
        )
    check_patched(model, "policy model")
    layout = batch[LAYOUT_KEY]
    if layout.num_responses != 2:
        raise ValueError(
            f"preference_step takes pairs (a chosen and a rejected response, K=2); this batch has "
            f"K={layout.num_responses} responses per example"
        )

    # The reference first: it runs without a graph, so the policy's activations are not held meanwhile.
    reference = None
    if loss not in REFERENCE_FREE:
        if ref is None:
            hint = f' (this batch carries {REFERENCE_LOGPS_KEY!r}: pass ref="{PRECOMPUTED}")' if (
                REFERENCE_LOGPS_KEY in batch
            ) else ""
            raise ValueError(
                f"the {loss} loss needs reference log-probs but ref is None{hint}: pass ref=<a frozen reference "
                f'model>, ref="{DISABLE_ADAPTERS}" for a peft model, or ref="{PRECOMPUTED}" with '
                f"WithReferenceLogps batches; or use a reference-free loss ({', '.join(sorted(REFERENCE_FREE))})"
            )
        reference = reference_logps(ref, batch, policy=model)

    inputs = model_inputs(batch)
    coef = router_aux_loss_coef_of(model, router_aux_loss_coef)
    if coef:
        with capture_router_logits(model) as captured:
            policy = response_logps(model, {**inputs, "output_router_logits": True})
        aux_loss = load_balancing_loss(captured.router_logits, layout, **dict(zip(("num_experts", "top_k"), moe_routing(model))))
    else:
        policy = response_logps(model, inputs)  # the LM head only where response tokens are predicted
    logps, num_tokens = policy.logps, policy.num_tokens.to(policy.logps.device)
    given = dict(
        policy_chosen_logps=logps[:, 0],
        policy_rejected_logps=logps[:, 1],
        chosen_num_tokens=num_tokens[:, 0],
        rejected_num_tokens=num_tokens[:, 1],
    )
    if reference is not None:
        given.update(reference_chosen_logps=reference[:, 0], reference_rejected_logps=reference[:, 1])
    value, metrics = preference_loss(loss, beta=beta, **given, **loss_options)
    if coef:
        value = value + coef * aux_loss.to(value.device)
        metrics = {**metrics, "aux_loss": aux_loss.detach()}
    return value, metrics
