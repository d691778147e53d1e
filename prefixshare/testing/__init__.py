"""Exactness helpers and tiny random models: what the tests, the compatibility matrix and users who want to
verify a model of their own use. Not needed for training.

* :func:`tiny_model` / :func:`tiny_config`: small random models of the verified architectures, built from
  configs in code (no hub access), with weights large enough that a leak between responses shows.
* :func:`compare_with_alone`: log-probs and gradients of a prefix-shared batch through a patched model
  against each prompt+response run alone through the unpatched model.
"""

from .exactness import Comparison, compare_with_alone, logps_alone, random_examples, relative_error
from .tiny import ARCHITECTURE_NAMES, TINY_SIZES, TINY_SLIDING_WINDOW, tiny_config, tiny_model

__all__ = [
    "ARCHITECTURE_NAMES",
    "TINY_SIZES",
    "TINY_SLIDING_WINDOW",
    "Comparison",
    "compare_with_alone",
    "logps_alone",
    "random_examples",
    "relative_error",
    "tiny_config",
    "tiny_model",
]
