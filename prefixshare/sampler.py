"""A token-budget batch sampler: batches sized so their units pack into a fixed number of rows.

The collators pack the units of one batch first-fit-decreasing into rows of ``max_tokens_per_row`` tokens.
With a fixed number of examples per batch the number of rows (and so the memory) swings with the lengths;
:class:`TokenBudgetBatchSampler` instead chooses each batch's examples so that its units pack into at most
``rows_per_batch`` rows, multipack-style, which keeps every step's activation memory bounded::

    collator = PrefixShareCollator(pad_token_id=0, max_tokens_per_row=4096)
    sampler = TokenBudgetBatchSampler.from_dataset(dataset, collator, rows_per_batch=4)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:  # batch["input_ids"].shape[0] <= 4, each row <= 4096 tokens
            ...

The sampler checks packing with the same :func:`~prefixshare.packing.first_fit_decreasing` the collators
use, and the number of bins it finds depends only on the multiset of lengths, so the collator builds
exactly the rows the sampler planned (as long as both use the same ``max_tokens_per_row``).
"""

from __future__ import annotations

import bisect
import operator
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .packing import first_fit_decreasing


def _as_units(entry: Any, index: int, max_tokens_per_row: int) -> tuple[int, ...]:
    """One ``lengths`` entry (an int, or a sequence of ints for several units) -> a tuple of unit lengths."""
    if isinstance(entry, torch.Tensor):
        entry = entry.tolist()
    if isinstance(entry, (list, tuple)):
        values = list(entry)
        if not values:
            raise ValueError(f"dataset index {index}: its list of unit lengths is empty")
    else:
        values = [entry]
    units = []
    for value in values:
        # operator.index accepts Python and numpy integers but not floats or bools-as-lengths
        if isinstance(value, bool):
            raise ValueError(f"dataset index {index}: unit length {value!r} is not an integer")
        try:
            n = operator.index(value)
        except TypeError:
            raise ValueError(f"dataset index {index}: unit length {value!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"dataset index {index}: unit length {n} must be >= 1")
        if n > max_tokens_per_row:
            raise ValueError(
                f"dataset index {index}: a unit of {n} tokens is longer than max_tokens_per_row={max_tokens_per_row}; "
                "raise the budget, filter the example out, or truncate it (max_length with truncation)"
            )
        units.append(n)
    return tuple(units)


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batch sampler whose every batch packs into ``rows_per_batch`` rows of ``max_tokens_per_row`` tokens.

    Use it as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)``; it yields lists of
    dataset indices (``list[int]``), every index exactly once per epoch (over all ranks together).

    Each epoch the indices are shuffled with a generator seeded by ``seed + epoch`` (call
    :meth:`set_epoch` before each epoch, as with ``DistributedSampler``), then cut greedily into batches:
    each batch takes as many of the next indices as still pack first-fit-decreasing into at most
    ``rows_per_batch`` rows (the longest such prefix, found by bisection; a batch is closed when adding
    the next index no longer packs). The plan depends only on ``(lengths, seed, epoch)`` and the other
    arguments, so every rank computes the same global plan without communicating.

    Sharding (``num_replicas`` R > 1): the global batches are dealt round-robin, rank r taking batches
    r, r + R, r + 2R, ... Every rank must take the same number of steps (collectives would hang
    otherwise), so when the number of batches N is not a multiple of R:

    * ``drop_last=True``: the last ``N % R`` batches (the incomplete round) are dropped for this epoch;
      their examples are not seen in this epoch (a different shuffle is used next epoch).
    * ``drop_last=False`` (default): nothing is dropped and nothing is repeated; instead the batches with
      the most examples are split in two (each half still packs; checked) until N is a multiple of R.
      When there are fewer examples than the ``ceil(N / R) * R`` batches this needs (e.g. almost every
      example fills a batch alone, with an odd count on 2 ranks), no such plan exists and ValueError is
      raised (at construction for epoch 0, else when the epoch is planned): use ``drop_last=True``.

    ``drop_last`` has no effect with a single replica. The number of batches depends on the shuffle, so
    ``len(sampler)`` can differ slightly between epochs; it always matches what iterating yields for the
    current epoch (and is the same on every rank).

    Args:
        lengths: one entry per dataset index: the unit length (``int``) for collators with one unit per
            example (:class:`~prefixshare.PrefixShareCollator`: prompt + all responses), or a sequence
            of unit lengths for collators with several (:class:`~prefixshare.PairedCollator`: one
            prompt + response sequence per response); all units of an example go into the same batch.
            See :meth:`from_dataset`.
        max_tokens_per_row: row budget in tokens; must equal the collator's ``max_tokens_per_row``.
        rows_per_batch: the most rows a batch may pack into.
        shuffle: shuffle the indices each epoch (otherwise take them in dataset order).
        seed: base seed of the shuffle; must be the same on every rank.
        num_replicas, rank: sharding; default to the initialized ``torch.distributed`` world, else 1 and 0.
        drop_last: see Sharding above.

    Raises:
        ValueError: a unit longer than ``max_tokens_per_row``, an example whose units need more than
            ``rows_per_batch`` rows, a non-positive or non-integer length (each naming the dataset
            index), bad arguments, or an epoch that cannot be balanced across replicas with
            ``drop_last=False`` (see Sharding).
    """

    def __init__(
        self,
        lengths: Sequence[int | Sequence[int]],
        max_tokens_per_row: int,
        rows_per_batch: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ):
        for name, value in (("max_tokens_per_row", max_tokens_per_row), ("rows_per_batch", rows_per_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            initialized = dist.is_available() and dist.is_initialized()
            if num_replicas is None:
                num_replicas = dist.get_world_size() if initialized else 1
            if rank is None:
                rank = dist.get_rank() if initialized else 0
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")

        self.units: list[tuple[int, ...]] = [
            _as_units(entry, i, max_tokens_per_row) for i, entry in enumerate(lengths)
        ]
        self.max_tokens_per_row = max_tokens_per_row
        self.rows_per_batch = rows_per_batch
        # an example with several units (paired format) might not fit the row count on its own
        for i, units in enumerate(self.units):
            if len(units) > 1 and not self._packs(list(units)):
                rows = len(first_fit_decreasing(list(units), max_tokens_per_row))
                raise ValueError(
                    f"dataset index {i}: its units {list(units)} need {rows} rows of {max_tokens_per_row} tokens, "
                    f"more than rows_per_batch={rows_per_batch}"
                )
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self._totals = [sum(u) for u in self.units]
        self._cache: tuple[int, list[list[int]]] | None = None
        # plan epoch 0 now, so an impossible sharding (see _balance) fails here rather than mid-training
        self.global_batches()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dataset(
        cls,
        dataset: Sequence[Any],
        collator,
        max_tokens_per_row: int | None = None,
        **kwargs,
    ) -> "TokenBudgetBatchSampler":
        """Build the sampler from a map-style dataset and the collator that will collate its batches.

        Calls ``collator.unit_lengths([dataset[i]])`` for every index, so the lengths include the
        collator's validation and truncation (``max_length``), and a PairedCollator's K units per example
        stay together. ``max_tokens_per_row`` defaults to the collator's; giving a different one raises,
        because the collator would then pack the batch into other rows than the sampler planned.
        Errors from the collator are re-raised naming the dataset index. Other keyword arguments go to
        the constructor.
        """
        own = getattr(collator, "max_tokens_per_row", None)
        if max_tokens_per_row is None:
            if own is None:
                raise ValueError("give max_tokens_per_row (the collator has none)")
            max_tokens_per_row = own
        elif own is not None and own != max_tokens_per_row:
            raise ValueError(
                f"max_tokens_per_row={max_tokens_per_row} differs from the collator's {own}; "
                "the collator would pack batches into other rows than the sampler planned"
            )
        lengths: list[int | tuple[int, ...]] = []
        for i in range(len(dataset)):
            try:
                units = collator.unit_lengths([dataset[i]])
            except ValueError as err:
                # the collator saw a one-example list, so its message says "example 0"
                message = str(err).removeprefix("example 0: ")
                raise ValueError(f"dataset index {i}: {message}") from err
            lengths.append(units[0] if len(units) == 1 else tuple(units))
        return cls(lengths, max_tokens_per_row, **kwargs)

    # ------------------------------------------------------------------ epoch handling
    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch`` (seed + epoch) from the next ``iter``/``len`` on."""
        self.epoch = epoch

    def _packs(self, unit_lengths: list[int]) -> bool:
        return len(first_fit_decreasing(unit_lengths, self.max_tokens_per_row)) <= self.rows_per_batch

    def _batch_packs(self, indices: Sequence[int]) -> bool:
        return self._packs([n for i in indices for n in self.units[i]])

    def _order(self, epoch: int) -> list[int]:
        n = len(self.units)
        if not self.shuffle:
            return list(range(n))
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=generator).tolist()

    def _plan(self, order: list[int]) -> list[list[int]]:
        """Cut ``order`` into consecutive batches that each pack into ``rows_per_batch`` rows."""
        budget = self.rows_per_batch * self.max_tokens_per_row
        cumulative = [0]
        for i in order:
            cumulative.append(cumulative[-1] + self._totals[i])
        batches = []
        start = 0
        while start < len(order):
            # no prefix with more tokens than rows * budget can pack: that bounds the search cheaply
            most = bisect.bisect_right(cumulative, cumulative[start] + budget) - 1 - start
            # invariant: a prefix of `good` indices packs (one example always does, checked in __init__),
            # a prefix of `bad` does not (or runs past the token bound)
            good, bad = 1, most + 1
            if most > 1:
                if self._batch_packs(order[start : start + most]):
                    good = most  # the common case: the token bound is the only limit
                else:
                    bad = most
            while bad - good > 1:
                middle = (good + bad) // 2
                if self._batch_packs(order[start : start + middle]):
                    good = middle
                else:
                    bad = middle
            batches.append(order[start : start + good])
            start += good
        return batches

    def _balance(self, batches: list[list[int]], epoch: int) -> list[list[int]]:
        """Make the number of batches a multiple of ``num_replicas``: drop the tail round or split batches."""
        R = self.num_replicas
        extra = len(batches) % R
        if R == 1 or extra == 0:
            return batches
        if self.drop_last:
            return batches[: len(batches) - extra]  # the incomplete last round; documented data loss
        needed = len(batches) + R - extra
        examples = sum(len(b) for b in batches)
        if examples < needed:
            # every batch needs an example of its own: splitting cannot help, and repeating or dropping
            # data is not what drop_last=False promises
            raise ValueError(
                f"epoch {epoch}: {examples} examples packed into {len(batches)} batches; giving each of "
                f"{R} replicas the same number of batches needs {needed} batches, more than there are examples. "
                "Use drop_last=True (drops the incomplete last round), more rows_per_batch, or fewer replicas"
            )
        batches = [list(b) for b in batches]
        for _ in range(R - extra):
            # split the batch with the most examples (the last such on ties, near the end of the epoch)
            candidates = sorted(range(len(batches)), key=lambda j: (-len(batches[j]), -j))
            for j in candidates:
                halves = self._split(batches[j])
                if halves is not None:
                    batches[j : j + 1] = halves
                    break
            else:  # no split of any batch packs: first-fit-decreasing anomalies everywhere, not seen in practice
                raise ValueError(
                    f"epoch {epoch}: no batch can be split to give every replica the same number of "
                    "batches; use drop_last=True"
                )
        return batches

    def _split(self, batch: list[int]) -> list[list[int]] | None:
        """Two non-empty parts of ``batch`` that each pack, or None.

        A subset of a packable set almost always packs, but first-fit-decreasing is not monotone, so
        every candidate is checked; peeling off single examples is the fallback.
        """
        if len(batch) < 2:
            return None
        half = (len(batch) + 1) // 2
        candidates = [(batch[:half], batch[half:])]
        candidates += [(batch[:k] + batch[k + 1 :], [batch[k]]) for k in reversed(range(len(batch)))]
        for first, second in candidates:
            if self._batch_packs(first) and self._batch_packs(second):
                return [first, second]
        return None

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All ranks' batches of ``epoch`` (default: the current one) before dealing them out; rank r gets
        ``global_batches()[r::num_replicas]``."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        batches = self._balance(self._plan(self._order(epoch)), epoch)
        self._cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.rank :: self.num_replicas]:
            yield list(batch)

    def __len__(self) -> int:
        return len(self.global_batches()) // self.num_replicas
