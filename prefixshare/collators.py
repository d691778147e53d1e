"""Collators: preference examples -> prefix-shared batches, or the classic paired batches (the baseline).

Both take a list of examples, each a mapping with ``prompt_input_ids`` and either ``chosen_input_ids`` and
``rejected_input_ids`` (K = 2) or ``responses_input_ids`` (a list of K responses), not both; ids are unpadded
lists of ints or 1-D integer tensors or numpy arrays (an optional ``<field>_attention_mask`` must be all ones).
Both return a :class:`PrefixShareBatch` that goes straight into a model patched by
:func:`prefixshare.patch`::

    batch = PrefixShareCollator(pad_token_id=0)(examples)
    out = model(**batch)
    chosen_logps, rejected_logps = split_logps(out.logits, batch)
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .layout import LAYOUT_KEY, PrefixShareLayout, UnitSpec, place_in_rows
from .packing import first_fit_decreasing


TRUNCATION_MODES = ("keep_end_of_prompt", "truncate_responses", "keep_end")


class PrefixShareBatch(dict):
    """The collated batch: a dict of model keyword arguments.

    Keys: ``input_ids`` and ``position_ids`` (``[B, L]``, long), ``prefixshare_layout``
    (a :class:`~prefixshare.layout.PrefixShareLayout`) and ``use_cache=False``.
    """

    @property
    def layout(self) -> PrefixShareLayout:
        return self[LAYOUT_KEY]

    def to(self, device, non_blocking: bool = False) -> "PrefixShareBatch":
        return PrefixShareBatch(
            {k: v.to(device, non_blocking=non_blocking) if hasattr(v, "to") else v for k, v in self.items()}
        )


@dataclass
class PreferenceExample:
    """A validated example: token ids of one prompt and its K responses.

    ``own_prompts`` (only from ``truncation="keep_end"``): one prompt per response, when truncation cut the
    responses' sequences at different prompt tokens; such an example is laid out as one unit per response.
    """

    prompt: list[int]
    responses: list[list[int]]
    own_prompts: list[list[int]] | None = None

    def prompt_of(self, response: int) -> list[int]:
        """The prompt that response ``response`` follows."""
        return self.prompt if self.own_prompts is None else self.own_prompts[response]


# ---------------------------------------------------------------------------------------------- input checks
INT64_MAX = 2**63 - 1  # input_ids are int64: a larger id cannot be stored (and no vocabulary is that large)

RESPONSES_KEY = "responses_input_ids"
PAIR_KEYS = ("chosen_input_ids", "rejected_input_ids")


def is_numpy_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "ndim") and hasattr(value, "dtype")


def token_ids(value: Any, index: int, name: str) -> list[int]:
    """``value`` (a list of ints, a 1-D integer tensor or array) as a list of ids; ValueError naming ``example
    index`` and the field ``name`` otherwise (not integers, not 1-D, negative, beyond int64)."""
    if is_numpy_array(value):  # datasets' numpy format; numpy scalars (ndim 0) fail the 1-D check
        if value.ndim != 1:
            raise ValueError(f"example {index}: {name} must be a 1-D array, got shape {tuple(value.shape)}")
        if value.dtype.kind not in "iuO":  # signed, unsigned, or Python objects (checked one by one below)
            raise ValueError(f"example {index}: {name} must hold integer token ids, got dtype {value.dtype}")
        # tolist() gives exact Python ints, uint64 included, where a cast to int64 would wrap 2**63 to -2**63
        value = value.tolist()
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"example {index}: {name} must be a 1-D tensor, got shape {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"example {index}: {name} must hold integer token ids, got dtype {value.dtype}")
        ids = value.tolist()
    elif isinstance(value, (list, tuple)):
        ids = list(value)
        for j, t in enumerate(ids):
            # ints and numpy integers (anything with __index__), but not bools or tensors
            if isinstance(t, (bool, torch.Tensor)) or not hasattr(t, "__index__"):
                raise ValueError(
                    f"example {index}: {name}[{j}] is {t!r} ({type(t).__name__}); token ids must be integers"
                )
            ids[j] = operator.index(t)
    else:
        raise ValueError(
            f"example {index}: {name} must be a list of token ids or a 1-D integer tensor or array, "
            f"got {type(value).__name__}"
        )
    for j, t in enumerate(ids):
        if t < 0:
            raise ValueError(f"example {index}: {name}[{j}] is {t}; token ids must be >= 0")
        if t > INT64_MAX:
            raise ValueError(f"example {index}: {name}[{j}] is {t}; token ids must fit in int64 (< 2**63)")
    return ids


def _check_attention_mask(example: Mapping, index: int, name: str, length: int) -> None:
    """Refuse padded ids: zeros in ``<field>_attention_mask`` mean ``<field>_input_ids`` holds padding.

    The collators take unpadded ids and score every response token, so padding inside the ids would be scored
    as tokens. A mask of all ones is fine.
    """
    mask_name = name.replace("_input_ids", "_attention_mask")
    mask = example.get(mask_name)
    if mask is None:
        return
    values = mask.tolist() if hasattr(mask, "tolist") else mask
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"example {index}: {mask_name} must be a list of 0/1, got {type(mask).__name__}")
    if len(values) != length:
        raise ValueError(f"example {index}: {mask_name} has {len(values)} entries but {name} has {length} tokens")
    padded = [j for j, m in enumerate(values) if not m]
    if padded:
        raise ValueError(
            f"example {index}: {mask_name} is 0 at positions {padded[:8]}{' ...' if len(padded) > 8 else ''}: "
            f"{name} holds padding, which would be scored as tokens; give unpadded ids (the collator pads)"
        )


def normalize_example(example: Any, index: int) -> PreferenceExample:
    """Check one input example and return its ids; raise ValueError naming ``index`` and the problem."""
    if not isinstance(example, Mapping):
        raise ValueError(f"example {index}: expected a mapping of token ids, got {type(example).__name__}")
    if "prompt_input_ids" not in example:
        raise ValueError(f"example {index}: missing 'prompt_input_ids'")
    prompt = token_ids(example["prompt_input_ids"], index, "prompt_input_ids")
    _check_attention_mask(example, index, "prompt_input_ids", len(prompt))
    # A field set to None counts as absent: datasets writes None where a row lacks a column of the dataset.
    pair = [k for k in PAIR_KEYS if example.get(k) is not None]
    if RESPONSES_KEY in example and (example[RESPONSES_KEY] is not None or not pair):
        if pair:  # which one was meant is unknowable; using either would drop the other silently
            raise ValueError(
                f"example {index}: has both {RESPONSES_KEY} and {', '.join(pair)}; give either "
                f"{RESPONSES_KEY} (K responses) or chosen_input_ids and rejected_input_ids, not both"
            )
        raw = example[RESPONSES_KEY]
        # A [K, T] tensor or array is refused: its rows would carry padding that would be scored as tokens.
        if not isinstance(raw, (list, tuple)) or not raw:
            got = f"an empty {type(raw).__name__}" if isinstance(raw, (list, tuple)) else type(raw).__name__
            raise ValueError(
                f"example {index}: {RESPONSES_KEY} must be a non-empty list of responses (one list of ids, 1-D "
                f"tensor or array each), got {got}"
            )
        responses = [token_ids(r, index, f"{RESPONSES_KEY}[{k}]") for k, r in enumerate(raw)]
    else:
        missing = [k for k in PAIR_KEYS if k not in example]
        if missing:
            raise ValueError(
                f"example {index}: missing {', '.join(repr(m) for m in missing)} "
                "(give chosen_input_ids and rejected_input_ids, or responses_input_ids)"
            )
        responses = [token_ids(example[k], index, k) for k in PAIR_KEYS]
        for k, r in zip(PAIR_KEYS, responses):
            _check_attention_mask(example, index, k, len(r))
    if not prompt:
        raise ValueError(
            f"example {index}: the prompt is empty; the first token of each response needs a prompt token to predict it"
        )
    for k, r in enumerate(responses):
        if not r:
            raise ValueError(f"example {index}: response {k} is empty")
    return PreferenceExample(prompt, responses)


def _truncate(ex: PreferenceExample, index: int, max_length: int | None, mode: str | None) -> PreferenceExample:
    """Apply ``max_length`` to every prompt+response sequence, the limit the paired format sees."""
    if max_length is None:
        return ex
    longest = max(len(r) for r in ex.responses)
    if len(ex.prompt) + longest <= max_length:
        return ex
    what = f"prompt ({len(ex.prompt)}) + longest response ({longest}) exceeds max_length={max_length}"
    if mode is None:
        raise ValueError(
            f"example {index}: {what}; pass truncation='keep_end_of_prompt', 'truncate_responses' or 'keep_end' to "
            "shorten it"
        )
    if mode == "keep_end":
        return _keep_end(ex, index, max_length, what)
    if mode == "keep_end_of_prompt":
        keep = max_length - longest
        if keep < 1:
            raise ValueError(f"example {index}: {what}, and no prompt token would remain after truncating the prompt")
        return PreferenceExample(ex.prompt[-keep:], ex.responses)
    # truncate_responses
    keep = max_length - len(ex.prompt)
    if keep < 1:
        raise ValueError(f"example {index}: {what}, and no response token would remain after truncating responses")
    return PreferenceExample(ex.prompt, [r[:keep] for r in ex.responses])


def _keep_end(ex: PreferenceExample, index: int, max_length: int, what: str) -> PreferenceExample:
    """TRL's ``truncation_mode="keep_end"``: each prompt+response sequence keeps its last ``max_length`` tokens.

    A sequence cut inside its response keeps no prompt token; its first token then only predicts the next (no
    token predicts it), so it becomes that response's one-token prompt, as the paired format never scores a row's
    first token. Responses whose cuts leave different prompts get prompts of their own (``own_prompts``).
    """
    if max_length < 2:
        raise ValueError(f"example {index}: {what}, and max_length={max_length} leaves no token to score")
    prompts, responses = [], []
    for response in ex.responses:
        kept = (ex.prompt + response)[-max_length:]
        prompt_length = max(len(kept) - len(response), 1)
        prompts.append(kept[:prompt_length])
        responses.append(kept[prompt_length:])
    if all(p == prompts[0] for p in prompts):
        return PreferenceExample(prompts[0], responses)
    return PreferenceExample(prompts[0], responses, own_prompts=prompts)


# ---------------------------------------------------------------------------------------------- collators
class _PreferenceCollator:
    """Shared machinery: validation, truncation, packing and padding; subclasses choose the units."""

    def __init__(
        self,
        pad_token_id: int | None,
        max_tokens_per_row: int | None = None,
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        truncation: str | None = None,
    ):
        if pad_token_id is None or isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise ValueError(
                f"pad_token_id must be an integer token id, got {pad_token_id!r} "
                "(a tokenizer without a pad token can use its eos_token_id)"
            )
        if not 0 <= pad_token_id <= INT64_MAX:
            raise ValueError(f"pad_token_id must be >= 0 and fit in int64 (< 2**63), got {pad_token_id}")
        for name, value in (
            ("max_tokens_per_row", max_tokens_per_row),
            ("pad_to_multiple_of", pad_to_multiple_of),
            ("max_length", max_length),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if truncation is not None and truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be None or one of {TRUNCATION_MODES}, got {truncation!r}")
        if truncation is not None and max_length is None:
            raise ValueError("truncation needs max_length")
        self.pad_token_id = pad_token_id
        self.max_tokens_per_row = max_tokens_per_row
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.truncation = truncation

    # subclasses -----------------------------------------------------------------------------
    def _units(self, examples: Sequence[PreferenceExample]) -> list[UnitSpec]:
        raise NotImplementedError

    # public ---------------------------------------------------------------------------------
    def normalize(self, examples: Sequence[Any]) -> list[PreferenceExample]:
        """Validate and truncate the examples; every error names the example's index."""
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        checked = [_truncate(normalize_example(e, i), i, self.max_length, self.truncation) for i, e in enumerate(examples)]
        K = len(checked[0].responses)
        for i, ex in enumerate(checked):
            if len(ex.responses) != K:
                raise ValueError(
                    f"example {i}: has {len(ex.responses)} responses but example 0 has {K}; "
                    "every example of a batch needs the same number of responses"
                )
        return checked

    def unit_lengths(self, examples: Sequence[Any]) -> list[int]:
        """Token counts of the units this collator would build (used by the token-budget sampler)."""
        return [u.length for u in self._units(self.normalize(examples))]

    def __call__(self, examples: Sequence[Any]) -> PrefixShareBatch:
        checked = self.normalize(examples)
        units = self._units(checked)
        rows = self._rows(units)
        placements, L = place_in_rows(units, rows, self.pad_to_multiple_of)
        layout = PrefixShareLayout.from_placements(
            placements,
            num_rows=len(rows),
            row_length=L,
            num_examples=len(checked),
            num_responses=len(checked[0].responses),
            max_token_id=max(
                [self.pad_token_id]
                + [max(t for k, r in enumerate(ex.responses) for t in ex.prompt_of(k) + r) for ex in checked]
            ),
        )
        input_ids = torch.full((len(rows), L), self.pad_token_id, dtype=torch.long)
        for pl in placements:
            ex = checked[pl.unit.example]
            ids = list(ex.prompt_of(pl.unit.response_slots[0]))  # units of own_prompts examples hold one response
            for slot in pl.unit.response_slots:
                ids.extend(ex.responses[slot])
            input_ids[pl.row, pl.offset : pl.offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
        return PrefixShareBatch(
            input_ids=input_ids,
            position_ids=layout.position_ids,
            use_cache=False,
            **{LAYOUT_KEY: layout},
        )

    def _rows(self, units: list[UnitSpec]) -> list[list[int]]:
        if self.max_tokens_per_row is None:
            return [[i] for i in range(len(units))]
        for u in units:
            if u.length > self.max_tokens_per_row:
                raise ValueError(
                    f"example {u.example}: its unit has {u.length} tokens "
                    f"(prompt {u.prompt_length} + responses {list(u.response_lengths)}), more than "
                    f"max_tokens_per_row={self.max_tokens_per_row}; raise the budget or set max_length with truncation"
                )
        return first_fit_decreasing([u.length for u in units], self.max_tokens_per_row)


class PrefixShareCollator(_PreferenceCollator):
    """One unit per example: ``[prompt | response 1 | ... | response K]``, the prompt computed once.

    Args:
        pad_token_id: id written into padding positions (never attended to by real tokens).
        max_tokens_per_row: if set, units are packed first-fit-decreasing into rows of at most this many
            tokens (as few rows as the heuristic finds); otherwise one unit per row, right padded.
        pad_to_multiple_of: round the row length up to a multiple of this (e.g. 128 for FlexAttention).
        max_length: the longest allowed prompt+response sequence (the length the paired format would see).
        truncation: what to do with an example beyond ``max_length``: ``None`` raises;
            ``"keep_end_of_prompt"`` drops the earliest prompt tokens; ``"truncate_responses"`` cuts the
            ends of the responses; ``"keep_end"`` keeps the last ``max_length`` tokens of each prompt+response
            (TRL's ``truncation_mode="keep_end"``; responses cut at different prompt tokens then each get a unit
            of their own, without sharing).

    Results come back in input order whatever the packing: :func:`prefixshare.split_logps` reads the
    layout to put example i at index i.
    """

    def _units(self, examples):
        units = []
        for i, ex in enumerate(examples):
            if ex.own_prompts is None:
                units.append(UnitSpec(i, len(ex.prompt), tuple(range(len(ex.responses))), tuple(map(len, ex.responses))))
            else:  # responses that follow different prompts (keep_end truncation) cannot share one
                units.extend(_response_units(i, ex, range(len(ex.responses))))
        return units


class PairedCollator(_PreferenceCollator):
    """The classic concatenated-forward baseline: one ``[prompt | response k]`` sequence per response.

    Unpacked, the rows are all ``prompt+chosen`` sequences then all ``prompt+rejected`` (2B rows,
    chosen first; K*B rows for K responses). With ``max_tokens_per_row`` the sequences are packed
    first-fit-decreasing, each isolated from the others. Same arguments and output as
    :class:`PrefixShareCollator`, so both formats go through one code path.
    """

    def _units(self, examples):
        K = len(examples[0].responses)
        return [unit for k in range(K) for i, ex in enumerate(examples) for unit in _response_units(i, ex, (k,))]


def _response_units(index: int, ex: PreferenceExample, responses) -> list[UnitSpec]:
    """One ``[prompt | response k]`` unit per response of ``responses``: the paired format."""
    return [UnitSpec(index, len(ex.prompt_of(k)), (k,), (len(ex.responses[k]),)) for k in responses]
