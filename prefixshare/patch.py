"""``prefixshare.patch(model)``: make a Hugging Face decoder accept prefix-shared batches.

How: one attention function per (backend, original kernel) pair is registered with transformers'
``AttentionInterface`` (and a mask function with ``AttentionMaskInterface``), and selected on the text
decoder's config only. The batch's layout travels as the ``prefixshare_layout`` keyword argument down
to every attention call (it survives gradient-checkpoint recompute). A call without a layout goes to the
model's original attention function with the original mask, so ``generate()``, evaluation and vision
towers behave exactly as before.

The registered name encodes both choices and re-registers itself when unpickled, so a deep copy or a
model loaded with ``torch.load`` in a fresh process stays patched with no per-model state outside the
config and its forward hooks.

Trust: a layout that is ignored gives wrong numbers silently (plain causal attention lets a response see
the one before it). So every forward that carries a layout is *recorded*: each attention call that applies
it marks its module, and when the forward ends the record must hold every attention layer of the text
decoder, or :class:`LayoutNotAppliedError` is raised. Logits of a forward that passed are stamped with the
batch's identity, and the log-prob functions refuse logits without the stamp of their batch. The record is
a Python set of module ids: no device sync, no extra forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
import weakref
from dataclasses import dataclass, field

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
from .architectures import UnsupportedModelError
from .backends import BACKENDS, FEATURES
from .layout import LAYOUT_KEY
from .precision import autocast_dtype
from .structure import (
    attention_features,
    attention_problems,
    learned_position_table,
    mask_only_window,
    text_attention_modules,
    text_model_type,
    token_mixing_problems,
    unwrap_model,
)
from .vision import multimodal_inputs

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

# attribute set on logits produced by a forward that applied a layout everywhere: the layout's origin
_STAMP = "_prefixshare_layout_origin"

# module attribute: the set of _check_key()s the self-check passed for this model, kept through pickling
_VERIFIED = "_prefixshare_verified"


class LayoutNotAppliedError(RuntimeError):
    """A prefix-shared batch went through a forward that did not apply its layout in every attention layer.

    Its logits would be wrong (a response attending to another); the fix is ``prefixshare.patch(model)``.
    """


# ---------------------------------------------------------------------------------------------- names
class _ImplementationName(str):
    """A registered implementation name that registers itself again when unpickled or deep-copied.

    transformers looks the name up in a process-global registry on every forward; a model saved with
    ``torch.save`` and loaded in a fresh process would otherwise fail with ``KeyError`` before any
    prefixshare code ran.
    """

    def __reduce__(self):
        return _restore_name, (str(self),)


def _restore_name(name: str) -> str:
    backend, kernel = _parse(name)
    return _ensure_registered(backend, kernel)


def _name(backend: str, kernel: str) -> str:
    return f"{_PREFIX}{_CODES[backend]}__{_CODES[kernel]}"


def _original_attention(kernel: str, module):
    return model_eager_attention(module) if kernel == "eager" else ALL_ATTENTION_FUNCTIONS[kernel]


# keyword arguments of an attention call that carry no attention math (transformers' bookkeeping, passed through
# every call); the backends apply scaling, dropout, sliding_window, softcap and s_aux (attention sinks). Anything
# else with a value (a position bias, sparse-attention indices, variable-length tables...) changes what the
# kernel computes, and a kernel that ignored it would return wrong numbers: such a call is refused.
_INERT_KWARGS = frozenset(
    {LAYOUT_KEY, "position_ids", "cache_position", "output_attentions", "output_hidden_states", "output_router_logits",
     "use_cache", "return_dict", "is_causal", "layer_idx", "past_key_value", "past_key_values", "cache",
     "logits_to_keep"}
)  # fmt: skip
_APPLIED_KWARGS = frozenset({"scaling", "dropout", "sliding_window", "softcap", "s_aux"})


def _check_attention_call(module, attention_mask, kwargs) -> int | None:
    """Refuse an attention call of a prefix-shared forward that asks for something the kernels do not apply;
    return the sliding window to apply (None: none).

    The kernels build their mask from the layout alone. During a prefix-shared forward the mask builders
    registered for prefixshare return None, so a mask that arrives anyway was made by the model itself (an
    ALiBi or relative-position bias, a learned dynamic mask): ignoring it would give wrong numbers. A layer whose
    module passes no window although the model's mask applies one (Qwen2-MoE, PhiMoE) gets that window
    (:func:`prefixshare.structure.mask_only_window`).
    """
    problems = []
    if attention_mask is not None:
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else ""
        problems.append(
            f"passes an attention mask of its own ({type(attention_mask).__name__}{shape}: a bias or mask the "
            "model builds itself, such as ALiBi, a relative-position bias or a learned mask), which the layout's "
            "kernels would ignore"
        )
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        problems.append("attends bidirectionally (is_causal=False), and prefix sharing needs causal attention")
    for key, value in kwargs.items():
        if key in _INERT_KWARGS or key in _APPLIED_KWARGS or value is None or value is False:
            continue
        problems.append(f"passes {key}={type(value).__name__} to its attention function, which the kernels do not apply")
    window = kwargs.get("sliding_window")
    if window is None:
        window = mask_only_window(module)
        if window == -1:
            problems.append("is a sliding-window layer, but neither its call nor its config gives the window")
    if problems:
        raise UnsupportedModelError(
            f"prefixshare cannot make this model exact: its attention module {type(module).__name__} "
            + "; ".join(problems)
            + ". The batch's responses would see each other or get wrong numbers, so nothing is returned."
        )
    return window


def _make_attention(backend: str, kernel: str):
    def prefixshare_attention(module, query, key, value, attention_mask, **kwargs):
        layout = kwargs.get(LAYOUT_KEY)
        if layout is None:
            return _original_attention(kernel, module)(module, query, key, value, attention_mask, **kwargs)
        window = _check_attention_call(module, attention_mask, kwargs)
        record = _ACTIVE.get()
        if record is not None:
            record.applied.add(id(module))
        scaling = kwargs.get("scaling")
        return BACKENDS[backend](
            module,
            query,
            key,
            value,
            layout.to(query.device),
            scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
            dropout=kwargs.get("dropout", 0.0),
            sliding_window=window,
            softcap=kwargs.get("softcap"),
            sinks=kwargs.get("s_aux"),
        )

    prefixshare_attention.__qualname__ = f"prefixshare_attention[{backend}<-{kernel}]"
    return prefixshare_attention


def _make_mask(kernel: str):
    def prefixshare_mask(*args, **kwargs):
        if _ACTIVE.get() is not None:
            return None  # the backends derive their masks from the layout; don't build one to throw away
        return ALL_MASK_ATTENTION_FUNCTIONS[kernel](*args, **kwargs)

    return prefixshare_mask


def _ensure_registered(backend: str, kernel: str) -> str:
    name = _ImplementationName(_name(backend, kernel))
    if name not in _REGISTERED:
        register_attention(name, _make_attention(backend, kernel), _make_mask(kernel))
        _REGISTERED[str(name)] = (backend, kernel)
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


# ---------------------------------------------------------------------------------------------- records
@dataclass(eq=False)
class _ForwardRecord:
    """One forward that carries a layout: which attention modules applied it."""

    layout: object
    applied: set = field(default_factory=set)
    inputs_checked: bool = False


# the record of the forward now running (None outside a prefix-shared forward)
_ACTIVE: contextvars.ContextVar[_ForwardRecord | None] = contextvars.ContextVar("prefixshare_forward", default=None)

# hooked modules entered and not yet left, innermost last: (module, record it opened or None, reset token)
_STACK: contextvars.ContextVar[tuple] = contextvars.ContextVar("prefixshare_stack", default=())

# module -> number of attention modules of its text decoder (the structure does not change once patched)
_EXPECTED: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


def _expected_layers(model) -> int:
    if model not in _EXPECTED:
        count = len(text_attention_modules(model))
        if not count:  # attention that this reading cannot see: fall back on the layer count
            count = getattr(text_config(unwrap_model(model).config), "num_hidden_layers", 0) or 0
        _EXPECTED[model] = count
    return _EXPECTED[model]


def _verify(record: _ForwardRecord, model) -> None:
    """Raise :class:`LayoutNotAppliedError` unless every attention layer of ``model`` applied the layout."""
    layout = record.layout
    expected = _expected_layers(model)
    applied = len(record.applied)
    if applied >= expected or (applied == 0 and layout.is_plain_causal):
        return  # (the unpacked paired format needs no layout: plain causal attention is its rule)
    inner = unwrap_model(model)
    kernels = sorted({str(get_attn_implementation(c)) for c in _decoder_configs(inner)})
    hooked = any(_has_hook(m._forward_pre_hooks, _enter_forward) for m in _hooked_modules(model))
    if applied == 0 and not hooked and not any(_parse(k) for k in kernels):
        raise LayoutNotAppliedError(
            f"prefixshare: {type(inner).__name__} is not patched, so it ignored the batch's layout and its "
            "responses attended to each other (wrong log-probs). Call prefixshare.patch(model) on it (and on a "
            "reference model) before giving it prefix-shared or packed batches."
        )
    raise LayoutNotAppliedError(
        f"prefixshare: the batch's layout was applied in {applied} of the {expected} attention layers of "
        f"{type(inner).__name__} (attention implementation now {', '.join(kernels)}), so the other layers let "
        "responses attend to each other. Was the attention implementation changed after prefixshare.patch() "
        "(set_attn_implementation, config._attn_implementation)? Call prefixshare.patch(model) again."
    )


def _stamp(output, layout) -> None:
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        mark_layout_applied(logits, layout)


def check_logits(logits: torch.Tensor, layout) -> None:
    """Raise :class:`LayoutNotAppliedError` unless ``logits`` come from a forward that applied ``layout``.

    ``logits`` must be the tensor a patched model returned for this batch (``out.logits``): the forward
    stamps it once every attention layer applied the layout. A batch whose rows each hold one
    prompt+response from position 0 (the unpacked paired format) needs no stamp.
    """
    if layout.is_plain_causal:
        return
    origin = getattr(logits, _STAMP, None)
    if origin is layout.origin:
        return
    if origin is None:
        raise LayoutNotAppliedError(
            "prefixshare: these logits do not come from a patched forward of this batch, so the batch's layout "
            "was not applied and its responses may have attended to each other. Call prefixshare.patch(model) "
            "(if the model was wrapped by peft or another wrapper after patching, patch the wrapper too) and pass "
            "the logits as the model returned them (out.logits: the log-prob functions upcast them themselves)."
        )
    raise LayoutNotAppliedError("prefixshare: these logits come from a forward of another batch than the one given")


def mark_layout_applied(logits: torch.Tensor, layout) -> torch.Tensor:
    """Declare that ``logits`` were computed with ``layout`` applied; returns ``logits``.

    For logits built by hand (tests of the log-prob splitter, logits from another framework that applies
    the same rule). Never use it on an unpatched model's output: that is exactly the wrong number the
    check exists to stop.
    """
    setattr(logits, _STAMP, layout.origin)
    return logits


@contextlib.contextmanager
def expect_layout_applied(model, layout):
    """Run a forward of ``model`` on a batch with ``layout`` inside this block; raise on leaving it unless
    every attention layer of the text decoder applied the layout (:class:`LayoutNotAppliedError`).

    Works whether or not the model's own hooks run (a peft wrapper added after ``patch``), and on models
    never patched. Nested blocks for the same batch check once, at the outermost.
    """
    current = _ACTIVE.get()
    if current is not None and current.layout.origin is layout.origin:
        yield current
        return
    record = _ForwardRecord(layout)
    token = _ACTIVE.set(record)
    try:
        yield record
    finally:
        _ACTIVE.reset(token)
    _verify(record, model)


# ---------------------------------------------------------------------------------------------- hooks
def _enter_forward(module, args, kwargs):
    layout = kwargs.get(LAYOUT_KEY)
    record = _ACTIVE.get()
    opened = token = None
    checked = kwargs
    if layout is not None:
        # check before any state is set: a refused call must leave no record behind (the exit hook of a
        # forward whose pre-hook raised may not run, and a stale record would drop later forwards' masks)
        if record is None or record.layout.origin is not layout.origin:
            checked = _check_forward_kwargs(module, kwargs, layout)
            record = opened = _ForwardRecord(layout, inputs_checked=True)
            token = _ACTIVE.set(record)
        elif not record.inputs_checked:
            checked = _check_forward_kwargs(module, kwargs, layout)
            record.inputs_checked = True
    _STACK.set(_STACK.get() + ((module, opened, token),))
    if checked is not kwargs:  # a batch with images: its 3D positions (prefixshare.vision)
        return args, checked
    return None


def _exit_forward(module, args, kwargs, output):
    stack = _STACK.get()
    if not stack or stack[-1][0] is not module:
        return
    _STACK.set(stack[:-1])
    _, opened, token = stack[-1]
    if opened is None:
        if kwargs.get(LAYOUT_KEY) is not None and output is not None and _ACTIVE.get() is not None:
            _stamp(output, _ACTIVE.get().layout)  # a wrapper around the forward that owns the record
        return
    _ACTIVE.reset(token)
    if output is None:  # the forward raised; its own error propagates
        return
    _verify(opened, module)
    _stamp(output, opened.layout)


def _check_forward_kwargs(module, kwargs, layout) -> dict:
    """Refuse keyword arguments a prefix-shared forward cannot take; return them, completed for images."""
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
    _check_vocabulary(module, kwargs.get("input_ids"), layout)
    _check_position_limit(module, layout)
    # images: 3D rotary positions per unit (Qwen2-VL style), or refused; videos and audio: refused
    return multimodal_inputs(module, kwargs, layout)


_POSITION_TABLES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple | None]" = weakref.WeakKeyDictionary()


def _check_position_limit(module, layout) -> None:
    """A position past a learned position table fails inside torch with an IndexError that names nothing (the plain
    model fails the same way): name the limit and the unit. Units restart responses at the prompt's length, so the
    limit bounds prompt + longest response, not the packed row."""
    if module not in _POSITION_TABLES:  # (the structure does not change once patched)
        _POSITION_TABLES[module] = learned_position_table(module)
    table = _POSITION_TABLES[module]
    if table is None:
        return
    name, limit = table
    for placement in layout.placements:
        unit = placement.unit
        longest = unit.prompt_length + max(unit.response_lengths, default=0)
        if longest > limit:
            raise ValueError(
                f"prefixshare: example {unit.example} (row {placement.row}) needs {longest} positions (prompt "
                f"{unit.prompt_length} + longest response {max(unit.response_lengths)} tokens), but "
                f"{type(unwrap_model(module)).__name__}'s learned position table ({name}) has "
                f"max_position_embeddings={limit}; truncate the examples (the collators' max_length) to at most "
                f"{limit} tokens per prompt+response"
            )


def _check_vocabulary(module, input_ids, layout) -> None:
    """A token id past the embedding table fails inside torch with an IndexError that names nothing."""
    if input_ids is None:
        return
    get_embeddings = getattr(unwrap_model(module), "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    size = getattr(embeddings, "num_embeddings", None)
    if not isinstance(size, int):
        return
    # the collators record the largest id, so a batch already on the GPU costs no device read
    largest = layout.max_token_id if layout.max_token_id is not None else int(input_ids.max())
    if largest >= size:
        ids = input_ids.detach().cpu()
        if not bool((ids >= size).any()):
            return  # the recorded maximum is stale (the ids were edited after collation); these are fine
        where = torch.nonzero(ids >= size)[0].tolist()
        raise ValueError(
            f"prefixshare: input_ids hold token id {int(ids[tuple(where)])} at row {where[0]}, position "
            f"{where[1]}, but the model's embedding table has {size} entries (ids 0..{size - 1}); was the batch "
            "tokenized with another tokenizer, or the pad_token_id set past the vocabulary?"
        )


def _has_hook(hooks: dict, function) -> bool:
    return any(h is function for h in hooks.values())


def _remove_hook(module, hooks_attribute: str, function) -> None:
    """Remove ``function`` from a hook dict, and its entries in the dicts torch keeps beside it."""
    hooks = getattr(module, hooks_attribute)
    for key in [k for k, h in hooks.items() if h is function]:
        del hooks[key]
        for companion in (f"{hooks_attribute}_with_kwargs", f"{hooks_attribute}_always_called"):
            getattr(module, companion, {}).pop(key, None)


def _hooked_modules(model) -> list[torch.nn.Module]:
    """Where the hooks go: the object given (a peft or other wrapper runs them even when it calls the inner
    model's ``forward`` directly) and every transformers model inside (``model.model(**batch)`` too)."""
    from transformers import PreTrainedModel

    modules = [model] if isinstance(model, torch.nn.Module) else []
    for module in unwrap_model(model).modules():
        if isinstance(module, PreTrainedModel) and all(module is not m for m in modules):
            modules.append(module)
    return modules


# ---------------------------------------------------------------------------------------------- public
def _decoder_configs(model) -> list:
    """The distinct text-decoder configs of every transformers model nested in ``model``."""
    from transformers import PreTrainedModel

    found = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for config in (module.config, text_config(module.config)):
                found.setdefault(id(config), config)
    return list(found.values())


def _refuse_unsupported_structure(inner) -> None:
    """Raise :class:`UnsupportedModelError` naming every layer of ``inner`` that a layout cannot make exact."""
    name = type(inner).__name__
    problems = token_mixing_problems(inner)
    if problems:
        mixers = any(" mix" in line for line in problems)
        raise UnsupportedModelError(
            f"prefixshare cannot make {name} exact: its "
            + "; ".join(problems)
            + (
                ". Such a mixer reads the tokens physically before it, so in [prompt | response 1 | response 2] the "
                "second response would read the first, whatever the attention mask says."
                if mixers
                else ". Attention computed outside the interface never sees the batch's layout, so in [prompt | "
                "response 1 | response 2] the second response would attend to the first."
            )
            + " Only decoders whose tokens mix through attention alone, through the interface, can be patched."
        )
    import inspect

    parameters = inspect.signature(inner.forward).parameters
    if "position_ids" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise UnsupportedModelError(
            f"prefixshare cannot make {name} exact: its forward takes no position_ids, so a response cannot restart "
            "at the prompt's length"
        )
    if not text_attention_modules(inner):
        raise UnsupportedModelError(
            f"prefixshare cannot patch {name} (model_type {text_model_type(inner)!r}): none of its modules routes "
            "attention through transformers' AttentionInterface (ALL_ATTENTION_FUNCTIONS), where the batch's "
            "layout is applied"
        )
    problems = attention_problems(inner)
    if problems:
        raise UnsupportedModelError(
            f"prefixshare cannot make {name} exact: its attention has " + "; ".join(problems) + "."
        )


def _refuse_backend_features(inner, backend: str) -> None:
    """Raise ValueError if the model has an attention feature that ``backend`` cannot apply, naming those that can
    (for varlen on a GPU: that none of the installed CUDA kernels its forwards would reach can apply)."""
    features = attention_features(inner)
    for feature, modules in features.items():
        able = FEATURES[feature]
        if backend not in able:
            raise ValueError(
                f"prefixshare: {type(inner).__name__} uses {feature} ({', '.join(modules)}), which the {backend} "
                f"backend cannot apply; use {' or '.join(repr(b) for b in able)}: prefixshare.patch(model, "
                f"backend={able[0]!r}) (or load the model with attn_implementation={able[0]!r})"
            )
    if backend == "varlen":
        from .backends.varlen import refuse_missing_kernel_features

        weight = _reference_weight(inner)
        refuse_missing_kernel_features(
            weight.device, autocast_dtype(weight.device) or weight.dtype, softcap="attention logit softcap" in features
        )


def _text_decoder_configs(inner) -> list:
    """The configs whose attention implementation ``patch`` sets: the model's own and its text decoder's, and those
    of the text decoder's attention modules (never a vision or audio tower's)."""
    found = {}
    for config in (inner.config, text_config(inner.config), *(m.config for m in text_attention_modules(inner))):
        found.setdefault(id(config), config)
    return list(found.values())


def _self_check_skipped(model) -> bool:
    """Parameters on the meta device (nothing to compute with), or sharded by FSDP1/FSDP2/DeepSpeed: there the
    self-check's forwards would be collectives of their own, run outside the training loop's order (and FSDP2
    keeps the root's parameters gathered after a forward without backward). Patch before wrapping to have the
    self-check run on the whole model, as the recipes do."""
    for module in (model, *unwrap_model(model).modules()):
        if type(module).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine") or any(
            type(c).__name__.startswith("FSDP") and hasattr(c, "unshard") for c in type(module).__mro__
        ):
            return True
    return any(p.is_meta or type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in unwrap_model(model).parameters())


def patch(model, backend: str | None = None, *, allow_unverified: bool | None = None, verify: bool | None = None):
    """Make ``model`` accept prefix-shared batches; returns the same model, patched in place.

    Which models: any decoder whose text decoder mixes tokens through attention alone, attention that goes
    through transformers' ``AttentionInterface`` (dense or mixture-of-experts; grouped-query, multi-head latent
    attention, attention sinks, logit softcaps, per-layer full / sliding-window types, RoPE, partial or no
    RoPE). Support is decided from what the model is made of (:mod:`prefixshare.structure`), then proven on the
    model itself by the self-check (``verify``); anything else is refused with the layer and the feature named.

    Args:
        model: a transformers ``PreTrainedModel`` (a ``*ForCausalLM``, or a multimodal model whose text decoder
            is such a decoder), a peft ``PeftModel`` around one (LoRA, QLoRA), or either wrapped by DDP or FSDP.
        backend: the kernel for prefix-shared forwards: ``"eager"``, ``"sdpa"``, ``"flex_attention"`` or
            ``"varlen"``. ``None`` keeps the kernel the model was loaded with (``flash_attention_2/3/4``
            map to ``"varlen"``).
        allow_unverified: no longer needed and ignored (support no longer comes from a list of names); kept so
            that existing calls still work.
        verify: run the self-check (:func:`prefixshare.selfcheck.self_check`): a few random prompts with two
            responses through the patched model, prefix-shared and packed, against each prompt+response
            alone through the original attention, log-probs and the gradients of one attention layer (and of
            every parameter an attention module holds itself, such as sinks), in the model's own dtype and
            device, judged at the precision the forward computes in (autocast included; it runs under
            ``torch.no_grad()`` and ``inference_mode`` too). ``None`` (default): once per model, backend,
            parameter dtype and device type, and autocast state at the call (``patch`` again after
            ``model.to(torch.bfloat16)`` or under another autocast checks again). ``True``: always. ``False``: never (an
            explicit opt-out; the structural checks and the per-call checks still run). A mismatch leaves the
            model unpatched and raises. Cost (``prefixshare bench --self-check``): 15 forwards of sequences of
            <= 20 tokens and two backward passes, 61-71 ms for the test suite's tiny Llama and 300-360 ms for the
            bench's 7.1M-parameter one on a 2-core CPU; with ``flex_attention`` also compiling its kernel for
            those shapes. Skipped for a model whose parameters are on the meta device or
            sharded (FSDP, DeepSpeed ZeRO-3): patch before wrapping to have it run.

    Idempotent: patching twice is the same as once (a new ``backend`` replaces the old one).
    Forwards without a ``prefixshare_layout`` keyword run the original attention unchanged.

    Raises:
        UnsupportedModelError: the model mixes tokens through something other than attention (convolutions,
            SSM or linear-attention layers), has no attention through the interface, or has attention layers of
            another kind (chunked, indexer-selected sparse); its attention calls ask for something the kernels do
            not apply (a mask or bias of its own, sparse indices); or the self-check found a difference
            (:class:`~prefixshare.SelfCheckError`). The message names the layer and the feature.
        ValueError: the chosen backend cannot apply a feature the model has (sdpa and a logit softcap, varlen and
            attention sinks); the message names the backends that can.
    """
    if allow_unverified is not None:
        warnings.warn(
            "prefixshare.patch(allow_unverified=...) is no longer needed and has no effect: support is decided "
            "by the model's structure and the self-check",
            DeprecationWarning,
            stacklevel=2,
        )
    inner = unwrap_model(model)
    _refuse_unsupported_structure(inner)
    configs = _text_decoder_configs(inner)

    previous = [(c, get_attn_implementation(c)) for c in configs]
    choices = []
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
        _refuse_backend_features(inner, chosen)
        choices.append((config, chosen, kernel))
    was_hooked = _has_hook(inner._forward_pre_hooks, _enter_forward)
    for config, chosen, kernel in choices:
        set_attn_implementation(config, _ensure_registered(chosen, kernel))

    for module in _hooked_modules(model):
        if not _has_hook(module._forward_pre_hooks, _enter_forward):
            module.register_forward_pre_hook(_enter_forward, with_kwargs=True)
            module.register_forward_hook(_exit_forward, with_kwargs=True, always_call=True)

    checked = _check_key(inner, {chosen for _, chosen, _ in choices})
    wanted = verify or (verify is None and checked not in inner.__dict__.get(_VERIFIED, ()))
    if wanted and not _self_check_skipped(model):
        from .selfcheck import SelfCheckError, self_check

        try:
            self_check(inner)
        except Exception as error:
            for config, name in previous:
                set_attn_implementation(config, name)
            if not was_hooked:
                _remove_hooks(model)
            if isinstance(error, UnsupportedModelError):
                raise
            if isinstance(error, LayoutNotAppliedError):
                raise SelfCheckError(
                    f"prefixshare cannot make {type(inner).__name__} exact: in the self-check's prefix-shared forward, "
                    f"{str(error).split(', so ')[0].removeprefix('prefixshare: ')}. The layout travels as a keyword "
                    "argument of the forward, and this model's layers do not pass their keyword arguments on to "
                    "attention. The model is left unpatched."
                ) from error
            raise SelfCheckError(
                f"prefixshare self-check failed on {type(inner).__name__}: its prefix-shared forward raised "
                f"{type(error).__name__}: {error}. The model is left unpatched."
            ) from error
        inner.__dict__.setdefault(_VERIFIED, set()).add(checked)
    return model


def _check_key(inner, backends) -> tuple:
    """What a self-check result holds for: the backends, the parameters' dtype and device type, and the autocast
    dtype in force where ``patch`` is called (a TRL drop-in patches inside the trainer's autocast). ``patch`` runs
    the self-check again for a key it has not passed (after ``model.to(torch.bfloat16)``, under autocast)."""
    weight = _reference_weight(inner)
    return tuple(sorted(backends)), weight.dtype, weight.device.type, autocast_dtype(weight.device)


def _reference_weight(inner) -> torch.Tensor:
    """The tensor whose dtype and device stand for the model's: its token embeddings, else its first parameter."""
    get = getattr(inner, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next(inner.parameters(), torch.empty(0))
    return weight


def _remove_hooks(model) -> None:
    for module in _hooked_modules(model):
        _remove_hook(module, "_forward_pre_hooks", _enter_forward)
        _remove_hook(module, "_forward_hooks", _exit_forward)


def unpatch(model):
    """Undo :func:`patch`: the original attention implementation, no hooks. Returns the model."""
    inner = unwrap_model(model)
    for config in _decoder_configs(inner):
        parsed = _parse(get_attn_implementation(config))
        if parsed is not None:
            set_attn_implementation(config, parsed[1])
    _remove_hooks(model)
    inner.__dict__.pop(_VERIFIED, None)
    return model


def is_patched(model) -> bool:
    """Whether the text decoder of ``model`` (or of the transformers model inside its wrappers) is patched."""
    inner = unwrap_model(model)
    return any(_parse(get_attn_implementation(c)) for c in _decoder_configs(inner))


def attention_kernels(model) -> set[str]:
    """The attention implementations a patched ``model`` runs: its backends for prefix-shared forwards and the
    kernels it was loaded with (for every other forward, the self-check's runs alone included)."""
    names = set()
    for config in _decoder_configs(unwrap_model(model)):
        parsed = _parse(get_attn_implementation(config))
        names.update(parsed if parsed else ())
    return names


def patched_backend(model) -> str | None:
    """The backend prefix-shared forwards of ``model`` use, or None if it is not patched."""
    inner = unwrap_model(model)
    for config in _decoder_configs(inner):
        parsed = _parse(get_attn_implementation(config))
        if parsed:
            return parsed[0]
    return None

