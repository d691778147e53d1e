"""Variable-length causal attention (FlashAttention-class): one kernel call per layer, no dense mask.

The layout becomes independent causal sequences (:meth:`PrefixShareLayout.varlen_sequences`): the first
response with its prompt, and every later response as queries over ``[prompt K/V | its own K/V]``, the
prompt's keys and values gathered in front of it. Causal masking aligned bottom-right gives exactly the
layout's rule; gradients reach the prompt's K/V through the gather. Key index within a sequence equals the
logical position, so a sliding window W is the kernel's left window W - 1.

Kernels. On a CUDA device in half precision, the first installed kernel of this list that runs on the GPU and
applies every feature of the call (sliding window, logit softcap, softmax scale) wins:

- FlashAttention-3, ``flash_attn_interface.flash_attn_varlen_func``: Hopper (sm90) only;
- FlashAttention-4, ``flash_attn.cute.flash_attn_varlen_func``: Hopper and Blackwell (sm90, sm100, sm110); after
  FA3 on Hopper, where FA3 is the established kernel;
- flash-attn 2, ``flash_attn.flash_attn_varlen_func``, from 2.3 (``window_size``): 2.0 took the same arguments
  otherwise but aligned its causal mask top-left, which would let a later response see nothing of its prompt;
- torch's ``torch.nn.attention.varlen.varlen_attn``: with ``enable_gqa`` as is; without it (torch 2.11: ``scale``
  and ``window_size`` only) with each key/value head repeated for its query group; torch 2.10's first version
  (``is_causal``, no scale or window) likewise, at its fixed scale 1/sqrt(head dim) and without windows.

Each is recognised by its signature, never by a version string, and called with keywords only (positional orders
changed between releases: FA4 put ``qv`` fourth, an FA3 beta took ``seqused_q`` sixth). The flash kernels take
``causal=True`` and the window ``(W - 1, 0)`` (no window: -1 for FA2/FA3, None for FA4, whose early releases
read -1 as a window); torch's takes no causal flag: ``window_size=(-1, 0)`` is its causal mask, ``(W - 1, 0)``
causal with a window (both aligned bottom-right, as flash-attn's). Logit softcaps: FA2 >= 2.6, FA3 releases with
``softcap``, FA4; torch's has none. Grouped-query heads: native in every kernel but torch's without
``enable_gqa``. A feature a kernel lacks is never dropped: the call goes to the next kernel that applies it, and
where no installed kernel does, it raises ValueError naming each one and what it lacks (``patch`` refuses a
softcap model there before any forward). Without any CUDA kernel (CPU; float32 on CUDA) a reference loop over
the sequences with SDPA runs (:func:`reference_varlen`); it defines the semantics the kernels are tested against.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ._common import check_shapes, isolate_nonfinite, mark_reached


# ================================================================================================ installed kernels
# Each lookup returns the kernel function, or None where its package is not installed or fails to import (a
# missing CUDA library, a CUTLASS DSL without a driver): the next kernel of the list runs then.
@functools.cache
def _flash_attn_3_varlen():
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


@functools.cache
def _flash_attn_4_varlen():
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@dataclass(frozen=True)
class VarlenKernel:
    """One installed variable-length kernel, as recognised from its signature.

    ``call(fn, q, k, v, seq, scale=, window_left=, softcap=)`` calls ``fn`` with the keywords its signature has;
    the flags say what it applies (``scale``: any softmax scale, else only 1/sqrt(head dim); ``gqa``: fewer
    key/value heads than query heads, else :meth:`run` repeats them).
    """

    name: str
    fn: Callable
    call: Callable
    window: bool
    softcap: bool
    scale: bool = True
    gqa: bool = True

    def missing(
        self, *, window_left: int, softcap: float | None, scale: float | None, head_dim: int | None
    ) -> list[str]:
        """What of the call this kernel cannot apply ([] if nothing); ``scale=None``: not asked."""
        lacking = []
        if window_left >= 0 and not self.window:
            lacking.append("a sliding window")
        if softcap is not None and not self.softcap:
            lacking.append("an attention logit softcap")
        if scale is not None and not self.scale and not math.isclose(scale, head_dim**-0.5, rel_tol=1e-9):
            lacking.append(f"a softmax scale other than 1/sqrt(head dim) ({scale:g} for head dim {head_dim})")
        return lacking

    def run(self, q, k, v, seq, *, scale: float, window_left: int, softcap: float | None) -> torch.Tensor:
        """``q`` ``[Tq, H, D]``, ``k``, ``v`` ``[Tk, H_kv, D]`` -> ``[Tq, H, D]``; raises ValueError for a feature
        the kernel lacks, RuntimeError for an output other than the documented one."""
        lacking = self.missing(window_left=window_left, softcap=softcap, scale=scale, head_dim=q.shape[-1])
        if lacking:
            raise ValueError(f"prefixshare: {self.name} cannot apply {' or '.join(lacking)}; {_REMEDY}")
        if not self.gqa and k.shape[1] != q.shape[1]:
            # query head h reads key/value head h // (H / H_kv), as the kernels' own grouped-query heads do
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        q, k, v = (t.contiguous() for t in (q, k, v))
        result = self.call(self.fn, q, k, v, seq, scale=scale, window_left=window_left, softcap=softcap)
        out = result[0] if isinstance(result, (tuple, list)) else result  # FA4, early FA3: (out, lse)
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise RuntimeError(
                f"prefixshare: {self.name} returned {got}, not the attention output {tuple(q.shape)} {q.dtype}"
            )
        return out


_REMEDY = (
    "install a kernel that applies it (flash-attn >= 2.6, FlashAttention-3 or FlashAttention-4 apply windows and "
    "softcaps) or use another backend: prefixshare.patch(model, backend='flex_attention') or 'eager' ('sdpa' "
    "where the model has no softcap)"
)


def _parameters(fn) -> dict | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _takes(parameters: dict, needed: set[str], optional: set[str]) -> bool:
    """Whether a kernel with ``parameters`` takes every name in ``needed`` as a keyword and requires nothing else
    than ``needed | optional`` (the names this module passes)."""
    keyword = {
        name for name, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    required = {
        name for name, p in parameters.items()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    return needed <= keyword and required <= needed | optional


_FLASH_NAMES = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
_TORCH_NAMES = ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")


def _keywords(names, q, k, v, seq, *, with_max: bool = True) -> dict:
    """The tensors and lengths of a call under the kernel's own argument ``names`` (in ``_FLASH_NAMES``' order)."""
    values = (q, k, v, seq.cu_seqlens_q, seq.cu_seqlens_k, seq.max_seqlen_q, seq.max_seqlen_k)
    return dict(zip(names, values if with_max else values[:5]))


def _flash_call(*, window: bool, no_window, with_max: bool = True) -> Callable:
    """The call of a flash kernel (FA2, FA3, FA4): keyword arguments under flash-attn's names, ``causal=True``, the
    window ``(W - 1, 0)`` where it takes one (``no_window``: what means no window, -1 or FA4's None), the softcap
    where the model has one, ``max_seqlen_*`` where it takes them."""

    def call(fn, q, k, v, seq, *, scale, window_left, softcap):
        kwargs = _keywords(_FLASH_NAMES, q, k, v, seq, with_max=with_max)
        kwargs.update(softmax_scale=scale, causal=True)
        if window:
            kwargs["window_size"] = (no_window if window_left < 0 else window_left, 0)
        if softcap is not None:
            kwargs["softcap"] = softcap
        return fn(**kwargs)

    return call


@functools.lru_cache(maxsize=None)
def _recognise_flash_attn_3(fn) -> VarlenKernel | None:
    """``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...,
    softmax_scale=None, causal=False, ..., window_size=(-1, -1), ..., softcap=0.0, ...)``: windows since Aug 2024,
    softcaps since Jan 2025; returns ``out`` from July 2025 (``(out, lse)`` before, and with
    ``return_attn_probs=True``). Causal masks align bottom-right in every release; GQA native."""
    parameters = _parameters(fn) if fn is not None else None
    if parameters is None:
        return None
    has_window, has_softcap = "window_size" in parameters, "softcap" in parameters
    needed = {*_FLASH_NAMES, "softmax_scale", "causal"}
    if not _takes(parameters, needed, {"window_size", "softcap"}):
        return None
    call = _flash_call(window=has_window, no_window=-1)
    name = "FlashAttention-3 (flash_attn_interface.flash_attn_varlen_func)"
    return VarlenKernel(name, fn, call, has_window, has_softcap)


@functools.lru_cache(maxsize=None)
def _recognise_flash_attn_4(fn) -> VarlenKernel | None:
    """``flash_attn_varlen_func(q, k, v, [qv,] cu_seqlens_q=None, cu_seqlens_k=None, [max_seqlen_q=None,
    max_seqlen_k=None,] ..., softmax_scale=None, causal=False, window_size=(None, None), ..., softcap=0.0, ...)``
    -> ``(out, lse)``. ``max_seqlen_*`` arrived in 2026 (passed where taken); None means no window."""
    parameters = _parameters(fn) if fn is not None else None
    if parameters is None:
        return None
    has_window, has_softcap = "window_size" in parameters, "softcap" in parameters
    with_max = {"max_seqlen_q", "max_seqlen_k"} <= parameters.keys()
    needed = {"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "softmax_scale", "causal"}
    if not _takes(parameters, needed, {"max_seqlen_q", "max_seqlen_k", "window_size", "softcap"}):
        return None
    call = _flash_call(window=has_window, no_window=None, with_max=with_max)
    name = "FlashAttention-4 (flash_attn.cute.flash_attn_varlen_func)"
    return VarlenKernel(name, fn, call, has_window, has_softcap)


@functools.lru_cache(maxsize=None)
def _recognise_flash_attn_2(fn) -> VarlenKernel | None:
    """``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, ...)`` -> ``out``. ``window_size`` (2.3)
    is required: it is what tells a release whose causal mask aligns bottom-right (2.1 on) from 2.0's top-left
    one; ``softcap`` arrived in 2.6. GQA native."""
    parameters = _parameters(fn) if fn is not None else None
    if parameters is None:
        return None
    has_softcap = "softcap" in parameters
    needed = {*_FLASH_NAMES, "softmax_scale", "causal", "window_size"}
    if not _takes(parameters, needed, {"softcap"}):
        return None
    call = _flash_call(window=True, no_window=-1)
    return VarlenKernel("flash-attn 2 (flash_attn.flash_attn_varlen_func)", fn, call, True, has_softcap)


@functools.lru_cache(maxsize=None)
def _recognise_torch_varlen(fn) -> VarlenKernel | None:
    """``varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
    window_size=(-1, -1)[, enable_gqa=False, ...])`` -> ``out`` (torch 2.11; ``enable_gqa`` later), or torch
    2.10's ``varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)``.
    Without ``enable_gqa`` key and value take as many heads as the query. No softcap."""
    parameters = _parameters(fn) if fn is not None else None
    if parameters is None:
        return None
    needed = set(_TORCH_NAMES)
    gqa = "enable_gqa" in parameters
    if {"scale", "window_size"} <= parameters.keys() and _takes(parameters, needed | {"scale", "window_size"}, set()):

        def call(fn, q, k, v, seq, *, scale, window_left, softcap):
            kwargs = _keywords(_TORCH_NAMES, q, k, v, seq)
            # exactly the tuple (-1, 0) is causal (varlen_attn compares window_size == (-1, 0)); (W - 1, 0) is
            # causal with a window, aligned bottom-right as flash-attn's
            kwargs.update(scale=scale, window_size=(window_left, 0))
            if gqa:
                kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
            return fn(**kwargs)

        variant = "" if gqa else ", without enable_gqa: key/value heads repeated"
        return VarlenKernel(f"torch's varlen_attn (torch.nn.attention.varlen{variant})", fn, call, True, False, gqa=gqa)
    if "is_causal" in parameters and _takes(parameters, needed | {"is_causal"}, set()):

        def call(fn, q, k, v, seq, *, scale, window_left, softcap):
            return fn(**_keywords(_TORCH_NAMES, q, k, v, seq), is_causal=True)

        return VarlenKernel(
            "torch 2.10's varlen_attn (torch.nn.attention.varlen: is_causal only)", fn, call, False, False,
            scale=False, gqa=False,
        )
    return None


def _installed(capability: tuple[int, int]) -> list[VarlenKernel]:
    """The recognised kernels that run on a GPU of ``capability``, in order of preference."""
    major = capability[0]
    found = []
    if major == 9:
        found.append(_recognise_flash_attn_3(_flash_attn_3_varlen()))
    if major in (9, 10, 11):
        found.append(_recognise_flash_attn_4(_flash_attn_4_varlen()))
    found.append(_recognise_flash_attn_2(_flash_attn_varlen()))
    found.append(_recognise_torch_varlen(_torch_varlen()))
    return [kernel for kernel in found if kernel is not None]


def _capability(device: torch.device, dtype: torch.dtype) -> tuple[int, int] | None:
    """The compute capability of the GPU the CUDA kernels would run on; None where only the reference runs
    (not CUDA, or not half precision: the flash kernels take float16 and bfloat16)."""
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    return torch.cuda.get_device_capability(device)


def select_kernel(
    device, dtype, *, window_left: int = -1, softcap: float | None = None, scale: float | None = None,
    head_dim: int | None = None,
) -> VarlenKernel | None:
    """The kernel a call on ``device`` in ``dtype`` with these features runs: the first installed one that applies
    them all; None where none is installed for it (the reference runs). Raises ValueError where kernels are
    installed but none applies every feature, naming each and what it lacks."""
    capability = _capability(device, dtype)
    if capability is None:
        return None
    kernels = _installed(capability)
    if not kernels:
        return None
    reasons = []
    for kernel in kernels:
        lacking = kernel.missing(window_left=window_left, softcap=softcap, scale=scale, head_dim=head_dim)
        if not lacking:
            return kernel
        reasons.append(f"{kernel.name} cannot apply {' or '.join(lacking)}")
    raise ValueError(
        f"prefixshare: no installed variable-length CUDA kernel applies this model's attention ({'; '.join(reasons)}); "
        + _REMEDY
    )


def refuse_missing_kernel_features(device, dtype, *, softcap: bool) -> None:
    """``patch``'s refusal before any forward: raise ValueError where a forward on ``device`` in ``dtype`` would
    reach CUDA kernels none of which applies a logit softcap (torch's varlen_attn, flash-attn < 2.6)."""
    if softcap:
        select_kernel(device, dtype, softcap=1.0)


def has_cuda_varlen_kernel() -> bool:
    """Whether a CUDA variable-length kernel is installed that runs on this machine's GPU (any GPU where none is
    visible); without one every device runs :func:`reference_varlen`, a loop for exactness, not speed."""
    if torch.cuda.is_available():
        return bool(_installed(torch.cuda.get_device_capability()))
    return bool(_installed((9, 0)))  # every kernel this module knows runs on Hopper


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
    """``q`` ``[Tq, H, D]``, ``k``, ``v`` ``[Tk, H_kv, D]`` through the kernel :func:`select_kernel` picks, else
    through the reference."""
    kernel = select_kernel(
        q.device, q.dtype, window_left=window_left, softcap=softcap, scale=scale, head_dim=q.shape[-1]
    )
    if kernel is None:
        return reference_varlen(
            q, k, v, seq, scale=scale, window_left=window_left, softcap=softcap, enable_gqa=enable_gqa
        )
    return kernel.run(q, k, v, seq, scale=scale, window_left=window_left, softcap=softcap)


def varlen_attention(
    module, query, key, value, layout, *, scaling, dropout=0.0, sliding_window=None, softcap=None, sinks=None
):
    """Shapes as in :mod:`prefixshare.backends`; padding positions come out as zeros."""
    if dropout and module.training:
        raise ValueError("prefixshare: the varlen backend has no attention dropout; set attention_dropout=0")
    if sinks is not None:
        raise ValueError(
            "prefixshare: the varlen backend cannot apply this model's attention sinks (GPT-OSS): of its kernels only "
            "FlashAttention-4 takes sinks, and this backend does not pass them; use prefixshare.patch(model, "
            "backend='eager'), 'sdpa' or 'flex_attention'"
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
