"""Tiny random models of every supported architecture, built from configs in code (no hub access).

Used by the tests, the compatibility matrix, the benchmarks and the examples' offline default. The
configs keep what makes each architecture different: small sliding windows (8 tokens, so that windows
matter in short sequences), Gemma2's attention and final softcaps, grouped-query attention, Gemma3's
5:1 sliding/full pattern with per-layer-type RoPE.
"""

from __future__ import annotations

import torch

from .._compat import rope_config_kwargs


ARCHITECTURE_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")

TINY_SLIDING_WINDOW = 8

TINY_SIZES = dict(  # the sizes every tiny model shares (configs of other architectures can start from them)
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,  # a multiple of 64: bitsandbytes 4-bit CPU kernels (AVX512-BF16) need whole blocks per row
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,  # larger than usual so that random logits are far from uniform
)


def tiny_config(architecture: str, **overrides):
    """A small config of ``architecture`` (one of :data:`ARCHITECTURE_NAMES`); ``overrides`` win."""
    import transformers as tf

    w = TINY_SLIDING_WINDOW
    specific = {
        "llama": (tf.LlamaConfig, {}),
        "mistral": (tf.MistralConfig, dict(sliding_window=w)),
        "qwen2": (tf.Qwen2Config, dict(use_sliding_window=True, sliding_window=w, max_window_layers=1)),
        "qwen3": (tf.Qwen3Config, dict(use_sliding_window=True, sliding_window=w, max_window_layers=1)),
        "gemma": (tf.GemmaConfig, {}),
        "gemma2": (
            tf.Gemma2Config,
            dict(sliding_window=w, attn_logit_softcapping=2.0, final_logit_softcapping=5.0, query_pre_attn_scalar=12),
        ),
        "gemma3": (
            tf.Gemma3TextConfig,
            dict(sliding_window=w, num_hidden_layers=6, query_pre_attn_scalar=12, rope_local_base_freq=100.0),
        ),
    }
    if architecture not in specific:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURE_NAMES}")
    config_class, extra = specific[architecture]
    kwargs = {**TINY_SIZES, **extra, **overrides}
    return config_class(**kwargs)


def tiny_model(
    architecture: str,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
):
    """A randomly initialized ``*ForCausalLM`` of ``architecture`` (deterministic for ``seed``), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(architecture, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation, dtype=dtype
    )
    return model.eval()


# ---------------------------------------------------------------------------------------------- any architecture
# The compatibility matrix builds a tiny model of every decoder-only causal LM of the installed transformers from
# its config class alone: the class's defaults, with every size field it has (directly or through its
# attribute_map) set from these tables. Weights are initialized with a standard deviation of 0.1 instead of the
# usual 0.02, so that a response seeing another changes the log-probs well above float32 rounding.
TINY_TEXT_FIELDS = dict(
    vocab_size=96, hidden_size=64, d_model=64, n_embd=64, intermediate_size=128, n_inner=128, ffn_dim=128,
    decoder_ffn_dim=128, encoder_ffn_dim=128, num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2,
    decoder_layers=2, encoder_layers=2, num_attention_heads=4, n_head=4, n_heads=4, decoder_attention_heads=4,
    encoder_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, max_position_embeddings=512,
    n_positions=512,
    rotary_dim=8, moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, shared_expert_intermediate_size=32, n_group=1, topk_group=1,
    q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
    sliding_window=TINY_SLIDING_WINDOW, use_sliding_window=True, max_window_layers=1, sliding_window_pattern=2,
    no_rope_layer_interval=2, initializer_range=0.1, init_std=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    is_decoder=True, attention_dropout=0.0, hidden_dropout=0.0, dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)  # fmt: skip
TINY_VISION_FIELDS = dict(
    hidden_size=32, embed_dim=32, intermediate_size=64, num_hidden_layers=1, depth=1, num_attention_heads=2,
    num_heads=2, image_size=28, patch_size=14, out_hidden_size=64, initializer_range=0.1,
)  # fmt: skip

# what a few config classes need beyond the common fields (their validation, or a feature to exercise)
TINY_FIXES = {
    # Granite: every multiplier away from 1, so that a kernel that dropped one would show
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared"),
        dict(embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.0),
    ),
    "gemma2": dict(attn_logit_softcapping=2.0, final_logit_softcapping=5.0, query_pre_attn_scalar=12),
    # Gemma 4: full layers of their own head dim (512 by default, popped from the keywords: no field to shrink),
    # per-layer input embeddings of their own vocabulary
    **dict.fromkeys(("gemma4_unified", "gemma4_unified_text", "gemma4_unified_assistant"), dict(global_head_dim=32)),
    "gemma4_text": dict(global_head_dim=32, vocab_size_per_layer_input=96, hidden_size_per_layer_input=8),
    # LongCat-Flash's rotary embedding takes head_dim, which must then be its qk_rope_head_dim
    "longcat_flash": dict(head_dim=8),
    # validation: GPT-Neo's attention pattern must list every layer; ZAYA routes to one expert
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
    "zaya": dict(num_experts_per_tok=1),
    # Qwen2-VL-style multimodal rotary: the sections of the 3D positions (t, h, w) fill half of the head dim (16)
    **dict.fromkeys(
        ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text"),
        rope_config_kwargs(mrope_section=[2, 3, 3]),
    ),
    # DBRX keeps its attention and MoE sizes in sub-dicts; its default clip_qkv (None) fails in its own forward
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
    ),
}

# a tiny model has well under a million parameters; a config whose defaults this shrinking misses (a vision or
# audio tower of its own shape, per-layer embeddings) is reported as not built rather than allocated
TINY_MAX_PARAMETERS = 5_000_000


def _fields_of(config_class) -> set[str]:
    import inspect

    return set(inspect.signature(config_class.__init__).parameters) | set(getattr(config_class, "attribute_map", {}))


def _shrunk(config_class, table: dict, extra: dict) -> dict:
    fields = _fields_of(config_class)
    return {**{k: v for k, v in table.items() if k in fields}, **extra}


def tiny_config_of(model_type: str, **overrides):
    """A tiny config of any ``model_type`` of the installed transformers, from its config class alone.

    Every size field the class has is set from :data:`TINY_TEXT_FIELDS` (a multimodal config's text and vision
    sub-configs from the text and vision tables), then :data:`TINY_FIXES`, then ``overrides``. Where the class
    holds per-layer attention types, they alternate sliding and full when the class accepts it. MLA configs
    (``kv_lora_rank``) get as many key/value heads as query heads. Raises whatever the class raises for a
    config it does not accept.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    extra = {**TINY_FIXES.get(model_type, {}), **overrides}
    kwargs = _shrunk(config_class, TINY_TEXT_FIELDS, extra)
    if "kv_lora_rank" in kwargs:  # MLA: keys and values for every query head, RoPE on qk_rope_head_dim features
        if "num_key_value_heads" not in extra and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if "head_dim" not in extra:
            kwargs.pop("head_dim", None)
    sub_configs = getattr(config_class, "sub_configs", None) or {}
    if sub_configs:
        defaults = config_class()
        for name in sub_configs:
            sub = getattr(defaults, name, None)
            if sub is None or name in extra or not hasattr(sub, "to_dict"):
                continue
            table = TINY_TEXT_FIELDS if name == "text_config" else TINY_VISION_FIELDS
            shrunk = type(sub)(**_shrunk(type(sub), table, TINY_FIXES.get(getattr(sub, "model_type", None), {})))
            kwargs[name] = shrunk.to_dict()  # (4.57's composite configs take dicts, not config objects)
    config = _with_every_layer_kind(config_class, kwargs, config_class(**kwargs), extra)
    text = _text(config)
    types = getattr(text, "layer_types", None)
    if "layer_types" not in extra and isinstance(types, list) and len(types) == 2 and set(types) <= {
        "sliding_attention",
        "full_attention",
    } and getattr(text, "sliding_window", None) and set(types) != {"sliding_attention", "full_attention"}:
        try:  # both kinds of layer in two layers
            alternating = ["sliding_attention", "full_attention"]
            if text is config:
                config = config_class(**{**kwargs, "layer_types": alternating})
            else:
                text.layer_types = alternating
        except Exception:  # noqa: BLE001 - the class insists on its own pattern: keep it
            pass
    return config


# per-layer lists of a config that say what each layer is (attention kind, mixer, MLP kind, RoPE or not)
_LAYER_KIND_LISTS = ("layer_types", "layers_block_type", "block_types", "attention_types", "mlp_layer_types")


def _text(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _layer_kinds(config) -> dict[str, list]:
    text = _text(config)
    return {name: list(value) for name in _LAYER_KIND_LISTS if isinstance(value := getattr(text, name, None), (list, tuple))}


def _with_every_layer_kind(config_class, kwargs: dict, config, extra: dict):
    """``config``, or one with more layers if two layers lost a kind of layer the class's defaults have.

    A hybrid's default pattern may start with several layers of one kind (three linear-attention layers, then
    full attention): two layers would make a model of another architecture. The layer count then becomes the
    smallest that holds every kind of the default pattern, with the default pattern's first layers.
    """
    if "num_hidden_layers" in extra:
        return config
    default = _layer_kinds(config_class())
    tiny = _layer_kinds(config)
    missing = {name: kinds for name, kinds in default.items() if not set(map(str, kinds)) <= set(map(str, tiny.get(name, [])))}
    if not missing:
        return config
    count = max(
        max([str(k) for k in kinds].index(kind) for kind in set(map(str, kinds))) + 1 for kinds in missing.values()
    )
    count = max(count, 2)
    layered = {**kwargs, **{k: count for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in kwargs}}
    fields = _fields_of(config_class)
    for attempt in ({**layered, **{name: kinds[:count] for name, kinds in default.items() if name in fields}}, layered):
        try:
            candidate = config_class(**attempt)
        except Exception:  # noqa: BLE001 - the class derives its pattern itself: try the layer count alone
            continue
        if all(set(map(str, kinds)) <= set(map(str, _layer_kinds(candidate).get(name, []))) for name, kinds in missing.items()):
            return candidate
    return config


class TinyModelTooLarge(ValueError):
    """The shrunk config of a model type still has more than :data:`TINY_MAX_PARAMETERS` parameters."""


def tiny_model_of(
    model_type: str,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
):
    """A randomly initialized causal LM of any ``model_type`` (:func:`tiny_config_of`), in eval mode.

    The class is the one ``AutoModelForCausalLM`` maps the model type to. Raises :class:`TinyModelTooLarge`
    (after counting parameters on the meta device, allocating nothing) past :data:`TINY_MAX_PARAMETERS`.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config_of(model_type, **overrides)
    with torch.device("meta"):
        shape_only = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    count = sum(p.numel() for p in shape_only.parameters())
    if count > TINY_MAX_PARAMETERS:
        raise TinyModelTooLarge(
            f"{type(shape_only).__name__} has {count:,} parameters with the shrunk config (more than "
            f"{TINY_MAX_PARAMETERS:,}: a part of its config the tiny tables do not shrink)"
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def causal_lm_model_types() -> list[str]:
    """Every model type the installed transformers maps to a causal LM class (``AutoModelForCausalLM``), sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
