"""``PrefixShareRewardTrainer``: TRL's ``RewardTrainer`` with prefix sharing, a one-line change.

::

    from trl import RewardConfig
    from prefixshare.integrations.trl import PrefixShareRewardTrainer   # instead of: from trl import RewardTrainer

    trainer = PrefixShareRewardTrainer(model=model, args=RewardConfig(...), train_dataset=dataset, processing_class=tok)
    trainer.train()

Same ``RewardConfig``, same datasets (implicit or explicit prompt, standard or conversational, pre-tokenized
``chosen_ids``/``rejected_ids``, a ``margin`` column), same tokenization (TRL's ``_prepare_dataset`` runs unchanged),
same metrics (``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``, ``num_tokens``) and the same
loss (Bradley-Terry, with the margin and ``center_rewards_coefficient``). Inside, each pair is one
``[prompt | chosen | rejected]`` sequence instead of two rows, the shared prompt found as the common start of the
two tokenized sequences (:class:`prefixshare.rewards.RewardCollator`), and each response's reward is the model's
score at its own last token (:func:`prefixshare.rewards.response_rewards`).

What is overridden (TRL 1.x, verified with 1.16): the data collator (:class:`PrefixShareRewardCollator`, built after
``RewardTrainer.__init__`` with the pad token TRL chose) and ``compute_loss``. Model loading (``num_labels=1``), PEFT
(LoRA, with the score head trained through ``modules_to_save``), ``chat_template_path``, ``eos_token``, evaluation,
``compute_metrics`` (given the same rewards, ``[2n, 1]``: chosen rows then rejected rows) and saving are TRL's code.

Extra keyword arguments: ``prefixshare_backend`` and ``prefixshare_max_tokens_per_row``, as for
:class:`~prefixshare.integrations.trl.PrefixShareDPOTrainer`. Streaming datasets work (accelerate's batch
dispatching is turned off, as TRL does for streaming training sets; an explicit ``dispatch_batches=True`` raises).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..layout import LAYOUT_KEY
from ..losses import bradley_terry_loss
from ..rewards import POSITIONS_KEY, RewardCollator, response_rewards
from .trl_common import (
    PAIRED_TOKENS_KEY,
    PrefixSharePatching,
    bind_trainer_arguments,
    check_shared_trainer_options,
    is_prompt_learning,
    paired_tokens_per_row,
)
from trl import RewardConfig, RewardTrainer  # after .trl_common: it says how to install TRL

__all__ = ["PrefixShareRewardCollator", "PrefixShareRewardTrainer"]

for _name in ("compute_loss", "_prepare_dataset"):
    if not callable(getattr(RewardTrainer, _name, None)):  # pragma: no cover - depends on the TRL version
        raise ImportError(
            f"prefixshare.integrations.trl_reward needs TRL 1.x's RewardTrainer.{_name} (verified with trl 1.16)"
        )



class PrefixShareRewardCollator(RewardCollator):
    """TRL's tokenized reward examples (``chosen_ids``, ``rejected_ids``, optional ``margin``) -> a prefix-shared
    batch: :class:`prefixshare.rewards.RewardCollator` plus the per-row count of tokens TRL's paired rows hold (its
    ``num_tokens`` metric), so that the metric means the same with either trainer."""

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, Any]:
        batch = super().__call__(examples)
        batch[PAIRED_TOKENS_KEY] = paired_tokens_per_row(batch[LAYOUT_KEY])
        return batch


def _check_config(args: RewardConfig) -> None:
    def unsupported(what: str, hint: str) -> ValueError:
        return ValueError(f"PrefixShareRewardTrainer does not support {what}; {hint}")

    check_shared_trainer_options(args, unsupported, "trl.RewardTrainer")
    if getattr(args, "use_liger_kernel", False):
        raise unsupported("use_liger_kernel=True", "Liger's kernels are not verified with prefix-shared batches")

class PrefixShareRewardTrainer(PrefixSharePatching, RewardTrainer):
    """TRL's ``RewardTrainer`` with prefix sharing: same arguments, plus ``prefixshare_backend`` and
    ``prefixshare_max_tokens_per_row`` (see the module docstring).

    Raises:
        ValueError: an option prefix sharing does not cover (a data collator of another kind, prompt-learning PEFT,
            ``accelerator_config.dispatch_batches=True``, ``use_liger_kernel``, ``torch_compile``,
            ``include_for_metrics=['inputs']``, tensor/context/sequence parallelism); a model without a ``score``
            head (from :func:`prefixshare.rewards.response_rewards`); an example with a sequence of fewer than 2
            tokens (from the collator).
        prefixshare.UnsupportedModelError: an architecture :func:`prefixshare.patch` does not support.
    """

    def __init__(
        self,
        *args,
        prefixshare_backend: str | None = None,
        prefixshare_max_tokens_per_row: int | None = None,
        **kwargs,
    ):
        bound = bind_trainer_arguments(RewardTrainer, RewardConfig, "Reward", self, args, kwargs)
        arguments = bound.arguments
        model, config = arguments.get("model"), arguments["args"]
        _check_config(config)
        # as PrefixShareDPOTrainer: each process collates its own batches (training and evaluation sets alike)
        config.accelerator_config.dispatch_batches = False
        collator = arguments.get("data_collator")
        if collator is not None and not isinstance(collator, RewardCollator):
            raise ValueError(
                f"PrefixShareRewardTrainer needs its own collator (PrefixShareRewardCollator), got "
                f"{type(collator).__name__}; leave data_collator unset"
            )
        if collator is not None and prefixshare_max_tokens_per_row is not None:
            raise ValueError("give prefixshare_max_tokens_per_row to the PrefixShareRewardCollator you pass, not both")
        if is_prompt_learning(model, arguments.get("peft_config")):
            raise ValueError(
                "PrefixShareRewardTrainer does not support prompt-learning PEFT methods (prefix/prompt tuning): their "
                "virtual tokens do not fit the prefix-shared layout; LoRA-style adapters are fine"
            )
        self._prefixshare_prepare_patching(prefixshare_backend)

        super().__init__(*bound.args[1:], **bound.kwargs)

        if collator is None:
            # RewardTrainer chose the pad token (args.pad_token, the tokenizer's, or its EOS) and wrote it into the
            # model's config, whose pooling skips it: the collator reads each reward at the same token.
            self.data_collator = PrefixShareRewardCollator(
                pad_token_id=self.processing_class.pad_token_id,
                pad_to_multiple_of=self.args.pad_to_multiple_of,
                max_tokens_per_row=prefixshare_max_tokens_per_row,
            )
        # after RewardTrainer.__init__: its checks (num_labels=1, the pad token) come first, and the model's config
        # has the pad token id the self-check's model and the collator read
        self._prefixshare_patch_trainer_models()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """RewardTrainer's loss and metrics on the rewards of the prefix-shared forward."""
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        mode = "train" if self.model.training else "eval"
        self._prefixshare_ensure_patched(model)
        rewards = response_rewards(model, inputs, positions=inputs.get(POSITIONS_KEY))[..., 0]  # [n, 2], num_labels 1
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        loss, _ = bradley_terry_loss(
            chosen,
            rejected,
            margin=inputs.get("margin"),
            center_rewards_coefficient=self.args.center_rewards_coefficient,
            check_finite=False,  # nan/inf rewards give nan metrics and training goes on, as in trl.RewardTrainer
        )

        metrics = self._metrics[mode]
        if mode == "train":
            paired = self.accelerator.gather_for_metrics(inputs[PAIRED_TOKENS_KEY].sum().to(self.accelerator.device))
            self._total_train_tokens += paired.sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        # TRL's order: the [2n, 1] model output, chosen rows then rejected rows
        logits = torch.cat([chosen, rejected]).unsqueeze(-1)
        with torch.no_grad():
            all_rewards = self.accelerator.gather(logits)
            metrics["min_reward"].append(all_rewards.min().item())
            metrics["mean_reward"].append(all_rewards.mean().item())
            metrics["max_reward"].append(all_rewards.max().item())
            accuracy = (chosen > rejected).float().mean()
            metrics["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
            margin = (chosen - rejected).mean()
            metrics["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
        if return_outputs:
            return loss, SequenceClassifierOutputWithPast(logits=logits)
        return loss
