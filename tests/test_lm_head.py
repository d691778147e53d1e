"""response_logps (LM head on predictor rows only) equals split_logps on full logits, values and gradients."""

import pytest
import torch

import prefixshare as ps
from prefixshare.lm_head import chunked_token_logps, response_logps
from prefixshare.logps import token_logps
from prefixshare.testing import random_examples, relative_error
from prefixshare.tiny import tiny_model


@pytest.mark.parametrize("architecture", ["llama", "gemma2", "qwen3"])
@pytest.mark.parametrize("packed", [False, True])
def test_response_logps_equals_full_logits(architecture, packed):
    model = ps.patch(tiny_model(architecture).train(), backend="eager")
    collator = ps.PrefixShareCollator(0, max_tokens_per_row=80 if packed else None)
    batch = collator(random_examples(5, 96, seed=4))
    weights = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))

    full = ps.gather_response_logps(model(**batch).logits, batch)
    (full.logps * weights).sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    lean = response_logps(model, batch, chunk_size=7)  # several chunks, so the recompute path runs
    (lean.logps * weights).sum().backward()

    assert lean.logps.dtype == torch.float32
    assert torch.equal(lean.num_tokens, full.num_tokens)
    assert relative_error(lean.logps, full.logps) < 1e-6
    for name, p in model.named_parameters():
        assert relative_error(p.grad, full_grads[name]) < 1e-5, name


def test_response_logps_never_builds_full_logits():
    model = ps.patch(tiny_model("llama"), backend="sdpa")
    batch = ps.PairedCollator(0)(random_examples(3, 96, seed=1))
    seen = {}
    head = model.get_output_embeddings()

    def record(module, args, out):
        seen["shape"] = tuple(out.shape)

    handle = head.register_forward_hook(record)
    with torch.no_grad():
        response_logps(model, batch)
    handle.remove()
    T = len(batch.layout.target_index)
    assert seen["shape"] == (1, T, model.config.vocab_size)
    assert T < batch["input_ids"].numel()


def test_chunked_token_logps_matches_unchunked():
    logits = torch.randn(50, 33, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 33, (50,))
    whole = token_logps(logits, targets)
    chunked = chunked_token_logps(logits, targets, chunk_size=8)
    assert torch.equal(whole, chunked)
    (g1,) = torch.autograd.grad(whole.sum(), logits)
    (g2,) = torch.autograd.grad(chunked.sum(), logits)
    assert torch.equal(g1, g2)


def test_response_logps_rejects_a_foreign_batch():
    model = ps.patch(tiny_model("llama"))
    batch = ps.PrefixShareCollator(0)(random_examples(2, 96))
    other = ps.PrefixShareCollator(0)(random_examples(3, 96, seed=9))
    with pytest.raises(ValueError, match="does not match the layout"):
        response_logps(model, {**other, "prefixshare_layout": batch.layout})
