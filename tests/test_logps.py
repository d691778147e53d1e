"""The splitter: the same log-probs from shared, paired, packed and unpacked batches, in input order.

The logits at a physical position are filled from a table indexed by (example, response slot, logical
position) (prompt positions by (example, position) alone), which is what a model computes under the
attention rule. Every format must then give exactly the same sums, equal to the sums computed here
directly from the table.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixshare.collators import PairedCollator, PrefixShareCollator
from prefixshare.logps import ResponseLogps, gather_response_logps, split_logps
from prefixshare.patch import mark_layout_applied

SETTINGS = settings(max_examples=40, deadline=None)
V = 11


@st.composite
def case_strategy(draw, K=None):
    K = K if K is not None else draw(st.integers(1, 4))
    n = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    examples, prompt_tables, response_tables = [], [], []
    for _ in range(n):
        p = draw(st.integers(1, 6))
        lengths = [draw(st.integers(1, 5)) for _ in range(K)]
        examples.append(
            {
                "prompt_input_ids": torch.randint(0, V, (p,), generator=g).tolist(),
                "responses_input_ids": [torch.randint(0, V, (m,), generator=g).tolist() for m in lengths],
            }
        )
        prompt_tables.append(torch.randn(p, V, generator=g) * 3)  # logits at logical positions 0..p-1
        response_tables.append([torch.randn(m, V, generator=g) * 3 for m in lengths])  # positions p..p+m-1
    return examples, prompt_tables, response_tables, seed


def fill_logits(batch, prompt_tables, response_tables, seed, dtype=torch.float32):
    """Logits of ``batch`` as a model obeying the rule would give them: a function of the logical context."""
    layout = batch.layout
    B, L = layout.shape
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(seed + 1)) * 100  # padding: garbage
    for pl in layout.placements:
        u = pl.unit
        p = u.prompt_length
        logits[pl.row, pl.offset : pl.offset + p] = prompt_tables[u.example]
        cursor = pl.offset + p
        for slot, m in zip(u.response_slots, u.response_lengths):
            logits[pl.row, cursor : cursor + m] = response_tables[u.example][slot]
            cursor += m
    return mark_layout_applied(logits.to(dtype), layout)  # hand-made logits that obey the rule


def direct_logps(examples, prompt_tables, response_tables) -> torch.Tensor:
    """``[n, K]``: sum over each response of log p(token), predictor = previous logical position."""
    n, K = len(examples), len(examples[0]["responses_input_ids"])
    out = torch.zeros(n, K, dtype=torch.float64)
    for i, ex in enumerate(examples):
        for k, tokens in enumerate(ex["responses_input_ids"]):
            # rows for logical positions p-1 .. p+m-2: the last prompt row, then the response's own rows
            rows = torch.cat([prompt_tables[i][-1:], response_tables[i][k][:-1]])
            logprobs = torch.log_softmax(rows.double(), dim=-1)
            out[i, k] = sum(logprobs[t, tok] for t, tok in enumerate(tokens))
    return out


def all_batches(examples):
    """Shared, packed shared, paired and packed paired batches of the same examples."""
    longest = max(len(e["prompt_input_ids"]) + sum(map(len, e["responses_input_ids"])) for e in examples)
    return {
        "shared": PrefixShareCollator(pad_token_id=0)(examples),
        "shared packed": PrefixShareCollator(pad_token_id=0, max_tokens_per_row=longest + 7, pad_to_multiple_of=4)(
            examples
        ),
        "paired": PairedCollator(pad_token_id=0)(examples),
        "paired packed": PairedCollator(pad_token_id=0, max_tokens_per_row=longest)(examples),
    }


@SETTINGS
@given(case=case_strategy())
def test_all_formats_agree_with_the_direct_sum(case):
    examples, prompt_tables, response_tables, seed = case
    expected = direct_logps(examples, prompt_tables, response_tables)
    K = len(examples[0]["responses_input_ids"])
    results = {}
    for name, batch in all_batches(examples).items():
        logits = fill_logits(batch, prompt_tables, response_tables, seed)
        result = gather_response_logps(logits, batch)
        assert isinstance(result, ResponseLogps)
        assert result.logps.dtype == torch.float32 and result.logps.shape == (len(examples), K)
        assert result.num_tokens.tolist() == [[len(r) for r in e["responses_input_ids"]] for e in examples]
        results[name] = result.logps
        if K == 2:
            chosen, rejected = split_logps(logits, batch)
            assert torch.equal(chosen, result.logps[:, 0]) and torch.equal(rejected, result.logps[:, 1])
    reference = results["shared"]
    for name, logps in results.items():
        assert torch.equal(logps, reference), name  # exactly: the same rows, summed in the same order
    torch.testing.assert_close(reference.double(), expected, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(case=case_strategy(K=2))
def test_bf16_logits_give_float32(case):
    examples, prompt_tables, response_tables, seed = case
    for batch in all_batches(examples).values():
        logits = fill_logits(batch, prompt_tables, response_tables, seed, dtype=torch.bfloat16)
        chosen, rejected = split_logps(logits, batch)
        assert chosen.dtype == torch.float32 and rejected.dtype == torch.float32
        # the upcast happens before log_softmax: the same as float32 logits holding the bf16 values
        c32, r32 = split_logps(mark_layout_applied(logits.float(), batch.layout), batch)
        assert torch.equal(chosen, c32) and torch.equal(rejected, r32)


def test_packed_output_is_in_input_order():
    # lengths chosen so that first-fit-decreasing places the examples out of input order
    examples = [
        {"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]},
        {"prompt_input_ids": [1] * 5, "chosen_input_ids": [4] * 3, "rejected_input_ids": [5] * 2},
        {"prompt_input_ids": [1, 1], "chosen_input_ids": [6] * 2, "rejected_input_ids": [7]},
    ]
    batch = PrefixShareCollator(pad_token_id=0, max_tokens_per_row=12)(examples)
    assert [pl.unit.example for pl in batch.layout.placements][0] == 1  # the longest went first
    # uniform logits: each response's log-prob is -len * log V, distinct per example, so order shows
    logits = mark_layout_applied(torch.zeros(*batch["input_ids"].shape, V), batch.layout)
    chosen, rejected = split_logps(logits, batch)
    per_token = -torch.log(torch.tensor(float(V)))
    assert torch.allclose(chosen, torch.tensor([1.0, 3.0, 2.0]) * per_token)
    assert torch.allclose(rejected, torch.tensor([1.0, 2.0, 1.0]) * per_token)


def test_layout_with_input_ids():
    examples = [{"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5]}]
    batch = PrefixShareCollator(pad_token_id=0)(examples)
    logits = mark_layout_applied(torch.randn(*batch["input_ids"].shape, V), batch.layout)
    via_batch = split_logps(logits, batch)
    via_layout = split_logps(logits, batch.layout, input_ids=batch["input_ids"])
    assert all(torch.equal(a, b) for a, b in zip(via_batch, via_layout))
    with pytest.raises(TypeError, match="input_ids"):
        split_logps(logits, batch.layout)
    with pytest.raises(TypeError):
        split_logps(logits, {"input_ids": batch["input_ids"]})


def test_split_logps_needs_two_responses():
    examples = [{"prompt_input_ids": [1], "responses_input_ids": [[2], [3], [4]]}]
    batch = PrefixShareCollator(pad_token_id=0)(examples)
    logits = mark_layout_applied(torch.randn(*batch["input_ids"].shape, V), batch.layout)
    with pytest.raises(ValueError, match="K=3"):
        split_logps(logits, batch)
    assert gather_response_logps(logits, batch).logps.shape == (1, 3)


def test_logits_shape_mismatch_raises():
    examples = [{"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5]}] * 2
    batch = PrefixShareCollator(pad_token_id=0)(examples)
    B, L = batch["input_ids"].shape
    for shape in [(B, L + 1, V), (B + 1, L, V), (L, B, V)]:
        with pytest.raises(ValueError, match="do not match"):
            split_logps(torch.randn(*shape), batch)
