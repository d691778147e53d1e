"""Variable-length causal attention (FlashAttention-class): one kernel call per layer, no dense mask.

The layout becomes independent causal sequences (:meth:`PrefixShareLayout.varlen_sequences`): the first
response with its prompt, and every later response as queries over ``[prompt K/V | its own K/V]``, the
prompt's keys and values gathered in front of it. Causal masking aligned bottom-right (FlashAttention
>= 2.1 and torch's varlen kernel) gives exactly the layout's rule; gradients reach the prompt's K/V
through the gather. Key index within a sequence equals the logical position, so a sliding window W is
the kernel's left window W - 1.

Kernels, first available wins: ``flash_attn.flash_attn_varlen_func`` (CUDA, has softcap),
``torch.nn.attention.varlen.varlen_attn`` (CUDA, half precision), and a reference loop over
sequences with SDPA (CPU, float32 on CUDA) that defines the semantics the kernels are tested against.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ._common import check_shapes, isolate_nonfinite, mark_reached


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    # softcap arrived in flash-attn 2.6, window_size in 2.3
    if not {"softcap", "window_size"} <= inspect.signature(flash_attn_varlen_func).parameters.keys():
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    # torch 2.10's first varlen_attn has only is_causal: no scale, window or grouped-query heads
    if not {"scale", "window_size", "enable_gqa"} <= inspect.signature(varlen_attn).parameters.keys():
        return None
    return varlen_attn


def has_cuda_varlen_kernel() -> bool:
    """Whether a CUDA variable-length kernel is installed (else every device runs :func:`reference_varlen`)."""
    return _flash_attn_varlen() is not None or _torch_varlen() is not None


def reference_varlen(q, k, v, seq, *, scale, window_left, softcap, enable_gqa):
    """Bottom-right-aligned causal attention over each sequence, one SDPA (or explicit) call per sequence.

    q: ``[Tq, H, D]``; k, v: ``[Tk, H_kv, D]``; returns ``[Tq, H, D]``.
    """
    outputs = []
    cu_q, cu_k = seq.cu_seqlens_q.tolist(), seq.cu_seqlens_k.tolist()
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s] : cu_q[s + 1]].transpose(0, 1)  # [H, sq, D]
        ks = k[cu_k[s] : cu_k[s + 1]].transpose(0, 1)
        vs = v[cu_k[s] : cu_k[s + 1]].transpose(0, 1)
        sq, sk = qs.shape[1], ks.shape[1]
        # query i sits at key index i + (sk - sq): bottom-right alignment
        diagonal = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        key_idx = torch.arange(sk, device=q.device)[None, :]
        allowed = key_idx <= diagonal
        if window_left >= 0:
            allowed = allowed & (key_idx >= diagonal - window_left)
        if softcap is None:
            out = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa
            )
        else:
            n_rep = qs.shape[0] // ks.shape[0]
            ks, vs = ks.repeat_interleave(n_rep, 0), vs.repeat_interleave(n_rep, 0)
            scores = torch.tanh(qs @ ks.transpose(1, 2) * scale / softcap) * softcap
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qs.dtype) @ vs
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def _run_kernel(q, k, v, seq, *, scale, window_left, softcap, enable_gqa):
    half = q.dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and half and _flash_attn_varlen() is not None:
        return _flash_attn_varlen()(
            q, k, v, seq.cu_seqlens_q, seq.cu_seqlens_k, seq.max_seqlen_q, seq.max_seqlen_k,
            softmax_scale=scale, causal=True, window_size=(window_left, 0), softcap=softcap or 0.0,
        )
    if q.is_cuda and half and softcap is None and _torch_varlen() is not None:
        # window (-1, 0) is causal; causal masks with seqlen_q < seqlen_k align bottom-right
        return _torch_varlen()(
            q, k, v, seq.cu_seqlens_q, seq.cu_seqlens_k, seq.max_seqlen_q, seq.max_seqlen_k,
            scale=scale, window_size=(window_left, 0), enable_gqa=enable_gqa,
        )
    return reference_varlen(q, k, v, seq, scale=scale, window_left=window_left, softcap=softcap, enable_gqa=enable_gqa)


def varlen_attention(
    module, query, key, value, layout, *, scaling, dropout=0.0, sliding_window=None, softcap=None, sinks=None
):
    """Shapes as in :mod:`prefixshare.backends`; padding positions come out as zeros."""
    if dropout and module.training:
        raise ValueError("prefixshare: the varlen backend has no attention dropout; set attention_dropout=0")
    if sinks is not None:
        raise ValueError(
            "prefixshare: the varlen backend cannot apply this model's attention sinks (GPT-OSS): flash-attn's "
            "varlen kernels have no sink; use prefixshare.patch(model, backend='eager'), 'sdpa' or 'flex_attention'"
        )
    n_rep = check_shapes(query, key)
    # each sequence holds only keys its queries may see, but causally masked later keys of its own response (and,
    # in a unit's first sequence, the first response's keys for the prompt's queries) sit in the same blocks:
    # 0 times an inf/NaN value is NaN there, so key/value vectors holding one are zeroed first; the padding is never
    # gathered, and queries that see a zeroed vector come out NaN (see isolate_nonfinite)
    key, value, reached = isolate_nonfinite(key, value, layout, sliding_window)
    B, H, L, D = query.shape
    H_kv = key.shape[1]
    D_v = value.shape[-1]
    if D_v != D:
        # multi-head latent attention (DeepSeek): the kernels take one head dim. Zero features change no score
        # (queries and keys) and add nothing to the output (values, cut off again below); the scale is explicit
        D = max(D, D_v)
        query, key, value = (torch.nn.functional.pad(t, (0, D - t.shape[-1])) for t in (query, key, value))
    seq = layout.varlen_sequences()
    q = query.transpose(1, 2).reshape(B * L, H, D)[seq.query_index]
    k = key.transpose(1, 2).reshape(B * L, H_kv, D)[seq.key_index]
    v = value.transpose(1, 2).reshape(B * L, H_kv, D)[seq.key_index]
    out = _run_kernel(
        q, k, v, seq,
        scale=scaling,
        window_left=-1 if sliding_window is None else sliding_window - 1,
        softcap=softcap,
        enable_gqa=n_rep > 1,
    )
    out = out[..., :D_v]
    result = out.new_zeros(B * L, H, D_v).index_copy(0, seq.query_index, out)
    return mark_reached(result.view(B, L, H, D_v), reached), None
