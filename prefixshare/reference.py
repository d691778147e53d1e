"""Reference log-probs for preference losses, three ways.

DPO and its relatives compare the policy with a frozen *reference* model. Its per-response log-probs can
come from:

1. **a separate reference model**, e.g. a frozen copy of the initial policy: ``ref=reference_model``.
   Patch it too (``prefixshare.patch(reference_model)``); it runs in eval mode under ``torch.no_grad()``.
2. **the policy itself with its adapters disabled** (peft LoRA / QLoRA): ``ref="disable_adapters"``.
   The frozen base weights *are* the reference, so only one model is in memory.
3. **precomputed** once over the dataset before training (:func:`precompute_reference_logps`), stored on
   each example (:func:`with_reference_logps`) and collated by :class:`WithReferenceLogps`:
   ``ref="precomputed"``. Training then runs no reference forward pass at all.

A collated batch can carry the precomputed values under :data:`REFERENCE_LOGPS_KEY`, a ``[n, K]``
float32 tensor in input order. That key is not a model argument: :func:`prefixshare.training.preference_step`
removes it before calling the model. When calling the model yourself, pass ``model(**model_inputs(batch))``
(or ``batch.pop(REFERENCE_LOGPS_KEY)`` first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .collators import PrefixShareBatch
from .layout import LAYOUT_KEY
from .engine import response_logps
from .patch import is_patched
from .structure import eval_mode

REFERENCE_LOGPS_KEY = "reference_logps"
"""Batch key of precomputed reference log-probs, ``[n, K]`` float32; never passed to the model."""

DISABLE_ADAPTERS = "disable_adapters"
PRECOMPUTED = "precomputed"

# example fields written by with_reference_logps and read by WithReferenceLogps
CHOSEN_FIELD = "reference_chosen_logps"
REJECTED_FIELD = "reference_rejected_logps"
RESPONSES_FIELD = "reference_responses_logps"  # K != 2: a list of K floats

__all__ = [
    "DISABLE_ADAPTERS",
    "PRECOMPUTED",
    "REFERENCE_LOGPS_KEY",
    "WithReferenceLogps",
    "model_inputs",
    "precompute_reference_logps",
    "reference_logps",
    "with_reference_logps",
]


# ---------------------------------------------------------------------------------------------- helpers
def model_inputs(batch: Mapping) -> PrefixShareBatch:
    """The batch without the keys that are not model arguments (:data:`REFERENCE_LOGPS_KEY`)."""
    return PrefixShareBatch({k: v for k, v in batch.items() if k != REFERENCE_LOGPS_KEY})


def _device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_patched(model, role: str) -> None:
    if not is_patched(model):
        raise ValueError(
            f"the {role} is not patched for prefix-shared batches: call prefixshare.patch() on it first "
            "(an unpatched model would ignore the layout and attend across responses)"
        )


def _disable_adapter_context(model):
    inner = model
    for _ in range(4):  # DDP / FSDP1 keep the peft model in .module
        if callable(getattr(inner, "disable_adapter", None)):
            return inner.disable_adapter()
        inner = getattr(inner, "module", None)
        if inner is None:
            break
    raise ValueError(
        f'ref="{DISABLE_ADAPTERS}" needs a peft model (get_peft_model / PeftModel), whose base weights are '
        f"the reference; {type(model).__name__} has no disable_adapter(). Pass a separate reference model instead"
    )


@torch.no_grad()
def _forward_logps(model, batch) -> torch.Tensor:
    device = _device_of(model)
    inputs = model_inputs(batch).to(device)
    with eval_mode(model):
        return response_logps(model, inputs).logps


# ---------------------------------------------------------------------------------------------- public
def reference_logps(ref: Any, batch: Mapping, *, policy=None) -> torch.Tensor:
    """The reference log-probs ``[n, K]`` (float32, no grad) of a collated batch.

    Args:
        ref: a reference model (patched; run in eval mode under no_grad, on its own device),
            ``"disable_adapters"`` (the peft ``policy`` with its adapters disabled), or ``"precomputed"``
            (read :data:`REFERENCE_LOGPS_KEY` from the batch, see :class:`WithReferenceLogps`).
        batch: the collator's output.
        policy: the policy model; needed for ``"disable_adapters"``.

    The result is on the device of the batch's tensors (where the policy's log-probs are computed).
    """
    if not isinstance(batch, Mapping) or LAYOUT_KEY not in batch:
        raise ValueError(f"expected a batch from PrefixShareCollator or PairedCollator (a mapping with {LAYOUT_KEY!r})")
    layout = batch[LAYOUT_KEY]
    shape = (layout.num_examples, layout.num_responses)
    target_device = batch["input_ids"].device

    if isinstance(ref, str):
        if ref == PRECOMPUTED:
            if REFERENCE_LOGPS_KEY not in batch:
                raise ValueError(
                    f'ref="{PRECOMPUTED}" but the batch has no {REFERENCE_LOGPS_KEY!r}: precompute them with '
                    "precompute_reference_logps(), store them with with_reference_logps() and collate with "
                    "WithReferenceLogps(collator)"
                )
            logps = batch[REFERENCE_LOGPS_KEY]
            if not isinstance(logps, torch.Tensor) or tuple(logps.shape) != shape:
                got = tuple(logps.shape) if isinstance(logps, torch.Tensor) else type(logps).__name__
                raise ValueError(
                    f"precomputed {REFERENCE_LOGPS_KEY} must be a tensor of shape {shape} "
                    f"(examples x responses of this batch), got {got}"
                )
            return logps.detach().to(device=target_device, dtype=torch.float32)
        if ref == DISABLE_ADAPTERS:
            if policy is None:
                raise ValueError(f'ref="{DISABLE_ADAPTERS}" needs the policy model (policy=...)')
            check_patched(policy, "policy model")
            with _disable_adapter_context(policy):
                logps = _forward_logps(policy, batch)
            return logps.to(target_device)
        raise ValueError(
            f"unknown ref {ref!r}: pass a reference model, {DISABLE_ADAPTERS!r}, {PRECOMPUTED!r}, "
            "or None with a reference-free loss"
        )
    if isinstance(ref, torch.nn.Module):
        if policy is not None and ref is policy:
            raise ValueError(
                "ref is the policy model itself: pass a frozen copy (e.g. copy.deepcopy(model) before training) "
                f'or ref="{DISABLE_ADAPTERS}" for a peft model'
            )
        check_patched(ref, "reference model")
        return _forward_logps(ref, batch).to(target_device)
    raise ValueError(
        f"ref must be a model, {DISABLE_ADAPTERS!r}, {PRECOMPUTED!r} or None, got {type(ref).__name__}"
    )


def precompute_reference_logps(
    model,
    dataset: Sequence,
    collator,
    batch_size: int = 8,
    *,
    ref: Any = None,
    progress: bool = False,
) -> torch.Tensor:
    """Reference log-probs of every example of ``dataset``, once, before training: ``[len(dataset), K]``.

    Args:
        model: the reference model (patched), or the peft policy with ``ref="disable_adapters"``.
        dataset: a sequence of tokenized examples (what ``collator`` takes), read in order.
        collator: a ``PrefixShareCollator`` or ``PairedCollator`` (packing is fine: results come back
            in input order).
        batch_size: examples per forward pass.
        ref: ``None`` uses ``model`` as the reference; ``"disable_adapters"`` runs ``model`` (a peft model)
            with its adapters disabled.
        progress: show a tqdm progress bar (needs tqdm).

    Returns:
        a float32 CPU tensor, row ``i`` the K reference log-probs of ``dataset[i]``. Store them on the
        examples with :func:`with_reference_logps`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="reference log-probs", unit="batch")
    device = _device_of(model)
    chunks = []
    for start in starts:
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]).to(device)
        if ref is None:
            chunks.append(reference_logps(model, batch).cpu())
        else:
            chunks.append(reference_logps(ref, batch, policy=model).cpu())
    widths = {c.shape[1] for c in chunks}
    if len(widths) != 1:
        raise ValueError(f"the dataset's examples have different numbers of responses: {sorted(widths)}")
    return torch.cat(chunks)


def with_reference_logps(dataset: Sequence[Mapping], logps: torch.Tensor) -> list[dict]:
    """Copies of the examples with their reference log-probs attached (``logps`` from
    :func:`precompute_reference_logps`, row ``i`` for ``dataset[i]``).

    Fields: ``reference_chosen_logps`` and ``reference_rejected_logps`` (floats) when K = 2, otherwise
    ``reference_responses_logps`` (a list of K floats). The collators ignore them;
    :class:`WithReferenceLogps` collates them.
    """
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2 or logps.shape[0] != len(dataset):
        got = tuple(logps.shape) if isinstance(logps, torch.Tensor) else type(logps).__name__
        raise ValueError(f"logps must be a tensor of shape [len(dataset)={len(dataset)}, K], got {got}")
    values = logps.detach().double().cpu().tolist()  # float32 -> float64 is exact, and survives JSON
    out = []
    for example, row in zip(dataset, values):
        extra = (
            {CHOSEN_FIELD: row[0], REJECTED_FIELD: row[1]} if len(row) == 2 else {RESPONSES_FIELD: list(row)}
        )
        out.append({**example, **extra})
    return out


class WithReferenceLogps:
    """Wrap a collator so that its batches carry the examples' precomputed reference log-probs.

    ``WithReferenceLogps(PrefixShareCollator(pad_token_id=0))(examples)`` is the wrapped collator's batch
    plus ``batch["reference_logps"]``, a ``[n, K]`` float32 tensor in input order (whatever the packing),
    read from the fields :func:`with_reference_logps` wrote. Train with
    ``preference_step(model, batch, ref="precomputed")``, which keeps that key away from the model.
    """

    def __init__(self, collator):
        self.collator = collator

    def __getattr__(self, name):  # pad_token_id, unit_lengths(), ... of the wrapped collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples: Sequence[Mapping]) -> PrefixShareBatch:
        batch = self.collator(examples)
        K = batch[LAYOUT_KEY].num_responses
        rows = []
        for i, example in enumerate(examples):
            if CHOSEN_FIELD in example or REJECTED_FIELD in example:
                if K != 2 or CHOSEN_FIELD not in example or REJECTED_FIELD not in example:
                    raise ValueError(
                        f"example {i}: needs both {CHOSEN_FIELD!r} and {REJECTED_FIELD!r} (K=2), "
                        f"or {RESPONSES_FIELD!r} with {K} values"
                    )
                row = [example[CHOSEN_FIELD], example[REJECTED_FIELD]]
            elif RESPONSES_FIELD in example:
                row = list(example[RESPONSES_FIELD])
            else:
                raise ValueError(
                    f"example {i}: no precomputed reference log-probs ({CHOSEN_FIELD!r}/{REJECTED_FIELD!r}); "
                    "attach them with with_reference_logps(dataset, precompute_reference_logps(...))"
                )
            if len(row) != K:
                raise ValueError(f"example {i}: {len(row)} reference log-probs for {K} responses")
            rows.append([float(v) for v in row])
        batch[REFERENCE_LOGPS_KEY] = torch.tensor(rows, dtype=torch.float32)
        return batch
