"""Non-finite isolation: an inf/NaN in one response, unit or padding token never reaches another.

Masks set what a query cannot see to probability 0, but ``0 * inf`` is NaN, and an inf/NaN score plus an additive
mask stays inf/NaN: before the fix, an inf embedding of a token of the chosen response made the rejected response
NaN, a poisoned unit made the clean unit packed beside it NaN, and a NaN embedding of the pad id made every
example of a padded row NaN, although each of those runs finite alone.

What is checked, on tiny real models (weights of std 0.1) with every backend: eager, sdpa, flex (forward only on
CPU), varlen (its reference kernel; at the kernel level also a stand-in for a fused kernel that computes every
masked block):

* (1) a chosen-only inf/NaN token, (2) a poisoned unit packed beside a clean one, (3) a NaN embedding of the pad
  id: every clean response equals its run alone through the unpatched model (the project's 1e-5 relative) and,
  bitwise, its value in the same batch without the poison; a response non-finite alone is non-finite shared;
* (4) all three at once through ``prefixshare.response_logps``: per-token log-probs of every clean response
  equal to its run alone, finite statistics;
* fp16: an overflow in one unit leaves its neighbours bitwise as without it;
* at the kernel: every query that may see a non-finite key or value gives NaN, every other one bitwise the output
  of the clean inputs, with sliding windows, grouped-query heads, softcaps, sinks and a value head dim of its own;
  the reach (:func:`prefixshare.masks.reaches`, no ``[L, L]`` tensor) equals the dense predicate's.

The poison enters as the decoder sees it: the input embeddings' output for one token id (or the pad id) is
replaced, by a hook, so that a tied LM head keeps finite logits for that id (``test_inf_embedding_row_in_the_
weights`` sets the weight row itself on a model without tied embeddings). fp16: a finite embedding row that
overflows to inf in Gemma's embedding scaling.

Every test here fails on de1f78d (before the isolation).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefixshare as ps
from prefixshare.backends import BACKENDS, varlen
from prefixshare.logps import token_logps
from prefixshare.masks import dense_bool_mask
from prefixshare.testing import random_examples, relative_error, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOL = 1e-5
PAD = 0
POISON, POISON_2 = 95, 94  # the examples draw ids from [3, 90): these occur only where a test puts them
VOCAB = 90
BACKEND_NAMES = ("eager", "sdpa", "flex_attention", "varlen")
# the backends whose kernels run over whole rows; varlen's sequences never held another unit's keys or a padding
# token (it passed (2) and (3) on de1f78d already); its units and pads are checked in the engine test, with (1)
DENSE_ROW_BACKENDS = ("eager", "sdpa", "flex_attention")
# llama: full attention, grouped-query heads; mistral: sliding window 8 (short enough to matter here)
ARCHITECTURES = ("llama", "mistral")


# ================================================================================================ helpers
@functools.cache
def _models(architecture: str, backend: str, dtype=torch.float32, **overrides):
    reference = tiny_model(architecture, dtype=dtype, **overrides)
    return reference, ps.patch(copy.deepcopy(reference), backend=backend)


def models(architecture, backend, dtype=torch.float32, **overrides):
    """``(reference, patched)``: the unpatched tiny model and a patched copy (built once per test session)."""
    return _models(architecture, backend, dtype, **overrides)


@contextlib.contextmanager
def poisoned(models, poison: dict[int, float]):
    """The input embeddings' output of each token id in ``poison`` replaced by that value, in every model."""

    def hook(module, args, output):
        output = output.clone()
        for token, value in poison.items():
            output[args[0] == token] = value
        return output

    handles = [m.get_input_embeddings().register_forward_hook(hook) for m in models]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def alone(reference, examples) -> list[list[torch.Tensor]]:
    """Per-token log-probs ``[n][K] -> [len]`` of every prompt+response run alone through the unpatched model."""
    result = []
    for ex in examples:
        prompt = ex["prompt_input_ids"]
        row = []
        for response in (ex["chosen_input_ids"], ex["rejected_input_ids"]):
            ids = torch.tensor([prompt + response])
            logits = reference(input_ids=ids, use_cache=False).logits[0]
            row.append(token_logps(logits[len(prompt) - 1 : -1], ids[0, len(prompt) :]))
        result.append(row)
    return result


def sums(per_token) -> torch.Tensor:
    return torch.stack([torch.stack([t.sum() for t in row]) for row in per_token])


def shared(model, batch) -> torch.Tensor:
    """``[n, K]`` summed log-probs from the full logits of the patched forward."""
    return ps.gather_response_logps(model(**batch).logits, batch).logps


def assert_isolated(got, want, clean, poisoned_responses, *, reference=None):
    """``got`` (prefix-shared, with the poison) against ``want`` (alone, with the poison) and ``clean`` (prefix-
    shared, without it): the responses in ``poisoned_responses`` non-finite, every other one finite, within TOL
    of its run alone and bitwise equal to its value without the poison."""
    is_poisoned = torch.zeros_like(got, dtype=torch.bool)
    for i, k in poisoned_responses:
        is_poisoned[i, k] = True
    assert not want[is_poisoned].isfinite().any(), ("the test's premise: non-finite alone", want)
    assert want[~is_poisoned].isfinite().all(), ("the test's premise: finite alone", want)
    assert not got[is_poisoned].isfinite().any(), ("non-finite alone, so non-finite shared", got)
    assert got[~is_poisoned].isfinite().all(), ("a non-finite value reached another response", got)
    assert relative_error(got[~is_poisoned], want[~is_poisoned]) < TOL, (got, want)
    assert torch.equal(got[~is_poisoned], clean[~is_poisoned]), (got, clean)


def examples_with_poison_in(where: str, n=4, seed=0):
    """Random examples; example 0 holds POISON in its chosen response ('chosen') or its prompt ('prompt')."""
    examples = random_examples(n, VOCAB, seed=seed, prompt_lengths=(3, 14), response_lengths=(3, 12))
    ex = examples[0]
    key = {"chosen": "chosen_input_ids", "prompt": "prompt_input_ids"}[where]
    ex[key] = ex[key][:2] + [POISON] + ex[key][2:]
    return examples


# ================================================================================================ (1)-(3)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_inf_token_in_the_chosen_response_leaves_the_rejected_exact(architecture, backend, value):
    """(1) A token only in example 0's chosen response is inf (NaN): its rejected response and every other
    example equal their runs alone; its chosen response is non-finite."""
    reference, model = models(architecture, backend)
    examples = examples_with_poison_in("chosen")
    batch = ps.PrefixShareCollator(PAD)(examples)
    with torch.no_grad():
        clean = shared(model, batch)
        with poisoned((reference, model), {POISON: value}):
            want = sums(alone(reference, examples))
            got = shared(model, batch)
    assert_isolated(got, want, clean, [(0, 0)])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("backend", DENSE_ROW_BACKENDS)
@pytest.mark.parametrize("paired", [False, True])
def test_a_poisoned_unit_leaves_the_clean_unit_of_its_row_exact(architecture, backend, paired):
    """(2) Example 0's prompt holds a NaN token; packed into one row with example 1 (prefix-shared: two units;
    paired: four), example 1 equals its runs alone, both responses of example 0 are non-finite."""
    reference, model = models(architecture, backend)
    examples = examples_with_poison_in("prompt", n=2, seed=1)
    collator = (ps.PairedCollator if paired else ps.PrefixShareCollator)(PAD, max_tokens_per_row=200)
    batch = collator(examples)
    assert batch["input_ids"].shape[0] == 1, "the test's premise: one row"
    with torch.no_grad():
        clean = shared(model, batch)
        with poisoned((reference, model), {POISON: float("nan")}):
            want = sums(alone(reference, examples))
            got = shared(model, batch)
    assert_isolated(got, want, clean, [(0, 0), (0, 1)])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("backend", DENSE_ROW_BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_nan_embedding_of_the_pad_id_reaches_no_example(architecture, backend, packed):
    """(3) The pad id's embedding is NaN: every example (those of padded rows among them) equals its runs alone."""
    reference, model = models(architecture, backend)
    examples = random_examples(5, VOCAB, seed=2, prompt_lengths=(2, 14), response_lengths=(2, 12))
    batch = ps.PrefixShareCollator(PAD, max_tokens_per_row=70 if packed else None)(examples)
    padded_rows = (batch.layout.segment_ids == -1).any(1)
    assert sum(bool(padded_rows[pl.row]) for pl in batch.layout.placements) >= 2, "the test's premise: padded rows"
    with torch.no_grad():
        clean = shared(model, batch)
        with poisoned((reference, model), {PAD: float("nan")}):
            want = sums(alone(reference, examples))
            got = shared(model, batch)
    assert_isolated(got, want, clean, [])


def test_inf_embedding_row_in_the_weights():
    """(1) as the issue saw it: the embedding table's row of a chosen-only token set to inf (llama: no tied head)."""
    reference, _ = models("llama", "eager")
    reference = copy.deepcopy(reference)
    assert not reference.config.tie_word_embeddings
    model = ps.patch(copy.deepcopy(reference), backend="sdpa")
    examples = examples_with_poison_in("chosen", n=2)
    batch = ps.PrefixShareCollator(PAD, max_tokens_per_row=200)(examples)
    with torch.no_grad():
        clean = shared(model, batch)
        for m in (reference, model):
            m.get_input_embeddings().weight[POISON] = float("inf")
        want = sums(alone(reference, examples))
        got = shared(model, batch)
    assert_isolated(got, want, clean, [(0, 0)])


# ================================================================================================ (4) the engine
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_engine_per_token_values_of_clean_responses_are_exact(architecture, backend):
    """(4) prefixshare.response_logps with per-token values and statistics, packed, with a chosen-only inf token,
    a NaN prompt token in another example and a NaN pad id all at once: every token of every clean response
    equals its value alone, its statistics are finite, and the poisoned responses' sums are non-finite."""
    reference, model = models(architecture, backend)
    examples = random_examples(5, VOCAB, seed=4, prompt_lengths=(3, 14), response_lengths=(3, 12))
    examples[0]["chosen_input_ids"][1] = POISON  # example 0: chosen poisoned
    examples[3]["prompt_input_ids"][-1] = POISON_2  # example 3: both responses poisoned
    batch = ps.PrefixShareCollator(PAD, max_tokens_per_row=80)(examples)
    assert batch["input_ids"].shape[0] < len(examples) and bool((batch.layout.segment_ids == -1).any())
    poison = {POISON: float("inf"), POISON_2: float("nan"), PAD: float("nan")}
    grad = backend != "flex_attention"  # FlexAttention runs forward only on CPU
    with torch.set_grad_enabled(grad), poisoned((reference, model), poison):
        want = alone(reference, examples)
        result = ps.response_logps(model, batch, per_token=True, stats=("entropy", "logsumexp", "argmax_match"))
    is_poisoned = {(0, 0), (3, 0), (3, 1)}
    index = result.token_index
    for i, row in enumerate(want):
        for k, values in enumerate(row):
            mine = index.example.eq(i) & index.response.eq(k)
            got = result.token_logps[mine][index.position[mine].argsort()]
            if (i, k) in is_poisoned:
                assert not values.sum().isfinite() and not result.logps[i, k].isfinite()
                continue
            assert values.isfinite().all() and got.isfinite().all(), (i, k, got)
            assert relative_error(got, values) < TOL, (i, k)
            for name in ("entropy", "logsumexp", "argmax_match"):
                assert result.stats[name][mine].isfinite().all(), (name, i, k)
    assert result.logps.requires_grad == grad


# ================================================================================================ fp16
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_fp16_overflow_in_one_unit_leaves_its_neighbour_exact(backend):
    """A finite float16 embedding row (1e4) that Gemma's embedding scaling (x sqrt(64) = 8e4) overflows to inf, in
    example 0's chosen response: packed in one row, example 0's rejected and example 1 equal their values in the
    same batch without the overflow bitwise (float16 rounding differs between batch shapes, so not the runs
    alone), and finite; the chosen response is non-finite, as alone."""
    reference, model = models("gemma", backend, torch.float16, tie_word_embeddings=False)
    reference, model = copy.deepcopy(reference), copy.deepcopy(model)
    examples = examples_with_poison_in("chosen", n=2, seed=5)
    batch = ps.PrefixShareCollator(PAD, max_tokens_per_row=200)(examples)
    assert batch["input_ids"].shape[0] == 1
    with torch.no_grad():
        clean = shared(model, batch)
        for m in (reference, model):
            m.get_input_embeddings().weight[POISON] = 1e4
        assert m.get_input_embeddings().weight[POISON].isfinite().all()
        want = sums(alone(reference, examples))
        got = shared(model, batch)
    assert not want[0, 0].isfinite() and want[0, 1].isfinite() and want[1].isfinite().all(), want
    assert not got[0, 0].isfinite(), got
    keep = torch.tensor([[False, True], [True, True]])
    assert got[keep].isfinite().all(), got
    assert torch.equal(got[keep], clean[keep]), (got, clean)


# ================================================================================================ the kernels
def dense_standin_kernel(q, k, v, seq, *, scale, window_left, softcap, enable_gqa):
    """A stand-in with ``varlen._run_kernel``'s signature for a fused CUDA kernel: every sequence's scores over
    all its keys, masked to -inf, and every probability (the masked ones are exactly 0) times every value, as a
    kernel computing whole blocks does; bottom-right causal with a left window, as flash-attn's."""
    outputs = []
    cu_q, cu_k = seq.cu_seqlens_q.tolist(), seq.cu_seqlens_k.tolist()
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s] : cu_q[s + 1]].transpose(0, 1)
        ks, vs = (t[cu_k[s] : cu_k[s + 1]].transpose(0, 1) for t in (k, v))
        ks, vs = (t.repeat_interleave(qs.shape[0] // t.shape[0], 0) for t in (ks, vs))
        sq, sk = qs.shape[1], ks.shape[1]
        diagonal = torch.arange(sq)[:, None] + (sk - sq)
        key_idx = torch.arange(sk)[None, :]
        allowed = (key_idx <= diagonal) & ((key_idx >= diagonal - window_left) if window_left >= 0 else True)
        scores = qs @ ks.transpose(1, 2) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        outputs.append((probs @ vs).transpose(0, 1))
    return torch.cat(outputs)


# (backend, feature) pairs the backend refuses (prefixshare.backends.FEATURES)
REFUSED = {("sdpa", "softcap"), ("varlen", "sinks"), ("varlen_standin", "sinks")}


def kernel_cases():
    for backend in ("eager", "sdpa", "flex_attention", "varlen", "varlen_standin"):
        for window in (None, 5):
            for feature in ("plain", "softcap", "sinks", "value_dim"):
                if (backend, feature) in REFUSED:
                    continue
                yield backend, window, feature


@pytest.mark.parametrize("backend,window,feature", list(kernel_cases()))
def test_kernels_give_nan_exactly_where_a_non_finite_key_is_visible(backend, window, feature, monkeypatch):
    """Random q/k/v over a packed layout with padding; a NaN value and an inf key in the first response of a unit
    (the varlen table puts it in one sequence with the prompt's queries), an inf value in a later response, NaN
    and -inf in a padding token. Queries that may see one (the dense predicate) are NaN; all others equal the
    output of the clean inputs bitwise."""
    if backend == "varlen_standin":
        monkeypatch.setattr(varlen, "_run_kernel", dense_standin_kernel)
        backend = "varlen"
    layout = ps.PrefixShareCollator(0, max_tokens_per_row=70)(
        random_examples(5, 50, seed=3, num_responses=3, prompt_lengths=(1, 12), response_lengths=(1, 9))
    ).layout
    B, L = layout.shape
    g = torch.Generator().manual_seed(0)
    D_v = 24 if feature == "value_dim" else 16
    q, k = torch.randn(B, 4, L, 16, generator=g), torch.randn(B, 2, L, 16, generator=g)
    v = torch.randn(B, 2, L, D_v, generator=g)
    bad_k, bad_v = k.clone(), v.clone()
    bad = torch.zeros(B, L, 2, dtype=torch.bool)  # [B, L, H_kv]: which key/value head of which token is poisoned
    first, later = layout.placements[0], layout.placements[3]
    t = first.offset + first.unit.prompt_length + 1  # the 2nd token of unit 0's first response
    bad_v[first.row, 0, t, 3], bad_k[first.row, 0, t, 5] = float("nan"), float("inf")
    bad[first.row, t, 0] = True
    t = later.offset + later.unit.prompt_length + later.unit.response_lengths[0]  # the 1st of its 2nd response
    bad_v[later.row, 1, t, 0] = float("inf")
    bad[later.row, t, 1] = True
    pads = (layout.segment_ids == -1).nonzero()
    assert len(pads)
    b, p = pads[0].tolist()
    bad_k[b, 1, p, 2], bad_v[b, 0, p, 1] = float("nan"), float("-inf")
    bad[b, p, :] = True
    options = dict(scaling=0.25, sliding_window=window)
    if feature == "softcap":
        options["softcap"] = 2.0
    if feature == "sinks":
        options["sinks"] = torch.randn(4, generator=g)
    module = SimpleNamespace(training=False)
    with torch.no_grad():
        want, _ = BACKENDS[backend](module, q, k, v, layout, **options)
        got, _ = BACKENDS[backend](module, q, bad_k, bad_v, layout, **options)
    allowed = dense_bool_mask(layout, window)[:, 0]  # [B, Lq, Lk]
    reached = (allowed[..., None] & bad[:, None]).any(2).repeat_interleave(2, dim=-1)  # [B, L, H]
    assert reached.any() and not reached.all()
    assert got[reached].isnan().all()
    assert torch.equal(got[~reached], want[~reached])


def test_eager_weights_of_queries_that_see_a_non_finite_key_are_nan():
    """The eager backend also returns the attention weights: NaN rows where a non-finite key is visible, the clean
    weights elsewhere."""
    layout = ps.PrefixShareCollator(0, max_tokens_per_row=70)(random_examples(4, 50, seed=1)).layout
    B, L = layout.shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, 2, L, 8, generator=g) for _ in range(3))
    pl = layout.placements[0]
    t = pl.offset + pl.unit.prompt_length  # unit 0's first response token
    bad_v = v.clone()
    bad_v[pl.row, 0, t, 0] = float("nan")
    module = SimpleNamespace(training=False)
    _, want = BACKENDS["eager"](module, q, k, v, layout, scaling=0.3)
    _, got = BACKENDS["eager"](module, q, k, bad_v, layout, scaling=0.3)
    reached = dense_bool_mask(layout)[pl.row, 0, :, t]  # [L]: the queries that may see token t
    assert got[pl.row, 0, reached].isnan().all()
    assert torch.equal(got[pl.row, 1], want[pl.row, 1])  # the other head never saw a non-finite entry
    others = torch.ones(B, dtype=torch.bool)
    others[pl.row] = False
    assert torch.equal(got[others], want[others])
    assert torch.equal(got[pl.row, 0, ~reached], want[pl.row, 0, ~reached])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    K=st.integers(1, 3),
    budget=st.one_of(st.none(), st.integers(40, 90)),
    window=st.one_of(st.none(), st.integers(1, 9)),
    paired=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_reach_equals_the_predicate(n, K, budget, window, paired, seed):
    """masks.reaches (prefix sums over the varlen key ranges) marks exactly the queries whose dense predicate row
    holds a marked key, per key/value head, padding included."""
    from prefixshare.masks import reaches

    examples = random_examples(n, 50, seed=seed, num_responses=K, prompt_lengths=(1, 12), response_lengths=(1, 9))
    layout = (ps.PairedCollator if paired else ps.PrefixShareCollator)(0, max_tokens_per_row=budget)(examples).layout
    B, L = layout.shape
    marked = torch.rand(B, L, 2, generator=torch.Generator().manual_seed(seed)) < 0.08
    allowed = dense_bool_mask(layout, window)[:, 0]
    assert torch.equal(reaches(layout, marked, window), (allowed[..., None] & marked[:, None]).any(2))
