"""The varlen backend's CUDA kernel adapters, on CPU: each kernel replaced by a stand-in with its documented
signature (argument names, positional order, defaults, return structure) that checks what it receives (int32
cu_seqlens, contiguous [T, H, D], Python-int maximum lengths, the causal flag and window tuple of its own
convention, its head layout) and computes with the reference kernel, so that exactness against the runs alone
covers each adapter's arguments and return values; what is left for a GPU is the kernels' speed and own numerics
(tests/test_varlen.py::test_cuda_varlen_kernels_match_the_reference)."""

import copy
from types import SimpleNamespace

import pytest
import torch

import prefixshare as ps
from prefixshare.backends import varlen
from prefixshare.backends.varlen import _run_kernel, reference_varlen
from prefixshare.testing import compare_with_alone, random_examples, tiny_model

CALLS = []  # (stand-in name, the keywords it received) for every call of a stand-in


def _check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, *, same_heads):
    """What every varlen kernel documents: q [Tq, H, D], k and v [Tk, H_kv, D], contiguous, one dtype and
    device; cu_seqlens int32 [N + 1] from 0 to Tq / Tk; max lengths Python ints equal to the longest sequence."""
    for t in (q, k, v):
        assert isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_contiguous(), t.shape
        assert t.dtype == q.dtype and t.device == q.device
    assert k.shape == v.shape and k.shape[2] == q.shape[2], (q.shape, k.shape, v.shape)
    if same_heads:
        assert k.shape[1] == q.shape[1], "this kernel takes as many key/value heads as query heads"
    else:
        assert q.shape[1] % k.shape[1] == 0
    for cu, total in ((cu_q, q.shape[0]), (cu_k, k.shape[0])):
        assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device, cu
        assert cu[0] == 0 and cu[-1] == total and bool((cu.diff() >= 0).all())
    assert len(cu_q) == len(cu_k)
    assert type(max_q) is int and type(max_k) is int, (type(max_q), type(max_k))
    assert max_q == int(cu_q.diff().max()) and max_k == int(cu_k.diff().max())
    # the layout's sequences: queries are the last tokens of their keys (bottom-right alignment matters)
    assert bool((cu_q.diff() <= cu_k.diff()).all())


def _compute(q, k, v, cu_q, cu_k, *, scale, window_left, softcap):
    seq = SimpleNamespace(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    return reference_varlen(
        q, k, v, seq, scale=scale, window_left=window_left, softcap=softcap, enable_gqa=k.shape[1] != q.shape[1]
    )


def _lse(q):
    return torch.full((q.shape[1], q.shape[0]), float("nan"), device=q.device)  # NaN: must never be read


def _flash_window(window_size, *, none):
    """A flash kernel's (left, right) window under causal=True: right 0 (or its "none"), left W - 1 or "none"."""
    assert isinstance(window_size, tuple) and len(window_size) == 2, window_size
    left, right = window_size
    assert right in (0, none), window_size
    assert left is none or (type(left) is int and left >= 0), window_size
    return -1 if left is none else left


# ------------------------------------------------------------------------------------------------ flash-attn 2
def flash_attn_2_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_attn_probs=False, block_table=None,
):  # flash-attn 2.6 to 2.8
    CALLS.append(("flash_attn_2", dict(window_size=window_size, causal=causal, softcap=softcap)))
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, same_heads=False)
    assert causal is True and dropout_p == 0.0 and alibi_slopes is None and block_table is None
    assert not return_attn_probs and type(softmax_scale) is float and softcap >= 0
    window_left = _flash_window(window_size, none=-1)
    return _compute(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, window_left=window_left,
                    softcap=softcap or None)


def flash_attn_2_3_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
):  # flash-attn 2.3 to 2.5: windows, no softcap
    CALLS.append(("flash_attn_2_3", dict(window_size=window_size, causal=causal)))
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, same_heads=False)
    assert causal is True and dropout_p == 0.0 and not return_attn_probs
    window_left = _flash_window(window_size, none=-1)
    return _compute(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, window_left=window_left, softcap=None)


def flash_attn_2_0_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, return_attn_probs=False,
):  # flash-attn 2.0 to 2.2: 2.0's causal mask aligned top-left under this signature
    raise AssertionError("must not be called: no window_size, so its causal alignment is unknown")


# ------------------------------------------------------------------------------------------- FlashAttention-3
def flash_attn_3_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None,
    softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
    window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
    sm_margin=0, return_attn_probs=False,
):  # flash_attn_interface, Aug 2025 on
    CALLS.append(("flash_attn_3", dict(window_size=window_size, causal=causal, softcap=softcap)))
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, same_heads=False)
    assert causal is True and seqused_q is None and seqused_k is None and qv is None and attention_chunk == 0
    window_left = _flash_window(window_size, none=-1)
    out = _compute(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, window_left=window_left,
                   softcap=softcap or None)
    return (out, _lse(q)) if return_attn_probs else out


def flash_attn_3_early_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False,
    window_size=(-1, -1), deterministic=False, seqused_q=None, seqused_k=None,
):  # the Aug-Dec 2024 betas: windows, no softcap; returns (out, lse)
    CALLS.append(("flash_attn_3_early", dict(window_size=window_size, causal=causal)))
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, same_heads=False)
    assert causal is True
    window_left = _flash_window(window_size, none=-1)
    out = _compute(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, window_left=window_left, softcap=None)
    return out, _lse(q)


def flash_attn_3_first_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False,
    deterministic=False,
):  # the first beta (Jul 2024): no window, no softcap
    CALLS.append(("flash_attn_3_first", dict(causal=causal)))
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, same_heads=False)
    assert causal is True
    return _compute(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, window_left=-1, softcap=None), _lse(q)


# ------------------------------------------------------------------------------------------- FlashAttention-4
def flash_attn_4_varlen_func(
    q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
    min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None, softmax_scale=None,
    causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
    deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None, block_sparse_tensors=None,
    aux_tensors=None, aux_scalars=None, return_lse=False,
):  # flash_attn.cute (flash-attn-4), 2026: qv fourth
    CALLS.append(("flash_attn_4", dict(window_size=window_size, causal=causal, softcap=softcap)))
    assert qv is None and learnable_sink is None and score_mod is None and mask_mod is None and page_table is None
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, same_heads=False)
    assert causal is True
    window_left = _flash_window(window_size, none=None)
    out = _compute(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, window_left=window_left,
                   softcap=softcap or None)
    return out, _lse(q)


def flash_attn_4_2025_varlen_func(
    q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, page_table=None,
    softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0, pack_gqa=None,
):  # flash_attn.cute, Aug-Oct 2025: no max_seqlen_q/k
    CALLS.append(("flash_attn_4_2025", dict(window_size=window_size, causal=causal, softcap=softcap)))
    assert causal is True and learnable_sink is None
    cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    _check_inputs(q, k, v, cu_q, cu_k, int(cu_q.diff().max()), int(cu_k.diff().max()), same_heads=False)
    window_left = _flash_window(window_size, none=None)
    out = _compute(q, k, v, cu_q, cu_k, scale=softmax_scale, window_left=window_left, softcap=softcap or None)
    return out, None


# ------------------------------------------------------------------------------------------ torch's varlen_attn
def _torch_window(window_size):
    """torch's convention: exactly (-1, 0) is causal; (W, 0) causal with a window of W keys before the diagonal."""
    assert isinstance(window_size, tuple) and len(window_size) == 2, window_size
    is_causal = window_size == (-1, 0)
    assert is_causal or (window_size[1] == 0 and type(window_size[0]) is int and window_size[0] >= 0), window_size
    return window_size[0]


def torch_2_11_varlen_attn(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):  # torch 2.11: no enable_gqa, key/value (T_k, H, D)
    CALLS.append(("torch_2_11", dict(window_size=window_size, scale=scale)))
    _check_inputs(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, same_heads=True)
    assert return_aux is None
    return _compute(query, key, value, cu_seq_q, cu_seq_k, scale=scale, window_left=_torch_window(window_size),
                    softcap=None)


def torch_2_13_varlen_attn(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
    enable_gqa=False, seqused_k=None, block_table=None, num_splits=None,
):  # torch 2.12 on
    CALLS.append(("torch_2_13", dict(window_size=window_size, scale=scale, enable_gqa=enable_gqa)))
    _check_inputs(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, same_heads=not enable_gqa)
    assert enable_gqa == (key.shape[1] != query.shape[1]) and seqused_k is None and block_table is None
    return _compute(query, key, value, cu_seq_q, cu_seq_k, scale=scale, window_left=_torch_window(window_size),
                    softcap=None)


def torch_2_10_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    CALLS.append(("torch_2_10", dict(is_causal=is_causal)))
    _check_inputs(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, same_heads=True)
    assert is_causal is True and return_aux is None
    return _compute(query, key, value, cu_seq_q, cu_seq_k, scale=query.shape[-1] ** -0.5, window_left=-1,
                    softcap=None)


LOOKUPS = {  # stand-in -> the lookup it replaces
    flash_attn_2_varlen_func: "_flash_attn_varlen",
    flash_attn_2_3_varlen_func: "_flash_attn_varlen",
    flash_attn_2_0_varlen_func: "_flash_attn_varlen",
    flash_attn_3_varlen_func: "_flash_attn_3_varlen",
    flash_attn_3_early_varlen_func: "_flash_attn_3_varlen",
    flash_attn_3_first_varlen_func: "_flash_attn_3_varlen",
    flash_attn_4_varlen_func: "_flash_attn_4_varlen",
    flash_attn_4_2025_varlen_func: "_flash_attn_4_varlen",
    torch_2_11_varlen_attn: "_torch_varlen",
    torch_2_13_varlen_attn: "_torch_varlen",
    torch_2_10_varlen_attn: "_torch_varlen",
}
NAMES = {fn: fn.__name__.removesuffix("_varlen_func").removesuffix("_varlen_attn") for fn in LOOKUPS}


@pytest.fixture
def install(monkeypatch):
    """``install(*stand_ins, capability=(9, 0))``: these kernels and no others installed, and CPU tensors treated
    as if on a GPU of ``capability`` (raising=False: at the branch point some of these names did not exist, and the
    tests then fail because no stand-in is called, not on the monkeypatch)."""

    def install(*stand_ins, capability=(9, 0)):
        for name in set(LOOKUPS.values()):
            monkeypatch.setattr(varlen, name, lambda: None, raising=False)
        for fn in stand_ins:
            monkeypatch.setattr(varlen, LOOKUPS[fn], lambda fn=fn: fn, raising=False)
        monkeypatch.setattr(varlen, "_capability", lambda device, dtype: capability, raising=False)
        CALLS.clear()

    yield install
    CALLS.clear()


def called():
    return {name for name, _ in CALLS}


# (stand-in, architecture) pairs whose kernel cannot apply the model's attention, and where it is refused:
# "patch" (a softcap, before any forward) or "forward" (a window or scale: the first forward raises)
REFUSED = {
    (flash_attn_2_3_varlen_func, "gemma2"): ("patch", "softcap"),
    (flash_attn_3_early_varlen_func, "gemma2"): ("patch", "softcap"),
    (flash_attn_3_first_varlen_func, "gemma2"): ("patch", "softcap"),
    (flash_attn_3_first_varlen_func, "mistral"): ("forward", "sliding window"),
    (flash_attn_3_first_varlen_func, "gemma3"): ("forward", "sliding window"),
    (torch_2_11_varlen_attn, "gemma2"): ("patch", "softcap"),
    (torch_2_13_varlen_attn, "gemma2"): ("patch", "softcap"),
    (torch_2_10_varlen_attn, "gemma2"): ("patch", "softcap"),
    (torch_2_10_varlen_attn, "mistral"): ("forward", "sliding window"),
    (torch_2_10_varlen_attn, "gemma3"): ("forward", "softmax scale"),
}
KERNELS = [fn for fn in LOOKUPS if fn is not flash_attn_2_0_varlen_func]


@pytest.mark.parametrize("architecture", ["llama", "mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("kernel", KERNELS, ids=NAMES.get)
def test_each_kernel_is_exact_or_refuses(kernel, architecture, install):
    """Tiny models, grouped-query heads (4 query, 2 key/value) everywhere; Mistral a sliding window on every
    layer, Gemma2 a logit softcap, windows and a scale of 12**-0.5 for head dim 16, Gemma3 windows and that
    scale: log-probs and every parameter's gradient through the stand-in equal each prompt+response alone, or the
    feature the kernel lacks is refused, naming it."""
    install(kernel, capability=(10, 0) if LOOKUPS[kernel] == "_flash_attn_4_varlen" else (9, 0))
    reference = tiny_model(architecture).train()
    model = copy.deepcopy(reference)
    where, feature = REFUSED.get((kernel, architecture), (None, None))
    if where == "patch":
        with pytest.raises(ValueError, match=feature):
            ps.patch(model, backend="varlen", verify=False)
        assert not ps.is_patched(model)
        return
    ps.patch(model, backend="varlen", verify=where is None)
    collator = ps.PrefixShareCollator(0, max_tokens_per_row=100)
    examples = random_examples(4, 96, seed=6, num_responses=3)
    if where == "forward":
        with pytest.raises(ValueError, match=feature):
            compare_with_alone(reference, model, examples, collator)
        with pytest.raises(ps.SelfCheckError, match=feature):  # and patch's self-check raises it before
            ps.patch(copy.deepcopy(reference), backend="varlen", verify=True)
        return
    CALLS.clear()
    result = compare_with_alone(reference, model, examples, collator)
    assert called() == {NAMES[kernel]}, CALLS  # the stand-in ran every layer, nothing else did
    assert result.passes(1e-5), result


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("kernel", KERNELS, ids=NAMES.get)
def test_each_kernel_receives_its_own_conventions(kernel, window, softcap, install):
    """One call in bfloat16 (the dtype reaches the kernel unchanged), grouped-query heads, a window or not, a
    softcap or not: the arguments in the kernel's own convention (the stand-ins check them), its output equal to
    the reference's bitwise, or the feature it lacks refused."""
    install(kernel)
    layout = ps.PrefixShareCollator(0, max_tokens_per_row=70)(
        random_examples(5, 50, seed=3, num_responses=3, prompt_lengths=(1, 12), response_lengths=(1, 9))
    ).layout
    seq = layout.varlen_sequences()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(len(seq.query_index), 4, 16, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(len(seq.key_index), 2, 16, generator=g, dtype=torch.bfloat16) for _ in range(2))
    scale = 16**-0.5 if kernel is torch_2_10_varlen_attn else 0.3
    options = dict(scale=scale, window_left=-1 if window is None else window - 1, softcap=softcap, enable_gqa=True)
    name = NAMES[kernel]
    lacks_window = kernel in (torch_2_10_varlen_attn, flash_attn_3_first_varlen_func)
    lacks_softcap = LOOKUPS[kernel] == "_torch_varlen" or kernel in (
        flash_attn_2_3_varlen_func, flash_attn_3_early_varlen_func, flash_attn_3_first_varlen_func
    )
    if (window and lacks_window) or (softcap and lacks_softcap):
        with pytest.raises(ValueError, match="sliding window" if window and lacks_window else "softcap"):
            _run_kernel(q, k, v, seq, **options)
        assert not CALLS
        return
    got = _run_kernel(q, k, v, seq, **options)
    assert [n for n, _ in CALLS] == [name]
    received = CALLS[0][1]
    if "window_size" in received:
        none = None if LOOKUPS[kernel] == "_flash_attn_4_varlen" else -1
        assert received["window_size"] == (none if window is None else window - 1, 0), received
    if "causal" in received or "is_causal" in received:
        assert received.get("causal", received.get("is_causal")) is True
    if softcap is not None:
        assert received["softcap"] == softcap
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, reference_varlen(q, k, v, seq, **options))


def test_a_kernel_lacking_a_feature_is_never_called_with_it(install):
    """Called directly, an adapter raises for what its kernel lacks (a window, a softcap, another scale) instead
    of dropping it."""
    install()
    seq = SimpleNamespace(cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32),
                          cu_seqlens_k=torch.tensor([0, 2], dtype=torch.int32), max_seqlen_q=2, max_seqlen_k=2)
    q = k = v = torch.zeros(2, 2, 16)
    for fn, options, feature in (
        (torch_2_11_varlen_attn, dict(scale=0.25, window_left=-1, softcap=2.0), "softcap"),
        (torch_2_10_varlen_attn, dict(scale=0.25, window_left=3, softcap=None), "sliding window"),
        (torch_2_10_varlen_attn, dict(scale=0.3, window_left=-1, softcap=None), "softmax scale"),
        (flash_attn_2_3_varlen_func, dict(scale=0.25, window_left=-1, softcap=2.0), "softcap"),
        (flash_attn_3_first_varlen_func, dict(scale=0.25, window_left=3, softcap=None), "sliding window"),
    ):
        with pytest.raises(ValueError, match=feature):
            recognise(fn).run(q, k, v, seq, **options)
    assert not CALLS


def recognise(fn):
    """The adapter the lookup ``fn`` stands in for would make of it."""
    return getattr(varlen, {
        "_flash_attn_varlen": "_recognise_flash_attn_2",
        "_flash_attn_3_varlen": "_recognise_flash_attn_3",
        "_flash_attn_4_varlen": "_recognise_flash_attn_4",
        "_torch_varlen": "_recognise_torch_varlen",
    }[LOOKUPS[fn]])(fn)


def test_kernels_are_recognised_by_their_signatures():
    assert recognise(flash_attn_2_0_varlen_func) is None  # unknown causal alignment
    for fn in KERNELS:
        kernel = recognise(fn)
        assert kernel is not None and kernel.fn is fn, fn
    flags = {fn: (k.window, k.softcap, k.scale, k.gqa) for fn in KERNELS for k in [recognise(fn)]}
    assert flags[torch_2_11_varlen_attn] == (True, False, True, False)
    assert flags[torch_2_13_varlen_attn] == (True, False, True, True)
    assert flags[torch_2_10_varlen_attn] == (False, False, False, False)
    assert flags[flash_attn_2_3_varlen_func] == (True, False, True, True)
    assert flags[flash_attn_3_first_varlen_func] == (False, False, True, True)
    assert flags[flash_attn_4_2025_varlen_func] == (True, True, True, True)

    def needs_more(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
                   softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        raise AssertionError  # an argument this module does not pass, without a default

    def other(query, key, value, attn_mask=None):
        raise AssertionError

    assert varlen._recognise_flash_attn_3(needs_more) is None and varlen._recognise_flash_attn_2(needs_more) is None
    assert varlen._recognise_torch_varlen(other) is None and varlen._recognise_flash_attn_4(other) is None


NEWEST = [flash_attn_3_varlen_func, flash_attn_4_varlen_func, flash_attn_2_varlen_func, torch_2_13_varlen_attn]


@pytest.mark.parametrize(
    "capability, installed, chosen",
    [
        ((9, 0), NEWEST, "flash_attn_3"),  # Hopper: FA3 first
        ((9, 0), NEWEST[1:], "flash_attn_4"),
        ((10, 0), NEWEST, "flash_attn_4"),  # Blackwell: not FA3
        ((10, 0), [flash_attn_3_varlen_func, flash_attn_2_varlen_func], "flash_attn_2"),
        ((8, 0), NEWEST, "flash_attn_2"),  # Ampere: neither FA3 nor FA4
        ((8, 0), [flash_attn_3_varlen_func, flash_attn_4_varlen_func, torch_2_11_varlen_attn], "torch_2_11"),
        ((9, 0), [flash_attn_2_0_varlen_func, torch_2_11_varlen_attn], "torch_2_11"),  # FA 2.0: not recognised
    ],
)
def test_order_of_preference(capability, installed, chosen, install):
    install(*installed, capability=capability)
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    seq = SimpleNamespace(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
                          cu_seqlens_k=torch.tensor([0, 3], dtype=torch.int32), max_seqlen_q=3, max_seqlen_k=3)
    _run_kernel(q, k, v, seq, scale=16**-0.5, window_left=-1, softcap=None, enable_gqa=True)
    assert called() == {chosen}, CALLS


def test_a_feature_goes_to_the_next_kernel_that_applies_it(install):
    """Gemma2's softcap on Hopper with an FA3 beta (windows, no softcap) and flash-attn 2.6: flash-attn 2 runs it;
    with torch's varlen_attn instead of flash-attn 2, patch refuses, naming both kernels."""
    install(flash_attn_3_early_varlen_func, flash_attn_2_varlen_func)
    reference = tiny_model("gemma2").train()
    model = ps.patch(copy.deepcopy(reference), backend="varlen")
    CALLS.clear()
    result = compare_with_alone(reference, model, random_examples(4, 96, seed=6), ps.PrefixShareCollator(0))
    assert called() == {"flash_attn_2"} and result.passes(1e-5), (CALLS, result)
    install(flash_attn_3_early_varlen_func, torch_2_11_varlen_attn)
    with pytest.raises(ValueError, match="FlashAttention-3.*softcap.*torch's varlen_attn.*softcap"):
        ps.patch(copy.deepcopy(reference), backend="varlen")


def test_the_reference_runs_without_a_cuda_kernel(install):
    """Nothing recognised, or not half precision on CUDA: the reference kernel, as before."""
    install(flash_attn_2_0_varlen_func)
    assert varlen.select_kernel("cpu", torch.bfloat16) is None
    assert not varlen.has_cuda_varlen_kernel()
    install(torch_2_11_varlen_attn)
    assert varlen.has_cuda_varlen_kernel()


def test_kernels_run_only_on_cuda_in_half_precision():
    assert varlen._capability(torch.device("cpu"), torch.bfloat16) is None
    assert varlen._capability(torch.device("cuda"), torch.float32) is None  # float32: the reference (no CUDA call)


def test_an_output_other_than_documented_raises(install):
    def returns_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        return _lse(q), q  # (lse, out): the wrong way round

    install()
    kernel = varlen._recognise_flash_attn_2(returns_lse)
    seq = SimpleNamespace(cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32),
                          cu_seqlens_k=torch.tensor([0, 2], dtype=torch.int32), max_seqlen_q=2, max_seqlen_k=2)
    with pytest.raises(RuntimeError, match="returned"):
        kernel.run(torch.zeros(2, 2, 16), torch.zeros(2, 2, 16), torch.zeros(2, 2, 16), seq, scale=0.25,
                   window_left=-1, softcap=None)
