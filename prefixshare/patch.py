"""``prefixshare.patch(model)``: make a Hugging Face decoder accept prefix-shared batches.

How: one attention function per (backend, original kernel) pair is registered with transformers'
``AttentionInterface`` (and a mask function with ``AttentionMaskInterface``), and selected on the text
decoder's config only. The batch's layout travels as the ``prefixshare_layout`` keyword argument down
to every attention call (it survives gradient-checkpoint recompute). A call without a layout goes to the
model's original attention function with the original mask, so ``generate()``, evaluation and vision
towers behave exactly as before.

The registered name encodes both choices, so a deep copy or a pickled model stays patched and no
per-model state lives outside the config.
"""

from __future__ import annotations

import contextvars
import warnings

import torch

from ._compat import (
    ALL_ATTENTION_FUNCTIONS,
    ALL_MASK_ATTENTION_FUNCTIONS,
    get_attn_implementation,
    model_eager_attention,
    register_attention,
    set_attn_implementation,
    text_config,
)
from .architectures import UnsupportedModelError, architecture_of, unsupported_message
from .backends import BACKENDS
from .collators import LAYOUT_KEY

# short, filter-safe codes: transformers 5.x matches implementation names by substring ("sdpa", "flash", ...)
_CODES = {
    "eager": "eager",
    "sdpa": "sdp",
    "flex_attention": "flex",
    "varlen": "varlen",
    "flash_attention_2": "fa2",
    "flash_attention_3": "fa3",
    "flash_attention_4": "fa4",
}
_PREFIX = "prefixshare_"

# transformers' FlashAttention kernels map onto the varlen backend (their 4D-mask-free path cannot take our layout)
_DEFAULT_BACKEND = {f"flash_attention_{v}": "varlen" for v in (2, 3, 4)}

# name -> (backend, original kernel), filled as names are registered
_REGISTERED: dict[str, tuple[str, str]] = {}

# True while a forward that carries a layout runs: transformers' own mask builders are then skipped
_LAYOUT_FORWARD = contextvars.ContextVar("prefixshare_layout_forward", default=False)


def _name(backend: str, kernel: str) -> str:
    return f"{_PREFIX}{_CODES[backend]}__{_CODES[kernel]}"


def _original_attention(kernel: str, module):
    return model_eager_attention(module) if kernel == "eager" else ALL_ATTENTION_FUNCTIONS[kernel]


def _make_attention(backend: str, kernel: str):
    attend = BACKENDS[backend]

    def prefixshare_attention(module, query, key, value, attention_mask, **kwargs):
        layout = kwargs.get(LAYOUT_KEY)
        if layout is None:
            return _original_attention(kernel, module)(module, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling")
        return attend(
            module,
            query,
            key,
            value,
            layout.to(query.device),
            scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
            dropout=kwargs.get("dropout", 0.0),
            sliding_window=kwargs.get("sliding_window"),
            softcap=kwargs.get("softcap"),
        )

    prefixshare_attention.__qualname__ = f"prefixshare_attention[{backend}<-{kernel}]"
    return prefixshare_attention


def _make_mask(kernel: str):
    def prefixshare_mask(*args, **kwargs):
        if _LAYOUT_FORWARD.get():
            return None  # the backends derive their masks from the layout; don't build one to throw away
        return ALL_MASK_ATTENTION_FUNCTIONS[kernel](*args, **kwargs)

    return prefixshare_mask


def _ensure_registered(backend: str, kernel: str) -> str:
    name = _name(backend, kernel)
    if name not in _REGISTERED:
        register_attention(name, _make_attention(backend, kernel), _make_mask(kernel))
        _REGISTERED[name] = (backend, kernel)
    return name


def _parse(name: str | None) -> tuple[str, str] | None:
    """(backend, kernel) of a prefixshare implementation name, or None for any other name."""
    if not name or not name.startswith(_PREFIX):
        return None
    if name not in _REGISTERED:  # e.g. a model unpickled in a fresh process
        codes = {v: k for k, v in _CODES.items()}
        backend_code, _, kernel_code = name[len(_PREFIX) :].partition("__")
        _ensure_registered(codes[backend_code], codes[kernel_code])
    return _REGISTERED[name]


# ---------------------------------------------------------------------------------------------- hooks
def _enter_forward(module, args, kwargs):
    layout = kwargs.get(LAYOUT_KEY)
    if layout is not None:
        _check_forward_kwargs(kwargs, layout)
    module.__dict__.setdefault("_prefixshare_tokens", []).append(_LAYOUT_FORWARD.set(layout is not None))


def _exit_forward(module, args, kwargs, output):
    tokens = module.__dict__.get("_prefixshare_tokens")
    if tokens:
        _LAYOUT_FORWARD.reset(tokens.pop())


def _check_forward_kwargs(kwargs, layout) -> None:
    if kwargs.get("labels") is not None:
        raise ValueError(
            "prefixshare: do not pass labels= with a prefix-shared batch (the model would shift them across "
            "response boundaries); compute log-probs with prefixshare.split_logps(out.logits, batch)"
        )
    if kwargs.get("use_cache"):
        raise ValueError("prefixshare: a prefix-shared forward needs use_cache=False")
    if kwargs.get("past_key_values") is not None:
        raise ValueError("prefixshare: a prefix-shared forward takes no past_key_values")
    for key in ("input_ids", "position_ids"):
        value = kwargs.get(key)
        if value is not None and tuple(value.shape[:2]) != layout.shape:
            raise ValueError(f"prefixshare: {key} of shape {tuple(value.shape)} does not match the layout {layout.shape}")
    if kwargs.get("position_ids") is None:
        raise ValueError("prefixshare: pass the batch's position_ids (model(**batch) does)")


def _has_hook(hooks: dict, function) -> bool:
    return any(h is function for h in hooks.values())


def _remove_hook(module, hooks_attribute: str, function) -> None:
    """Remove ``function`` from a hook dict, and its entries in the dicts torch keeps beside it."""
    hooks = getattr(module, hooks_attribute)
    for key in [k for k, h in hooks.items() if h is function]:
        del hooks[key]
        for companion in (f"{hooks_attribute}_with_kwargs", f"{hooks_attribute}_always_called"):
            getattr(module, companion, {}).pop(key, None)


# ---------------------------------------------------------------------------------------------- public
def _unwrap(model):
    """The transformers model inside DDP / FSDP1 / DeepSpeed / PEFT wrappers (FSDP2 keeps the class)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft
            model = model.get_base_model()
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "FullyShardedDataParallel",
            "DeepSpeedEngine",
        ):
            model = model.module
    return model


def _decoder_configs(model) -> list:
    """The distinct text-decoder configs of every transformers model nested in ``model``."""
    from transformers import PreTrainedModel

    found = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for config in (module.config, text_config(module.config)):
                found.setdefault(id(config), config)
    return list(found.values())


def patch(model, backend: str | None = None, *, allow_unverified: bool = False):
    """Make ``model`` accept prefix-shared batches; returns the same model, patched in place.

    Args:
        model: a transformers ``PreTrainedModel`` (Llama, Mistral, Qwen2/2.5/3, Gemma 1/2/3), a peft
            ``PeftModel`` around one (LoRA, QLoRA), or either wrapped by DDP or FSDP.
        backend: the kernel for prefix-shared forwards: ``"eager"``, ``"sdpa"``, ``"flex_attention"`` or
            ``"varlen"``. ``None`` keeps the kernel the model was loaded with (``flash_attention_2/3/4``
            map to ``"varlen"``).
        allow_unverified: patch a decoder outside the verified list (it must use transformers' attention
            interface); a warning says so.

    Idempotent: patching twice is the same as once (a new ``backend`` replaces the old one).
    Forwards without a ``prefixshare_layout`` keyword run the original attention unchanged.

    Raises:
        UnsupportedModelError: the architecture is not verified and ``allow_unverified`` is False.
        ValueError: the chosen backend cannot run this model (sdpa and Gemma2's softcap).
    """
    inner = _unwrap(model)
    configs = [c for c in _decoder_configs(inner) if architecture_of(c) is not None]
    if not configs:
        model_type = getattr(text_config(inner.config), "model_type", None)
        if not allow_unverified:
            raise UnsupportedModelError(unsupported_message(model_type))
        if not getattr(inner, "_supports_attention_backend", False):
            raise UnsupportedModelError(
                f"{type(inner).__name__} (model_type {model_type!r}) does not route attention through "
                "transformers' AttentionInterface, so prefixshare cannot patch it"
            )
        warnings.warn(
            f"prefixshare: patching unverified model_type {model_type!r}; verify it with compat/run_matrix.py",
            stacklevel=2,
        )
        configs = [text_config(inner.config)]

    for config in configs:
        current = get_attn_implementation(config) or "eager"
        parsed = _parse(current)
        kernel = parsed[1] if parsed else current
        if kernel not in _CODES:
            raise ValueError(f"prefixshare: unknown attention implementation {kernel!r} on {type(inner).__name__}")
        chosen = backend or (parsed[0] if parsed else _DEFAULT_BACKEND.get(kernel, kernel))
        if chosen not in BACKENDS:
            raise ValueError(
                f"prefixshare: no prefix-shared backend for {chosen!r}; choose one of {sorted(BACKENDS)} "
                f"(e.g. prefixshare.patch(model, backend='sdpa'))"
            )
        if chosen == "sdpa" and getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError(
                f"prefixshare: {getattr(config, 'model_type', '')} uses an attention logit softcap that sdpa cannot "
                "apply; use backend='eager' or backend='flex_attention'"
            )
        set_attn_implementation(config, _ensure_registered(chosen, kernel))

    if not _has_hook(inner._forward_pre_hooks, _enter_forward):
        inner.register_forward_pre_hook(_enter_forward, with_kwargs=True)
        inner.register_forward_hook(_exit_forward, with_kwargs=True, always_call=True)
    return model


def unpatch(model):
    """Undo :func:`patch`: the original attention implementation, no hooks. Returns the model."""
    inner = _unwrap(model)
    for config in _decoder_configs(inner):
        parsed = _parse(get_attn_implementation(config))
        if parsed is not None:
            set_attn_implementation(config, parsed[1])
    _remove_hook(inner, "_forward_pre_hooks", _enter_forward)
    _remove_hook(inner, "_forward_hooks", _exit_forward)
    inner.__dict__.pop("_prefixshare_tokens", None)
    return model


def is_patched(model) -> bool:
    inner = _unwrap(model)
    return any(_parse(get_attn_implementation(c)) for c in _decoder_configs(inner))


def patched_backend(model) -> str | None:
    """The backend prefix-shared forwards of ``model`` use, or None if it is not patched."""
    inner = _unwrap(model)
    for config in _decoder_configs(inner):
        parsed = _parse(get_attn_implementation(config))
        if parsed:
            return parsed[0]
    return None
