"""The FlexAttention backend's compiled function keeps up with batches of changing shape.

On CUDA the backend calls one ``torch.compile``'d ``flex_attention`` for every layer and batch. Prefix-shared
batches change row count and (128-aligned) length from step to step; compiled with ``dynamic=False``, the
ninth shape exceeds dynamo's recompile limit and FlexAttention silently falls back to its unfused path.
The CPU cannot run the fused kernel with gradients, but dynamo's recompilation is the same on every device:
these tests compile with the ``aot_eager`` backend and count on dynamo to raise at the limit.
"""

from __future__ import annotations

import pytest
import torch

import prefixshare as ps
from prefixshare.backends.flex import _compile_options, aligned_length, compile_flex
from prefixshare.masks import block_mask
from prefixshare.testing import random_examples

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.skipif(
        not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"), reason="this torch cannot raise at the limit"
    ),
]


def batches_of_changing_shape(count=12):
    """``count`` (layout, q, k, v) of distinct ``[B, L]``, L a multiple of 128, as the backend pads them on CUDA."""
    out, seen = [], set()
    for seed in range(200):
        n = 1 + seed % 7
        budget = (None, 220, 400)[seed % 3]
        layout = ps.PrefixShareCollator(0, max_tokens_per_row=budget)(
            random_examples(n, 50, seed=seed, prompt_lengths=(5, 90), response_lengths=(3, 60))
        ).layout
        layout = layout.padded(aligned_length(layout.shape[1]))
        if layout.shape in seen:
            continue
        seen.add(layout.shape)
        B, L = layout.shape
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(B, heads, L, 16, generator=g) for heads in (4, 2, 2))
        out.append((layout, q, k, v))
        if len(out) == count:
            return out
    raise AssertionError("not enough distinct shapes")


def run_all(compiled, batches):
    from torch.nn.attention.flex_attention import flex_attention

    for layout, q, k, v in batches:
        mask = block_mask(layout, 8)
        got = compiled(q, k, v, block_mask=mask, enable_gqa=True)
        torch.testing.assert_close(got, flex_attention(q, k, v, block_mask=mask, enable_gqa=True))


@pytest.mark.skipif("dynamic" in _compile_options(), reason="this torch compiles FlexAttention with static shapes")
def test_compiled_flex_stays_within_the_recompile_limit():
    batches = batches_of_changing_shape()
    assert len(batches) > torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        run_all(compile_flex(backend="aot_eager"), batches)


def test_static_shapes_would_hit_the_recompile_limit():
    """The control: the test above can fail, and this is how."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            run_all(compile_flex(backend="aot_eager", dynamic=False), batches_of_changing_shape())
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the fused FlexAttention kernel and its backward")
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_cuda_backend_across_batch_shapes_matches_dense_attention(softcap):
    """The backend as models call it (compiled kernel, length padded to 128, GQA, window, softcap), forward
    and backward in float32, against the eager backend's dense attention, over more shapes than the limit."""
    from types import SimpleNamespace

    from prefixshare.backends import eager_attention, flex_attention

    module = SimpleNamespace(training=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for layout, q, k, v in batches_of_changing_shape():
            layout = layout.to("cuda")
            inputs = [t.to("cuda").requires_grad_() for t in (q, k, v)]
            reference = [t.detach().clone().requires_grad_() for t in inputs]
            options = dict(scaling=0.25, sliding_window=8, softcap=softcap)
            got, _ = flex_attention(module, *inputs, layout, **options)
            want, _ = eager_attention(module, *reference, layout, **options)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            got.pow(2).sum().backward()
            want.pow(2).sum().backward()
            for a, b in zip(inputs, reference):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
