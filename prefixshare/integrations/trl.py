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
  :mod:`prefixshare.losses`, and TRL's metrics computed the way TRL computes them;
* ``compute_ref_log_probs``: the reference forward used by ``precompute_ref_log_probs=True``.

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

Options that prefix sharing does not cover raise ``ValueError`` in ``__init__`` rather than being ignored; see
:data:`SUPPORTED_LOSS_TYPES` and the README's TRL section.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("prefixshare.integrations.trl needs TRL: pip install 'trl>=1.16'") from error

from accelerate.utils import is_peft_model

from ..collators import PrefixShareCollator
from ..layout import LAYOUT_KEY
from ..engine import response_logps
from ..logps import ResponseLogps
from ..losses import nll_loss, preference_loss
from ..patch import patch
from ..structure import unwrap_model

__all__ = ["PrefixShareDPOCollator", "PrefixShareDPOTrainer", "SUPPORTED_LOSS_TYPES"]

SUPPORTED_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "sft")
"""``DPOConfig.loss_type`` values PrefixShareDPOTrainer computes (alone or combined with ``loss_weights``; RPO is
``loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha]``). The others raise."""

PAIRED_TOKENS_KEY = "prefixshare_paired_tokens"
"""Batch key: ``[B]`` long, per row, the number of tokens its pairs take in TRL's paired format (prompt counted
twice); TRL's ``num_tokens`` metric counts these, so that the metric means the same thing with either trainer.
One entry per row, like ``input_ids``, so that it concatenates and slices along dim 0 with the rest of the batch
(a 0-d total could not be concatenated by accelerate)."""

_MODEL_KEYS = ("input_ids", "position_ids", LAYOUT_KEY)

# the per-token statistics behind TRL's metrics: entropy, logits/chosen and logits/rejected, mean_token_accuracy
_METRIC_STATS = ("entropy", "mean_logit", "argmax_match")

# The DPOTrainer internals this module overrides or relies on; checked at import so that a TRL that has
# moved them fails here rather than training wrongly.
for _name in ("_compute_loss", "compute_ref_log_probs", "_prepare_dataset"):
    if not callable(getattr(DPOTrainer, _name, None)):  # pragma: no cover - depends on the TRL version
        raise ImportError(
            f"prefixshare.integrations.trl needs TRL 1.x's DPOTrainer.{_name} (verified with trl 1.16); "
            "this TRL does not have it"
        )


# ---------------------------------------------------------------------------------------------- collator
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
        max_length: TRL's ``max_length`` with ``truncation_mode="keep_start"``: each prompt+completion keeps its
            first ``max_length`` tokens, i.e. completions are cut to ``max_length - len(prompt)``. (TRL drops the
            examples whose prompt alone reaches ``max_length`` while preparing the dataset; one that still comes
            here raises.)
        pad_to_multiple_of: round the row length up to a multiple of this.
        max_tokens_per_row: pack pairs into rows of at most this many tokens (see
            :class:`~prefixshare.PrefixShareCollator`).
    """

    def __init__(
        self,
        pad_token_id: int,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        max_tokens_per_row: int | None = None,
    ):
        self.collator = PrefixShareCollator(
            pad_token_id,
            max_tokens_per_row=max_tokens_per_row,
            pad_to_multiple_of=pad_to_multiple_of,
            max_length=max_length,
            truncation="truncate_responses" if max_length is not None else None,
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
        batch = dict(self.collator([self._ids(e) for e in examples]))
        layout = batch[LAYOUT_KEY]
        if layout.num_responses != 2:
            raise ValueError(
                f"PrefixShareDPOCollator takes preference pairs (a chosen and a rejected response); these examples "
                f"have {layout.num_responses} responses each (responses_input_ids): the DPO loss would read only two"
            )
        paired = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
        for p in layout.placements:
            paired[p.row] += p.unit.prompt_length * len(p.unit.response_slots) + sum(p.unit.response_lengths)
        batch[PAIRED_TOKENS_KEY] = paired
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float32)
        return batch


# ---------------------------------------------------------------------------------------------- checks
def _check_config(args: DPOConfig) -> None:
    """Raise ValueError for DPOConfig settings PrefixShareDPOTrainer does not implement."""

    def unsupported(what: str, hint: str = "") -> ValueError:
        return ValueError(f"PrefixShareDPOTrainer does not support {what}{'; ' + hint if hint else ''}")

    loss_types = list(args.loss_type)
    others = [t for t in loss_types if t not in SUPPORTED_LOSS_TYPES]
    if others:
        raise unsupported(
            f"loss_type {others}",
            f"it supports {list(SUPPORTED_LOSS_TYPES)} (RPO: loss_type=['sigmoid', 'sft'], loss_weights=[1, alpha]); "
            "use trl.DPOTrainer for the others",
        )
    if "robust" in loss_types and not 0.0 <= args.label_smoothing < 0.5:
        raise ValueError(f"loss_type 'robust' needs label_smoothing in [0, 0.5), got {args.label_smoothing}")
    if getattr(args, "f_divergence_type", "reverse_kl") != "reverse_kl":
        raise unsupported(f"f_divergence_type={args.f_divergence_type!r}", "only 'reverse_kl' (standard DPO)")
    if getattr(args, "use_weighting", False):
        raise unsupported("use_weighting=True (WPO weights)")
    if getattr(args, "ld_alpha", None) is not None:
        raise unsupported("ld_alpha (LD-DPO)")
    if getattr(args, "padding_free", False):
        raise unsupported(
            "padding_free=True", "prefix sharing already removes most padding; pack rows with prefixshare_max_tokens_per_row"
        )
    if getattr(args, "use_liger_kernel", False):
        raise unsupported("use_liger_kernel=True")
    if args.max_length is not None and args.truncation_mode != "keep_start":
        raise unsupported(
            f"truncation_mode={args.truncation_mode!r}",
            "keep_end cuts prompt+chosen and prompt+rejected at different prompt tokens, so they no longer share one "
            "prompt; use truncation_mode='keep_start' (TRL's default) or max_length=None",
        )
    if getattr(getattr(args, "accelerator_config", None), "dispatch_batches", None) is True:
        raise unsupported(
            "accelerator_config.dispatch_batches=True",
            "a prefix-shared batch cannot be concatenated across processes and re-split by rows (rows hold whole "
            "pairs, packed rows several); leave dispatch_batches unset: each process then collates its own batches",
        )
    if getattr(args, "torch_compile", False):
        raise unsupported("torch_compile=True", "not verified with prefix-shared attention")
    parallelism = getattr(args, "parallelism_config", None)
    if parallelism is not None:
        sizes = {name: getattr(parallelism, name, None) or 1 for name in ("tp_size", "cp_size", "sp_size")}
        if any(size > 1 for size in sizes.values()):
            raise unsupported(f"tensor/context/sequence parallelism ({sizes})", "data parallelism and FSDP are fine")


def _is_prompt_learning(model, peft_config) -> bool:
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return True
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, Mapping) and any(getattr(c, "is_prompt_learning", False) for c in configs.values())


# ---------------------------------------------------------------------------------------------- trainer
class PrefixShareDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with prefix sharing: same arguments, plus ``prefixshare_backend``,
    ``prefixshare_max_tokens_per_row`` and ``prefixshare_stop_on_nonfinite`` (see the module docstring).

    The model (and the reference model) are patched with :func:`prefixshare.patch`; forwards without a
    prefix-shared batch (``generate()``, your own evaluation) run the original attention.

    Raises:
        ValueError: an option prefix sharing does not cover (a loss type outside :data:`SUPPORTED_LOSS_TYPES`,
            ``f_divergence_type``, ``use_weighting``, ``ld_alpha``, ``padding_free``, ``use_liger_kernel``,
            ``truncation_mode='keep_end'``, ``torch_compile``, ``compute_metrics``, a data collator of another
            kind, vision-language models or data, prompt-learning PEFT, Mixture-of-Experts auxiliary losses,
            tensor/context/sequence parallelism, ``accelerator_config.dispatch_batches=True``).
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
        from transformers import AutoProcessor, ProcessorMixin

        bound = inspect.signature(DPOTrainer.__init__).bind(self, *args, **kwargs)
        arguments = bound.arguments
        model = arguments.get("model")
        config = arguments.get("args")
        if config is None:  # DPOTrainer's default config, made here so that it can be checked first
            from trl.trainer.utils import get_config_model_id

            name = model if isinstance(model, str) else get_config_model_id(model.config)
            config = arguments["args"] = DPOConfig(f"{name.split('/')[-1]}-DPO")
        _check_config(config)
        if not isinstance(prefixshare_stop_on_nonfinite, bool):
            raise ValueError(
                f"prefixshare_stop_on_nonfinite must be True or False, got {prefixshare_stop_on_nonfinite!r}"
            )
        # Accelerate dispatches batches by default for iterable (streaming) datasets: the main process collates
        # num_processes batches, concatenates them tensor by tensor, and hands each process a slice of rows. A
        # prefix-shared batch does not survive that (its layout is no tensor and indexes tokens by row, reference
        # log-probs are per pair and packed rows hold several pairs), so each process collates its own batches,
        # exactly as with a map-style dataset. TRL does the same for streaming training sets (DPOTrainer.__init__
        # sets dispatch_batches=False); here it covers evaluation sets too. An explicit True raised above.
        config.accelerator_config.dispatch_batches = False

        if arguments.get("compute_metrics") is not None:
            raise ValueError(
                "PrefixShareDPOTrainer does not support compute_metrics: it would need the paired-format logits "
                "(deprecated in TRL as well)"
            )
        collator = arguments.get("data_collator")
        if collator is not None and not isinstance(collator, PrefixShareDPOCollator):
            raise ValueError(
                f"PrefixShareDPOTrainer needs its own collator (PrefixShareDPOCollator), got {type(collator).__name__}; "
                "leave data_collator unset"
            )
        if _is_prompt_learning(model, arguments.get("peft_config")):
            raise ValueError(
                "PrefixShareDPOTrainer does not support prompt-learning PEFT methods (prefix/prompt tuning): their "
                "virtual tokens do not fit the prefix-shared layout; LoRA-style adapters are fine"
            )
        train_dataset = arguments.get("train_dataset")
        if train_dataset is not None:
            first = next(iter(train_dataset))
            if "image" in first or "images" in first:
                raise ValueError("PrefixShareDPOTrainer does not support vision-language data (an 'image(s)' column)")

        # The tokenizer: loaded as DPOTrainer loads it, and its pad token chosen as DPOTrainer chooses it (the
        # collator is built here, so DPOTrainer skips that step).
        processing_class = arguments.get("processing_class")
        if processing_class is None:
            from trl.trainer.utils import get_config_model_id

            model_id = model if isinstance(model, str) else get_config_model_id(model.config)
            revision = (config.model_init_kwargs or {}).get("revision") if isinstance(model, str) else None
            processing_class = arguments["processing_class"] = AutoProcessor.from_pretrained(
                model_id, revision=revision, trust_remote_code=config.trust_remote_code
            )
        if isinstance(processing_class, ProcessorMixin):
            raise ValueError(
                "PrefixShareDPOTrainer does not support vision-language models (a processor as processing_class); "
                "pass a tokenizer"
            )
        if collator is None:
            tokenizer = processing_class
            pad_token = getattr(config, "pad_token", None) or tokenizer.pad_token or tokenizer.eos_token
            if pad_token is None or pad_token not in tokenizer.get_vocab():
                raise ValueError(
                    f"the pad token {pad_token!r} is not in the vocabulary of {type(tokenizer).__name__}; set "
                    "tokenizer.pad_token to a token it has"
                )
            tokenizer.pad_token = pad_token
            arguments["data_collator"] = PrefixShareDPOCollator(
                pad_token_id=tokenizer.pad_token_id,
                max_length=config.max_length,
                pad_to_multiple_of=config.pad_to_multiple_of,
                max_tokens_per_row=prefixshare_max_tokens_per_row,
            )
        elif prefixshare_max_tokens_per_row is not None:
            raise ValueError("give prefixshare_max_tokens_per_row to the PrefixShareDPOCollator you pass, not both")

        self._prefixshare_backend = prefixshare_backend
        self._prefixshare_stop_on_nonfinite = prefixshare_stop_on_nonfinite
        self._prefixshare_patched: set[int] = set()
        # Patch now what exists now (an unsupported architecture fails here); models DPOTrainer loads itself
        # (from a name, or the reference copy) are patched on their first prefix-shared forward.
        for m in (model, arguments.get("ref_model")):
            if m is not None and not isinstance(m, str):
                patch(m, backend=prefixshare_backend)

        super().__init__(*bound.args[1:], **bound.kwargs)

        if self.aux_loss_enabled:
            raise ValueError("PrefixShareDPOTrainer does not support Mixture-of-Experts auxiliary losses")
        self._prefixshare_ensure_patched(self.model)
        if self.ref_model is not None:
            self._prefixshare_ensure_patched(self.ref_model)

    # ------------------------------------------------------------------------------------------ helpers
    def _prefixshare_ensure_patched(self, model):
        inner = self.accelerator.unwrap_model(model)
        if id(inner) not in self._prefixshare_patched:
            patch(inner, backend=self._prefixshare_backend)
            self._prefixshare_patched.add(id(inner))
        return unwrap_model(inner)

    def _prefixshare_forward(self, model, batch: Mapping, *, stats: bool) -> ResponseLogps:
        """One prefix-shared forward through the log-prob engine: ``[n, 2]`` log-probs with their graph and,
        with ``stats``, the per-response sums of TRL's metric statistics (no graph)."""
        self._prefixshare_ensure_patched(model)
        inputs = {key: batch[key] for key in _MODEL_KEYS}
        return response_logps(model, inputs, stats=_METRIC_STATS if stats else ())

    def _prefixshare_adapter_context(self):
        """DPOTrainer's reference for PEFT without a ref model: the "ref" adapter if any, else no adapter."""
        if self.ref_model is None and is_peft_model(self.model):
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _prefixshare_reference(self, model, batch: Mapping) -> ResponseLogps:
        from trl.models.utils import disable_gradient_checkpointing

        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._prefixshare_adapter_context(),
        ):
            return self._prefixshare_forward(model, batch, stats=False)

    # ------------------------------------------------------------------------------------------ overrides
    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one prefix-shared batch: ``(chosen [n], rejected [n])`` (precompute path)."""
        with self.accelerator.autocast():
            ref = self._prefixshare_reference(model, inputs)
        return ref.logps[:, 0], ref.logps[:, 1]

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:
            raise NotImplementedError(
                "PrefixShareDPOTrainer computes no logits to return (compute_metrics and predict() with "
                "prediction_loss_only=False are not supported); use prediction_loss_only=True"
            )
        mode = "train" if self.model.training else "eval"
        policy = self._prefixshare_forward(model, inputs, stats=True)
        chosen_logps, rejected_logps = policy.logps[:, 0], policy.logps[:, 1]
        chosen_tokens, rejected_tokens = policy.num_tokens[:, 0], policy.num_tokens[:, 1]

        if self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            # As DPOTrainer: the PEFT model with its adapters off (or its "ref" adapter), else the reference model.
            ref_model = self.model if (self.ref_model is None and is_peft_model(self.model)) else self.ref_model
            ref = self._prefixshare_reference(ref_model, inputs)
            ref_chosen_logps, ref_rejected_logps = ref.logps[:, 0], ref.logps[:, 1]
        if self._prefixshare_stop_on_nonfinite:
            self._prefixshare_check_finite(mode, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)

        # check_finite=False: like trl.DPOTrainer, nan/inf log-probs give a nan loss and nan metrics and training
        # goes on (the losses' own check would raise a ValueError mid-training and cost a device sync per step);
        # prefixshare_stop_on_nonfinite=True stops instead, above.
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":
                # TRL's SFT term: one mean over all chosen tokens of the batch (token-weighted, not per pair)
                summed, _ = nll_loss(chosen_logps, length_normalize=False, reduction="sum", check_finite=False)
                term = summed / chosen_tokens.sum()
            else:
                term, _ = preference_loss(
                    loss_type,
                    policy_chosen_logps=chosen_logps,
                    policy_rejected_logps=rejected_logps,
                    reference_chosen_logps=ref_chosen_logps,
                    reference_rejected_logps=ref_rejected_logps,
                    chosen_num_tokens=chosen_tokens,
                    rejected_num_tokens=rejected_tokens,
                    beta=self.beta,
                    check_finite=False,
                    # TRL applies label smoothing to the robust loss only (its sigmoid ignores it)
                    **({"label_smoothing": self.label_smoothing} if loss_type == "robust" else {}),
                )
            loss = loss + term * weight

        self._prefixshare_log_metrics(mode, inputs, policy, ref_chosen_logps, ref_rejected_logps)
        return loss

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

    def _prefixshare_log_metrics(self, mode, inputs, policy: ResponseLogps, ref_chosen_logps, ref_rejected_logps):
        """DPOTrainer's metrics, the same names and definitions, from the prefix-shared statistics."""
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

        chosen_logps, rejected_logps = policy.logps[:, 0].detach(), policy.logps[:, 1].detach()
        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps.detach())
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps.detach())
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps).mean().item())
