"""The log-prob engine: per-response (and per-token) log-probs of a batch, never building ``[T, V]`` logits.

``model(**batch).logits`` is ``[B, L, V]``; even restricted to the ``T`` positions that predict response
tokens, ``[T, V]`` is the largest activation of a preference step at a 128k-262k vocabulary.
:func:`response_logps` runs the model's forward with the LM head's input narrowed to nothing (hooks
on the LM head capture the ``[T, H]`` hidden states that predict response tokens), then feeds those rows
through the model's OWN LM head module ``chunk`` rows at a time. Each chunk is fused with the model's
final logit processing (Gemma2/3's softcap, Cohere's ``logit_scale``, Granite's ``logits_scaling``: see
:func:`logit_processing`), the float32 log-softmax, the gather of the target token and the optional
per-token statistics, so at most one ``[chunk, V]`` block exists at a time, in forward and in backward:

* LM head frozen (LoRA, QLoRA, a reference model, no grad): each chunk's gradient with respect to its
  hidden rows is computed right away in the forward (a token's log-prob depends on its own row only),
  and the backward multiplies it by the incoming gradient. No recompute, nothing ``[chunk, V]`` kept.
* LM head trainable (full fine-tuning, tied embeddings, a LoRA adapter on ``lm_head``): each chunk runs
  under ``torch.utils.checkpoint``; its backward recomputes that chunk's LM head call (one extra
  ``[chunk, H] x [H, V]`` matmul per chunk) and writes the gradient of the logits into the recomputed
  block in place; each chunk's ``[V, H]`` weight gradient is summed into the weight's by autograd (one
  more ``[V, H]`` block at a time).

The LM head is called as a module, so peft adapters on it, FSDP/ZeRO-3 parameter gathering (their module
hooks) and mixed-precision autocast keep working. Every model forward of the engine goes through
:func:`_run_model`.

What a chunked call costs under FSDP2: with the usual recipe (``fully_shard`` per decoder layer, then the
root) the LM head belongs to the root, whose parameters FSDP2 keeps gathered from the forward until its
post-backward, so the chunks cost no communication at all (the engine calls the head after the forward,
while they are still gathered). A root sharded with ``reshard_after_forward=True`` (a reference model, say)
is gathered once for all chunks with ``FSDPModule.unshard()`` and resharded after them, or, when a
trainable head needs its weight again in the backward's recompute, by FSDP2's post-backward: one all-gather
per call, never one per chunk. An LM head gathered by its own wrapper on every call (an FSDP2 or FSDP1 unit
of its own, DeepSpeed ZeRO-3) cannot be called per chunk: the number of chunks follows each rank's response
tokens, so the ranks' collectives would no longer match. For such a head the model calls it once on all
``T`` rows, as before (``[T, V]`` logits in the model's dtype), the fused log-softmax and statistics still
run in chunks, and a warning says so: shard the LM head with its parent to get the chunked head.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from ._compat import text_config
from .layout import input_ids_of, layout_of
from .logps import ResponseLogps, sum_per_response, token_index_of
from .patch import expect_layout_applied
from .precision import autocast_as, autocast_dtype
from .structure import unwrap_model

__all__ = ["STATS", "LogitProcessing", "ResponseLogps", "logit_processing", "response_logps"]

STATS = ("entropy", "logsumexp", "argmax_match", "mean_logit", "log_sum_sq_probs")
"""Per-token statistics :func:`response_logps` can compute in its chunk pass (float32, no gradient; the entropy's
with ``entropy_grad=True``):

* ``entropy``: ``-sum_v p_v log p_v`` of the token's predictive distribution;
* ``logsumexp``: ``log sum_v exp(z_v)`` of the (processed, float32) logits ``z``;
* ``argmax_match``: 1.0 where the first maximal logit is the target token, else 0.0;
* ``mean_logit``: the mean of ``z`` over the vocabulary;
* ``log_sum_sq_probs``: ``log sum_v p_v^2`` (the log-probability that two samples of the token's
  distribution agree; WPO's weights divide each token's probability by it).
"""

DEFAULT_BLOCK_ELEMENTS = 2**25
"""Default chunk: as many rows as make a ``[chunk, V]`` float32 block of 2^25 elements (128 MiB), from
32 to 1024 rows: 1024 rows at a 32k vocabulary, 256 at 128k, 128 at 262k."""

# Inside a chunk, the float32 temporaries of the log-softmax (and of the statistics) are made for
# 1/_SUB_BLOCKS of its rows at a time, so they add at most a fraction of a block (smaller sub-blocks
# make the softmax kernels measurably slower on CPU).
_SUB_BLOCKS = 4

# How many rows the self-check of the final logit processing feeds through the model's own forward.
_PROBE_ROWS = 2


# ================================================================================================ processing
@dataclass(frozen=True)
class LogitProcessing:
    """What a ``*ForCausalLM.forward`` does to the LM head's output before returning it as ``logits``.

    Applied in this order, each step in the dtype the model uses for it: ``upcast`` (``logits.float()``,
    Mamba-style heads), ``multiply`` (Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``),
    ``divide`` (Granite's ``logits_scaling``), ``softcap`` (``tanh(z / c) * c``: Gemma2, Gemma3, Gemma3n).
    """

    upcast: bool = False
    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return not self.upcast and self.multiply is None and self.divide is None and self.softcap is None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The same operations, in the same order and dtypes, as the model's forward."""
        if self.upcast:
            logits = logits.float()
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    def __str__(self) -> str:
        steps = [f.name if f.name == "upcast" else f"{f.name} {getattr(self, f.name)}" for f in fields(self)
                 if getattr(self, f.name) not in (None, False)]
        return ", ".join(steps) or "none"


@dataclass(frozen=True)
class _Tempered:
    """The final logit processing, then a division by a sampling temperature (in float32): the distribution
    RL trainers score completions under (``logits / temperature``, as TRL's GRPO and RLOO trainers do).

    Same interface as :class:`LogitProcessing` for the chunk functions; never used for the self-check, which
    compares the model's own processing only.
    """

    processing: LogitProcessing
    temperature: float

    @property
    def is_identity(self) -> bool:
        return False

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.processing.apply(logits).float() / self.temperature


def _final_softcap(attribute: str = "final_logit_softcapping", upcast: bool = False):
    return lambda text: LogitProcessing(upcast=upcast, softcap=getattr(text, attribute, None))


def _scale(operation: str, attribute: str):
    return lambda text: LogitProcessing(**{operation: getattr(text, attribute)})


# model_type of the outer model (its config, not the text decoder's) -> what its forward does to the
# logits, read from the text config. Read from transformers' *ForCausalLM / *ForConditionalGeneration
# forwards (4.57-5.23); a model_type not listed applies nothing. Every model is also checked once against
# its own forward (_verify_processing), so a version that does something else raises instead.
_FINAL_LOGITS: dict[str, Callable[[object], LogitProcessing]] = {
    # logits / c; tanh; * c, in the model's dtype
    **dict.fromkeys(
        ("gemma2", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "vaultgemma", "nanochat",
         "paligemma"),
        _final_softcap(),
    ),
    # Gemma3ForConditionalGeneration's forward applies no final softcap (Gemma 3 checkpoints set none)
    "gemma3": lambda text: LogitProcessing(),
    "recurrent_gemma": _final_softcap("logits_soft_cap"),
    "beam": _final_softcap(upcast=True),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), _scale("multiply", "logit_scale")),
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid"),
        _scale("divide", "logits_scaling"),
    ),
    "hyperclovax": _scale("multiply", "logits_scaling"),
    "falcon_h1": _scale("multiply", "lm_head_multiplier"),
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba", "nemotron_h"), lambda text: LogitProcessing(upcast=True)),
}


def logit_processing(model) -> LogitProcessing:
    """The final logit processing of ``model``'s forward (a transformers model, or peft/DDP/FSDP around one)."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    rule = _FINAL_LOGITS.get(getattr(config, "model_type", None))
    return rule(text_config(config)) if rule is not None else LogitProcessing()


class LogitProcessingMismatch(RuntimeError):
    """The model's own forward processes its logits differently from what prefixshare applies."""


def _verification_key(processing: LogitProcessing, dtype: torch.dtype):
    return (processing, dtype)


def _is_verified(model, key) -> bool:
    return key in unwrap_model(model).__dict__.get("_prefixshare_verified_logits", ())


def _verify_processing(model, processing: LogitProcessing, raw: torch.Tensor, returned, key) -> None:
    """Compare ``processing(raw)`` with what the model's forward returned for the same LM head output.

    ``raw``: the LM head's output for ``_PROBE_ROWS`` predictor rows inside the model's forward;
    ``returned``: the forward's ``logits`` for them. The same operations on the same tensor agree up to
    a few ulps (vectorized and scalar tails of ``tanh``); a missing or extra step (a softcap, a scale) is
    orders of magnitude larger, and a step done in another dtype (a softcap before or after an upcast)
    differs by the coarser dtype's rounding, far above the finer one's ulps.
    """
    name = type(unwrap_model(model)).__name__
    mine = processing.apply(raw.detach())
    if not isinstance(returned, torch.Tensor) or tuple(returned.shape) != tuple(mine.shape):
        got = tuple(returned.shape) if isinstance(returned, torch.Tensor) else type(returned).__name__
        raise LogitProcessingMismatch(
            f"prefixshare.response_logps: {name}'s forward returned logits of shape {got} for an LM head output "
            f"of shape {tuple(raw.shape)}; it changes the logits in a way prefixshare does not reproduce. "
            "Use prefixshare.gather_response_logps(model(**batch).logits, batch) for this model"
        )
    finest = min(torch.finfo(returned.dtype).eps, torch.finfo(mine.dtype).eps)
    returned, mine = returned.detach().float(), mine.float()
    finite = torch.isfinite(returned) & torch.isfinite(mine)
    # nan/inf (a diverged model) must sit at the same places with the same values; they decide nothing else
    same_nonfinite = bool(((mine == returned) | (mine.isnan() & returned.isnan()) | finite).all())
    if not bool(finite.any()) and same_nonfinite:
        return  # nothing finite to compare: check again on the next call
    scale = returned[finite].abs().max().clamp_min(1.0) if bool(finite.any()) else returned.new_tensor(1.0)
    error = float((mine - returned)[finite].abs().max() / scale) if same_nonfinite else float("nan")
    # a few ulps of the finer of the two dtypes: a step done in another precision (a softcap after the
    # model's upcast, computed in bfloat16 here) differs by the coarser one's rounding
    tolerance = 4 * finest
    if not error <= tolerance:  # also catches NaN
        raise LogitProcessingMismatch(
            f"prefixshare.response_logps: {name}'s forward processes the LM head's output differently from "
            f"the final logit processing prefixshare applies for model_type "
            f"{getattr(unwrap_model(model).config, 'model_type', None)!r} ({processing}): relative difference "
            f"{error:.3g} > {tolerance:.3g} on the same rows. Its log-probs would be wrong, so none are returned; "
            "use prefixshare.gather_response_logps(model(**batch).logits, batch) for this model"
        )
    unwrap_model(model).__dict__.setdefault("_prefixshare_verified_logits", set()).add(key)


# ================================================================================================ the forward
def _run_model(model, inputs):
    """The one place where the engine runs a model forward (``model(**inputs)``); it raises
    :class:`~prefixshare.LayoutNotAppliedError` unless every attention layer applied the batch's layout."""
    with expect_layout_applied(model, layout_of(inputs)):
        return model(**inputs)


def _output_embeddings(model) -> torch.nn.Module:
    inner = unwrap_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        raise ValueError(
            f"prefixshare.response_logps needs the model's LM head (get_output_embeddings()); "
            f"{type(inner).__name__} has none"
        )
    return head


class _Captured(NamedTuple):
    rows: torch.Tensor  # [T, H] hidden states at the predictor positions, with their graph
    logits: torch.Tensor | None  # [T, V] the LM head's output on all rows (only when it is gathered per call)
    link: torch.Tensor  # a 0-dim zero depending on the forward's returned logits (see _forward_to_head)
    probe_raw: torch.Tensor | None  # [1, P, V] the LM head's output for the probe rows inside the forward
    probe_returned: torch.Tensor | None  # [1, P, V] the forward's logits for them
    key: tuple | None  # the self-check key, when a probe ran
    autocast: torch.dtype | None  # the autocast dtype the forward called its LM head under (None: autocast off)


def _forward_to_head(model, batch, head: torch.nn.Module, processing: LogitProcessing, whole: bool) -> _Captured:
    """Run the forward with the LM head's input narrowed to the predictor rows; capture those rows.

    The model's own LM head call gets no row at all (or, once per model and dtype, the first
    ``_PROBE_ROWS`` rows for the self-check), so the forward builds no vocabulary logits. Everything before
    the LM head (decoder, final norm) and every wrapper (peft, DDP, FSDP) runs as usual.

    ``whole``: the LM head's parameters are gathered by its wrapper on every call (see ``_gathered_per_call``),
    so it is called once, on all ``T`` rows, and its ``[T, V]`` output is captured; the model's own final
    processing then sees only the probe rows.
    """
    layout = layout_of(batch)
    state: dict = {"calls": 0}

    def narrow(module, args, kwargs):
        state["calls"] += 1
        hidden = args[0] if args else kwargs.get("input")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != layout.shape:
            got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(
                f"prefixshare.response_logps: the LM head received hidden states of shape {got}, which do not "
                f"match the batch layout {layout.shape} (rows, row length)"
            )
        B, L, H = hidden.shape
        rows = hidden.reshape(B * L, H).index_select(0, layout.to(hidden.device).predictor_index)
        state["rows"] = rows
        # accelerate (mixed precision) turns autocast on inside the model's own forward: the engine's LM head
        # calls, made after it, must run under the same state to compute the model's numbers (fp16 weights with
        # float32 hidden states would not even multiply outside it)
        state["autocast"] = autocast_dtype(hidden.device)
        key = _verification_key(processing, hidden.dtype)
        state["probe"] = probe = 0 if _is_verified(model, key) else min(_PROBE_ROWS, rows.shape[0])
        if probe:
            state["key"] = key
        narrowed = (rows if whole else rows[:probe]).unsqueeze(0)  # [1, rows, H], still on the graph (see link)
        if args:
            return (narrowed, *args[1:]), kwargs
        return args, {**kwargs, "input": narrowed}

    def record(module, args, kwargs, output):
        probe = state.get("probe", 0)
        if whole:
            state["logits"] = output[0]
        if "key" in state:
            state["probe_raw"] = output[:, :probe]
        return output[:, :probe] if whole else None  # the model's own processing: the probe rows only

    handles = [
        head.register_forward_pre_hook(narrow, with_kwargs=True, prepend=True),
        head.register_forward_hook(record, with_kwargs=True),
    ]
    try:
        output = _run_model(model, {**batch, "use_cache": False})
    finally:
        for handle in handles:
            handle.remove()
    name = type(unwrap_model(model)).__name__
    if state["calls"] != 1:
        raise ValueError(
            f"prefixshare.response_logps: the forward of {name} called its LM head ({type(head).__name__}) "
            f"{state['calls']} times instead of once; use prefixshare.gather_response_logps(model(**batch).logits, "
            "batch) for this model"
        )
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    # A zero that depends on the returned logits: added to the log-probs, it puts the forward's output on the
    # backward's path, so that hooks registered on it (FSDP2's pre-backward of the root) fire as usual.
    link = logits[:, :0].sum() if isinstance(logits, torch.Tensor) and logits.dim() == 3 else None
    if link is None:
        link = state["rows"].new_zeros((), dtype=torch.float32)
    probe = (state.get("probe_raw"), logits, state["key"]) if "key" in state else (None, None, None)
    return _Captured(state["rows"], state.get("logits"), link, *probe, state["autocast"])


def _gathered_per_call(head: torch.nn.Module) -> str | None:
    """Why the LM head's parameters are gathered by a wrapper on every call of it, or None.

    An FSDP2 unit of its own (``fully_shard(model.lm_head)``), an FSDP1 unit or DeepSpeed ZeRO-3 partitioned
    parameters: each call of the head is a collective, and the number of chunks differs from rank to rank
    (it follows the rank's response tokens), so calling it per chunk would mismatch the ranks' collectives.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()
    for m in head.modules():
        if isinstance(m, FSDPModule):
            return "it is an FSDP2 unit of its own (fully_shard on the LM head)"
        if type(m).__name__ == "FullyShardedDataParallel":
            return "it is an FSDP1 unit of its own"
    if any(hasattr(p, "ds_id") for p in head.parameters()):
        return "DeepSpeed ZeRO-3 partitions its parameters"
    return None


# ================================================================================================ FSDP2
def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def _fsdp2_owner(model, head):
    """The innermost FSDP2 module (``fully_shard``-ed) whose subtree holds ``head``, or None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    owner = None
    for module in model.modules():  # pre-order: an ancestor comes before its descendants
        if isinstance(module, FSDPModule) and any(m is head for m in module.modules()):
            owner = module
    return owner


@contextlib.contextmanager
def _head_gathered(model, head: torch.nn.Module, keep_gathered: bool):
    """The LM head's parameters gathered for the chunk loop, once.

    After the forward, FSDP2 has resharded the LM head's parameters only if their FSDP2 module was sharded
    with ``reshard_after_forward=True``; gather them once here. ``keep_gathered``: leave them gathered for
    the backward's recompute (FSDP2's post-backward reshards them).
    """
    if not any(_is_dtensor(p) for p in head.parameters()):
        yield
        return
    owner = _fsdp2_owner(model, head)
    if owner is None:
        raise ValueError(
            "prefixshare.response_logps: the LM head's parameters are DTensors outside FSDP2 (tensor parallelism?); "
            "this is not supported"
        )
    owner.unshard()
    try:
        yield
    finally:
        if not keep_gathered:
            owner.reshard()


# ================================================================================================ the chunks
class _StatSink:
    """Per-token statistics, written by the chunks of the forward pass (not by recomputes)."""

    def __init__(self, names, num_tokens: int, device):
        self.values = {name: torch.empty(num_tokens, dtype=torch.float32, device=device) for name in names}
        self.active = bool(names)

    def write(self, name: str, start: int, value: torch.Tensor) -> None:
        if name in self.values:
            self.values[name][start : start + value.shape[0]] = value


def _sub_blocks(rows: int) -> int:
    return max(1, math.ceil(rows / _SUB_BLOCKS))


# grad_fn of a tensor that no autograd node keeps for its backward (ops that save inputs, not outputs):
# the backward may then overwrite the LM head's output with its own gradient instead of allocating a block
_OUTPUT_NOT_SAVED = {
    "MmBackward0", "AddmmBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
    "AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0", "ToCopyBackward0", "LinearBackward0",
}  # fmt: skip


class _LogSoftmaxGather(torch.autograd.Function):
    """``[c, V]`` LM head output -> ``[c]`` float32 log p(target), with the final processing fused in.

    Forward: ``z = processing(logits).float()`` and its log-softmax are formed for ``c / 4`` rows at a time,
    so only a fraction of a block is added to the LM head's output; the statistics come from the same ``z``.
    Backward: ``dz = g * (onehot - softmax(z))`` (through the processing by autograd on the same operations)
    for ``c / 4`` rows at a time, written into the saved LM head output when nothing else holds it.

    ``entropy=True``: also returns the ``[c]`` float32 entropy ``H = -sum_v p_v log p_v`` as a second output
    with a gradient (the sink gets no ``entropy`` then): the backward adds ``g_H * dH/dz = -g_H * p * (log p + H)``
    to ``dz``. The saved LM head output is then never overwritten, so that the frozen-head path can run the
    backward twice on one graph (once per output).
    """

    @staticmethod
    def forward(ctx, logits, targets, processing: LogitProcessing, sink: _StatSink | None, offset: int,
                entropy: bool = False):  # fmt: skip
        rows = logits.shape[0]
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)
        entropies = torch.empty(rows, dtype=torch.float32, device=logits.device) if entropy else None
        write_stats = sink is not None and sink.active
        step = _sub_blocks(rows)
        for start in range(0, rows, step):
            block = slice(start, start + step)
            z = processing.apply(logits[block]).float()
            t = targets[block].unsqueeze(-1)
            log_p = torch.log_softmax(z, dim=-1)  # the one float32 temporary of this sub-block
            out[block] = log_p.gather(-1, t).squeeze(-1)
            if write_stats:
                at = offset + start
                if "logsumexp" in sink.values:  # at the maximum, z - log_p is max + log(sum exp(z - max)) exactly
                    sink.write("logsumexp", at, z.amax(-1) - log_p.amax(-1))
                if "mean_logit" in sink.values:
                    sink.write("mean_logit", at, z.mean(-1))
                if "log_sum_sq_probs" in sink.values:  # log sum_v p_v^2 = logsumexp(2 log p)
                    sink.write("log_sum_sq_probs", at, torch.logsumexp(2.0 * log_p, dim=-1))
                if "argmax_match" in sink.values:
                    # argmax: the first maximum, as TRL counts. argmax takes a nan for the maximum, while TRL's
                    # comparisons with a nan are false: a nan target logit is a miss, as there
                    target_logit = z.gather(-1, t).squeeze(-1)
                    hit = (z.argmax(-1) == targets[block]) & ~target_logit.isnan()
                    sink.write("argmax_match", at, hit.float())
                if "entropy" in sink.values:  # -softmax . log_softmax, without a third [rows, V] temporary
                    sink.write("entropy", at, _entropy_of(log_p))
            if entropy:
                entropies[block] = _entropy_of(log_p)
            del z, log_p
        ctx.processing = processing
        ctx.entropy = entropy
        if entropy:
            ctx.save_for_backward(logits, targets, entropies)
            return out, entropies
        ctx.save_for_backward(logits, targets)
        return out

    @staticmethod
    def backward(ctx, grad, grad_entropy=None):
        logits, targets, *entropies = ctx.saved_tensors
        processing = ctx.processing
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        if ctx.entropy:
            return _entropy_backward(logits, targets, processing, grad, grad_entropy, entropies[0])
        grad = grad.float()
        overwrite = logits.grad_fn is not None and type(logits.grad_fn).__name__ in _OUTPUT_NOT_SAVED
        result = logits if overwrite else torch.empty_like(logits)
        step = _sub_blocks(logits.shape[0])
        for start in range(0, logits.shape[0], step):
            block = slice(start, start + step)
            g, t = grad[block].unsqueeze(-1), targets[block].unsqueeze(-1)
            if processing.is_identity and logits.dtype == torch.float32:
                dz = torch.softmax(logits[block], dim=-1)  # read before the block is overwritten below
                torch.mul(dz, -g, out=result[block])
                result[block].scatter_add_(-1, t, g)
            elif processing.is_identity:
                dz = torch.softmax(logits[block].float(), dim=-1)
                result[block] = dz.mul_(-g).scatter_add_(-1, t, g)  # cast to the logits' dtype
            else:
                with torch.enable_grad():
                    x = logits[block].detach().requires_grad_(True)
                    z = processing.apply(x).float()
                    dz = torch.softmax(z.detach(), dim=-1).mul_(-g).scatter_add_(-1, t, g)
                    (dx,) = torch.autograd.grad(z, x, dz)
                result[block] = dx
            del dz
        return result, None, None, None, None, None


def _entropy_of(log_p: torch.Tensor) -> torch.Tensor:
    """``[r, V]`` float32 log-softmax -> ``[r]`` entropy ``-softmax . log_softmax`` (no third ``[r, V]`` temporary)."""
    p = log_p.exp()
    return -torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(-1)


def _entropy_backward(logits, targets, processing, grad, grad_entropy, entropies):
    """The gradient of ``sum(g * log p(target) + g_H * H)`` with respect to the LM head output ``[c, V]``.

    ``dz = g * (onehot - p) - g_H * p * (log p + H)`` with ``p = softmax(z)`` of the processed float32 logits,
    ``c / 4`` rows at a time, then through the processing by autograd on the same operations. A new block: the
    saved LM head output may be read by a second backward (frozen head: one per output).
    """
    grad = grad.float()
    grad_entropy = torch.zeros_like(grad) if grad_entropy is None else grad_entropy.float()
    result = torch.empty_like(logits)
    step = _sub_blocks(logits.shape[0])
    for start in range(0, logits.shape[0], step):
        block = slice(start, start + step)
        g, g_h, t = grad[block].unsqueeze(-1), grad_entropy[block].unsqueeze(-1), targets[block].unsqueeze(-1)
        with torch.enable_grad():
            x = logits[block].detach().requires_grad_(not processing.is_identity or logits.dtype != torch.float32)
            z = processing.apply(x).float()
            log_p = torch.log_softmax(z.detach(), dim=-1)
            p = log_p.exp()
            # -p * (g + g_H * (log p + H)) + onehot * g, in place on the two float32 temporaries
            dz = p.mul_(log_p.add_(entropies[block].unsqueeze(-1)).mul_(g_h).add_(g)).neg_().scatter_add_(-1, t, g)
            del log_p
            if x.requires_grad:
                (dz,) = torch.autograd.grad(z, x, dz)
        result[block] = dz
        del dz
    return result, None, None, None, None, None


class _PrecomputedGrad(torch.autograd.Function):
    """Token log-probs (and entropies) whose gradient with respect to their hidden rows was computed in the forward.

    ``token_logps[t]`` depends on row ``t`` only, so ``d token_logps[t] / d rows[t]`` (``A[t]``, ``[H]``) is
    the gradient of ``sum(token_logps)`` by row, and the backward is ``grad[t] * A[t]``. With entropies (and their
    row gradients ``B``, ``[T, H]``) the backward is ``grad[t] * A[t] + grad_H[t] * B[t]``.
    """

    @staticmethod
    def forward(ctx, rows, token_logps, row_grads, entropies=None, entropy_row_grads=None):
        if entropies is None:
            ctx.save_for_backward(row_grads)
            return token_logps.clone()
        ctx.save_for_backward(row_grads, entropy_row_grads)
        return token_logps.clone(), entropies.clone()

    @staticmethod
    def backward(ctx, grad, grad_entropy=None):
        row_grads, *entropy_row_grads = ctx.saved_tensors
        result = row_grads * grad.unsqueeze(-1).to(row_grads.dtype)
        if entropy_row_grads and grad_entropy is not None:
            result = result + entropy_row_grads[0] * grad_entropy.unsqueeze(-1).to(row_grads.dtype)
        return result, None, None, None, None


def _has_foreign_hooks(head: torch.nn.Module) -> bool:
    """Hooks other than prefixshare's on the LM head (FSDP2, ZeRO-3, tensor parallel register some)."""
    from torch.nn.modules import module as torch_module

    for m in head.modules():
        for name in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(m, name, None):
                return True
        if type(m).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine"):
            return True
    return any(
        getattr(torch_module, name, None)
        for name in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks")
    )  # fmt: skip


def fused_token_logps(
    head: torch.nn.Module,
    rows: torch.Tensor,
    targets: torch.Tensor,
    processing: LogitProcessing,
    chunk_size: int,
    stats: tuple[str, ...] = (),
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``[T, H]`` predictor rows and ``[T]`` targets -> ``[T]`` float32 log-probs and ``{stat: [T]}``.

    The LM head runs on ``chunk_size`` rows at a time; see the module docstring for the two gradient modes.
    ``entropy_grad`` (with ``"entropy"`` in ``stats``): the ``entropy`` values carry their graph, in every mode.
    """
    T = rows.shape[0]
    head_trainable = any(p.requires_grad for p in head.parameters())
    needs_graph = torch.is_grad_enabled() and (rows.requires_grad or head_trainable)
    # differentiable entropies come out of the chunks themselves, not out of the (no-grad) sink
    entropy_grad = entropy_grad and needs_graph and "entropy" in stats
    sink = _StatSink(tuple(s for s in stats if not (entropy_grad and s == "entropy")), T, rows.device)
    row_chunks, target_chunks = rows.split(chunk_size), targets.split(chunk_size)
    offsets = range(0, T, chunk_size)

    if not needs_graph:
        with torch.no_grad():
            parts = [
                _LogSoftmaxGather.apply(head(x), t, processing, sink, at)
                for x, t, at in zip(row_chunks, target_chunks, offsets)
            ]
        return torch.cat(parts), sink.values

    if not head_trainable and not _has_foreign_hooks(head):
        # frozen head: each chunk's gradient with respect to its rows, now (no recompute in backward)
        parts, row_grads, entropies, entropy_row_grads = [], [], [], []
        for x, t, at in zip(row_chunks, target_chunks, offsets):
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                outputs = _LogSoftmaxGather.apply(head(leaf), t, processing, sink, at, entropy_grad)
                logps, entropy = outputs if entropy_grad else (outputs, None)
                (grad,) = torch.autograd.grad(logps, leaf, torch.ones_like(logps), retain_graph=entropy_grad)
                if entropy_grad:
                    (entropy_grad_rows,) = torch.autograd.grad(entropy, leaf, torch.ones_like(entropy))
                    entropies.append(entropy.detach())
                    entropy_row_grads.append(entropy_grad_rows)
            parts.append(logps.detach())
            row_grads.append(grad)
        if not entropy_grad:
            return _PrecomputedGrad.apply(rows, torch.cat(parts), torch.cat(row_grads)), sink.values
        logps, entropy = _PrecomputedGrad.apply(
            rows, torch.cat(parts), torch.cat(row_grads), torch.cat(entropies), torch.cat(entropy_row_grads)
        )
        return logps, _with_entropy(stats, sink, entropy)

    # trainable head: recompute each chunk's LM head call in backward
    def chunk(x, t, at):
        return _LogSoftmaxGather.apply(head(x), t, processing, sink, at, entropy_grad)

    parts = [checkpoint(chunk, x, t, at, use_reentrant=False) for x, t, at in zip(row_chunks, target_chunks, offsets)]
    sink.active = False  # the recomputes in backward must not write the statistics again
    if not entropy_grad:
        return torch.cat(parts), sink.values
    return torch.cat([p for p, _ in parts]), _with_entropy(stats, sink, torch.cat([e for _, e in parts]))


def _with_entropy(stats, sink: _StatSink, entropy: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{stat: [T]}`` in the order of ``stats``: the sink's, and the differentiable ``entropy``."""
    return {name: entropy if name == "entropy" else sink.values[name] for name in stats}


def _chunked_logits_logps(logits, targets, processing, chunk_size: int, stats=(), entropy_grad: bool = False):
    """``[T, V]`` LM head output (already built) -> ``[T]`` log-probs and ``{stat: [T]}``, fused per chunk.

    ``entropy_grad``: the ``entropy`` values carry their graph (when the logits have one)."""
    entropy_grad = entropy_grad and "entropy" in stats and torch.is_grad_enabled() and logits.requires_grad
    sink = _StatSink(tuple(s for s in stats if not (entropy_grad and s == "entropy")), logits.shape[0], logits.device)
    parts = [
        _LogSoftmaxGather.apply(z, t, processing, sink, at, entropy_grad)
        for z, t, at in zip(logits.split(chunk_size), targets.split(chunk_size), range(0, logits.shape[0], chunk_size))
    ]
    if not entropy_grad:
        return torch.cat(parts), sink.values
    return torch.cat([p for p, _ in parts]), _with_entropy(stats, sink, torch.cat([e for _, e in parts]))


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk: a ``[chunk, V]`` float32 block of :data:`DEFAULT_BLOCK_ELEMENTS`, 32 to 1024 rows."""
    return int(min(1024, max(32, DEFAULT_BLOCK_ELEMENTS // max(1, vocab_size))))


def _vocab_size(model, head) -> int:
    vocab = getattr(text_config(getattr(unwrap_model(model), "config", None)), "vocab_size", None)
    return int(vocab or getattr(head, "out_features", 0) or 32000)


def _check_stats(stats) -> tuple[str, ...]:
    if isinstance(stats, str):
        stats = (stats,)
    stats = tuple(stats)
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"unknown stats {unknown}; choose from {list(STATS)}")
    return tuple(dict.fromkeys(stats))


# ================================================================================================ public
def response_logps(
    model,
    batch,
    *,
    per_token: bool = False,
    stats=(),
    chunk_size: int | None = None,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> ResponseLogps:
    """Log-probs of every response of a prefix-shared (or paired) batch, without ``[T, V]`` logits.

    Equal to ``gather_response_logps(model(**batch).logits, batch)`` up to float rounding, values and
    gradients (of every trainable parameter, the LM head's and tied embeddings' included).

    Args:
        model: a model patched with :func:`prefixshare.patch` (transformers, peft, DDP, FSDP around one).
        batch: the collator's batch (``input_ids``, ``position_ids``, ``prefixshare_layout``); every key is
            passed to the model.
        per_token: also return ``token_logps`` (``[T]`` float32, with its graph).
        stats: names from :data:`STATS` to compute per token in the same pass (float32, no gradient unless
            ``entropy_grad``).
        chunk_size: rows of the LM head per chunk; None: :func:`default_chunk_size` of the vocabulary.
        temperature: score under ``softmax(logits / temperature)`` (the processed logits, divided in float32),
            the distribution completions were sampled from in RL (TRL's GRPO and RLOO trainers do the same);
            the statistics are of that distribution too. 1.0: the model's own distribution.
        entropy_grad: the ``entropy`` statistic (``"entropy"`` must be in ``stats``) carries its graph, like
            ``token_logps``: ``stats["entropy"]`` ``[T]`` and ``stat_sums["entropy"]`` ``[n, K]`` float32, with the
            exact gradient ``dH/dz = -p (log p + H)`` of the processed float32 logits ``z`` (``p = softmax(z)``),
            still without ``[T, V]`` logits (for entropy bonuses, e.g. TRL GRPO's ``entropy_coef``). Costs one
            more ``[chunk, V]`` float32 temporary per sub-block in backward and, with a frozen LM head, a second
            backward of each chunk in the forward. The other statistics stay without gradient.

    Returns:
        :class:`~prefixshare.ResponseLogps`: ``logps`` ``[n, K]`` float32 (sums over each response) and
        ``num_tokens`` ``[n, K]``; with ``per_token`` or ``stats`` also ``token_index`` (example, response
        slot and position in the response of each of the ``T`` tokens); ``token_logps`` ``[T]`` with
        ``per_token``; ``stats`` ``{name: [T]}`` and ``stat_sums`` ``{name: [n, K]}`` with ``stats``.
        :meth:`~prefixshare.ResponseLogps.padded` pads per-token values to ``[n, K, max_len]`` with a mask.

    Raises:
        ValueError: unknown stats, a bad ``chunk_size`` or ``temperature``, ``entropy_grad`` without ``"entropy"``
            in ``stats``, a batch whose layout does not match the hidden
            states, a model without an LM head or whose forward calls it more than once.
        LogitProcessingMismatch: the model's forward post-processes its logits in a way prefixshare does not
            reproduce (checked once per model and dtype on two rows of the batch).
    """
    stats = _check_stats(stats)
    if entropy_grad and "entropy" not in stats:
        raise ValueError(f"entropy_grad=True needs 'entropy' in stats (got stats={list(stats)})")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    head = _output_embeddings(model)
    processing = logit_processing(model)
    per_call = _gathered_per_call(head)
    if per_call and not head.__dict__.get("_prefixshare_warned_per_call"):
        head.__dict__["_prefixshare_warned_per_call"] = True
        warnings.warn(
            f"prefixshare.response_logps: the LM head is gathered on every call ({per_call}), so it runs once on all "
            "response tokens: their [T, V] logits exist in the model's dtype (the log-softmax is still chunked). "
            "Shard the LM head with its parent module for the chunked LM head",
            stacklevel=2,
        )
    captured = _forward_to_head(model, batch, head, processing, whole=per_call is not None)
    if captured.key is not None:
        _verify_processing(model, processing, captured.probe_raw, captured.probe_returned, captured.key)

    rows = captured.rows
    layout = layout_of(batch).to(rows.device)
    targets = input_ids_of(batch, None).to(rows.device).reshape(-1)[layout.target_index]
    chunk = chunk_size or default_chunk_size(_vocab_size(model, head))
    if temperature != 1.0:
        processing = _Tempered(processing, float(temperature))
    if captured.logits is not None:
        token_logps, token_stats = _chunked_logits_logps(
            captured.logits, targets, processing, chunk, stats, entropy_grad
        )
    else:
        head_trainable = any(p.requires_grad for p in head.parameters())
        with _head_gathered(model, head, keep_gathered=torch.is_grad_enabled() and head_trainable), autocast_as(
            rows.device, captured.autocast
        ):
            token_logps, token_stats = fused_token_logps(head, rows, targets, processing, chunk, stats, entropy_grad)
    token_logps = token_logps + captured.link
    if token_stats.get("entropy") is not None and token_stats["entropy"].requires_grad:
        token_stats["entropy"] = token_stats["entropy"] + captured.link  # on the forward's output, as token_logps

    sums = sum_per_response(token_logps, layout)
    if not (per_token or stats):
        return ResponseLogps(sums, layout.response_lengths)
    return ResponseLogps(
        sums,
        layout.response_lengths,
        token_logps=token_logps if per_token else None,
        token_index=token_index_of(layout),
        stats=token_stats if stats else None,
        stat_sums={name: sum_per_response(value, layout) for name, value in token_stats.items()} if stats else None,
    )
