from __future__ import annotations

import torch


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
