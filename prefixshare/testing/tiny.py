"""Tiny random models of every supported architecture, built from configs in code (no hub access).

Used by the tests, the compatibility matrix, the benchmarks and the examples' offline default. The
configs keep what makes each architecture different: small sliding windows (8 tokens, so that windows
matter in short sequences), Gemma2's attention and final softcaps, grouped-query attention, Gemma3's
5:1 sliding/full pattern with per-layer-type RoPE.
"""

from __future__ import annotations

import torch


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
