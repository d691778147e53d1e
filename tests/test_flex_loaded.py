"""Models loaded with ``attn_implementation="flex_attention"``: patch() accepts them and is exact (issue #21, cause 4).

Such a model keeps its kernel when patched (``patch(model)`` selects the flex backend), and its runs without a
layout, the self-check's runs alone among them, go through transformers' own FlexAttention, which it compiles
with ``torch.compile`` also on CPU. So the self-check compares our (uncompiled, on CPU) FlexAttention with
transformers' compiled one, not with eager as for an eager-loaded model patched with ``backend="flex_attention"``.

The reference of every comparison is the unpatched flex-loaded model itself, each prompt+response alone.
Forward only: FlexAttention has no backward on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from prefixshare import PrefixShareCollator, patch, patched_backend
from prefixshare.testing import compare_with_alone, random_examples, tiny_model
from prefixshare.testing.matrix import LEAK_VISIBLE, leaky_layout

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOLERANCE = 1e-5
VOCAB = 96  # prefixshare.testing.tiny_model vocabulary

_REFERENCES: dict = {}


def reference(architecture: str):
    """The unpatched flex-loaded tiny model (weights of std 0.1, so that a leak shows), once per architecture."""
    if architecture not in _REFERENCES:
        _REFERENCES[architecture] = tiny_model(architecture, attn_implementation="flex_attention")
    return _REFERENCES[architecture]


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma"])
def test_flex_loaded_model_is_patched_and_matches_runs_alone(architecture):
    ref = reference(architecture)
    model = patch(copy.deepcopy(ref))  # runs the self-check: it must accept the model
    assert patched_backend(model) == "flex_attention"
    examples = random_examples(3, VOCAB, seed=3)
    for collator in (PrefixShareCollator(0), PrefixShareCollator(0, max_tokens_per_row=80)):
        report = compare_with_alone(ref, model, examples, collator, gradients=False)
        assert report.logps_error <= TOLERANCE, report
    # the control: the same comparison sees responses that attend to each other
    with leaky_layout():
        leaked = compare_with_alone(ref, model, examples, PrefixShareCollator(0), gradients=False)
    assert leaked.logps_error >= LEAK_VISIBLE, leaked


def test_flex_loaded_model_without_layout_is_unchanged():
    """Without a layout the patched model runs transformers' FlexAttention with its own mask: logits bit for bit,
    and generate() gives the same tokens (unpadded batches: a padded one makes torch 2.13's CPU FlexAttention
    kernel fail to compile, patched or not)."""
    ref = reference("llama")
    model = patch(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for length in (6, 13):
            input_ids = torch.randint(3, VOCAB, (2, length), generator=g)
            got, want = model(input_ids=input_ids).logits, ref(input_ids=input_ids).logits
            assert torch.equal(got, want), float((got - want).abs().max())
        settings = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(input_ids, **settings), ref.generate(input_ids, **settings))
