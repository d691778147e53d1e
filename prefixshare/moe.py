"""The load-balancing auxiliary loss of mixture-of-experts models, over the real tokens of a prefix-shared batch.

A MoE router sends every token to ``top_k`` of ``E`` experts. The Switch-Transformer load-balancing loss that
transformers' MoE models return as ``aux_loss`` (and that TRL's ``DPOTrainer`` adds to the preference loss,
weighted by the config's ``router_aux_loss_coef``) is, over the ``N`` tokens it counts and every MoE layer::

    f_e = (number of top-k assignments of tokens to expert e) / N      (sums to top_k)
    P_e = (sum over tokens of the router's softmax probability of e) / N
    aux = E * sum_e f_e * P_e

with ``N`` the number of (token, MoE layer) pairs. Which tokens are counted is the one difference between
the formats: the paired format counts every real token of its ``2B`` rows, so each prompt twice (once per
response); a prefix-shared batch holds each prompt once, so :func:`load_balancing_loss` counts each prompt
token once and each response token once, and never a padding token. On the same data the two values differ
(the prompt's routing weighs half as much here); each is the loss of the tokens its forward actually routed.

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

__all__ = ["capture_router_logits", "load_balancing_loss", "moe_routing", "router_aux_loss_coef"]

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


def load_balancing_loss(
    router_logits, layout: PrefixShareLayout, *, num_experts: int, top_k: int
) -> torch.Tensor:
    """The load-balancing loss (see the module docstring) over the real tokens of ``layout``.

    Args:
        router_logits: the forward's ``router_logits``: one ``[B * L, E]`` tensor per MoE layer (rows in the
            batch's ``[B, L]`` order), as transformers' MoE models return them with ``output_router_logits=True``.
        layout: the batch's layout; its padding positions are left out, every other token counts once.
        num_experts, top_k: the model's ``E`` and experts per token (:func:`moe_routing`).

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
    real = (layout.segment_ids.reshape(-1) != PAD_SEGMENT).to(device=device, dtype=torch.float32)
    assignments = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probabilities = torch.zeros(num_experts, dtype=torch.float32, device=device)
    counted = torch.zeros((), dtype=torch.float32, device=device)
    for index, logits in enumerate(layers):
        if tuple(logits.shape) != (rows, num_experts):
            raise ValueError(
                f"prefixshare: router logits of MoE layer {index} have shape {tuple(logits.shape)}; expected "
                f"({rows}, {num_experts}): one row per token of the [{layout.shape[0]}, {layout.shape[1]}] batch"
            )
        weights = torch.softmax(logits.to(device).float(), dim=-1)
        chosen = torch.topk(weights, top_k, dim=-1).indices  # [rows, top_k]
        assignments = assignments.scatter_add(0, chosen.reshape(-1), real.repeat_interleave(top_k))
        probabilities = probabilities + (weights * real[:, None]).sum(dim=0)
        counted = counted + real.sum()
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
