from __future__ import annotations

import torch

from ..masks import reaches


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, H_kv, L, D] -> [B, H_kv * n_rep, L, D]``, each key/value head repeated for its query group."""
    if n_rep == 1:
        return hidden
    B, H_kv, L, D = hidden.shape
    return hidden[:, :, None].expand(B, H_kv, n_rep, L, D).reshape(B, H_kv * n_rep, L, D)


def check_shapes(query: torch.Tensor, key: torch.Tensor) -> int:
    """Return the grouped-query factor; reject a cache (a prefix-shared forward is one full pass)."""
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"prefixshare: query length {query.shape[2]} != key length {key.shape[2]}; a prefix-shared forward "
            "takes the whole batch at once without a KV cache (pass use_cache=False, as the collators do)"
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads")
    return query.shape[1] // key.shape[1]


def isolate_nonfinite(key: torch.Tensor, value: torch.Tensor, layout, sliding_window: int | None):
    """Keys and values a query cannot see must contribute exactly nothing to it, even when they are inf or NaN.

    A mask alone does not achieve that. A masked probability is exactly 0, but 0 times an inf/NaN value is NaN;
    an inf/NaN key gives an inf/NaN score, which an additive mask (eager, sdpa) leaves inf/NaN, and the whole
    softmax row becomes NaN. So one response's fp16 overflow (or a NaN embedding of the pad id) would poison
    every other response, unit and padding token of its row, although each runs finite alone.

    Returns ``(key, value, reached)``: ``key`` and ``value`` with zeros for the key and value vectors (of one
    token and key/value head) of which either holds a non-finite entry, unchanged elsewhere (a clean batch
    computes bitwise what it computed before), and ``reached`` ``[B, L, H_kv]`` bool, True where the query (of
    that key/value head's query group) may attend to such a key. The caller makes those queries' outputs NaN
    (:func:`mark_reached`): with the key zeroed their outputs would be finite and wrong, and alone a query that
    sees a NaN key or a non-finite value always gets a non-finite output (its score is NaN, or some
    probability, zero or not, multiplies the non-finite value). The one case alone can stay finite, an
    infinite key whose scores come out exactly -inf for every query that sees it, is made NaN here: loud,
    never a silent number.

    ``reached`` comes from :func:`prefixshare.masks.reaches`: the layout's rule (sliding window included)
    without an ``[L, L]`` tensor and without a device-to-host copy, so the whole costs a few elementwise passes
    over the keys and values per layer (and a sequence table per batch). Whole vectors are zeroed, not just
    their non-finite entries: every query that sees one is NaN anyway, and ``masked_fill`` with the per-vector
    mask keeps only that small mask for the backward (``nan_to_num`` would keep another copy of the keys and
    values); the gradient reaching a zeroed vector is zero, as the gradient of a constant is.
    """
    with torch.no_grad():
        # x * 0 is 0 where x is finite and NaN where it is not, and a sum of zeros cannot overflow (cheaper than
        # isfinite(x).all(-1), four passes on CPU)
        bad = (key.mul(0).sum(-1) + value.mul(0).sum(-1)).isnan()  # [B, H_kv, L]
    dropped = bad[..., None]
    key, value = key.masked_fill(dropped, 0.0), value.masked_fill(dropped, 0.0)
    return key, value, reaches(layout, bad.transpose(1, 2), sliding_window)


def reached_heads(reached: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, L, H_kv]`` -> ``[B, L, H]``: query head ``h`` belongs to key/value head ``h // (H / H_kv)``, as
    :func:`repeat_kv` and the kernels' grouped-query heads have it."""
    B, L, H_kv = reached.shape
    return reached[..., None].expand(B, L, H_kv, num_heads // H_kv).reshape(B, L, num_heads)


def mark_reached(out: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
    """``out`` ``[B, L, H, D_v]`` with NaN wherever :func:`isolate_nonfinite`'s ``reached`` is True."""
    return out.masked_fill(reached_heads(reached, out.shape[2])[..., None], float("nan"))
