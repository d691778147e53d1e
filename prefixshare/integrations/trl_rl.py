"""``PrefixShareGRPOTrainer`` and ``PrefixShareRLOOTrainer``: TRL's online RL trainers with shared prompts.

::

    from trl import GRPOConfig
    from prefixshare.integrations.trl import PrefixShareGRPOTrainer as GRPOTrainer   # the one changed line

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)
    trainer.train()

GRPO and RLOO sample every prompt G times and score each ``[prompt | completion]`` row: the policy's forward
(with gradients), the old policy's (``num_iterations > 1``) and the reference's (``beta != 0``) all process
``G * (p + c)`` tokens where ``p + G * c`` would do. These trainers override one method of TRL's,
``_get_per_token_logps_and_entropies``, the one every such forward goes through: the rows of the batch that
share the same prompt tokens (found by their ids, wherever shuffling and micro-batching put them) become one
unit ``[prompt | completion 1 | ... | completion k]`` (:func:`prefixshare.group_completions`), the log-prob
engine scores them under ``softmax(logits / temperature)`` as TRL does (:func:`prefixshare.completion_logps`),
and the per-token log-probs and entropies come back in TRL's ``[rows, completion_length]`` layout, zeros where
TRL has zeros. Generation, rewards, advantages, the losses and the logged metrics are TRL's own code.

Extra keyword arguments:

* ``prefixshare_backend``: the attention kernel for prefix-shared forwards (``"eager"``, ``"sdpa"``,
  ``"flex_attention"``, ``"varlen"``); ``None`` (default) keeps the model's own.
* ``prefixshare_max_tokens_per_row``: pack units first-fit-decreasing into rows of at most this many tokens (a
  group too long for one row is split into units that each carry the prompt); ``None`` (default): one unit per
  row. Pays with kernels that skip masked blocks (flex_attention, varlen); eager and sdpa compute every
  ``L x L`` score of a row.

TRL's ``batch_size`` chunking of the no-grad forwards (old policy, reference) is kept as a bound: each forward
holds at most ``per_device_train_batch_size`` completions.

Options whose forward is not this one raise ``ValueError`` in ``__init__``: see :func:`_check_config`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

try:
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("prefixshare.integrations.trl_rl needs TRL: pip install 'trl>=1.16'") from error

from ..groups import completion_logps, group_completions
from ..patch import patch
from ..structure import unwrap_model

__all__ = ["PrefixShareGRPOTrainer", "PrefixShareRLOOTrainer"]

# The one TRL method overridden, with the parameters TRL 1.16's callers pass; checked at import so that a TRL
# that has renamed or reshaped it fails here rather than training through TRL's own (row-format) forward.
_EXPECTED_PARAMETERS = (
    "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy", "compute_aux_loss",
)  # fmt: skip
for _trainer in (GRPOTrainer, RLOOTrainer):
    _method = getattr(_trainer, "_get_per_token_logps_and_entropies", None)
    _found = tuple(inspect.signature(_method).parameters)[1:] if callable(_method) else ()
    if _found[: len(_EXPECTED_PARAMETERS)] != _EXPECTED_PARAMETERS:  # pragma: no cover - depends on the TRL version
        raise ImportError(
            f"prefixshare.integrations.trl_rl needs TRL 1.x's {_trainer.__name__}._get_per_token_logps_and_entropies"
            f"({', '.join(_EXPECTED_PARAMETERS)}, ...) (verified with trl 1.16); this TRL has "
            f"{'no such method' if not _found else _found}"
        )

# keyword arguments of _get_per_token_logps_and_entropies that carry images (vision-language models)
_MULTIMODAL = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


def _check_config(name: str, args) -> None:
    """Raise ValueError for settings whose forward or loss these trainers do not reproduce."""

    def unsupported(what: str, why: str) -> ValueError:
        return ValueError(f"{name} does not support {what}: {why}")

    if getattr(args, "entropy_coef", 0.0) or getattr(args, "use_adaptive_entropy", False):
        raise unsupported(
            "the entropy bonus (entropy_coef != 0 or use_adaptive_entropy=True)",
            "it back-propagates through the per-token entropy, which the log-prob engine returns without a gradient; "
            "use trl.GRPOTrainer for it (top_entropy_quantile, which only masks tokens, is supported)",
        )
    if getattr(args, "use_liger_kernel", False):
        raise unsupported("use_liger_kernel=True", "Liger's layer kernels are not verified with prefix-shared attention")
    if getattr(args, "torch_compile", False):
        raise unsupported("torch_compile=True", "not verified with prefix-shared attention")
    parallelism = getattr(args, "parallelism_config", None)
    if parallelism is not None:
        sizes = {n: getattr(parallelism, n, None) or 1 for n in ("tp_size", "cp_size", "sp_size")}
        if any(size > 1 for size in sizes.values()):
            raise unsupported(
                f"tensor/context/sequence parallelism ({sizes})",
                "a unit must sit whole on one rank; data parallelism and FSDP are fine",
            )


def _is_prompt_learning(model, peft_config) -> bool:
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return True
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, Mapping) and any(getattr(c, "is_prompt_learning", False) for c in configs.values())


class _PrefixShareRL:
    """What the GRPO and RLOO drop-ins share: the checks, the patching and the overridden forward."""

    _base: type
    _config: type

    def __init__(self, *args, prefixshare_backend: str | None = None, prefixshare_max_tokens_per_row: int | None = None,
                 **kwargs):  # fmt: skip
        from transformers import ProcessorMixin

        name = type(self).__name__
        bound = inspect.signature(self._base.__init__).bind(self, *args, **kwargs)
        arguments = bound.arguments
        model = arguments.get("model")
        config = arguments.get("args")
        if config is None:  # the base trainer's default config, made here so that it is checked first
            from trl.trainer.utils import get_config_model_id

            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            suffix = "GRPO" if self._base is GRPOTrainer else "RLOO"
            config = arguments["args"] = self._config(f"{model_name.split('/')[-1]}-{suffix}")
        _check_config(name, config)
        if prefixshare_max_tokens_per_row is not None and (
            isinstance(prefixshare_max_tokens_per_row, bool)
            or not isinstance(prefixshare_max_tokens_per_row, int)
            or prefixshare_max_tokens_per_row < 1
        ):
            raise ValueError(
                f"prefixshare_max_tokens_per_row must be a positive integer or None, got {prefixshare_max_tokens_per_row!r}"
            )
        if isinstance(arguments.get("processing_class"), ProcessorMixin):
            raise ValueError(
                f"{name} does not support vision-language models (a processor as processing_class): image tokens "
                "and their features are not laid out per unit; pass a tokenizer"
            )
        if _is_prompt_learning(model, arguments.get("peft_config")):
            raise ValueError(
                f"{name} does not support prompt-learning PEFT methods (prefix/prompt tuning): their virtual tokens "
                "do not fit the prefix-shared layout; LoRA-style adapters are fine"
            )

        self._prefixshare_backend = prefixshare_backend
        self._prefixshare_max_tokens_per_row = prefixshare_max_tokens_per_row
        self._prefixshare_patched: set[int] = set()
        # tokens the row format would process and the prefix-shared forwards did, and rows with nothing to score
        self._prefixshare_token_counts = {"rows": 0, "shared": 0, "empty_rows": 0}
        # Patch now what exists now (an unsupported architecture fails here, before any generation); models the
        # trainer loads itself (from a name, the reference copy) are patched on their first forward here.
        for m in (model, arguments.get("ref_model")):
            if m is not None and not isinstance(m, str):
                patch(m, backend=prefixshare_backend)

        super().__init__(*bound.args[1:], **bound.kwargs)

        if getattr(self, "_is_vlm", False):
            raise ValueError(f"{name} does not support vision-language models")
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                f"{name} does not support the Mixture-of-Experts load-balancing loss (router_aux_loss_coef != 0): "
                "its router statistics would count the shared prompt once per unit instead of once per row"
            )
        self._prefixshare_ensure_patched(self.model)
        if getattr(self, "ref_model", None) is not None:
            self._prefixshare_ensure_patched(self.ref_model)

    def _prefixshare_ensure_patched(self, model):
        inner = self.accelerator.unwrap_model(model)
        if id(inner) not in self._prefixshare_patched:
            patch(inner, backend=self._prefixshare_backend)
            self._prefixshare_patched.add(id(inner))
        return unwrap_model(inner)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """TRL's ``[prompt | completion]`` rows -> ``(logps [rows, C], entropies [rows, C] or None, None)``.

        ``input_ids`` and ``attention_mask`` are ``[rows, P + C]`` with ``C = logits_to_keep``: prompts
        left-padded, completions right-padded (zero mask rows for ``mask_truncated_completions``). The rows that
        share prompt tokens are scored as one unit each; values are TRL's (``softmax(logits / temperature)``),
        zeros where the mask is 0, as TRL returns them.
        """
        given = sorted(k for k, v in multimodal.items() if v is not None)
        unknown = sorted(set(multimodal) - set(_MULTIMODAL))
        if given or unknown:
            raise ValueError(
                f"{type(self).__name__} does not support vision-language inputs ({', '.join(given + unknown)})"
            )
        if compute_aux_loss:
            raise ValueError(f"{type(self).__name__} does not support the Mixture-of-Experts load-balancing loss")
        C = int(logits_to_keep)
        if not 0 < C < input_ids.shape[1]:
            raise ValueError(
                f"logits_to_keep={C} leaves no prompt columns in input_ids of shape {tuple(input_ids.shape)}: each "
                "completion needs a prompt token to predict its first token"
            )
        pad = getattr(getattr(self, "_tokenizer", None), "pad_token_id", None)
        groups = group_completions(
            input_ids[:, :-C],
            input_ids[:, -C:],
            prompt_mask=attention_mask[:, :-C],
            completion_mask=attention_mask[:, -C:],
            pad_token_id=pad if isinstance(pad, int) else 0,
            max_tokens_per_row=self._prefixshare_max_tokens_per_row,
            max_completions_per_forward=batch_size,
        )
        counts = self._prefixshare_token_counts
        counts["rows"] += int(attention_mask.sum())
        counts["shared"] += groups.num_tokens
        counts["empty_rows"] += int((groups.completion_lengths == 0).sum())
        self._prefixshare_ensure_patched(model)
        with self.accelerator.autocast():
            out = completion_logps(
                model, groups, stats=("entropy",) if compute_entropy else (), temperature=self.temperature
            )
        return out.logps, (out.stats["entropy"] if compute_entropy else None), None


class PrefixShareGRPOTrainer(_PrefixShareRL, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the prompt of each group computed once; same arguments, plus
    ``prefixshare_backend`` and ``prefixshare_max_tokens_per_row`` (see the module docstring).

    Raises:
        ValueError: the entropy bonus (``entropy_coef``, ``use_adaptive_entropy``), ``use_liger_kernel``,
            ``torch_compile``, vision-language models, prompt-learning PEFT, the MoE load-balancing loss,
            tensor/context/sequence parallelism.
        prefixshare.UnsupportedModelError: an architecture :func:`prefixshare.patch` does not support.
    """

    _base = GRPOTrainer
    _config = GRPOConfig


class PrefixShareRLOOTrainer(_PrefixShareRL, RLOOTrainer):
    """TRL's ``RLOOTrainer`` with the prompt of each group computed once; same arguments, plus
    ``prefixshare_backend`` and ``prefixshare_max_tokens_per_row`` (see the module docstring).

    Raises:
        ValueError: ``use_liger_kernel``, ``torch_compile``, vision-language models, prompt-learning PEFT, the MoE
            load-balancing loss, tensor/context/sequence parallelism.
        prefixshare.UnsupportedModelError: an architecture :func:`prefixshare.patch` does not support.
    """

    _base = RLOOTrainer
    _config = RLOOConfig
