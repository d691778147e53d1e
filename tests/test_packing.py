"""first_fit_decreasing: a partition of the indices into bins that respect the capacity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixshare.packing import first_fit_decreasing

SETTINGS = settings(max_examples=200, deadline=None)


@st.composite
def items(draw):
    capacity = draw(st.integers(1, 50))
    lengths = draw(st.lists(st.integers(1, capacity), max_size=40))
    return lengths, capacity


@SETTINGS
@given(items())
def test_partition_under_capacity(case):
    lengths, capacity = case
    bins = first_fit_decreasing(lengths, capacity)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(b for b in bins)  # no empty bin
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(load <= capacity for load in loads)
    # first fit: a later bin was opened because its first item fitted in no earlier bin, so any two
    # bins together exceed the capacity (at most one bin is half empty)
    for i in range(len(loads)):
        for j in range(i + 1, len(loads)):
            assert loads[i] + loads[j] > capacity
    # decreasing: items go in longest first, so each bin lists non-increasing lengths
    for b in bins:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


@SETTINGS
@given(items())
def test_deterministic(case):
    lengths, capacity = case
    assert first_fit_decreasing(lengths, capacity) == first_fit_decreasing(list(lengths), capacity)


@SETTINGS
@given(items())
def test_bin_count_depends_only_on_the_lengths(case):
    # the sampler relies on this: a batch's row count does not depend on the order of its examples
    lengths, capacity = case
    reordered = list(reversed(lengths))
    assert len(first_fit_decreasing(lengths, capacity)) == len(first_fit_decreasing(reordered, capacity))


def test_known_packing():
    assert first_fit_decreasing([5, 5, 4, 3, 3], 10) == [[0, 1], [2, 3, 4]]
    assert first_fit_decreasing([2, 7, 2, 1], 9) == [[1, 0], [2, 3]]
    assert first_fit_decreasing([], 4) == []


def test_oversize_raises():
    with pytest.raises(ValueError, match="item 2"):
        first_fit_decreasing([1, 2, 11, 3], 10)


def test_bad_capacity_raises():
    with pytest.raises(ValueError, match="capacity"):
        first_fit_decreasing([1], 0)
