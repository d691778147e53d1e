"""The precision a forward actually computes in: the parameters' dtype, or the autocast dtype in force.

Mixed precision as accelerate and the HF Trainer set it (TRL's configs default to ``bf16=True``) keeps float32
parameters and runs the forward under ``torch.autocast``: matrix products then round to bfloat16 or float16.
Anything that derives a tolerance or a dtype from the parameters alone is wrong there; these helpers read the
autocast state of the device a tensor lives on. accelerate enables autocast inside the model's own ``forward``
(it wraps the bound method), so the state must be read from inside a forward (a module hook), not around it.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device``'s type right now, or None where autocast is off."""
    device_type = torch.device(device).type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know (meta)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def coarsest(dtypes) -> torch.dtype:
    """The floating dtype of the largest machine epsilon among ``dtypes`` (None entries ignored)."""
    found = [d for d in dtypes if d is not None and d.is_floating_point]
    if not found:
        return torch.float32
    return max(found, key=lambda d: torch.finfo(d).eps)


@contextlib.contextmanager
def autocast_as(device: torch.device | str, dtype: torch.dtype | None):
    """Run the block under the autocast state ``(device, dtype)`` recorded inside a forward: autocast in ``dtype``
    on ``device``'s type, or autocast off there when ``dtype`` is None (as the forward had it)."""
    device_type = torch.device(device).type
    if dtype is None and autocast_dtype(device) is None:
        yield  # nothing to change (and nothing to enter for a device type autocast does not support)
        return
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        yield
