"""Paired preference losses (DPO and relatives) on per-response log-probabilities.

Every loss works on one entry per *pair* (a prompt with a chosen and a rejected response):

* ``policy_chosen_logps``, ``policy_rejected_logps``: float ``[n]``, the policy's log p(response | prompt),
  summed over the response tokens (what :func:`prefixshare.gather_response_logps` returns).
* ``reference_chosen_logps``, ``reference_rejected_logps``: float ``[n]``, the same under the frozen
  reference model; only losses that are not in :data:`REFERENCE_FREE` need them.
* ``chosen_num_tokens``, ``rejected_num_tokens``: integer ``[n]`` (normally long), the number of response
  tokens, for losses that normalize by length (IPO by default, SimPO, ORPO, RPO's NLL term, NLL).

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

* losses with a reference (dpo, robust, hinge, ipo, rpo): the implicit DPO reward
  ``beta * (policy_logps - reference_logps)`` on *summed* log-probs (also for length-normalized IPO, as in
  TRL's ``DPOTrainer``), and ``logps/*`` are the summed policy log-probs;
* reference-free losses (simpo, orpo, nll): ``beta * avg_logps`` with ``avg_logps = logps / num_tokens`` the
  per-token average the loss works with (TRL's ``CPOTrainer`` for SimPO, ``ORPOTrainer`` for ORPO), and
  ``logps/*`` are those averages too (both trainers compute average log-probs for these losses).

Non-finite log-probs (nan or inf, e.g. an fp16 overflow) raise ValueError by default, naming the argument:
a custom loop would otherwise step on a nan loss. The check costs one device sync. Every loss takes
``check_finite=False`` to skip it; nan/inf then flow into the loss and the metrics, as in TRL's trainers
(``PrefixShareDPOTrainer`` does this, and checks itself only when asked to). Shapes, dtypes and token counts are
checked either way.

Losses are computed in at least float32: 16-bit sums of hundreds of token log-probs lose the precision that
``logsigmoid`` of their differences needs.

Entry point: :func:`preference_loss` dispatches on a loss name; :data:`LOSSES` maps names to functions and
:data:`REFERENCE_FREE` names the losses that need no reference forward pass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "REFERENCE_FREE",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "nll_loss",
    "orpo_loss",
    "preference_loss",
    "robust_dpo_loss",
    "rpo_loss",
    "simpo_loss",
]

Tensor = torch.Tensor
LossOutput = tuple[Tensor, dict[str, Tensor]]

_REDUCTIONS = ("mean", "sum", "none")

_WHAT = {
    "policy_chosen_logps": "the policy's summed log-probs of the chosen responses",
    "policy_rejected_logps": "the policy's summed log-probs of the rejected responses",
    "reference_chosen_logps": "the reference model's summed log-probs of the chosen responses",
    "reference_rejected_logps": "the reference model's summed log-probs of the rejected responses",
    "chosen_num_tokens": "the number of tokens of each chosen response",
    "rejected_num_tokens": "the number of tokens of each rejected response",
}


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")


def _check_beta(loss: str, beta: float, name: str = "beta") -> float:
    value = _finite_float(loss, name, beta)
    if value <= 0:
        raise ValueError(f"{loss} loss needs {name} > 0, got {beta!r}")
    return value


def _check_label_smoothing(loss: str, label_smoothing: float) -> float:
    value = _finite_float(loss, "label_smoothing", label_smoothing)
    # At 0.5 the two labels are equally likely: the DPO loss no longer prefers either response, and the
    # robust loss divides by 1 - 2 * 0.5 = 0.
    if not 0.0 <= value < 0.5:
        raise ValueError(f"{loss} loss needs label_smoothing in [0, 0.5), got {label_smoothing!r}")
    return value


def _finite_float(loss: str, name: str, value: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{loss} loss: {name} must be a real number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValueError(f"{loss} loss: {name} must be a finite real number, got {value!r}")
    return out


def _check_tensors(
    loss: str,
    logps: Mapping[str, Tensor | None],
    counts: Mapping[str, Tensor | None] | None = None,
    counts_alternative: str = "",
    check_finite: bool = True,
) -> None:
    """Raise ValueError unless every tensor is present, 1-D, of one shape, finite, and counts are positive.

    ``counts_alternative`` completes the hint for missing counts when a loss can do without them.
    ``check_finite=False`` skips the finiteness check only (see the module docstring).
    """
    counts = counts or {}
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


def _average(logps: Tensor, num_tokens: Tensor) -> Tensor:
    logps = _float(logps)
    return logps / num_tokens.to(device=logps.device, dtype=logps.dtype)


def _reduce(per_pair: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def _metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    **extra: Tensor,
) -> dict[str, Tensor]:
    """TRL-named metrics: detached means over the pairs of ``[n]`` per-pair values."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        # Strict, as in TRL: a tie is not a win.
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": _float(chosen_logps).detach().mean(),
        "logps/rejected": _float(rejected_logps).detach().mean(),
    }
    metrics.update({name: value.detach().mean() for name, value in extra.items()})
    return metrics


# --------------------------------------------------------------------------------------------------------------
# Losses with a reference model
# --------------------------------------------------------------------------------------------------------------


def _dpo_logratios(
    loss: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    counts: Mapping[str, Tensor | None] | None = None,
    counts_alternative: str = "",
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """Validate, then return the per-pair log-ratios ``(pi_c - ref_c, pi_r - ref_r)``, float32 or wider."""
    _check_tensors(
        loss,
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "reference_chosen_logps": reference_chosen_logps,
            "reference_rejected_logps": reference_rejected_logps,
        },
        counts,
        counts_alternative,
        check_finite,
    )
    # The reference is a constant of the objective; detaching also keeps a caller's stray graph out of it.
    chosen = _float(policy_chosen_logps) - _float(reference_chosen_logps).detach()
    rejected = _float(policy_rejected_logps) - _float(reference_rejected_logps).detach()
    return chosen, rejected


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    # cDPO: the preference label is flipped with probability label_smoothing.
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
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
    """DPO sigmoid loss (Rafailov et al. 2023), with cDPO label smoothing.

    Per pair, with ``h = (pi_c - ref_c) - (pi_r - ref_r)`` on summed log-probs and ``eps = label_smoothing``::

        loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)

    Args:
        policy_chosen_logps, policy_rejected_logps: float ``[n]``, summed policy log-probs.
        reference_chosen_logps, reference_rejected_logps: float ``[n]``, summed reference log-probs (treated
            as constants: no gradient flows into them).
        beta: > 0, the inverse temperature (strength of the KL anchor to the reference).
        label_smoothing: in ``[0, 0.5)``, the assumed probability that a preference label is flipped.
        reduction: ``"mean"`` (default) over pairs, ``"sum"``, or ``"none"`` for the ``[n]`` per-pair losses.
        check_finite: True (default): raise ValueError if a log-prob is nan or inf; False: skip that check and its
            device sync (nan/inf then reach the loss and the metrics).

    Returns:
        ``(loss, metrics)``: ``loss`` a float32 (or float64) scalar, ``metrics`` as in the module docstring.
    """
    _check_reduction(reduction)
    beta = _check_beta("dpo", beta)
    label_smoothing = _check_label_smoothing("dpo", label_smoothing)
    chosen, rejected = _dpo_logratios(
        "dpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        check_finite=check_finite,
    )
    per_pair = _smoothed_sigmoid(beta * (chosen - rejected), label_smoothing)
    return _reduce(per_pair, reduction), _metrics(
        beta * chosen, beta * rejected, policy_chosen_logps, policy_rejected_logps
    )


def robust_dpo_loss(
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
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), TRL's ``loss_type="robust"``.

    An unbiased estimate of the clean-label DPO loss when each label is flipped with probability
    ``eps = label_smoothing``. Per pair, with ``h`` as in :func:`dpo_loss`::

        loss = (-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps)

    Unlike cDPO the correction can make single-pair losses negative. With ``eps = 0`` this is :func:`dpo_loss`.
    Arguments, shapes and return value as in :func:`dpo_loss`.
    """
    _check_reduction(reduction)
    beta = _check_beta("robust", beta)
    label_smoothing = _check_label_smoothing("robust", label_smoothing)
    chosen, rejected = _dpo_logratios(
        "robust", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        check_finite=check_finite,
    )
    logits = beta * (chosen - rejected)
    per_pair = (
        -(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    ) / (1.0 - 2.0 * label_smoothing)
    return _reduce(per_pair, reduction), _metrics(
        beta * chosen, beta * rejected, policy_chosen_logps, policy_rejected_logps
    )


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """Hinge loss on the DPO log-ratio margin (SLiC-style, Zhao et al. 2023), TRL's ``loss_type="hinge"``.

    Per pair, with ``h`` as in :func:`dpo_loss`: ``loss = relu(1 - beta * h)``; ``1 / beta`` is the margin.
    Arguments, shapes and return value as in :func:`dpo_loss` (no label smoothing).
    """
    _check_reduction(reduction)
    beta = _check_beta("hinge", beta)
    chosen, rejected = _dpo_logratios(
        "hinge", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        check_finite=check_finite,
    )
    per_pair = torch.relu(1.0 - beta * (chosen - rejected))
    return _reduce(per_pair, reduction), _metrics(
        beta * chosen, beta * rejected, policy_chosen_logps, policy_rejected_logps
    )


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
    reduction: str = "mean",
    check_finite: bool = True,
) -> LossOutput:
    """IPO loss (Azar et al. 2023, Eq. 17, with ``tau = beta``).

    Per pair: ``loss = (h - 1 / (2 * beta)) ** 2`` where

    * ``length_normalize=True`` (default): ``h = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r``, log-ratios
      averaged per response token;
    * ``length_normalize=False``: ``h = (pi_c - ref_c) - (pi_r - ref_r)`` on summed log-probs.

    The default is normalized because that is what TRL's ``DPOTrainer`` does (its authors report the IPO
    authors confirmed the paper's results use this form): with sums the squared loss grows with response
    length, so one ``beta`` cannot fit short and long responses alike. The original DPO reference code uses
    sums; pass ``length_normalize=False`` to reproduce it.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            float ``[n]``, summed log-probs as in :func:`dpo_loss`.
        chosen_num_tokens, rejected_num_tokens: integer ``[n]``, positive response lengths; required when
            ``length_normalize`` is true, ignored otherwise.
        beta: > 0; the loss pushes ``h`` towards ``1 / (2 * beta)``.
        length_normalize: see above.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``. check_finite: as in :func:`dpo_loss`.

    Returns:
        ``(loss, metrics)``; rewards are ``beta * (policy - reference)`` on summed log-probs, as in TRL, in
        both modes.
    """
    _check_reduction(reduction)
    beta = _check_beta("ipo", beta)
    counts = {"chosen_num_tokens": chosen_num_tokens, "rejected_num_tokens": rejected_num_tokens}
    chosen, rejected = _dpo_logratios(
        "ipo",
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        counts if length_normalize else {},
        "length_normalize=False for IPO on summed log-probs",
        check_finite,
    )
    if length_normalize:
        h = _average(chosen, chosen_num_tokens) - _average(rejected, rejected_num_tokens)
    else:
        h = chosen - rejected
    per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    return _reduce(per_pair, reduction), _metrics(
        beta * chosen, beta * rejected, policy_chosen_logps, policy_rejected_logps
    )


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
    ``beta`` and ``label_smoothing``) and the NLL the chosen response's mean per-token negative log-likelihood,
    TRL's former ``rpo_alpha`` (in TRL 1.x: ``loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]``). TRL
    takes the NLL as one token-weighted mean over the whole batch; this takes it per pair, then averages pairs
    like every other term here. The two agree when all chosen responses have the same length.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
            float ``[n]``, summed log-probs as in :func:`dpo_loss`.
        chosen_num_tokens: integer ``[n]``, positive lengths of the chosen responses.
        beta, label_smoothing: as in :func:`dpo_loss`.
        alpha: >= 0, weight of the NLL term; default 1.0, the value the RPO paper uses.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``. check_finite: as in :func:`dpo_loss`.

    Returns:
        ``(loss, metrics)``: DPO's metrics plus ``nll_loss``, the mean over pairs of the (unweighted) NLL.
    """
    _check_reduction(reduction)
    beta = _check_beta("rpo", beta)
    label_smoothing = _check_label_smoothing("rpo", label_smoothing)
    alpha = _finite_float("rpo", "alpha", alpha)
    if alpha < 0:
        raise ValueError(f"rpo loss needs alpha >= 0, got {alpha!r}")
    chosen, rejected = _dpo_logratios(
        "rpo",
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        {"chosen_num_tokens": chosen_num_tokens},
        check_finite=check_finite,
    )
    nll = -_average(policy_chosen_logps, chosen_num_tokens)
    per_pair = _smoothed_sigmoid(beta * (chosen - rejected), label_smoothing) + alpha * nll
    return _reduce(per_pair, reduction), _metrics(
        beta * chosen, beta * rejected, policy_chosen_logps, policy_rejected_logps, nll_loss=nll
    )


# --------------------------------------------------------------------------------------------------------------
# Reference-free losses
# --------------------------------------------------------------------------------------------------------------


def _policy_averages(
    loss: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_num_tokens: Tensor | None,
    rejected_num_tokens: Tensor | None,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    _check_tensors(
        loss,
        {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps},
        {"chosen_num_tokens": chosen_num_tokens, "rejected_num_tokens": rejected_num_tokens},
        check_finite=check_finite,
    )
    return _average(policy_chosen_logps, chosen_num_tokens), _average(policy_rejected_logps, rejected_num_tokens)


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

        loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)        (eps = label_smoothing)

    ``gamma`` is the target reward margin in reward units (the paper's gamma). It is exactly TRL's
    ``CPOConfig.simpo_gamma`` (TRL computes ``beta * (avg_c - avg_r - simpo_gamma / beta)``), default 0.5 as
    there. The SimPO reference code instead takes ``gamma_beta_ratio``: use ``gamma = beta *
    gamma_beta_ratio``. The paper tunes ``beta`` around 2-10 and ``gamma_beta_ratio`` around 0.3-1.6; the
    ``beta=0.1`` default only matches :func:`preference_loss`'s default. TRL's ``CPOTrainer`` adds an NLL
    term unless ``cpo_alpha=0``; this is the pure SimPO loss.

    Args:
        policy_chosen_logps, policy_rejected_logps: float ``[n]``, summed policy log-probs.
        chosen_num_tokens, rejected_num_tokens: integer ``[n]``, positive response lengths.
        beta: > 0, reward scale. gamma: finite, target margin. label_smoothing: in ``[0, 0.5)``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``. check_finite: as in :func:`dpo_loss`.

    Returns:
        ``(loss, metrics)``: rewards are ``beta * avg`` and ``logps/*`` the averages ``avg``, as in TRL.
    """
    _check_reduction(reduction)
    beta = _check_beta("simpo", beta)
    gamma = _finite_float("simpo", "gamma", gamma)
    label_smoothing = _check_label_smoothing("simpo", label_smoothing)
    avg_c, avg_r = _policy_averages(
        "simpo", policy_chosen_logps, policy_rejected_logps, chosen_num_tokens, rejected_num_tokens, check_finite
    )
    per_pair = _smoothed_sigmoid(beta * (avg_c - avg_r) - gamma, label_smoothing)
    return _reduce(per_pair, reduction), _metrics(beta * avg_c, beta * avg_r, avg_c, avg_r)


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

    ``beta`` is the paper's lambda, as TRL's ``ORPOConfig.beta`` (default 0.1). TRL's NLL is one
    token-weighted mean over the batch; here it is per pair, which agrees when chosen lengths are equal.

    Args:
        policy_chosen_logps, policy_rejected_logps: float ``[n]``, summed policy log-probs, ``<= 0`` (the odds
            need a probability below 1; an average of exactly 0 is nudged just below it).
        chosen_num_tokens, rejected_num_tokens: integer ``[n]``, positive response lengths.
        beta: > 0, weight of the odds-ratio term. reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        check_finite: as in :func:`dpo_loss`.

    Returns:
        ``(loss, metrics)``: rewards ``beta * avg``, ``logps/*`` the averages, ``nll_loss`` (mean of
        ``-avg_c``), and TRL's ``log_odds_ratio`` (mean ``logsigmoid(log_odds)``) and ``log_odds_chosen``
        (mean ``log_odds``).
    """
    _check_reduction(reduction)
    beta = _check_beta("orpo", beta)
    avg_c, avg_r = _policy_averages(
        "orpo", policy_chosen_logps, policy_rejected_logps, chosen_num_tokens, rejected_num_tokens, check_finite
    )
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
    log_odds = (avg_c - avg_r) - (
        _log1mexp(avg_c.clamp(max=below_zero)) - _log1mexp(avg_r.clamp(max=below_zero))
    )
    log_odds_ratio = F.logsigmoid(log_odds)
    nll = -avg_c
    per_pair = nll - beta * log_odds_ratio
    metrics = _metrics(
        beta * avg_c, beta * avg_r, avg_c, avg_r, nll_loss=nll, log_odds_ratio=log_odds_ratio, log_odds_chosen=log_odds
    )
    return _reduce(per_pair, reduction), metrics


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
    (``length_normalize=False``).

    Args:
        policy_chosen_logps: float ``[n]``, summed policy log-probs of the chosen responses.
        chosen_num_tokens: integer ``[n]``, positive lengths; required when ``length_normalize`` is true.
        policy_rejected_logps, rejected_num_tokens: optional, used only for the reward metrics.
        beta: > 0, scales the logged rewards only.
        length_normalize: see above. reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        check_finite: as in :func:`dpo_loss`.

    Returns:
        ``(loss, metrics)``: ``nll_loss`` and ``logps/chosen`` (per-token averages when normalized); when
        ``policy_rejected_logps`` is given, also ``logps/rejected`` and rewards ``beta * logps`` as for the
        other reference-free losses.
    """
    _check_reduction(reduction)
    beta = _check_beta("nll", beta)
    with_rejected = policy_rejected_logps is not None
    logps = {"policy_chosen_logps": policy_chosen_logps}
    counts = {"chosen_num_tokens": chosen_num_tokens} if length_normalize else {}
    if with_rejected:
        logps["policy_rejected_logps"] = policy_rejected_logps
        if length_normalize:
            counts["rejected_num_tokens"] = rejected_num_tokens
    _check_tensors("nll", logps, counts, "length_normalize=False for the summed NLL", check_finite)

    def normalized(x: Tensor, n: Tensor | None) -> Tensor:
        return _average(x, n) if length_normalize else _float(x)

    chosen = normalized(policy_chosen_logps, chosen_num_tokens)
    per_pair = -chosen
    if with_rejected:
        rejected = normalized(policy_rejected_logps, rejected_num_tokens)
        metrics = _metrics(beta * chosen, beta * rejected, chosen, rejected, nll_loss=per_pair)
    else:
        metrics = {"logps/chosen": chosen.detach().mean(), "nll_loss": per_pair.detach().mean()}
    return _reduce(per_pair, reduction), metrics


# --------------------------------------------------------------------------------------------------------------
# Registry and entry point
# --------------------------------------------------------------------------------------------------------------

LOSSES: dict[str, Callable[..., LossOutput]] = {
    "dpo": dpo_loss,
    "sigmoid": dpo_loss,  # TRL's name for DPO
    "robust": robust_dpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "rpo": rpo_loss,
    "nll": nll_loss,
}
"""Loss name -> loss function; every function returns ``(loss, metrics)``."""

REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo", "nll"})
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
        name: one of ``dpo`` (alias ``sigmoid``), ``robust``, ``hinge``, ``ipo``, ``simpo``, ``orpo``, ``rpo``,
            ``nll``.
        policy_chosen_logps, policy_rejected_logps: float ``[n]``, summed policy log-probs per pair.
        reference_chosen_logps, reference_rejected_logps: float ``[n]``, summed reference log-probs; required
            unless ``name in REFERENCE_FREE``, ignored by reference-free losses.
        chosen_num_tokens, rejected_num_tokens: integer ``[n]`` response lengths; required by losses that
            normalize by length, ignored by the others.
        beta: > 0, the loss's temperature / weight (ORPO's lambda).
        **options: the chosen loss's own keyword arguments, e.g. ``reduction="sum"``, ``check_finite=False``
            (every loss; see :func:`dpo_loss`), ``label_smoothing`` (dpo, robust, rpo, simpo), ``length_normalize``
            (ipo, nll), ``gamma`` (simpo), ``alpha`` (rpo).
            An option the loss does not take raises ValueError rather than being silently ignored.

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
