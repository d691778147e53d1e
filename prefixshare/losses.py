"""Paired preference losses (DPO and relatives, every ``loss_type`` of TRL 1.16) on per-response log-probs.

Every loss works on one entry per *pair* (a prompt with a chosen and a rejected response):

* ``policy_chosen_logps``, ``policy_rejected_logps``: float ``[n]``, the policy's log p(response | prompt),
  summed over the response tokens (what :func:`prefixshare.response_logps` returns).
* ``reference_chosen_logps``, ``reference_rejected_logps``: float ``[n]``, the same under the frozen
  reference model; only losses that are not in :data:`REFERENCE_FREE` need them.
* ``chosen_num_tokens``, ``rejected_num_tokens``: integer ``[n]`` (normally long), the number of response
  tokens, for losses that normalize by length (IPO by default, sigmoid_norm, SimPO, ORPO, RPO's NLL term, NLL,
  SFT).

Two variants need per-token values and come as functions on the engine's per-token output
(``response_logps(model, batch, per_token=True, stats=("log_sum_sq_probs",))``; never ``[B, L, V]``):
:func:`wpo_weights` (WPO's per-pair weights, passed to a loss as ``weights=``) and
:func:`length_desensitized_logps` (LD-DPO's log-probs, passed to a loss in place of the plain sums).

Every loss returns ``(loss, metrics)``:

* ``loss``: a scalar tensor, by default (``reduction="mean"``) the MEAN of the per-pair losses over the ``n``
  pairs. ``reduction="sum"`` returns their sum instead, so that data-parallel training can divide by a
  global pair count itself (a per-rank mean weights ranks equally however many pairs each holds);
  ``reduction="none"`` returns the ``[n]`` per-pair losses.
* ``metrics``: ``dict[str, torch.Tensor]`` of detached scalars, each a mean over the ``n`` pairs whatever
  the reduction, under TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
  ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, plus ``nll_loss`` for losses with an NLL term
  and ``log_odds_ratio``, ``log_odds_chosen`` for ORPO.

What the rewards are follows TRL:

* losses with a reference: the implicit DPO reward ``beta * (policy_logps - reference_logps)`` on *summed*
  log-probs (also for length-normalized IPO and sigmoid_norm and under an f-divergence, as in TRL's
  ``DPOTrainer``), and ``logps/*`` are the summed policy log-probs;
* reference-free losses (simpo, orpo, nll): ``beta * avg_logps`` with ``avg_logps = logps / num_tokens`` the
  per-token average the loss works with (TRL's ``CPOTrainer`` for SimPO, ``ORPOTrainer`` for ORPO), and
  ``logps/*`` are those averages too (both trainers compute average log-probs for these losses).

Each loss function below is its formula; what they share (validation, log-ratios, the f-divergence, WPO
weights, the reduction and the metrics) is written once, in :func:`_pairs` and :func:`_result`.

Non-finite log-probs (nan or inf, e.g. an fp16 overflow) raise ValueError by default, naming the argument:
a custom loop would otherwise step on a nan loss. The check costs one device sync. Every loss takes
``check_finite=False`` to skip it; nan/inf then flow into the loss and the metrics, as in TRL's trainers
(``PrefixShareDPOTrainer`` does this, and checks itself only when asked to). Shapes, dtypes and token counts are
checked either way.

Losses are computed in at least float32: 16-bit sums of hundreds of token log-probs lose the precision that
``logsigmoid`` of their differences needs.

Entry point: :func:`preference_loss` dispatches on a loss name; :data:`LOSSES` maps names to functions and
:data:`REFERENCE_FREE` names the losses that need no reference forward pass. :func:`bradley_terry_loss` is
the reward-model loss (TRL's ``RewardTrainer``) on per-response rewards.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "F_DIVERGENCES",
    "LOSSES",
    "REFERENCE_FREE",
    "TRL_LOSS_TYPES",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "bradley_terry_loss",
    "discopop_loss",
    "dpo_loss",
    "exo_pair_loss",
    "f_divergence_scores",
    "hinge_loss",
    "ipo_loss",
    "length_desensitized_logps",
    "nca_pair_loss",
    "nll_loss",
    "orpo_loss",
    "preference_loss",
    "robust_dpo_loss",
    "rpo_loss",
    "sft_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "sppo_hard_loss",
    "wpo_weights",
]

Tensor = torch.Tensor
LossOutput = tuple[Tensor, dict[str, Tensor]]

TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
"""TRL 1.16's ``DPOConfig.loss_type`` values; each is a key of :data:`LOSSES`."""

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
"""``f_divergence`` values (TRL's ``DPOConfig.f_divergence_type``, the f-DPO paper's regularizers)."""

_REDUCTIONS = ("mean", "sum", "none")

_WHAT = {
    "policy_chosen_logps": "the policy's summed log-probs of the chosen responses",
    "policy_rejected_logps": "the policy's summed log-probs of the rejected responses",
    "reference_chosen_logps": "the reference model's summed log-probs of the chosen responses",
    "reference_rejected_logps": "the reference model's summed log-probs of the rejected responses",
    "chosen_num_tokens": "the number of tokens of each chosen response",
    "rejected_num_tokens": "the number of tokens of each rejected response",
}

_UNUSED = object()  # an argument a loss does not read (None means: needed, but not given)


# --------------------------------------------------------------------------------------------------------------
# Validation of numbers
# --------------------------------------------------------------------------------------------------------------


def _finite_float(loss: str, name: str, value: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{loss} loss: {name} must be a real number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValueError(f"{loss} loss: {name} must be a finite real number, got {value!r}")
    return out


def _positive(loss: str, name: str, value: float) -> float:
    out = _finite_float(loss, name, value)
    if out <= 0:
        raise ValueError(f"{loss} loss needs {name} > 0, got {value!r}")
    return out


def _label_smoothing(loss: str, value: float, high: float = 0.5, closed: bool = False) -> float:
    """``value`` in ``[0, high)`` (``[0, high]`` when ``closed``)."""
    out = _finite_float(loss, "label_smoothing", value)
    # At 0.5 the two labels are equally likely: the DPO loss no longer prefers either response, and the
    # robust loss divides by 1 - 2 * 0.5 = 0.
    if not (0.0 <= out <= high if closed else 0.0 <= out < high):
        raise ValueError(f"{loss} loss needs label_smoothing in [0, {high:g}{']' if closed else ')'}, got {value!r}")
    return out


# --------------------------------------------------------------------------------------------------------------
# Validation of tensors
# --------------------------------------------------------------------------------------------------------------


def _check_tensors(
    loss: str,
    logps: Mapping[str, Tensor | None],
    counts: Mapping[str, Tensor | None],
    counts_alternative: str,
    check_finite: bool,
) -> None:
    """Raise ValueError unless every tensor is present, 1-D, of one shape, finite, and counts are positive.

    ``counts_alternative`` completes the hint for missing counts when a loss can do without them.
    ``check_finite=False`` skips the finiteness check only (see the module docstring).
    """
    for name, value in {**logps, **counts}.items():
        if value is None:
            hint = f"pass {name}= ({_WHAT.get(name, name)}, shape [n])"
            if name in counts and counts_alternative:
                hint += f" or {counts_alternative}"
            if name.startswith("reference_"):
                hint += f" or use a reference-free loss ({', '.join(sorted(REFERENCE_FREE))})"
            raise ValueError(f"{loss} loss needs {name}, got None: {hint}")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{loss} loss: {name} must be a torch.Tensor of shape [n], got {type(value).__name__}")

    items = list(logps.items()) + list(counts.items())
    first_name, first = items[0]
    for name, value in items:
        if value.dim() != 1:
            raise ValueError(
                f"{loss} loss: {name} must have shape [n] (one entry per pair), got shape {list(value.shape)}"
            )
        if value.shape != first.shape:
            raise ValueError(
                f"{loss} loss: shape mismatch, {first_name} has shape {list(first.shape)} "
                f"but {name} has shape {list(value.shape)}"
            )
    if first.numel() == 0:
        raise ValueError(f"{loss} loss: got no pairs ({first_name} has shape {list(first.shape)})")

    for name, value in logps.items():
        if not value.is_floating_point():
            raise ValueError(f"{loss} loss: {name} must be a floating-point tensor, got dtype {value.dtype}")
    for name, value in counts.items():
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{loss} loss: {name} must hold token counts (long), got dtype {value.dtype}")

    # One device sync for the common (valid) case; the per-argument detail is only worked out on failure.
    # check_finite=False skips it (and its sync) for callers that handle nan/inf themselves.
    if check_finite and not bool(torch.stack([torch.isfinite(v.detach()).all() for v in logps.values()]).all()):
        for name, value in logps.items():
            bad = int((~torch.isfinite(value.detach())).sum())
            if bad:
                raise ValueError(
                    f"{loss} loss: {name} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} "
                    f"(nan or inf) out of {value.numel()}"
                )
    for name, value in counts.items():
        bad = int((value <= 0).sum())
        if bad:
            raise ValueError(
                f"{loss} loss: {name} must be positive (length normalization divides by it), "
                f"got {bad} entr{'y' if bad == 1 else 'ies'} <= 0 out of {value.numel()}"
            )


def _float(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------------------------------------------
# f-divergences (f-DPO, Wang et al. 2023)
# --------------------------------------------------------------------------------------------------------------


def f_divergence_scores(logratios: Tensor, f_divergence: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """``f'(t)`` of the policy/reference ratio ``t = exp(logratios)``: what f-DPO puts where DPO has log-ratios.

    Args:
        logratios: float ``[n]``, ``policy_logps - reference_logps``.
        f_divergence: ``"reverse_kl"`` (``log t``: standard DPO), ``"forward_kl"`` (``1 - 1/t``),
            ``"js_divergence"`` (``log 2 + logsigmoid(log t)``) or ``"alpha_divergence"``
            (``(t^(alpha-1) - 1) / (alpha - 1)``, which is ``log t`` at ``alpha = 1``).
        alpha: the alpha-divergence's coefficient (TRL's ``f_alpha_divergence_coef``); ignored otherwise.

    Returns:
        float ``[n]``, same dtype as ``logratios``. As in TRL, the alpha-divergence's exponent is clamped at 80
        in float32 (11 for float16) so that the exponential stays finite.
    """
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":
        alpha = _finite_float("f-divergence", "alpha", alpha)
        if abs(alpha - 1.0) < 1e-6:  # the limit alpha -> 1 is log t
            return logratios
        t = (alpha - 1.0) * logratios
        clamp_max = {torch.float16: 11.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(_float(t), max=clamp_max)) - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence {f_divergence!r}; choose from {list(F_DIVERGENCES)}")


# --------------------------------------------------------------------------------------------------------------
# The shared preamble and ending of every loss
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pairs:
    """The validated inputs of one loss call, float32 or wider, ``[n]`` each.

    ``chosen``/``rejected``: the policy's log-probs. ``chosen_ratio``/``rejected_ratio``: policy minus
    (detached) reference log-probs, None for reference-free losses. ``chosen_score``/``rejected_score``: the
    f-divergence's ``f'`` of the ratios (the ratios themselves for reverse KL). ``chosen_tokens``/
    ``rejected_tokens``: the token counts as floats, None when the loss does not read them.
    """

    loss: str
    beta: float
    reduction: str
    chosen: Tensor
    rejected: Tensor | None
    chosen_ratio: Tensor | None
    rejected_ratio: Tensor | None
    chosen_score: Tensor | None
    rejected_score: Tensor | None
    chosen_tokens: Tensor | None
    rejected_tokens: Tensor | None

    @property
    def delta(self) -> Tensor:
        """``score_c - score_r``: the DPO margin (``h`` of the docstrings) under the chosen f-divergence."""
        return self.chosen_score - self.rejected_score

    @property
    def average_delta(self) -> Tensor:
        """``score_c / n_c - score_r / n_r``: the margin of per-token averages (IPO, sigmoid_norm)."""
        return self.chosen_score / self.chosen_tokens - self.rejected_score / self.rejected_tokens


def _pairs(
    loss: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor | None = _UNUSED,
    reference_chosen_logps: Tensor | None = _UNUSED,
    reference_rejected_logps: Tensor | None = _UNUSED,
    chosen_num_tokens: Tensor | None = _UNUSED,
    rejected_num_tokens: Tensor | None = _UNUSED,
    *,
    beta: float,
    reduction: str,
    check_finite: bool,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    counts_alternative: str = "",
) -> _Pairs:
    """Validate the arguments a loss reads (``_UNUSED``: not read) and compute what losses share."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    beta = _positive(loss, "beta", beta)
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"{loss} loss: unknown f_divergence {f_divergence!r}; choose from {list(F_DIVERGENCES)}")
    if f_divergence == "alpha_divergence":
        _finite_float(loss, "f_alpha_divergence_coef", f_alpha_divergence_coef)
    given = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
    }
    counts = {"chosen_num_tokens": chosen_num_tokens, "rejected_num_tokens": rejected_num_tokens}
    logps = {name: value for name, value in given.items() if value is not _UNUSED}
    counts = {name: value for name, value in counts.items() if value is not _UNUSED}
    _check_tensors(loss, logps, counts, counts_alternative, check_finite)

    chosen = _float(policy_chosen_logps)
    rejected = None if policy_rejected_logps is _UNUSED else _float(policy_rejected_logps)
    chosen_ratio = rejected_ratio = chosen_score = rejected_score = None
    if reference_chosen_logps is not _UNUSED:
        # The reference is a constant of the objective; detaching also keeps a caller's stray graph out of it.
        chosen_ratio = chosen - _float(reference_chosen_logps).detach()
        rejected_ratio = rejected - _float(reference_rejected_logps).detach()
        chosen_score = f_divergence_scores(chosen_ratio, f_divergence, f_alpha_divergence_coef)
        rejected_score = f_divergence_scores(rejected_ratio, f_divergence, f_alpha_divergence_coef)

    def tokens(value):
        return None if value is _UNUSED or value is None else value.to(device=chosen.device, dtype=chosen.dtype)

    return _Pairs(
        loss, beta, reduction, chosen, rejected, chosen_ratio, rejected_ratio, chosen_score, rejected_score,
        tokens(chosen_num_tokens), tokens(rejected_num_tokens),
    )  # fmt: skip


def _result(
    per_pair: Tensor,
    x: _Pairs,
    *,
    weights: Tensor | None = None,
    rewards: tuple[Tensor, Tensor] | None = None,
    logps: tuple[Tensor, Tensor] | None = None,
    **extra: Tensor,
) -> LossOutput:
    """Weigh (WPO), reduce, and report TRL's metrics.

    ``rewards`` default to ``beta * log-ratios``, ``logps`` to the policy's log-probs; ``extra`` metrics are
    ``[n]`` per-pair values reported as their means.
    """
    if weights is not None:
        per_pair = per_pair * _check_weights(x.loss, weights, per_pair)
    loss = _reduce(per_pair, x.reduction)
    chosen_rewards, rejected_rewards = rewards or (x.beta * x.chosen_ratio, x.beta * x.rejected_ratio)
    chosen_logps, rejected_logps = logps or (x.chosen, x.rejected)
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        # Strict, as in TRL: a tie is not a win.
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
    metrics.update({name: value.detach().mean() for name, value in extra.items()})
    return loss, metrics


def _reduce(per_pair: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def _check_weights(loss: str, weights, per_pair: Tensor) -> Tensor:
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.shape != per_pair.shape:
        got = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"{loss} loss: weights must be a tensor of shape {list(per_pair.shape)} (one per pair), got {got}")
    if not weights.is_floating_point():
        raise ValueError(f"{loss} loss: weights must be a floating-point tensor, got dtype {weights.dtype}")
    # WPO's weights are constants of the objective (computed without gradient, as in the paper and TRL)
    return weights.detach().to(device=per_pair.device, dtype=per_pair.dtype)


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    # cDPO: the preference label is flipped with probability label_smoothing.
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


# --------------------------------------------------------------------------------------------------------------
# Losses on the DPO margin (they take an f-divergence and WPO weights, as in TRL)
# --------------------------------------------------------------------------------------------------------------
#
# Common arguments of the losses with a reference (and their meaning everywhere below):
#   policy_chosen_logps, policy_rejected_logps: float [n], summed policy log-probs (LD-DPO: see
#       length_desensitized_logps).
#   reference_chosen_logps, reference_rejected_logps: float [n], summed reference log-probs (constants: no
#       gradient flows into them).
#   beta: > 0, the inverse temperature (strength of the KL anchor to the reference).
#   f_divergence, f_alpha_divergence_coef: the regularizer (see f_divergence_scores); "reverse_kl" is DPO.
#   weights: optional float [n] per-pair weights, constants (WPO: wpo_weights).
#   reduction: "mean" (default) over pairs, "sum", or "none" for the [n] per-pair losses.
#   check_finite: True (default): raise ValueError if a log-prob is nan or inf; False: skip that check and its
#       device sync (nan/inf then reach the loss and the metrics).
# They return (loss, metrics) as in the module docstring.


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """DPO sigmoid loss (Rafailov et al. 2023), TRL's ``loss_type="sigmoid"``, with cDPO label smoothing.

    Per pair, with ``h = (pi_c - ref_c) - (pi_r - ref_r)`` on summed log-probs (under an f-divergence,
    ``h = f'(c) - f'(r)``) and ``eps = label_smoothing`` in ``[0, 0.5)``::

        loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)

    TRL 1.x's sigmoid loss applies no label smoothing (its trainer passes none). Other arguments: see the
    comment above this function.
    """
    x = _pairs(
        "dpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite, f_divergence=f_divergence,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )  # fmt: skip
    eps = _label_smoothing("dpo", label_smoothing)
    return _result(_smoothed_sigmoid(x.beta * x.delta, eps), x, weights=weights)


def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), TRL's ``loss_type="robust"``.

    An unbiased estimate of the clean-label DPO loss when each label is flipped with probability
    ``eps = label_smoothing`` in ``[0, 0.5)``. Per pair, with ``h`` as in :func:`dpo_loss`::

        loss = (-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps)

    Unlike cDPO the correction can make single-pair losses negative. With ``eps = 0`` this is :func:`dpo_loss`.
    """
    x = _pairs(
        "robust", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite, f_divergence=f_divergence,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )  # fmt: skip
    eps = _label_smoothing("robust", label_smoothing)
    z = x.beta * x.delta
    per_pair = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _result(per_pair, x, weights=weights)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """Hinge loss on the DPO margin (SLiC-style, Zhao et al. 2023), TRL's ``loss_type="hinge"``.

    Per pair, with ``h`` as in :func:`dpo_loss`: ``loss = relu(1 - beta * h)``; ``1 / beta`` is the margin.
    """
    x = _pairs(
        "hinge", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite, f_divergence=f_divergence,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )  # fmt: skip
    return _result(torch.relu(1.0 - x.beta * x.delta), x, weights=weights)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_num_tokens: Tensor | None = None,
    rejected_num_tokens: Tensor | None = None,
    *,
    beta: float = 0.1,
    length_normalize: bool = True,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """IPO loss (Azar et al. 2023, Eq. 17, with ``tau = beta``), TRL's ``loss_type="ipo"``.

    Per pair: ``loss = (h - 1 / (2 * beta)) ** 2`` where

    * ``length_normalize=True`` (default): ``h = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r``, log-ratios
      averaged per response token;
    * ``length_normalize=False``: ``h = (pi_c - ref_c) - (pi_r - ref_r)`` on summed log-probs.

    The default is normalized because that is what TRL's ``DPOTrainer`` does (its authors report the IPO
    authors confirmed the paper's results use this form): with sums the squared loss grows with response
    length, so one ``beta`` cannot fit short and long responses alike. The original DPO reference code uses
    sums; pass ``length_normalize=False`` to reproduce it. ``chosen_num_tokens``, ``rejected_num_tokens``:
    integer ``[n]``, positive response lengths, required when ``length_normalize`` is true.

    Rewards are ``beta * (policy - reference)`` on summed log-probs, as in TRL, in both modes.
    """
    unused = (_UNUSED, _UNUSED) if not length_normalize else (chosen_num_tokens, rejected_num_tokens)
    x = _pairs(
        "ipo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *unused,
        beta=beta, reduction=reduction, check_finite=check_finite, f_divergence=f_divergence,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        counts_alternative="length_normalize=False for IPO on summed log-probs",
    )  # fmt: skip
    h = x.average_delta if length_normalize else x.delta
    return _result((h - 1.0 / (2.0 * x.beta)) ** 2, x, weights=weights)


def sigmoid_norm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_num_tokens: Tensor | None,
    rejected_num_tokens: Tensor | None,
    *,
    beta: float = 0.1,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """Length-normalized DPO, TRL's ``loss_type="sigmoid_norm"``: the sigmoid loss on per-token log-ratios.

    Per pair: ``loss = -logsigmoid(beta * ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r))``, with positive
    integer ``[n]`` response lengths ``n_c``, ``n_r``. Rewards are on summed log-probs, as in TRL.
    """
    x = _pairs(
        "sigmoid_norm", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        chosen_num_tokens, rejected_num_tokens,
        beta=beta, reduction=reduction, check_finite=check_finite, f_divergence=f_divergence,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )  # fmt: skip
    return _result(-F.logsigmoid(x.beta * x.average_delta), x, weights=weights)


def exo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """EXO for pairs (Ji et al. 2024, Eq. 16), TRL's ``loss_type="exo_pair"``.

    The reverse KL from the model's preference ``q = sigmoid(beta * h)`` (``h`` as in :func:`dpo_loss`) to the
    smoothed label distribution ``(1 - eps, eps)``, ``eps = label_smoothing`` in ``(0, 1)`` (the paper
    recommends 1e-3, the default here; TRL's default of 0 is refused by TRL too)::

        loss = q * (logsigmoid(beta * h) - log(1 - eps)) + (1 - q) * (logsigmoid(-beta * h) - log(eps))
    """
    x = _pairs(
        "exo_pair", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite, f_divergence=f_divergence,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )  # fmt: skip
    eps = _finite_float("exo_pair", "label_smoothing", label_smoothing)
    if not 0.0 < eps < 1.0:
        raise ValueError(
            f"exo_pair loss needs label_smoothing in (0, 1), got {label_smoothing!r} (the EXO paper recommends 1e-3)"
        )
    z = x.beta * x.delta
    per_pair = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return _result(per_pair, x, weights=weights)


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, Eq. 5), TRL's ``loss_type="discopop"``.

    Per pair, with ``z = beta * h`` (``h`` as in :func:`dpo_loss`) and ``m = sigmoid(z / tau)``::

        loss = (1 - m) * (-logsigmoid(z)) + m * exp(-z)

    ``tau`` > 0 is TRL's ``discopop_tau`` (default 0.05, the paper's).
    """
    x = _pairs(
        "discopop", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite, f_divergence=f_divergence,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )  # fmt: skip
    tau = _positive("discopop", "tau", tau)
    z = x.beta * x.delta
    m = torch.sigmoid(z / tau)
    return _result(-F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m, x, weights=weights)


# --------------------------------------------------------------------------------------------------------------
# Losses on each response's log-ratio (no f-divergence generalization, as in TRL)
# --------------------------------------------------------------------------------------------------------------


def nca_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """NCA for pairs (Chen et al. 2024, "Noise Contrastive Alignment"), TRL's ``loss_type="nca_pair"``.

    Per pair, with rewards ``r_c = beta * (pi_c - ref_c)``, ``r_r = beta * (pi_r - ref_r)``::

        loss = -logsigmoid(r_c) - 0.5 * logsigmoid(-r_c) - 0.5 * logsigmoid(-r_r)
    """
    x = _pairs(
        "nca_pair", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    r_c, r_r = x.beta * x.chosen_ratio, x.beta * x.rejected_ratio
    per_pair = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return _result(per_pair, x, weights=weights)


def bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    reward_shift: float | Tensor = 0.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """BCO for pairs (Jung et al. 2024, "Binary Classifier Optimization"), TRL's ``loss_type="bco_pair"``.

    Chosen responses are classified as good and rejected ones as bad, each on its own reward
    ``r = beta * (pi - ref)``, shifted by ``delta = reward_shift``::

        loss = -logsigmoid(r_c - delta) - logsigmoid(-(r_r - delta))

    TRL 1.16's ``bco_pair`` uses ``delta = 0`` (the default here). The BCO paper (and TRL before 1.0) shifts by a
    running mean of the rewards: keep one in your loop, e.g. the mean of ``(r_c + r_r) / 2`` over past batches
    (the ``rewards/chosen``, ``rewards/rejected`` metrics), and pass it as ``reward_shift`` (a float or a 0-d
    tensor, treated as a constant).
    """
    x = _pairs(
        "bco_pair", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    if isinstance(reward_shift, torch.Tensor):
        if reward_shift.numel() != 1:
            raise ValueError(f"bco_pair loss: reward_shift must be a number, got shape {list(reward_shift.shape)}")
        delta = reward_shift.detach().to(device=x.chosen.device, dtype=x.chosen.dtype).reshape(())
    else:
        delta = _finite_float("bco_pair", "reward_shift", reward_shift)
    r_c, r_r = x.beta * x.chosen_ratio, x.beta * x.rejected_ratio
    return _result(-F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta)), x, weights=weights)


def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, Eq. 4.7 with P = 1 for the winner), TRL's ``"sppo_hard"``.

    Per pair: ``loss = ((pi_c - ref_c) - 1 / (2 * beta)) ** 2 + ((pi_r - ref_r) + 1 / (2 * beta)) ** 2``.
    """
    x = _pairs(
        "sppo_hard", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    per_pair = (x.chosen_ratio - 0.5 / x.beta) ** 2 + (x.rejected_ratio + 0.5 / x.beta) ** 2
    return _result(per_pair, x, weights=weights)


def apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7), TRL's ``loss_type="apo_zero"``: for chosen responses
    better than the model's own; raises the chosen likelihood and lowers the rejected one.

    Per pair, with ``r = beta * (pi - ref)``: ``loss = (1 - sigmoid(r_c)) + sigmoid(r_r)``.
    """
    x = _pairs(
        "apo_zero", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    per_pair = (1 - torch.sigmoid(x.beta * x.chosen_ratio)) + torch.sigmoid(x.beta * x.rejected_ratio)
    return _result(per_pair, x, weights=weights)


def apo_down_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), TRL's ``loss_type="apo_down"``: for chosen responses
    worse than the model's own; lowers both likelihoods, the rejected one more.

    Per pair, with ``r = beta * (pi - ref)``: ``loss = sigmoid(r_c) + (1 - sigmoid(r_c - r_r))``.
    """
    x = _pairs(
        "apo_down", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    r_c = x.beta * x.chosen_ratio
    # TRL computes beta * (c - r) rather than beta * c - beta * r: the same number up to rounding, kept for equality
    return _result(torch.sigmoid(r_c) + (1 - torch.sigmoid(x.beta * (x.chosen_ratio - x.rejected_ratio))), x,
                   weights=weights)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Losses on the batch's sorted margins (AOT: they couple the pairs of a batch, so no per-pair weights)
# --------------------------------------------------------------------------------------------------------------


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """AOT for paired data (Melnyk et al. 2024, "Distributional Preference Alignment"), TRL's ``"aot"``.

    The policy's margins ``pi_c - pi_r`` and the reference's ``ref_c - ref_r`` are each sorted over the batch,
    and the cDPO loss is taken on their sorted differences ``d``::

        loss_i = -(1 - eps) * logsigmoid(beta * d_i) - eps * logsigmoid(-beta * d_i),
        d = sort(pi_c - pi_r) - sort(ref_c - ref_r)

    ``eps = label_smoothing`` in ``[0, 1]``, as TRL takes it. The loss is a property of the whole batch (of one
    process, as in TRL): ``reduction="none"`` returns the ``[n]`` terms in sorted order, not per pair.
    """
    x = _pairs(
        "aot", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    eps = _label_smoothing("aot", label_smoothing, high=1.0, closed=True)
    reference = _float(reference_chosen_logps).detach() - _float(reference_rejected_logps).detach()
    d = torch.sort(x.chosen - x.rejected, dim=0).values - torch.sort(reference, dim=0).values
    return _result(_smoothed_sigmoid(x.beta * d, eps), x)


def aot_unpaired_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """AOT for unpaired data (Melnyk et al. 2024), TRL's ``loss_type="aot_unpaired"``.

    The chosen log-ratios and the rejected log-ratios are each sorted over the batch; the cDPO loss is taken on
    ``d = sort(pi_c - ref_c) - sort(pi_r - ref_r)`` as in :func:`aot_loss` (same ``label_smoothing`` range,
    same batch-level ``reduction="none"``).
    """
    x = _pairs(
        "aot_unpaired", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    eps = _label_smoothing("aot_unpaired", label_smoothing, high=1.0, closed=True)
    d = torch.sort(x.chosen_ratio, dim=0).values - torch.sort(x.rejected_ratio, dim=0).values
    return _result(_smoothed_sigmoid(x.beta * d, eps), x)


# --------------------------------------------------------------------------------------------------------------
# DPO plus an NLL term
# --------------------------------------------------------------------------------------------------------------


def rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_num_tokens: Tensor | None,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): DPO plus an NLL term on chosen.

    Per pair: ``loss = dpo + alpha * (-pi_c / n_c)``, with ``dpo`` the per-pair :func:`dpo_loss` (same
    ``beta`` and ``label_smoothing``) and the NLL the chosen response's mean per-token negative log-likelihood.
    ``alpha`` >= 0 (default 1.0, the RPO paper's) weighs the NLL; ``chosen_num_tokens``: integer ``[n]``,
    positive lengths of the chosen responses. TRL 1.x writes RPO as ``loss_type=["sigmoid", "sft"],
    loss_weights=[1, alpha]``, whose NLL is one token-weighted mean over the whole batch (:func:`sft_loss`);
    this takes it per pair, then averages pairs like every other term here. The two agree when all chosen
    responses have the same length.

    Returns ``(loss, metrics)``: DPO's metrics plus ``nll_loss``, the mean over pairs of the (unweighted) NLL.
    """
    x = _pairs(
        "rpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        chosen_num_tokens, beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    eps = _label_smoothing("rpo", label_smoothing)
    alpha = _finite_float("rpo", "alpha", alpha)
    if alpha < 0:
        raise ValueError(f"rpo loss needs alpha >= 0, got {alpha!r}")
    nll = -x.chosen / x.chosen_tokens
    return _result(_smoothed_sigmoid(x.beta * x.delta, eps) + alpha * nll, x, nll_loss=nll)


# --------------------------------------------------------------------------------------------------------------
# Reference-free losses
# --------------------------------------------------------------------------------------------------------------


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_num_tokens: Tensor | None,
    rejected_num_tokens: Tensor | None,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """SimPO (Meng et al. 2024): reference-free, on length-normalized log-probs, with a target margin.

    Per pair, with ``avg = logps / num_tokens`` and ``z = beta * (avg_c - avg_r) - gamma``::

        loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)        (eps = label_smoothing in [0, 0.5))

    ``gamma`` (finite) is the target reward margin in reward units (the paper's gamma). It is exactly TRL's
    ``CPOConfig.simpo_gamma`` (TRL computes ``beta * (avg_c - avg_r - simpo_gamma / beta)``), default 0.5 as
    there. The SimPO reference code instead takes ``gamma_beta_ratio``: use ``gamma = beta *
    gamma_beta_ratio``. The paper tunes ``beta`` around 2-10 and ``gamma_beta_ratio`` around 0.3-1.6; the
    ``beta=0.1`` default only matches :func:`preference_loss`'s default. TRL's ``CPOTrainer`` adds an NLL
    term unless ``cpo_alpha=0``; this is the pure SimPO loss. ``chosen_num_tokens``, ``rejected_num_tokens``:
    integer ``[n]``, positive response lengths.

    Returns ``(loss, metrics)``: rewards are ``beta * avg`` and ``logps/*`` the averages ``avg``, as in TRL.
    """
    x = _pairs(
        "simpo", policy_chosen_logps, policy_rejected_logps, chosen_num_tokens=chosen_num_tokens,
        rejected_num_tokens=rejected_num_tokens, beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    gamma = _finite_float("simpo", "gamma", gamma)
    eps = _label_smoothing("simpo", label_smoothing)
    avg_c, avg_r = x.chosen / x.chosen_tokens, x.rejected / x.rejected_tokens
    per_pair = _smoothed_sigmoid(x.beta * (avg_c - avg_r) - gamma, eps)
    return _result(per_pair, x, rewards=(x.beta * avg_c, x.beta * avg_r), logps=(avg_c, avg_r))


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012)."""
    # Near 0, 1 - exp(x) cancels: use expm1 there; far below, exp(x) underflows gracefully in log1p. Each
    # branch only sees inputs from its own side, else the discarded branch's inf gradient turns into nan.
    split = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=split)))
    far_below = torch.log1p(-torch.exp(x.clamp(max=split)))
    return torch.where(x > split, near_zero, far_below)


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_num_tokens: Tensor | None,
    rejected_num_tokens: Tensor | None,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """ORPO (Hong et al. 2024): NLL on chosen plus a weighted odds-ratio term, reference-free.

    Per pair, with ``avg = logps / num_tokens`` (so ``exp(avg)`` is the per-token geometric-mean probability)::

        log_odds = (avg_c - avg_r) - (log(1 - exp(avg_c)) - log(1 - exp(avg_r)))
        loss     = -avg_c + beta * (-logsigmoid(log_odds))

    ``beta`` > 0 is the paper's lambda, as TRL's ``ORPOConfig.beta`` (default 0.1). TRL's NLL is one
    token-weighted mean over the batch; here it is per pair, which agrees when chosen lengths are equal. The
    summed log-probs must be ``<= 0`` (the odds need a probability below 1; an average of exactly 0 is nudged
    just below it).

    Returns ``(loss, metrics)``: rewards ``beta * avg``, ``logps/*`` the averages, ``nll_loss`` (mean of
    ``-avg_c``), and TRL's ``log_odds_ratio`` (mean ``logsigmoid(log_odds)``) and ``log_odds_chosen``
    (mean ``log_odds``).
    """
    x = _pairs(
        "orpo", policy_chosen_logps, policy_rejected_logps, chosen_num_tokens=chosen_num_tokens,
        rejected_num_tokens=rejected_num_tokens, beta=beta, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    avg_c, avg_r = x.chosen / x.chosen_tokens, x.rejected / x.rejected_tokens
    for name, avg in (("policy_chosen_logps", avg_c), ("policy_rejected_logps", avg_r)):
        bad = int((avg.detach() > 0).sum())
        if bad:
            raise ValueError(
                f"orpo loss: {name} has {bad} positive entr{'y' if bad == 1 else 'ies'}; log-probabilities "
                "must be <= 0 for the odds p / (1 - p) to exist"
            )
    # A probability of exactly 1 has infinite odds; stay one float step below so the loss and its gradient
    # remain finite.
    below_zero = -torch.finfo(avg_c.dtype).tiny
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c.clamp(max=below_zero)) - _log1mexp(avg_r.clamp(max=below_zero)))
    log_odds_ratio = F.logsigmoid(log_odds)
    return _result(
        -avg_c - x.beta * log_odds_ratio, x, rewards=(x.beta * avg_c, x.beta * avg_r), logps=(avg_c, avg_r),
        nll_loss=-avg_c, log_odds_ratio=log_odds_ratio, log_odds_chosen=log_odds,
    )  # fmt: skip


def _chosen_only(
    loss: str,
    policy_chosen_logps,
    chosen_num_tokens,
    policy_rejected_logps,
    rejected_num_tokens,
    *,
    beta,
    length_normalize: bool,
    reduction,
    check_finite,
) -> _Pairs:
    """The preamble of the losses on chosen responses alone (nll, sft); rejected values only feed the metrics
    (``rejected_num_tokens=_UNUSED``: not read)."""
    with_rejected = policy_rejected_logps is not None
    return _pairs(
        loss,
        policy_chosen_logps,
        policy_rejected_logps if with_rejected else _UNUSED,
        chosen_num_tokens=chosen_num_tokens if length_normalize else _UNUSED,
        rejected_num_tokens=rejected_num_tokens if with_rejected and length_normalize else _UNUSED,
        beta=beta,
        reduction=reduction,
        check_finite=check_finite,
        counts_alternative="length_normalize=False for the summed NLL" if loss == "nll" else "",
    )


def nll_loss(
    policy_chosen_logps: Tensor,
    chosen_num_tokens: Tensor | None = None,
    *,
    policy_rejected_logps: Tensor | None = None,
    rejected_num_tokens: Tensor | None = None,
    beta: float = 0.1,
    length_normalize: bool = True,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """Negative log-likelihood of the chosen responses (SFT on the preferred side), reference-free.

    Per pair: ``loss = -pi_c / n_c`` (``length_normalize=True``, default: mean NLL per token, the scale of an
    SFT loss and of the NLL terms of :func:`rpo_loss` and :func:`orpo_loss`) or ``-pi_c``
    (``length_normalize=False``). ``chosen_num_tokens``: integer ``[n]``, positive lengths, required when
    ``length_normalize`` is true. ``policy_rejected_logps``, ``rejected_num_tokens``: optional, used only for
    the reward metrics. ``beta`` > 0 scales the logged rewards only.

    Returns ``(loss, metrics)``: ``nll_loss`` and ``logps/chosen`` (per-token averages when normalized); when
    ``policy_rejected_logps`` is given, also ``logps/rejected`` and rewards ``beta * logps`` as for the
    other reference-free losses.
    """
    x = _chosen_only(
        "nll", policy_chosen_logps, chosen_num_tokens, policy_rejected_logps, rejected_num_tokens, beta=beta,
        length_normalize=length_normalize, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    chosen = x.chosen / x.chosen_tokens if length_normalize else x.chosen
    if x.rejected is None:
        return _reduce(-chosen, x.reduction), {"logps/chosen": chosen.detach().mean(), "nll_loss": -chosen.detach().mean()}
    rejected = x.rejected / x.rejected_tokens if length_normalize else x.rejected
    return _result(-chosen, x, rewards=(x.beta * chosen, x.beta * rejected), logps=(chosen, rejected), nll_loss=-chosen)


def sft_loss(
    policy_chosen_logps: Tensor,
    chosen_num_tokens: Tensor | None,
    *,
    policy_rejected_logps: Tensor | None = None,
    beta: float = 0.1,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """TRL's ``loss_type="sft"``: the negative log-likelihood of all chosen tokens of the batch, one token mean.

    ``loss = -sum_i pi_c[i] / sum_i n_c[i]``: every chosen token weighs the same, however its response is long
    (unlike :func:`nll_loss`'s per-pair means). The per-pair terms (``reduction="none"``) are each pair's share,
    ``-pi_c[i] * n / sum(n_c)``, so that their mean is the loss. Arguments as in :func:`nll_loss`
    (``chosen_num_tokens`` is required; ``policy_rejected_logps`` feeds the metrics only; ``beta`` is unused, taken
    for a uniform call).

    Returns ``(loss, metrics)``: ``nll_loss`` (the batch's token-mean NLL) and ``logps/chosen`` (the mean summed
    log-prob); with ``policy_rejected_logps``, also ``logps/rejected``.
    """
    x = _chosen_only(
        "sft", policy_chosen_logps, chosen_num_tokens, policy_rejected_logps, _UNUSED, beta=beta,
        length_normalize=True, reduction=reduction, check_finite=check_finite,
    )  # fmt: skip
    per_pair = -x.chosen * (x.chosen.shape[0] / x.chosen_tokens.sum())
    loss = _reduce(per_pair, x.reduction)
    metrics = {"logps/chosen": x.chosen.detach().mean(), "nll_loss": per_pair.detach().mean()}
    if x.rejected is not None:
        metrics["logps/rejected"] = x.rejected.detach().mean()
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------
# Per-token variants: WPO weights and LD-DPO log-probs (on the engine's per-token output)
# --------------------------------------------------------------------------------------------------------------


def _per_response(values: Tensor, token_index, num_tokens: Tensor, what: str) -> Tensor:
    """Sum ``[T]`` per-token values into ``[n, K]`` float32 (or wider) per-response sums."""
    if not isinstance(num_tokens, torch.Tensor) or num_tokens.dim() != 2:
        got = list(num_tokens.shape) if isinstance(num_tokens, torch.Tensor) else type(num_tokens).__name__
        raise ValueError(f"{what}: num_tokens must be the [n, K] token counts (ResponseLogps.num_tokens), got {got}")
    example, response = getattr(token_index, "example", None), getattr(token_index, "response", None)
    if not isinstance(example, torch.Tensor) or not isinstance(response, torch.Tensor):
        raise ValueError(f"{what}: token_index must be the engine's TokenIndex (example, response, position)")
    if values.dim() != 1 or values.shape[0] != example.shape[0]:
        raise ValueError(
            f"{what}: per-token values must have shape [T] with T={example.shape[0]} tokens, got {list(values.shape)}"
        )
    n, K = num_tokens.shape
    values = _float(values)
    flat = (example * K + response).to(values.device)
    return values.new_zeros(n * K).index_add(0, flat, values).view(n, K)


def wpo_weights(
    token_logps: Tensor, token_log_sum_sq_probs: Tensor, token_index, num_tokens: Tensor
) -> Tensor:
    """WPO's per-pair weights (Zhou et al. 2024, Eq. 2, as TRL's ``use_weighting=True``): ``w_c * w_r``.

    Each response's weight is its length-normalized probability under the policy, with every token's
    probability divided by the probability that the policy's own distribution samples the same token twice::

        w = exp( mean over the response's tokens of (log p(token) - log sum_v p_v^2) )

    Args:
        token_logps: ``[T]`` per-token log-probs of the policy (``ResponseLogps.token_logps``).
        token_log_sum_sq_probs: ``[T]`` ``log sum_v p_v^2`` per token (``ResponseLogps.stats["log_sum_sq_probs"]``
            from ``response_logps(..., stats=("log_sum_sq_probs",))``).
        token_index: the engine's :class:`~prefixshare.TokenIndex` of those tokens.
        num_tokens: ``[n, 2]`` token counts (``ResponseLogps.num_tokens``).

    Returns:
        float32 ``[n]``, detached (the weights are constants of the objective): pass as ``weights=`` to a loss.
    """
    with torch.no_grad():
        aligned = _per_response(token_logps.detach() - token_log_sum_sq_probs.detach(), token_index, num_tokens,
                                "wpo_weights")  # fmt: skip
        if aligned.shape[1] != 2:
            raise ValueError(f"wpo_weights: needs pairs (K=2 responses), got K={aligned.shape[1]}")
        weights = torch.exp(aligned / num_tokens.to(aligned.device).clamp_min(1).to(aligned.dtype))
        return weights[:, 0] * weights[:, 1]


def length_desensitized_logps(token_logps: Tensor, token_index, num_tokens: Tensor, *, alpha: float) -> Tensor:
    """LD-DPO's log-probs (Liu et al. 2024, TRL's ``ld_alpha``): the verbose tail of the longer response damped.

    Each pair's responses are split at the shorter one's length: the tokens at positions below
    ``min(n_c, n_r)`` count fully, those beyond (the longer response's tail) are weighted by ``alpha``::

        logps = sum_{j < min(n_c, n_r)} log p_j + alpha * sum_{j >= min(n_c, n_r)} log p_j

    Args:
        token_logps: ``[T]`` per-token log-probs (policy or reference), with their graph.
        token_index: the engine's :class:`~prefixshare.TokenIndex` of those tokens.
        num_tokens: ``[n, 2]`` token counts.
        alpha: the tail's weight; TRL documents ``[0, 1]`` (1: plain sums; 0: the tail masked).

    Returns:
        float32 ``[n, 2]`` (chosen, rejected), with the gradient of ``token_logps``: pass its columns to a loss
        in place of the summed log-probs (for the policy and the reference alike).
    """
    alpha = _finite_float("length_desensitized_logps", "alpha", alpha)
    position = getattr(token_index, "position", None)
    if not isinstance(position, torch.Tensor):
        raise ValueError("length_desensitized_logps: token_index must be the engine's TokenIndex")
    if num_tokens.dim() != 2 or num_tokens.shape[1] != 2:
        raise ValueError(f"length_desensitized_logps: needs [n, 2] token counts (pairs), got {list(num_tokens.shape)}")
    shared = num_tokens.min(dim=1).values.to(position.device)[token_index.example]
    tail = (position >= shared).to(token_logps.device)
    weighted = torch.where(tail, alpha * _float(token_logps), _float(token_logps))
    return _per_response(weighted, token_index, num_tokens, "length_desensitized_logps")


# --------------------------------------------------------------------------------------------------------------
# Reward models (TRL's RewardTrainer)
# --------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """The Bradley-Terry loss of a reward model on pairs, as TRL's ``RewardTrainer`` computes it.

    Per pair, with scalar rewards ``r_c``, ``r_r`` (the model's score of prompt+chosen and prompt+rejected)::

        loss = -logsigmoid(r_c - r_r - margin) + coef * (r_c + r_r) ** 2

    ``margin`` (optional float ``[n]``, a dataset's ``margin`` column) asks for a larger gap on some pairs; the
    centering term (Eisenstein et al. 2023, Eq. 2; ``coef = center_rewards_coefficient``, TRL recommends 0.01)
    pulls the rewards towards zero mean. With ``reduction="mean"`` this is TRL's loss exactly: its centering
    term is the batch mean of ``(r_c + r_r) ** 2``.

    Returns:
        ``(loss, metrics)``: TRL's ``RewardTrainer`` metrics over the ``n`` pairs, detached: ``accuracy``
        (strict ``r_c > r_r``), ``margin`` (mean ``r_c - r_r``), ``min_reward``, ``mean_reward``, ``max_reward``
        (over all ``2n`` rewards).
    """
    loss = "bradley_terry"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    tensors = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    if margin is not None:
        tensors["margin"] = margin
    _check_tensors(loss, tensors, {}, "", check_finite)
    chosen, rejected = _float(chosen_rewards), _float(rejected_rewards)
    gap = chosen - rejected
    if margin is not None:
        gap = gap - margin.to(device=chosen.device, dtype=chosen.dtype)
    per_pair = -F.logsigmoid(gap)
    if center_rewards_coefficient is not None:
        coef = _finite_float(loss, "center_rewards_coefficient", center_rewards_coefficient)
        per_pair = per_pair + coef * (chosen + rejected) ** 2
    out = per_pair.mean() if reduction == "mean" else per_pair.sum() if reduction == "sum" else per_pair
    both = torch.cat([chosen, rejected]).detach()
    metrics = {
        "accuracy": (chosen > rejected).detach().to(chosen.dtype).mean(),
        "margin": (chosen - rejected).detach().mean(),
        "min_reward": both.min(),
        "mean_reward": both.mean(),
        "max_reward": both.max(),
    }
    return out, metrics


# --------------------------------------------------------------------------------------------------------------
# Registry and entry point
# --------------------------------------------------------------------------------------------------------------

LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo_loss,
    "sigmoid": dpo_loss,  # TRL's name for DPO
    "robust": robust_dpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "sft": sft_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "rpo": rpo_loss,
    "nll": nll_loss,
}
"""Loss name -> loss function; every function returns ``(loss, metrics)``. Holds every TRL 1.16 ``loss_type``
(:data:`TRL_LOSS_TYPES`) under TRL's name."""

REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo", "nll", "sft"})
"""Names in :data:`LOSSES` that never read reference log-probs: skip the reference forward pass for them."""

_COMMON = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "chosen_num_tokens",
    "rejected_num_tokens",
    "beta",
)


def preference_loss(
    name: str,
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    chosen_num_tokens: Tensor | None = None,
    rejected_num_tokens: Tensor | None = None,
    beta: float = 0.1,
    **options,
) -> LossOutput:
    """Compute the paired preference loss ``name`` (a key of :data:`LOSSES`).

    Args:
        name: ``dpo`` (alias ``sigmoid``), any other TRL ``loss_type`` (``robust``, ``hinge``, ``ipo``,
            ``exo_pair``, ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``,
            ``apo_down``, ``discopop``, ``sigmoid_norm``, ``sft``), or ``simpo``, ``orpo``, ``rpo``, ``nll``.
        policy_chosen_logps, policy_rejected_logps: float ``[n]``, summed policy log-probs per pair.
        reference_chosen_logps, reference_rejected_logps: float ``[n]``, summed reference log-probs; required
            unless ``name in REFERENCE_FREE``, ignored by reference-free losses.
        chosen_num_tokens, rejected_num_tokens: integer ``[n]`` response lengths; required by losses that
            normalize by length, ignored by the others.
        beta: > 0, the loss's temperature / weight (ORPO's lambda).
        **options: the chosen loss's own keyword arguments, e.g. ``reduction="sum"``, ``check_finite=False``
            (every loss; see :func:`dpo_loss`), ``label_smoothing`` (dpo, robust, exo_pair, aot, aot_unpaired,
            rpo, simpo), ``f_divergence`` / ``f_alpha_divergence_coef`` and ``weights`` (the losses TRL
            generalizes), ``length_normalize`` (ipo, nll), ``tau`` (discopop), ``reward_shift`` (bco_pair),
            ``gamma`` (simpo), ``alpha`` (rpo). An option the loss does not take raises ValueError rather than
            being silently ignored.

    Returns:
        ``(loss, metrics)``: a scalar loss (the mean over pairs unless ``reduction`` says otherwise) and a dict
        of detached scalar metrics with TRL's names.
    """
    try:
        fn = LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}") from None
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - (set(params) - set(_COMMON)))
    if unknown:
        accepted = sorted(set(params) - set(_COMMON))
        raise ValueError(f"{name} loss does not take option(s) {unknown}; its options are {accepted}")
    given = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
        "chosen_num_tokens": chosen_num_tokens,
        "rejected_num_tokens": rejected_num_tokens,
        "beta": beta,
    }
    return fn(**{key: value for key, value in given.items() if key in params}, **options)
