"""``PrefixShareDPOTrainer``: TRL's ``DPOTrainer`` with prefix sharing, a one-line change.

::

    from trl import DPOConfig
    from prefixshare.integrations.trl import PrefixShareDPOTrainer   # instead of: from trl import DPOTrainer

    trainer = PrefixShareDPOTrainer(model=model, args=DPOConfig(...), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Same ``DPOConfig``, same dataset formats and tokenization (TRL's own ``_prepare_dataset`` runs unchanged), same
logged metrics. Inside, each batch is one ``[prompt | chosen | rejected]`` sequence per pair instead of two
``[prompt | completion]`` rows, with the prompt computed once (:func:`prefixshare.patch`).

What is overridden (TRL 1.x, verified with 1.16):

* the data collator: :class:`PrefixShareDPOCollator` instead of ``DataCollatorForPreference`` (same
  ``max_length``/``keep_start`` truncation and ``pad_to_multiple_of``; optional packing of several pairs per row);
* ``_compute_loss``: the policy's and the reference's forward passes on the prefix-shared batch, the loss from
  :mod:`prefixshare.losses` (every ``loss_type`` of TRL 1.16, with ``loss_weights``, the f-divergences, WPO weights
  and LD-DPO on the engine's per-token output), and TRL's metrics computed the way TRL computes them;
* ``compute_ref_log_probs``: the reference forward used by ``precompute_ref_log_probs=True``;
* ``prediction_step``: with ``compute_metrics`` (deprecated in TRL), the same ``EvalPrediction`` as TRL: the logits
  of an extra forward on the paired rows, and those rows as labels.
* for datasets with images (a processor as ``processing_class``, a model with Qwen2-VL-style 3D positions):
  :class:`PrefixShareDPOVisionCollator` instead of ``DataCollatorForVisionPreference``, each pair's prompt and
  images processed once.

Everything else (model loading, PEFT wrapping, the reference model or disabled adapters, dataset
preparation, precomputation, logging, evaluation, saving) is TRL's code.

Extra keyword arguments:

* ``prefixshare_backend``: the attention kernel for prefix-shared forwards (``"eager"``, ``"sdpa"``,
  ``"flex_attention"``); ``None`` (default) keeps the model's own.
* ``prefixshare_max_tokens_per_row``: pack the pairs of a batch first-fit-decreasing into rows of at most this
  many tokens (fewer, fuller rows, less padding); ``None`` (default): one pair per row.
* ``prefixshare_stop_on_nonfinite``: ``False`` (default): nan/inf log-probs (an fp16 overflow, a diverging run)
  give nan losses and metrics and training goes on, as with ``trl.DPOTrainer``; ``True``: raise
  ``FloatingPointError`` at the first step whose policy or reference log-probs are not finite (costs one device
  sync per step).

Streaming (``IterableDataset``) training and evaluation sets work as map-style ones: the trainer sets
``accelerator_config.dispatch_batches=False`` (each process collates its own batches; accelerate's dispatching
cannot split a prefix-shared batch), and raises for an explicit ``dispatch_batches=True``.

``padding_free=True`` packs all the pairs of a batch into one row without padding (TRL 1.16 ignores the option and
pads; the numbers are the same either way). It pays with kernels that skip masked blocks (varlen, flex_attention);
eager and sdpa compute the whole row's square of scores.

Options that prefix sharing does not cover raise ``ValueError`` in ``__init__`` rather than being ignored; see
docs/trl.md for the table, option by option. :class:`PrefixShareRewardTrainer` (``trl.RewardTrainer``'s drop-in) is
re-exported here from :mod:`prefixshare.integrations.trl_reward`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from accelerate.utils import is_peft_model

from ..collators import PrefixShareCollator
from ..layout import LAYOUT_KEY
from ..engine import response_logps
from ..logps import ResponseLogps
from ..moe import capture_router_logits, load_balancing_loss, moe_routing, paired_token_weights
from ..losses import TRL_LOSS_TYPES, length_desensitized_logps, preference_loss, sft_loss, wpo_weights
from ..vision import check_images_supported
from .trl_common import (
    PAIRED_TOKENS_KEY,
    PrefixSharePatching,
    bind_trainer_arguments,
    check_shared_trainer_options,
    dataset_has_images,
    is_prompt_learning,
    paired_tokens_per_row,
)
from trl import DPOConfig, DPOTrainer  # after .trl_common: it says how to install TRL

__all__ = [
    "PrefixShareDPOCollator",
    "PrefixShareDPOTrainer",
    "PrefixShareDPOVisionCollator",
    "PrefixShareRewardCollator",
    "PrefixShareRewardTrainer",
    "SUPPORTED_LOSS_TYPES",
]

SUPPORTED_LOSS_TYPES = TRL_LOSS_TYPES
"""``DPOConfig.loss_type`` values PrefixShareDPOTrainer computes: all of TRL 1.16's, alone or combined with
``loss_weights`` (RPO is ``loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha]``)."""

# TRL's loss types built on the chosen-rejected score difference: the only ones with an f-divergence
# generalization (TRL refuses the others with a non-default f_divergence_type, in DPOTrainer.__init__)
_F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"})
# the loss types that read DPOConfig.label_smoothing (TRL's sigmoid ignores it)
_SMOOTHED_LOSSES = frozenset({"robust", "exo_pair", "aot", "aot_unpaired"})


_MODEL_KEYS = ("input_ids", "position_ids", LAYOUT_KEY)
_IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # with images (PrefixShareDPOVisionCollator)

# the per-token statistics behind TRL's metrics: entropy, logits/chosen and logits/rejected, mean_token_accuracy
_METRIC_STATS = ("entropy", "mean_logit", "argmax_match")
# and WPO's weights: log sum_v p_v^2 per token
_WPO_STAT = "log_sum_sq_probs"

# The DPOTrainer internals this module overrides or relies on; checked at import so that a TRL that has
# moved them fails here rather than training wrongly.
for _name in ("_compute_loss", "compute_ref_log_probs", "_prepare_dataset"):
    if not callable(getattr(DPOTrainer, _name, None)):  # pragma: no cover - depends on the TRL version
        raise ImportError(
            f"prefixshare.integrations.trl needs TRL 1.x's DPOTrainer.{_name} (verified with trl 1.16); "
            "this TRL does not have it"
        )


# ---------------------------------------------------------------------------------------------- collator
_TRUNCATION = {"keep_start": "truncate_responses", "keep_end": "keep_end"}  # TRL's truncation_mode -> the collator's


class PrefixShareDPOCollator:
    """TRL's tokenized preference examples -> a prefix-shared batch, the drop-in for ``DataCollatorForPreference``.

    Takes examples with TRL's ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (or prefixshare's
    ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``) and optional precomputed
    ``ref_chosen_logps`` / ``ref_rejected_logps``. Returns the :class:`~prefixshare.PrefixShareCollator` batch
    (``input_ids``, ``position_ids``, ``prefixshare_layout``, ``use_cache=False``) plus the reference log-probs
    when given and :data:`PAIRED_TOKENS_KEY`.

    The batch is built for one process's dataloader: rows hold whole pairs (several when packed), the layout
    indexes tokens by row, and the reference log-probs have one entry per pair, not per row. Accelerate's
    ``dispatch_batches`` (concatenating the batches of all processes, then slicing rows) cannot carry it; the
    trainer turns dispatching off (see :class:`PrefixShareDPOTrainer`).

    Args:
        pad_token_id: written into padding positions (never attended to, never scored).
        max_length: TRL's ``max_length``. With ``truncation_mode="keep_start"`` each prompt+completion keeps its
            first ``max_length`` tokens, i.e. completions are cut to ``max_length - len(prompt)`` (TRL drops the
            examples whose prompt alone reaches ``max_length`` while preparing the dataset; one that still comes
            here raises).
        truncation_mode: TRL's ``"keep_start"`` (default) or ``"keep_end"``: each prompt+completion keeps its
            last ``max_length`` tokens, so a pair whose two sequences are cut at different prompt tokens no longer
            shares a prompt; it is laid out as TRL lays it out, one ``[prompt | completion]`` unit per completion.
        pad_to_multiple_of: round the row length up to a multiple of this.
        max_tokens_per_row: pack pairs into rows of at most this many tokens (see
            :class:`~prefixshare.PrefixShareCollator`).
        padding_free: pack all the pairs of each batch into one row, without padding (``DPOConfig.padding_free``).
    """

    def __init__(
        self,
        pad_token_id: int,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        max_tokens_per_row: int | None = None,
        padding_free: bool = False,
        truncation_mode: str = "keep_start",
    ):
        if truncation_mode not in _TRUNCATION:
            raise ValueError(
                f"Unsupported truncation mode: {truncation_mode}, expected 'keep_start' or 'keep_end'"
            )  # TRL's wording
        if padding_free and max_tokens_per_row is not None:
            raise ValueError(
                "give padding_free=True (every batch in one row) or max_tokens_per_row (rows of at most N tokens), "
                "not both"
            )
        self.padding_free = bool(padding_free)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.collator = PrefixShareCollator(
            pad_token_id,
            max_tokens_per_row=max_tokens_per_row,
            pad_to_multiple_of=pad_to_multiple_of,
            max_length=max_length,
            truncation=None if max_length is None else _TRUNCATION[truncation_mode],
        )

    @property
    def pad_token_id(self) -> int:
        return self.collator.pad_token_id

    @staticmethod
    def _ids(example: Mapping) -> dict:
        if "prompt_ids" in example:
            return {
                "prompt_input_ids": example["prompt_ids"],
                "chosen_input_ids": example["chosen_ids"],
                "rejected_input_ids": example["rejected_ids"],
            }
        return example

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, Any]:
        ids = [self._ids(e) for e in examples]
        collator = self.collator
        if self.padding_free:  # one row holding every pair: a budget of the batch's total length
            c = self.collator
            collator = PrefixShareCollator(
                c.pad_token_id, max_tokens_per_row=sum(c.unit_lengths(ids)), pad_to_multiple_of=c.pad_to_multiple_of,
                max_length=c.max_length, truncation=c.truncation,
            )  # fmt: skip
        batch = dict(collator(ids))
        layout = batch[LAYOUT_KEY]
        if layout.num_responses != 2:
            raise ValueError(
                f"PrefixShareDPOCollator takes preference pairs (a chosen and a rejected response); these examples "
                f"have {layout.num_responses} responses each (responses_input_ids): the DPO loss would read only two"
            )
        batch[PAIRED_TOKENS_KEY] = paired_tokens_per_row(layout)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float32)
        return batch


class PrefixShareDPOVisionCollator:
    """TRL's vision preference examples -> a prefix-shared batch with images, the drop-in for TRL's
    ``DataCollatorForVisionPreference`` (for models with Qwen2-VL-style 3D rotary positions: :mod:`prefixshare.vision`).

    Takes the raw examples TRL keeps for vision datasets (``prompt``, ``chosen``, ``rejected``, conversational or
    not, and ``images`` or ``image``) and tokenizes them on the fly as TRL's collator does (the same chat template,
    the same processor calls, ``add_special_tokens=False``), except that each prompt and its images are processed
    once per pair instead of once per response. Returns the :class:`PrefixShareDPOCollator` batch plus
    ``pixel_values`` ``[n_patches, D]`` and ``image_grid_thw`` ``[n_images, 3]``, every pair's images once.

    Args:
        processor: the model's processor (a ``ProcessorMixin`` with a ``tokenizer``).
        max_length, pad_to_multiple_of, max_tokens_per_row, padding_free: as :class:`PrefixShareDPOCollator`
            (truncation is ``keep_start``: only responses are cut; a prompt that reaches ``max_length`` raises,
            where cutting it would separate image tokens from their pixels).
    """

    def __init__(self, processor, max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 max_tokens_per_row: int | None = None, padding_free: bool = False):  # fmt: skip
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.processor = processor
        self.text = PrefixShareDPOCollator(
            pad, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, max_tokens_per_row=max_tokens_per_row,
            padding_free=padding_free,
        )  # fmt: skip

    @property
    def pad_token_id(self) -> int:
        return self.text.pad_token_id

    @property
    def pad_to_multiple_of(self) -> int | None:
        return self.text.pad_to_multiple_of

    def _tokenized(self, example: Mapping, index: int) -> dict:
        from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

        example = dict(example)
        if "image" in example:
            example["images"] = [example.pop("image")]
        images = list(example.get("images") or [])
        if is_conversational(example):
            example["prompt"] = prepare_multimodal_messages(example["prompt"], images=images)
            example["chosen"] = prepare_multimodal_messages(example["chosen"])
            example["rejected"] = prepare_multimodal_messages(example["rejected"])
            example = apply_chat_template(example, self.processor)
        prompt = self.processor(images=[images] if images else None, text=[example["prompt"]],
                                add_special_tokens=False, return_tensors="pt")  # fmt: skip
        unknown = sorted(set(prompt) - {"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                        "mm_token_type_ids"})  # fmt: skip
        if unknown:
            raise ValueError(
                f"example {index}: the processor gives {unknown} with the images; prefix-shared batches take the "
                "images of Qwen2-VL-style models only (pixel_values with image_grid_thw)"
            )
        out = {"prompt_input_ids": prompt["input_ids"][0]}
        for key in ("chosen", "rejected"):
            ids = self.processor(text=[example[key]], add_special_tokens=False, return_tensors="pt")["input_ids"]
            out[f"{key}_input_ids"] = ids[0]
        if images:
            out["pixel_values"], out["image_grid_thw"] = prompt["pixel_values"], prompt["image_grid_thw"]
        return out

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, Any]:
        return self.text([self._tokenized(e, i) for i, e in enumerate(examples)])


def paired_rows(batch: Mapping, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """The paired format of a prefix-shared pair batch, as TRL's ``DataCollatorForPreference`` lays it out.

    ``input_ids`` and ``attention_mask``, ``[2n, L]`` long: ``prompt+chosen`` of every pair, then ``prompt+rejected``
    of every pair, right-padded with ``pad_token_id`` to the longest (rounded up to ``pad_to_multiple_of``). Only for
    what needs TRL's rows themselves (the logits ``compute_metrics`` is given); the training forward never builds
    them.
    """
    layout = batch[LAYOUT_KEY]
    flat = batch["input_ids"].reshape(-1).cpu()
    L = batch["input_ids"].shape[1]
    sequences: list[list[torch.Tensor]] = [[None] * layout.num_examples for _ in range(layout.num_responses)]
    for p in layout.placements:
        start = p.row * L + p.offset
        prompt = flat[start : start + p.unit.prompt_length]
        cursor = start + p.unit.prompt_length
        for slot, length in zip(p.unit.response_slots, p.unit.response_lengths):
            sequences[slot][p.unit.example] = torch.cat([prompt, flat[cursor : cursor + length]])
            cursor += length
    rows = [seq for slot in sequences for seq in slot]
    longest = max(len(r) for r in rows)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
    device = batch["input_ids"].device
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


# ---------------------------------------------------------------------------------------------- checks
def _check_config(args: DPOConfig) -> None:
    """Raise ValueError for DPOConfig settings PrefixShareDPOTrainer does not implement, and for those TRL accepts
    but would turn into nan or a crash mid-training (found here, before any step). Whatever ``DPOTrainer.__init__``
    refuses itself (exo_pair without label smoothing, an f-divergence with a loss that has none, WPO with aot) is
    left to it, so that the error is TRL's own."""

    def unsupported(what: str, hint: str = "") -> ValueError:
        return ValueError(f"PrefixShareDPOTrainer does not support {what}{'; ' + hint if hint else ''}")

    loss_types = list(args.loss_type)
    unknown = [t for t in loss_types if t not in TRL_LOSS_TYPES]
    if unknown:  # TRL's own wording (DPOTrainer raises it at the first step; here before any)
        raise ValueError(f"Unknown loss type: {unknown[0]}. Should be one of {list(TRL_LOSS_TYPES)}")
    smoothing = args.label_smoothing
    if "robust" in loss_types and not 0.0 <= smoothing < 0.5:
        # TRL only warns, then divides by 1 - 2 * label_smoothing (0 at 0.5) or flips the loss's sign beyond it
        raise ValueError(
            "The `label_smoothing` parameter should lie in [0.0, 0.5) for the 'robust' loss. You provided "
            f"{smoothing}. (trl.DPOTrainer only warns, then divides by 1 - 2 * label_smoothing; PrefixShareDPOTrainer "
            "refuses rather than train on that.)"
        )
    if "exo_pair" in loss_types and smoothing >= 1.0:
        raise ValueError(f"loss_type 'exo_pair' needs label_smoothing in (0, 1) (log(1 - label_smoothing)), got {smoothing}")
    if {"aot", "aot_unpaired"} & set(loss_types) and not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"loss_types 'aot' and 'aot_unpaired' need label_smoothing in [0, 1], got {smoothing}")
    unweighable = [t for t in ("hinge", "sft") if t in loss_types]
    if getattr(args, "use_weighting", False) and unweighable:
        # TRL multiplies each loss by the WPO weights in place: sft's is an expanded scalar, hinge's the output relu
        # saves for its backward, so trl.DPOTrainer raises a RuntimeError at the first step (1.16)
        raise unsupported(
            f"use_weighting=True with loss_type {unweighable}",
            "trl.DPOTrainer 1.16 fails on this combination at the first step (a RuntimeError from weighting those "
            "losses in place), so there are no reference numbers to match; drop use_weighting or these loss types",
        )
    if getattr(args, "use_liger_kernel", False):
        raise unsupported(
            "use_liger_kernel=True", "Liger's kernels are not verified with prefix-shared batches (deprecated in TRL)"
        )
    check_shared_trainer_options(args, unsupported, "trl.DPOTrainer")


# ---------------------------------------------------------------------------------------------- trainer set-up
def _check_trainer_arguments(arguments, config: DPOConfig, stop_on_nonfinite) -> None:
    """Refuse, before TRL runs, what the prefix-shared trainer cannot do with these arguments."""
    _check_config(config)
    if not isinstance(stop_on_nonfinite, bool):
        raise ValueError(f"prefixshare_stop_on_nonfinite must be True or False, got {stop_on_nonfinite!r}")
    collator = arguments.get("data_collator")
    if collator is not None and not isinstance(collator, (PrefixShareDPOCollator, PrefixShareDPOVisionCollator)):
        raise ValueError(
            f"PrefixShareDPOTrainer needs its own collator (PrefixShareDPOCollator, or PrefixShareDPOVisionCollator "
            f"for data with images), got {type(collator).__name__}; leave data_collator unset"
        )
    if is_prompt_learning(arguments.get("model"), arguments.get("peft_config")):
        raise ValueError(
            "PrefixShareDPOTrainer does not support prompt-learning PEFT methods (prefix/prompt tuning): their "
            "virtual tokens do not fit the prefix-shared layout; LoRA-style adapters are fine"
        )
    # Vision data with a text model: DPOTrainer.__init__ raises its own error (a processor is refused below).


def _processing_class(arguments, model, config: DPOConfig):
    """The tokenizer or processor, loaded as DPOTrainer loads it when none is given (the collator is built here, so
    DPOTrainer skips that step)."""
    from transformers import AutoProcessor

    processing_class = arguments.get("processing_class")
    if processing_class is None:
        from trl.trainer.utils import get_config_model_id

        model_id = model if isinstance(model, str) else get_config_model_id(model.config)
        revision = (config.model_init_kwargs or {}).get("revision") if isinstance(model, str) else None
        processing_class = AutoProcessor.from_pretrained(
            model_id, revision=revision, trust_remote_code=config.trust_remote_code
        )
    return processing_class


def _default_collator(processing_class, config: DPOConfig, max_tokens_per_row: int | None, vision: bool):
    """The collator DPOTrainer would build, prefix-shared: its pad token chosen as DPOTrainer chooses it; for a
    dataset with images and a processor, :class:`PrefixShareDPOVisionCollator` (with a tokenizer DPOTrainer raises
    its own error for such a dataset)."""
    from transformers import ProcessorMixin

    is_processor = isinstance(processing_class, ProcessorMixin)
    tokenizer = processing_class.tokenizer if is_processor else processing_class
    pad_token = getattr(config, "pad_token", None) or tokenizer.pad_token or tokenizer.eos_token
    if pad_token is None or pad_token not in tokenizer.get_vocab():
        raise ValueError(
            f"the pad token {pad_token!r} is not in the vocabulary of {type(tokenizer).__name__}; set "
            "tokenizer.pad_token to a token it has"
        )
    tokenizer.pad_token = pad_token
    if config.padding_free and max_tokens_per_row is not None:
        raise ValueError(
            "give padding_free=True (each batch in one row) or prefixshare_max_tokens_per_row (rows of at most "
            "N tokens), not both"
        )
    if vision and is_processor:
        return PrefixShareDPOVisionCollator(
            processing_class, max_length=config.max_length, pad_to_multiple_of=config.pad_to_multiple_of,
            max_tokens_per_row=max_tokens_per_row, padding_free=config.padding_free,
        )  # fmt: skip
    return PrefixShareDPOCollator(
        pad_token_id=tokenizer.pad_token_id,
        max_length=config.max_length,
        pad_to_multiple_of=config.pad_to_multiple_of,
        max_tokens_per_row=max_tokens_per_row,
        padding_free=config.padding_free,
        truncation_mode=config.truncation_mode,
    )

# ---------------------------------------------------------------------------------------------- trainer
class PrefixShareDPOTrainer(PrefixSharePatching, DPOTrainer):
    """TRL's ``DPOTrainer`` with prefix sharing: same arguments, plus ``prefixshare_backend``,
    ``prefixshare_max_tokens_per_row`` and ``prefixshare_stop_on_nonfinite`` (see the module docstring).

    The model (and the reference model) are patched with :func:`prefixshare.patch`; forwards without a
    prefix-shared batch (``generate()``, your own evaluation) run the original attention.

    Raises:
        ValueError: an option prefix sharing does not cover (``use_liger_kernel``, ``torch_compile``,
            ``include_for_metrics=['inputs']``, a data collator of another kind, prompt-learning PEFT, tensor/context/sequence parallelism, ``accelerator_config.dispatch_batches=
            True``), or one trl.DPOTrainer accepts but fails on mid-training (``use_weighting`` with ``sft``,
            ``label_smoothing`` out of a loss's range). See docs/trl.md.
        prefixshare.UnsupportedModelError: an architecture :func:`prefixshare.patch` does not support.
        FloatingPointError: while training or evaluating with ``prefixshare_stop_on_nonfinite=True``, at the first
            step with nan/inf log-probs.
    """

    def __init__(
        self,
        *args,
        prefixshare_backend: str | None = None,
        prefixshare_max_tokens_per_row: int | None = None,
        prefixshare_stop_on_nonfinite: bool = False,
        **kwargs,
    ):
        bound = bind_trainer_arguments(DPOTrainer, DPOConfig, "DPO", self, args, kwargs)
        arguments = bound.arguments
        model, config = arguments.get("model"), arguments["args"]
        _check_trainer_arguments(arguments, config, prefixshare_stop_on_nonfinite)
        # Accelerate dispatches batches by default for iterable (streaming) datasets: the main process collates
        # num_processes batches, concatenates them tensor by tensor, and hands each process a slice of rows. A
        # prefix-shared batch does not survive that (its layout is no tensor and indexes tokens by row, reference
        # log-probs are per pair and packed rows hold several pairs), so each process collates its own batches,
        # exactly as with a map-style dataset. TRL does the same for streaming training sets (DPOTrainer.__init__
        # sets dispatch_batches=False); here it covers evaluation sets too. An explicit True raised above.
        config.accelerator_config.dispatch_batches = False
        processing_class = arguments["processing_class"] = _processing_class(arguments, model, config)
        vision = dataset_has_images(arguments.get("train_dataset")) or dataset_has_images(arguments.get("eval_dataset"))
        if arguments.get("data_collator") is None:
            arguments["data_collator"] = _default_collator(
                processing_class, config, prefixshare_max_tokens_per_row, vision
            )
        elif prefixshare_max_tokens_per_row is not None:
            raise ValueError("give prefixshare_max_tokens_per_row to the PrefixShareDPOCollator you pass, not both")

        self._prefixshare_stop_on_nonfinite = prefixshare_stop_on_nonfinite
        self._prefixshare_prepare_patching(prefixshare_backend)

        # padding_free: TRL 1.16 warns that it falls back to padding; here the collator packs each batch into one row
        # instead (built above), so TRL is shown padding_free=False and the flag is put back afterwards.
        padding_free, config.padding_free = config.padding_free, False
        try:
            super().__init__(*bound.args[1:], **bound.kwargs)
        finally:
            config.padding_free = padding_free
        self.padding_free = padding_free
        if vision:  # the model must place image tokens by 3D positions (after TRL's own checks of vision data)
            check_images_supported(self.model, "PrefixShareDPOTrainer")
        # after DPOTrainer.__init__, so that its checks come first (a precomputed reference patched its model there)
        self._prefixshare_patch_trainer_models()

    # ------------------------------------------------------------------------------------------ helpers
    def _prefixshare_forward(
        self, model, batch: Mapping, *, stats: tuple[str, ...] = (), per_token: bool = False, router: bool = False
    ):
        """One prefix-shared forward through the log-prob engine: ``[n, 2]`` log-probs with their graph and the
        requested per-token statistics (no graph); ``per_token``: also the ``[T]`` per-token log-probs;
        ``router``: the forward also returns its router logits (MoE; collect them with capture_router_logits)."""
        self._prefixshare_ensure_patched(model)
        inputs = {key: batch[key] for key in _MODEL_KEYS + _IMAGE_KEYS if key in batch}
        if router:
            inputs["output_router_logits"] = True
        return response_logps(model, inputs, per_token=per_token, stats=stats)

    def _prefixshare_adapter_context(self):
        """DPOTrainer's reference for PEFT without a ref model: the "ref" adapter if any, else no adapter."""
        if self.ref_model is None and is_peft_model(self.model):
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _prefixshare_reference(self, model, batch: Mapping) -> torch.Tensor:
        """The reference's ``[n, 2]`` log-probs (LD-DPO's when ``ld_alpha`` is set), without a graph."""
        from trl.models.utils import disable_gradient_checkpointing

        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._prefixshare_adapter_context(),
        ):
            ref = self._prefixshare_forward(model, batch, per_token=self.ld_alpha is not None)
        return self._prefixshare_sequence_logps(ref)

    def _prefixshare_sequence_logps(self, out: ResponseLogps) -> torch.Tensor:
        """``[n, 2]``: the summed log-probs, or LD-DPO's (the longer response's tail weighted by ``ld_alpha``)."""
        if self.ld_alpha is None:
            return out.logps
        return length_desensitized_logps(out.token_logps, out.token_index, out.num_tokens, alpha=self.ld_alpha)

    def _prefixshare_router_aux_loss(self, model, inputs, router_logits) -> torch.Tensor:
        """The MoE load-balancing loss of the policy's forward, with TRL's count of tokens: each prompt token once
        per response (:func:`prefixshare.moe.paired_token_weights`), so that it equals the ``aux_loss`` of
        trl.DPOTrainer's paired forward (a prompt token is routed identically in both of TRL's rows)."""
        layout = inputs[LAYOUT_KEY]
        num_experts, top_k = moe_routing(model)
        return load_balancing_loss(
            router_logits, layout, num_experts=num_experts, top_k=top_k, token_weights=paired_token_weights(layout)
        )

    # ------------------------------------------------------------------------------------------ overrides
    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one prefix-shared batch: ``(chosen [n], rejected [n])`` (precompute path)."""
        with self.accelerator.autocast():
            ref = self._prefixshare_reference(model, inputs)
        return ref[:, 0], ref[:, 1]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        stats = _METRIC_STATS + ((_WPO_STAT,) if self.use_weighting else ())
        with capture_router_logits(model) if self.aux_loss_enabled else contextlib.nullcontext() as router:
            policy = self._prefixshare_forward(
                model, inputs, stats=stats, per_token=self.use_weighting or self.ld_alpha is not None,
                router=self.aux_loss_enabled,
            )  # fmt: skip
        logps = self._prefixshare_sequence_logps(policy)
        chosen_logps, rejected_logps = logps[:, 0], logps[:, 1]
        num_tokens = policy.num_tokens.to(logps.device)

        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            # As DPOTrainer: the PEFT model with its adapters off (or its "ref" adapter), else the reference model.
            ref_model = self.model if (self.ref_model is None and is_peft_model(self.model)) else self.ref_model
            ref = self._prefixshare_reference(ref_model, inputs)
            ref_chosen_logps, ref_rejected_logps = ref[:, 0], ref[:, 1]
        if self._prefixshare_stop_on_nonfinite:
            self._prefixshare_check_finite(mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)

        weights = None
        if self.use_weighting:  # WPO, from the policy's per-token log-probs and log sum p^2 (no [T, V] logits)
            weights = wpo_weights(policy.token_logps, policy.stats[_WPO_STAT], policy.token_index, policy.num_tokens)
        # check_finite=False: like trl.DPOTrainer, nan/inf log-probs give a nan loss and nan metrics and training
        # goes on (the losses' own check would raise a ValueError mid-training and cost a device sync per step);
        # prefixshare_stop_on_nonfinite=True stops instead, above.
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":
                # TRL's SFT term: one mean over all chosen tokens of the batch, on the plain per-token log-probs
                term, _ = sft_loss(policy.logps[:, 0], num_tokens[:, 0], check_finite=False)
            else:
                term, _ = preference_loss(
                    loss_type,
                    policy_chosen_logps=chosen_logps,
                    policy_rejected_logps=rejected_logps,
                    reference_chosen_logps=ref_chosen_logps,
                    reference_rejected_logps=ref_rejected_logps,
                    chosen_num_tokens=num_tokens[:, 0],
                    rejected_num_tokens=num_tokens[:, 1],
                    beta=self.beta,
                    check_finite=False,
                    **self._prefixshare_loss_options(loss_type, weights),
                )
            loss = loss + term * weight

        if self.aux_loss_enabled:
            aux_loss = self._prefixshare_router_aux_loss(model, inputs, router.router_logits)
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._prefixshare_log_metrics(mode, inputs, policy, logps, ref_chosen_logps, ref_rejected_logps)
        if not return_outputs:
            return loss
        # compute_metrics / predict(): TRL (deprecated there) gives the logits of an extra forward on its paired rows
        warnings.warn(
            "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated and will be removed "
            "in v2.0.0. The fused LM head does not build the logits, so they are recomputed with an extra forward pass.",
            FutureWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            outputs = model(**self._prefixshare_paired_rows(inputs), use_cache=False)
        return loss, outputs

    def _prefixshare_loss_options(self, loss_type: str, weights) -> dict:
        """The DPOConfig options TRL applies to ``loss_type``, as keyword arguments of its loss function."""
        options = {}
        if loss_type in _F_DIVERGENCE_LOSSES:
            options.update(f_divergence=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef)
        if loss_type in _SMOOTHED_LOSSES:
            options["label_smoothing"] = self.label_smoothing
        if loss_type == "discopop":
            options["tau"] = self.args.discopop_tau
        if weights is not None:  # TRL refuses WPO with the aot losses itself, and we refuse it with sft
            options["weights"] = weights
        return options

    def _prefixshare_paired_rows(self, inputs) -> dict:
        if "pixel_values" in inputs:
            raise ValueError(
                "PrefixShareDPOTrainer does not give compute_metrics the logits of batches with images (TRL's "
                "deprecated return_outputs=True path); leave compute_metrics unset for vision data"
            )
        collator = self.data_collator
        pad_to = getattr(collator, "pad_to_multiple_of", None)
        return paired_rows(inputs, collator.pad_token_id, pad_to)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        """TRL's, with TRL's paired rows as the labels (TRL gives its batch's ``input_ids``, which are those rows)."""
        if prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss, outputs.logits, self._prefixshare_paired_rows(inputs)["input_ids"]

    def _prefixshare_check_finite(self, mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
        """Raise FloatingPointError if a log-prob of this step is nan or inf (``prefixshare_stop_on_nonfinite``).

        The counts are summed over all processes, so that every process raises at the same step rather than one
        raising while the others wait for it in a collective.
        """
        values = {
            "policy chosen": chosen_logps,
            "policy rejected": rejected_logps,
            "reference chosen": ref_chosen_logps,
            "reference rejected": ref_rejected_logps,
        }
        device = chosen_logps.device
        counts = [(~torch.isfinite(v.detach().to(device))).sum() for v in values.values()]
        counts.append(torch.tensor(chosen_logps.numel(), device=device))
        *bad, pairs = self.accelerator.reduce(torch.stack(counts), reduction="sum").tolist()  # one device sync
        if any(bad):
            which = ", ".join(f"{name} {count}/{pairs}" for name, count in zip(values, bad) if count)
            raise FloatingPointError(
                f"PrefixShareDPOTrainer: non-finite (nan or inf) log-probs in {mode} after {self.state.global_step} "
                f"optimizer steps: {which} pairs. The model's outputs overflowed or diverged (common causes: fp16 "
                "overflow, try bf16; a learning rate too large; nan/inf in the weights or in precomputed reference "
                "log-probs). Stopping because prefixshare_stop_on_nonfinite=True; with False (the default) "
                "the trainer logs NaN metrics and goes on, as trl.DPOTrainer does."
            )

    def _prefixshare_log_metrics(self, mode, inputs, policy: ResponseLogps, logps, ref_chosen_logps, ref_rejected_logps):
        """DPOTrainer's metrics, the same names and definitions, from the prefix-shared statistics. ``logps``:
        ``[n, 2]`` the log-probs the loss used (LD-DPO's when ``ld_alpha`` is set, as TRL logs them)."""
        gather, gather_for_metrics = self.accelerator.gather, self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]

        def ratio(numerator, denominator) -> float:
            total = gather_for_metrics(denominator).sum()
            return (gather_for_metrics(numerator).sum() / total).item() if total > 0 else 0.0

        num_tokens, sums = policy.num_tokens, policy.stat_sums
        metrics["entropy"].append(ratio(sums["entropy"].sum(), num_tokens.sum()))
        if mode == "train":
            # summed per process first, as TRL sums its attention mask: one scalar per process to gather
            paired = gather_for_metrics(inputs[PAIRED_TOKENS_KEY].sum().to(self.accelerator.device)).sum().item()
            self._total_train_tokens += paired // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["logits/chosen"].append(ratio(sums["mean_logit"][:, 0].sum(), num_tokens[:, 0].sum()))
        metrics["logits/rejected"].append(ratio(sums["mean_logit"][:, 1].sum(), num_tokens[:, 1].sum()))
        metrics["mean_token_accuracy"].append(ratio(sums["argmax_match"][:, 0].sum(), num_tokens[:, 0].sum()))

        chosen_logps, rejected_logps = logps[:, 0].detach(), logps[:, 1].detach()
        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps.detach())
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps.detach())
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps).mean().item())


# trl.RewardTrainer's drop-in lives in its own module; importable from here like the DPO trainer
from .trl_reward import PrefixShareRewardCollator, PrefixShareRewardTrainer  # noqa: E402
# GRPO and RLOO (online RL with shared prompts) live in their own module, re-exported here: one import path.
from .trl_rl import PrefixShareGRPOTrainer, PrefixShareRLOOTrainer  # noqa: E402

__all__ += ["PrefixShareGRPOTrainer", "PrefixShareRLOOTrainer"]
