"""The log-prob engine (prefixshare.response_logps): exact, per token, and never [T, V].

Every check compares the engine with two references computed by other code paths on the same model:

* ``gather_response_logps(model(**batch).logits, batch)``: the full ``[B, L, V]`` logits of the same
  prefix-shared forward (the model's own final logit processing included), and
* each prompt+response run ALONE through the model's plain forward (no layout, original attention),

for the log-probs and for the gradient of ``sum(w * logps)`` (fixed random ``w``) on every trainable
parameter: the LM head's and, where tied, the embeddings' included. float32 throughout; the engine
differs from both only in summation order (chunked LM head, log-sum-exp in sub-blocks), so the
tolerance is the project's 1e-5 relative.

These tests fail on main d9c493c (before the engine): ``prefixshare.engine`` did not exist, response_logps
had no ``per_token``/``stats``/``chunk_size`` for the head, and its LM head call built ``[1, T, V]``
logits (test_lm_head_never_sees_more_than_a_chunk).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch

import prefixshare as ps
from prefixshare._compat import TRANSFORMERS_VERSION
from prefixshare import engine
from prefixshare.engine import STATS, LogitProcessing, LogitProcessingMismatch, logit_processing
from prefixshare.testing import logps_alone, random_examples, relative_error
from prefixshare.testing import ARCHITECTURE_NAMES, tiny_model

VOCAB = 96
TOL = 1e-5
N = 5


def weights(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1234))


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def logps_and_grads(model, compute):
    """``(logps [n, K], {parameter: grad of sum(w * logps)})`` of ``compute()`` on a zeroed model."""
    model.zero_grad(set_to_none=True)
    logps = compute()
    (logps * weights(logps.shape)).sum().backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return logps.detach(), grads


def assert_same(got, want, what: str, tol: float = TOL):
    logps, grads = got
    want_logps, want_grads = want
    assert relative_error(logps, want_logps) < tol, (what, relative_error(logps, want_logps))
    assert grads.keys() == want_grads.keys(), (what, sorted(grads.keys() ^ want_grads.keys()))
    assert grads, what
    for name, grad in want_grads.items():
        assert relative_error(grads[name], grad) < tol, (what, name, relative_error(grads[name], grad))


def check_engine(model, examples, collator, *, chunk_size=7, tol=TOL):
    """The engine against full logits and against runs alone: log-probs and every trainable gradient."""
    batch = collator(examples)
    engine_result = logps_and_grads(model, lambda: ps.response_logps(model, batch, chunk_size=chunk_size).logps)
    full = logps_and_grads(model, lambda: ps.gather_response_logps(model(**batch).logits, batch).logps)
    alone = logps_and_grads(model, lambda: logps_alone(model, examples))
    assert_same(engine_result, full, "engine vs full logits", tol)
    assert_same(engine_result, alone, "engine vs runs alone", tol)
    return engine_result


COLLATORS = {
    "unpacked": lambda: ps.PrefixShareCollator(0),
    "packed": lambda: ps.PrefixShareCollator(0, max_tokens_per_row=80),
}


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("packing", list(COLLATORS))
@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
def test_full_finetuning_equals_full_logits_and_runs_alone(architecture, packing):
    """Trainable LM head (the recompute path), several chunks; Gemma's tied embeddings get the head's gradient."""
    model = ps.patch(tiny_model(architecture).train(), backend="eager")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == architecture.startswith("gemma")
    _, grads = check_engine(model, random_examples(N, VOCAB, seed=4), COLLATORS[packing]())
    assert "lm_head.weight" in grads or tied


def lora(model, targets, seed=3):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("architecture", ["llama", "gemma2", "gemma3"])
def test_lora_frozen_head_equals_full_logits_and_runs_alone(architecture):
    """A frozen LM head (the gradient-in-forward path) with LoRA on every projection."""
    model = ps.patch(lora(tiny_model(architecture), "all-linear").train(), backend="eager")
    assert not any(p.requires_grad for p in engine._output_embeddings(model).parameters())
    check_engine(model, random_examples(N, VOCAB, seed=5), COLLATORS["packed"]())


def test_lora_on_the_lm_head_equals_full_logits_and_runs_alone():
    """A peft adapter on lm_head itself: the engine calls the LM head module, so the adapter applies."""
    model = ps.patch(lora(tiny_model("llama"), ["q_proj", "v_proj", "lm_head"]).train(), backend="eager")
    _, grads = check_engine(model, random_examples(N, VOCAB, seed=6), COLLATORS["packed"]())
    assert any("lm_head.lora_" in name for name in grads)


def test_qlora_equals_full_logits_and_runs_alone(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=torch.float32, device_map={"": "cpu"}
    )
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = ps.patch(lora(base, ["q_proj", "k_proj", "v_proj", "o_proj"]).train(), backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' own gemv_4bit autograd warning, as in test_training
        check_engine(model, random_examples(N, VOCAB, seed=7), COLLATORS["unpacked"]())


def test_gradient_checkpointing_and_the_reference_under_no_grad():
    model = ps.patch(tiny_model("qwen3").train(), backend="sdpa")
    ps._compat.enable_gradient_checkpointing(model, use_reentrant=False)
    check_engine(model, random_examples(N, VOCAB, seed=8), COLLATORS["packed"]())
    batch = COLLATORS["packed"]()(random_examples(N, VOCAB, seed=8))
    with torch.no_grad():
        got = ps.response_logps(model, batch, chunk_size=3).logps
        want = ps.gather_response_logps(model(**batch).logits, batch).logps
    assert not got.requires_grad and relative_error(got, want) < TOL


def test_k_responses_and_the_paired_format():
    model = ps.patch(tiny_model("mistral").train(), backend="eager")
    check_engine(model, random_examples(4, VOCAB, seed=9, num_responses=3), COLLATORS["packed"]())
    check_engine(model, random_examples(4, VOCAB, seed=9), lambda examples: ps.PairedCollator(0)(examples))


# ---------------------------------------------------------------------------------------------- per token
def full_logit_stats(model, batch):
    """Per-token log-probs and statistics from the full [B, L, V] logits (the definitions, computed plainly)."""
    layout = batch.layout
    with torch.no_grad():
        logits = model(**batch).logits
    B, L, V = logits.shape
    z = logits.reshape(B * L, V)[layout.predictor_index].float()
    targets = batch["input_ids"].reshape(-1)[layout.target_index]
    log_p = torch.log_softmax(z, -1)
    return {
        "token_logps": log_p.gather(-1, targets[:, None]).squeeze(-1),
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "logsumexp": torch.logsumexp(z, -1),
        "argmax_match": (z.argmax(-1) == targets).float(),
        "mean_logit": z.mean(-1),
        "log_sum_sq_probs": torch.log((log_p.exp() ** 2).sum(-1)),
    }


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_per_token_logps_and_stats_equal_those_of_full_logits(architecture):
    model = ps.patch(tiny_model(architecture).train(), backend="eager")
    batch = COLLATORS["packed"]()(random_examples(N, VOCAB, seed=10, num_responses=3))
    want = full_logit_stats(model, batch)
    result = ps.response_logps(model, batch, per_token=True, stats=STATS, chunk_size=5)
    assert result.token_logps.dtype == torch.float32 and result.token_logps.requires_grad
    assert relative_error(result.token_logps, want["token_logps"]) < TOL
    for name in STATS:
        got = result.stats[name]
        assert got.dtype == torch.float32 and not got.requires_grad, name
        assert relative_error(got, want[name]) < TOL, (name, relative_error(got, want[name]))
        sums = ps.logps.sum_per_response(want[name], batch.layout)
        assert relative_error(result.stat_sums[name], sums) < TOL, name
    assert 0 < result.stats["argmax_match"].sum() < len(result.stats["argmax_match"])  # the check can tell
    # the per-response sums are the sums of the per-token values
    assert relative_error(result.logps, ps.logps.sum_per_response(result.token_logps, batch.layout)) < TOL


def test_stats_do_not_change_the_logps_or_their_gradients():
    model = ps.patch(tiny_model("gemma3").train(), backend="eager")
    batch = COLLATORS["packed"]()(random_examples(N, VOCAB, seed=11))
    plain = logps_and_grads(model, lambda: ps.response_logps(model, batch, chunk_size=4).logps)
    with_stats = logps_and_grads(model, lambda: ps.response_logps(model, batch, chunk_size=4, stats=STATS).logps)
    assert torch.equal(plain[0], with_stats[0])
    assert all(torch.equal(plain[1][n], with_stats[1][n]) for n in plain[1])


# ---------------------------------------------------------------------------------------------- entropy_grad
def entropy_and_grads(model, compute):
    """``(token_logps [T], entropy [T], {parameter: grad of sum(w1 * token_logps + w2 * entropy)})`` of ``compute()``
    on a zeroed model (fixed random w1, w2: both gradient terms matter)."""
    model.zero_grad(set_to_none=True)
    logps, entropy = compute()
    w1, w2 = weights((2, *logps.shape))
    ((w1 * logps).sum() + (w2 * entropy).sum()).backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return logps.detach(), entropy.detach(), grads


def logps_and_grads_of_sum(model, compute):
    """:func:`entropy_and_grads` without the entropies' term (``w2 = 0``)."""
    model.zero_grad(set_to_none=True)
    logps, entropy = compute()
    w1, _ = weights((2, *logps.shape))
    (w1 * logps).sum().backward()
    grads = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    return logps.detach(), entropy.detach(), grads


def full_logit_entropy(model, batch, temperature):
    """Token log-probs and entropies of ``softmax(logits / temperature)`` from the full [B, L, V] logits, by autograd."""
    logits = model(**batch).logits
    B, L, V = logits.shape
    z = logits.reshape(B * L, V)[batch.layout.predictor_index].float() / temperature
    targets = batch["input_ids"].reshape(-1)[batch.layout.target_index]
    log_p = torch.log_softmax(z, -1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("head", ["trainable", "frozen", "gathered_per_call"])
@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_entropy_grad_equals_autograd_on_full_logits(architecture, head, monkeypatch):
    """``entropy_grad=True``: the per-token entropies (and log-probs) and the gradient of a random weighted sum of
    both on every trainable parameter equal plain autograd on the full logits, under a temperature, with Gemma2's
    softcap, for each gradient path: trainable LM head (checkpointed chunks), frozen head (LoRA: gradients
    precomputed in the forward) and [T, V] logits already built (an LM head gathered per call). Fails on the main
    this started from (no entropy_grad: TypeError), and with the g_H term of the backward dropped."""
    model = tiny_model(architecture).train()
    if head == "frozen":
        model = lora(model, "all-linear")
    model = ps.patch(model, backend="eager")
    if head == "gathered_per_call":
        monkeypatch.setattr(engine, "_gathered_per_call", lambda head: "a test says so")
    head_params = list(engine._output_embeddings(model).parameters())
    assert any(p.requires_grad for p in head_params) == (head != "frozen")
    batch = COLLATORS["packed"]()(random_examples(N, VOCAB, seed=22, num_responses=3))
    temperature = 0.7

    def ours():
        out = ps.response_logps(model, batch, per_token=True, stats=("logsumexp", "entropy"), chunk_size=5,
                                temperature=temperature, entropy_grad=True)  # fmt: skip
        assert list(out.stats) == ["logsumexp", "entropy"] and not out.stats["logsumexp"].requires_grad
        assert out.stats["entropy"].dtype == torch.float32 and out.stat_sums["entropy"].requires_grad
        return out.token_logps, out.stats["entropy"]

    per_call = pytest.warns(UserWarning, match="gathered on every call") if head == "gathered_per_call" else nullcontext()
    with per_call:  # the [T, V] logits path is the one taken
        got = entropy_and_grads(model, ours)
    want = entropy_and_grads(model, lambda: full_logit_entropy(model, batch, temperature))
    for name, a, b in (("token_logps", got[0], want[0]), ("entropy", got[1], want[1])):
        assert relative_error(a, b) < TOL, (name, relative_error(a, b))
    assert got[2].keys() == want[2].keys() and got[2]
    for name, grad in want[2].items():
        assert relative_error(got[2][name], grad) < TOL, (name, relative_error(got[2][name], grad))
    # the entropies' gradient is not a rounding term: without it the gradients differ
    _, _, logps_only = logps_and_grads_of_sum(model, lambda: full_logit_entropy(model, batch, temperature))
    assert max(relative_error(logps_only[n], want[2][n]) for n in want[2]) > 1e-2

    # no grad: the same values, without a graph (the reference's forward)
    with torch.no_grad():
        out = ps.response_logps(model, batch, per_token=True, stats=("entropy",), chunk_size=5, temperature=temperature,
                                entropy_grad=True)  # fmt: skip
    assert not out.stats["entropy"].requires_grad
    assert relative_error(out.stats["entropy"], want[1]) < TOL


def test_entropy_grad_leaves_the_logps_and_their_gradients_unchanged():
    """The same log-probs (bit for bit: the forward is the same) and their gradients when the entropies are not in
    the loss (to rounding: the backward forms ``dz`` with the entropy's term at zero)."""
    model = ps.patch(tiny_model("gemma3").train(), backend="eager")
    batch = COLLATORS["packed"]()(random_examples(N, VOCAB, seed=11))
    plain = logps_and_grads(model, lambda: ps.response_logps(model, batch, chunk_size=4).logps)
    with_grad = logps_and_grads(
        model, lambda: ps.response_logps(model, batch, chunk_size=4, stats=STATS, entropy_grad=True).logps
    )
    assert torch.equal(plain[0], with_grad[0])
    assert_same(with_grad, plain, "entropy_grad=True, entropies unused")


def test_token_index_and_padding():
    model = ps.patch(tiny_model("llama"), backend="eager")
    examples = random_examples(4, VOCAB, seed=12, num_responses=3)
    batch = COLLATORS["packed"]()(examples)
    result = ps.response_logps(model, batch, per_token=True, stats=("entropy",))
    alone_tokens = []
    for i, example in enumerate(examples):  # each response alone, token by token
        prompt = example["prompt_input_ids"]
        for k, response in enumerate(example["responses_input_ids"]):
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                log_p = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            for j, token in enumerate(response):
                alone_tokens.append((i, k, j, float(log_p[len(prompt) + j - 1, token])))
    index = result.token_index
    got = sorted(zip(index.example.tolist(), index.response.tolist(), index.position.tolist(), result.token_logps.tolist()))
    assert [t[:3] for t in got] == [t[:3] for t in alone_tokens]
    assert max(abs(a[3] - b[3]) for a, b in zip(got, alone_tokens)) < 1e-5

    padded, mask = result.padded()
    lengths = result.num_tokens
    assert padded.shape == (4, 3, int(lengths.max())) and mask.dtype == torch.bool
    assert torch.equal(mask.sum(-1), lengths)
    for i, k, j, value in alone_tokens:
        assert mask[i, k, j] and abs(float(padded[i, k, j].detach()) - value) < 1e-5
    assert (padded[~mask] == 0).all()
    # gradients flow through the padded form back to the parameters
    padded.sum().backward()
    assert model.lm_head.weight.grad is not None
    entropy, entropy_mask = result.padded("entropy", fill=-1.0)
    assert torch.equal(entropy_mask, mask) and (entropy[~mask] == -1).all()


# ---------------------------------------------------------------------------------------------- final logit processing
def _tiny(config_class, **extra):
    import transformers

    from prefixshare.testing import TINY_SIZES

    torch.manual_seed(0)
    config = config_class(**{**TINY_SIZES, **extra})
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


def _later_architectures():
    """Decoders prefixshare cannot patch yet whose forward post-processes the logits (a later issue adds them)."""
    import transformers as tf

    cases = {
        "cohere": (tf.CohereConfig, dict(logit_scale=0.5), LogitProcessing(multiply=0.5)),
        "cohere2": (tf.Cohere2Config, dict(logit_scale=0.5, sliding_window=8), LogitProcessing(multiply=0.5)),
        "granite": (tf.GraniteConfig, dict(logits_scaling=4.0), LogitProcessing(divide=4.0)),
        "granitemoe": (
            tf.GraniteMoeConfig, dict(logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2),
            LogitProcessing(divide=4.0),
        ),
        "gemma3-softcap": (
            tf.Gemma3TextConfig, dict(final_logit_softcapping=3.0, sliding_window=8, query_pre_attn_scalar=12),
            LogitProcessing(softcap=3.0),
        ),
        "gemma3n": (
            tf.Gemma3nTextConfig,
            # pad_token_id 95: the collators' padding id 0 gets a non-zero embedding (a zero one gives NaN gradients
            # in Gemma3n's per-layer norms, at padding positions, in its plain forward as well)
            dict(final_logit_softcapping=3.0, sliding_window=8, intermediate_size=[128, 128], hidden_size_per_layer_input=8,
                 pad_token_id=VOCAB - 1,
                 vocab_size_per_layer_input=VOCAB, laurel_rank=4, altup_num_inputs=2, num_kv_shared_layers=0,
                 activation_sparsity_pattern=[0.0, 0.0], layer_types=["sliding_attention", "full_attention"]),
            LogitProcessing(softcap=3.0),
        ),
    }  # fmt: skip
    if hasattr(tf, "HyperCLOVAXConfig"):  # transformers >= 5.x
        cases["hyperclovax"] = (tf.HyperCLOVAXConfig, dict(logits_scaling=0.25), LogitProcessing(multiply=0.25))
    return cases


LATER = _later_architectures()


@pytest.mark.parametrize("name", list(LATER))
def test_final_logit_processing_of_later_architectures(name):
    """Each kind of final logit processing, on a tiny model of an architecture that has it, patched unverified."""
    config_class, extra, expected = LATER[name]
    model = _tiny(config_class, **extra)
    assert logit_processing(model) == expected
    if not getattr(model, "_supports_attention_backend", False):  # e.g. GraniteMoe in transformers 4.57
        pytest.skip(f"{type(model).__name__} computes attention itself in this transformers: it cannot be patched")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "patching unverified model_type" (Gemma3 is verified)
        ps.patch(model, allow_unverified=True)
    check_engine(model, random_examples(3, VOCAB, seed=13), COLLATORS["packed"](), chunk_size=5)


@pytest.mark.parametrize("name", ["falcon_h1", "mamba", "recurrent_gemma"])
def test_final_logit_processing_of_models_prefixshare_cannot_patch(name):
    """Falcon-H1 (lm_head_multiplier), Mamba (upcast), RecurrentGemma (logits_soft_cap): on the paired format,
    one response per row, which their plain (unpatched) forward computes exactly."""
    import transformers as tf

    config_class, extra, expected = {
        "falcon_h1": (tf.FalconH1Config, dict(lm_head_multiplier=0.3, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                              mamba_d_state=8, mamba_chunk_size=16), LogitProcessing(multiply=0.3)),
        "mamba": (tf.MambaConfig, dict(state_size=8, conv_kernel=4, expand=2), LogitProcessing(upcast=True)),
        "recurrent_gemma": (tf.RecurrentGemmaConfig, dict(logits_soft_cap=3.0, lru_width=64, attention_window_size=8,
                                                          block_types=["recurrent", "attention"]), LogitProcessing(softcap=3.0)),
    }[name]  # fmt: skip
    model = _tiny(config_class, **extra)
    assert logit_processing(model) == expected
    if name == "recurrent_gemma" and TRANSFORMERS_VERSION.major < 5:
        pytest.skip("RecurrentGemma of transformers 4.57 keeps its recurrent state between forwards: its own plain "
                    "forward fails on a second backward, so the comparison cannot run there")
    check_engine(model, random_examples(3, VOCAB, seed=14), lambda examples: ps.PairedCollator(0)(examples), chunk_size=5)


def test_gemma3_for_conditional_generation_applies_no_final_softcap():
    """Gemma3ForConditionalGeneration's forward ignores a text config's final softcap; so does the engine."""
    import transformers

    from prefixshare.testing import tiny_config

    config = transformers.Gemma3Config(
        text_config=tiny_config("gemma3", final_logit_softcapping=3.0).to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ps.patch(transformers.Gemma3ForConditionalGeneration._from_config(config, attn_implementation="eager"))
    assert logit_processing(model) == LogitProcessing()
    check_engine(model.train(), random_examples(3, VOCAB - 3, seed=15), COLLATORS["packed"]())


def test_a_wrong_processing_table_raises_instead_of_returning_wrong_numbers(monkeypatch):
    model = ps.patch(_tiny(_later_architectures()["cohere"][0], logit_scale=0.5), allow_unverified=True)
    batch = COLLATORS["packed"]()(random_examples(3, VOCAB, seed=16))
    monkeypatch.delitem(engine._FINAL_LOGITS, "cohere")
    with pytest.raises(LogitProcessingMismatch, match=r"CohereForCausalLM's forward processes .* \(none\)"):
        ps.response_logps(model, batch)


def test_an_unknown_post_processing_raises():
    """A model whose forward changes its logits in a way no table knows is caught by the self-check."""
    import transformers

    class ScaledLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = ps.patch(ScaledLlama(tiny_model("llama").config))
    batch = COLLATORS["packed"]()(random_examples(3, VOCAB, seed=17))
    with pytest.raises(LogitProcessingMismatch, match="ScaledLlama's forward processes"):
        ps.response_logps(model, batch)


def test_the_upcast_order_matters_in_bfloat16(monkeypatch):
    """A softcap computed after an upcast differs from one in bfloat16 by rounding only: still caught."""
    model = ps.patch(tiny_model("gemma2", dtype=torch.bfloat16), backend="eager")
    batch = COLLATORS["packed"]()(random_examples(3, VOCAB, seed=18))
    with torch.no_grad():
        got = ps.response_logps(model, batch).logps
        want = ps.gather_response_logps(model(**batch).logits, batch).logps
    assert relative_error(got, want) < 1e-2  # bfloat16 logits: same operations, other matmul shapes
    fresh = ps.patch(tiny_model("gemma2", dtype=torch.bfloat16), backend="eager")
    monkeypatch.setitem(engine._FINAL_LOGITS, "gemma2", lambda text: LogitProcessing(upcast=True, softcap=5.0))
    with pytest.raises(LogitProcessingMismatch, match="upcast, softcap 5.0"):
        ps.response_logps(fresh, batch)


def test_the_self_check_runs_once_per_model_and_dtype():
    model = ps.patch(tiny_model("gemma2"), backend="eager")
    batch = COLLATORS["packed"]()(random_examples(3, VOCAB, seed=19))
    rows = []
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[-2]))
    with torch.no_grad():
        for _ in range(2):
            ps.response_logps(model, batch, chunk_size=1000)
    handle.remove()
    T = len(batch.layout.target_index)
    # first call: the forward's own LM head call takes 2 probe rows, then the engine's chunk; then none
    assert rows == [2, T, 0, T]


# ---------------------------------------------------------------------------------------------- memory and shapes
@pytest.mark.parametrize("lora_model", [False, True])
def test_lm_head_never_sees_more_than_a_chunk(lora_model):
    """The LM head is only ever called on at most chunk_size rows, in forward and in the backward's recompute."""
    model = tiny_model("llama").train()
    if lora_model:
        model = lora(model, ["q_proj", "v_proj"])
    model = ps.patch(model, backend="sdpa")
    head = engine._output_embeddings(model)
    batch = COLLATORS["unpacked"]()(random_examples(6, VOCAB, seed=20))
    shapes = []
    handle = head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    ps.response_logps(model, batch, chunk_size=8).logps.sum().backward()
    handle.remove()
    T = len(batch.layout.target_index)
    assert T > 16
    assert max(s[-2] for s in shapes) <= 8
    assert sum(s[-2] for s in shapes) >= T  # every row went through the head
    assert all(s[-1] == VOCAB for s in shapes)


def test_default_chunk_size_follows_the_vocabulary():
    assert engine.default_chunk_size(32000) == 1024
    assert engine.default_chunk_size(128256) == 261
    assert engine.default_chunk_size(262144) == 128
    assert engine.default_chunk_size(10**7) == 32


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_arguments_raise():
    model = ps.patch(tiny_model("llama"))
    batch = COLLATORS["unpacked"]()(random_examples(2, VOCAB))
    with pytest.raises(ValueError, match=r"unknown stats \['perplexity'\]"):
        ps.response_logps(model, batch, stats=("entropy", "perplexity"))
    with pytest.raises(ValueError, match=r"entropy_grad=True needs 'entropy' in stats \(got stats=\['logsumexp'\]\)"):
        ps.response_logps(model, batch, stats=("logsumexp",), entropy_grad=True)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
            ps.response_logps(model, batch, chunk_size=bad)
    other = COLLATORS["unpacked"]()(random_examples(3, VOCAB, seed=9))
    with pytest.raises(ValueError, match="does not match the layout"):
        ps.response_logps(model, {**other, "prefixshare_layout": batch.layout})
    result = ps.response_logps(model, batch)
    with pytest.raises(ValueError, match="per_token=True"):
        result.padded()


def test_padded_needs_the_values_it_names():
    model = ps.patch(tiny_model("llama"))
    batch = COLLATORS["unpacked"]()(random_examples(2, VOCAB))
    result = ps.response_logps(model, batch, stats=("entropy",))
    with pytest.raises(ValueError, match="no token_logps"):
        result.padded()
    with pytest.raises(ValueError, match="no per-token stat 'mean_logit'"):
        result.padded("mean_logit")
    with pytest.raises(ValueError, match=r"values must be a \[T\] tensor"):
        ps.pad_per_token(torch.zeros(3), result.token_index, result.num_tokens)


def test_a_forward_that_calls_the_head_twice_is_refused():
    import transformers

    class TwoHeads(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            super().forward(*args, **kwargs)
            return super().forward(*args, **kwargs)

    model = ps.patch(TwoHeads(tiny_model("llama").config))
    with pytest.raises(ValueError, match="called its LM head .* 2 times instead of once"):
        ps.response_logps(model, COLLATORS["unpacked"]()(random_examples(2, VOCAB)))


def test_the_old_lm_head_module_is_a_deprecated_shim():
    from prefixshare import lm_head

    model = ps.patch(tiny_model("llama"))
    batch = COLLATORS["unpacked"]()(random_examples(2, VOCAB))
    with pytest.warns(DeprecationWarning, match="use prefixshare.response_logps"):
        old = lm_head.response_logps(model, batch)
    assert torch.equal(old.logps, ps.response_logps(model, batch).logps)
    with pytest.raises(AttributeError, match="never builds"):
        lm_head.predictor_logits  # noqa: B018


def test_a_head_gathered_per_call_runs_once_on_all_rows(monkeypatch):
    """An LM head that a wrapper gathers on every call (its own FSDP unit, ZeRO-3) is called once, on all T rows."""
    model = ps.patch(tiny_model("gemma2").train(), backend="eager")
    monkeypatch.setattr(engine, "_gathered_per_call", lambda head: "a test says so")
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    with pytest.warns(UserWarning, match=r"gathered on every call \(a test says so\)"):
        check_engine(model, random_examples(N, VOCAB, seed=21), COLLATORS["packed"](), chunk_size=4)
    handle.remove()
    T = len(COLLATORS["packed"]()(random_examples(N, VOCAB, seed=21)).layout.target_index)
    assert (1, T, VOCAB) in shapes  # once on all rows, then only the full-logits and alone references
    batch = COLLATORS["packed"]()(random_examples(N, VOCAB, seed=21))
    result = ps.response_logps(model, batch, per_token=True, stats=STATS, chunk_size=4)
    want = full_logit_stats(model, batch)
    for name in STATS:
        assert relative_error(result.stats[name], want[name]) < TOL, name


# ---------------------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_mixed_precision_as_accelerate_sets_it_equals_the_models_own_logits(dtype, head):
    """accelerate's bf16 mixed precision (TRL's default ``bf16=True``) turns autocast on inside the model's forward;
    the engine's LM head calls come after it and must run under the same autocast. Before, float16 weights failed
    (``expected m1 and m2 to have the same dtype``: float32 hidden states, from a float16 residual plus bfloat16
    attention, met the float16 head outside autocast) and float32 weights gave log-probs 1.3e-4 away from the
    model's own (a float32 head where the forward computes it in bfloat16)."""
    from accelerate import Accelerator

    model = tiny_model("qwen2", dtype=dtype, tie_word_embeddings=False).train()
    if head == "frozen":
        model.lm_head.requires_grad_(False)
    model = Accelerator(mixed_precision="bf16", cpu=True).prepare(ps.patch(model, backend="eager", verify=False))
    batch = ps.PrefixShareCollator(0, max_tokens_per_row=80)(random_examples(N, VOCAB, seed=4))
    ours = logps_and_grads(model, lambda: ps.response_logps(model, batch, chunk_size=7).logps)
    full = logps_and_grads(model, lambda: ps.gather_response_logps(model(**batch).logits, batch).logps)
    # the log-probs agree as in float32 (the same bfloat16 head products, each row's log-softmax in float32); the
    # gradients within bfloat16's rounding (epsilon 3.9e-3): the backward sums the same bfloat16 products in
    # another order (per chunk, accumulated in the parameters' dtype, vs one matmul over all rows); measured
    # 3.2e-3 to 7.4e-3 on embed_tokens, the parameter whose gradient sums the most terms
    assert relative_error(ours[0], full[0]) < TOL
    assert ours[1].keys() == full[1].keys() and ours[1]
    for name, grad in full[1].items():
        assert relative_error(ours[1][name], grad) < 2e-2, (name, relative_error(ours[1][name], grad))
