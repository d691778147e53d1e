"""patch(model): exact log-probs and gradients against each prompt+response run alone, and a model that
behaves exactly as before wherever no prefix-shared batch is given.

Everything runs on CPU in float32 with tiny random models; "exact" means a normwise relative error of at
most 1e-5 on the per-response log-probs and on the gradient of every trainable parameter
(prefixshare.testing.compare_with_alone).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import prefixshare
from prefixshare import (
    PairedCollator,
    PrefixShareCollator,
    UnsupportedModelError,
    is_patched,
    patch,
    patched_backend,
    unpatch,
)
from prefixshare._compat import enable_gradient_checkpointing, get_attn_implementation
from prefixshare.logps import gather_response_logps
from prefixshare.testing import compare_with_alone, logps_alone, random_examples, relative_error
from prefixshare.testing import ARCHITECTURE_NAMES, tiny_model, tiny_model_of

TOLERANCE = 1e-5
VOCAB = 96  # prefixshare.testing.tiny_model vocabulary
PAD = 0
N_EXAMPLES = 3


# ---------------------------------------------------------------------------------------------- helpers
_REFERENCES: dict = {}


def reference(architecture: str, attn_implementation: str = "eager"):
    """The unpatched tiny model, built once per (architecture, kernel) for the whole module.

    Tests get it read-only: they patch ``fresh(...)`` copies, never the reference itself.
    """
    key = (architecture, attn_implementation)
    if key not in _REFERENCES:
        _REFERENCES[key] = tiny_model(architecture, attn_implementation=attn_implementation)
    model = _REFERENCES[key]
    assert not is_patched(model)
    return model


def fresh(architecture: str, attn_implementation: str = "eager"):
    """An unpatched copy of the reference (same weights), free to patch."""
    return copy.deepcopy(reference(architecture, attn_implementation))


def examples(seed: int = 0, n: int = N_EXAMPLES, **kwargs):
    return random_examples(n, VOCAB, seed=seed, **kwargs)


COLLATORS = {
    # prompts up to 24 tokens and responses up to 16: units up to 56 tokens, so 80 packs 2 units in a row
    "prefix": lambda: PrefixShareCollator(PAD),
    "prefix-packed": lambda: PrefixShareCollator(PAD, max_tokens_per_row=80),
    "paired": lambda: PairedCollator(PAD),
    "paired-packed": lambda: PairedCollator(PAD, max_tokens_per_row=60),
}


def assert_exact(report, *, gradients: bool = True):
    assert report.logps_error <= TOLERANCE, report
    if gradients:
        assert report.grad_error is not None and report.grad_error <= TOLERANCE, report
        assert report.num_parameters > 0, report


def padded_batch(seed: int = 0):
    """A normal (not prefix-shared) left-padded batch with its attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = [11, 5, 8]
    L = max(lengths)
    input_ids = torch.full((len(lengths), L), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), L), dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, L - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        attention_mask[i, L - n :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def normal_logits(model, seed: int = 0):
    """Logits of an unpadded batch without a mask and of a left-padded batch with its mask."""
    input_ids, attention_mask = padded_batch(seed)
    plain = model(input_ids=input_ids[:, -5:], use_cache=False).logits
    masked = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return plain, masked


def assert_bit_identical(got, want):
    for g, w in zip(got, want):
        assert torch.equal(g, w), float((g - w).abs().max())


# ---------------------------------------------------------------------------------------------- exactness
MATRIX = [
    (arch, backend)
    for arch in ARCHITECTURE_NAMES
    for backend in ("eager", "sdpa")
    if (arch, backend) != ("gemma2", "sdpa")
]


@pytest.mark.parametrize("collator", list(COLLATORS))
@pytest.mark.parametrize("architecture,backend", MATRIX)
def test_matches_runs_alone(architecture, backend, collator):
    """Log-probs and every parameter's gradient equal the runs alone, for every architecture and kernel."""
    model = patch(fresh(architecture, backend))
    assert patched_backend(model) == backend
    report = compare_with_alone(reference(architecture, backend), model, examples(seed=1), COLLATORS[collator]())
    assert_exact(report)


@pytest.mark.parametrize("collator", ["prefix-packed", "paired-packed"])
def test_packed_collators_really_pack_the_test_examples(collator):
    """Guards the matrix above: its packed batches hold several units in a row."""
    layout = COLLATORS[collator]()(examples(seed=1)).layout
    assert layout.shape[0] < len(layout.placements)


@pytest.mark.parametrize(
    "architecture,backend,collator",
    [("mistral", "sdpa", "prefix-packed"), ("gemma3", "eager", "prefix"), ("qwen2", "eager", "paired-packed")],
)
def test_three_responses_match_runs_alone(architecture, backend, collator):
    model = patch(fresh(architecture, backend))
    batch_examples = examples(seed=2, num_responses=3)
    if collator == "prefix-packed":  # three responses: units up to 72 tokens
        make = lambda: PrefixShareCollator(PAD, max_tokens_per_row=100)  # noqa: E731
    else:
        make = COLLATORS[collator]
    assert_exact(compare_with_alone(reference(architecture, backend), model, batch_examples, make()))


def test_gemma2_refuses_sdpa_at_patch_time():
    model = fresh("gemma2")
    with pytest.raises(ValueError, match=r"(?s)eager.*flex_attention"):
        patch(model, backend="sdpa")
    assert not is_patched(model)
    assert get_attn_implementation(model.config) == "eager"


def test_gemma2_loaded_with_sdpa_is_refused_too():
    """Where transformers still loads Gemma2 with sdpa (4.x silently drops the softcap), patch(model) refuses it."""
    try:
        model = tiny_model("gemma2", attn_implementation="sdpa")
    except ValueError:
        pytest.skip("this transformers refuses sdpa for Gemma2 itself")
    with pytest.raises(ValueError, match=r"(?s)eager.*flex_attention"):
        patch(model)


@pytest.mark.parametrize(
    "architecture,collator",
    # softcap score_mod + alternating windows; 5:1 windows with per-layer-type RoPE; paired packed rows
    [("gemma2", "prefix-packed"), ("gemma3", "prefix"), ("llama", "paired-packed")],
)
def test_flex_forward_only_matches_runs_alone(architecture, collator):
    model = patch(fresh(architecture), backend="flex_attention")
    assert patched_backend(model) == "flex_attention"
    report = compare_with_alone(reference(architecture), model, examples(seed=3), COLLATORS[collator](), gradients=False)
    assert_exact(report, gradients=False)


def test_flex_backward_on_cpu_raises_a_clear_error():
    model = patch(fresh("llama"), backend="flex_attention")
    batch = PrefixShareCollator(PAD)(examples(seed=3))
    with pytest.raises(NotImplementedError, match=r"^prefixshare: FlexAttention") as info:
        model(**batch)
    assert "CPU" in str(info.value) and "backward" in str(info.value)
    assert "backend='eager'" in str(info.value)  # and says what to use instead


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize(
    "architecture,backend", [("llama", "sdpa"), ("gemma2", "eager"), ("gemma3", "sdpa")]
)
def test_gradient_checkpointing_matches_runs_alone(architecture, backend, use_reentrant):
    model = patch(fresh(architecture, backend))
    enable_gradient_checkpointing(model, use_reentrant=use_reentrant)
    model.train()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    report = compare_with_alone(reference(architecture, backend), model, examples(seed=4), COLLATORS["prefix-packed"]())
    assert_exact(report)


@pytest.mark.parametrize("collator", ["prefix", "prefix-packed"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_unpatched_model_is_far_from_runs_alone(backend, collator):
    """The check above can fail: without the patch the same batch gives visibly wrong log-probs (computed here
    by hand from the layout's indices, since the library's log-prob functions now refuse such logits)."""
    unpatched = fresh("llama", backend)
    batch = COLLATORS[collator]()(examples(seed=1))
    with torch.no_grad():
        logits = unpatched(**batch).logits
        layout = batch.layout
        flat = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
        per_token = flat[layout.predictor_index].gather(-1, batch["input_ids"].reshape(-1)[layout.target_index, None])[:, 0]
        got = torch.zeros(layout.num_examples * 2).index_add(0, layout.response_index, per_token).view(-1, 2)
        want = logps_alone(reference("llama", backend), examples(seed=1))
    assert relative_error(got, want) > 1e-3


# ---------------------------------------------------------------------------------------------- patch state
def test_patch_is_idempotent_returns_the_model_and_switches_backend():
    model = fresh("qwen2")
    assert not is_patched(model) and patched_backend(model) is None
    assert patch(model) is model
    name, hooks = get_attn_implementation(model.config), (len(model._forward_pre_hooks), len(model._forward_hooks))
    assert is_patched(model) and patched_backend(model) == "eager"

    assert patch(model) is model
    assert get_attn_implementation(model.config) == name
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    assert_exact(compare_with_alone(reference("qwen2"), model, examples(seed=5), COLLATORS["prefix"]()))

    assert patch(model, backend="sdpa") is model
    assert patched_backend(model) == "sdpa"
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    assert_exact(compare_with_alone(reference("qwen2"), model, examples(seed=5), COLLATORS["prefix"]()))

    # patch() without a backend keeps the one chosen last
    patch(model)
    assert patched_backend(model) == "sdpa"


def test_unknown_backend_is_refused():
    model = fresh("llama")
    with pytest.raises(ValueError, match="eager"):
        patch(model, backend="no_such_kernel")
    assert not is_patched(model)


@pytest.mark.parametrize(
    "architecture,backend,patched_with", [("llama", "sdpa", "eager"), ("gemma2", "eager", None), ("gemma3", "eager", "sdpa")]
)
def test_unpatch_restores_bit_identical_forward(architecture, backend, patched_with):
    model = patch(fresh(architecture, backend), backend=patched_with)
    with torch.no_grad():
        model(**PrefixShareCollator(PAD)(examples(seed=6)))  # a prefix-shared forward leaves nothing behind
    assert unpatch(model) is model
    assert not is_patched(model) and patched_backend(model) is None
    assert get_attn_implementation(model.config) == backend
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert_bit_identical(normal_logits(model), normal_logits(reference(architecture, backend)))
    unpatch(model)  # unpatching an unpatched model is harmless
    assert not is_patched(model)


@pytest.mark.parametrize(
    "architecture,backend,patched_with",
    [
        ("llama", "eager", None),
        ("qwen3", "sdpa", None),
        ("gemma", "sdpa", "flex_attention"),
        ("gemma2", "eager", None),
        ("gemma3", "sdpa", "eager"),
    ],
)
def test_without_layout_forward_and_generate_are_unchanged(architecture, backend, patched_with):
    """No layout: the call goes to the original attention function with the original mask, bit for bit."""
    ref = reference(architecture, backend)
    model = patch(fresh(architecture, backend), backend=patched_with)
    assert_bit_identical(normal_logits(model), normal_logits(ref))

    input_ids, attention_mask = padded_batch(seed=7)
    settings = dict(attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        want = ref.generate(input_ids, **settings)
        got = model.generate(input_ids, **settings)
    assert got.shape == want.shape == (input_ids.shape[0], input_ids.shape[1] + 4)
    assert torch.equal(got, want)


def test_other_models_in_the_process_are_unaffected():
    other = fresh("llama", "sdpa")
    before = normal_logits(other)
    model = patch(fresh("llama", "sdpa"), backend="eager")
    with torch.no_grad():
        model(**PrefixShareCollator(PAD)(examples(seed=8)))
    assert not is_patched(other)
    assert get_attn_implementation(other.config) == "sdpa"
    assert_bit_identical(normal_logits(other), before)


def test_deepcopy_and_pickle_stay_patched():
    model = patch(fresh("mistral", "sdpa"))
    clone = copy.deepcopy(model)
    assert is_patched(clone) and patched_backend(clone) == "sdpa"
    assert_exact(compare_with_alone(reference("mistral", "sdpa"), clone, examples(seed=9), COLLATORS["prefix-packed"]()))
    unpatch(clone)
    assert is_patched(model), "unpatching a copy must leave the original patched"

    restored = pickle.loads(pickle.dumps(model))
    assert is_patched(restored) and patched_backend(restored) == "sdpa"
    assert_exact(compare_with_alone(reference("mistral", "sdpa"), restored, examples(seed=9), COLLATORS["prefix"]()))


# ---------------------------------------------------------------------------------------------- other models
def test_gemma3_multimodal_patches_its_text_decoder_only():
    """Gemma3ForConditionalGeneration: the text decoder is patched and exact, the vision tower keeps its kernel."""
    import transformers

    from prefixshare.testing import tiny_config

    config = transformers.Gemma3Config(
        text_config=tiny_config("gemma3").to_dict(),
        vision_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
        ),
        mm_tokens_per_image=4,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1,
    )
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    model = patch(copy.deepcopy(ref))
    assert patched_backend(model) == "sdpa"
    assert get_attn_implementation(model.config.vision_config) == "sdpa"
    batch_examples = random_examples(N_EXAMPLES, VOCAB - 3, seed=15)  # no image tokens
    assert_exact(compare_with_alone(ref, model, batch_examples, COLLATORS["prefix-packed"]()))


def _phi():
    """Phi: partial rotary (half of each head's features rotated), a model type outside ARCHITECTURE_NAMES."""
    return tiny_model_of("phi")


def test_an_architecture_outside_the_old_list_patches_with_no_flag_and_is_exact():
    """Phi (partial rotary): support comes from the model's structure, not a list of names. (Before #14:
    UnsupportedModelError without allow_unverified=True.)"""
    ref = _phi()
    model = copy.deepcopy(ref)
    assert patch(model) is model
    assert is_patched(model)
    assert_exact(compare_with_alone(ref, model, examples(seed=10), COLLATORS["prefix-packed"]()))


def test_allow_unverified_is_accepted_and_deprecated():
    model = _phi()
    with pytest.warns(DeprecationWarning, match="allow_unverified"):
        assert patch(model, allow_unverified=True) is model
    assert is_patched(model)


def test_attention_outside_the_interface_is_refused_naming_it():
    import transformers

    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if getattr(model, "_supports_attention_backend", False):
        pytest.skip("Bloom routes attention through the attention interface in this transformers")
    with pytest.raises(UnsupportedModelError, match="AttentionInterface") as info:
        patch(model)
    assert "BloomBlock" in str(info.value)
    assert not is_patched(model)


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "extra,match",
    [
        (lambda batch: {"labels": batch["input_ids"]}, "labels"),
        (lambda batch: {"use_cache": True}, "use_cache"),
        (lambda batch: {"position_ids": None}, "position_ids"),
        (lambda batch: {"input_ids": batch["input_ids"][:, :-1], "position_ids": batch["position_ids"][:, :-1]}, "layout"),
    ],
    ids=["labels", "use_cache", "no-position_ids", "shape"],
)
def test_bad_forward_inputs_raise_clear_errors(extra, match):
    model = patch(fresh("llama"))
    batch = PrefixShareCollator(PAD)(examples(seed=11))
    with pytest.raises(ValueError, match=match):
        model(**{**batch, **extra(batch)})
    with torch.no_grad():  # the model is still usable after a refused call
        out = model(**batch)
    assert out.logits.shape[:2] == batch.layout.shape


# ---------------------------------------------------------------------------------------------- wrappers
def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    base = fresh("qwen3", "sdpa")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(base, config)
    ref = copy.deepcopy(peft_model)
    assert patch(peft_model) is peft_model
    assert is_patched(peft_model) and patched_backend(peft_model) == "sdpa"
    assert not is_patched(ref)
    report = compare_with_alone(ref, peft_model, examples(seed=12), COLLATORS["prefix-packed"]())
    assert_exact(report)
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert report.num_parameters == len(lora)


class _Holder(torch.nn.Module):
    """Names the reference model's parameters ``module.*`` like DDP does, so gradients can be compared."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    started = False
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        except Exception as error:  # noqa: BLE001 - no process group possible here
            pytest.skip(f"cannot start a single-process gloo group: {error}")
        started = True
    try:
        ref = reference("gemma3", "sdpa")
        ddp = torch.nn.parallel.DistributedDataParallel(fresh("gemma3", "sdpa"))
        assert patch(ddp) is ddp
        assert is_patched(ddp) and is_patched(ddp.module) and patched_backend(ddp) == "sdpa"
        report = compare_with_alone(_Holder(ref), ddp, examples(seed=13), COLLATORS["prefix-packed"]())
        assert_exact(report)
        unpatch(ddp)
        assert not is_patched(ddp.module)
    finally:
        if started:
            dist.destroy_process_group()


def test_logps_of_the_patched_batch_come_back_in_input_order():
    """model(**batch) -> gather_response_logps puts example i at index i, whatever the packing reordered: each
    row equals that example run alone, and the check can fail (a shuffled order is far off)."""
    model = patch(fresh("gemma"))
    batch = PrefixShareCollator(PAD, max_tokens_per_row=80)(examples(seed=14))
    assert [pl.unit.example for pl in batch.layout.placements] != list(range(N_EXAMPLES)), "packing must reorder"
    with torch.no_grad():
        logps = gather_response_logps(model(**batch).logits, batch).logps
        alone = logps_alone(reference("gemma"), examples(seed=14))
    assert relative_error(logps, alone) <= TOLERANCE
    shuffled = logps[torch.tensor([1, 2, 0])]
    assert relative_error(shuffled, alone) > 1e-2
