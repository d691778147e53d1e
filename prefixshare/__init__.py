"""prefixshare: prefix sharing for paired preference tuning of Hugging Face language models.

One prompt and its K responses become one sequence, ``[prompt | chosen | rejected]``, with an attention
rule that keeps the responses apart and positions that restart each response at the prompt's length, so
the prompt is computed once. See README.md.
"""

from .architectures import ARCHITECTURES, UnsupportedModelError
from .collators import LAYOUT_KEY, PairedCollator, PrefixShareBatch, PrefixShareCollator
from .engine import STATS, LogitProcessingMismatch, response_logps
from .layout import PrefixShareLayout
from .logps import ResponseLogps, TokenIndex, gather_response_logps, pad_per_token, split_logps
from .losses import LOSSES, REFERENCE_FREE, preference_loss
from .packing import first_fit_decreasing
from .patch import LayoutNotAppliedError, is_patched, patch, patched_backend, unpatch
from .selfcheck import SelfCheckError
from .rewards import RewardCollator, response_rewards
from .reference import WithReferenceLogps, precompute_reference_logps, reference_logps, with_reference_logps
from .sampler import TokenBudgetBatchSampler
from .tokenization import tokenize_preference
from .training import preference_step

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "UnsupportedModelError",
    "LayoutNotAppliedError",
    "SelfCheckError",
    "is_patched",
    "patch",
    "patched_backend",
    "unpatch",
    "LAYOUT_KEY",
    "LOSSES",
    "LogitProcessingMismatch",
    "REFERENCE_FREE",
    "STATS",
    "TokenBudgetBatchSampler",
    "WithReferenceLogps",
    "PairedCollator",
    "PrefixShareBatch",
    "PrefixShareCollator",
    "PrefixShareLayout",
    "ResponseLogps",
    "TokenIndex",
    "first_fit_decreasing",
    "gather_response_logps",
    "pad_per_token",
    "precompute_reference_logps",
    "preference_loss",
    "preference_step",
    "reference_logps",
    "response_logps",
    "response_rewards",
    "RewardCollator",
    "split_logps",
    "tokenize_preference",
    "with_reference_logps",
]
