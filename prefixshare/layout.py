"""The layout of a prefix-shared batch: the one place where the attention rule lives.

A *unit* is one prompt followed by one or more responses, laid out contiguously in a row::

    tokens:     p0 p1 p2 | c0 c1 c2 c3 | r0 r1
    segment:     0  0  0 |  1  1  1  1 |  2  2      (0 = prompt, k = response k, -1 = padding)
    position:    0  1  2 |  3  4  5  6 |  3  4      (every response restarts at len(prompt))

A row holds one or more units (packing) followed by right padding. The paired baseline uses the same
layout with one response per unit, so both formats share every mask, backend and the splitter.

The rule: a query sees a key iff both are in the same unit, the key is not after the query physically,
and the key is in the prompt or in the query's own response. Sliding windows count LOGICAL positions.
Each response token is predicted by the logits of the previous token of its own response, and the first
token of every response by the last PROMPT token (never by the previous response's last token).

Everything else (dense masks, FlexAttention block masks, varlen sequence tables, the log-prob splitter)
is derived from :meth:`PrefixShareLayout.attention_predicate` and the index tensors built here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

PROMPT_SEGMENT = 0
PAD_SEGMENT = -1

LAYOUT_KEY = "prefixshare_layout"
"""The batch key (and model keyword argument) under which a collated batch carries its layout."""


@dataclass(frozen=True)
class UnitSpec:
    """One unit to lay out: a prompt and the responses that share it.

    Attributes:
        example: index of the example in the collator's input list.
        prompt_length: number of prompt tokens (>= 1).
        response_slots: which responses of the example this unit holds, in physical order
            (prefix sharing: ``(0, 1, ..., K-1)``; paired format: a single slot).
        response_lengths: the length of each of those responses (each >= 1).
        num_images: images in the prompt; their rows of the batch's ``image_grid_thw`` follow those of the units
            physically before this one (row-major), as the model fills image tokens (:mod:`prefixshare.vision`).
    """

    example: int
    prompt_length: int
    response_slots: tuple[int, ...]
    response_lengths: tuple[int, ...]
    num_images: int = 0

    @property
    def length(self) -> int:
        return self.prompt_length + sum(self.response_lengths)


@dataclass(frozen=True)
class Placement:
    """A unit placed in a row at a physical offset."""

    row: int
    offset: int
    unit: UnitSpec


def place_in_rows(
    units: Sequence[UnitSpec], rows: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None
) -> tuple[list[Placement], int]:
    """Lay units out back to back in rows: ``rows[r]`` lists the indices (into ``units``) of row ``r``'s units,
    in order. Returns the placements and the row length: the longest row, rounded up to a multiple of
    ``pad_to_multiple_of``."""
    placements = []
    for row, members in enumerate(rows):
        offset = 0
        for i in members:
            placements.append(Placement(row, offset, units[i]))
            offset += units[i].length
    length = max(sum(units[i].length for i in members) for members in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    return placements, length


@dataclass(eq=False)
class PrefixShareLayout:
    """Per-token description of a prefix-shared (or paired) batch of shape ``[B, L]``.

    Tensors (all ``torch.long``):
        unit_ids: ``[B, L]``, the unit of each token; every padding token is a unit of its own
            (a negative id), so it attends to itself only and no softmax row is empty.
        segment_ids: ``[B, L]``, 0 for prompt tokens, k >= 1 for the k-th response of its unit,
            -1 for padding.
        position_ids: ``[B, L]``, logical positions (the RoPE positions).
        target_index: ``[T]``, flat index (``b * L + t``) of every response token.
        predictor_index: ``[T]``, flat index of the position whose logits predict that token.
        response_index: ``[T]``, ``example * num_responses + slot`` of that token.
        response_lengths: ``[num_examples, num_responses]``, tokens per response.

    ``placements`` lists where each unit lies, for backends (varlen) and statistics.

    ``max_token_id`` (the largest input id, recorded by the collators) lets a patched forward check the ids
    against the model's vocabulary without reading a device tensor. ``origin`` identifies the batch: copies
    made by :meth:`to` and :meth:`padded` share it, so logits stamped by a patched forward are recognized
    as belonging to this batch wherever its tensors live.
    """

    unit_ids: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor
    target_index: torch.Tensor
    predictor_index: torch.Tensor
    response_index: torch.Tensor
    response_lengths: torch.Tensor
    num_examples: int
    num_responses: int
    placements: tuple[Placement, ...]
    max_token_id: int | None = None
    origin: object = field(default_factory=object, repr=False)
    _derived: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_placements(
        cls,
        placements: Sequence[Placement],
        *,
        num_rows: int,
        row_length: int,
        num_examples: int,
        num_responses: int,
        max_token_id: int | None = None,
    ) -> "PrefixShareLayout":
        """Build the layout from units placed in rows. Units must not overlap or exceed ``row_length``."""
        B, L = num_rows, row_length
        unit_ids = -1 - torch.arange(L, dtype=torch.long).repeat(B, 1)  # every pad its own unit
        segment_ids = torch.full((B, L), PAD_SEGMENT, dtype=torch.long)
        position_ids = torch.zeros((B, L), dtype=torch.long)
        response_lengths = torch.zeros((num_examples, num_responses), dtype=torch.long)
        targets, predictors, owners = [], [], []

        for unit_number, pl in enumerate(placements):
            u, start = pl.unit, pl.offset
            if start < 0 or start + u.length > L:
                raise ValueError(f"unit of example {u.example} does not fit in row {pl.row} of length {L}")
            p = u.prompt_length
            unit_ids[pl.row, start : start + u.length] = unit_number
            segment_ids[pl.row, start : start + p] = PROMPT_SEGMENT
            position_ids[pl.row, start : start + p] = torch.arange(p)
            last_prompt = pl.row * L + start + p - 1
            cursor = start + p
            for segment, (slot, n) in enumerate(zip(u.response_slots, u.response_lengths), start=1):
                segment_ids[pl.row, cursor : cursor + n] = segment
                position_ids[pl.row, cursor : cursor + n] = torch.arange(p, p + n)
                flat = pl.row * L + cursor + torch.arange(n)
                targets.append(flat)
                # the first response token is predicted by the last prompt token, the others by their predecessor
                predictors.append(torch.cat([torch.tensor([last_prompt]), flat[:-1]]))
                owners.append(torch.full((n,), u.example * num_responses + slot, dtype=torch.long))
                response_lengths[u.example, slot] = n
                cursor += n

        def cat(parts):
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

        return cls(
            unit_ids=unit_ids,
            segment_ids=segment_ids,
            position_ids=position_ids,
            target_index=cat(targets),
            predictor_index=cat(predictors),
            response_index=cat(owners),
            response_lengths=response_lengths,
            num_examples=num_examples,
            num_responses=num_responses,
            placements=tuple(placements),
            max_token_id=max_token_id,
        )

    # ------------------------------------------------------------------ the rule
    def attention_predicate(self, sliding_window: int | None = None) -> Callable:
        """``predicate(b, h, q_idx, kv_idx) -> bool tensor``: may query ``q_idx`` see key ``kv_idx`` in row ``b``.

        Works elementwise on broadcastable index tensors (dense masks) and as a FlexAttention ``mask_mod``.
        ``sliding_window`` W keeps keys whose logical position is within W - 1 of the query's (transformers'
        convention: ``q_pos - kv_pos < W``).
        """
        unit, segment, position = self.unit_ids, self.segment_ids, self.position_ids

        def predicate(b, h, q_idx, kv_idx):
            key_segment = segment[b, kv_idx]
            allowed = (
                (unit[b, q_idx] == unit[b, kv_idx])
                & (kv_idx <= q_idx)
                & ((key_segment == PROMPT_SEGMENT) | (key_segment == segment[b, q_idx]))
            )
            if sliding_window is not None:
                allowed = allowed & (position[b, q_idx] - position[b, kv_idx] < sliding_window)
            return allowed

        return predicate

    # ------------------------------------------------------------------ derived views
    def varlen_sequences(self) -> "VarlenSequences":
        """The rule as independent causal sequences for variable-length kernels (memoized).

        The same rule as :meth:`attention_predicate`, in the form FlashAttention-class kernels take;
        tests check that the two agree on every layout.
        """

        def build():
            B, L = self.shape
            queries, keys, len_q, len_k = [], [], [], []
            for pl in self.placements:
                base = pl.row * L + pl.offset
                prompt = torch.arange(base, base + pl.unit.prompt_length)
                start = base + pl.unit.prompt_length
                for j, n in enumerate(pl.unit.response_lengths):
                    response = torch.arange(start, start + n)
                    q = torch.cat([prompt, response]) if j == 0 else response
                    queries.append(q)
                    keys.append(torch.cat([prompt, response]))
                    len_q.append(len(q))
                    len_k.append(len(prompt) + n)
                    start += n

            def cumulative(lengths):
                return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)

            return VarlenSequences(
                torch.cat(queries).to(self.device),
                torch.cat(keys).to(self.device),
                cumulative(len_q).to(self.device),
                cumulative(len_k).to(self.device),
                max(len_q),
                max(len_k),
            )

        return self.cached("varlen_sequences", build)

    def cached(self, key, build: Callable[[], object]):
        """Memoize a derived object (a mask, a sequence table) on this layout, shared by all layers."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def to(self, device, non_blocking: bool = False) -> "PrefixShareLayout":
        """The same layout with its tensors on ``device`` (memoized, so every layer reuses one copy)."""
        device = torch.device(device)
        if self.unit_ids.device == device:
            return self

        def move():
            moved = {
                name: getattr(self, name).to(device, non_blocking=non_blocking)
                for name in _TENSOR_FIELDS
            }
            return PrefixShareLayout(
                **moved,
                num_examples=self.num_examples,
                num_responses=self.num_responses,
                placements=self.placements,
                max_token_id=self.max_token_id,
                origin=self.origin,
            )

        return self.cached(("to", str(device)), move)

    def padded(self, length: int) -> "PrefixShareLayout":
        """The same batch right-padded to ``length`` tokens per row (kernels that want aligned lengths)."""
        B, L = self.shape
        if length == L:
            return self
        if length < L:
            raise ValueError(f"cannot pad a layout of length {L} to {length}")

        def build():
            extra = length - L
            dev = self.device
            new_pads = -1 - torch.arange(L, length, device=dev).repeat(B, 1)

            def reflat(flat):
                return flat // L * length + flat % L

            return PrefixShareLayout(
                unit_ids=torch.cat([self.unit_ids, new_pads], dim=1),
                segment_ids=torch.cat([self.segment_ids, self.segment_ids.new_full((B, extra), PAD_SEGMENT)], 1),
                position_ids=torch.cat([self.position_ids, self.position_ids.new_zeros((B, extra))], 1),
                target_index=reflat(self.target_index),
                predictor_index=reflat(self.predictor_index),
                response_index=self.response_index,
                response_lengths=self.response_lengths,
                num_examples=self.num_examples,
                num_responses=self.num_responses,
                placements=self.placements,
                max_token_id=self.max_token_id,
                origin=self.origin,
            )

        return self.cached(("padded", length), build)

    @property
    def is_plain_causal(self) -> bool:
        """Whether plain causal attention already obeys the rule: every row holds one unit of one response,
        starting at position 0 (the unpacked paired format). Such a batch gives exact log-probs through any
        causal forward, patched or not; every other layout needs the patched attention."""
        def build():
            single = all(pl.offset == 0 and len(pl.unit.response_slots) == 1 for pl in self.placements)
            return single and len({pl.row for pl in self.placements}) == len(self.placements)

        return self.cached("is_plain_causal", build)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.unit_ids.shape)

    @property
    def device(self) -> torch.device:
        return self.unit_ids.device

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens in the batch."""
        return int((self.segment_ids != PAD_SEGMENT).sum())

    def __repr__(self) -> str:
        B, L = self.shape
        return (
            f"PrefixShareLayout(rows={B}, row_length={L}, units={len(self.placements)}, "
            f"examples={self.num_examples}, responses={self.num_responses}, tokens={self.num_tokens})"
        )


class VarlenSequences(NamedTuple):
    """The layout as independent causal sequences for a variable-length kernel.

    The first response of a unit forms one sequence with its prompt; every later response forms a
    sequence whose queries are its own tokens and whose keys are ``[prompt | itself]``. Causal masking
    aligned bottom-right (``seqlen_q <= seqlen_k``) then gives exactly the layout's rule, and key index
    within a sequence equals the logical position, so sliding windows map onto the kernel's window.

    query_index: ``[Tq]`` flat (``b * L + t``) index of each query token; every non-padding token once.
    key_index: ``[Tk]`` flat index of each key token (prompt tokens repeat for later responses).
    cu_seqlens_q, cu_seqlens_k: ``[N + 1]`` int32 cumulative lengths.
    max_seqlen_q, max_seqlen_k: Python ints.
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


_TENSOR_FIELDS = (
    "unit_ids",
    "segment_ids",
    "position_ids",
    "target_index",
    "predictor_index",
    "response_index",
    "response_lengths",
)


def layout_of(batch_or_layout) -> PrefixShareLayout:
    """The :class:`PrefixShareLayout` of a collated batch (a mapping with :data:`LAYOUT_KEY`), or the layout itself."""
    if isinstance(batch_or_layout, PrefixShareLayout):
        return batch_or_layout
    if isinstance(batch_or_layout, Mapping) and LAYOUT_KEY in batch_or_layout:
        return batch_or_layout[LAYOUT_KEY]
    raise TypeError(
        f"expected a batch from PrefixShareCollator/PairedCollator (a mapping with '{LAYOUT_KEY}') "
        f"or a PrefixShareLayout, got {type(batch_or_layout).__name__}"
    )


def input_ids_of(batch_or_layout, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L]`` input ids: ``input_ids`` if given, else the batch's; a bare layout needs ``input_ids``."""
    if input_ids is not None:
        return input_ids
    if isinstance(batch_or_layout, Mapping) and "input_ids" in batch_or_layout:
        return batch_or_layout["input_ids"]
    raise TypeError("pass input_ids= when giving a layout instead of a batch")
