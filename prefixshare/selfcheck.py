"""The self-check: prove on the user's own model that the patched forward gives the plain model's numbers.

``patch`` runs it once per model and backend (``verify=False`` skips it): a few random prompts
with two responses each go through the patched model as one prefix-shared batch (unpacked and packed into
one row), and each prompt+response alone through the original attention (the same model, called without a
layout). It is what proves, on the user's own model, what the structural reading
(:mod:`prefixshare.structure`) cannot see: positions taken from somewhere other than ``position_ids``, a
token mixer hidden inside an MLP, a feature a kernel would ignore. Per-token log-probs must agree within a tolerance set by the model's dtype, and so must the
gradients of one attention layer's parameters and of every parameter held directly by an attention module
(an attention-sink vector that a kernel ignored would get no gradient). It runs in eval mode (no dropout)
on the model's own device and dtype and leaves parameters, gradients and modes as it found them.

The tolerance follows the precision the probe's forwards actually compute in: the coarser of the parameters'
dtype and the autocast dtype in force inside the forward (accelerate's and the HF Trainer's mixed precision,
``bf16=True`` in TRL's configs, run float32 models under bfloat16 autocast). The comparison itself is made in
float64 for float64 models (a float32 copy would add float32 rounding, ~1e-7, to both sides). Under
``torch.no_grad()`` or ``torch.inference_mode()`` (a reference model's first forward) the gradient step still runs,
with gradients enabled inside the probe; only a model whose parameters were created under inference mode
cannot be differentiated, and the result says so (``gradients_not_checked``).
"""

from __future__ import annotations

import contextlib

import torch

from .architectures import UnsupportedModelError
from .backends import SOFTMAX_IN_FLOAT32
from .collators import PrefixShareCollator
from .precision import autocast_dtype, coarsest
from .structure import eval_mode, text_attention_modules, unwrap_model

# normwise relative error allowed between the prefix-shared and the alone run, by the dtype the forward computes
# in (the parameters', or autocast's when coarser): the two runs sum in different orders (different shapes),
# nothing more; a leak between responses is far larger (measured on the tiny models, CPU: float32 2e-7,
# bfloat16 2e-3, float16 0 for log-probs; gradients of one attention layer float32 2e-6, bfloat16 2e-2, float16
# 3e-3; float32 weights under bfloat16 autocast, Llama of hidden 256 x 4 layers: 5.9e-4 / 9e-3; float64
# with initializer_range 0.2: see the float64 test in tests/test_selfcheck.py)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 5e-3}
GRADIENT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 1e-1, torch.float16: 2e-2}

# gradients are compared per parameter on the larger of its own scale and this fraction of the largest entry
GRADIENT_FLOOR = 0.1

# (prompt length, response lengths) of the probe's examples: a one-token prompt, unequal responses
_SHAPES = ((5, (3, 6)), (1, (4, 2)), (9, (1, 5)))


class SelfCheckError(UnsupportedModelError):
    """The patched model's numbers differ from the plain model's on the self-check's probe."""


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or float64 if it is float64: the comparisons add no rounding of their own."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def gradient_error(grads: dict, reference: dict, *, floor: float = 0.0) -> tuple[float, str | None]:
    """The worst parameter's gradient error: ``max |g - w| / max(max |w|, floor * G)`` over parameters, with ``G``
    the largest ``|w|`` of any parameter; returns ``(error, parameter name)``. A parameter missing from
    ``grads`` counts as an infinite error.

    ``floor=0`` is the plain per-parameter normwise relative error. A positive floor measures parameters whose
    gradient is tiny next to the model's on the model's scale: a key projection's bias has a gradient of exactly
    zero in exact arithmetic (softmax ignores a shift common to every key), so its computed gradient is float32
    rounding noise on both sides, and noise divided by noise is of order one.
    """
    scale = max((float(w.detach().abs().max()) for w in reference.values() if w.numel()), default=0.0)
    worst, name = 0.0, None
    for key, ref in reference.items():
        if key not in grads:
            return float("inf"), key
        denominator = max(float(ref.detach().abs().max()) if ref.numel() else 0.0, floor * scale,
                          torch.finfo(torch.float32).tiny)  # fmt: skip
        error = float((_wide(grads[key].detach()) - _wide(ref.detach())).abs().max()) / denominator
        if not error < worst:  # (NaN wins)
            worst, name = error, key
    return worst, name


def _probe_examples(model, seed: int) -> list[dict]:
    config = model.config
    vocabulary = model.get_input_embeddings().num_embeddings
    head = model.get_output_embeddings()
    if isinstance(getattr(head, "out_features", None), int):  # ids the LM head predicts too (Mllama, Moshi: fewer)
        vocabulary = min(vocabulary, head.out_features)
    # ids that make a multimodal model expect an image (image/video/audio tokens) are left out
    special = {
        value
        for name, value in {**config.to_dict(), **getattr(config, "get_text_config", lambda: config)().to_dict()}.items()
        if isinstance(value, int) and (name.endswith("token_id") or name.endswith("token_index"))
    }
    allowed = torch.tensor([i for i in range(min(vocabulary, 4096)) if i not in special])
    generator = torch.Generator().manual_seed(seed)

    def ids(n):
        return allowed[torch.randint(len(allowed), (n,), generator=generator)].tolist()

    return [
        {"prompt_input_ids": ids(p), "responses_input_ids": [ids(n) for n in responses]} for p, responses in _SHAPES
    ]


def _has_lm_head(model) -> bool:
    return isinstance(getattr(model, "get_output_embeddings", lambda: None)(), torch.nn.Module)


def _decoder_of(model) -> torch.nn.Module:
    """What the probe runs for a model without an LM head: its base model (``base_model``: the decoder whose last
    hidden state every head reads; the model itself when it is one). The head around it runs per token after the
    decoder (a sequence-classification ``score``) and then pools; the pooling, which prefix sharing does not
    change and the probe does not compare, needs ``config.pad_token_id`` for a batch of more than one row
    (transformers raises "Cannot handle batch sizes > 1 if no padding token is defined"), so it is left out."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def _outputs(model, **inputs) -> torch.Tensor:
    """``[B, L, V]`` logits of a language model, ``[B, L, H]`` last hidden states of its decoder otherwise."""
    if _has_lm_head(model):
        return model(**inputs).logits
    return _decoder_of(model)(**inputs).last_hidden_state


def _shared_values(model, batch) -> torch.Tensor:
    """Per response token, grouped by response in input order: ``[T]`` float32 log-probs for a language model;
    ``[T, H]`` last hidden states for a model without an LM head (a reward model's score head reads them)."""
    layout, input_ids = batch.layout, batch["input_ids"]
    order = torch.sort(layout.response_index, stable=True).indices
    if not _has_lm_head(model):
        hidden = _outputs(model, **batch)
        return _wide(hidden.reshape(-1, hidden.shape[-1])[layout.target_index][order])
    logits = _outputs(model, **batch)
    flat = logits.reshape(-1, logits.shape[-1])
    targets = input_ids.reshape(-1)[layout.target_index]
    values = torch.log_softmax(_wide(flat[layout.predictor_index]), -1).gather(-1, targets[:, None])[:, 0]
    return values[order]


def _alone_values(model, examples, device) -> torch.Tensor:
    """The same values, each prompt+response run alone."""
    values = []
    for example in examples:
        prompt = example["prompt_input_ids"]
        for response in example["responses_input_ids"]:
            ids = torch.tensor([prompt + response], device=device)
            out = _outputs(model, input_ids=ids, use_cache=False)[0]
            if not _has_lm_head(model):
                values.append(_wide(out[len(prompt) :]))
                continue
            logps = torch.log_softmax(_wide(out[len(prompt) - 1 : -1]), -1)
            values.append(logps.gather(-1, ids[0, len(prompt) :, None])[:, 0])
    return torch.cat(values)


def _finite_parts(value: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Both tensors with their nan/inf entries zeroed, or None if those entries differ (place or value).

    A diverged model (a nan weight) gives nan in both runs at the same places: that is no difference of the
    layout, so only the finite entries are compared.
    """
    value, reference = _wide(value.detach()), _wide(reference.detach())
    finite = torch.isfinite(reference)
    same = (value == reference) | (value.isnan() & reference.isnan()) | finite
    if not bool(same.all()) or not bool((torch.isfinite(value) == finite).all()):
        return None
    return value.where(finite, 0.0), reference.where(finite, 0.0)


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    parts = _finite_parts(value, reference)
    if parts is None:
        return float("inf")
    value, reference = parts
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((value - reference).abs().max() / scale)


def _refuse_position_handling(model, device, error: float) -> None:
    """Raise a SelfCheckError naming the cause if the model does not take its positions from ``position_ids``
    numbered 0, 1, 2, ... (what the collators give); return if its positions look right."""
    ids = torch.arange(3, 9, device=device)[None]
    with torch.no_grad():
        given = _outputs(model, input_ids=ids, position_ids=torch.arange(6, device=device)[None], use_cache=False)
        repeated = torch.tensor([[0, 1, 2, 2, 3, 4]], device=device)
        moved = _outputs(model, input_ids=ids, position_ids=repeated, use_cache=False)
        own = _outputs(model, input_ids=ids, use_cache=False)
    name = type(model).__name__
    if torch.equal(given, moved):
        why = ("its forward ignores the position_ids it is given (it numbers positions by the token's index in the "
               "row), so a response cannot restart at the prompt's length")  # fmt: skip
    elif not torch.allclose(given, own, rtol=1e-4, atol=1e-5):
        why = ("its own positions are not numbered 0, 1, 2, ... (the position_ids prefix sharing gives; RoBERTa-style "
               "embeddings start after the padding index)")  # fmt: skip
    else:
        return
    raise SelfCheckError(
        f"prefixshare cannot make {name} exact: {why}; the prefix-shared log-probs differ by {error:.3g}. "
        "The model is left unpatched."
    )


def _checked_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters of the first attention layer, and those held directly by any attention module."""
    attention = text_attention_modules(model)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen: dict[int, torch.nn.Parameter] = {}
    for i, module in enumerate(attention):
        for p in module.parameters(recurse=i == 0):
            if p.requires_grad and p.is_floating_point():
                chosen[id(p)] = p
    return [(names.get(k, "?"), p) for k, p in chosen.items()]


# bitsandbytes (0.50) repacks a 4-bit layer for good for a bfloat16-only CPU kernel (no backward) the first time
# it runs in eval mode without grad on a CPU with AVX512-BF16, unless this attribute is False: the self-check's
# no-grad forwards must not switch the user's QLoRA layers to it
_BNB_CPU_BF16_SWITCH = "support_avx512bf16_for_cpu"


@contextlib.contextmanager
def _bitsandbytes_default_path(model):
    # (truthy, not True: bitsandbytes 0.50.2 stores has_avx512bf16()'s int 1 there on such CPUs)
    switched = [(m, getattr(m, _BNB_CPU_BF16_SWITCH)) for m in model.modules() if getattr(m, _BNB_CPU_BF16_SWITCH, False)]
    for module, _ in switched:
        setattr(module, _BNB_CPU_BF16_SWITCH, False)
    try:
        yield
    finally:
        for module, value in switched:
            setattr(module, _BNB_CPU_BF16_SWITCH, value)


@contextlib.contextmanager
def _observed_autocast(model, device):
    """Yield a set that collects the autocast dtype (None: off) in force inside each forward of ``model``, read
    at its first attention module: accelerate turns autocast on inside the wrapped ``forward`` itself."""
    seen: set = set()
    modules = text_attention_modules(model)[:1] or [model.get_input_embeddings()]
    handles = [m.register_forward_pre_hook(lambda module, args: seen.add(autocast_dtype(device))) for m in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _layer_compute_dtypes(model) -> set:
    """The dtypes layers compute in whatever the parameters' dtype: a quantized layer's ``compute_dtype``
    (bitsandbytes' 4-bit layers cast their input to ``bnb_4bit_compute_dtype``)."""
    return {m.compute_dtype for m in model.modules() if isinstance(getattr(m, "compute_dtype", None), torch.dtype)}


def _precision(dtype: torch.dtype, autocast: set, kernels, layers: set = frozenset()) -> tuple[torch.dtype, str]:
    """The dtype the probe computed in (the coarsest of the parameters', autocast's, quantized layers' compute
    dtype and, for a kernel with a float32 softmax, float32), and its description."""
    used = sorted({str(d).removeprefix("torch.") for d in autocast if d is not None})
    described = str(dtype) + (f" under {'/'.join(used)} autocast" if used else "")
    coarser_layers = sorted(str(d).removeprefix("torch.") for d in layers if coarsest([d, dtype, *autocast]) == d != dtype)
    if coarser_layers:
        described += f", quantized layers computing in {'/'.join(coarser_layers)}"
    autocast = {*autocast, *layers}
    softmax = torch.float32 if set(kernels) & SOFTMAX_IN_FLOAT32 else None
    computed = coarsest([dtype, *autocast, softmax])
    if computed != coarsest([dtype, *autocast]):
        described += f", {str(softmax).removeprefix('torch.')} softmax in {'/'.join(sorted(set(kernels) & SOFTMAX_IN_FLOAT32))}"
    return computed, described


def self_check(model, *, seed: int = 0, kernels=None) -> dict[str, float | str]:
    """Compare a patched ``model`` with itself unpatched on random prompts; raise :class:`SelfCheckError` if
    they differ. Returns the errors measured (``logps``, ``logps_packed``, ``gradients``) for the record, the
    precision they were judged at (``precision``), and ``gradients_not_checked`` (why) where the gradients could
    not be computed.

    ``model`` must already be patched (its hooks and attention implementation set); it is left as it was. It may
    be called under ``torch.autocast`` (the tolerance follows), ``torch.no_grad()`` or ``torch.inference_mode()``
    (gradients are enabled inside the probe). ``kernels``: the attention implementations the two sides run (the
    patched backend and the model's own), for the precision they compute in; None: read off the patched model.
    """
    from .patch import attention_kernels  # (patch imports this module when it runs the check)

    inner = unwrap_model(model)
    kernels = attention_kernels(inner) if kernels is None else set(kernels)
    embeddings = inner.get_input_embeddings()
    device = embeddings.weight.device
    dtype = embeddings.weight.dtype if embeddings.weight.is_floating_point() else torch.float32
    examples = _probe_examples(inner, seed)
    longest = max(p + sum(r) for p, r in _SHAPES)
    errors: dict[str, float | str] = {}
    parameters = _checked_parameters(inner)
    distributed = any(type(p).__name__ == "DTensor" for _, p in parameters)
    name = type(inner).__name__
    layers = _layer_compute_dtypes(inner)
    compared = "log-probs" if _has_lm_head(inner) else "last hidden states"
    with eval_mode(inner), _bitsandbytes_default_path(inner), _observed_autocast(inner, device) as autocast:
        with torch.no_grad():
            alone = _alone_values(inner, examples, device)
        for rows in (None, longest * len(examples)):
            batch = PrefixShareCollator(0, max_tokens_per_row=rows)(examples).to(device)
            with torch.no_grad():
                shared = _shared_values(inner, batch)
            compute, described = _precision(dtype, autocast, kernels, layers)
            tolerance = TOLERANCE.get(compute, 2e-2)
            error = _relative_error(shared, alone)
            errors["logps" if rows is None else "logps_packed"] = error
            if not error <= tolerance:
                _refuse_position_handling(inner, device, error)
            if not error <= tolerance:  # (NaN fails too)
                raise SelfCheckError(
                    f"prefixshare self-check failed on {name} ({described}): the prefix-shared "
                    f"{'packed ' if rows else ''}batch's {compared} differ from each prompt+response run alone by "
                    f"{error:.3g} (normwise relative; allowed {tolerance:g}). The model is left unpatched: it does "
                    "something a prefix-shared batch does not reproduce: positions taken from something other than "
                    "the position_ids it is given (the token's index in the row), an attention parameter or feature "
                    "the kernels ignore, or tokens mixing outside attention. Try another backend, or report it."
                )
        if parameters and not distributed and any(p.is_inference() for _, p in parameters):
            errors["gradients_not_checked"] = (
                "the parameters were created under torch.inference_mode() and cannot be differentiated"
            )
        elif parameters and not distributed:
            # (under no_grad / inference_mode, a reference model's first forward: the probe needs its own graph)
            with torch.inference_mode(False), torch.enable_grad():
                gradients = _gradient_error(inner, parameters, examples, device, seed, alone.shape)
            if gradients is None:
                errors["gradients_not_checked"] = "FlexAttention on CPU runs forward only"
            else:
                worst, worst_name = gradients
                compute, described = _precision(dtype, autocast, kernels, layers)
                gradient_tolerance = GRADIENT_TOLERANCE.get(compute, 1e-1)
                if not worst <= gradient_tolerance:
                    raise SelfCheckError(
                        f"prefixshare self-check failed on {name} ({described}): the gradient of {worst_name} "
                        f"differs from the runs alone by {worst:.3g} (allowed {gradient_tolerance:g}). The model is "
                        "left unpatched."
                    )
                errors["gradients"] = worst
    errors["precision"] = _precision(dtype, autocast, kernels, layers)[1]
    return errors


def _gradient_error(inner, parameters, examples, device, seed: int, shape: torch.Size) -> tuple[float, str] | None:
    """The worst gradient error of ``parameters`` (and its name) between the packed prefix-shared batch and the
    runs alone, under a random weighting of the compared values (``shape``: theirs); None where the backward cannot run
    (FlexAttention on CPU). Raises :class:`SelfCheckError` for a gradient the prefix-shared forward lacks."""
    tensors = [p for _, p in parameters]
    longest = max(p + sum(r) for p, r in _SHAPES)
    batch = PrefixShareCollator(0, max_tokens_per_row=longest * len(examples))(examples).to(device)

    try:
        shared = _shared_values(inner, batch)
    except NotImplementedError as error:
        if "no backward pass on CPU" not in str(error):
            raise
        return None  # FlexAttention on CPU runs forward only: its gradients cannot be computed here
    # one random weight per compared number: per log-prob, and per feature of a hidden state. A weight per token
    # only would sum each hidden state over its features, and that sum is a constant after a final LayerNorm whose
    # gain is the same in every feature (every freshly initialized GPT-NeoX, GPT-2, OPT, Phi; OLMo's has no gain at
    # all): the gradient behind it is zero, its computed value rounding noise.
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    got = torch.autograd.grad((shared * weights).sum(), tensors, allow_unused=True)
    want = torch.autograd.grad((_alone_values(inner, examples, device) * weights).sum(), tensors, allow_unused=True)
    # each parameter on the larger of its own scale and a tenth of the largest gradient entry (see
    # gradient_error: a key bias's true gradient is zero, its computed one noise)
    missing = [name for (name, _), g, w in zip(parameters, got, want) if w is not None and g is None]
    if missing:
        raise SelfCheckError(
            f"prefixshare self-check failed on {type(inner).__name__}: the gradient of {missing[0]} is missing in the "
            "prefix-shared forward (the kernel ignores that parameter). The model is left unpatched."
        )
    pairs = {n: _finite_parts(g, w) for (n, _), g, w in zip(parameters, got, want) if w is not None}
    different = [n for n, parts in pairs.items() if parts is None]
    if different:
        return float("inf"), different[0]
    return gradient_error(
        {n: parts[0] for n, parts in pairs.items()}, {n: parts[1] for n, parts in pairs.items()}, floor=GRADIENT_FLOOR
    )
