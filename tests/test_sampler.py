"""TokenBudgetBatchSampler: every index once per epoch, batches that pack, deterministic and shardable."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from prefixshare.collators import PairedCollator, PrefixShareCollator
from prefixshare.packing import first_fit_decreasing
from prefixshare.sampler import TokenBudgetBatchSampler

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def lengths_strategy(draw):
    """(lengths, budget, rows): entries are ints or, paired-style, tuples of unit lengths."""
    budget = draw(st.integers(8, 40))
    rows = draw(st.integers(1, 4))
    multi = draw(st.booleans())
    n = draw(st.integers(0, 40))
    if multi:
        K = draw(st.integers(2, 3))
        # an example's K units must fit into `rows` rows on their own: keep each unit <= budget // K when rows
        # is small, so every example is valid
        top = budget if rows >= K else budget // K
        lengths = [tuple(draw(st.integers(1, top)) for _ in range(K)) for _ in range(n)]
    else:
        lengths = [draw(st.integers(1, budget)) for _ in range(n)]
    return lengths, budget, rows


def units_of(entry):
    return list(entry) if isinstance(entry, tuple) else [entry]


def packs(lengths, batch, budget, rows):
    return len(first_fit_decreasing([n for i in batch for n in units_of(lengths[i])], budget)) <= rows


@SETTINGS
@given(case=lengths_strategy(), seed=st.integers(0, 1000), epoch=st.integers(0, 5), shuffle=st.booleans())
def test_single_replica_epoch(case, seed, epoch, shuffle):
    lengths, budget, rows = case
    sampler = TokenBudgetBatchSampler(lengths, budget, rows_per_batch=rows, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    if not shuffle:
        assert flat == list(range(len(lengths)))
    for b in batches:
        assert b and all(isinstance(i, int) for i in b)
        assert packs(lengths, b, budget, rows)
    # greedy: a batch was closed because the next index no longer packed with it
    for b, following in zip(batches, batches[1:]):
        assert not packs(lengths, b + following[:1], budget, rows)
    # deterministic
    again = TokenBudgetBatchSampler(lengths, budget, rows_per_batch=rows, shuffle=shuffle, seed=seed)
    again.set_epoch(epoch)
    assert list(again) == batches
    assert list(sampler) == batches


@SETTINGS
@given(case=lengths_strategy(), seed=st.integers(0, 1000), replicas=st.sampled_from([2, 3]), drop_last=st.booleans())
def test_sharded(case, seed, replicas, drop_last):
    lengths, budget, rows = case
    n = len(lengths)
    kwargs = dict(rows_per_batch=rows, seed=seed, num_replicas=replicas, drop_last=drop_last)
    plan = TokenBudgetBatchSampler(lengths, budget, rows_per_batch=rows, seed=seed).global_batches()
    needed = math.ceil(len(plan) / replicas) * replicas
    if not drop_last and n < needed:
        # no plan gives every rank the same number of batches without repeating or dropping data
        with pytest.raises(ValueError, match="drop_last=True"):
            TokenBudgetBatchSampler(lengths, budget, rank=0, **kwargs)
        return
    per_rank = []
    for rank in range(replicas):
        sampler = TokenBudgetBatchSampler(lengths, budget, rank=rank, **kwargs)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for b in batches:
            assert b and packs(lengths, b, budget, rows)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen))  # disjoint
    if drop_last:
        kept = plan[: len(plan) - len(plan) % replicas]
        assert sorted(seen) == sorted(i for b in kept for i in b)  # only the incomplete last round is dropped
        assert per_rank == [kept[r::replicas] for r in range(replicas)]
    else:
        assert sorted(seen) == list(range(n))  # nothing dropped


def test_epochs_and_seeds_differ():
    lengths = [(i * 7) % 13 + 1 for i in range(60)]
    sampler = TokenBudgetBatchSampler(lengths, 16, rows_per_batch=2, seed=3)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0  # same epoch, same batches
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    assert sorted(i for b in epoch1 for i in b) == list(range(60))
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    assert list(TokenBudgetBatchSampler(lengths, 16, rows_per_batch=2, seed=4)) != epoch0


def test_len_follows_the_epoch():
    lengths = [(i * 11) % 17 + 1 for i in range(200)]
    sampler = TokenBudgetBatchSampler(lengths, 20, rows_per_batch=3, num_replicas=3, rank=2)
    for epoch in range(6):
        sampler.set_epoch(epoch)
        assert len(sampler) == len(list(sampler))


def test_oversize_unit_names_the_index():
    with pytest.raises(ValueError, match="dataset index 2\\b.*max_tokens_per_row=50"):
        TokenBudgetBatchSampler([3, 5, 51, 7], 50)
    with pytest.raises(ValueError, match="dataset index 1\\b"):
        TokenBudgetBatchSampler([(3, 4), (5, 60)], 50, rows_per_batch=2)


def test_example_needing_too_many_rows_names_the_index():
    with pytest.raises(ValueError, match="dataset index 1\\b.*rows_per_batch=1"):
        TokenBudgetBatchSampler([(10, 10), (30, 30)], 50, rows_per_batch=1)
    TokenBudgetBatchSampler([(10, 10), (30, 30)], 50, rows_per_batch=2)


@pytest.mark.parametrize("bad", [0, -3, 1.5, "7", (), None, True])
def test_bad_lengths_name_the_index(bad):
    with pytest.raises(ValueError, match="dataset index 1\\b"):
        TokenBudgetBatchSampler([4, bad], 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens_per_row=0), "max_tokens_per_row"),
        (dict(rows_per_batch=0), "rows_per_batch"),
        (dict(num_replicas=2, rank=2), "rank"),
        (dict(num_replicas=0, rank=0), "num_replicas"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"max_tokens_per_row": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        TokenBudgetBatchSampler([1, 2, 3], **kwargs)


def test_unbalanceable_epoch_raises_unless_drop_last():
    # five examples that each fill a row alone: five batches cannot be split evenly over two ranks
    lengths = [9] * 5
    with pytest.raises(ValueError, match="drop_last=True"):
        TokenBudgetBatchSampler(lengths, 10, num_replicas=2, rank=0)
    ranks = [list(TokenBudgetBatchSampler(lengths, 10, num_replicas=2, rank=r, drop_last=True)) for r in range(2)]
    assert [len(b) for b in ranks] == [2, 2]


def test_numpy_and_tensor_lengths():
    np = pytest.importorskip("numpy")
    a = list(TokenBudgetBatchSampler(np.array([3, 4, 5, 6]), 10, seed=1))
    b = list(TokenBudgetBatchSampler(torch.tensor([3, 4, 5, 6]), 10, seed=1))
    c = list(TokenBudgetBatchSampler([3, 4, 5, 6], 10, seed=1))
    assert a == b == c


# ---------------------------------------------------------------------------------------------- with collators
def make_dataset(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        p, c, r = (int(x) for x in torch.randint(1, 12, (3,), generator=g))
        data.append(
            {
                "prompt_input_ids": [1000 + i] + [5] * (p - 1),  # the first token names the example
                "chosen_input_ids": [6] * c,
                "rejected_input_ids": torch.full((r,), 7),
            }
        )
    return data


def test_dataloader_with_prefix_share_collator():
    dataset = make_dataset(50)
    budget, rows = 48, 3
    collator = PrefixShareCollator(pad_token_id=0, max_tokens_per_row=budget)
    sampler = TokenBudgetBatchSampler.from_dataset(dataset, collator, rows_per_batch=rows, seed=7)
    assert sampler.units == [
        (len(e["prompt_input_ids"]) + len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]),) for e in dataset
    ]
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        steps = 0
        for batch in loader:
            steps += 1
            B, L = batch["input_ids"].shape
            assert B <= rows and L <= budget  # the rows the sampler planned
            for pl in batch.layout.placements:
                seen.append(int(batch["input_ids"][pl.row, pl.offset]) - 1000)
        assert steps == len(loader) == len(sampler)
        assert sorted(seen) == list(range(len(dataset)))


def test_from_dataset_with_paired_collator_keeps_units_together():
    dataset = make_dataset(30, seed=1)
    collator = PairedCollator(pad_token_id=0, max_tokens_per_row=24)
    sampler = TokenBudgetBatchSampler.from_dataset(dataset, collator, rows_per_batch=4)
    p = [len(e["prompt_input_ids"]) for e in dataset]
    assert sampler.units == [
        (p[i] + len(e["chosen_input_ids"]), p[i] + len(e["rejected_input_ids"])) for i, e in enumerate(dataset)
    ]
    for indices in sampler:
        batch = collator([dataset[i] for i in indices])
        assert batch["input_ids"].shape[0] <= 4 and batch["input_ids"].shape[1] <= 24


def test_from_dataset_errors_name_the_dataset_index():
    dataset = make_dataset(5)
    dataset[3] = {"prompt_input_ids": [], "chosen_input_ids": [1], "rejected_input_ids": [2]}
    collator = PrefixShareCollator(pad_token_id=0, max_tokens_per_row=64)
    with pytest.raises(ValueError, match="dataset index 3: the prompt is empty"):
        TokenBudgetBatchSampler.from_dataset(dataset, collator)
    long = make_dataset(5)
    long[4] = {"prompt_input_ids": [1] * 60, "chosen_input_ids": [1] * 3, "rejected_input_ids": [2] * 3}
    with pytest.raises(ValueError, match="dataset index 4\\b.*max_tokens_per_row=64"):
        TokenBudgetBatchSampler.from_dataset(long, collator)


def test_from_dataset_budget_must_match_the_collator():
    dataset = make_dataset(5)
    with pytest.raises(ValueError, match="differs"):
        TokenBudgetBatchSampler.from_dataset(dataset, PrefixShareCollator(pad_token_id=0, max_tokens_per_row=64), 32)
    with pytest.raises(ValueError, match="max_tokens_per_row"):
        TokenBudgetBatchSampler.from_dataset(dataset, PrefixShareCollator(pad_token_id=0))
    sampler = TokenBudgetBatchSampler.from_dataset(dataset, PrefixShareCollator(pad_token_id=0), 64)
    assert sampler.max_tokens_per_row == 64
