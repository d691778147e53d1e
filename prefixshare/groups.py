"""Prompts and their sampled completions (GRPO, RLOO, any online RL loop) as prefix-shared batches.

Online RL samples every prompt G times and scores each ``prompt + completion`` row: the row format runs the
prompt through the model G times. :func:`group_completions` finds the rows that share a prompt (by its token
ids, wherever they sit in the batch) and lays each group out as one unit
``[prompt | completion 1 | ... | completion k]``; :func:`completion_logps` runs the log-prob engine on those
units and returns the per-token log-probs (and statistics) in the row format's own layout, ``[rows,
completion_length]``, with zeros where a row has no token::

    groups = prefixshare.group_completions(prompt_ids, completion_ids,
                                           prompt_mask=prompt_mask, completion_mask=completion_mask)
    out = prefixshare.completion_logps(model, groups, stats=("entropy",), temperature=1.0)
    out.logps, out.mask, out.stats["entropy"]        # [rows, C] float32 (logps with their graph), bool, float32

The input is what RL loops hold: prompt rows left-padded (TRL) or unpadded lists, completion rows
right-padded or unpadded lists, with optional 0/1 masks. Padding is stripped by the masks and never scored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .collators import INT64_MAX, PrefixShareBatch, is_numpy_array
from .engine import response_logps
from .layout import LAYOUT_KEY, PrefixShareLayout, UnitSpec, place_in_rows
from .packing import first_fit_decreasing

__all__ = ["CompletionGroups", "CompletionLogps", "completion_logps", "group_completions"]


@dataclass(frozen=True, eq=False)
class CompletionGroups:
    """Rows of ``prompt + completion`` regrouped by prompt into prefix-shared batches.

    Attributes:
        batches: the prefix-shared batches, one per model forward (see ``max_completions_per_forward``).
            In each, an *example* is one group piece (a prompt and up to K of its completions) and its
            responses are those completions.
        slots: for each batch, ``[examples, K]`` long: the input row of each (example, response) slot,
            -1 where the slot is empty.
        num_rows: rows of the input (completions), the first dimension of every per-token output.
        completion_length: ``C``, the second dimension: the input's completion width (the longest
            completion for unpadded input).
        completion_lengths: ``[num_rows]`` long, the tokens scored per row (0 for an empty completion).
        num_prompts: distinct prompts found.
        token_weights: for each batch, ``[B, L]`` float32: how many input rows hold each token of the batch (a
            prompt token: the rows of its prompt this unit stands for; a completion token 1; padding 0): the
            count the row format's forward routes each token with, for the MoE load-balancing loss
            (:func:`prefixshare.moe.load_balancing_loss`). Rows with an empty completion add to their prompt's
            first unit; a prompt whose completions are all empty is only laid out with ``keep_empty_groups=True``.
    """

    batches: tuple[PrefixShareBatch, ...]
    slots: tuple[torch.Tensor, ...]
    num_rows: int
    completion_length: int
    completion_lengths: torch.Tensor
    num_prompts: int
    token_weights: tuple[torch.Tensor, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Tokens the prefix-shared forwards process (padding excluded)."""
        return sum(b[LAYOUT_KEY].num_tokens for b in self.batches)

    def to(self, device, non_blocking: bool = False) -> "CompletionGroups":
        """The same groups with every batch on ``device``."""
        return CompletionGroups(
            tuple(b.to(device, non_blocking=non_blocking) for b in self.batches),
            self.slots,
            self.num_rows,
            self.completion_length,
            self.completion_lengths,
            self.num_prompts,
            self.token_weights,
        )

    def mask(self, device=None) -> torch.Tensor:
        """``[num_rows, completion_length]`` bool: True where a row has a scored token."""
        columns = torch.arange(self.completion_length)
        return (columns.unsqueeze(0) < self.completion_lengths.unsqueeze(1)).to(device)


class CompletionLogps(NamedTuple):
    """Per-token results in the row layout ``[rows, completion_length]``.

    logps: float32 log p of each completion token (under ``softmax(logits / temperature)``), with its
        graph; 0.0 where ``mask`` is False.
    mask: bool, True where the row has a token.
    stats: ``{name: [rows, completion_length] float32}`` per-token statistics (no gradient; the ``entropy``
        with its graph under ``completion_logps(..., entropy_grad=True)``), 0.0 where ``mask`` is False.
    """

    logps: torch.Tensor
    mask: torch.Tensor
    stats: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- input
def _as_tensor(value: Any) -> Any:
    if is_numpy_array(value) and value.dtype.kind in "iub":
        return torch.from_numpy(value)
    return value


def _rows_of(value: Any, name: str, *, mask: bool = False) -> list[list[int]]:
    """A sequence of 1-D sequences (lists, tensors, arrays) as lists of ints; errors name the row."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a 2-D tensor [rows, length] or a list of rows, got {type(value).__name__}")
    rows = []
    for i, row in enumerate(value):
        if is_numpy_array(row) or isinstance(row, torch.Tensor):
            if row.ndim != 1:
                raise ValueError(f"row {i}: {name} must be 1-D, got shape {tuple(row.shape)}")
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise ValueError(f"row {i}: {name} must be a list of integers, got {type(row).__name__}")
        for j, t in enumerate(row):
            if isinstance(t, float) or (isinstance(t, bool) and not mask) or not hasattr(t, "__index__"):
                raise ValueError(f"row {i}: {name}[{j}] is {t!r} ({type(t).__name__}); expected an integer")
            if mask and t not in (0, 1):
                raise ValueError(f"row {i}: {name}[{j}] is {t!r}; a mask holds 0 (padding) and 1 (token) only")
            if not mask and not 0 <= t <= INT64_MAX:
                raise ValueError(f"row {i}: {name}[{j}] is {t}; token ids must be >= 0 and fit in int64")
        rows.append([int(t) for t in row])
    return rows


def _check_tensor(value: torch.Tensor, name: str, *, mask: bool = False) -> torch.Tensor:
    if value.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, length] or a list of rows, got shape {tuple(value.shape)}")
    if value.dtype.is_floating_point or value.dtype.is_complex or (value.dtype == torch.bool and not mask):
        raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
    value = value.detach().to("cpu", torch.long)
    bad = ((value != 0) & (value != 1)) if mask else (value < 0)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        what = "a mask holds 0 (padding) and 1 (token) only" if mask else "token ids must be >= 0"
        raise ValueError(f"row {i}: {name}[{j}] is {int(value[i, j])}; {what}")
    return value


def _rows_and_masks(ids: Any, mask: Any, name: str, mask_name: str):
    """``(ids [R, W] long, mask [R, W] long)`` on the CPU, or lists of rows when ``ids`` is a list (ragged)."""
    ids, mask = _as_tensor(ids), _as_tensor(mask)
    if isinstance(ids, torch.Tensor):
        ids = _check_tensor(ids, name)
        if mask is None:
            return ids, torch.ones_like(ids)
        if not isinstance(mask, torch.Tensor):
            mask = torch.tensor(_rows_of(mask, mask_name, mask=True)) if len(mask) else torch.zeros(0, 0)
        mask = _check_tensor(mask, mask_name, mask=True)
        if mask.shape != ids.shape:
            raise ValueError(f"{mask_name} has shape {tuple(mask.shape)} but {name} has {tuple(ids.shape)}")
        return ids, mask
    rows = _rows_of(ids, name)
    if mask is None:
        return rows, [[1] * len(r) for r in rows]
    masks = _rows_of(mask.tolist() if isinstance(mask, torch.Tensor) else mask, mask_name, mask=True)
    if len(masks) != len(rows):
        raise ValueError(f"{mask_name} has {len(masks)} rows but {name} has {len(rows)}")
    for i, (m, r) in enumerate(zip(masks, rows)):
        if len(m) != len(r):
            raise ValueError(f"row {i}: {mask_name} has {len(m)} entries but {name} has {len(r)}")
    return rows, masks


def _prompts(ids, mask) -> list[tuple[int, ...]]:
    """Each row's prompt: its one contiguous run of mask ones (left padding, as TRL pads, or right padding)."""
    if isinstance(ids, torch.Tensor):
        R, W = ids.shape
        n = mask.sum(1)
        first = mask.argmax(1)  # the first 1 (0 for an all-zero row, whose n is 0)
        last = W - 1 - mask.flip(1).argmax(1)
        holes = (n > 0) & (last - first + 1 != n)
        spans = list(zip(first.tolist(), n.tolist()))
        rows = ids.tolist()
    else:
        rows, holes, spans = ids, [], []
        for m in mask:
            ones = [j for j, v in enumerate(m) if v]
            holes.append(bool(ones) and ones[-1] - ones[0] + 1 != len(ones))
            spans.append((ones[0], len(ones)) if ones else (0, 0))
        holes = torch.tensor(holes, dtype=torch.bool)
    if bool(holes.any()):
        i = int(holes.nonzero()[0])
        m = mask[i].tolist() if isinstance(mask, torch.Tensor) else mask[i]
        raise ValueError(
            f"row {i}: prompt_mask {m[:24]}{' ...' if len(m) > 24 else ''} has 0s between its 1s; a prompt must be "
            "one contiguous run of tokens with its padding on one side"
        )
    return [tuple(row[f : f + n]) for row, (f, n) in zip(rows, spans)]


def _completions(ids, mask) -> tuple[list[list[int]], list[int], int]:
    """``(tokens of each row, lengths, width C)``; masks must be ones then zeros (right padding, as TRL pads)."""
    if isinstance(ids, torch.Tensor):
        R, W = ids.shape
        n = mask.sum(1)
        expected = (torch.arange(W).unsqueeze(0) < n.unsqueeze(1)).long()
        wrong = (mask != expected).any(1)
        lengths = n.tolist()
        rows, width = ids.tolist(), W
    else:
        rows, lengths = ids, [sum(m) for m in mask]
        wrong = torch.tensor([any(m[k:]) or not all(m[:k]) for m, k in zip(mask, lengths)], dtype=torch.bool)
        width = max((len(r) for r in rows), default=0)
    if bool(wrong.any()):
        i = int(wrong.nonzero()[0])
        m = mask[i].tolist() if isinstance(mask, torch.Tensor) else mask[i]
        raise ValueError(
            f"row {i}: completion_mask {m[:24]}{' ...' if len(m) > 24 else ''} is not 1s followed by 0s; completions "
            "must start at column 0 and be right-padded (the output puts token j of a completion in column j)"
        )
    return [row[:k] for row, k in zip(rows, lengths)], lengths, width


class PromptImages(NamedTuple):
    """The images of one prompt row: ``pixel_values`` ``[n_patches, D]`` floating and ``image_grid_thw``
    ``[n_images, 3]`` long (one ``(t, h, w)`` per image, ``t * h * w`` patches each), as the processor gives them."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    def equal(self, other: "PromptImages") -> bool:
        return torch.equal(self.image_grid_thw, other.image_grid_thw) and (
            self.pixel_values.dtype == other.pixel_values.dtype and torch.equal(self.pixel_values, other.pixel_values)
        )


def _row_images(entry: Any, row: int) -> PromptImages | None:
    """One row's ``images`` entry, checked: None, or pixel_values and image_grid_thw that agree."""
    if entry is None:
        return None
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - set(PromptImages._fields))
        if unknown:
            raise ValueError(f"prompt row {row}: images has {unknown}; give pixel_values and image_grid_thw only")
        pixels, grid = entry.get("pixel_values"), entry.get("image_grid_thw")
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
        pixels, grid = entry
    else:
        raise ValueError(
            f"prompt row {row}: images entry must be None, a (pixel_values, image_grid_thw) pair or a mapping of "
            f"them, got {type(entry).__name__}"
        )
    if not isinstance(pixels, torch.Tensor) or not isinstance(grid, torch.Tensor):
        raise ValueError(f"prompt row {row}: pixel_values and image_grid_thw must be tensors")
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.dtype.is_floating_point or bool((grid < 1).any()):
        raise ValueError(
            f"prompt row {row}: image_grid_thw must be [n_images, 3] positive integers, got shape {tuple(grid.shape)}"
        )
    if grid.shape[0] == 0:
        return None
    if pixels.dim() != 2 or not pixels.dtype.is_floating_point or pixels.shape[0] != int(grid.prod(-1).sum()):
        raise ValueError(
            f"prompt row {row}: pixel_values must be [n_patches, D] floating with n_patches = sum of t * h * w of "
            f"image_grid_thw {grid.tolist()} ({int(grid.prod(-1).sum())}), got shape {tuple(pixels.shape)} "
            f"and dtype {pixels.dtype}"
        )
    return PromptImages(pixels, grid.long())


def _image_key(images: PromptImages | None) -> tuple:
    """What identifies a prompt's images for grouping: the grids, dtype, shape and a digest of the pixels' bytes
    (rows with equal keys are also compared element by element)."""
    if images is None:
        return ()
    pixels = images.pixel_values.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(pixels.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
    grid = tuple(tuple(g) for g in images.image_grid_thw.tolist())
    return (grid, str(pixels.dtype), tuple(pixels.shape), digest)


def _positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


# ---------------------------------------------------------------------------------------------- grouping
def group_completions(
    prompt_ids,
    completion_ids,
    *,
    prompt_mask=None,
    completion_mask=None,
    num_generations: int | None = None,
    pad_token_id: int = 0,
    max_tokens_per_row: int | None = None,
    max_completions_per_forward: int | None = None,
    pad_to_multiple_of: int | None = None,
    keep_empty_groups: bool = False,
    images=None,
) -> CompletionGroups:
    """Group completion rows by prompt into prefix-shared batches ``[prompt | completion 1 | ... | completion k]``.

    Two input forms:

    * rows (``num_generations=None``): ``prompt_ids`` and ``completion_ids`` have one row per completion, prompts
      repeated (TRL's layout). Rows whose prompt tokens are equal form one group, wherever they are in the batch.
    * groups (``num_generations=G``): ``prompt_ids`` has one row per prompt and ``completion_ids`` G rows per
      prompt, prompt ``i`` owning completion rows ``i*G ... i*G+G-1``.

    Args:
        prompt_ids: a 2-D integer tensor ``[rows, P]`` (padded, e.g. left-padded as TRL pads prompts) or a list of
            rows (lists, 1-D tensors or arrays of token ids).
        completion_ids: a 2-D integer tensor ``[rows, C]`` (right-padded) or a list of rows.
        prompt_mask: 0/1 of the same shape as ``prompt_ids`` (None: every position is a token). The ones must be
            contiguous.
        completion_mask: 0/1 of the same shape as ``completion_ids`` (None: every position is a token). The ones
            must come first (right padding); a row of zeros is an empty completion (e.g. TRL's
            ``mask_truncated_completions``): no token of it is scored.
        num_generations: see above.
        pad_token_id: written into the batches' padding (never attended to, never scored).
        max_tokens_per_row: pack units first-fit-decreasing into rows of at most this many tokens; a group too
            long for one row is split into several units (each with the prompt); one prompt+completion longer
            than the budget gets a row of its own. None: one unit per row.
        max_completions_per_forward: at most this many completions per model forward (each a batch of its own);
            a bigger group is split into units of this many. None: a single forward.
        pad_to_multiple_of: round each batch's row length up to a multiple of this.
        keep_empty_groups: also lay out the prompts whose completions are all empty, each as a unit
            ``[prompt | one padding token]`` from which nothing is read, so that the forwards route every prompt
            the row format's forward routes (the MoE load-balancing loss counts them: see ``token_weights``).
            False (default): such prompts are not computed.
        images: the images of each prompt row, for a vision-language model with Qwen2-VL-style 3D rotary positions
            (:mod:`prefixshare.vision`): one entry per row of ``prompt_ids``, ``None`` (no image) or a mapping (or
            pair) of ``pixel_values`` ``[n_patches, D]`` and ``image_grid_thw`` ``[n_images, 3]`` as the processor
            gives them, the prompt holding the images' tokens expanded. Rows are grouped only when their prompt
            tokens AND their images are equal (two prompts of the same text and image size with other pixels are
            two groups); every unit's images are in its batch once, in the physical order of the units.

    Returns:
        :class:`CompletionGroups`, for :func:`completion_logps`. Output rows follow the input's completion rows.

    Raises:
        ValueError: naming the row and the field: ids that are not integers >= 0, masks of another shape or with
            values other than 0/1, a prompt mask with holes, a completion mask that is not ones then zeros, an
            empty prompt before a non-empty completion, row counts that do not match (or ``num_generations``
            that does not divide them), bad option values.
    """
    _positive("num_generations", num_generations)
    _positive("max_tokens_per_row", max_tokens_per_row)
    _positive("max_completions_per_forward", max_completions_per_forward)
    _positive("pad_to_multiple_of", pad_to_multiple_of)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id <= INT64_MAX:
        raise ValueError(f"pad_token_id must be an integer token id >= 0, got {pad_token_id!r}")

    prompt_tokens = _prompts(*_rows_and_masks(prompt_ids, prompt_mask, "prompt_ids", "prompt_mask"))
    completions, lengths, C = _completions(
        *_rows_and_masks(completion_ids, completion_mask, "completion_ids", "completion_mask")
    )

    N = len(completions)
    if num_generations is None:
        if len(prompt_tokens) != N:
            raise ValueError(
                f"prompt_ids has {len(prompt_tokens)} rows and completion_ids {N}: give one prompt row per completion "
                "(prompts repeated), or one per prompt with num_generations=G completions each"
            )
        owner = list(range(N))
    else:
        if len(prompt_tokens) * num_generations != N:
            raise ValueError(
                f"num_generations={num_generations} with {len(prompt_tokens)} prompts needs "
                f"{len(prompt_tokens) * num_generations} "
                f"completion rows, got {N}"
            )
        owner = [r // num_generations for r in range(N)]
    if N == 0:
        raise ValueError("no completions: completion_ids has no rows")
    # Each prompt row's key: its tokens, and what identifies its images (equal keys <=> equal prompts and images).
    prompt_images: dict[tuple, PromptImages] = {}
    if images is not None:
        if isinstance(images, (str, bytes, Mapping)) or not hasattr(images, "__len__"):
            raise ValueError("images must be a sequence with one entry (None or the row's images) per prompt row")
        if len(images) != len(prompt_tokens):
            raise ValueError(f"images has {len(images)} entries but prompt_ids has {len(prompt_tokens)} rows")
        keyed = []
        for i, (tokens, entry) in enumerate(zip(prompt_tokens, images)):
            row_images = _row_images(entry, i)
            key = (tokens, _image_key(row_images))
            known = prompt_images.setdefault(key, row_images)
            if row_images is not None and known is not row_images and not known.equal(row_images):
                raise ValueError(f"prompt row {i}: two different images have the same digest")  # pragma: no cover
            keyed.append(key)
        prompt_tokens = keyed
    else:
        prompt_tokens = [(tokens, ()) for tokens in prompt_tokens]

    # Group the rows with a token to score by their prompt's tokens.
    groups: dict[tuple[int, ...], list[int]] = {}
    empty_rows: dict[tuple[int, ...], int] = {}  # rows without a completion token, by their (non-empty) prompt
    for r in range(N):
        prompt = prompt_tokens[owner[r]]
        if lengths[r] == 0:
            if prompt[0]:
                empty_rows[prompt] = empty_rows.get(prompt, 0) + 1
            continue
        if not prompt[0]:
            where = f"prompt row {owner[r]}" if num_generations else f"row {r}"
            raise ValueError(
                f"{where}: the prompt is empty (prompt_mask all 0 or no ids) but completion row {r} has "
                f"{lengths[r]} tokens; the first completion token needs a prompt token to predict it"
            )
        groups.setdefault(prompt, []).append(r)
    # A canonical order (prompts, and completions within a group, sorted by their tokens): the layout depends on
    # which rows are given, not on their order, so shuffled copies of a batch (TRL shuffles between the old-policy
    # and the policy forward) are laid out, and rounded, identically.
    num_prompts = len(groups)
    if keep_empty_groups:
        groups.update({prompt: [] for prompt in empty_rows if prompt not in groups})
    groups = {prompt: sorted(rows, key=lambda r: (completions[r], r)) for prompt, rows in sorted(groups.items())}

    # Pieces: a prompt, the completions of one unit (split to respect the two budgets) and the number of input rows
    # its prompt stands for (its completions', plus the group's empty rows on its first piece).
    pieces: list[tuple[tuple[int, ...], list[int], int]] = []
    for prompt, rows in groups.items():
        piece: list[int] = []
        size, extra = len(prompt[0]), empty_rows.get(prompt, 0)
        for r in rows:
            full_count = max_completions_per_forward is not None and len(piece) == max_completions_per_forward
            full_tokens = max_tokens_per_row is not None and piece and size + lengths[r] > max_tokens_per_row
            if full_count or full_tokens:
                pieces.append((prompt, piece, len(piece) + extra))
                piece, size, extra = [], len(prompt[0]), 0
            piece.append(r)
            size += lengths[r]
        if piece or extra:
            pieces.append((prompt, piece, len(piece) + extra))

    # Forwards: consecutive pieces, at most max_completions_per_forward completions each.
    forwards: list[list[int]] = []
    count = 0
    for p, (_, rows, _) in enumerate(pieces):
        if not forwards or (max_completions_per_forward is not None and count + len(rows) > max_completions_per_forward):
            forwards.append([])
            count = 0
        forwards[-1].append(p)
        count += len(rows)

    if not pieces:
        # Nothing to score (every completion empty): one two-token unit of padding, from which nothing is read,
        # keeps completion_logps' output on the model's graph, as a forward on all-masked rows does in the row
        # format (a loss without a graph would fail in backward, and ranks would skip a forward).
        pieces, forwards = [(((pad_token_id,), ()), [], 0)], [[0]]
    built = [
        _build_batch(
            [pieces[p] for p in members], completions, lengths, pad_token_id, max_tokens_per_row, pad_to_multiple_of,
            prompt_images,
        )
        for members in forwards
    ]
    batches, slots, weights = zip(*built)
    return CompletionGroups(batches, slots, N, C, torch.tensor(lengths, dtype=torch.long), num_prompts, weights)


def _build_batch(pieces, completions, lengths, pad_token_id, max_tokens_per_row, pad_to_multiple_of, prompt_images):
    """One prefix-shared batch of the given pieces (example i = piece i, response k = its k-th completion), its
    ``[examples, K]`` slots (input rows, -1 where empty) and its ``[B, L]`` token weights. A piece without
    completions is laid out as ``[prompt | one padding token]``: routed, never read (slot -1). A piece's prompt is
    its key ``(tokens, image key)``; ``prompt_images`` maps a key to the prompt's images, if any."""
    K = max(max(len(rows) for _, rows, _ in pieces), 1)
    piece_images = [prompt_images.get(key) for key, _, _ in pieces]
    units = [
        UnitSpec(example=i, prompt_length=len(key[0]), response_slots=tuple(range(max(len(rows), 1))),
                 response_lengths=tuple(lengths[r] for r in rows) or (1,),
                 num_images=0 if piece_images[i] is None else piece_images[i].num_images)
        for i, (key, rows, _) in enumerate(pieces)
    ]  # fmt: skip
    if max_tokens_per_row is None:
        bins = [[i] for i in range(len(units))]
    else:
        # a unit longer than the budget (one prompt+completion that alone exceeds it) gets a row of its own
        fits = [i for i, u in enumerate(units) if u.length <= max_tokens_per_row]
        bins = [[fits[j] for j in b] for b in first_fit_decreasing([units[i].length for i in fits], max_tokens_per_row)]
        bins += [[i] for i, u in enumerate(units) if u.length > max_tokens_per_row]
    placements, L = place_in_rows(units, bins, pad_to_multiple_of)
    max_id = pad_token_id
    input_ids = torch.full((len(bins), L), pad_token_id, dtype=torch.long)
    weights = torch.zeros((len(bins), L), dtype=torch.float32)
    for pl in placements:
        (prompt, _), rows, prompt_weight = pieces[pl.unit.example]
        ids = list(prompt)
        for r in rows:
            ids.extend(completions[r][: lengths[r]])
        max_id = max(max_id, max(ids))
        input_ids[pl.row, pl.offset : pl.offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
        weights[pl.row, pl.offset : pl.offset + len(prompt)] = prompt_weight
        weights[pl.row, pl.offset + len(prompt) : pl.offset + len(ids)] = 1.0
    layout = PrefixShareLayout.from_placements(
        placements, num_rows=len(bins), row_length=L, num_examples=len(pieces), num_responses=K, max_token_id=max_id
    )
    slot = torch.full((len(pieces), K), -1, dtype=torch.long)
    for i, (_, rows, _) in enumerate(pieces):
        slot[i, : len(rows)] = torch.tensor(rows, dtype=torch.long)
    # every unit's images once, in the physical order of the units: the order the model fills image tokens in
    ordered = [piece_images[pl.unit.example] for pl in sorted(placements, key=lambda pl: (pl.row, pl.offset))]
    ordered = [im for im in ordered if im is not None]
    media = {}
    if ordered:
        media = dict(pixel_values=torch.cat([im.pixel_values for im in ordered]),
                     image_grid_thw=torch.cat([im.image_grid_thw for im in ordered]))  # fmt: skip
    batch = PrefixShareBatch(
        input_ids=input_ids, position_ids=layout.position_ids, use_cache=False, **media, **{LAYOUT_KEY: layout}
    )
    return batch, slot, weights


# ---------------------------------------------------------------------------------------------- log-probs
def completion_logps(
    model,
    groups: CompletionGroups,
    *,
    stats=(),
    temperature: float = 1.0,
    chunk_size: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    entropy_grad: bool = False,
) -> CompletionLogps:
    """Per-token log-probs of every completion, in the row layout ``[rows, completion_length]``.

    Runs :func:`prefixshare.response_logps` (the log-prob engine: no ``[T, V]`` logits) on each batch of
    ``groups`` and puts token ``j`` of completion row ``r`` at ``[r, j]``. Equal, values and gradients, to
    running each ``prompt + completion`` alone through the unpatched model and scoring the completion's tokens
    under ``softmax(logits / temperature)``.

    Args:
        model: a model patched with :func:`prefixshare.patch` (or a peft/DDP/FSDP wrapper around one).
        groups: from :func:`group_completions`; its batches are moved to the model's device when needed.
        stats: per-token statistics of :data:`prefixshare.STATS` (e.g. ``("entropy",)``), no gradient unless
            ``entropy_grad``.
        temperature: the sampling temperature the completions were drawn with (TRL's ``args.temperature``).
        chunk_size: rows of the LM head per chunk (see :func:`prefixshare.response_logps`).
        model_kwargs: extra keyword arguments of every forward (e.g. ``output_router_logits=True``).
        entropy_grad: ``stats["entropy"]`` carries its graph (``"entropy"`` must be in ``stats``; see
            :func:`prefixshare.response_logps`), for an entropy bonus in the loss.

    Returns:
        :class:`CompletionLogps`: ``logps`` ``[rows, C]`` float32 with its graph, ``mask`` ``[rows, C]`` bool and
        ``stats`` ``{name: [rows, C]}``; zeros wherever ``mask`` is False. Rows without a token get zeros
        (still connected to the model's graph when some other row has a token).
    """
    if not isinstance(groups, CompletionGroups):
        raise TypeError(f"completion_logps takes the result of prefixshare.group_completions, got {type(groups).__name__}")
    device = _model_device(model)
    N, C = groups.num_rows, groups.completion_length
    flats, values, stat_values = [], [], {}
    for batch, slot in zip(groups.batches, groups.slots):
        if device is not None and batch["input_ids"].device != device:
            batch = batch.to(device)
        inputs = {**batch, **model_kwargs} if model_kwargs else batch
        out = response_logps(model, inputs, per_token=True, stats=stats, temperature=temperature, chunk_size=chunk_size,
                             entropy_grad=entropy_grad)  # fmt: skip
        index = out.token_index
        rows = slot.to(out.token_logps.device)[index.example, index.response]
        # tokens of units nothing is read from (slot -1) go to a spare last entry, dropped below: no device sync
        flats.append(torch.where(rows >= 0, rows * C + index.position, N * C))
        values.append(out.token_logps)
        for name, v in (out.stats or {}).items():
            stat_values.setdefault(name, []).append(v)
    flat = torch.cat(flats)
    token_logps = torch.cat(values)
    # Rows without a token get zeros; the result stays on the model's graph whenever a forward ran.
    logps = token_logps.new_zeros(N * C + 1).index_put((flat,), token_logps)[: N * C].view(N, C)
    scattered = {
        name: torch.zeros(N * C + 1, dtype=torch.float32, device=flat.device)
        .index_put_((flat,), torch.cat(v))[: N * C]
        .view(N, C)
        for name, v in stat_values.items()
    }
    return CompletionLogps(logps, groups.mask(flat.device), scattered)


def _model_device(model) -> torch.device | None:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return None
