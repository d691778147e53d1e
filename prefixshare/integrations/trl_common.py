"""What the prefix-shared TRL trainers share: TRL's token-count metric and the options none of them takes."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

try:
    import trl  # noqa: F401  (every integration needs it; one message for all of them)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("prefixshare.integrations.trl needs TRL: pip install 'trl>=1.16'") from error

from ..patch import patch
from ..structure import unwrap_model

PAIRED_TOKENS_KEY = "prefixshare_paired_tokens"
"""Batch key: ``[B]`` long, per row, the number of tokens its pairs take in TRL's paired format (prompt counted
twice); TRL's ``num_tokens`` metric counts these, so that the metric means the same thing with either trainer.
One entry per row, like ``input_ids``, so that it concatenates and slices along dim 0 with the rest of the batch
(a 0-d total could not be concatenated by accelerate)."""


def paired_tokens_per_row(layout) -> torch.Tensor:
    """``[B]`` long: the tokens each row's units would take in TRL's paired format (the prompt once per response)."""
    paired = torch.zeros(layout.shape[0], dtype=torch.long)
    for p in layout.placements:
        paired[p.row] += p.unit.prompt_length * len(p.unit.response_slots) + sum(p.unit.response_lengths)
    return paired


def check_shared_trainer_options(args, unsupported, trl_trainer: str) -> None:
    """The refusals every prefix-shared TRL trainer shares; ``unsupported(what, hint)`` builds the trainer's error."""
    if getattr(getattr(args, "accelerator_config", None), "dispatch_batches", None) is True:
        raise unsupported(
            "accelerator_config.dispatch_batches=True",
            "a prefix-shared batch cannot be concatenated across processes and re-split by rows (rows hold whole "
            "pairs, packed rows several); leave dispatch_batches unset: each process then collates its own batches",
        )
    if "inputs" in (getattr(args, "include_for_metrics", None) or []):
        raise unsupported(
            "include_for_metrics=['inputs']",
            f"compute_metrics would be given the prefix-shared rows, not the paired rows {trl_trainer} gives",
        )
    check_compile_and_parallelism(args, unsupported)


def check_compile_and_parallelism(args, unsupported) -> None:
    """Refuse ``torch_compile`` and tensor/context/sequence parallelism (every prefix-shared TRL trainer)."""
    if getattr(args, "torch_compile", False):
        raise unsupported("torch_compile=True", "not verified with prefix-shared attention")
    parallelism = getattr(args, "parallelism_config", None)
    if parallelism is not None:
        sizes = {name: getattr(parallelism, name, None) or 1 for name in ("tp_size", "cp_size", "sp_size")}
        if any(size > 1 for size in sizes.values()):
            raise unsupported(
                f"tensor/context/sequence parallelism ({sizes})",
                "a unit must sit whole on one rank; data parallelism and FSDP are fine",
            )


class PrefixSharePatching:
    """What every prefix-shared TRL trainer does with its models: patch them once TRL's ``__init__`` has run (so that
    TRL's own validation comes first, with TRL's errors, as with plain TRL, and the model is patched as TRL leaves it:
    loaded from a name, with its adapters, with the pad token id TRL writes into its config; an unsupported
    architecture still fails in the constructor, before training), and every model it forwards (the reference copy,
    an accelerate wrapper's module, a model TRL forwards inside its ``__init__``) once, on first use."""

    def _prefixshare_prepare_patching(self, backend: str | None) -> None:
        """Before TRL's ``__init__``: the backend; nothing is patched yet."""
        self._prefixshare_backend = backend
        self._prefixshare_patched: set[int] = set()

    def _prefixshare_patch_trainer_models(self) -> None:
        """After TRL's ``__init__``: patch the policy and the reference model (if any) as TRL set them up."""
        self._prefixshare_ensure_patched(self.model)
        if getattr(self, "ref_model", None) is not None:
            self._prefixshare_ensure_patched(self.ref_model)

    def _prefixshare_ensure_patched(self, model):
        """Patch ``model`` (unwrapped from accelerate) if this trainer has not yet; return the transformers model."""
        inner = self.accelerator.unwrap_model(model)
        if id(inner) not in self._prefixshare_patched:
            patch(inner, backend=self._prefixshare_backend)
            self._prefixshare_patched.add(id(inner))
        return unwrap_model(inner)


def dataset_has_images(dataset) -> bool:
    """Whether a TRL dataset carries images: its first example has an ``image`` or ``images`` column (TRL's own
    test, in DPOTrainer and GRPOTrainer)."""
    if dataset is None:
        return False
    if isinstance(dataset, Mapping):  # several evaluation sets
        return any(dataset_has_images(d) for d in dataset.values())
    try:
        sample = next(iter(dataset))
    except (StopIteration, TypeError):
        return False
    return isinstance(sample, Mapping) and ("image" in sample or "images" in sample)


def is_prompt_learning(model, peft_config) -> bool:
    """Whether ``model`` is (or ``peft_config`` makes it) a prompt-learning PEFT model (prefix / prompt / p-tuning):
    their virtual tokens do not fit the prefix-shared layout."""
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return True
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, Mapping) and any(getattr(c, "is_prompt_learning", False) for c in configs.values())


def bind_trainer_arguments(trainer_class, config_class, suffix: str, trainer, args, kwargs) -> inspect.BoundArguments:
    """The TRL trainer's ``__init__`` arguments, bound by name (edit ``.arguments``, call with ``.args[1:]`` and
    ``.kwargs``); a missing ``args`` becomes TRL's own default config (``<model name>-<suffix>``), made here so
    that it can be checked before TRL runs."""
    bound = inspect.signature(trainer_class.__init__).bind(trainer, *args, **kwargs)
    if bound.arguments.get("args") is None:
        from trl.trainer.utils import get_config_model_id

        model = bound.arguments.get("model")
        name = model if isinstance(model, str) else get_config_model_id(model.config)
        bound.arguments["args"] = config_class(f"{name.split('/')[-1]}-{suffix}")
    return bound
