"""Collators: preference examples -> prefix-shared batches, or the classic paired batches (the baseline).

Both take a list of examples, each a mapping with ``prompt_input_ids`` and either ``chosen_input_ids`` and
``rejected_input_ids`` (K = 2) or ``responses_input_ids`` (a list of K responses), not both; ids are unpadded
lists of ints or 1-D integer tensors or numpy arrays (an optional ``<field>_attention_mask`` must be all ones).
An example may carry the images of its prompt for a Qwen2-VL-style model: ``pixel_values`` ``[n_patches, D]`` and
``image_grid_thw`` ``[n_images, 3]`` as the model's processor gives them, with ``prompt_input_ids`` already holding
the expanded image tokens; the batch then carries them once per unit, in the physical order of the units.
Both return a :class:`PrefixShareBatch` that goes straight into a model patched by
:func:`prefixshare.patch`::

    batch = PrefixShareCollator(pad_token_id=0)(examples)
    out = model(**batch)
    chosen_logps, rejected_logps = split_logps(out.logits, batch)
"""

from __future__ import annotations

import dataclasses
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
    (a :class:`~prefixshare.layout.PrefixShareLayout`) and ``use_cache=False``; with images also ``pixel_values``
    (``[n_patches, D]``, the examples' dtype) and ``image_grid_thw`` (``[n_images, 3]``, long), every unit's
    images once, in the physical (row-major) order of the units.
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
    """A validated example: token ids of one prompt and its K responses, and the images of its prompt
    (``pixel_values`` ``[n_patches, D]`` floating, ``image_grid_thw`` ``[n_images, 3]`` long) if any.

    ``own_prompts`` (only from ``truncation="keep_end"``): one prompt per response, when truncation cut the
    responses' sequences at different prompt tokens; such an example is laid out as one unit per response.
    """

    prompt: list[int]
    responses: list[list[int]]
    own_prompts: list[list[int]] | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def prompt_of(self, response: int) -> list[int]:
        """The prompt that response ``response`` follows."""
        return self.prompt if self.own_prompts is None else self.own_prompts[response]

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])


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


IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def _as_tensor(value: Any, index: int, name: str) -> torch.Tensor:
    if is_numpy_array(value):
        return torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        try:
            return torch.tensor(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"example {index}: {name} is not a rectangular array of numbers ({error})") from None
    raise ValueError(f"example {index}: {name} must be a tensor, array or nested list, got {type(value).__name__}")


def _images(example: Mapping, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The prompt's ``(pixel_values, image_grid_thw)``, checked against each other, or ``(None, None)``.

    ``image_grid_thw`` row ``(t, h, w)`` counts the patches of one image (``t * h * w`` rows of ``pixel_values``);
    whether the prompt holds the matching number of image tokens needs the model (its image token and merge
    size), so a patched forward checks that (:mod:`prefixshare.vision`).
    """
    given = [k for k in IMAGE_KEYS if example.get(k) is not None]
    if not given:
        return None, None
    if len(given) == 1:
        missing = next(k for k in IMAGE_KEYS if k not in given)
        raise ValueError(f"example {index}: has {given[0]} but no {missing}; give both for the images of its prompt")
    pixels = _as_tensor(example["pixel_values"], index, "pixel_values")
    grid = _as_tensor(example["image_grid_thw"], index, "image_grid_thw")
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.shape[0] < 1:
        raise ValueError(
            f"example {index}: image_grid_thw must be [n_images, 3] (t, h, w per image), got shape {tuple(grid.shape)}"
        )
    if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool or bool((grid < 1).any()):
        raise ValueError(f"example {index}: image_grid_thw must hold positive integers, got {grid.tolist()}")
    if pixels.dim() != 2 or not pixels.dtype.is_floating_point:
        raise ValueError(
            f"example {index}: pixel_values must be a 2-D floating [n_patches, D] tensor (the processor's flattened "
            f"patches), got shape {tuple(pixels.shape)} and dtype {pixels.dtype}"
        )
    patches = int(grid.prod(-1).sum())
    if pixels.shape[0] != patches:
        raise ValueError(
            f"example {index}: pixel_values has {pixels.shape[0]} patches (rows) but image_grid_thw {grid.tolist()} "
            f"gives {patches} (the sum of t * h * w)"
        )
    return pixels, grid.long()


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
    pixel_values, image_grid_thw = _images(example, index)
    return PreferenceExample(prompt, responses, pixel_values=pixel_values, image_grid_thw=image_grid_thw)


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
    if ex.num_images and mode != "truncate_responses":  # the cut could split an image's tokens from its pixels
        raise ValueError(
            f"example {index}: {what}, and its prompt carries images, which truncation={mode!r} would cut from the "
            "start; shorten it before collating or use truncation='truncate_responses'"
        )
    if mode == "keep_end":
        return _keep_end(ex, index, max_length, what)
    if mode == "keep_end_of_prompt":
        keep = max_length - longest
        if keep < 1:
            raise ValueError(f"example {index}: {what}, and no prompt token would remain after truncating the prompt")
        return dataclasses.replace(ex, prompt=ex.prompt[-keep:])
    # truncate_responses
    keep = max_length - len(ex.prompt)
    if keep < 1:
        raise ValueError(f"example {index}: {what}, and no response token would remain after truncating responses")
    return dataclasses.replace(ex, responses=[r[:keep] for r in ex.responses])


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
    shared = all(p == prompts[0] for p in prompts)
    return dataclasses.replace(ex, prompt=prompts[0], responses=responses, own_prompts=None if shared else prompts)


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
            **self._images(checked, placements),
            **{LAYOUT_KEY: layout},
        )

    @staticmethod
    def _images(checked: Sequence[PreferenceExample], placements) -> dict:
        """``pixel_values`` and ``image_grid_thw`` of every unit's prompt, once per unit, in the physical order of the
        units (row by row, left to right): the order in which the model fills the image tokens of ``input_ids``."""
        with_images = [i for i, ex in enumerate(checked) if ex.num_images]
        if not with_images:
            return {}
        width = checked[with_images[0]].pixel_values.shape[1]
        for i in with_images:
            if checked[i].pixel_values.shape[1] != width:
                raise ValueError(
                    f"example {i}: pixel_values rows have {checked[i].pixel_values.shape[1]} features but example "
                    f"{with_images[0]}'s have {width}; every image of a batch comes from the same processor"
                )
        ordered = [checked[pl.unit.example] for pl in sorted(placements, key=lambda pl: (pl.row, pl.offset))]
        ordered = [ex for ex in ordered if ex.num_images]
        return dict(
            pixel_values=torch.cat([ex.pixel_values for ex in ordered]),
            image_grid_thw=torch.cat([ex.image_grid_thw for ex in ordered]),
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
                slots, lengths = tuple(range(len(ex.responses))), tuple(map(len, ex.responses))
                units.append(UnitSpec(i, len(ex.prompt), slots, lengths, ex.num_images))
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
    return [UnitSpec(index, len(ex.prompt_of(k)), (k,), (len(ex.responses[k]),), ex.num_images) for k in responses]
