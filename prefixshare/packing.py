"""Bin packing of units into rows of a token budget (first-fit-decreasing, as in multipack samplers)."""

from __future__ import annotations

from typing import Sequence


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into as few bins of ``capacity`` tokens as first-fit-decreasing finds.

    Items are taken longest first (ties by index, so the result is deterministic) and each goes into the
    first bin with room. Returns the bins in the order they were opened, each listing its items in the
    order they were placed. Every index appears exactly once.

    Raises:
        ValueError: an item is longer than ``capacity`` (callers check first, to name the example).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} of length {n} exceeds the capacity {capacity}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins
