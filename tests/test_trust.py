"""No silent wrong numbers: every path that turns a prefix-shared batch into numbers either applies the
batch's layout in every attention layer or raises.

Each test here failed on main before the trust work (commit d9c493c): the log-prob functions returned
numbers 7-21% off for an unpatched or switched model, a pickled patched model failed to load in a fresh
process, LFM2 was accepted with allow_unverified=True, GPT-OSS's attention sinks were ignored silently,
and out-of-vocabulary ids or a zero chunk size gave torch's own errors.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import prefixshare
from prefixshare import (
    LayoutNotAppliedError,
    PairedCollator,
    PrefixShareCollator,
    SelfCheckError,
    UnsupportedModelError,
    gather_response_logps,
    is_patched,
    patch,
    response_logps,
    split_logps,
)
from prefixshare.reference import reference_logps
from prefixshare.testing import logps_alone, random_examples, relative_error
from prefixshare.testing import tiny_model

VOCAB = 96
PAD = 0


def examples(seed: int = 0, n: int = 3):
    return random_examples(n, VOCAB, seed=seed)


def batch_of(seed: int = 0, packed: bool = True):
    return PrefixShareCollator(PAD, max_tokens_per_row=80 if packed else None)(examples(seed))


# ---------------------------------------------------------------------------------------------- unapplied layouts
@pytest.mark.parametrize("packed", [False, True])
def test_never_patched_model_is_refused_by_every_log_prob_path(packed):
    model = tiny_model("llama", attn_implementation="sdpa")
    batch = batch_of(1, packed)
    with torch.no_grad():
        logits = model(**batch).logits  # the model swallows the layout keyword: nothing to stop here
    with pytest.raises(LayoutNotAppliedError, match=r"prefixshare\.patch\(model\)"):
        split_logps(logits, batch)
    with pytest.raises(LayoutNotAppliedError, match=r"prefixshare\.patch\(model\)"):
        gather_response_logps(logits, batch)
    with pytest.raises(LayoutNotAppliedError, match="not patched"):
        response_logps(model, batch)
    with pytest.raises((LayoutNotAppliedError, ValueError), match="patch"):
        prefixshare.preference_step(model, batch, ref=None, loss="simpo")


@pytest.mark.parametrize(
    "switch",
    [
        lambda model: model.set_attn_implementation("sdpa"),
        lambda model: setattr(model.config, "_attn_implementation", "sdpa"),
    ],
    ids=["set_attn_implementation", "config._attn_implementation"],
)
def test_attention_switched_after_patch_raises_in_the_forward(switch):
    model = patch(tiny_model("qwen2", attn_implementation="sdpa"))
    switch(model)
    batch = batch_of(2)
    with pytest.raises(LayoutNotAppliedError, match="0 of the 2 attention layers"):
        model(**batch)
    with pytest.raises(LayoutNotAppliedError):
        response_logps(model, batch)
    patch(model)  # the fix the message names
    with torch.no_grad():
        got = split_logps(model(**batch).logits, batch)
    assert torch.isfinite(got[0]).all()


def test_a_single_switched_layer_is_caught():
    """EVERY layer: one attention module whose config no longer selects the patched kernel is enough."""
    model = patch(tiny_model("llama", attn_implementation="eager"))
    attention = model.model.layers[1].self_attn
    attention.config = copy.deepcopy(attention.config)
    attention.config._attn_implementation = "eager"
    with pytest.raises(LayoutNotAppliedError, match="1 of the 2 attention layers"):
        model(**batch_of(3))


def test_policy_patched_reference_not():
    policy = patch(tiny_model("llama", attn_implementation="sdpa"))
    reference = tiny_model("llama", attn_implementation="sdpa", seed=1)
    batch = batch_of(4)
    with torch.no_grad():
        policy_logits = policy(**batch).logits
        reference_logits = reference(**batch).logits
    split_logps(policy_logits, batch)  # fine
    with pytest.raises(LayoutNotAppliedError):
        split_logps(reference_logits, batch)
    with pytest.raises(ValueError, match="not patched"):
        reference_logps(reference, batch)
    with pytest.raises(ValueError, match="not patched"):
        prefixshare.preference_step(policy, batch, ref=reference, loss="dpo")


def test_logits_of_another_batch_are_refused():
    model = patch(tiny_model("llama"))
    first, second = batch_of(5), batch_of(5)
    with torch.no_grad():
        logits = model(**first).logits
    with pytest.raises(LayoutNotAppliedError, match="another batch"):
        split_logps(logits, second)


def test_peft_wrapper_around_an_unpatched_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("qwen3", attn_implementation="sdpa"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    batch = batch_of(6)
    with torch.no_grad():
        logits = model(**batch).logits
    with pytest.raises(LayoutNotAppliedError):
        split_logps(logits, batch)
    with pytest.raises(LayoutNotAppliedError):
        response_logps(model, batch)


def test_peft_wrapper_added_after_patch():
    """patch, then get_peft_model: both the engine and logits read by hand are verified and exact."""
    peft = pytest.importorskip("peft")
    base = tiny_model("qwen3", attn_implementation="sdpa")
    reference = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(patch(base), config)
    ref_model = peft.get_peft_model(reference, config)
    ref_model.load_state_dict(model.state_dict())
    batch = batch_of(7)
    want = logps_alone(ref_model, examples(7))
    with torch.no_grad():
        assert relative_error(response_logps(model, batch).logps, want) < 1e-5
        assert relative_error(gather_response_logps(model(**batch).logits, batch).logps, want) < 1e-5


def test_nested_call_of_the_decoder():
    """model.model(**batch) applies the layout too (its own hooks), and raises when a layer does not."""
    model = patch(tiny_model("mistral"))
    batch = batch_of(8)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        full = model(**batch, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(hidden, full)
    model.model.config._attn_implementation = "eager"
    with pytest.raises(LayoutNotAppliedError):
        model.model(**batch)


def test_unpacked_paired_batches_need_no_patch():
    """One prompt+response per row from position 0: plain causal attention is the rule, so an unpatched model is
    exact there and the log-prob functions accept its logits (the paired baseline runs unpatched)."""
    model = tiny_model("gemma")
    batch = PairedCollator(PAD)(examples(9))
    with torch.no_grad():
        got = gather_response_logps(model(**batch).logits, batch).logps
        assert relative_error(got, logps_alone(model, examples(9))) < 1e-5
        with pytest.raises(LayoutNotAppliedError):
            gather_response_logps(model(**PairedCollator(PAD, max_tokens_per_row=60)(examples(9))).logits,
                                  PairedCollator(PAD, max_tokens_per_row=60)(examples(9)))


# ---------------------------------------------------------------------------------------------- pickling
def test_pickled_patched_model_loads_in_a_fresh_process(tmp_path):
    """torch.save of a patched model; torch.load in a new interpreter that never calls prefixshare.patch: the
    plain forward, generate() and a prefix-shared batch all work (before: KeyError on the implementation name)."""
    model = patch(tiny_model("gemma3", attn_implementation="sdpa"))
    batch = batch_of(10)
    with torch.no_grad():
        want = split_logps(model(**batch).logits, batch)
        plain = model(input_ids=batch["input_ids"][:1, :12]).logits
    torch.save(model, tmp_path / "model.pt")
    torch.save({"want": torch.stack(want), "plain": plain, "examples": examples(10)}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=False)
        ids = torch.tensor([[3, 4, 5, 6]])
        with torch.no_grad():
            model.generate(ids, max_new_tokens=3, do_sample=False)
        import prefixshare
        batch = prefixshare.PrefixShareCollator(0, max_tokens_per_row=80)(expected["examples"])
        with torch.no_grad():
            plain = model(input_ids=batch["input_ids"][:1, :12]).logits
            got = torch.stack(prefixshare.split_logps(model(**batch).logits, batch))
        assert torch.allclose(plain, expected["plain"], atol=1e-6), "plain forward changed"
        assert torch.allclose(got, expected["want"], atol=1e-5), (got, expected["want"])
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- other token mixers
def _lfm2(**overrides):
    import transformers

    config = transformers.Lfm2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["full_attention", "conv"], **overrides,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _qwen3_next():
    import transformers

    config = transformers.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, layer_types=["linear_attention", "full_attention"],
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "build,offender",
    [(_lfm2, "Lfm2ShortConv"), (_qwen3_next, "Qwen3NextGatedDeltaNet")],
    ids=["lfm2", "qwen3_next"],
)
@pytest.mark.parametrize("verify", [None, False])
def test_hybrid_decoders_are_refused_naming_the_layer(build, offender, verify):
    """Refused from the structure, before (and without) any self-check."""
    model = build()
    with pytest.raises(UnsupportedModelError, match=offender) as info:
        patch(model, verify=verify)
    assert "decoder layer" in str(info.value) and "attention mask" in str(info.value)
    assert not is_patched(model)


# ---------------------------------------------------------------------------------------------- the self-check
# (attention sinks: tests/test_agnostic.py, where GPT-OSS is exact and a kernel ignoring its sinks is caught)


class _TokenShiftMLP(torch.nn.Module):
    """An MLP that also adds the previous token's hidden state (an RWKV-style token shift): a token mixer that
    holds no convolution and no recurrent parameter, so only the runtime self-check can see it."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, hidden):
        shifted = torch.nn.functional.pad(hidden, (0, 0, 1, -1))
        return self.mlp(hidden + 0.5 * shifted)


def test_self_check_backs_the_structural_rule():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = _TokenShiftMLP(layer.mlp)
    with pytest.raises(SelfCheckError, match="differ"):
        patch(model, verify=True)
    assert not is_patched(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_passes_on_exact_models_and_runs_once(dtype):
    from prefixshare.selfcheck import self_check

    model = patch(tiny_model("gemma2", dtype=dtype), backend="eager", verify=True)
    errors = self_check(model)
    assert errors["logps"] <= (1e-4 if dtype == torch.float32 else 2e-2)
    assert "gradients" in errors


# ---------------------------------------------------------------------------------------------- inputs
def test_token_id_past_the_vocabulary_is_caught_by_the_patched_forward():
    model = patch(tiny_model("llama"))
    bad = examples(11)
    bad[1]["chosen_input_ids"] = list(bad[1]["chosen_input_ids"]) + [VOCAB + 4]
    batch = PrefixShareCollator(PAD)(bad)
    with pytest.raises(ValueError, match=rf"token id {VOCAB + 4} at row 1.*embedding table has {VOCAB} entries"):
        model(**batch)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_response_logps_rejects_a_bad_chunk_size(chunk_size):
    model = patch(tiny_model("llama"))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        response_logps(model, batch_of(12), chunk_size=chunk_size)


def test_a_refused_forward_leaves_later_forwards_unchanged():
    """A forward refused by the checks must not leave its record active: later plain forwards would lose
    their causal mask (seen under transformers 4.57 before the fix)."""
    model = patch(tiny_model("llama"))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        bad = examples(13)
        bad[0]["chosen_input_ids"] = [VOCAB + 1]
        with pytest.raises(ValueError, match="embedding table"):
            model(**PrefixShareCollator(PAD)(bad))
        with pytest.raises(ValueError, match="labels"):
            batch = batch_of(13)
            model(**batch, labels=batch["input_ids"])
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_a_unit_past_a_learned_position_table_names_the_limit(model_type):
    """GPT-2 with n_positions=32 given 35 positions raised a bare IndexError (as the plain model does)."""
    from prefixshare.testing import tiny_model_of

    from prefixshare import UnsupportedModelError

    try:
        model = patch(tiny_model_of(model_type, n_positions=32, max_position_embeddings=32))
    except UnsupportedModelError as error:  # (transformers 4.57's GPT-2 and OPT do not route attention so)
        pytest.skip(f"this transformers' {model_type} cannot be patched: {str(error)[:120]}")
    fits = [dict(prompt_input_ids=list(range(3, 23)), chosen_input_ids=list(range(3, 15)), rejected_input_ids=[5, 6])]
    model(**PrefixShareCollator(PAD)(fits))  # 32 positions: the table's last row; the packed row is longer
    long = [dict(prompt_input_ids=list(range(3, 23)), chosen_input_ids=list(range(3, 18)), rejected_input_ids=[5, 6])]
    with pytest.raises(ValueError, match=r"example 0 \(row 0\) needs 35 positions .*max_position_embeddings=32"):
        model(**PrefixShareCollator(PAD)(long))
