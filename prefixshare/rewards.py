"""Reward models on prefix-shared batches: one forward for a prompt and all its responses, a score per response.

A sequence-classification model (``*ForSequenceClassification``: the decoder, then a ``score`` head of
``num_labels`` outputs at every position) rates a conversation by the score at its last token. Preference data
for reward models gives whole sequences, ``prompt+chosen`` and ``prompt+rejected``; they share their prompt, so one
prefix-shared sequence ``[prompt | chosen | rejected]`` holds both (each response attends to the prompt and to
itself only, and restarts its positions at the prompt's length), and each response's score is read at ITS last
token::

    collator = RewardCollator(pad_token_id=tokenizer.pad_token_id)
    batch = collator([{"chosen_ids": [...], "rejected_ids": [...]}, ...])   # full sequences, as TRL tokenizes them
    scores = response_rewards(patched_model, batch)                        # [n, 2, num_labels], with its graph

The score head has no vocabulary, so nothing like the log-prob engine is needed: the model's forward runs as
usual (its own ``score`` module on every position: ``[B, L, num_labels]``, a few numbers per token) and a hook
keeps that output; the rows at the response ends are read from it.

Where the model reads: ``GenericForSequenceClassification`` (every supported architecture, transformers 4.57-5.x)
takes the score at the LAST TOKEN THAT IS NOT ``config.pad_token_id`` (the last token when it has none). For a
sequence that ends in its pad token (a tokenizer whose pad token is its EOS, and an EOS appended) that is the token
before; :func:`reward_positions` applies the same rule to each ``prompt+response`` sequence, so the numbers are
those of the model on the paired rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._compat import text_config
from .collators import PrefixShareBatch, token_ids
from .layout import LAYOUT_KEY, Placement, PrefixShareLayout, UnitSpec
from .packing import first_fit_decreasing
from .patch import expect_layout_applied
from .structure import unwrap_model
from .tokenization import common_prefix_length

__all__ = ["PAD_KEY", "POSITIONS_KEY", "RewardCollator", "response_rewards", "reward_positions"]

POSITIONS_KEY = "prefixshare_reward_positions"
"""Batch key: ``[n, K]`` long, the flat index (``row * L + t``) of the token whose score is each response's
reward (the last non-pad token of its ``prompt+response`` sequence). Not a model argument."""

PAD_KEY = "prefixshare_reward_pad_token_id"
"""Batch key: the ``pad_token_id`` the :class:`RewardCollator` read :data:`POSITIONS_KEY` with (an int); checked
against the model's ``config.pad_token_id`` by :func:`response_rewards`. Not a model argument."""


def reward_positions(layout: PrefixShareLayout, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """``[n, K]`` long: for each response, the flat index of the last token of ``prompt+response`` that is not
    ``pad_token_id`` (the last token if ``pad_token_id`` is None; the first prompt token if every token is the pad
    token), the token a sequence-classification model reads its score at."""
    L = layout.shape[1]
    ids = input_ids.detach().reshape(-1).cpu()
    out = torch.full((layout.num_examples, layout.num_responses), -1, dtype=torch.long)
    for p in layout.placements:
        start = p.row * L + p.offset
        prompt = list(range(start, start + p.unit.prompt_length))
        cursor = start + p.unit.prompt_length
        for slot, length in zip(p.unit.response_slots, p.unit.response_lengths):
            sequence = prompt + list(range(cursor, cursor + length))
            cursor += length
            if pad_token_id is None:
                out[p.unit.example, slot] = sequence[-1]
                continue
            real = [i for i in sequence if int(ids[i]) != pad_token_id]
            out[p.unit.example, slot] = real[-1] if real else sequence[0]
    return out


class RewardCollator:
    """Whole preference sequences -> a prefix-shared batch for a reward model.

    Takes examples with ``chosen_ids`` and ``rejected_ids``: each the token ids of a WHOLE sequence
    (``prompt+chosen``, ``prompt+rejected``), as TRL's ``RewardTrainer`` tokenizes them (it has no separate prompt);
    an optional float ``margin`` per example is collated as ``margin`` ``[n]``. The shared prompt of a pair is
    the longest common start of its two sequences, cut so that each response keeps at least one token (two equal
    sequences share all but their last token). A pair with no common first token is laid out as two units of one
    response each (the first token standing as its own prompt); nothing is dropped.

    Returns a :class:`~prefixshare.PrefixShareBatch` (``input_ids``, ``position_ids``, ``prefixshare_layout``,
    ``use_cache=False``) plus :data:`POSITIONS_KEY` and, when the examples have it, ``margin``.

    Args:
        pad_token_id: written into padding positions; also the id the model's pooling skips (its
            ``config.pad_token_id``): give the same.
        pad_to_multiple_of: round the row length up to a multiple of this.
        max_tokens_per_row: pack units first-fit-decreasing into rows of at most this many tokens; None: one per row.
        padding_free: every batch in one row without padding.

    Raises:
        ValueError: naming the example and field: missing or non-integer ids, a sequence of fewer than two tokens
            (no prompt token would be left to share), a unit longer than ``max_tokens_per_row``.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        max_tokens_per_row: int | None = None,
        padding_free: bool = False,
    ):
        if pad_token_id is None or isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative integer token id, got {pad_token_id!r}")
        for name, value in (("pad_to_multiple_of", pad_to_multiple_of), ("max_tokens_per_row", max_tokens_per_row)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if padding_free and max_tokens_per_row is not None:
            raise ValueError("give padding_free=True (every batch in one row) or max_tokens_per_row, not both")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_tokens_per_row = max_tokens_per_row
        self.padding_free = bool(padding_free)

    @staticmethod
    def _sequences(example: Any, index: int) -> tuple[list[int], list[int]]:
        if not isinstance(example, Mapping):
            raise ValueError(f"example {index}: expected a mapping with chosen_ids and rejected_ids, got {type(example).__name__}")
        out = []
        for name in ("chosen_ids", "rejected_ids"):
            if example.get(name) is None:
                raise ValueError(f"example {index}: missing {name!r} (the token ids of the whole prompt+response)")
            ids = token_ids(example[name], index, name)
            if len(ids) < 2:
                raise ValueError(
                    f"example {index}: {name} has {len(ids)} token{'s' if len(ids) != 1 else ''}; a prefix-shared "
                    "batch needs at least 2 per sequence (a prompt token and a response token)"
                )
            out.append(ids)
        return out[0], out[1]

    def units(self, examples: Sequence[Any]) -> tuple[list[UnitSpec], list[list[int]]]:
        """The units of the examples and the tokens of each unit."""
        units, tokens = [], []
        for i, example in enumerate(examples):
            chosen, rejected = self._sequences(example, i)
            shared = min(common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
            if shared >= 1:
                units.append(UnitSpec(i, shared, (0, 1), (len(chosen) - shared, len(rejected) - shared)))
                tokens.append(chosen + rejected[shared:])
            else:  # nothing in common: each sequence its own unit, its first token as its prompt
                for slot, sequence in enumerate((chosen, rejected)):
                    units.append(UnitSpec(i, 1, (slot,), (len(sequence) - 1,)))
                    tokens.append(sequence)
        return units, tokens

    def __call__(self, examples: Sequence[Any]) -> PrefixShareBatch:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        units, tokens = self.units(examples)
        lengths = [u.length for u in units]
        budget = sum(lengths) if self.padding_free else self.max_tokens_per_row
        if budget is None:
            rows = [[i] for i in range(len(units))]
        else:
            for u in units:
                if u.length > budget:
                    raise ValueError(
                        f"example {u.example}: its unit has {u.length} tokens, more than max_tokens_per_row={budget}"
                    )
            rows = first_fit_decreasing(lengths, budget)
        placements = []
        for r, members in enumerate(rows):
            offset = 0
            for u in members:
                placements.append(Placement(r, offset, units[u]))
                offset += lengths[u]
        L = max(sum(lengths[u] for u in members) for members in rows)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        layout = PrefixShareLayout.from_placements(
            placements, num_rows=len(rows), row_length=L, num_examples=len(examples), num_responses=2,
            max_token_id=max([self.pad_token_id] + [max(t) for t in tokens]),
        )  # fmt: skip
        input_ids = torch.full((len(rows), L), self.pad_token_id, dtype=torch.long)
        for pl, u in zip(placements, (u for members in rows for u in members)):
            input_ids[pl.row, pl.offset : pl.offset + lengths[u]] = torch.tensor(tokens[u], dtype=torch.long)
        batch = PrefixShareBatch(input_ids=input_ids, position_ids=layout.position_ids, use_cache=False)
        batch[LAYOUT_KEY] = layout
        batch[POSITIONS_KEY] = reward_positions(layout, input_ids, self.pad_token_id)
        batch[PAD_KEY] = self.pad_token_id
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float32)
        return batch


def _score_head(model) -> torch.nn.Module:
    inner = unwrap_model(model)
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(
            f"prefixshare.response_rewards needs a sequence-classification model with a `score` head "
            f"(*ForSequenceClassification); {type(inner).__name__} has none"
        )
    return head


def response_rewards(model, batch: Mapping, *, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The score of every response of a prefix-shared batch: ``[n, K, num_labels]`` in the model's dtype.

    Equal (up to float rounding) to the model's own output on each ``prompt+response`` sequence alone, values and
    gradients: the score is read at the token the model's pooling reads (see the module docstring).

    Args:
        model: a ``*ForSequenceClassification`` model patched with :func:`prefixshare.patch` (peft, DDP, FSDP
            around one are fine).
        batch: a :class:`RewardCollator` batch (or any prefix-shared batch with ``input_ids``, ``position_ids``
            and its layout). Only the model's keys are passed to the model.
        positions: ``[n, K]`` flat read positions; default: the batch's :data:`POSITIONS_KEY`, else computed with
            :func:`reward_positions` from the model's ``pad_token_id`` (one device-to-host copy of ``input_ids``).

    Raises:
        ValueError: a model without a ``score`` head, or whose forward does not call it once on every position; a
            model without ``config.pad_token_id`` given a collated batch (or one of more than one row) and no
            ``positions``; a batch collated with another ``pad_token_id`` than the model's.
        LayoutNotAppliedError: the forward did not apply the batch's layout in every attention layer.
    """
    layout = batch[LAYOUT_KEY]
    head = _score_head(model)
    pad_token_id = getattr(text_config(unwrap_model(model).config), "pad_token_id", None)
    if pad_token_id is None and positions is None and (POSITIONS_KEY in batch or layout.shape[0] > 1):
        # the model's pooling reads the last token of a row then (and refuses batches of more rows), while the
        # collator read each reward before its own pad token: the two could disagree at a response ending in it
        raise ValueError(
            f"prefixshare.response_rewards: {type(unwrap_model(model)).__name__} has no config.pad_token_id; set "
            "model.config.pad_token_id to the pad_token_id of the RewardCollator (the tokenizer's pad token id), "
            "the token the model's pooling skips, so that each reward is read where the model reads it"
        )
    collated_pad = batch.get(PAD_KEY)
    if pad_token_id is not None and collated_pad is not None and collated_pad != pad_token_id:
        # the collator read each reward before its last pad token, the model's own pooling reads before its
        # config's: at a sequence that ends in either id they read different tokens (a silent wrong reward)
        raise ValueError(
            f"prefixshare.response_rewards: the batch was collated with pad_token_id={collated_pad}, but "
            f"{type(unwrap_model(model)).__name__}'s config.pad_token_id is {pad_token_id}: the rewards would be read "
            "at other tokens than the model reads them alone. Give RewardCollator the model's pad_token_id (or set "
            f"model.config.pad_token_id = {collated_pad} if that is the tokenizer's pad token)"
        )
    if positions is None:
        positions = batch.get(POSITIONS_KEY)
    if positions is None:
        positions = reward_positions(layout, batch["input_ids"], pad_token_id)
    captured = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append(output))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], LAYOUT_KEY: layout}
    try:
        with expect_layout_applied(model, layout):
            output = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    B, L = layout.shape
    if len(captured) != 1 or not isinstance(captured[0], torch.Tensor) or tuple(captured[0].shape[:2]) != (B, L):
        shapes = [tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__ for c in captured]
        raise ValueError(
            f"prefixshare.response_rewards: the forward of {type(unwrap_model(model)).__name__} called its score head "
            f"{len(captured)} time(s) with outputs {shapes}, not once on all {B}x{L} positions; it pools in a way "
            "prefixshare does not reproduce"
        )
    scores = captured[0]
    rows = scores.reshape(B * L, scores.shape[-1]).index_select(0, positions.reshape(-1).to(scores.device))
    rewards = rows.view(layout.num_examples, layout.num_responses, -1)
    # A zero that depends on the forward's returned logits: it puts the output on the backward's path, so that hooks
    # registered on it (FSDP2's pre-backward of the root) fire as usual (as in the log-prob engine).
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        rewards = rewards + logits.reshape(-1)[:0].sum().to(rewards.dtype)
    return rewards
