"""Exactness helpers and tiny random models: what the tests, the compatibility matrix and users who want to
verify a model of their own use. Not needed for training.

* :func:`tiny_model` / :func:`tiny_config`: small random models of seven representative architectures, built
  from configs in code (no hub access), with weights large enough that a leak between responses shows.
* :func:`tiny_model_of` / :func:`tiny_config_of`: the same for any model type of the installed transformers,
  from its config class alone (the compatibility matrix's breadth section); :func:`causal_lm_model_types`.
* :func:`compare_with_alone`: log-probs and gradients of a prefix-shared batch through a patched model
  against each prompt+response run alone through the unpatched model.
* :mod:`prefixshare.testing.matrix` (imported on its own: ``from prefixshare.testing import matrix``): the
  compatibility matrix behind compat/run_matrix.py and compat/MATRIX.md.
"""

from .exactness import (
    Comparison,
    align_gradients,
    compare_with_alone,
    gradient_error,
    logps_alone,
    random_examples,
    relative_error,
)
from .tiny import (
    ARCHITECTURE_NAMES,
    TINY_SIZES,
    TINY_SLIDING_WINDOW,
    TinyModelTooLarge,
    causal_lm_model_types,
    tiny_config,
    tiny_config_of,
    tiny_model,
    tiny_model_of,
)

__all__ = [
    "ARCHITECTURE_NAMES",
    "TINY_SIZES",
    "TINY_SLIDING_WINDOW",
    "Comparison",
    "TinyModelTooLarge",
    "align_gradients",
    "causal_lm_model_types",
    "compare_with_alone",
    "gradient_error",
    "logps_alone",
    "random_examples",
    "relative_error",
    "tiny_config",
    "tiny_config_of",
    "tiny_model",
    "tiny_model_of",
]
