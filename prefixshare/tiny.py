"""Deprecated location: the tiny models moved to :mod:`prefixshare.testing` (``prefixshare.testing.tiny_model``)."""

import warnings

from .testing.tiny import *  # noqa: F401,F403
from .testing.tiny import ARCHITECTURE_NAMES, TINY_SLIDING_WINDOW, tiny_config, tiny_model  # noqa: F401

warnings.warn(
    "prefixshare.tiny is deprecated; import tiny_model and tiny_config from prefixshare.testing",
    DeprecationWarning,
    stacklevel=2,
)
