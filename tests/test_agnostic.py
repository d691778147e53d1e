"""Support by structure (#14): ``patch(model)`` with no opt-in works for attention-only decoders of every kind
(MoE, attention sinks, multi-head latent attention, NoPE layers, partial rotary, per-layer sliding/full types,
windows that live only in the model's mask, multipliers and scales), each exact against runs alone in eager and
sdpa, or refused with a reason that names the layer and the feature.

Tiny models come from ``prefixshare.testing.tiny_model_of`` (2 layers, hidden 64, vocabulary 96, weights of
std 0.1). Architectures missing in the installed transformers (4.57 has no Olmo3, SmolLM3 ...) are skipped.

On the main this branch started from (096dc77) every family here but the seven listed ones raised
UnsupportedModelError without allow_unverified=True; with it, GPT-OSS failed the self-check (its sinks were
ignored), PhiMoE and windowed Qwen2-MoE failed it too (their windows live only in the model's mask), the
refusals named model types instead of layers, and the varlen backend did not accept a value head dim other
than the query's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import prefixshare
from prefixshare import PrefixShareCollator, SelfCheckError, UnsupportedModelError, is_patched, patch
from prefixshare.backends import BACKENDS
from prefixshare.structure import attention_features, text_attention_modules
from prefixshare.testing import compare_with_alone, random_examples
from prefixshare.testing import tiny_model_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOLERANCE = 1e-5


def _installed(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def build(model_type: str, attn_implementation: str = "eager", *, interface: bool = True, **overrides):
    """The tiny model; skipped if this transformers lacks it, or (``interface``) computes its attention outside
    the AttentionInterface (4.57's Qwen2-MoE, PhiMoE, StableLM, BERT: refused for that, tests elsewhere)."""
    if not _installed(model_type):
        pytest.skip(f"transformers has no {model_type} here")
    model = tiny_model_of(model_type, attn_implementation=attn_implementation, **overrides)
    if interface and not text_attention_modules(model):
        pytest.skip(f"{model_type}'s attention does not go through the AttentionInterface in this transformers")
    return model


def exact(reference, patched, *, num_responses=2, packed=True, seed=0, gradient_floor=0.0):
    examples = random_examples(3, 96, seed=seed, num_responses=num_responses)
    collator = PrefixShareCollator(0, max_tokens_per_row=90 if packed else None)
    result = compare_with_alone(reference, patched, examples, collator, gradient_floor=gradient_floor)
    assert result.logps_error <= TOLERANCE and result.grad_error <= TOLERANCE, result
    return result


# ---------------------------------------------------------------------------------------------- exact families
FAMILIES = {
    # model type: what it exercises
    "mixtral": "MoE (top-2 of 4 experts), sliding window on every layer",
    "qwen2_moe": "MoE with a shared expert; sliding layers whose window lives only in the model's mask",
    "qwen3_moe": "MoE, q/k norm",
    "glm4_moe": "MoE with grouped top-k routing, partial rotary",
    "gpt_oss": "MoE, attention sinks, alternating sliding/full layers",
    "deepseek_v3": "MLA (value head dim 16, query/key 24), MoE after a dense layer",
    "olmo3": "per-layer sliding/full types, q/k norm",
    "cohere2": "sliding layers with RoPE, full layers without (NoPE), logit scale",
    "smollm3": "a NoPE layer",
    "phi3": "fused qkv, sliding window",
    "glm": "partial rotary",
    "granite": "embedding, attention, residual and logit multipliers",
    "cohere": "logit scale, parallel attention and MLP",
    "gemma3_text": "5 sliding : 1 full, per-layer-type RoPE",
    "phimoe": "MoE (sparsemixer); a window the model applies only through its mask",
}


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_is_exact_with_no_opt_in(model_type, backend):
    """K=2 packed and K=4 unpacked, log-probs and every parameter's gradient (the whole gradient as one vector:
    some of these models carry key biases, whose true gradient is zero and computed one rounding noise)."""
    reference = build(model_type)
    model = patch(copy.deepcopy(reference), backend=backend)
    assert prefixshare.patched_backend(model) == backend
    exact(reference, model, gradient_floor=1.0)
    exact(reference, model, num_responses=4, packed=False, seed=1, gradient_floor=1.0)


# ---------------------------------------------------------------------------------------------- attention sinks
def _gpt_oss(**overrides):
    model = build("gpt_oss", **overrides)
    with torch.no_grad():  # sinks far from zero, so that a kernel that dropped them would show
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attention_sinks_are_applied_and_get_their_gradient(backend):
    reference = _gpt_oss()
    assert attention_features(reference) == {"attention sinks": ["GptOssAttention"]}
    model = patch(copy.deepcopy(reference), backend=backend)
    result = exact(reference, model)  # every parameter on its own scale: the sinks' gradient too
    assert result.num_parameters > 0
    sinks = model.model.layers[0].self_attn.sinks
    assert sinks.grad is not None and sinks.grad.abs().max() > 0


def test_flex_applies_sinks_through_the_log_sum_exp():
    """FlexAttention on CPU runs forward only: its log-probs with sinks against runs alone."""
    reference = _gpt_oss()
    model = patch(copy.deepcopy(reference), backend="flex_attention")
    examples = random_examples(3, 96, seed=2)
    result = compare_with_alone(reference, model, examples, PrefixShareCollator(0, max_tokens_per_row=90), gradients=False)
    assert result.logps_error <= TOLERANCE, result


def test_varlen_refuses_sinks_naming_the_backends_that_apply_them():
    model = _gpt_oss()
    with pytest.raises(ValueError, match=r"attention sinks .*varlen backend cannot apply.*'eager' or 'sdpa' or 'flex_attention'"):
        patch(model, backend="varlen")
    assert not is_patched(model)


def test_a_kernel_that_ignored_the_sinks_is_caught_by_the_self_check(monkeypatch):
    """What the self-check is for: the sinks ignored (as every kernel did before #14) change the numbers."""
    eager = BACKENDS["eager"]
    monkeypatch.setitem(BACKENDS, "eager", lambda *args, sinks=None, **kwargs: eager(*args, **kwargs))
    model = _gpt_oss()
    with pytest.raises(SelfCheckError, match="differ"):
        patch(model, backend="eager")
    assert not is_patched(model)
    assert not model._forward_pre_hooks, "the hooks must be gone too"
    patch(model, backend="eager", verify=False)  # only an explicit opt-out skips it
    assert is_patched(model)


def test_sdpa_sink_key_matches_the_explicit_softmax():
    """The sdpa backend's extra key reproduces softmax over [scores, sink] with the sink's column dropped, in
    values and in the gradients of q, k, v and the sinks (grouped-query heads, a padded row)."""
    from prefixshare.backends import eager_attention, sdpa_attention

    layout = PrefixShareCollator(0, max_tokens_per_row=40)(random_examples(3, 50, seed=3)).layout
    B, L = layout.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, L, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g).mul(2).requires_grad_()
    module = torch.nn.Module().eval()
    outputs = []
    for attend in (eager_attention, sdpa_attention):
        out, _ = attend(module, q, k, v, layout, scaling=0.3, sliding_window=5, sinks=sinks)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v, sinks))
        outputs.append((out, *grads))
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- MLA, windows
def test_mla_with_the_varlen_reference_kernel():
    """DeepSeek-V3's value head dim (16) differs from its query/key head dim (24): the varlen backend pads the
    values for the kernel and cuts the output back, gradients included."""
    reference = build("deepseek_v3")
    attention = reference.model.layers[0].self_attn
    assert attention.qk_head_dim != attention.v_head_dim
    model = patch(copy.deepcopy(reference), backend="varlen")
    exact(reference, model, gradient_floor=1.0)


def test_a_window_that_lives_only_in_the_models_mask_is_applied():
    """Qwen2-MoE's sliding layers pass no sliding_window to their attention: the window of the model's own mask
    (config.sliding_window on the layers typed sliding_attention) is applied instead, in logical positions."""
    reference = build("qwen2_moe")
    assert "sliding_attention" in reference.config.layer_types
    model = patch(copy.deepcopy(reference))
    # long responses: the 8-token window matters
    examples = random_examples(3, 96, seed=4, prompt_lengths=(10, 20), response_lengths=(10, 16))
    result = compare_with_alone(reference, model, examples, PrefixShareCollator(0), gradient_floor=1.0)
    assert result.logps_error <= TOLERANCE and result.grad_error <= TOLERANCE, result


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "model_type, match",
    [
        ("llama4_text", r"'chunked_attention' layer .*Llama4TextAttention.*fixed chunks of physical positions"),
        ("deepseek_v32", r"'\w+_attention' layers .*DeepseekV32Attention"),  # 5.17 names the type 'deepseek_sparse_attention'
        ("doge", r"DogeAttention passes an attention mask of its own"),
        ("qwen3_next", r"decoder layers .*Qwen3NextDecoderLayer.*Qwen3NextGatedDeltaNet \(a state-space"),
        ("stablelm", r"layout was applied in 0 of the 2 attention layers.*do not pass their keyword arguments"),
        # (4.57's Bart takes no position_ids at all)
        ("bart", r"BartForCausalLM exact: its forward (ignores the position_ids it is given|takes no position_ids)"),
    ],
)
def test_refusals_name_the_layer_and_the_feature(model_type, match):
    model = build(model_type, interface=model_type not in ("qwen3_next",))
    with pytest.raises(UnsupportedModelError, match=match):
        patch(model)
    assert not is_patched(model)
    assert not model._forward_pre_hooks


def test_a_bidirectional_decoder_is_refused():
    """BertLMHeadModel without is_decoder=True attends both ways: no layout can make that a causal LM."""
    model = build("bert", is_decoder=False)
    with pytest.raises(UnsupportedModelError, match="BertSelfAttention attends bidirectionally"):
        patch(model)


def test_an_attention_keyword_the_kernels_do_not_apply_is_refused():
    """A model whose attention passes something unknown to its kernel (here a position bias) is refused, not run."""
    reference = build("llama")

    class BiasedAttention(type(reference.model.layers[0].self_attn)):
        def forward(self, *args, **kwargs):
            # the parent looks its kernel up in ALL_ATTENTION_FUNCTIONS and passes its keywords on to it
            return super().forward(*args, position_bias=torch.zeros(1), **kwargs)

    for layer in reference.model.layers:
        layer.self_attn.__class__ = BiasedAttention
    with pytest.raises(UnsupportedModelError, match="passes position_bias=Tensor to its attention function"):
        patch(reference)
    assert not is_patched(reference)


def test_cross_attention_of_encoder_decoder_decoders_is_not_counted():
    """BartForCausalLM's encoder_attn modules never run without encoder states; the layout must reach the
    decoder's self-attention only (before: "applied in 2 of the 4 attention layers")."""
    model = build("bart")
    assert len(text_attention_modules(model)) == 2


# ---------------------------------------------------------------------------------------------- multimodal
def _vision_language(model_type: str):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers has no {model_type} here")
    from prefixshare.testing import tiny_config_of

    model_class = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
    torch.manual_seed(0)
    return model_class._from_config(tiny_config_of(model_type), attn_implementation="eager").eval()


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_multimodal_rotary_decoders_are_exact_on_text(model_type):
    """Qwen2-VL-style models take 3D (t, h, w) rotary positions; for text the three are equal, and the batch's 1D
    positions (each response restarting at the prompt's length) are exactly what the model computes alone."""
    reference = _vision_language(model_type)
    model = patch(copy.deepcopy(reference))
    exact(reference, model, seed=5, gradient_floor=1.0)
