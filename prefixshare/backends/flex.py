"""FlexAttention with a BlockMask built from the layout's predicate (fully masked blocks are skipped)."""

from __future__ import annotations

import functools
import warnings

import torch
from packaging.version import Version

from ..masks import block_mask
from ._common import check_shapes, isolate_nonfinite, mark_reached

# lengths padded to whole 128-token blocks (the BlockMask's block size), so batches share few shapes
ALIGNMENT = 128


def aligned_length(length: int) -> int:
    """``length`` rounded up to whole :data:`ALIGNMENT`-token blocks (what the CUDA path pads to)."""
    return -(-length // ALIGNMENT) * ALIGNMENT


def _compile_options() -> dict:
    """``torch.compile`` options for FlexAttention on this torch.

    Batch sizes and (aligned) lengths change from batch to batch. With ``dynamic=False`` every new shape
    compiles another kernel, and past dynamo's recompile limit (8) FlexAttention silently falls back to its
    unfused path, which materializes every score. The default (automatic dynamic: a dimension seen to
    change is compiled symbolically from then on) keeps the number of kernels small, as transformers
    compiles it from torch 2.6.1 on. On torch 2.5 and 2.6.0 transformers compiles with ``dynamic=False``
    (2.6.0 with "max-autotune-no-cudagraphs" for training, pytorch issue 146260), and so do we.
    """
    release = Version(torch.__version__).release[:3]
    if release < (2, 6):
        return {"dynamic": False}
    if release == (2, 6, 0):
        return {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}
    return {}


def compile_flex(**options):
    """``torch.compile(flex_attention)`` with :func:`_compile_options`; ``options`` win (tests pass a backend)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, **{**_compile_options(), **options})


@functools.cache
def _compiled_flex():
    return compile_flex()  # one compiled function for every layer and batch


def _flex_function(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention as flex

    if device.type == "cuda":
        # inside a model the user compiled, dynamo traces flex_attention itself
        return flex if torch.compiler.is_compiling() else _compiled_flex()

    @functools.wraps(flex)
    def uncompiled(*args, **kwargs):
        # off CUDA the unfused path is the point (exactness checks, forward-only use); its advice to compile is noise
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex(*args, **kwargs)

    return uncompiled


def _lse_request() -> dict:
    """The keyword that makes ``flex_attention`` also return the log-sum-exp of every query's scores."""
    from torch.nn.attention import flex_attention as module

    if hasattr(module, "AuxRequest"):  # torch >= 2.9 (return_lse is deprecated there)
        return {"return_aux": module.AuxRequest(lse=True)}
    return {"return_lse": True}


def _apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Rescale a softmax-weighted output as if one more logit per head (the sink) had been in every row.

    ``out`` [B, H, L, D_v] was normalized by ``exp(lse)``; with the sink the denominator is
    ``exp(lse) + exp(sink)``, so each row is multiplied by ``exp(lse - logaddexp(lse, sink))``. Gradients
    reach the sinks, and the scores through ``lse`` (FlexAttention differentiates its log-sum-exp).
    """
    lse = lse.float()
    factor = torch.exp(lse - torch.logaddexp(lse, sinks.float().reshape(1, -1, 1)))
    return (out.float() * factor[..., None]).to(out.dtype)


def flex_attention(
    module, query, key, value, layout, *, scaling, dropout=0.0, sliding_window=None, softcap=None, sinks=None
):
    """Shapes as in :mod:`prefixshare.backends`; on CUDA the length is padded to a multiple of 128."""
    if dropout and module.training:
        raise ValueError("prefixshare: FlexAttention has no attention dropout; set attention_dropout=0 or use eager/sdpa")
    if query.device.type == "cpu" and torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    ):
        raise NotImplementedError(
            "prefixshare: FlexAttention has no backward pass on CPU in this torch; train on CPU with "
            "prefixshare.patch(model, backend='eager') or backend='sdpa', or run FlexAttention on a GPU "
            "(forward-only use such as reference log-probs under torch.no_grad() works on CPU)"
        )
    n_rep = check_shapes(query, key)
    # masked scores are -inf whatever the key, but a masked probability 0 times an inf/NaN value is NaN in the
    # blocks the kernel computes: see isolate_nonfinite (on the unpadded layout, before the padding)
    key, value, reached = isolate_nonfinite(key, value, layout, sliding_window)
    L = query.shape[2]
    padded_length = aligned_length(L) if query.device.type == "cuda" else L
    if padded_length != L:
        pad = (0, 0, 0, padded_length - L)
        query, key, value = (torch.nn.functional.pad(t, pad) for t in (query, key, value))
        layout = layout.padded(padded_length)

    def softcapped(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    out = _flex_function(query.device)(
        query,
        key,
        value,
        score_mod=None if softcap is None else softcapped,
        block_mask=block_mask(layout, sliding_window),
        scale=scaling,
        enable_gqa=n_rep > 1,
        **({} if sinks is None else _lse_request()),
    )
    if sinks is not None:
        out, aux = out
        out = _apply_sinks(out, getattr(aux, "lse", aux), sinks)
    return mark_reached(out[:, :, :L].transpose(1, 2).contiguous(), reached), None
