"""The layout against the rule's definition, rebuilt here by plain loops over the placements."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixshare.collators import PairedCollator, PrefixShareCollator
from prefixshare.layout import PAD_SEGMENT, PROMPT_SEGMENT, Placement, PrefixShareLayout, UnitSpec

SETTINGS = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------------------------- reference
def token_table(layout: PrefixShareLayout) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """(row, column) -> (unit number, segment, logical position, response slot or -1) of every real token."""
    table = {}
    for unit_number, pl in enumerate(layout.placements):
        u, col = pl.unit, pl.offset
        for t in range(u.prompt_length):
            table[pl.row, col] = (unit_number, 0, t, -1)
            col += 1
        for segment, (slot, n) in enumerate(zip(u.response_slots, u.response_lengths), start=1):
            for t in range(n):
                table[pl.row, col] = (unit_number, segment, u.prompt_length + t, slot)
                col += 1
    return table


def reference_mask(layout: PrefixShareLayout, window: int | None) -> torch.Tensor:
    """The attention rule from its definition: ``[B, L, L]`` bool."""
    B, L = layout.shape
    table = token_table(layout)
    mask = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            if (b, q) not in table:
                mask[b, q, q] = True  # padding attends to itself only
                continue
            q_unit, q_seg, q_pos, _ = table[b, q]
            for k in range(L):
                if (b, k) not in table:
                    continue
                k_unit, k_seg, k_pos, _ = table[b, k]
                ok = k_unit == q_unit and k <= q and (k_seg == 0 or k_seg == q_seg)
                if window is not None:
                    ok = ok and q_pos - k_pos < window
                mask[b, q, k] = ok
    return mask


def dense_mask(layout: PrefixShareLayout, window: int | None) -> torch.Tensor:
    B, L = layout.shape
    b = torch.arange(B)[:, None, None, None]
    q = torch.arange(L)[None, None, :, None]
    k = torch.arange(L)[None, None, None, :]
    h = torch.zeros((), dtype=torch.long)
    mask = layout.attention_predicate(window)(b, h, q, k)
    assert mask.dtype == torch.bool and mask.shape == (B, 1, L, L)
    return mask[:, 0]


def check_layout(layout: PrefixShareLayout, window: int | None) -> None:
    B, L = layout.shape
    table = token_table(layout)
    K = layout.num_responses

    assert torch.equal(dense_mask(layout, window), reference_mask(layout, window))

    # per-token ids
    for b in range(B):
        for t in range(L):
            if (b, t) in table:
                _, seg, pos, _ = table[b, t]
                assert layout.segment_ids[b, t] == seg
                assert layout.position_ids[b, t] == pos  # each response restarts at the prompt length
            else:
                assert layout.segment_ids[b, t] == PAD_SEGMENT
    assert layout.num_tokens == len(table)

    # predictors: the first response token from the last PROMPT token, the others from their predecessor
    expected = set()
    last_prompt = {}
    for (b, t), (unit, seg, pos, _) in table.items():
        if seg == PROMPT_SEGMENT:
            last_prompt[unit] = max(last_prompt.get(unit, -1), b * L + t)
    lengths = torch.zeros(layout.num_examples, K, dtype=torch.long)
    for (b, t), (unit, seg, pos, slot) in table.items():
        if seg == PROMPT_SEGMENT:
            continue
        example = layout.placements[unit].unit.example
        first = pos == layout.placements[unit].unit.prompt_length
        predictor = last_prompt[unit] if first else b * L + t - 1
        expected.add((b * L + t, predictor, example * K + slot))
        lengths[example, slot] += 1
    got = list(
        zip(layout.target_index.tolist(), layout.predictor_index.tolist(), layout.response_index.tolist())
    )
    assert len(set(layout.target_index.tolist())) == len(got)  # no target twice
    assert set(got) == expected and len(got) == len(expected)
    assert torch.equal(layout.response_lengths, lengths)
    for tensor in (layout.target_index, layout.predictor_index, layout.response_index):
        assert tensor.dtype == torch.long


# ---------------------------------------------------------------------------------------------- strategies
@st.composite
def examples_strategy(draw, max_examples=4):
    K = draw(st.integers(1, 4))
    n = draw(st.integers(1, max_examples))
    out = []
    for _ in range(n):
        prompt = draw(st.integers(1, 6))
        responses = [draw(st.integers(1, 5)) for _ in range(K)]
        out.append(
            {
                "prompt_input_ids": [1] * prompt,
                "responses_input_ids": [[2] * r for r in responses],
            }
        )
    return out


@st.composite
def placements_strategy(draw):
    """Units placed by hand, with padding gaps before, between and after them."""
    K = draw(st.integers(1, 4))
    n = draw(st.integers(1, 4))
    rows = draw(st.integers(1, 3))
    specs = []
    for i in range(n):
        shared = draw(st.booleans())
        slots = [tuple(range(K))] if shared else [(k,) for k in range(K)]
        prompt = draw(st.integers(1, 5))
        lengths = [draw(st.integers(1, 4)) for _ in range(K)]
        for s in slots:
            specs.append(UnitSpec(i, prompt, s, tuple(lengths[k] for k in s)))
    order = draw(st.permutations(range(len(specs))))
    cursor = [0] * rows
    placements = []
    for j in order:
        row = draw(st.integers(0, rows - 1))
        cursor[row] += draw(st.integers(0, 2))  # a padding gap
        placements.append(Placement(row, cursor[row], specs[j]))
        cursor[row] += specs[j].length
    L = max(cursor) + draw(st.integers(0, 3))
    return PrefixShareLayout.from_placements(
        placements, num_rows=rows, row_length=max(L, 1), num_examples=n, num_responses=K
    )


windows = st.one_of(st.none(), st.integers(1, 8))


# ---------------------------------------------------------------------------------------------- tests
@SETTINGS
@given(examples=examples_strategy(), budget=st.one_of(st.none(), st.integers(25, 40)), window=windows,
       paired=st.booleans())
def test_collated_layout_matches_definition(examples, budget, window, paired):
    cls = PairedCollator if paired else PrefixShareCollator
    batch = cls(pad_token_id=0, max_tokens_per_row=budget, pad_to_multiple_of=4)(examples)
    check_layout(batch.layout, window)


@SETTINGS
@given(layout=placements_strategy(), window=windows)
def test_placed_layout_matches_definition(layout, window):
    check_layout(layout, window)


@settings(max_examples=25, deadline=None)
@given(layout=placements_strategy(), window=windows, extra=st.integers(0, 5))
def test_padded_layout_matches_definition(layout, window, extra):
    padded = layout.padded(layout.shape[1] + extra)
    assert padded.shape == (layout.shape[0], layout.shape[1] + extra)
    check_layout(padded, window)


def test_docstring_example():
    unit = UnitSpec(example=0, prompt_length=3, response_slots=(0, 1), response_lengths=(4, 2))
    layout = PrefixShareLayout.from_placements(
        [Placement(0, 0, unit)], num_rows=1, row_length=11, num_examples=1, num_responses=2
    )
    assert layout.segment_ids[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1]
    assert layout.position_ids[0, :9].tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4]
    # the rejected response's first token (column 7) is predicted by the last prompt token (column 2)
    pairs = dict(zip(layout.target_index.tolist(), layout.predictor_index.tolist()))
    assert pairs[7] == 2 and pairs[3] == 2 and pairs[8] == 7
    mask = dense_mask(layout, None)[0]
    assert not mask[7, 3:7].any()  # rejected never sees chosen
    assert mask[7, :3].all()
    assert mask[9].tolist() == [False] * 9 + [True, False]  # padding sees itself only


def test_unit_that_does_not_fit_raises():
    unit = UnitSpec(example=3, prompt_length=3, response_slots=(0,), response_lengths=(4,))
    try:
        PrefixShareLayout.from_placements([Placement(0, 2, unit)], num_rows=1, row_length=8, num_examples=4,
                                          num_responses=1)
    except ValueError as err:
        assert "example 3" in str(err)
    else:
        raise AssertionError("expected ValueError")
