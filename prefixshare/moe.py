"""The load-balancing auxiliary loss of mixture-of-experts models, over the real tokens of a prefix-shared batch.

A MoE router sends every token to ``top_k`` of ``E`` experts. The Switch-Transformer load-balancing loss that
transformers' MoE models return as ``aux_loss`` (and that TRL's ``DPOTrainer`` adds to the preference loss,
weighted by the config's ``router_aux_loss_coef``) is, over the ``N`` tokens it counts and every MoE layer::

    f_e = (number of top-k assignments of tokens to expert e) / N      (sums to top_k)
    P_e = (sum over tokens of the router's softmax probability of e) / N
    aux = E * sum_e f_e * P_e

with ``N`` the number of (token, MoE layer) pairs. Which tokens are counted is the one difference between
the formats: the paired format counts every real token of its ``2B`` rows, so each prompt twice (once per
response); a prefix-shared batch holds each prompt once. :func:`load_balancing_loss` counts by default what
the forward routed (each prompt token once, each response token once, never a padding token), and with
``token_weights`` any other count: :func:`paired_token_weights` gives the paired format's (each prompt token
once per response of its unit), with which the value is the paired format's (TRL's) to rounding, since a
prompt token is routed identically in every row that holds it (causal attention: its hidden states depend on
the prompt alone). The TRL drop-ins use the paired (row-format) count, so that their logged ``aux_loss`` and
loss are TRL's; ``preference_step`` counts what it routed.

Wiring: :func:`router_aux_loss_coef` decides whether a model gets the loss (as TRL: a text config that has
``output_router_logits`` and a non-zero coefficient), :func:`capture_router_logits` collects the router
logits of a forward, :func:`load_balancing_loss` computes the loss from them and the batch's layout.
``prefixshare.training.preference_step`` uses all three.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ._compat import text_config
from .layout import PAD_SEGMENT, PrefixShareLayout
from .structure import unwrap_model

__all__ = [
    "capture_router_logits", "load_balancing_loss", "moe_routing", "paired_token_weights", "router_aux_loss_coef",
]  # fmt: skip

# config fields that hold the number of routed experts, in the names transformers' MoE configs use
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def router_aux_loss_coef(model, coef: float | None = None) -> float:
    """The weight of the load-balancing loss for ``model``: 0.0 when it gets none.

    As TRL's ``DPOTrainer`` decides: ``coef`` if given, else the text config's ``router_aux_loss_coef`` (0.0 if
    it declares none); and 0.0 for a model whose text config has no ``output_router_logits`` (not a MoE model
    that returns its router logits). A non-zero ``coef`` for such a model raises ValueError.
    """
    inner = unwrap_model(model)
    config = text_config(inner.config)
    if not hasattr(config, "output_router_logits"):
        if coef:
            raise ValueError(
                f"router_aux_loss_coef is set to {coef} but {type(inner).__name__} is not a mixture-of-experts model "
                "that returns its router logits (its config has no output_router_logits): there is no auxiliary "
                "loss to weight"
            )
        return 0.0
    if coef is None:
        coef = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
    return float(coef)


def moe_routing(model) -> tuple[int, int]:
    """``(number of experts, experts per token)`` of a MoE ``model``, as its own forward passes them to its loss."""
    inner = unwrap_model(model)
    config = text_config(inner.config)
    experts = getattr(inner, "num_experts", None)
    if not isinstance(experts, int):
        experts = next((getattr(config, n) for n in _EXPERT_COUNTS if isinstance(getattr(config, n, None), int)), None)
    top_k = getattr(inner, "num_experts_per_tok", None)
    if not isinstance(top_k, int):
        top_k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(experts, int) or not isinstance(top_k, int):
        raise ValueError(
            f"prefixshare: cannot read the number of experts and experts per token of {type(inner).__name__} "
            f"(config fields {', '.join(_EXPERT_COUNTS)} and num_experts_per_tok)"
        )
    return experts, top_k


def paired_token_weights(layout: PrefixShareLayout) -> torch.Tensor:
    """``[B, L]`` float32: how often the paired format (TRL's rows) holds each token of ``layout``: a prompt token
    once per response of its unit, a response token once, padding 0. ``token_weights`` for
    :func:`load_balancing_loss` that reproduce the paired format's value."""
    weights = (layout.segment_ids != PAD_SEGMENT).to(torch.float32)
    for placement in layout.placements:
        start = placement.offset
        weights[placement.row, start : start + placement.unit.prompt_length] = len(placement.unit.response_slots)
    return weights


def load_balancing_loss(
    router_logits, layout: PrefixShareLayout, *, num_experts: int, top_k: int, token_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The load-balancing loss (see the module docstring) over the real tokens of ``layout``.

    Args:
        router_logits: the forward's ``router_logits``: one ``[B * L, E]`` tensor per MoE layer (rows in the
            batch's ``[B, L]`` order), as transformers' MoE models return them with ``output_router_logits=True``.
        layout: the batch's layout; its padding positions are left out, every other token counts once.
        num_experts, top_k: the model's ``E`` and experts per token (:func:`moe_routing`).
        token_weights: ``[B, L]`` (any real dtype), how many times each token counts, instead of once per real
            token: e.g. :func:`paired_token_weights`. Non-negative, 0 on padding.

    Returns:
        a float32 scalar with a graph to the routers' parameters.
    """
    if isinstance(router_logits, torch.Tensor):
        router_logits = (router_logits,)
    layers = [logits for logits in router_logits if logits is not None]
    if not layers:
        raise ValueError("prefixshare: the forward returned no router logits (pass output_router_logits=True)")
    rows = layout.shape[0] * layout.shape[1]
    device = layers[0].device
    real = layout.segment_ids != PAD_SEGMENT
    if token_weights is None:
        weights = real.to(torch.float32)
    else:
        if tuple(token_weights.shape) != tuple(layout.shape):
            raise ValueError(
                f"prefixshare: token_weights has shape {tuple(token_weights.shape)}; expected the batch's "
                f"{tuple(layout.shape)}"
            )
        weights = token_weights.detach().to(real.device, torch.float32)
        if bool((weights < 0).any()) or bool((weights[~real] != 0).any()):
            raise ValueError("prefixshare: token_weights must be >= 0 on tokens and 0 on padding")
    weights = weights.reshape(-1).to(device)
    assignments = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probabilities = torch.zeros(num_experts, dtype=torch.float32, device=device)
    counted = torch.zeros((), dtype=torch.float32, device=device)
    for index, logits in enumerate(layers):
        if tuple(logits.shape) != (rows, num_experts):
            raise ValueError(
                f"prefixshare: router logits of MoE layer {index} have shape {tuple(logits.shape)}; expected "
                f"({rows}, {num_experts}): one row per token of the [{layout.shape[0]}, {layout.shape[1]}] batch"
            )
        probability = torch.softmax(logits.to(device).float(), dim=-1)
        chosen = torch.topk(probability, top_k, dim=-1).indices  # [rows, top_k]
        assignments = assignments.scatter_add(0, chosen.reshape(-1), weights.repeat_interleave(top_k))
        probabilities = probabilities + (probability * weights[:, None]).sum(dim=0)
        counted = counted + weights.sum()
    return num_experts * torch.sum((assignments / counted) * (probabilities / counted))


@dataclass
class CapturedRouterLogits:
    """What :func:`capture_router_logits` collected: the ``router_logits`` of the last forward of the model."""

    router_logits: tuple = field(default_factory=tuple)
    calls: int = 0


@contextlib.contextmanager
def capture_router_logits(model):
    """Collect ``output.router_logits`` of every forward of ``model`` (a transformers model, or peft/DDP/FSDP
    around one) run inside the block; the forwards must be asked for them (``output_router_logits=True``)."""
    inner = unwrap_model(model)
    captured = CapturedRouterLogits()

    def hook(module, args, output):
        logits = getattr(output, "router_logits", None)
        if logits is not None:
            captured.router_logits = tuple(logits) if isinstance(logits, (tuple, list)) else (logits,)
            captured.calls += 1

    handle = inner.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
