"""Deprecated: the memory-lean log-probs moved to :mod:`prefixshare.engine`.

``prefixshare.lm_head.response_logps`` is :func:`prefixshare.response_logps` (warns once per use). The
helpers that built ``[T, V]`` logits (``predictor_logits``, ``chunked_token_logps``, ``response_targets``)
are gone: the engine never builds them. Use :func:`prefixshare.response_logps` (``per_token=True`` for
per-token log-probs, ``stats=`` for entropy and friends).
"""

from __future__ import annotations

import warnings

from . import engine

_REMOVED = ("predictor_logits", "chunked_token_logps", "response_targets")


def response_logps(model, batch, **options):
    """Deprecated alias of :func:`prefixshare.response_logps`."""
    warnings.warn(
        "prefixshare.lm_head.response_logps is deprecated; use prefixshare.response_logps",
        DeprecationWarning,
        stacklevel=2,
    )
    return engine.response_logps(model, batch, **options)


def __getattr__(name):
    if name in _REMOVED:
        raise AttributeError(
            f"prefixshare.lm_head.{name} was removed: the log-prob engine never builds [T, V] logits; use "
            "prefixshare.response_logps(model, batch, per_token=True, stats=...) instead"
        )
    raise AttributeError(f"module 'prefixshare.lm_head' has no attribute {name!r}")
