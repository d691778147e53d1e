"""Exactness checks: a prefix-shared forward against each prompt+response run alone through the unpatched model.

Used by the test suite and by the compatibility matrix (:mod:`prefixshare.testing.matrix`), and available to
users who want to check a model of their own before training on it::

    report = prefixshare.testing.compare_with_alone(reference, patched, examples, PrefixShareCollator(0))
    assert report.logps_error < 1e-5 and report.grad_error < 1e-5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..collators import normalize_example
from ..engine import response_logps
from ..logps import token_logps
from ..selfcheck import gradient_error  # re-exported: the self-check and the tests measure gradients alike


def random_examples(
    n: int,
    vocab_size: int,
    *,
    seed: int = 0,
    num_responses: int = 2,
    prompt_lengths: tuple[int, int] = (1, 24),
    response_lengths: tuple[int, int] = (1, 16),
    first_id: int = 3,
) -> list[dict]:
    """``n`` random preference examples (token ids in ``[first_id, vocab_size)``), lengths drawn inclusive.

    With ``num_responses == 2`` the examples use ``chosen_input_ids``/``rejected_input_ids``, otherwise
    ``responses_input_ids``.
    """
    g = torch.Generator().manual_seed(seed)

    def ids(bounds):
        length = int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=g))
        return torch.randint(first_id, vocab_size, (length,), generator=g).tolist()

    examples = []
    for _ in range(n):
        prompt = ids(prompt_lengths)
        responses = [ids(response_lengths) for _ in range(num_responses)]
        if num_responses == 2:
            examples.append(dict(prompt_input_ids=prompt, chosen_input_ids=responses[0], rejected_input_ids=responses[1]))
        else:
            examples.append(dict(prompt_input_ids=prompt, responses_input_ids=responses))
    return examples


def _images_alone(model, ex, ids: torch.Tensor) -> dict:
    """The image inputs of one prompt+response run alone, as the model's processor gives them: the prompt's
    ``pixel_values`` and ``image_grid_thw``, and ``mm_token_type_ids`` (1 at image tokens), from which the model
    computes its own 3D rotary positions."""
    if ex.pixel_values is None:
        return {}
    image_token = getattr(getattr(model, "config", None), "image_token_id", None)
    return dict(
        pixel_values=ex.pixel_values.to(ids.device),
        image_grid_thw=ex.image_grid_thw.to(ids.device),
        mm_token_type_ids=(ids == image_token).int(),
    )


def logps_alone(model, examples: Sequence) -> torch.Tensor:
    """``[n, K]`` float32: every prompt+response run on its own (batch of one, no padding) through ``model``,
    with the prompt's images if the example carries them."""
    device = next(model.parameters()).device
    rows = []
    for i, example in enumerate(examples):
        ex = normalize_example(example, i)
        row = []
        for k, response in enumerate(ex.responses):
            ids = torch.tensor([ex.prompt_of(k) + response], device=device)
            logits = model(input_ids=ids, use_cache=False, **_images_alone(model, ex, ids)).logits[0]
            p = len(ex.prompt_of(k))
            row.append(token_logps(logits[p - 1 : -1], ids[0, p:]).sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)


@dataclass
class Comparison:
    """Normwise relative errors: ``max |x - ref| / max |ref|``; for gradients the worst parameter."""

    logps_error: float
    grad_error: float | None
    worst_parameter: str | None
    num_parameters: int

    def passes(self, tolerance: float) -> bool:
        return self.logps_error <= tolerance and (self.grad_error is None or self.grad_error <= tolerance)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.detach().float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((value.detach().float() - reference.detach().float()).abs().max() / scale)


def align_gradients(grads: dict, reference: dict) -> tuple[dict, dict, list[str]]:
    """Both gradient dicts over the same parameters, and the names that got a non-zero gradient on one side only.

    A parameter no token reached has no gradient at all (None): a mixture-of-experts expert that no token of the
    runs alone chose, but a padding token of the batch did (its gradient is then exactly zero). Such a gradient
    counts as the zero it is; a non-zero gradient on one side only is a real difference.
    """
    grads, reference = dict(grads), dict(reference)
    one_sided = []
    for name in sorted(grads.keys() ^ reference.keys()):
        present = grads.get(name, reference.get(name))
        if bool((present != 0).any()):
            one_sided.append(name)
        (reference if name in grads else grads)[name] = torch.zeros_like(present)
    return grads, reference, one_sided


def loss_weights(shape, seed: int = 1234) -> torch.Tensor:
    """``shape`` float32 weights ``w`` of the loss ``sum(w * logps)`` whose gradients the checks compare: fixed
    random ones, so that gradients of chosen and rejected terms cannot cancel out by symmetry."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def trainable_grads(model) -> dict[str, torch.Tensor]:
    """``{name: a copy of its gradient}`` for every trainable parameter of ``model`` that has one."""
    return {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def compare_with_alone(
    reference_model, patched_model, examples, collator, *, gradients: bool = True, gradient_floor: float = 0.0
) -> Comparison:
    """Compare log-probs (and parameter gradients) of a prefix-shared forward with runs alone.

    The prefix-shared side runs through :func:`prefixshare.response_logps` (the log-prob engine every
    training path uses); the runs alone through the model's plain forward and full logits.

    Args:
        reference_model: the UNPATCHED model, with the same weights as ``patched_model``.
        patched_model: the model after :func:`prefixshare.patch`.
        examples: preference examples as the collators take them.
        collator: a ``PrefixShareCollator`` or ``PairedCollator``.
        gradients: also compare the gradients of ``sum(w * logps)`` (fixed random ``w``) on every
            trainable parameter (both models' gradients are zeroed first and left set).
        gradient_floor: see :func:`gradient_error` (0: every parameter on its own scale; 1: the whole gradient
            as one vector).
    """
    device = next(patched_model.parameters()).device
    batch = collator(examples).to(device)
    for model in (reference_model, patched_model):
        model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(gradients):
        want = logps_alone(reference_model, examples)
        got = response_logps(patched_model, batch).logps
    grad_error, worst = None, None
    num_parameters = 0
    if gradients:
        weights = loss_weights(want.shape).to(want.device)
        (want * weights).sum().backward()
        (got * weights).sum().backward()
        grads, ref_grads, one_sided = align_gradients(trainable_grads(patched_model), trainable_grads(reference_model))
        if one_sided:
            raise AssertionError(f"different parameters received gradients: {one_sided}")
        num_parameters = len(ref_grads)
        grad_error, worst = gradient_error(grads, ref_grads, floor=gradient_floor)
    return Comparison(relative_error(got, want), grad_error, worst, num_parameters)
