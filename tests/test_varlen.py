"""The varlen backend: its sequence table equals the layout's predicate; exact against runs alone."""

import copy
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefixshare as ps
from prefixshare._compat import set_attn_implementation
from prefixshare.backends import varlen
from prefixshare.backends.varlen import has_cuda_varlen_kernel, reference_varlen
from prefixshare.masks import dense_bool_mask
from prefixshare.testing import compare_with_alone, random_examples
from prefixshare.testing import tiny_model


def mask_from_sequences(layout, window=None):
    """Dense [B, L, L] mask of what the varlen sequences let each query see (bottom-right causal)."""
    B, L = layout.shape
    seq = layout.varlen_sequences()
    allowed = torch.zeros(B * L, B * L, dtype=torch.bool)
    allowed[torch.arange(B * L), torch.arange(B * L)] = layout.segment_ids.reshape(-1) == -1  # pads: themselves
    cu_q, cu_k = seq.cu_seqlens_q.tolist(), seq.cu_seqlens_k.tolist()
    for s in range(len(cu_q) - 1):
        queries = seq.query_index[cu_q[s] : cu_q[s + 1]].tolist()
        keys = seq.key_index[cu_k[s] : cu_k[s + 1]].tolist()
        shift = len(keys) - len(queries)
        for i, q in enumerate(queries):
            for j, k in enumerate(keys):
                if j <= i + shift and (window is None or j > i + shift - window):
                    allowed[q, k] = True
    flat = allowed.view(B, L, B, L)
    return torch.stack([flat[b, :, b, :] for b in range(B)])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    K=st.integers(1, 3),
    budget=st.one_of(st.none(), st.integers(40, 90)),
    window=st.one_of(st.none(), st.integers(1, 9)),
    paired=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_varlen_sequences_equal_the_predicate(n, K, budget, window, paired, seed):
    examples = random_examples(n, 50, seed=seed, num_responses=K, prompt_lengths=(1, 12), response_lengths=(1, 9))
    collator = (ps.PairedCollator if paired else ps.PrefixShareCollator)(0, max_tokens_per_row=budget)
    layout = collator(examples).layout
    assert torch.equal(mask_from_sequences(layout, window), dense_bool_mask(layout, window)[:, 0])
    seq = layout.varlen_sequences()
    # every real token is a query exactly once
    real = (layout.segment_ids.reshape(-1) != -1).nonzero().squeeze(1)
    assert torch.equal(seq.query_index.sort().values, real)


@pytest.mark.parametrize("architecture", ["llama", "mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("packed", [False, True])
def test_varlen_backend_is_exact(architecture, packed):
    reference = tiny_model(architecture).train()
    model = ps.patch(copy.deepcopy(reference), backend="varlen")
    collator = ps.PrefixShareCollator(0, max_tokens_per_row=100 if packed else None)
    result = compare_with_alone(reference, model, random_examples(4, 96, seed=6), collator)
    assert result.passes(1e-5), result


def test_flash_attention_kernels_map_to_varlen():
    model = tiny_model("llama")
    set_attn_implementation(model.config, "flash_attention_2")  # as if loaded with flash-attn installed
    ps.patch(model, verify=False)  # (the self-check's runs alone would call flash-attn, which is not installed)
    assert ps.patched_backend(model) == "varlen"


@pytest.mark.skipif(
    not (torch.cuda.is_available() and has_cuda_varlen_kernel()),
    reason="needs a GPU with a CUDA varlen kernel (FlashAttention-2/3/4 or torch's varlen_attn): checks each kernel's "
    "alignment, windows, softcap, grouped-query heads and gradients against the reference (on CPU the adapters are "
    "checked through stand-ins: tests/test_varlen_kernels.py)",
)
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_varlen_kernels_match_the_reference(window, softcap, dtype):
    """Every installed kernel that runs on this GPU, one by one (not only the one selected first)."""
    layout = ps.PrefixShareCollator(0, max_tokens_per_row=200)(
        random_examples(6, 50, seed=1, num_responses=3, prompt_lengths=(1, 40), response_lengths=(1, 30))
    ).layout.to("cuda")
    seq = layout.varlen_sequences()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(len(seq.query_index), 8, 64, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(len(seq.key_index), 2, 64, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(len(seq.key_index), 2, 64, device="cuda", dtype=dtype, generator=g)
    weights = torch.randn(q.shape, device="cuda", generator=g)
    options = dict(scale=0.125, window_left=-1 if window is None else window - 1, softcap=softcap)
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = reference_varlen(*ref, seq, **options, enable_gqa=True)
    want_grads = torch.autograd.grad((want * weights).sum(), ref)
    ran = []
    for kernel in varlen._installed(torch.cuda.get_device_capability()):
        if kernel.missing(**options, head_dim=64):
            with pytest.raises(ValueError):
                kernel.run(q, k, v, seq, **options)
            continue
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        got = kernel.run(*inputs, seq, **options)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2, msg=lambda m: f"{kernel.name}: {m}")
        grads = torch.autograd.grad((got.float() * weights).sum(), inputs)
        for name, grad, expected in zip("qkv", grads, want_grads):
            torch.testing.assert_close(
                grad.float(), expected, atol=5e-2, rtol=5e-2, msg=lambda m: f"{kernel.name}, d{name}: {m}"
            )
        ran.append(kernel.name)
    assert ran or softcap is not None or window is not None, "no installed kernel ran the plain case"


def test_the_installed_torch_varlen_attn_is_recognised():
    """The one real kernel signature on a CPU machine: this torch's varlen_attn, where it has one."""
    pytest.importorskip("torch.nn.attention.varlen")
    kernel = varlen._recognise_torch_varlen(varlen._torch_varlen())
    assert kernel is not None and kernel.window and not kernel.softcap
    parameters = inspect.signature(varlen._torch_varlen()).parameters
    assert kernel.gqa == ("enable_gqa" in parameters) and kernel.scale == ("scale" in parameters)
