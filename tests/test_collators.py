"""Collators: every example once and in its place, budgets respected, and every bad input named."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixshare.collators import LAYOUT_KEY, PairedCollator, PrefixShareBatch, PrefixShareCollator
from prefixshare.layout import PAD_SEGMENT

SETTINGS = settings(max_examples=60, deadline=None)
PAD = 0


# ---------------------------------------------------------------------------------------------- helpers
@st.composite
def examples_strategy(draw, K=None):
    """Examples with distinct token ids (prompt i uses 1000*(i+1)+j), K responses each."""
    K = K if K is not None else draw(st.integers(1, 4))
    n = draw(st.integers(1, 6))
    out = []
    for i in range(n):
        base = 1000 * (i + 1)
        prompt = [base + j for j in range(draw(st.integers(1, 8)))]
        responses = [
            [base + 100 * (k + 1) + j for j in range(draw(st.integers(1, 6)))] for k in range(K)
        ]
        if K == 2 and draw(st.booleans()):
            out.append({"prompt_input_ids": prompt, "chosen_input_ids": responses[0], "rejected_input_ids": responses[1]})
        else:
            out.append({"prompt_input_ids": prompt, "responses_input_ids": responses})
    return out


def responses_of(example):
    if "responses_input_ids" in example:
        return [list(r) for r in example["responses_input_ids"]]
    return [list(example["chosen_input_ids"]), list(example["rejected_input_ids"])]


def check_batch(batch, examples, *, paired, budget=None, multiple=None):
    """Every (example, response) in exactly one place, holding the right tokens; padding elsewhere."""
    assert isinstance(batch, PrefixShareBatch)
    layout = batch[LAYOUT_KEY]
    ids = batch["input_ids"]
    B, L = ids.shape
    assert ids.dtype == torch.long and batch["position_ids"].shape == (B, L)
    assert torch.equal(batch["position_ids"], layout.position_ids)
    assert batch["use_cache"] is False
    K = len(responses_of(examples[0]))
    seen = []
    covered = torch.zeros(B, L, dtype=torch.bool)
    for pl in layout.placements:
        u = pl.unit
        ex = examples[u.example]
        expected = list(ex["prompt_input_ids"])
        for slot in u.response_slots:
            expected += responses_of(ex)[slot]
            seen.append((u.example, slot))
        got = ids[pl.row, pl.offset : pl.offset + len(expected)].tolist()
        assert got == expected
        assert not covered[pl.row, pl.offset : pl.offset + len(expected)].any()  # units do not overlap
        covered[pl.row, pl.offset : pl.offset + len(expected)] = True
        if paired:
            assert len(u.response_slots) == 1
        else:
            assert u.response_slots == tuple(range(K))
    assert sorted(seen) == [(i, k) for i in range(len(examples)) for k in range(K)]
    assert torch.equal(covered, layout.segment_ids != PAD_SEGMENT)
    assert (ids[~covered] == PAD).all()
    used = covered.sum(dim=1)
    if budget is not None:
        assert (used <= budget).all()
    longest = int(covered.sum(dim=1).max()) if budget is not None else max(
        pl.unit.length for pl in layout.placements
    )
    if multiple is not None:
        assert L % multiple == 0 and L - multiple < longest <= L
    else:
        assert L == longest
    assert layout.num_examples == len(examples) and layout.num_responses == K


# ---------------------------------------------------------------------------------------------- properties
@SETTINGS
@given(
    examples=examples_strategy(),
    budget=st.one_of(st.none(), st.integers(40, 80)),
    multiple=st.one_of(st.none(), st.sampled_from([1, 8, 16])),
    paired=st.booleans(),
    as_tensors=st.booleans(),
)
def test_every_example_once_in_place(examples, budget, multiple, paired, as_tensors):
    cls = PairedCollator if paired else PrefixShareCollator
    collator = cls(pad_token_id=PAD, max_tokens_per_row=budget, pad_to_multiple_of=multiple)
    given_examples = examples
    if as_tensors:
        given_examples = [
            {k: ([torch.tensor(r) for r in v] if k == "responses_input_ids" else torch.tensor(v)) for k, v in e.items()}
            for e in examples
        ]
    batch = collator(given_examples)
    check_batch(batch, examples, paired=paired, budget=budget, multiple=multiple)
    if budget is not None:  # packing uses as few rows as first-fit-decreasing finds, never more than units
        assert batch["input_ids"].shape[0] <= len(batch.layout.placements)
    else:
        assert batch["input_ids"].shape[0] == len(batch.layout.placements)
    # unit order: examples in order (shared); all first responses, then all second, ... (paired)
    if paired:
        K = len(responses_of(examples[0]))
        expected = [len(e["prompt_input_ids"]) + len(responses_of(e)[k]) for k in range(K) for e in examples]
    else:
        expected = [len(e["prompt_input_ids"]) + sum(map(len, responses_of(e))) for e in examples]
    assert collator.unit_lengths(given_examples) == expected


def test_lists_and_tensors_give_the_same_batch():
    examples = [
        {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10]},
        {"prompt_input_ids": [11], "chosen_input_ids": [12, 13, 14], "rejected_input_ids": [15, 16]},
    ]
    as_tensors = [{k: torch.tensor(v, dtype=torch.int32) for k, v in e.items()} for e in examples]
    as_tuples = [{k: tuple(v) for k, v in e.items()} for e in examples]
    for cls in (PrefixShareCollator, PairedCollator):
        collator = cls(pad_token_id=PAD)
        reference = collator(examples)
        for other in (as_tensors, as_tuples):
            batch = collator(other)
            assert torch.equal(batch["input_ids"], reference["input_ids"])
            assert torch.equal(batch["position_ids"], reference["position_ids"])


def test_prefix_share_rows():
    examples = [
        {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10]},
        {"prompt_input_ids": [11], "chosen_input_ids": [12, 13, 14], "rejected_input_ids": [15, 16]},
    ]
    batch = PrefixShareCollator(pad_token_id=PAD)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 1, 2]]


def test_paired_rows_are_chosen_then_rejected():
    rng = random.Random(0)
    examples = [
        {
            "prompt_input_ids": [rng.randrange(1, 99) for _ in range(rng.randint(1, 5))],
            "chosen_input_ids": [rng.randrange(1, 99) for _ in range(rng.randint(1, 5))],
            "rejected_input_ids": [rng.randrange(1, 99) for _ in range(rng.randint(1, 5))],
        }
        for _ in range(4)
    ]
    batch = PairedCollator(pad_token_id=PAD)(examples)
    B = len(examples)
    ids = batch["input_ids"]
    assert ids.shape[0] == 2 * B
    sequences = [e["prompt_input_ids"] + e["chosen_input_ids"] for e in examples]
    sequences += [e["prompt_input_ids"] + e["rejected_input_ids"] for e in examples]
    for row, seq in enumerate(sequences):
        assert ids[row, : len(seq)].tolist() == seq
        assert (ids[row, len(seq) :] == PAD).all()
        assert batch["position_ids"][row, : len(seq)].tolist() == list(range(len(seq)))


def test_k_responses():
    examples = [
        {"prompt_input_ids": [1, 2], "responses_input_ids": [[3], [4, 5], [6, 7, 8]]},
        {"prompt_input_ids": [9], "responses_input_ids": [torch.tensor([10, 11]), [12], [13]]},
    ]
    shared = PrefixShareCollator(pad_token_id=PAD)(examples)
    assert shared["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 0, 0, 0]]
    assert shared["position_ids"][0].tolist() == [0, 1, 2, 2, 3, 2, 3, 4]
    assert shared.layout.response_lengths.tolist() == [[1, 2, 3], [2, 1, 1]]
    paired = PairedCollator(pad_token_id=PAD)(examples)
    assert paired["input_ids"].shape[0] == 6
    assert paired["input_ids"][4].tolist()[:3] == [1, 2, 6]  # row k*B + i: response 2 of example 0


def test_packed_rows_respect_budget():
    examples = [
        {"prompt_input_ids": [1] * p, "chosen_input_ids": [2] * c, "rejected_input_ids": [3] * r}
        for p, c, r in [(4, 3, 3), (2, 2, 2), (7, 1, 1), (1, 1, 1), (3, 5, 2)]
    ]
    batch = PrefixShareCollator(pad_token_id=PAD, max_tokens_per_row=12, pad_to_multiple_of=8)(examples)
    check_batch(batch, examples, paired=False, budget=12, multiple=8)
    assert batch["input_ids"].shape == (4, 16)  # units 10, 6, 9, 3, 10 -> [10] [10] [9, 3] [6]


# ---------------------------------------------------------------------------------------------- truncation
def test_truncation_keep_end_of_prompt():
    examples = [
        {"prompt_input_ids": [1, 2, 3, 4, 5], "chosen_input_ids": [6, 7], "rejected_input_ids": [8, 9, 10]},
        {"prompt_input_ids": [11, 12], "chosen_input_ids": [13], "rejected_input_ids": [14]},  # within the limit
    ]
    collator = PrefixShareCollator(pad_token_id=PAD, max_length=6, truncation="keep_end_of_prompt")
    batch = collator(examples)
    assert batch["input_ids"][0].tolist() == [3, 4, 5, 6, 7, 8, 9, 10]
    assert batch["input_ids"][1].tolist()[:4] == [11, 12, 13, 14]
    assert collator.unit_lengths(examples) == [8, 4]
    paired = PairedCollator(pad_token_id=PAD, max_length=6, truncation="keep_end_of_prompt")(examples)
    assert paired["input_ids"][0].tolist() == [3, 4, 5, 6, 7, 0]
    assert paired["input_ids"][2].tolist() == [3, 4, 5, 8, 9, 10]
    assert paired["input_ids"].shape[1] == 6


def test_truncation_truncate_responses():
    examples = [{"prompt_input_ids": [1, 2, 3, 4], "chosen_input_ids": [6, 7, 8], "rejected_input_ids": [9]}]
    batch = PrefixShareCollator(pad_token_id=PAD, max_length=6, truncation="truncate_responses")(examples)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 6, 7, 9]
    assert batch.layout.response_lengths.tolist() == [[2, 1]]


def test_truncation_keep_end():
    """TRL's keep_end: each prompt+response keeps its last max_length tokens. Cut alike -> still one shared prompt;
    cut at different prompt tokens -> a unit per response; cut inside the response -> its first kept token is the
    (one-token) prompt, which no token predicts, as a paired row never scores its first token."""
    examples = [
        {"prompt_input_ids": [1, 2, 3, 4, 5], "chosen_input_ids": [6, 7], "rejected_input_ids": [8, 9]},  # alike
        {"prompt_input_ids": [11, 12, 13], "chosen_input_ids": [14], "rejected_input_ids": [15, 16, 17, 18, 19]},
        {"prompt_input_ids": [21], "chosen_input_ids": [22], "rejected_input_ids": [23]},  # within the limit
    ]
    collator = PrefixShareCollator(pad_token_id=PAD, max_length=4, truncation="keep_end")
    batch = collator(examples)
    rows = [row[row != PAD].tolist() for row in batch["input_ids"]]
    assert rows == [[4, 5, 6, 7, 8, 9], [11, 12, 13, 14], [16, 17, 18, 19], [21, 22, 23]]  # chosen 1 fits whole
    # scored: example 1's rejected keeps [16 | 17 18 19] (16 predicts, is not predicted)
    assert batch.layout.response_lengths.tolist() == [[2, 2], [1, 3], [1, 1]]
    assert collator.unit_lengths(examples) == [6, 4, 4, 3]
    paired = PairedCollator(pad_token_id=PAD, max_length=4, truncation="keep_end")(examples)
    assert [row[row != PAD].tolist() for row in paired["input_ids"]] == [
        [4, 5, 6, 7], [11, 12, 13, 14], [21, 22], [4, 5, 8, 9], [16, 17, 18, 19], [21, 23]
    ]  # fmt: skip
    with pytest.raises(ValueError, match="example 0.*max_length=1 leaves no token to score"):
        PrefixShareCollator(pad_token_id=PAD, max_length=1, truncation="keep_end")(examples)


def test_truncation_that_empties_raises():
    example = {"prompt_input_ids": [1, 2], "chosen_input_ids": [3, 4, 5, 6], "rejected_input_ids": [7]}
    ok = {"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]}
    with pytest.raises(ValueError, match="example 1.*no prompt token"):
        PrefixShareCollator(pad_token_id=PAD, max_length=4, truncation="keep_end_of_prompt")([ok, example])
    long_prompt = {"prompt_input_ids": [1] * 4, "chosen_input_ids": [3], "rejected_input_ids": [7]}
    with pytest.raises(ValueError, match="example 1.*no response token"):
        PrefixShareCollator(pad_token_id=PAD, max_length=4, truncation="truncate_responses")([ok, long_prompt])


def test_bad_truncation_arguments():
    with pytest.raises(ValueError, match="truncation"):
        PrefixShareCollator(pad_token_id=PAD, max_length=4, truncation="left")
    with pytest.raises(ValueError, match="max_length"):
        PrefixShareCollator(pad_token_id=PAD, truncation="keep_end_of_prompt")


# ---------------------------------------------------------------------------------------------- bad inputs
GOOD = {"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5]}

BAD_EXAMPLES = {
    "empty prompt": ({"prompt_input_ids": [], "chosen_input_ids": [3], "rejected_input_ids": [4]}, "prompt is empty"),
    "empty chosen": ({"prompt_input_ids": [1], "chosen_input_ids": [], "rejected_input_ids": [4]}, "response 0 is empty"),
    "empty rejected": ({"prompt_input_ids": [1], "chosen_input_ids": [3], "rejected_input_ids": []}, "response 1 is empty"),
    "empty tensor response": (
        {"prompt_input_ids": [1], "responses_input_ids": [[3], torch.tensor([], dtype=torch.long)]},
        "response 1 is empty",
    ),
    "float ids": ({"prompt_input_ids": [1.0, 2.0], "chosen_input_ids": [3], "rejected_input_ids": [4]}, "integers"),
    "string ids": ({"prompt_input_ids": [1], "chosen_input_ids": ["3"], "rejected_input_ids": [4]}, "integers"),
    "string instead of ids": ({"prompt_input_ids": "hello", "chosen_input_ids": [3], "rejected_input_ids": [4]}, "list"),
    "float tensor": (
        {"prompt_input_ids": torch.tensor([1.0, 2.0]), "chosen_input_ids": [3], "rejected_input_ids": [4]},
        "integer",
    ),
    "2-D tensor": (
        {"prompt_input_ids": torch.tensor([[1, 2]]), "chosen_input_ids": [3], "rejected_input_ids": [4]},
        "1-D",
    ),
    "negative ids": ({"prompt_input_ids": [1], "chosen_input_ids": [3, -1], "rejected_input_ids": [4]}, ">= 0"),
    "negative tensor ids": (
        {"prompt_input_ids": torch.tensor([1, -5]), "chosen_input_ids": [3], "rejected_input_ids": [4]},
        ">= 0",
    ),
    "missing rejected": ({"prompt_input_ids": [1], "chosen_input_ids": [3]}, "rejected_input_ids"),
    "missing chosen": ({"prompt_input_ids": [1], "rejected_input_ids": [3]}, "chosen_input_ids"),
    "missing prompt": ({"chosen_input_ids": [3], "rejected_input_ids": [4]}, "prompt_input_ids"),
    "empty responses list": ({"prompt_input_ids": [1], "responses_input_ids": []}, "responses_input_ids"),
    "not a mapping": ([1, 2, 3], "mapping"),
    "different K": ({"prompt_input_ids": [1], "responses_input_ids": [[3], [4], [5]]}, "3 responses"),
    # Added with the checks below; each of these was accepted (or hit torch's own error) before.
    "responses and chosen/rejected": (
        {"prompt_input_ids": [1], "responses_input_ids": [[3], [4]], "chosen_input_ids": [5], "rejected_input_ids": [6]},
        "has both responses_input_ids and chosen_input_ids, rejected_input_ids; give either",
    ),
    "responses and rejected": (
        {"prompt_input_ids": [1], "responses_input_ids": [[3], [4]], "rejected_input_ids": [6]},
        "has both responses_input_ids and rejected_input_ids;",
    ),
    "id over int64": (
        {"prompt_input_ids": [1], "chosen_input_ids": [3, 2**63], "rejected_input_ids": [4]},
        r"chosen_input_ids\[1\] is 9223372036854775808; token ids must fit in int64",
    ),
    "response id over int64": (
        {"prompt_input_ids": [1], "responses_input_ids": [[3], [4, 5, 2**70]]},
        r"responses_input_ids\[1\]\[2\] is 1180591620717411303424; token ids must fit in int64",
    ),
    "uint64 tensor over int64": (
        {**GOOD, "prompt_input_ids": torch.tensor([1, 2**64 - 1], dtype=torch.uint64)},
        r"prompt_input_ids\[1\] is 18446744073709551615; token ids must fit in int64",
    ),
    "padded ids (attention mask with zeros)": (
        {"prompt_input_ids": [1], "chosen_input_ids": [3, 0, 0], "chosen_attention_mask": [1, 0, 0], "rejected_input_ids": [4]},
        r"chosen_attention_mask is 0 at positions \[1, 2\]: chosen_input_ids holds padding",
    ),
    "attention mask of another length": (
        {"prompt_input_ids": [1, 2], "prompt_attention_mask": [1], "chosen_input_ids": [3], "rejected_input_ids": [4]},
        "prompt_attention_mask has 1 entries but prompt_input_ids has 2 tokens",
    ),
}


@pytest.mark.parametrize("cls", [PrefixShareCollator, PairedCollator])
@pytest.mark.parametrize("case", sorted(BAD_EXAMPLES))
def test_bad_example_names_its_index(cls, case):
    bad, what = BAD_EXAMPLES[case]
    with pytest.raises(ValueError, match=f"example 2\\b.*{what}"):
        cls(pad_token_id=PAD)([GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError, match="example 2\\b"):
        cls(pad_token_id=PAD, max_tokens_per_row=64).unit_lengths([GOOD, GOOD, bad])


@pytest.mark.parametrize("cls", [PrefixShareCollator, PairedCollator])
def test_unit_longer_than_row_budget_names_the_example(cls):
    long = {"prompt_input_ids": [1] * 6, "chosen_input_ids": [2] * 3, "rejected_input_ids": [3] * 2}
    budget = 10 if cls is PrefixShareCollator else 8  # shared unit: 11 tokens; paired units: 9 and 8
    with pytest.raises(ValueError, match="example 1\\b.*max_tokens_per_row"):
        cls(pad_token_id=PAD, max_tokens_per_row=budget)([GOOD, long])


@pytest.mark.parametrize("cls", [PrefixShareCollator, PairedCollator])
def test_longer_than_max_length_without_truncation(cls):
    long = {"prompt_input_ids": [1] * 6, "chosen_input_ids": [2] * 3, "rejected_input_ids": [3] * 2}
    with pytest.raises(ValueError, match="example 1\\b.*max_length=8"):
        cls(pad_token_id=PAD, max_length=8)([GOOD, long])
    cls(pad_token_id=PAD, max_length=9)([GOOD, long])  # prompt + longest response = 9 fits


@pytest.mark.parametrize("pad", [None, -1, 1.5, True, 2**63])
def test_bad_pad_token_id(pad):
    with pytest.raises(ValueError, match="pad_token_id"):
        PrefixShareCollator(pad_token_id=pad)


@pytest.mark.parametrize("name", ["max_tokens_per_row", "pad_to_multiple_of", "max_length"])
def test_bad_sizes(name):
    with pytest.raises(ValueError, match=name):
        PrefixShareCollator(pad_token_id=PAD, **{name: 0})


def test_empty_batch_raises():
    with pytest.raises(ValueError, match="empty"):
        PrefixShareCollator(pad_token_id=PAD)([])


def test_batch_to_keeps_the_layout():
    batch = PrefixShareCollator(pad_token_id=PAD)([GOOD])
    moved = batch.to("cpu")
    assert isinstance(moved, PrefixShareBatch) and moved.layout is not None
    assert torch.equal(moved["input_ids"], batch["input_ids"])


def test_numpy_ids_are_accepted_and_checked():
    np = pytest.importorskip("numpy")
    example = dict(
        prompt_input_ids=np.array([5, 6]), chosen_input_ids=[np.int64(7)], rejected_input_ids=np.array([8], np.int32)
    )
    batch = PrefixShareCollator(0)([example])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8]]
    with pytest.raises(ValueError, match="example 0: prompt_input_ids must hold integer token ids"):
        PrefixShareCollator(0)([{**example, "prompt_input_ids": np.array([5.0, 6.0])}])


def test_numpy_ids_beyond_int64_are_named():
    """numpy uint64 values >= 2**63 (arrays, scalars in lists, object arrays) get the collators' message.

    Before, torch raised its own "Overflow when unpacking long long" (or, for object arrays, "can't convert
    np.ndarray of type numpy.object_"), naming neither the example nor the field.
    """
    np = pytest.importorskip("numpy")
    big = np.uint64(2**63)
    cases = {
        "prompt_input_ids": np.array([1, 2**63], dtype=np.uint64),
        "chosen_input_ids": [np.uint64(3), big],
        "rejected_input_ids": np.array([4, 2**70], dtype=object),
    }
    expected = {"prompt_input_ids": 2**63, "chosen_input_ids": 2**63, "rejected_input_ids": 2**70}
    for cls in (PrefixShareCollator, PairedCollator):
        for field, value in cases.items():
            bad = {**GOOD, field: value}
            message = f"example 1: {field}\\[1\\] is {expected[field]}; token ids must fit in int64"
            with pytest.raises(ValueError, match=message):
                cls(pad_token_id=PAD)([GOOD, bad])
    # uint64 and object arrays within range are token ids like any other
    fine = dict(
        prompt_input_ids=np.array([5, 6], dtype=np.uint64),
        chosen_input_ids=np.array([7], dtype=object),
        rejected_input_ids=[np.uint64(8)],
    )
    assert PrefixShareCollator(PAD)([fine])["input_ids"].tolist() == [[5, 6, 7, 8]]


@SETTINGS
@given(data=st.data(), examples=examples_strategy())
def test_out_of_range_id_anywhere_is_named(data, examples):
    """One id beyond int64 anywhere in a batch: the error names its example, field and position."""
    i = data.draw(st.integers(0, len(examples) - 1))
    example = dict(examples[i])
    fields = ["prompt_input_ids"] + [f"responses_input_ids[{k}]" for k in range(len(responses_of(example)))]
    if "chosen_input_ids" in example:
        fields = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
    field = data.draw(st.sampled_from(fields))
    value = data.draw(st.integers(2**63, 2**64 - 1) | st.integers(2**64, 2**100))
    as_tensor = value < 2**64 and data.draw(st.booleans())
    if field.startswith("responses_input_ids"):
        k = int(field[len("responses_input_ids[") : -1])
        responses = [list(r) for r in example["responses_input_ids"]]
        target = responses[k]
    else:
        target = list(example[field])
    j = data.draw(st.integers(0, len(target) - 1))
    target[j] = value
    if as_tensor:
        target = torch.tensor(target, dtype=torch.uint64)
    if field.startswith("responses_input_ids"):
        responses[k] = target
        example["responses_input_ids"] = responses
    else:
        example[field] = target
    bad = examples[:i] + [example] + examples[i + 1 :]
    position = f"{field}[{j}]".replace("[", "\\[").replace("]", "\\]")
    cls = data.draw(st.sampled_from([PrefixShareCollator, PairedCollator]))
    with pytest.raises(ValueError, match=f"^example {i}: {position} is {value}; token ids must fit in int64"):
        cls(pad_token_id=PAD)(bad)


def test_int64_boundary():
    """2**63 - 1 is the largest id a collator can store: accepted here (the model's vocabulary is the next
    check); 2**63 is refused with the example, field and position (before: torch's "Overflow when unpacking
    long long")."""
    top = {"prompt_input_ids": [1, 2**63 - 1], "chosen_input_ids": [3], "rejected_input_ids": [4]}
    assert PrefixShareCollator(PAD)([top])["input_ids"][0, 1].item() == 2**63 - 1
    over = {**top, "prompt_input_ids": [1, 2**63]}
    with pytest.raises(ValueError, match=r"^example 0: prompt_input_ids\[1\] is 9223372036854775808; token ids"):
        PrefixShareCollator(PAD)([over])


def test_a_field_set_to_none_counts_as_absent():
    """datasets writes None where a row lacks a column; the other format's fields are then what counts.

    Before, ``responses_input_ids=None`` next to chosen/rejected raised "must be a non-empty list".
    """
    pair = {**GOOD, "responses_input_ids": None}
    group = {"prompt_input_ids": [1, 2], "responses_input_ids": [[3], [4, 5]]}
    group.update(chosen_input_ids=None, rejected_input_ids=None)
    for cls in (PrefixShareCollator, PairedCollator):
        reference = cls(pad_token_id=PAD)([GOOD, GOOD])
        batch = cls(pad_token_id=PAD)([pair, group])
        assert torch.equal(batch["input_ids"], reference["input_ids"])
    with pytest.raises(ValueError, match="example 0: responses_input_ids must be a non-empty list of responses.*NoneType"):
        PrefixShareCollator(PAD)([{"prompt_input_ids": [1], "responses_input_ids": None}])


def test_padded_ids_are_refused_and_masks_of_ones_accepted():
    """Ids padded by the user (zeros in their attention mask) would have their padding scored as response
    tokens: refused (before: collated silently). Unpadded ids with all-ones masks (lists, tensors or arrays)
    collate as without them."""
    padded = {**GOOD, "rejected_input_ids": [4, 5, 0], "rejected_attention_mask": torch.tensor([1, 1, 0])}
    for cls in (PrefixShareCollator, PairedCollator):
        with pytest.raises(ValueError, match=r"^example 1: rejected_attention_mask is 0 at positions \[2\]: "):
            cls(PAD)([GOOD, padded])
    with_masks = {
        **GOOD,
        "prompt_attention_mask": [1, 1],
        "chosen_attention_mask": torch.ones(1, dtype=torch.long),
        "rejected_attention_mask": [True, True],
    }
    batch = PrefixShareCollator(PAD)([with_masks])
    assert torch.equal(batch["input_ids"], PrefixShareCollator(PAD)([GOOD])["input_ids"])
