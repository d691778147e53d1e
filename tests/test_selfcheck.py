"""The self-check in the configurations users run: mixed precision (autocast, as accelerate and TRL's default
``bf16=True`` set it), ``torch.no_grad`` / ``inference_mode`` (a reference model's first forward), float64, and
when it runs again. A correct model must patch in each; a model that leaks must still be refused in each.

Every test here failed before the self-check followed the forward's precision (SelfCheckError on correct models,
or RuntimeError "element 0 of tensors does not require grad" under no_grad / inference_mode).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import prefixshare
from prefixshare import SelfCheckError, is_patched, patch
from prefixshare.selfcheck import self_check
from prefixshare.testing import tiny_model


def llama_256(dtype=torch.float32, attn_implementation="sdpa"):
    """The issue's minimal form: a float32 Llama of hidden 256 and 4 layers (bfloat16 autocast rounding then shows
    as 2.7e-4 on log-probs and 9e-3 on gradients, above float32's tolerance)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype).eval()


class _TokenShiftMLP(torch.nn.Module):
    """An MLP that also adds the previous token's hidden state: a token mixer only the self-check can see."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, hidden):
        return self.mlp(hidden + 0.5 * torch.nn.functional.pad(hidden, (0, 0, 1, -1)))


def leaking(model):
    for layer in model.model.layers:
        layer.mlp = _TokenShiftMLP(layer.mlp)
    return model


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_float32_model_under_cpu_autocast_patches(autocast_dtype):
    model = llama_256()
    with torch.autocast("cpu", dtype=autocast_dtype):
        patch(model)
        errors = self_check(model)
    assert is_patched(model)
    assert f"under {str(autocast_dtype).removeprefix('torch.')} autocast" in errors["precision"]
    assert errors["logps_packed"] > 1e-5  # it really computed in the lower precision (float32: ~1e-7)
    assert "gradients" in errors


def test_autocast_inside_the_forward_as_accelerate_sets_it():
    """accelerate's mixed precision wraps the model's own forward in autocast: the probe sees it only inside."""
    from accelerate import Accelerator

    model = Accelerator(mixed_precision="bf16", cpu=True).prepare(llama_256())
    errors = self_check(patch(model))
    assert is_patched(model) and "under bfloat16 autocast" in errors["precision"]


@pytest.mark.parametrize("context", [torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad()], ids=["autocast", "no_grad"])
def test_a_leak_is_still_refused(context):
    model = leaking(tiny_model("llama"))
    with context, pytest.raises(SelfCheckError, match="differ"):
        patch(model)
    assert not is_patched(model)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_gradients_are_checked_under_no_grad_and_inference_mode(context):
    model = tiny_model("llama")
    with context():
        patch(model)
        errors = self_check(model)
        assert torch.is_inference_mode_enabled() == (context is torch.inference_mode)
        assert not torch.is_grad_enabled()
    assert is_patched(model)
    assert errors["gradients"] < 1e-3
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradient behind


def test_parameters_made_under_inference_mode_say_the_gradients_were_not_checked():
    with torch.inference_mode():
        model = tiny_model("llama")
        errors = self_check(patch(model))
    assert "inference_mode" in errors["gradients_not_checked"] and "gradients" not in errors


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma3"])
def test_float64_model_with_large_weights_patches(architecture, attn_implementation):
    """float64 with initializer_range 0.2 was refused at 9e-8 > 1e-8: the probe compared in float32, and the eager
    kernel's softmax is float32 (as transformers' own eager path): the bound follows what the kernels compute in."""
    model = tiny_model(architecture, attn_implementation, dtype=torch.float64, initializer_range=0.2)
    patch(model)
    errors = self_check(model, kernels={attn_implementation})
    assert is_patched(model)
    if attn_implementation == "sdpa":
        # all-float64 kernels: judged at float64's bound, and far below it
        assert errors["precision"] == "torch.float64" and errors["logps_packed"] < 1e-12
    else:
        assert "float32 softmax in eager" in errors["precision"]


def test_float64_leak_is_refused():
    with pytest.raises(SelfCheckError, match="differ"):
        patch(leaking(tiny_model("llama", "sdpa", dtype=torch.float64, initializer_range=0.2)))


def test_the_check_runs_again_for_a_new_dtype_or_autocast_state():
    model = tiny_model("llama")
    patch(model)
    keys = model.__dict__["_prefixshare_verified"]
    assert len(keys) == 1
    patch(model)  # nothing new: not again
    assert len(keys) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        patch(model)
    assert len(keys) == 2
    patch(model.to(torch.bfloat16))
    assert len(keys) == 3 and {key[1] for key in keys} == {torch.float32, torch.bfloat16}
    prefixshare.unpatch(model)
    assert "_prefixshare_verified" not in model.__dict__


def test_the_probe_leaves_qlora_layers_on_their_training_path(tmp_path):
    """bitsandbytes repacks a 4-bit layer for good for its bfloat16 CPU kernel on its first no-grad eval forward on a
    CPU with AVX512-BF16 (its switch holds has_avx512bf16()'s int 1 there, not True: the probe's `is True` check
    missed it, so patch() moved the user's QLoRA layers to bfloat16 and refused them at 2.7e-4 > 1e-4)."""
    pytest.importorskip("bitsandbytes")
    import warnings

    from transformers import BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, dtype=torch.float32, device_map={"": "cpu"}
        )
        layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
        switches = [m.support_avx512bf16_for_cpu for m in layers]
        errors = self_check(patch(model, backend="eager"), kernels={"eager"})
    assert errors["logps_packed"] < 1e-4
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert [m.support_avx512bf16_for_cpu for m in layers] == switches


@pytest.mark.parametrize("architecture", ["llama", "gemma"])
def test_flex_loaded_model_under_bf16_autocast_patches(architecture):
    """A model loaded with attn_implementation="flex_attention" under TRL's default bf16 autocast: refused on main at
    1.1e-3 to 2.9e-3 against float32's 1e-4 (the probe's runs alone go through transformers' compiled FlexAttention,
    ours through the uncompiled one, both in bfloat16); forward only on CPU."""
    model = tiny_model(architecture, "flex_attention")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errors = self_check(patch(model), kernels={"flex_attention"})
    assert is_patched(model) and errors["logps_packed"] < 2e-2
    assert errors["gradients_not_checked"] == "FlexAttention on CPU runs forward only"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_nan_pad_embedding_does_not_fail_the_probe(attn_implementation):
    """The probe's packed rows hold pads; a NaN embedding row at the pad id reached every token of the row (0 * NaN in
    the attention), and patch refused a correct model blaming its positions or kernels. Pads are isolated now."""
    model = tiny_model("llama", attn_implementation)
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = float("nan")
    errors = self_check(patch(model), kernels={attn_implementation})
    assert is_patched(model) and errors["logps_packed"] < 1e-4 and errors["gradients"] < 1e-3


def test_qlora_computing_in_float16_is_judged_at_float16(tmp_path):
    """bnb_4bit_compute_dtype=float16 over float32 weights (TRL's test_peft_with_quantization): the 4-bit layers
    compute in float16 whatever the parameters' dtype; the probe judged them at float32's bounds, and refused TRL's
    tiny Qwen2 there (a LoRA gradient 9.5e-3 > 1e-3). This tiny model stays under it; the precision shows the rule."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    import warnings

    from transformers import BitsAndBytesConfig

    tiny_model("qwen2").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float16)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        errors = self_check(patch(model))
    assert is_patched(model) and "quantized layers computing in float16" in errors["precision"]
    assert errors["gradients"] < 2e-2
