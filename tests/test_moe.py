"""The MoE load-balancing loss over a prefix-shared batch (#14 item 3): every real token once, the prompt once,
no padding; ``preference_step`` adds it with the config's ``router_aux_loss_coef`` as TRL's DPOTrainer does.

These tests fail on the main this branch started from (096dc77): prefixshare.moe did not exist and
preference_step added no auxiliary loss.
"""

from __future__ import annotations

import copy

import pytest
import torch

import prefixshare
from prefixshare import PairedCollator, PrefixShareCollator, patch
from prefixshare.moe import (
    capture_router_logits, load_balancing_loss, moe_routing, paired_token_weights, router_aux_loss_coef,
)  # fmt: skip
from prefixshare.testing import random_examples
from prefixshare.testing import tiny_model, tiny_model_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

MOE = ["mixtral", "qwen3_moe", "gpt_oss"]


def _moe(model_type, **overrides):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers has no {model_type} here")
    return patch(tiny_model_of(model_type, router_aux_loss_coef=0.25, **overrides))


def _examples(seed=0, **lengths):
    return random_examples(3, 96, seed=seed, **lengths)


def _router_logits(model, batch):
    with capture_router_logits(model) as captured, torch.no_grad():
        prefixshare.response_logps(model, {**batch, "output_router_logits": True})
    assert captured.calls == 1
    return captured.router_logits


def _by_hand(rows_per_layer, num_experts, top_k):
    """The Switch-Transformer loss, written out: rows_per_layer is a list (one per MoE layer) of [n, E] router
    logits of exactly the tokens to count."""
    counts = [0.0] * num_experts
    probability = [0.0] * num_experts
    total = 0
    for rows in rows_per_layer:
        for row in rows:
            p = torch.softmax(row.double(), -1)
            for e in torch.topk(p, top_k).indices.tolist():
                counts[e] += 1
            for e in range(num_experts):
                probability[e] += float(p[e])
            total += 1
    return num_experts * sum((counts[e] / total) * (probability[e] / total) for e in range(num_experts))


@pytest.mark.parametrize("model_type", MOE)
def test_the_loss_counts_each_real_token_of_the_layout_once(model_type):
    model = _moe(model_type)
    batch = PrefixShareCollator(0, max_tokens_per_row=70)(_examples())
    layout = batch.layout
    assert (layout.segment_ids == -1).any(), "the batch must hold padding for this test"
    logits = _router_logits(model, batch)
    E, k = moe_routing(model)
    got = load_balancing_loss(logits, layout, num_experts=E, top_k=k)
    real = (layout.segment_ids.reshape(-1) != -1).nonzero()[:, 0]
    want = _by_hand([layer[real] for layer in logits], E, k)
    assert abs(float(got) - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("model_type", MOE)
def test_the_prompt_counts_once_and_routing_matches_the_runs_alone(model_type):
    """The same value from runs alone: each prompt's tokens from the run of its first response only, each
    response's tokens from its own run. The paired format (prompt twice) gives another value."""
    model = _moe(model_type)
    examples = _examples(1, prompt_lengths=(12, 24), response_lengths=(1, 4))  # the prompts weigh
    batch = PrefixShareCollator(0, max_tokens_per_row=70)(examples)
    E, k = moe_routing(model)
    shared = float(load_balancing_loss(_router_logits(model, batch), batch.layout, num_experts=E, top_k=k))
    paired = PairedCollator(0)(examples)
    twice = float(load_balancing_loss(_router_logits(model, paired), paired.layout, num_experts=E, top_k=k))

    once_rows, twice_rows = None, None
    for example in examples:
        prompt = example["prompt_input_ids"]
        for j, response in enumerate((example["chosen_input_ids"], example["rejected_input_ids"])):
            with capture_router_logits(model) as captured, torch.no_grad():
                model(input_ids=torch.tensor([prompt + response]), output_router_logits=True, use_cache=False)
            every = list(captured.router_logits)
            new = every if j == 0 else [layer[len(prompt) :] for layer in every]
            once_rows = new if once_rows is None else [torch.cat([a, b]) for a, b in zip(once_rows, new)]
            twice_rows = every if twice_rows is None else [torch.cat([a, b]) for a, b in zip(twice_rows, every)]
    assert abs(shared - _by_hand(once_rows, E, k)) <= 1e-6 * shared
    assert abs(twice - _by_hand(twice_rows, E, k)) <= 1e-6 * twice
    assert abs(twice - shared) > 1e-4 * shared  # the formats count different tokens
    # the paired format's count, from the prefix-shared forward: each prompt token once per response
    weights = paired_token_weights(batch.layout)
    as_paired = float(
        load_balancing_loss(_router_logits(model, batch), batch.layout, num_experts=E, top_k=k, token_weights=weights)
    )
    assert abs(as_paired - twice) <= 1e-6 * twice


def test_paired_token_weights_count_the_prompt_once_per_response():
    batch = PrefixShareCollator(0, max_tokens_per_row=70)(
        [{"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8], "rejected_input_ids": [9, 10]},
         {"prompt_input_ids": [11], "chosen_input_ids": [12, 13], "rejected_input_ids": [14]}]
    )  # fmt: skip
    weights = paired_token_weights(batch.layout)
    counts = {}
    for row in range(batch.layout.shape[0]):
        for t, w in zip(batch["input_ids"][row].tolist(), weights[row].tolist()):
            counts[t] = counts.get(t, 0) + w
    assert {t: counts[t] for t in range(5, 15)} == {5: 2, 6: 2, 7: 2, 8: 1, 9: 1, 10: 1, 11: 2, 12: 1, 13: 1, 14: 1}
    assert float(weights.sum()) == 14  # nothing else: padding weighs 0


def test_token_weights_are_checked():
    model = _moe("mixtral")
    batch = PrefixShareCollator(0, max_tokens_per_row=70)(_examples())
    logits, (E, k) = _router_logits(model, batch), moe_routing(model)
    with pytest.raises(ValueError, match="token_weights has shape"):
        load_balancing_loss(logits, batch.layout, num_experts=E, top_k=k, token_weights=torch.ones(1, 3))
    on_padding = torch.ones(batch.layout.shape)
    with pytest.raises(ValueError, match="0 on padding"):
        load_balancing_loss(logits, batch.layout, num_experts=E, top_k=k, token_weights=on_padding)


def test_preference_step_adds_the_weighted_loss_and_logs_it():
    model = _moe("mixtral")
    assert router_aux_loss_coef(model) == 0.25
    batch = PrefixShareCollator(0, max_tokens_per_row=70)(_examples(2))
    loss, metrics = prefixshare.preference_step(model, batch, loss="simpo")
    plain, plain_metrics = prefixshare.preference_step(model, batch, loss="simpo", router_aux_loss_coef=0.0)
    assert "aux_loss" in metrics and "aux_loss" not in plain_metrics
    E, k = moe_routing(model)
    aux = load_balancing_loss(_router_logits(model, batch), batch.layout, num_experts=E, top_k=k)
    torch.testing.assert_close(metrics["aux_loss"], aux)
    torch.testing.assert_close(loss, plain + 0.25 * aux)
    loss.backward()
    gate = next(p for n, p in model.named_parameters() if n.endswith("gate.weight"))  # the router of layer 0
    assert gate.grad is not None and gate.grad.abs().max() > 0


def test_router_aux_loss_coef_follows_trl():
    """The coefficient: the config's unless given; 0 for a model without output_router_logits; an explicit
    coefficient for such a model is an error (as TRL's DPOTrainer)."""
    dense = tiny_model("llama")
    assert router_aux_loss_coef(dense) == 0.0
    with pytest.raises(ValueError, match="not a mixture-of-experts model"):
        router_aux_loss_coef(dense, 0.1)
    moe = _moe("mixtral")
    assert router_aux_loss_coef(moe, 0.0) == 0.0 and router_aux_loss_coef(copy.deepcopy(moe), 0.5) == 0.5


def test_router_logits_of_another_shape_are_refused():
    model = _moe("mixtral")
    batch = PrefixShareCollator(0)(_examples(3))
    logits = _router_logits(model, batch)
    with pytest.raises(ValueError, match=r"router logits of MoE layer 0 have shape"):
        load_balancing_loss((logits[0][:-1],), batch.layout, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="no router logits"):
        load_balancing_loss((), batch.layout, num_experts=4, top_k=2)


def test_group_token_weights_give_the_row_formats_value():
    """Online RL: TRL's forward over [prompt | completion] rows routes each prompt once per row, rows with an empty
    (fully masked) completion and groups with only such rows included. The prefix-shared forward of
    group_completions(keep_empty_groups=True), counted with its token_weights, gives the model's own aux_loss of
    the rows (transformers' load-balancing function with the attention mask), also when a group is split over
    units by the row budget."""
    from prefixshare import completion_logps, group_completions

    model = _moe("qwen3_moe")
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(3, 96, (6,), generator=g) for _ in range(3))
    prompts = torch.stack([a, a, a, a, b, b, c])
    completions = torch.randint(3, 96, (7, 5), generator=g)
    lengths = torch.tensor([5, 0, 3, 4, 0, 0, 2])  # prompt a: one empty row; prompt b: all empty
    completion_mask = (torch.arange(5)[None] < lengths[:, None]).long()
    with torch.no_grad():
        rows = model(
            input_ids=torch.cat([prompts, completions], 1),
            attention_mask=torch.cat([torch.ones_like(prompts), completion_mask], 1),
            output_router_logits=True,
            use_cache=False,
        )
    want = float(rows.aux_loss)
    E, k = moe_routing(model)
    for budget in (None, 12):  # 12: prompt a's three completions go to units of their own, each with the prompt
        groups = group_completions(
            prompts, completions, completion_mask=completion_mask, keep_empty_groups=True, max_tokens_per_row=budget
        )
        with capture_router_logits(model) as captured, torch.no_grad():
            completion_logps(model, groups, model_kwargs={"output_router_logits": True})
        (batch,), (weights,) = groups.batches, groups.token_weights
        got = float(load_balancing_loss(captured.router_logits, batch.layout, num_experts=E, top_k=k, token_weights=weights))
        assert abs(got - want) <= 1e-6 * want, (budget, got, want)
        assert float(weights.sum()) == int(torch.cat([torch.ones_like(prompts), completion_mask], 1).sum())
    without = group_completions(prompts, completions, completion_mask=completion_mask)
    assert float(without.token_weights[0].sum()) < float(weights.sum())  # prompt b is not laid out by default
