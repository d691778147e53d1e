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

Vision-language models (a processor as ``processing_class``) with Qwen2-VL-style 3D positions train on data with
images: the rows' images go to :func:`prefixshare.group_completions`, which groups rows by prompt tokens and
images, each group's images encoded once (docs/trl.md, "Images").

Options whose forward is not this one raise ``ValueError`` in ``__init__``: see :func:`_check_config`.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch

from ..groups import completion_logps, group_completions
from ..layout import LAYOUT_KEY
from ..moe import capture_router_logits, load_balancing_loss, moe_routing
from ..vision import check_images_supported
from .trl_common import (
    PrefixSharePatching,
    bind_trainer_arguments,
    check_compile_and_parallelism,
    dataset_has_images,
    is_prompt_learning,
)
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # after .trl_common: it says how to install TRL

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


def _row_images(name: str, rows: int, multimodal: dict) -> list | None:
    """The images of each of the ``rows`` rows, ``None`` or ``{"pixel_values", "image_grid_thw"}`` (for
    :func:`prefixshare.group_completions`), from TRL's batched multimodal keyword arguments: ``pixel_values``
    ``[patches of every row's images, D]``, ``image_grid_thw`` ``[images, 3]``, ``num_images`` (a list, images per
    row). None when the rows carry no image. Other forms (Gemma's ``token_type_ids``, LLaVA-Next's
    ``image_sizes``, tiles ...) raise: only Qwen2-VL-style images are laid out per unit (:mod:`prefixshare.vision`)."""
    unknown = sorted(set(multimodal) - set(_MULTIMODAL))
    if unknown:
        raise ValueError(f"{name}: unknown multimodal inputs {unknown} (this TRL passes more than 1.16 did)")
    # mm_token_type_ids (1 at image tokens) are rebuilt from input_ids by the patched forward (prefixshare.vision)
    given = {k: v for k, v in multimodal.items() if v is not None and k != "mm_token_type_ids"}
    if not given:
        return None
    pixel_values, grids, num_images = (given.pop(k, None) for k in ("pixel_values", "image_grid_thw", "num_images"))
    if given or pixel_values is None or grids is None or num_images is None:
        keys = sorted(k for k, v in multimodal.items() if v is not None)
        raise ValueError(
            f"{name}: images given as {keys}; prefix-shared batches take the images of Qwen2-VL-style models only "
            "(pixel_values with image_grid_thw, one grid per image)"
        )
    num_images = [int(n) for n in num_images]
    if len(num_images) != rows or sum(num_images) != grids.shape[0]:
        raise ValueError(
            f"{name}: num_images {num_images} does not match {rows} rows and {grids.shape[0]} image grids"
        )
    patches = grids.prod(-1).tolist()
    out, image, patch = [], 0, 0
    for n in num_images:
        count = sum(patches[image : image + n])
        out.append(None if n == 0 else {"pixel_values": pixel_values[patch : patch + count],
                                        "image_grid_thw": grids[image : image + n]})  # fmt: skip
        image, patch = image + n, patch + count
    if patch != pixel_values.shape[0]:
        raise ValueError(f"{name}: pixel_values has {pixel_values.shape[0]} rows but the grids give {patch} patches")
    return out


def _check_config(name: str, args) -> None:
    """Raise ValueError for settings whose forward or loss these trainers do not reproduce."""

    def unsupported(what: str, why: str) -> ValueError:
        return ValueError(f"{name} does not support {what}: {why}")

    check_compile_and_parallelism(args, unsupported)


def _refuse_liger(name: str, args) -> None:
    """After TRL's ``__init__`` (TRL's own errors for the same configuration, e.g. a LoRA adapter on ``lm_head``,
    come first, as with plain TRL): Liger's layer kernels are not verified with prefix-shared attention."""
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            f"{name} does not support use_liger_kernel=True: Liger's layer kernels are not verified with "
            "prefix-shared attention"
        )


class _PrefixShareRL(PrefixSharePatching):
    """What the GRPO and RLOO drop-ins share: the checks, the patching and the overridden forward."""

    _base: type
    _config: type
    _suffix: str

    def __init__(self, *args, prefixshare_backend: str | None = None, prefixshare_max_tokens_per_row: int | None = None,
                 **kwargs):  # fmt: skip
        name = type(self).__name__
        bound = bind_trainer_arguments(self._base, self._config, self._suffix, self, args, kwargs)
        arguments = bound.arguments
        model, config = arguments.get("model"), arguments["args"]
        _check_config(name, config)
        if prefixshare_max_tokens_per_row is not None and (
            isinstance(prefixshare_max_tokens_per_row, bool)
            or not isinstance(prefixshare_max_tokens_per_row, int)
            or prefixshare_max_tokens_per_row < 1
        ):
            raise ValueError(
                f"prefixshare_max_tokens_per_row must be a positive integer or None, got {prefixshare_max_tokens_per_row!r}"
            )
        if is_prompt_learning(model, arguments.get("peft_config")):
            raise ValueError(
                f"{name} does not support prompt-learning PEFT methods (prefix/prompt tuning): their virtual tokens "
                "do not fit the prefix-shared layout; LoRA-style adapters are fine"
            )

        self._prefixshare_max_tokens_per_row = prefixshare_max_tokens_per_row
        # tokens the row format would process and the prefix-shared forwards did, rows with nothing to score, and
        # the images the row format would encode and the prefix-shared forwards did
        self._prefixshare_token_counts = {"rows": 0, "shared": 0, "empty_rows": 0, "row_images": 0, "shared_images": 0}
        self._prefixshare_prepare_patching(prefixshare_backend)

        super().__init__(*bound.args[1:], **bound.kwargs)

        _refuse_liger(name, self.args)
        if dataset_has_images(arguments.get("train_dataset")) or dataset_has_images(arguments.get("eval_dataset")):
            check_images_supported(self.model, name)  # before any step: the model must place images by 3D positions
        self._prefixshare_patch_trainer_models()  # after TRL's __init__: its checks come first
        # GRPO's entropy bonus (entropy_coef != 0 or use_adaptive_entropy) back-propagates through the per-token
        # entropies: the policy's forward then returns them with their graph. Read from the config too, so that
        # a TRL without the _entropy_bonus_enabled attribute still gets the gradient.
        self._prefixshare_entropy_grad = bool(
            getattr(self, "_entropy_bonus_enabled", False)
            or getattr(self.args, "entropy_coef", 0.0)
            or getattr(self.args, "use_adaptive_entropy", False)
        )

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
        """TRL's ``[prompt | completion]`` rows -> ``(logps [rows, C], entropies [rows, C] or None, aux_loss or None)``.

        ``input_ids`` and ``attention_mask`` are ``[rows, P + C]`` with ``C = logits_to_keep``: prompts
        left-padded, completions right-padded (zero mask rows for ``mask_truncated_completions``). The rows that
        share prompt tokens are scored as one unit each; values are TRL's (``softmax(logits / temperature)``),
        zeros where the mask is 0, as TRL returns them. ``aux_loss`` (``compute_aux_loss``: a MoE policy with
        ``router_aux_loss_coef != 0``): the load-balancing loss with TRL's count of tokens (each prompt token once
        per row that holds it, prompts of fully masked groups included), hence TRL's value.
        """
        images = _row_images(type(self).__name__, input_ids.shape[0], multimodal)
        if compute_aux_loss and batch_size is not None and batch_size < input_ids.shape[0]:
            # TRL averages one loss per chunk of batch_size rows, a value of which chunk each row is in
            raise ValueError(
                f"{type(self).__name__}: the Mixture-of-Experts load-balancing loss of a forward chunked into "
                f"{batch_size}-row pieces is not supported (TRL 1.16 computes it in one chunk)"
            )
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
            keep_empty_groups=compute_aux_loss,
            images=images,
        )
        counts = self._prefixshare_token_counts
        counts["rows"] += int(attention_mask.sum())
        counts["shared"] += groups.num_tokens
        counts["empty_rows"] += int((groups.completion_lengths == 0).sum())
        if images is not None:
            counts["row_images"] += sum(im["image_grid_thw"].shape[0] for im in images if im is not None)
            counts["shared_images"] += sum(len(b.get("image_grid_thw", ())) for b in groups.batches)
        self._prefixshare_ensure_patched(model)
        stats = ("entropy",) if compute_entropy else ()
        entropy_grad = compute_entropy and self._prefixshare_entropy_grad and torch.is_grad_enabled()
        router_capture = capture_router_logits(model) if compute_aux_loss else nullcontext()
        with self.accelerator.autocast(), router_capture as router:
            out = completion_logps(
                model, groups, stats=stats, temperature=self.temperature, entropy_grad=entropy_grad,
                model_kwargs={"output_router_logits": True} if compute_aux_loss else None,
            )  # fmt: skip
        aux_loss = None
        if compute_aux_loss:
            (batch,), (weights,) = groups.batches, groups.token_weights  # one forward (batch_size checked above)
            num_experts, top_k = moe_routing(model)
            aux_loss = load_balancing_loss(
                router.router_logits, batch[LAYOUT_KEY], num_experts=num_experts, top_k=top_k, token_weights=weights
            )
        return out.logps, (out.stats["entropy"] if compute_entropy else None), aux_loss


class PrefixShareGRPOTrainer(_PrefixShareRL, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the prompt of each group computed once; same arguments, plus
    ``prefixshare_backend`` and ``prefixshare_max_tokens_per_row`` (see the module docstring).

    Raises:
        ValueError: ``use_liger_kernel``, ``torch_compile``, prompt-learning PEFT, tensor/context/sequence
            parallelism; images of another form than Qwen2-VL's (``pixel_values`` with ``image_grid_thw``).
        prefixshare.UnsupportedModelError: an architecture :func:`prefixshare.patch` does not support, or a dataset
            with images for a model without Qwen2-VL-style 3D positions (:mod:`prefixshare.vision`).
    """

    _base = GRPOTrainer
    _config = GRPOConfig
    _suffix = "GRPO"


class PrefixShareRLOOTrainer(_PrefixShareRL, RLOOTrainer):
    """TRL's ``RLOOTrainer`` with the prompt of each group computed once; same arguments, plus
    ``prefixshare_backend`` and ``prefixshare_max_tokens_per_row`` (see the module docstring).

    Raises:
        ValueError: ``use_liger_kernel``, ``torch_compile``, prompt-learning PEFT, tensor/context/sequence
            parallelism; images of another form than Qwen2-VL's (``pixel_values`` with ``image_grid_thw``).
        prefixshare.UnsupportedModelError: an architecture :func:`prefixshare.patch` does not support, or a dataset
            with images for a model without Qwen2-VL-style 3D positions (:mod:`prefixshare.vision`).
    """

    _base = RLOOTrainer
    _config = RLOOConfig
    _suffix = "RLOO"
