"""The self-check: prove on the user's own model that the patched forward gives the plain model's numbers.

``patch`` runs it for any architecture the project has not verified (and on request): a few random prompts
with two responses each go through the patched model as one prefix-shared batch (unpacked and packed into
one row), and each prompt+response alone through the original attention (the same model, called without a
layout). Per-token log-probs must agree within a tolerance set by the model's dtype, and so must the
gradients of one attention layer's parameters and of every parameter held directly by an attention module
(an attention-sink vector that a kernel ignored would get no gradient). It runs in eval mode (no dropout)
on the model's own device and dtype and leaves parameters, gradients and modes as it found them.
"""

from __future__ import annotations

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

# (prompt length, response lengths) of the probe's examples: a one-token prompt, unequal responses
_SHAPES = ((5, (3, 6)), (1, (4, 2)), (9, (1, 5)))


class SelfCheckError(UnsupportedModelError):
    """The patched model's numbers differ from the plain model's on the self-check's probe."""


def _probe_examples(model, seed: int) -> list[dict]:
    config = model.config
    vocabulary = model.get_input_embeddings().num_embeddings
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


def _per_token_logps(logits: torch.Tensor, layout, input_ids: torch.Tensor) -> torch.Tensor:
    """``[T]`` float32 log-probs of every response token, grouped by response in input order."""
    flat = logits.reshape(-1, logits.shape[-1])
    targets = input_ids.reshape(-1)[layout.target_index]
    values = torch.log_softmax(flat[layout.predictor_index].float(), -1).gather(-1, targets[:, None])[:, 0]
    return values[torch.sort(layout.response_index, stable=True).indices]


def _alone_logps(model, examples, device) -> torch.Tensor:
    values = []
    for example in examples:
        prompt = example["prompt_input_ids"]
        for response in example["responses_input_ids"]:
            ids = torch.tensor([prompt + response], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0]
            values.append(torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1).gather(-1, ids[0, len(prompt) :, None])[:, 0])
    return torch.cat(values)


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.detach().float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((value.detach().float() - reference.detach().float()).abs().max() / scale)


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
    with eval_mode(inner):
        with torch.no_grad():
            alone = _alone_logps(inner, examples, device)
        for rows in (None, longest * len(examples)):
            batch = PrefixShareCollator(0, max_tokens_per_row=rows)(examples).to(device)
            with torch.no_grad():
                shared = _per_token_logps(inner(**batch).logits, batch.layout, batch["input_ids"])
            error = _relative_error(shared, alone)
            errors["logps" if rows is None else "logps_packed"] = error
            if not error <= tolerance:  # (NaN fails too)
                raise SelfCheckError(
                    f"prefixshare self-check failed on {type(inner).__name__} ({dtype}): the prefix-shared "
                    f"{'packed ' if rows else ''}batch's log-probs differ from each prompt+response run alone by "
                    f"{error:.3g} (normwise relative; allowed {tolerance:g}). The model is left unpatched: its "
                    "attention does something the prefix-shared kernels do not reproduce (a parameter or a "
                    "feature they ignore, or tokens mixing outside attention). Try another backend, or report it."
                )
        if parameters and not distributed:
            tensors = [p for _, p in parameters]
            batch = PrefixShareCollator(0, max_tokens_per_row=longest * len(examples))(examples).to(device)
            weights = torch.randn(len(alone), generator=torch.Generator().manual_seed(seed + 1)).to(device)
            shared = _per_token_logps(inner(**batch).logits, batch.layout, batch["input_ids"])
            got = torch.autograd.grad((shared * weights).sum(), tensors, allow_unused=True)
            want = torch.autograd.grad((_alone_logps(inner, examples, device) * weights).sum(), tensors, allow_unused=True)
            worst = 0.0
            for (name, p), g, w in zip(parameters, got, want):
                if w is None:
                    continue
                error = float("inf") if g is None else _relative_error(g, w)
                if not error <= gradient_tolerance:
                    raise SelfCheckError(
                        f"prefixshare self-check failed on {type(inner).__name__} ({dtype}): the gradient of {name} "
                        + ("is missing in the prefix-shared forward (the kernel ignores that parameter)" if g is None
                           else f"differs from the runs alone by {error:.3g} (allowed {gradient_tolerance:g})")
                        + ". The model is left unpatched."
                    )
                worst = max(worst, error)
            errors["gradients"] = worst
    return errors
