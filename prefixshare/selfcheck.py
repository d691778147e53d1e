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
"""

from __future__ import annotations

import contextlib

import torch

from .architectures import UnsupportedModelError
from .collators import PrefixShareCollator
from .structure import eval_mode, text_attention_modules, unwrap_model

# normwise relative error allowed between the prefix-shared and the alone run, by the model's dtype: the two
# runs sum in different orders (different shapes), nothing more; a leak between responses is far larger
# (measured on the tiny models, CPU: float32 2e-7, bfloat16 2e-3, float16 0 for log-probs; gradients of one
# attention layer float32 2e-6, bfloat16 2e-2, float16 3e-3)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 5e-3}
GRADIENT_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 1e-1, torch.float16: 2e-2}

# gradients are compared per parameter on the larger of its own scale and this fraction of the largest entry
GRADIENT_FLOOR = 0.1

# (prompt length, response lengths) of the probe's examples: a one-token prompt, unequal responses
_SHAPES = ((5, (3, 6)), (1, (4, 2)), (9, (1, 5)))


class SelfCheckError(UnsupportedModelError):
    """The patched model's numbers differ from the plain model's on the self-check's probe."""


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
        error = float((grads[key].detach().float() - ref.detach().float()).abs().max()) / denominator
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
        return hidden.reshape(-1, hidden.shape[-1])[layout.target_index][order].float()
    logits = _outputs(model, **batch)
    flat = logits.reshape(-1, logits.shape[-1])
    targets = input_ids.reshape(-1)[layout.target_index]
    values = torch.log_softmax(flat[layout.predictor_index].float(), -1).gather(-1, targets[:, None])[:, 0]
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
                values.append(out[len(prompt) :].float())
                continue
            logps = torch.log_softmax(out[len(prompt) - 1 : -1].float(), -1)
            values.append(logps.gather(-1, ids[0, len(prompt) :, None])[:, 0])
    return torch.cat(values)


def _finite_parts(value: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Both tensors with their nan/inf entries zeroed, or None if those entries differ (place or value).

    A diverged model (a nan weight) gives nan in both runs at the same places: that is no difference of the
    layout, so only the finite entries are compared.
    """
    value, reference = value.detach().float(), reference.detach().float()
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
    switched = [m for m in model.modules() if getattr(m, _BNB_CPU_BF16_SWITCH, False) is True]
    for module in switched:
        setattr(module, _BNB_CPU_BF16_SWITCH, False)
    try:
        yield
    finally:
        for module in switched:
            setattr(module, _BNB_CPU_BF16_SWITCH, True)


def self_check(model, *, seed: int = 0) -> dict[str, float]:
    """Compare a patched ``model`` with itself unpatched on random prompts; raise :class:`SelfCheckError` if
    they differ. Returns the errors measured (``logps``, ``gradients``) for the record.

    ``model`` must already be patched (its hooks and attention implementation set); it is left as it was.
    """
    inner = unwrap_model(model)
    embeddings = inner.get_input_embeddings()
    device = embeddings.weight.device
    dtype = embeddings.weight.dtype if embeddings.weight.is_floating_point() else torch.float32
    tolerance, gradient_tolerance = TOLERANCE.get(dtype, 2e-2), GRADIENT_TOLERANCE.get(dtype, 1e-1)
    examples = _probe_examples(inner, seed)
    longest = max(p + sum(r) for p, r in _SHAPES)
    errors: dict[str, float] = {}
    parameters = _checked_parameters(inner)
    distributed = any(type(p).__name__ == "DTensor" for _, p in parameters)
    compared = "log-probs" if _has_lm_head(inner) else "last hidden states"
    # gradients on even under a caller's no_grad / inference_mode: patch may run on a model's first use there (a
    # TRL drop-in patches on first use the model it computes precomputed reference log-probs with, under no_grad)
    with eval_mode(inner), _bitsandbytes_default_path(inner), torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            alone = _alone_values(inner, examples, device)
        for rows in (None, longest * len(examples)):
            batch = PrefixShareCollator(0, max_tokens_per_row=rows)(examples).to(device)
            with torch.no_grad():
                shared = _shared_values(inner, batch)
            error = _relative_error(shared, alone)
            errors["logps" if rows is None else "logps_packed"] = error
            if not error <= tolerance:
                _refuse_position_handling(inner, device, error)
            if not error <= tolerance:  # (NaN fails too)
                raise SelfCheckError(
                    f"prefixshare self-check failed on {type(inner).__name__} ({dtype}): the prefix-shared "
                    f"{'packed ' if rows else ''}batch's {compared} differ from each prompt+response run alone by "
                    f"{error:.3g} (normwise relative; allowed {tolerance:g}). The model is left unpatched: it does "
                    "something a prefix-shared batch does not reproduce: positions taken from something other than "
                    "the position_ids it is given (the token's index in the row), an attention parameter or feature "
                    "the kernels ignore, or tokens mixing outside attention. Try another backend, or report it."
                )
        if parameters and not distributed:
            tensors = [p for _, p in parameters]
            batch = PrefixShareCollator(0, max_tokens_per_row=longest * len(examples))(examples).to(device)
            try:
                shared = _shared_values(inner, batch)
            except NotImplementedError as error:
                if "no backward pass on CPU" not in str(error):
                    raise
                return errors  # FlexAttention on CPU runs forward only: its gradients cannot be computed here
            # one random weight per compared number: per log-prob, and per feature of a hidden state. A weight per
            # token only would sum each hidden state over its features, and that sum is a constant after a final
            # LayerNorm whose gain is the same in every feature (every freshly initialized GPT-NeoX, GPT-2, OPT,
            # Phi; OLMo's has no gain at all): the gradient behind it is zero, its computed value rounding noise.
            weights = torch.randn(alone.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
            got = torch.autograd.grad((shared * weights).sum(), tensors, allow_unused=True)
            want = torch.autograd.grad((_alone_values(inner, examples, device) * weights).sum(), tensors, allow_unused=True)
            # each parameter on the larger of its own scale and a tenth of the largest gradient entry (see
            # prefixshare.testing.gradient_error: a key bias's true gradient is zero, its computed one noise)
            missing = [name for (name, _), g, w in zip(parameters, got, want) if w is not None and g is None]
            if missing:
                raise SelfCheckError(
                    f"prefixshare self-check failed on {type(inner).__name__} ({dtype}): the gradient of {missing[0]} "
                    "is missing in the prefix-shared forward (the kernel ignores that parameter). The model is left "
                    "unpatched."
                )
            pairs = {n: _finite_parts(g, w) for (n, _), g, w in zip(parameters, got, want) if w is not None}
            different = [n for n, parts in pairs.items() if parts is None]
            worst, name = (float("inf"), different[0]) if different else gradient_error(
                {n: parts[0] for n, parts in pairs.items()}, {n: parts[1] for n, parts in pairs.items()},
                floor=GRADIENT_FLOOR,
            )
            if not worst <= gradient_tolerance:
                raise SelfCheckError(
                    f"prefixshare self-check failed on {type(inner).__name__} ({dtype}): the gradient of {name} "
                    f"differs from the runs alone by {worst:.3g} (allowed {gradient_tolerance:g}). The model is left "
                    "unpatched."
                )
            errors["gradients"] = worst
    return errors
