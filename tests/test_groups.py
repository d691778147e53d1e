"""group_completions + completion_logps (the custom-loop API for GRPO/RLOO) against runs alone.

Every prompt+completion row is run on its own (batch of one, no padding) through the UNPATCHED model and its
completion tokens scored under softmax(logits / temperature): per-token log-probs, entropies and the gradients
of a weighted sum of log-probs on every parameter must match the prefix-shared path, in TRL's row layout
([rows, completion_length], zeros where a row has no token). These tests fail on the main this branch started
from: prefixshare.group_completions / completion_logps did not exist there, and response_logps had no
temperature.
"""

from __future__ import annotations

import pytest
import torch

import prefixshare
from prefixshare import completion_logps, group_completions
from prefixshare.testing import tiny_model

TOL = 1e-5
PAD = 0


def models(architecture="llama"):
    reference = tiny_model(architecture)
    patched = prefixshare.patch(tiny_model(architecture))
    return reference, patched


def random_rows(num_prompts, G, *, seed=0, max_prompt=12, max_completion=7, empty=()):
    """TRL-style tensors: each prompt repeated G times, the rows shuffled (groups spread non-contiguously),
    prompts left-padded and completions right-padded, with masks. Rows listed in ``empty`` have no token."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 96, (int(torch.randint(1, max_prompt + 1, (1,), generator=g)),), generator=g)
               for _ in range(num_prompts)]  # fmt: skip
    rows = [(p, torch.randint(3, 96, (int(torch.randint(1, max_completion + 1, (1,), generator=g)),), generator=g))
            for p in prompts for _ in range(G)]  # fmt: skip
    order = torch.randperm(len(rows), generator=g).tolist()
    rows = [rows[i] for i in order]
    P = max(len(p) for p, _ in rows)
    C = max_completion + 1  # one column more than any completion: an all-padding column
    prompt_ids = torch.full((len(rows), P), PAD)
    prompt_mask = torch.zeros(len(rows), P, dtype=torch.long)
    completion_ids = torch.full((len(rows), C), PAD)
    completion_mask = torch.zeros(len(rows), C, dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        prompt_ids[r, P - len(p) :], prompt_mask[r, P - len(p) :] = p, 1
        if r not in empty:
            completion_ids[r, : len(c)], completion_mask[r, : len(c)] = c, 1
        else:
            completion_ids[r, : len(c)] = c  # tokens present but masked out: never scored
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def alone(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
    """([rows, C] log-probs with graph, [rows, C] entropies): each row run alone through ``model``."""
    N, C = completion_ids.shape
    logps = torch.zeros(N, C)
    entropy = torch.zeros(N, C)
    for r in range(N):
        p = prompt_ids[r][prompt_mask[r].bool()]
        c = completion_ids[r][completion_mask[r].bool()]
        if len(c) == 0:
            continue
        ids = torch.cat([p, c]).unsqueeze(0)
        z = model(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1].float() / temperature
        lp = torch.log_softmax(z, -1)
        logps = logps.index_put((torch.tensor([r]), torch.arange(len(c))), lp.gather(-1, c[:, None])[:, 0])
        entropy[r, : len(c)] = -(lp.exp() * lp).sum(-1).detach()
    return logps, entropy


def relative(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(reference, patched, rows, temperature=1.0, **options):
    prompt_ids, prompt_mask, completion_ids, completion_mask = rows
    for m in (reference, patched):
        m.zero_grad(set_to_none=True)
    want, want_entropy = alone(reference, *rows, temperature=temperature)
    groups = group_completions(prompt_ids, completion_ids, prompt_mask=prompt_mask, completion_mask=completion_mask,
                               **options)  # fmt: skip
    got = completion_logps(patched, groups, stats=("entropy",), temperature=temperature)
    assert got.logps.shape == completion_ids.shape
    assert torch.equal(got.mask, completion_mask.bool())
    assert torch.equal(got.logps[~got.mask], torch.zeros((~got.mask).sum()))
    assert relative(got.logps, want) < TOL
    assert relative(got.stats["entropy"], want_entropy) < TOL
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    (want * weights).sum().backward()
    (got.logps * weights).sum().backward()
    want_grads, got_grads = grads(reference), grads(patched)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 10
    worst = max(relative(got_grads[n], g) for n, g in want_grads.items())
    assert worst < TOL, worst
    return groups


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_equal_to_rows_alone(G, packed):
    reference, patched = models()
    rows = random_rows(3, G, seed=G)
    groups = compare(reference, patched, rows, max_tokens_per_row=60 if packed else None)
    assert groups.num_prompts == 3
    layout = groups.batches[0]["prefixshare_layout"]
    if packed:
        assert layout.shape[0] < len(layout.placements)  # several units share a row
    else:
        row_tokens = int(rows[1].sum() + rows[3].sum())
        assert len(layout.placements) == 3  # one unit per prompt: its prompt once
        assert groups.num_tokens == row_tokens if G == 1 else groups.num_tokens < row_tokens
    if G > 1:  # the groups were spread over the batch, and still each became one unit
        assert not all(torch.equal(rows[0][r], rows[0][r + 1]) for r in range(0, len(rows[0]), G))


def test_temperature_empty_completions_and_splits():
    reference, patched = models("qwen2")  # sliding windows: logical positions count
    rows = random_rows(2, 4, seed=7, empty={1, 5})  # rows 1 and 5 as TRL's mask_truncated_completions leaves them
    groups = compare(reference, patched, rows, temperature=0.7, max_completions_per_forward=3)
    assert len(groups.batches) >= 3 and groups.completion_lengths[[1, 5]].tolist() == [0, 0]
    # a budget smaller than a whole group splits it into units that each carry the prompt
    compare(reference, patched, rows, max_tokens_per_row=16)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_keep_empty_groups_routes_prompts_without_reading_them(packed):
    """keep_empty_groups=True (the MoE router statistics of TRL's rows) lays out a prompt whose completions are all
    empty as [prompt | padding]: its tokens are routed, nothing is read from it, every value stays the rows'."""
    reference, patched = models()
    prompt_ids, prompt_mask, completion_ids, completion_mask = random_rows(3, 2, seed=5)
    first = prompt_ids[0]
    empty = [r for r in range(len(prompt_ids)) if torch.equal(prompt_ids[r], first)]  # both rows of one prompt
    completion_mask[empty] = 0
    rows = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    kept = compare(reference, patched, rows, keep_empty_groups=True, max_tokens_per_row=40 if packed else None)
    plain = group_completions(prompt_ids, completion_ids, prompt_mask=prompt_mask, completion_mask=completion_mask)
    assert kept.num_prompts == plain.num_prompts == 2  # prompts with something to score
    assert kept.num_tokens == plain.num_tokens + int(prompt_mask[empty[0]].sum()) + 1  # the prompt and one filler
    assert float(kept.token_weights[0].sum()) == float(prompt_mask.sum() + completion_mask.sum())


def test_groups_given_per_prompt_and_unpadded_lists():
    reference, patched = models()
    prompts = [[5, 6, 7], [9, 8]]
    completions = [[10, 11], [12], [13, 14, 15], [16, 17]]  # G = 2: prompt i owns rows 2i, 2i+1
    groups = group_completions(prompts, completions, num_generations=2)
    got = completion_logps(patched, groups)
    assert got.logps.shape == (4, 3)
    rows = (
        torch.tensor([[5, 6, 7]] * 2 + [[0, 9, 8]] * 2),
        torch.tensor([[1, 1, 1]] * 2 + [[0, 1, 1]] * 2),
        torch.tensor([[10, 11, 0], [12, 0, 0], [13, 14, 15], [16, 17, 0]]),
        torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]),
    )
    want, _ = alone(reference, *rows)
    assert relative(got.logps, want) < TOL
    # the same rows as TRL gives them (prompts repeated, padded) group into the same two units
    same = group_completions(rows[0], rows[2], prompt_mask=rows[1], completion_mask=rows[3])
    assert same.num_prompts == 2 and torch.equal(same.batches[0]["input_ids"], groups.batches[0]["input_ids"])


def test_nothing_to_score_still_has_a_graph():
    _, patched = models()
    groups = group_completions([[5, 6]], [[7, 8]], completion_mask=[[0, 0]])
    out = completion_logps(patched, groups, stats=("entropy",))
    assert torch.equal(out.logps, torch.zeros(1, 2)) and not out.mask.any()
    assert out.logps.requires_grad
    out.logps.sum().backward()  # as a forward on all-masked rows: no error, zero gradients
    assert all(float(p.grad.abs().max()) == 0 for p in patched.parameters() if p.grad is not None)


BAD = [
    (dict(prompt_ids=[[1, 2]], completion_ids=[[3], [4]]), "prompt_ids has 1 rows and completion_ids 2"),
    (dict(prompt_ids=[[1, 2]], completion_ids=[[3], [4], [5]], num_generations=2), "needs 2 completion rows, got 3"),
    (dict(prompt_ids=[[1, -2]], completion_ids=[[3]]), "row 0: prompt_ids[1] is -2"),
    (dict(prompt_ids=[[1, 2.0]], completion_ids=[[3]]), "row 0: prompt_ids[1] is 2.0"),
    (dict(prompt_ids=torch.ones(1, 2), completion_ids=[[3]]), "prompt_ids must hold integers"),
    (dict(prompt_ids=torch.ones(2, dtype=torch.long), completion_ids=[[3]]), "prompt_ids must be a 2-D tensor"),
    (dict(prompt_ids=torch.ones(1, 3, dtype=torch.long), prompt_mask=torch.tensor([[1, 0, 1]]), completion_ids=[[3]]),
     "row 0: prompt_mask [1, 0, 1] has 0s between its 1s"),
    (dict(prompt_ids=[[1, 2]], completion_ids=[[3, 4]], completion_mask=[[0, 1]]),
     "row 0: completion_mask [0, 1] is not 1s followed by 0s"),
    (dict(prompt_ids=[[1, 2]], completion_ids=[[3, 4]], completion_mask=[[1, 2]]), "row 0: completion_mask[1] is 2"),
    (dict(prompt_ids=torch.ones(1, 2, dtype=torch.long), prompt_mask=torch.ones(1, 3, dtype=torch.long),
          completion_ids=[[3]]), "prompt_mask has shape (1, 3) but prompt_ids has (1, 2)"),
    (dict(prompt_ids=[[1, 2]], completion_ids=[[3, 4]], completion_mask=[[1]]),
     "row 0: completion_mask has 1 entries but completion_ids has 2"),
    (dict(prompt_ids=[[]], completion_ids=[[3]]), "row 0: the prompt is empty"),
    (dict(prompt_ids=[[1]], completion_ids=[]), "prompt_ids has 1 rows and completion_ids 0"),
    (dict(prompt_ids=[[1]], completion_ids=[[3]], max_tokens_per_row=0), "max_tokens_per_row must be a positive"),
    (dict(prompt_ids=[[1]], completion_ids=[[3]], pad_token_id=-1), "pad_token_id must be an integer token id"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_is_refused_with_the_row_and_field(kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError) as error:
        group_completions(kwargs.pop("prompt_ids"), kwargs.pop("completion_ids"), **kwargs)
    assert message in str(error.value)


def test_bad_temperature_and_groups():
    _, patched = models()
    groups = group_completions([[1]], [[3]])
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        completion_logps(patched, groups, temperature=0.0)
    with pytest.raises(TypeError, match="takes the result of prefixshare.group_completions"):
        completion_logps(patched, {"input_ids": torch.ones(1, 2)})
    with pytest.raises(prefixshare.LayoutNotAppliedError):  # an unpatched model never returns mixed numbers
        completion_logps(tiny_model("llama"), group_completions([[1, 2]] * 2, [[3, 4], [5]]))
