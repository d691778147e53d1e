"""What the prefix-shared TRL trainers share: TRL's token-count metric and the options none of them takes."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

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
    if getattr(args, "torch_compile", False):
        raise unsupported("torch_compile=True", "not verified with prefix-shared attention")
    if "inputs" in (getattr(args, "include_for_metrics", None) or []):
        raise unsupported(
            "include_for_metrics=['inputs']",
            f"compute_metrics would be given the prefix-shared rows, not the paired rows {trl_trainer} gives",
        )
    parallelism = getattr(args, "parallelism_config", None)
    if parallelism is not None:
        sizes = {name: getattr(parallelism, name, None) or 1 for name in ("tp_size", "cp_size", "sp_size")}
        if any(size > 1 for size in sizes.values()):
            raise unsupported(f"tensor/context/sequence parallelism ({sizes})", "data parallelism and FSDP are fine")


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
