"""What a model is made of, read from its modules: the facts ``patch`` decides support by.

A prefix-shared batch is exact only if every way tokens of the text decoder mix is attention that goes
through transformers' ``AttentionInterface`` (where the layout's mask is applied). These helpers find
those attention modules, the decoder layers, and any other token mixer (a convolution over the sequence,
a state-space or linear-attention recurrence), which reads physically adjacent tokens and so lets a
response see the one before it, whatever the attention mask says.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

from torch import nn

from ._compat import text_config

# names of the parameters that carry a recurrent state's decay in state-space and linear-attention mixers
# (Mamba/Mamba2 as in Jamba, Bamba, NemotronH, Falcon-H1, Granite-4 hybrids; Qwen3-Next's gated delta net)
_RECURRENCE_PARAMETERS = ("A_log", "dt_bias")


def unwrap_model(model):
    """The transformers model inside DDP / FSDP1 / DeepSpeed / peft wrappers (FSDP2 keeps the class)."""
    import torch

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


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no dropout) for the duration, then every module's own training flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@functools.cache
def dispatches_attention(cls: type) -> bool:
    """Whether ``cls.forward`` looks its kernel up in transformers' ``ALL_ATTENTION_FUNCTIONS``.

    That lookup is what routes a module's attention through the implementation ``patch`` registers; a
    module that computes attention itself would ignore the layout.
    """
    forward = getattr(cls, "forward", None)
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def text_model_type(model) -> str | None:
    """``model_type`` of the text decoder of ``model`` (a transformers model or a wrapper around one)."""
    config = getattr(unwrap_model(model), "config", None)
    return None if config is None else getattr(text_config(config), "model_type", None)


def text_attention_modules(model, model_type: str | None = None) -> list[nn.Module]:
    """The attention modules of the text decoder inside ``model`` that dispatch through the interface.

    Modules of a vision or audio tower are left out (their config is of another ``model_type``), and so is
    cross-attention to an encoder (:func:`is_cross_attention`).
    """
    model_type = model_type or text_model_type(model)
    found = []
    for name, module in model.named_modules():
        if dispatches_attention(type(module)) and not is_cross_attention(name):
            config = getattr(module, "config", None)
            if config is None or getattr(config, "model_type", None) == model_type:
                found.append(module)
    return found


# attribute names under which a decoder layer holds attention over an encoder's states (Bart, Whisper, Marian...)
_CROSS_ATTENTION_NAMES = ("encoder_attn", "cross_attn", "crossattention", "cross_attention")


def is_cross_attention(qualified_name: str) -> bool:
    """Whether the module at ``qualified_name`` attends to an encoder's states. A decoder used as a causal LM
    alone never calls it (there are no encoder states), so it is not one of the layers the layout must reach;
    called with encoder states, the prefix-shared kernels refuse it (keys of another length than the queries)."""
    return qualified_name.rpartition(".")[2].lower() in _CROSS_ATTENTION_NAMES


def decoder_layers(model) -> list[nn.Module]:
    """The text decoder's layers: the first ``nn.ModuleList`` of ``num_hidden_layers`` modules holding no
    attention of another model (a vision tower's). Empty if no such list exists."""
    inner = unwrap_model(model)
    config = text_config(inner.config)
    count = getattr(config, "num_hidden_layers", None)
    model_type = getattr(config, "model_type", None)
    for module in inner.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            foreign = any(
                dispatches_attention(type(m)) and getattr(getattr(m, "config", None), "model_type", model_type) != model_type
                for m in module.modules()
            )
            if not foreign:
                return list(module)
    return []


def _other_mixer(layer: nn.Module) -> tuple[str, str] | None:
    """``(module class, what it is)`` of a token mixer other than attention inside ``layer``, or None."""
    modules = dict(layer.named_modules())
    for name, module in modules.items():
        if isinstance(module, nn.Conv1d):
            owner = modules.get(name.rpartition(".")[0], module) if "." in name else layer if name else module
            return type(owner).__name__, "a convolution over the sequence"
        own = {parameter for parameter, _ in module.named_parameters(recurse=False)}
        if own & set(_RECURRENCE_PARAMETERS):
            return type(module).__name__, "a state-space / linear-attention recurrence"
    return None


def token_mixing_problems(model) -> list[str]:
    """Why an attention mask cannot make ``model`` exact, one line per kind of offending layer; [] if none.

    A decoder layer fails if it holds a convolution over the sequence or a recurrent state (LFM2's short
    convolutions, Mamba/SSM layers, linear attention), or if it has no attention module that goes through
    transformers' ``AttentionInterface``. Such a mixer reads the tokens physically before it, so in
    ``[prompt | chosen | rejected]`` the rejected response would read the chosen one.
    """
    inner = unwrap_model(model)
    model_type = text_model_type(inner)
    attention = {id(m) for m in text_attention_modules(inner, model_type)}
    layers = decoder_layers(inner)
    units = [(i, layer) for i, layer in enumerate(layers)] or [(None, inner)]
    by_kind: dict[tuple[str, str, str], list] = {}
    for index, layer in units:
        mixer = _other_mixer(layer)
        if mixer is not None:
            kind = (type(layer).__name__, mixer[0], f"mix{{s}} tokens through {mixer[0]} ({mixer[1]})")
        elif index is not None and not any(id(m) in attention for m in layer.modules()):
            kind = (type(layer).__name__, "", "ha{ve} no attention module that goes through transformers' AttentionInterface")
        else:
            continue
        by_kind.setdefault(kind, []).append(index)
    lines = []
    for (layer_class, _, why), indices in by_kind.items():
        plural = len(indices) > 1
        where = f"decoder layer{'s' if plural else ''} {', '.join(map(str, indices))}" if indices[0] is not None else "the model"
        lines.append(f"{where} ({layer_class}) {why.format(s='' if plural else 'es', ve='ve' if plural else 's')}")
    return lines


# ---------------------------------------------------------------------------------------------- attention
# kinds of attention layer (``config.layer_types``) the kernels apply: causal attention over the whole unit, or
# over a window of logical positions (the window comes with each call as ``sliding_window``)
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")

# what other attention layer types do, for the refusal message
_LAYER_TYPE_WHY = {
    "chunked_attention": "attention within fixed chunks of physical positions (Llama 4), applied only through "
    "the model's own mask",
    **dict.fromkeys(
        ("indexed_attention", "deepseek_sparse_attention"),  # (the second: its name in transformers 5.17)
        "sparse attention over keys an indexer selects from the physical sequence (DeepSeek sparse attention)",
    ),
    "heavily_compressed_attention": "attention over keys compressed from blocks of the physical sequence",
}


def attention_layer_type(module: nn.Module) -> str | None:
    """The ``layer_types`` entry of an attention module's layer (``"sliding_attention"``...), or None if unknown."""
    layer_type = getattr(module, "layer_type", None)
    if isinstance(layer_type, str):
        return layer_type
    config, index = getattr(module, "config", None), getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    if isinstance(index, int) and isinstance(types, (list, tuple)) and 0 <= index < len(types):
        return types[index] if isinstance(types[index], str) else None
    return None


@functools.cache
def _builds_sliding_window_masks(cls: type) -> bool:
    """Whether the modeling file of ``cls`` builds sliding-window masks (its model's forward does)."""
    import sys

    try:
        return "create_sliding_window_causal_mask" in inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return False


def mask_only_window(module: nn.Module) -> int | None:
    """The sliding window the model's own mask applies to ``module``'s layer when its attention call passes none.

    A layer typed ``sliding_attention`` (Qwen2-MoE), or any layer of a model without layer types whose modeling
    file builds sliding-window masks from ``config.sliding_window`` (PhiMoE): the window the model's mask would
    have applied, which the layout's kernels must apply instead. None when no window applies; ``-1`` when the
    layer is typed sliding but no window can be found.
    """
    config = getattr(module, "config", None)
    layer_type = attention_layer_type(module)
    configured = getattr(config, "sliding_window", None)
    if layer_type == "sliding_attention":
        window = getattr(module, "sliding_window", None) or configured
        return window if isinstance(window, int) else -1
    if layer_type is None and isinstance(configured, int) and _builds_sliding_window_masks(type(module)):
        return configured
    return None


@functools.cache
def _passes_sinks(cls: type) -> bool:
    try:
        return "s_aux" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _softcap_of(module: nn.Module):
    for owner in (module, getattr(module, "config", None)):
        value = getattr(owner, "attn_logit_softcapping", None)
        if value is not None:
            return value
    return None


def attention_features(model) -> dict[str, list[str]]:
    """The attention features of the text decoder that not every kernel applies: ``{feature: [module class]}``.

    Features (names as in ``prefixshare.backends.FEATURES``): ``"attention sinks"`` (a learned per-head logit
    in every softmax row, passed as ``s_aux``: GPT-OSS), ``"attention logit softcap"`` (Gemma2).
    """
    found: dict[str, list[str]] = {}
    for module in text_attention_modules(unwrap_model(model)):
        name = type(module).__name__
        if _passes_sinks(type(module)):
            found.setdefault("attention sinks", []).append(name)
        if _softcap_of(module) is not None:
            found.setdefault("attention logit softcap", []).append(name)
    return {feature: sorted(set(names)) for feature, names in found.items()}


def attention_problems(model) -> list[str]:
    """Why the text decoder's attention layers cannot be made exact, one line per kind; [] if none.

    A layer whose type (``config.layer_types``) is neither full nor sliding-window attention is refused
    (chunked attention, indexer-selected sparse attention, compressed keys): its rule is applied by the model's
    own mask or indexer on physical positions, which the layout replaces.
    """
    by_type: dict[tuple[str, str], list] = {}
    for module in text_attention_modules(unwrap_model(model)):
        layer_type = attention_layer_type(module)
        if layer_type is not None and layer_type not in ATTENTION_LAYER_TYPES:
            by_type.setdefault((layer_type, type(module).__name__), []).append(getattr(module, "layer_idx", "?"))
    lines = []
    for (layer_type, name), indices in by_type.items():
        why = _LAYER_TYPE_WHY.get(layer_type, "an attention rule the kernels do not apply")
        plural = "s" if len(indices) > 1 else ""
        lines.append(
            f"{layer_type!r} layer{plural} {', '.join(map(str, indices))} ({name}): {why}; prefixshare applies "
            f"{' and '.join(ATTENTION_LAYER_TYPES)} layers"
        )
    return lines


def learned_position_table(model) -> tuple[str, int] | None:
    """``(module name, max_position_embeddings)`` of a learned absolute position table (GPT-2's ``wpe``, OPT's
    offset table): an ``nn.Embedding`` other than the token embeddings with ``max_position_embeddings`` rows (up
    to 2 more, OPT's offset). Positions at or past the limit index past it (an IndexError that names nothing);
    rotary models have no such table and None is returned."""
    inner = unwrap_model(model)
    limit = getattr(text_config(inner.config), "max_position_embeddings", None)
    get = getattr(inner, "get_input_embeddings", None)
    tokens = get() if callable(get) else None
    if not isinstance(limit, int) or limit <= 0:
        return None
    for name, module in inner.named_modules():
        if isinstance(module, nn.Embedding) and module is not tokens and limit <= module.num_embeddings <= limit + 2:
            return name, limit
    return None
