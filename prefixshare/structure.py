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

    Modules of a vision or audio tower are left out (their config is of another ``model_type``).
    """
    model_type = model_type or text_model_type(model)
    found = []
    for module in model.modules():
        if dispatches_attention(type(module)):
            config = getattr(module, "config", None)
            if config is None or getattr(config, "model_type", None) == model_type:
                found.append(module)
    return found


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
