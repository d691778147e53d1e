"""prefixshare: prefix sharing for paired preference tuning of Hugging Face language models.

One prompt and its K responses become one sequence, ``[prompt | chosen | rejected]``, with an attention
rule that keeps the responses apart and positions that restart each response at the prompt's length, so
the prompt is computed once. See README.md.
"""

from .architectures import UnsupportedModelError
from .collators import PairedCollator, PrefixShareBatch, PrefixShareCollator
from .engine import LogitProcessingMismatch, response_logps
from .groups import CompletionGroups, CompletionLogps, completion_logps, group_completions
from .layout import PrefixShareLayout
from .logps import ResponseLogps, gather_response_logps, pad_per_token, split_logps
from .losses import preference_loss
from .patch import LayoutNotAppliedError, is_patched, patch, patched_backend, unpatch
from .rewards import RewardCollator, response_rewards
from .sampler import TokenBudgetBatchSampler
from .selfcheck import SelfCheckError
from .tokenization import tokenize_preference
from .training import preference_step

__version__ = "0.1.0"

__all__ = [
    # make a model accept prefix-shared batches
    "patch",
    "unpatch",
    "is_patched",
    "patched_backend",
    # batches
    "PrefixShareCollator",
    "PairedCollator",
    "PrefixShareBatch",
    "PrefixShareLayout",
    "TokenBudgetBatchSampler",
    "tokenize_preference",
    # log-probs
    "response_logps",
    "ResponseLogps",
    "pad_per_token",
    "split_logps",
    "gather_response_logps",
    # online RL: prompts with groups of completions
    "group_completions",
    "completion_logps",
    "CompletionGroups",
    "CompletionLogps",
    # losses and training
    "preference_loss",
    "preference_step",
    # reward models
    "RewardCollator",
    "response_rewards",
    # errors
    "UnsupportedModelError",
    "LayoutNotAppliedError",
    "SelfCheckError",
    "LogitProcessingMismatch",
]

# names that were exported here before; they live on in their modules
_MOVED = {
    "ARCHITECTURES": "prefixshare.architectures",
    "LAYOUT_KEY": "prefixshare.layout",
    "LOSSES": "prefixshare.losses",
    "REFERENCE_FREE": "prefixshare.losses",
    "STATS": "prefixshare.engine",
    "TokenIndex": "prefixshare.logps",
    "first_fit_decreasing": "prefixshare.packing",
    "WithReferenceLogps": "prefixshare.reference",
    "precompute_reference_logps": "prefixshare.reference",
    "reference_logps": "prefixshare.reference",
    "with_reference_logps": "prefixshare.reference",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        module = _MOVED[name]
        warnings.warn(
            f"prefixshare.{name} is deprecated; import it from {module}", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'prefixshare' has no attribute {name!r}")
