"""Non-finite isolation: an inf/NaN in one response, unit or padding token never reaches another.

This part: the reach (:func:`prefixshare.masks.reaches`: which queries may see a marked key, from the varlen table,
no ``[L, L]`` tensor) equals the dense predicate's. Fails on de1f78d (no such function).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefixshare as ps
from prefixshare.masks import dense_bool_mask
from prefixshare.testing import random_examples


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    K=st.integers(1, 3),
    budget=st.one_of(st.none(), st.integers(40, 90)),
    window=st.one_of(st.none(), st.integers(1, 9)),
    paired=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_reach_equals_the_predicate(n, K, budget, window, paired, seed):
    """masks.reaches (prefix sums over the varlen key ranges) marks exactly the queries whose dense predicate row
    holds a marked key, per key/value head, padding included."""
    from prefixshare.masks import reaches

    examples = random_examples(n, 50, seed=seed, num_responses=K, prompt_lengths=(1, 12), response_lengths=(1, 9))
    layout = (ps.PairedCollator if paired else ps.PrefixShareCollator)(0, max_tokens_per_row=budget)(examples).layout
    B, L = layout.shape
    marked = torch.rand(B, L, 2, generator=torch.Generator().manual_seed(seed)) < 0.08
    allowed = dense_bool_mask(layout, window)[:, 0]
    assert torch.equal(reaches(layout, marked, window), (allowed[..., None] & marked[:, None]).any(2))
